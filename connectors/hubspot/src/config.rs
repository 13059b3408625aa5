//! Configuration of one HubSpot connector instance (one portal).
//!
//! The daemon removes its own keys (`kind`, schedules) from the connector's TOML table and
//! deserialises the rest into [`Config`]. Everything but the credentials has a default, so
//! the smallest configuration is `token = { env = "HUBSPOT_TOKEN" }`.
//!
//! ```toml
//! token = { env = "HUBSPOT_TOKEN" }      # or an [oauth] table
//! requests_per_10s = 190                 # Professional / Enterprise portals
//! create_properties = true
//! marketing_property = "whatsapp_marketing_consent"   # optional: the marketing decision
//! ```

use std::time::Duration;

use optout_core::SecretRef;
use serde::Deserialize;

pub const DEFAULT_BASE_URL: &str = "https://api.hubapi.com";
/// HubSpot's largest search page.
pub const MAX_PAGE_SIZE: usize = 200;
/// HubSpot's largest batch for every batch endpoint.
pub const MAX_BATCH_SIZE: usize = 100;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// API root; overridden for sandboxes, proxies and tests.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Private-app token. Exactly one of `token` and `oauth` is set.
    #[serde(default)]
    pub token: Option<SecretRef>,
    /// OAuth app credentials; the connector refreshes access tokens itself.
    #[serde(default)]
    pub oauth: Option<OAuthConfig>,

    /// Enumeration property holding the consent value.
    #[serde(default = "default_consent_property")]
    pub consent_property: String,
    /// Datetime property the daemon writes (and reads back) as the time of the change.
    #[serde(default = "default_changed_at_property")]
    pub changed_at_property: String,
    /// Text property saying where the deciding observation came from.
    #[serde(default = "default_source_property")]
    pub source_property: String,
    /// Enumeration property holding the `marketing` decision (same options as the consent
    /// property): opted out when the customer stopped marketing or every message. Unset:
    /// no marketing field is read or written.
    #[serde(default)]
    pub marketing_property: Option<String>,
    #[serde(default = "default_opted_out_value")]
    pub opted_out_value: String,
    #[serde(default = "default_opted_in_value")]
    pub opted_in_value: String,
    /// Phone properties read as identities (free text, any format).
    #[serde(default = "default_phone_properties")]
    pub phone_properties: Vec<String>,

    /// How far back each incremental pass re-reads: HubSpot's search index shows a write
    /// only after a delay, so a pass that starts exactly where the last one ended would miss
    /// records written just before it but indexed just after.
    #[serde(default = "default_overlap", with = "humantime_serde")]
    pub overlap: Duration,
    /// Contacts per search request (HubSpot's maximum is 200).
    #[serde(default = "default_page_size")]
    pub page_size: usize,
    /// Contacts per batch update (HubSpot's maximum is 100).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,

    /// Requests per rolling 10 seconds, all endpoints: 100 on Free/Starter, 190 on
    /// Professional/Enterprise, 250 with the capacity pack.
    #[serde(default = "default_requests_per_10s")]
    pub requests_per_10s: u32,
    /// Search requests per second (HubSpot allows 5 per portal; 4 leaves room for others).
    #[serde(default = "default_search_per_second")]
    pub search_per_second: u32,
    /// Requests per UTC day this instance may use, when the portal's daily allowance is
    /// shared with other integrations. Unset: no client-side daily cap.
    #[serde(default)]
    pub daily_limit: Option<u64>,

    /// Create the three consent properties (and `marketing_property`, when set) on first
    /// start when they are missing (needs the `crm.schemas.contacts.write` scope).
    #[serde(default)]
    pub create_properties: bool,
    /// Timeout of one HTTP request.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    pub client_id: String,
    pub client_secret: SecretRef,
    pub refresh_token: SecretRef,
}

fn default_base_url() -> String {
    DEFAULT_BASE_URL.to_string()
}
fn default_consent_property() -> String {
    "whatsapp_consent".to_string()
}
fn default_changed_at_property() -> String {
    "whatsapp_consent_changed_at".to_string()
}
fn default_source_property() -> String {
    "whatsapp_consent_source".to_string()
}
fn default_opted_out_value() -> String {
    "opted_out".to_string()
}
fn default_opted_in_value() -> String {
    "opted_in".to_string()
}
fn default_phone_properties() -> Vec<String> {
    ["phone", "mobilephone", "hs_whatsapp_phone_number"]
        .map(String::from)
        .to_vec()
}
fn default_overlap() -> Duration {
    Duration::from_secs(120)
}
fn default_page_size() -> usize {
    MAX_PAGE_SIZE
}
fn default_batch_size() -> usize {
    MAX_BATCH_SIZE
}
fn default_requests_per_10s() -> u32 {
    100
}
fn default_search_per_second() -> u32 {
    4
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for Config {
    /// Every default, and no credentials (set `token` or `oauth`).
    fn default() -> Self {
        Config {
            base_url: default_base_url(),
            token: None,
            oauth: None,
            consent_property: default_consent_property(),
            changed_at_property: default_changed_at_property(),
            source_property: default_source_property(),
            marketing_property: None,
            opted_out_value: default_opted_out_value(),
            opted_in_value: default_opted_in_value(),
            phone_properties: default_phone_properties(),
            overlap: default_overlap(),
            page_size: default_page_size(),
            batch_size: default_batch_size(),
            requests_per_10s: default_requests_per_10s(),
            search_per_second: default_search_per_second(),
            daily_limit: None,
            create_properties: false,
            timeout: default_timeout(),
        }
    }
}

impl Config {
    /// Semantic problems as (key, problem) pairs; empty when the configuration is usable.
    /// Secrets are not read here (see [`Config::secrets`]).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = self.access_problems();
        problems.extend(self.property_problems());
        problems.extend(self.limit_problems());
        problems
    }

    /// Where the API is and how the connector authenticates.
    fn access_problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut bad =
            |key: &str, problem: &str| problems.push((key.to_string(), problem.to_string()));
        match reqwest::Url::parse(&self.base_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => bad(
                "base_url",
                "must be an http(s) URL such as https://api.hubapi.com",
            ),
        }
        match (&self.token, &self.oauth) {
            (Some(_), Some(_)) => bad(
                "token",
                "set either token (private app) or [oauth], not both",
            ),
            (None, None) => bad("token", "set token (private app) or an [oauth] table"),
            _ => {}
        }
        if let Some(o) = &self.oauth
            && o.client_id.trim().is_empty()
        {
            bad("oauth.client_id", "must not be empty");
        }
        problems
    }

    /// The contact properties read and written, and the values written.
    fn property_problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut bad =
            |key: &str, problem: &str| problems.push((key.to_string(), problem.to_string()));
        let names = [
            ("consent_property", &self.consent_property),
            ("changed_at_property", &self.changed_at_property),
            ("source_property", &self.source_property),
        ];
        for (key, name) in names {
            if name.trim().is_empty() {
                bad(key, "must name a contact property");
            } else if self.phone_properties.contains(name) {
                bad(key, "must not also be one of phone_properties");
            }
        }
        if names[0].1 == names[1].1 || names[0].1 == names[2].1 || names[1].1 == names[2].1 {
            bad(
                "consent_property",
                "the consent, change-time and source properties must be three different properties",
            );
        }
        if let Some(m) = &self.marketing_property {
            if m.trim().is_empty() {
                bad(
                    "marketing_property",
                    "must name a contact property, or be left out for none",
                );
            } else if self.phone_properties.contains(m) {
                bad(
                    "marketing_property",
                    "must not also be one of phone_properties",
                );
            } else if names.iter().any(|(_, n)| *n == m) {
                bad(
                    "marketing_property",
                    "must differ from the consent, change-time and source properties",
                );
            }
        }
        for (key, value) in [
            ("opted_out_value", &self.opted_out_value),
            ("opted_in_value", &self.opted_in_value),
        ] {
            if value.trim().is_empty() {
                bad(key, "must not be empty");
            }
        }
        if self.opted_out_value == self.opted_in_value {
            bad("opted_in_value", "must differ from opted_out_value");
        }
        if self.phone_properties.is_empty() {
            bad("phone_properties", "list at least one phone property");
        }
        if self.phone_properties.iter().any(|p| p.trim().is_empty()) {
            bad("phone_properties", "must not contain an empty name");
        }
        problems
    }

    /// Page and batch sizes, rate limits and the timeout.
    fn limit_problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut bad =
            |key: &str, problem: &str| problems.push((key.to_string(), problem.to_string()));
        if !(1..=MAX_PAGE_SIZE).contains(&self.page_size) {
            bad(
                "page_size",
                "must be between 1 and 200 (HubSpot's search maximum)",
            );
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            bad(
                "batch_size",
                "must be between 1 and 100 (HubSpot's batch maximum)",
            );
        }
        if self.requests_per_10s == 0 {
            bad("requests_per_10s", "must be at least 1");
        }
        if self.search_per_second == 0 {
            bad("search_per_second", "must be at least 1");
        }
        if self.daily_limit == Some(0) {
            bad(
                "daily_limit",
                "must be at least 1, or left out for no client-side cap",
            );
        }
        if self.timeout.is_zero() {
            bad("timeout", "must be longer than zero");
        }
        problems
    }

    /// The secret references, by configuration key, for `check-config` to resolve.
    pub fn secrets(&self) -> Vec<(&'static str, &SecretRef)> {
        let mut out = Vec::new();
        if let Some(t) = &self.token {
            out.push(("token", t));
        }
        if let Some(o) = &self.oauth {
            out.push(("oauth.client_secret", &o.client_secret));
            out.push(("oauth.refresh_token", &o.refresh_token));
        }
        out
    }

    /// The marketing-consent property, when one is configured.
    pub fn marketing(&self) -> Option<&str> {
        self.marketing_property.as_deref()
    }

    /// The properties every search asks for: phones, the three consent properties, and the
    /// two the cursor needs.
    pub(crate) fn search_properties(&self) -> Vec<String> {
        let mut props = self.phone_properties.clone();
        props.extend([
            self.consent_property.clone(),
            self.changed_at_property.clone(),
            self.source_property.clone(),
            "lastmodifieddate".to_string(),
            "hs_object_id".to_string(),
        ]);
        props.extend(self.marketing().map(String::from));
        let mut seen = std::collections::HashSet::new();
        props.retain(|p| seen.insert(p.clone()));
        props
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_from_a_minimal_table() {
        let c: Config = toml::from_str(r#"token = { env = "HUBSPOT_TOKEN" }"#).unwrap();
        assert_eq!(c.base_url, "https://api.hubapi.com");
        assert_eq!(c.consent_property, "whatsapp_consent");
        assert_eq!(
            c.phone_properties,
            ["phone", "mobilephone", "hs_whatsapp_phone_number"]
        );
        assert_eq!(c.overlap, Duration::from_secs(120));
        assert_eq!((c.page_size, c.batch_size), (200, 100));
        assert_eq!(
            (c.requests_per_10s, c.search_per_second, c.daily_limit),
            (100, 4, None)
        );
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert!(!c.create_properties);
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert_eq!(
            c.secrets(),
            vec![("token", &SecretRef::Env("HUBSPOT_TOKEN".into()))]
        );
    }

    #[test]
    fn marketing_property_is_optional_and_checked() {
        let c: Config = toml::from_str(
            "token = { env = \"T\" }\nmarketing_property = \"whatsapp_marketing_consent\"",
        )
        .unwrap();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert!(
            c.search_properties()
                .contains(&"whatsapp_marketing_consent".to_string())
        );
        assert!(
            !Config::default()
                .search_properties()
                .iter()
                .any(|p| p.contains("marketing"))
        );
        for bad in ["", "whatsapp_consent_source", "mobilephone"] {
            let c = Config {
                marketing_property: Some(bad.into()),
                token: c.token.clone(),
                ..Config::default()
            };
            let keys: Vec<String> = c.validate().into_iter().map(|(k, _)| k).collect();
            assert_eq!(keys, ["marketing_property"], "{bad:?}");
        }
    }

    #[test]
    fn oauth_table_and_humantime_durations() {
        let c: Config = toml::from_str(
            r#"
            overlap = "5m"
            timeout = "10s"
            daily_limit = 200000
            [oauth]
            client_id = "abc"
            client_secret = { file = "/etc/optout-sync/hs-secret" }
            refresh_token = { credential = "hs-refresh" }
            "#,
        )
        .unwrap();
        assert_eq!(c.overlap, Duration::from_secs(300));
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert!(c.validate().is_empty());
        let keys: Vec<_> = c.secrets().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["oauth.client_secret", "oauth.refresh_token"]);
    }

    #[test]
    fn refuses_unknown_keys_and_inline_secrets() {
        assert!(toml::from_str::<Config>("tokn = { env = \"X\" }").is_err());
        assert!(toml::from_str::<Config>("token = \"pat-na1-inline\"").is_err());
        let nested = "[oauth]\nclient_id = \"a\"\nclient_secret = { env = \"S\" }\nrefresh_token = { env = \"R\" }\nscope = \"x\"";
        assert!(toml::from_str::<Config>(nested).is_err());
    }

    #[test]
    fn validate_names_each_problem() {
        let c = Config {
            base_url: "ftp://x".into(),
            page_size: 500,
            batch_size: 0,
            opted_in_value: "opted_out".into(),
            source_property: "whatsapp_consent".into(),
            marketing_property: Some("phone".into()),
            daily_limit: Some(0),
            ..Config::default()
        };
        let keys: Vec<String> = c.validate().into_iter().map(|(k, _)| k).collect();
        for k in [
            "base_url",
            "token",
            "page_size",
            "batch_size",
            "opted_in_value",
            "consent_property",
            "daily_limit",
            "marketing_property",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
    }
}
