//! The connector's configuration: the TOML table the daemon hands over (minus its own keys),
//! its defaults, and the semantic checks `check-config` reports.
//!
//! ```toml
//! login_url = "https://example.my.salesforce.com"
//! auth = { flow = "client_credentials", client_id = "3MVG9…", client_secret = { env = "SF_SECRET" } }
//! messaging_end_user = true
//! [[objects]]
//! name = "Contact"
//! consent_field = "WhatsApp_Opt_Out__c"
//! marketing_field = "WhatsApp_Marketing_Opt_Out__c"   # optional: the marketing decision
//! ```

use std::time::Duration;

use optout_core::SecretRef;
use serde::Deserialize;

/// Where JWT-bearer logins go when no `login_url` is set.
pub const DEFAULT_JWT_LOGIN_URL: &str = "https://login.salesforce.com";
pub const DEFAULT_CONSENT_FIELD: &str = "WhatsApp_Opt_Out__c";
pub const DEFAULT_CHANGED_AT_FIELD: &str = "WhatsApp_Consent_Changed_At__c";
/// The marketing-consent checkbox's name in the README's examples (not a default: the field
/// is off unless an object names it).
pub const EXAMPLE_MARKETING_FIELD: &str = "WhatsApp_Marketing_Opt_Out__c";
/// sObject Collections take at most 200 records per request.
pub const MAX_BATCH: usize = 200;
/// The name of the standard object that carries messaging consent per address and channel.
pub const MESSAGING_END_USER: &str = "MessagingEndUser";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where tokens are requested: the org's My Domain URL (required for client credentials),
    /// `https://login.salesforce.com` by default for JWT bearer. Data calls go to the
    /// `instance_url` the token endpoint returns, so this is the only URL to override for a
    /// sandbox or a test server.
    #[serde(default, alias = "base_url")]
    pub login_url: Option<String>,
    #[serde(default = "default_api_version")]
    pub api_version: String,
    pub auth: AuthConfig,
    #[serde(default = "default_objects")]
    pub objects: Vec<ObjectConfig>,
    /// Also read and write `MessagingEndUser` rows with `MessageType = 'WhatsApp'`.
    #[serde(default)]
    pub messaging_end_user: bool,
    /// How far each new pass reaches back behind the newest `SystemModstamp` seen, so rows
    /// committed late with an older timestamp are still read.
    #[serde(default = "default_overlap", with = "humantime_serde")]
    pub overlap: Duration,
    /// Rows per query page (`Sforce-Query-Options: batchSize=`; Salesforce allows 200–2000).
    #[serde(default = "default_page_size")]
    pub page_size: usize,
    /// Records per sObject Collections request (at most 200).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Fraction of the org's daily API allocation this daemon may use. Once the org's usage
    /// (all clients together, as `Sforce-Limit-Info` reports it) reaches this share, the
    /// connector stops sending and reports `QuotaExhausted` so other integrations keep the rest.
    #[serde(default = "default_api_share")]
    pub api_share: f64,
    /// How long to stay quiet once the share is used up before probing again (the 24-hour
    /// window is rolling, so usage falls as old requests age out).
    #[serde(default = "default_quota_pause", with = "humantime_serde")]
    pub quota_pause: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// How the connector logs in (a tagged table: `auth = { flow = "…", … }`).
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "flow", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthConfig {
    /// OAuth 2.0 client credentials of an External Client App with a run-as user.
    ClientCredentials {
        client_id: String,
        client_secret: SecretRef,
    },
    /// OAuth 2.0 JWT bearer: an RS256 assertion signed with the key whose certificate is
    /// uploaded to the connected app.
    JwtBearer {
        client_id: String,
        username: String,
        /// PEM private key (PKCS#8 or PKCS#1).
        private_key: SecretRef,
        #[serde(default = "default_audience")]
        audience: String,
    },
}

/// One sObject whose records carry a consent field.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectConfig {
    /// The sObject API name (`Contact`, `Lead`, `Patient__c`).
    pub name: String,
    /// A checkbox: true = opted out, false = opted in.
    #[serde(default = "default_consent_field")]
    pub consent_field: String,
    /// A datetime field holding when consent last changed; `""` disables it.
    #[serde(default = "default_changed_at_field")]
    pub changed_at_field: Option<String>,
    /// A text field that receives where the deciding observation came from.
    #[serde(default)]
    pub source_field: Option<String>,
    /// A checkbox holding the `marketing` decision: true = opted out of marketing messages
    /// (set too when the customer opted out of every message). Unset or `""`: none.
    #[serde(default)]
    pub marketing_field: Option<String>,
    #[serde(default = "default_phone_fields")]
    pub phone_fields: Vec<String>,
}

impl ObjectConfig {
    /// An object with every default, named `name`.
    pub fn named(name: &str) -> Self {
        ObjectConfig {
            name: name.to_string(),
            consent_field: default_consent_field(),
            changed_at_field: default_changed_at_field(),
            source_field: None,
            marketing_field: None,
            phone_fields: default_phone_fields(),
        }
    }

    /// The change-time field, if one is configured (an empty name disables it).
    pub fn changed_at(&self) -> Option<&str> {
        self.changed_at_field.as_deref().filter(|f| !f.is_empty())
    }

    pub fn source(&self) -> Option<&str> {
        self.source_field.as_deref().filter(|f| !f.is_empty())
    }

    /// The marketing-consent checkbox, if one is configured (an empty name disables it).
    pub fn marketing(&self) -> Option<&str> {
        self.marketing_field.as_deref().filter(|f| !f.is_empty())
    }

    /// Semantic problems of the `index`th object, given the objects listed before it.
    fn problems(&self, index: usize, earlier: &[ObjectConfig]) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, problem: String| problems.push((key.to_string(), problem));
        let key = |k: &str| format!("objects[{index}].{k}");
        if !is_identifier(&self.name) {
            bad(
                &key("name"),
                format!("{:?} is not an sObject API name", self.name),
            );
        } else if self.name.eq_ignore_ascii_case(MESSAGING_END_USER) {
            bad(
                &key("name"),
                "MessagingEndUser is read with messaging_end_user = true, not as an object".into(),
            );
        } else if earlier
            .iter()
            .any(|p| p.name.eq_ignore_ascii_case(&self.name))
        {
            bad(&key("name"), format!("{} is listed twice", self.name));
        }
        let mut fields = vec![("consent_field", self.consent_field.as_str())];
        fields.extend(self.changed_at().map(|f| ("changed_at_field", f)));
        fields.extend(self.source().map(|f| ("source_field", f)));
        if let Some(m) = self.marketing() {
            let clash = (fields.iter().map(|(_, f)| *f))
                .chain(self.phone_fields.iter().map(String::as_str))
                .find(|f| f.eq_ignore_ascii_case(m));
            if clash.is_some() {
                bad(
                    &key("marketing_field"),
                    format!(
                        "{m:?} is also another field of this object: the marketing field must be a checkbox of its own"
                    ),
                );
            }
            fields.push(("marketing_field", m));
        }
        for (k, f) in fields {
            if !is_identifier(f) {
                bad(&key(k), format!("{f:?} is not a field API name"));
            }
        }
        if self.phone_fields.is_empty() {
            bad(&key("phone_fields"), "list at least one phone field".into());
        }
        for f in &self.phone_fields {
            if !is_identifier(f) {
                bad(
                    &key("phone_fields"),
                    format!("{f:?} is not a field API name"),
                );
            }
        }
        problems
    }
}

impl AuthConfig {
    /// Semantic problems of the login settings, keyed `auth.*`.
    fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, problem: String| problems.push((key.to_string(), problem));
        match self {
            AuthConfig::ClientCredentials { client_id, .. } => {
                if client_id.trim().is_empty() {
                    bad("auth.client_id", "must not be empty".into());
                }
            }
            AuthConfig::JwtBearer {
                client_id,
                username,
                audience,
                ..
            } => {
                if client_id.trim().is_empty() {
                    bad("auth.client_id", "must not be empty".into());
                }
                if username.trim().is_empty() {
                    bad("auth.username", "must not be empty".into());
                }
                if let Some(p) = url_problem(audience) {
                    bad("auth.audience", p);
                }
            }
        }

        problems
    }
}

fn default_api_version() -> String {
    "v62.0".into()
}
fn default_objects() -> Vec<ObjectConfig> {
    vec![ObjectConfig::named("Contact"), ObjectConfig::named("Lead")]
}
fn default_overlap() -> Duration {
    Duration::from_secs(300)
}
fn default_page_size() -> usize {
    2000
}
fn default_batch_size() -> usize {
    MAX_BATCH
}
fn default_api_share() -> f64 {
    0.5
}
fn default_quota_pause() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_audience() -> String {
    DEFAULT_JWT_LOGIN_URL.into()
}
fn default_consent_field() -> String {
    DEFAULT_CONSENT_FIELD.into()
}
fn default_changed_at_field() -> Option<String> {
    Some(DEFAULT_CHANGED_AT_FIELD.into())
}
fn default_phone_fields() -> Vec<String> {
    vec!["MobilePhone".into(), "Phone".into()]
}

impl Config {
    /// A configuration with every default and the given login.
    pub fn new(login_url: Option<String>, auth: AuthConfig) -> Self {
        Config {
            login_url,
            api_version: default_api_version(),
            auth,
            objects: default_objects(),
            messaging_end_user: false,
            overlap: default_overlap(),
            page_size: default_page_size(),
            batch_size: default_batch_size(),
            api_share: default_api_share(),
            quota_pause: default_quota_pause(),
            timeout: default_timeout(),
        }
    }

    /// The URL tokens are requested from, without a trailing slash.
    pub fn effective_login_url(&self) -> String {
        let url = match (&self.login_url, &self.auth) {
            (Some(u), _) => u.as_str(),
            (None, AuthConfig::JwtBearer { .. }) => DEFAULT_JWT_LOGIN_URL,
            // validate() reports this; an empty URL fails at the first request.
            (None, AuthConfig::ClientCredentials { .. }) => "",
        };
        url.trim_end_matches('/').to_string()
    }

    /// Semantic problems as (key, problem) pairs; empty when the configuration is usable.
    /// Secrets are not read here.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = self.login_problems();
        problems.extend(self.auth.problems());
        problems.extend(self.object_problems());
        problems.extend(self.limit_problems());
        problems
    }

    /// Where and with which API version the connector logs in.
    fn login_problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, problem: String| problems.push((key.to_string(), problem));
        match (&self.login_url, &self.auth) {
            (None, AuthConfig::ClientCredentials { .. }) => bad(
                "login_url",
                "the client credentials flow needs the org's My Domain URL (https://<domain>.my.salesforce.com)".into(),
            ),
            (Some(url), auth) => {
                if let Some(p) = url_problem(url) {
                    bad("login_url", p);
                } else if matches!(auth, AuthConfig::ClientCredentials { .. })
                    && ["://login.salesforce.com", "://test.salesforce.com"]
                        .iter()
                        .any(|h| url.trim_end_matches('/').ends_with(h))
                {
                    bad(
                        "login_url",
                        "the client credentials flow works only on the org's My Domain URL, not login/test.salesforce.com".into(),
                    );
                }
            }
            (None, AuthConfig::JwtBearer { .. }) => {}
        }
        if !is_api_version(&self.api_version) {
            bad(
                "api_version",
                format!("{:?} is not like v62.0", self.api_version),
            );
        }
        problems
    }

    /// The objects to read and write.
    fn object_problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, problem: String| problems.push((key.to_string(), problem));
        if self.objects.is_empty() && !self.messaging_end_user {
            bad(
                "objects",
                "no object to read: list at least one or enable messaging_end_user".into(),
            );
        }
        for (i, o) in self.objects.iter().enumerate() {
            problems.extend(o.problems(i, &self.objects[..i]));
        }
        problems
    }

    /// Page and batch sizes, the API share, and the timings.
    fn limit_problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, problem: String| problems.push((key.to_string(), problem));
        if !(200..=2000).contains(&self.page_size) {
            bad(
                "page_size",
                format!("{} is outside Salesforce's 200–2000", self.page_size),
            );
        }
        if !(1..=MAX_BATCH).contains(&self.batch_size) {
            bad(
                "batch_size",
                format!("{} is outside 1–{MAX_BATCH}", self.batch_size),
            );
        }
        if !(self.api_share > 0.0 && self.api_share <= 1.0) {
            bad(
                "api_share",
                format!("{} is not a fraction in (0, 1]", self.api_share),
            );
        }
        if self.overlap > Duration::from_secs(24 * 3600) {
            bad(
                "overlap",
                "more than a day re-reads far too much on every pass".into(),
            );
        }
        if self.timeout.is_zero() {
            bad("timeout", "must be more than zero".into());
        }
        if self.quota_pause.is_zero() {
            bad("quota_pause", "must be more than zero".into());
        }
        problems
    }

    /// Every secret the configuration refers to, as (key, reference).
    pub fn secrets(&self) -> Vec<(&'static str, &SecretRef)> {
        match &self.auth {
            AuthConfig::ClientCredentials { client_secret, .. } => {
                vec![("auth.client_secret", client_secret)]
            }
            AuthConfig::JwtBearer { private_key, .. } => vec![("auth.private_key", private_key)],
        }
    }
}

/// An sObject or field API name: a letter, then letters, digits and underscores (custom names
/// end in `__c`). Names go into SOQL unquoted, so anything else is refused rather than escaped.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 80
}

fn is_api_version(v: &str) -> bool {
    let Some(rest) = v.strip_prefix('v') else {
        return false;
    };
    let mut parts = rest.splitn(2, '.');
    let major = parts.next().unwrap_or("");
    let minor = parts.next().unwrap_or("");
    !major.is_empty()
        && major.bytes().all(|b| b.is_ascii_digit())
        && !minor.is_empty()
        && minor.bytes().all(|b| b.is_ascii_digit())
}

/// HTTPS is required except on loopback, where tests and local fakes run.
fn url_problem(url: &str) -> Option<String> {
    let rest = if let Some(r) = url.strip_prefix("https://") {
        r
    } else if let Some(r) = url.strip_prefix("http://") {
        let authority = r.split('/').next().unwrap_or("");
        let loopback = ["127.0.0.1", "localhost", "[::1]"]
            .iter()
            .any(|h| authority == *h || authority.starts_with(&format!("{h}:")));
        if !loopback {
            return Some(format!(
                "{url:?} must use https (plain http only on loopback)"
            ));
        }
        r
    } else {
        return Some(format!("{url:?} is not an http(s) URL"));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Some(format!("{url:?} has no host"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(s)
    }

    #[test]
    fn defaults_fill_everything_optional() {
        let c = parse(
            r#"
            login_url = "https://acme.my.salesforce.com"
            auth = { flow = "client_credentials", client_id = "cid", client_secret = { env = "SF_SECRET" } }
            "#,
        )
        .unwrap();
        assert_eq!(c.api_version, "v62.0");
        assert_eq!(c.objects.len(), 2);
        assert_eq!(c.objects[1].name, "Lead");
        assert_eq!(c.objects[0].consent_field, "WhatsApp_Opt_Out__c");
        assert_eq!(
            c.objects[0].changed_at(),
            Some("WhatsApp_Consent_Changed_At__c")
        );
        assert_eq!(c.objects[0].phone_fields, ["MobilePhone", "Phone"]);
        assert_eq!(c.overlap, Duration::from_secs(300));
        assert_eq!((c.page_size, c.batch_size, c.api_share), (2000, 200, 0.5));
        assert_eq!(c.timeout, Duration::from_secs(60));
        assert!(!c.messaging_end_user);
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert_eq!(c.secrets()[0].0, "auth.client_secret");
    }

    #[test]
    fn jwt_flow_with_objects_and_disabled_change_time() {
        let c = parse(
            r#"
            api_version = "v61.0"
            overlap = "2m"
            messaging_end_user = true
            auth = { flow = "jwt_bearer", client_id = "cid", username = "int@acme.com", private_key = { file = "/etc/k.pem" } }
            [[objects]]
            name = "Contact"
            changed_at_field = ""
            source_field = "WhatsApp_Consent_Source__c"
            "#,
        )
        .unwrap();
        assert_eq!(c.effective_login_url(), "https://login.salesforce.com");
        let AuthConfig::JwtBearer { audience, .. } = &c.auth else {
            panic!("jwt expected")
        };
        assert_eq!(audience, "https://login.salesforce.com");
        assert_eq!(c.objects.len(), 1);
        assert_eq!(c.objects[0].changed_at(), None);
        assert_eq!(c.objects[0].source(), Some("WhatsApp_Consent_Source__c"));
        assert_eq!(c.overlap, Duration::from_secs(120));
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert_eq!(c.secrets()[0].0, "auth.private_key");
    }

    #[test]
    fn marketing_field_is_optional_per_object_and_checked() {
        let c = parse(
            r#"
            login_url = "https://acme.my.salesforce.com"
            auth = { flow = "client_credentials", client_id = "c", client_secret = { env = "S" } }
            [[objects]]
            name = "Contact"
            marketing_field = "WhatsApp_Marketing_Opt_Out__c"
            [[objects]]
            name = "Lead"
            marketing_field = ""
            "#,
        )
        .unwrap();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert_eq!(c.objects[0].marketing(), Some(EXAMPLE_MARKETING_FIELD));
        assert_eq!(c.objects[1].marketing(), None);
        assert_eq!(ObjectConfig::named("Contact").marketing(), None);
        for bad in ["whatsapp_opt_out__c", "Phone", "Bad Name"] {
            let mut c = c.clone();
            c.objects[0].marketing_field = Some(bad.into());
            let keys: Vec<String> = c.validate().into_iter().map(|(k, _)| k).collect();
            assert_eq!(keys, ["objects[0].marketing_field"], "{bad:?}");
        }
    }

    #[test]
    fn unknown_keys_and_inline_secrets_are_refused() {
        let unknown = parse(
            r#"
            login_url = "https://acme.my.salesforce.com"
            auth = { flow = "client_credentials", client_id = "c", client_secret = { env = "S" } }
            page_sise = 500
            "#,
        );
        assert!(unknown.unwrap_err().to_string().contains("page_sise"));
        let inline = parse(
            r#"
            login_url = "https://acme.my.salesforce.com"
            auth = { flow = "client_credentials", client_id = "c", client_secret = "hunter2" }
            "#,
        );
        let msg = inline.unwrap_err().to_string();
        assert!(msg.contains("must not be written"), "{msg}");
    }

    #[test]
    fn validate_names_every_problem() {
        let mut c = Config::new(
            Some("https://login.salesforce.com".into()),
            AuthConfig::ClientCredentials {
                client_id: "c".into(),
                client_secret: SecretRef::Env("S".into()),
            },
        );
        c.api_version = "62".into();
        c.page_size = 100;
        c.batch_size = 201;
        c.api_share = 1.5;
        c.objects.push(ObjectConfig::named("contact"));
        c.objects[0].consent_field = "Opt_Out__c' OR Id != '".into();
        c.objects.push(ObjectConfig::named("MessagingEndUser"));
        let keys: Vec<String> = c.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "login_url",
                "api_version",
                "objects[0].consent_field",
                "objects[2].name",
                "objects[3].name",
                "page_size",
                "batch_size",
                "api_share",
            ]
        );
        c.login_url = Some("http://10.0.0.1".into());
        assert!(c.validate()[0].1.contains("https"));
        c.login_url = Some("http://127.0.0.1:4000".into());
        assert_ne!(c.validate()[0].0, "login_url");
    }
}
