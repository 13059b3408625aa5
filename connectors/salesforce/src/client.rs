//! Talking to Salesforce: logging in (client credentials or JWT bearer), sending data calls
//! to the returned `instance_url` with one re-login on an expired session, reading the org's
//! API usage from every response, and turning failures into [`ConnectorError`]s.
//!
//! API usage rule: every response's `Sforce-Limit-Info: api-usage=used/limit` is remembered.
//! Once `used >= api_share × limit` (the whole org's usage, ours and everyone else's), no
//! request is sent for `quota_pause`: calls fail at once with `QuotaExhausted`. After the
//! pause one request goes out as a probe; its header decides whether the pause continues
//! (the 24-hour window rolls, so usage falls as old requests age out). A 403
//! `REQUEST_LIMIT_EXCEEDED` (the org's allocation is gone) pauses for at least an hour.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use optout_core::{ConnectorError, Secret, Secrets, http};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{AuthConfig, Config};

/// How long a 403 `REQUEST_LIMIT_EXCEEDED` for the daily total pauses the connector at least.
pub const LIMIT_EXCEEDED_PAUSE: Duration = Duration::from_secs(3600);
/// The wait after the org's concurrent long-running request limit was hit.
const CONCURRENCY_PAUSE: Duration = Duration::from_secs(30);
/// Salesforce wants JWT assertions to expire within a few minutes.
const JWT_LIFETIME_SECS: i64 = 180;

/// A failed call: the error for the caller plus Salesforce's `errorCode`, which some callers
/// react to (an expired query locator is not a failure of the poll).
#[derive(Debug)]
pub struct CallError {
    pub code: Option<String>,
    pub error: ConnectorError,
}

impl From<ConnectorError> for CallError {
    fn from(error: ConnectorError) -> Self {
        CallError { code: None, error }
    }
}

impl From<CallError> for ConnectorError {
    fn from(e: CallError) -> Self {
        e.error
    }
}

enum Auth {
    ClientCredentials {
        client_id: String,
        secret: Secret,
    },
    Jwt {
        client_id: String,
        username: String,
        audience: String,
        key: EncodingKey,
    },
}

/// A logged-in session. `generation` tells a stale session from a renewed one, so two calls
/// that both see it expire log in once, not twice.
#[derive(Clone)]
struct Session {
    token: Secret,
    instance_url: String,
    generation: u64,
}

#[derive(Default)]
struct Usage {
    used: u64,
    limit: u64,
    paused_until: Option<Instant>,
}

pub struct Client {
    http: reqwest::Client,
    name: String,
    login_url: String,
    auth: Auth,
    session: tokio::sync::Mutex<Option<Session>>,
    generations: std::sync::atomic::AtomicU64,
    usage: Mutex<Usage>,
    api_share: f64,
    quota_pause: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .field("login_url", &self.login_url)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    instance_url: String,
}

#[derive(Deserialize)]
struct TokenError {
    error: String,
    #[serde(default)]
    error_description: String,
}

impl Client {
    /// Parses the JWT key now, so a bad key fails at start-up. `secrets` are the resolved
    /// `auth.client_secret` or `auth.private_key`.
    pub fn new(name: &str, config: &Config, secrets: &Secrets) -> Result<Self, ConnectorError> {
        let auth = match &config.auth {
            AuthConfig::ClientCredentials { client_id, .. } => Auth::ClientCredentials {
                client_id: client_id.clone(),
                secret: secrets.get("auth.client_secret")?,
            },
            AuthConfig::JwtBearer {
                client_id,
                username,
                private_key,
                audience,
            } => {
                let pem = secrets.get("auth.private_key")?;
                let key = EncodingKey::from_rsa_pem(pem.expose().as_bytes()).map_err(|e| {
                    ConnectorError::Config(format!(
                        "auth.private_key ({}) is not an RSA private key in PEM form: {e}",
                        private_key.describe()
                    ))
                })?;
                Auth::Jwt {
                    client_id: client_id.clone(),
                    username: username.clone(),
                    audience: audience.clone(),
                    key,
                }
            }
        };
        Ok(Client {
            http: http::client(config.timeout),
            name: name.to_string(),
            login_url: config.effective_login_url(),
            auth,
            session: tokio::sync::Mutex::new(None),
            generations: std::sync::atomic::AtomicU64::new(0),
            usage: Mutex::new(Usage::default()),
            api_share: config.api_share,
            quota_pause: config.quota_pause,
        })
    }

    /// The org's API usage as last reported: (used, limit).
    pub fn usage(&self) -> Option<(u64, u64)> {
        let u = self.usage.lock().unwrap();
        (u.limit > 0).then_some((u.used, u.limit))
    }

    /// Sends a data call: `path` is absolute on the instance (`/services/data/v62.0/…`).
    /// On a 401 the session is renewed once and the call repeated once.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&'static str, String)],
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        for attempt in 0..2 {
            self.admit()?;
            let session = self.session().await?;
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", session.instance_url))
                .bearer_auth(session.token.expose())
                .header("Accept", "application/json");
            if !query.is_empty() {
                req = req.query(query);
            }
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(http::transport_error)?;
            let status = resp.status();
            let headers = resp.headers().clone();
            self.record_usage(&headers);
            let text = resp.text().await.map_err(http::transport_error)?;
            if status.is_success() {
                if text.trim().is_empty() {
                    return Ok(Value::Null);
                }
                return serde_json::from_str(&text).map_err(|e| {
                    ConnectorError::Transient(format!(
                        "{method} {path}: the response is not valid JSON ({e})"
                    ))
                    .into()
                });
            }
            let (code, message) = api_error(&text);
            if status == StatusCode::UNAUTHORIZED {
                if attempt == 0 {
                    tracing::info!(connector = %self.name, code = ?code, "session refused; logging in again");
                    self.invalidate(session.generation).await;
                    continue;
                }
                // The next call starts with a fresh login rather than a known-bad session.
                self.invalidate(session.generation).await;
                let error = ConnectorError::Unauthorized(format!(
                    "Salesforce refused a fresh session too ({}: {}); check the run-as user, IP restrictions and the app's session policies",
                    code.as_deref().unwrap_or("401"),
                    http::excerpt(&message)
                ));
                return Err(CallError { code, error });
            }
            let error = self.classify(status, &headers, code.as_deref(), &message);
            return Err(CallError { code, error });
        }
        unreachable!("the second attempt always returns")
    }

    /// Refuses to send while the org's usage is over this daemon's share.
    fn admit(&self) -> Result<(), ConnectorError> {
        let u = self.usage.lock().unwrap();
        match u.paused_until {
            Some(until) if Instant::now() < until => Err(ConnectorError::QuotaExhausted {
                retry_after: until - Instant::now(),
                detail: format!(
                    "org API usage {}/{} is at or over this connector's share ({})",
                    u.used, u.limit, self.api_share
                ),
            }),
            _ => Ok(()),
        }
    }

    fn record_usage(&self, headers: &HeaderMap) {
        let Some((used, limit)) = parse_limit_info(headers) else {
            return;
        };
        let mut u = self.usage.lock().unwrap();
        u.used = used;
        u.limit = limit;
        if over_share(used, limit, self.api_share) {
            if u.paused_until.is_none() {
                tracing::warn!(connector = %self.name, used, limit, share = self.api_share,
                    "org API usage reached this connector's share; pausing");
            }
            u.paused_until = Some(Instant::now() + self.quota_pause);
        } else {
            u.paused_until = None;
        }
    }

    fn classify(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        code: Option<&str>,
        message: &str,
    ) -> ConnectorError {
        let what = format!(
            "{}: {}",
            code.unwrap_or("no errorCode"),
            http::excerpt(message)
        );
        match (status.as_u16(), code) {
            (403, Some("REQUEST_LIMIT_EXCEEDED")) if message.contains("Concurrent") => {
                ConnectorError::RateLimited {
                    retry_after: Some(CONCURRENCY_PAUSE),
                    policy: what,
                }
            }
            (403, Some("REQUEST_LIMIT_EXCEEDED")) => {
                let pause = self.quota_pause.max(LIMIT_EXCEEDED_PAUSE);
                let mut u = self.usage.lock().unwrap();
                u.paused_until = Some(Instant::now() + pause);
                tracing::error!(connector = %self.name, "the org's daily API allocation is used up");
                ConnectorError::QuotaExhausted {
                    retry_after: pause,
                    detail: format!("the org's daily API allocation is used up ({what})"),
                }
            }
            // Names in queries come from the configuration and values are escaped, so a
            // refused query means a configured object or field does not exist (or is not
            // visible to the integration user): the operator has to fix it.
            (400, Some("MALFORMED_QUERY" | "INVALID_FIELD" | "INVALID_TYPE")) => {
                ConnectorError::Config(format!(
                    "Salesforce refused the query ({what}); check the configured object and field names and the integration user's field access"
                ))
            }
            _ => http::classify_status(status, headers, &what),
        }
    }

    /// The current session, logging in first if there is none.
    async fn session(&self) -> Result<Session, ConnectorError> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        // Holding the lock while logging in makes concurrent calls wait for one login.
        let (token, instance_url) = self.login().await?;
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let s = Session {
            token,
            instance_url,
            generation,
        };
        *guard = Some(s.clone());
        Ok(s)
    }

    async fn invalidate(&self, generation: u64) {
        let mut guard = self.session.lock().await;
        if guard.as_ref().is_some_and(|s| s.generation == generation) {
            *guard = None;
        }
    }

    async fn login(&self) -> Result<(Secret, String), ConnectorError> {
        let url = format!("{}/services/oauth2/token", self.login_url);
        let form: Vec<(&str, String)> = match &self.auth {
            Auth::ClientCredentials { client_id, secret } => vec![
                ("grant_type", "client_credentials".into()),
                ("client_id", client_id.clone()),
                ("client_secret", secret.expose().to_string()),
            ],
            Auth::Jwt {
                client_id,
                username,
                audience,
                key,
            } => {
                let claims = Claims {
                    iss: client_id,
                    sub: username,
                    aud: audience,
                    exp: chrono::Utc::now().timestamp() + JWT_LIFETIME_SECS,
                };
                let assertion = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key)
                    .map_err(|e| {
                        ConnectorError::Config(format!("cannot sign the JWT assertion: {e}"))
                    })?;
                vec![
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:jwt-bearer".into(),
                    ),
                    ("assertion", assertion),
                ]
            }
        };
        let resp = self
            .http
            .post(&url)
            .form(&form)
            .send()
            .await
            .map_err(http::transport_error)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.map_err(http::transport_error)?;
        if status.is_success() {
            let t: TokenResponse = serde_json::from_str(&text).map_err(|_| {
                ConnectorError::Transient(
                    "the token endpoint answered without access_token and instance_url".into(),
                )
            })?;
            let instance_url = t.instance_url.trim_end_matches('/').to_string();
            if !(instance_url.starts_with("https://") || instance_url.starts_with("http://")) {
                return Err(ConnectorError::Transient(format!(
                    "the token endpoint returned an unusable instance_url {:?}",
                    http::excerpt(&instance_url)
                )));
            }
            tracing::debug!(connector = %self.name, instance_url = %instance_url, "logged in");
            return Ok((Secret::new(t.access_token), instance_url));
        }
        if let Ok(e) = serde_json::from_str::<TokenError>(&text) {
            if status.is_client_error() {
                return Err(ConnectorError::Unauthorized(format!(
                    "the token endpoint refused the login: {}: {}",
                    http::excerpt(&e.error),
                    http::excerpt(&e.error_description)
                )));
            }
        }
        Err(http::classify_status(status, &headers, &text))
    }
}

/// Whether `used` has reached `share` of `limit`.
pub fn over_share(used: u64, limit: u64, share: f64) -> bool {
    limit > 0 && used as f64 >= share * limit as f64
}

/// `Sforce-Limit-Info: api-usage=18/5000` (other entries, like `api-bursts`, may follow).
pub fn parse_limit_info(headers: &HeaderMap) -> Option<(u64, u64)> {
    let v = headers.get("sforce-limit-info")?.to_str().ok()?;
    let usage = v
        .split([',', ';'])
        .map(str::trim)
        .find_map(|part| part.strip_prefix("api-usage="))?;
    let (used, limit) = usage.split_once('/')?;
    Some((used.trim().parse().ok()?, limit.trim().parse().ok()?))
}

/// Salesforce's error body: `[{"message": "…", "errorCode": "…"}]` (sometimes one object).
fn api_error(body: &str) -> (Option<String>, String) {
    let v: Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(_) => return (None, body.to_string()),
    };
    let first = match &v {
        Value::Array(items) => items.first().cloned().unwrap_or(Value::Null),
        other => other.clone(),
    };
    let code = first
        .get("errorCode")
        .and_then(Value::as_str)
        .map(str::to_string);
    let message = first
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or(body)
        .to_string();
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn reads_the_limit_header() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_limit_info(&h), None);
        h.insert(
            "Sforce-Limit-Info",
            HeaderValue::from_static("api-usage=10018/100000"),
        );
        assert_eq!(parse_limit_info(&h), Some((10018, 100000)));
        h.insert(
            "Sforce-Limit-Info",
            HeaderValue::from_static("api-bursts=1/750, api-usage=18/5000"),
        );
        assert_eq!(parse_limit_info(&h), Some((18, 5000)));
        h.insert(
            "Sforce-Limit-Info",
            HeaderValue::from_static("api-usage=x/5"),
        );
        assert_eq!(parse_limit_info(&h), None);
    }

    #[test]
    fn share_threshold() {
        assert!(!over_share(49_999, 100_000, 0.5));
        assert!(over_share(50_000, 100_000, 0.5));
        assert!(over_share(100_000, 100_000, 1.0));
        assert!(!over_share(99_999, 100_000, 1.0));
        assert!(!over_share(10, 0, 0.5), "no limit known yet");
    }

    #[test]
    fn reads_error_bodies() {
        let (code, msg) = api_error(
            r#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#,
        );
        assert_eq!(code.as_deref(), Some("INVALID_SESSION_ID"));
        assert_eq!(msg, "Session expired or invalid");
        assert_eq!(api_error("<html>oops").0, None);
    }
}
