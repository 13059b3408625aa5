//! The connector's configuration: the `[connectors.<name>]` table of the daemon's TOML
//! without the daemon's own keys (`kind`, schedules).
//!
//! ```toml
//! url = "https://hooks.example.com/optout"
//! secret = { env = "OPTOUT_WEBHOOK_SECRET" }      # the HMAC key
//! bearer_token = { file = "/etc/optout-sync/webhook-token" }   # optional
//! timeout = "10s"
//! batch_size = 50
//! concurrency = 8
//! headers = { "X-Tenant" = "acme" }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use optout_core::SecretRef;
use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};
use serde::Deserialize;

/// Headers the connector sets itself; a static header must not override them, or a
/// receiver could see a signature that does not match what was signed.
pub(crate) const RESERVED_HEADERS: [&str; 7] = [
    "authorization",
    "content-type",
    "content-length",
    "host",
    "x-optout-event-id",
    "x-optout-timestamp",
    "x-optout-signature-256",
];

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where events are POSTed (http or https). It may carry a token in its path (many
    /// automation tools work that way), so only its host is ever logged or shown.
    pub url: String,
    /// The HMAC-SHA256 key receivers use to verify `X-Optout-Signature-256`.
    pub secret: SecretRef,
    /// Sent as `Authorization: Bearer <token>` when set. Secrets never live in the TOML,
    /// which is why `headers` refuses `Authorization`.
    #[serde(default)]
    pub bearer_token: Option<SecretRef>,
    /// Per-request timeout (connect + response).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// The most items one `push` call takes. Each item is its own HTTP request.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How many requests of one batch are in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Extra static headers sent with every request (name → value).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_batch_size() -> usize {
    50
}

fn default_concurrency() -> usize {
    8
}

impl Config {
    /// A configuration with defaults for everything optional.
    pub fn new(url: impl Into<String>, secret: SecretRef) -> Self {
        Config {
            url: url.into(),
            secret,
            bearer_token: None,
            timeout: default_timeout(),
            batch_size: default_batch_size(),
            concurrency: default_concurrency(),
            headers: BTreeMap::new(),
        }
    }

    /// Semantic problems as (key, problem) pairs; empty when the configuration is usable.
    /// Secrets are not resolved here (the daemon checks them through [`Config::secrets`]).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, what: String| problems.push((key.to_string(), what));
        if let Err(e) = parse_url(&self.url) {
            problem("url", e);
        }
        if self.timeout.is_zero() {
            problem("timeout", "must be longer than zero".into());
        }
        if self.batch_size == 0 {
            problem("batch_size", "must be at least 1".into());
        }
        if self.concurrency == 0 {
            problem("concurrency", "must be at least 1".into());
        }
        for (name, value) in &self.headers {
            let key = format!("headers.{name}");
            let lower = name.to_ascii_lowercase();
            if lower == "authorization" {
                problem(
                    &key,
                    "secrets must not be written in the configuration file; use bearer_token = { env = \"NAME\" } instead".into(),
                );
            } else if RESERVED_HEADERS.contains(&lower.as_str()) {
                problem(&key, "is set by the connector itself".into());
            } else if HeaderName::from_bytes(name.as_bytes()).is_err() {
                problem(&key, "is not a valid HTTP header name".into());
            } else if HeaderValue::from_str(value).is_err() {
                problem(&key, "the value is not a valid HTTP header value".into());
            }
        }
        problems
    }

    /// Every secret reference, with its key, for the daemon's secret checks.
    pub fn secrets(&self) -> Vec<(&'static str, &SecretRef)> {
        let mut out = vec![("secret", &self.secret)];
        if let Some(token) = &self.bearer_token {
            out.push(("bearer_token", token));
        }
        out
    }

    /// The URL's host, the only part of it safe to show.
    pub fn host(&self) -> String {
        host_of(&self.url)
    }
}

/// Parses and checks the target URL: http or https, with a host. Messages never repeat
/// the URL itself.
pub(crate) fn parse_url(url: &str) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("is not a valid URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "scheme must be http or https, not {}",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    Ok(parsed)
}

pub(crate) fn host_of(url: &str) -> String {
    Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| "<invalid url>".into())
}

/// Shows the URL's host and the header names only: the URL's path and query may carry a
/// token, and header values are the operator's business.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("url_host", &self.host())
            .field("secret", &self.secret)
            .field("bearer_token", &self.bearer_token)
            .field("timeout", &self.timeout)
            .field("batch_size", &self.batch_size)
            .field("concurrency", &self.concurrency)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn defaults_and_full_form() {
        let c = parse("url = \"https://h.example/x\"\nsecret = { env = \"S\" }\n").unwrap();
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!((c.batch_size, c.concurrency), (50, 8));
        assert!(c.headers.is_empty() && c.bearer_token.is_none());
        assert!(c.validate().is_empty());
        assert_eq!(c.secrets().len(), 1);

        let c = parse(
            r#"
            url = "http://127.0.0.1:8080/hook"
            secret = { file = "/etc/s" }
            bearer_token = { credential = "tok" }
            timeout = "250ms"
            batch_size = 10
            concurrency = 2
            headers = { "X-Tenant" = "acme" }
            "#,
        )
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(
            c.secrets().iter().map(|s| s.0).collect::<Vec<_>>(),
            ["secret", "bearer_token"]
        );
        assert!(c.validate().is_empty());
    }

    #[test]
    fn refuses_inline_secrets_and_unknown_keys() {
        assert!(parse("url = \"https://h/x\"\nsecret = \"hunter2\"\n").is_err());
        assert!(parse("url = \"https://h/x\"\nsecret = { env = \"S\" }\nretries = 3\n").is_err());
    }

    #[test]
    fn validate_reports_each_problem_by_key() {
        let mut c = Config::new("ftp://h.example/x", SecretRef::Env("S".into()));
        c.batch_size = 0;
        c.concurrency = 0;
        c.timeout = Duration::ZERO;
        c.headers
            .insert("authorization".into(), "Bearer abc".into());
        c.headers
            .insert("X-Optout-Signature-256".into(), "x".into());
        c.headers.insert("Bad Name".into(), "x".into());
        c.headers.insert("X-Ok".into(), "line\nbreak".into());
        let keys: Vec<String> = c.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "url",
                "timeout",
                "batch_size",
                "concurrency",
                "headers.Bad Name",
                "headers.X-Ok",
                "headers.X-Optout-Signature-256",
                "headers.authorization",
            ]
        );
        for bad in [
            "not a url",
            "https://",
            "mailto:a@b.c",
            "file:///etc/passwd",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
        assert!(parse_url("https://hooks.zapier.com/hooks/catch/1/abc/").is_ok());
    }

    #[test]
    fn debug_shows_only_the_host() {
        let mut c = Config::new(
            "https://hooks.example.com/catch/SECRETPATH?token=SECRETQ",
            SecretRef::Env("S".into()),
        );
        c.headers.insert("X-Tenant".into(), "tenant-value".into());
        let shown = format!("{c:?}");
        assert!(shown.contains("hooks.example.com"), "{shown}");
        for hidden in ["SECRETPATH", "SECRETQ", "tenant-value"] {
            assert!(!shown.contains(hidden), "{shown}");
        }
    }
}
