//! Pre-flight checks of a HubSpot portal (`check-config --connect`, and the daemon at
//! start), and the words for a push HubSpot refuses because of the portal's properties.
//!
//! What is checked, read-only:
//! - the credentials, with one cheap read (`GET /crm/v3/objects/contacts?limit=1`), which
//!   also proves the read scope;
//! - the write scope (and the schema scope when `create_properties` must create something).
//!   An OAuth access token's scopes are read from `GET /oauth/v1/access-tokens/{token}`.
//!   HubSpot tells nothing of a private-app token's scopes, so they are inferred from a
//!   403's `MISSING_SCOPES` category: an empty batch update (and, for the schema scope, an
//!   empty property definition) is sent; HubSpot checks the scope first (403 naming it)
//!   and then refuses the empty request (400), so nothing is written either way;
//! - each consent property, and the marketing property when configured
//!   (`GET /crm/v3/properties/contacts/{name}`): that it exists, has the right type
//!   (enumeration, datetime, string) and, for an enumeration, both configured values
//!   among its options; a missing one passes when `create_properties`
//!   will create it.

use optout_core::{ConnectorError, Finding};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;

use crate::HubSpot;
use crate::config::Config;
use crate::limit::Kind;

const WRITE_SCOPE: &str = "crm.objects.contacts.write";
const SCHEMA_SCOPE: &str = "crm.schemas.contacts.write";

#[derive(Deserialize)]
struct PropertyInfo {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    options: Vec<OptionInfo>,
}

#[derive(Deserialize)]
struct OptionInfo {
    value: String,
}

/// The consent properties, and the marketing property when one is configured: (name,
/// HubSpot type, how to create it in the UI).
fn expected(cfg: &Config) -> Vec<(&str, &'static str, &'static str)> {
    let mut out = vec![
        (
            cfg.consent_property.as_str(),
            "enumeration",
            "a dropdown select",
        ),
        (
            cfg.changed_at_property.as_str(),
            "datetime",
            "a date picker with time",
        ),
        (cfg.source_property.as_str(), "string", "a single-line text"),
    ];
    out.extend(
        cfg.marketing()
            .map(|m| (m, "enumeration", "a dropdown select")),
    );
    out
}

/// How to fix a property HubSpot lacks or refuses a value for.
fn property_fix(cfg: &Config, name: &str, code: &str) -> String {
    if code == "INVALID_OPTION" {
        return format!(
            "give property {name} the options `{}` and `{}` (Settings → Properties → Contact), or set opted_out_value / opted_in_value to options it has",
            cfg.opted_out_value, cfg.opted_in_value
        );
    }
    let (_, kind, ui) = (expected(cfg).into_iter())
        .find(|(n, _, _)| *n == name)
        .unwrap_or((name, "string", "a single-line text"));
    let options = if kind == "enumeration" {
        format!(
            " with the options `{}` and `{}`",
            cfg.opted_out_value, cfg.opted_in_value
        )
    } else {
        String::new()
    };
    format!(
        "create contact property {name} as {ui} ({kind}){options} in Settings → Properties → Contact, or set create_properties = true and give the token the {SCHEMA_SCOPE} scope"
    )
}

/// A whole batch refused for the portal's properties, in words: each property, what is
/// wrong and the fix. The text of the configuration alarm.
pub(crate) fn refusal_text(cfg: &Config, refusals: &[(String, String, String)]) -> String {
    let parts: Vec<String> = (refusals.iter())
        .map(|(code, name, message)| {
            let what = if code == "PROPERTY_DOESNT_EXIST" {
                format!("contact property {name} does not exist ({code})")
            } else {
                format!("property {name} refused the value: {message} ({code})")
            };
            format!("{what}; fix: {}", property_fix(cfg, name, code))
        })
        .collect();
    format!(
        "HubSpot refused the whole batch update, not split: {}",
        parts.join("; ")
    )
}

impl HubSpot {
    /// Every check, in order; later checks are skipped when the credentials fail.
    pub(crate) async fn run_preflight(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        if !self.check_credentials(&mut out).await {
            return out;
        }
        let schema = self.check_scopes(&mut out).await;
        for (name, kind, _) in expected(&self.config) {
            out.extend(self.check_property(name, kind, schema).await);
        }
        out
    }

    /// One cheap read; false when nothing else can be checked.
    async fn check_credentials(&self, out: &mut Vec<Finding>) -> bool {
        let read = self.client.get("/crm/v3/objects/contacts?limit=1").await;
        let fix_token = if self.client.is_oauth() {
            "re-install the app in the portal and configure its new refresh token (oauth.refresh_token); check oauth.client_id and oauth.client_secret"
        } else {
            "create a new private-app token (Settings → Integrations → Private apps) and store it where `token` points"
        };
        let finding = match read.and_then(|r| r.success()) {
            Ok(_) => {
                out.push(Finding::pass(
                    "HubSpot accepts the credentials and contacts are readable",
                ));
                return true;
            }
            Err(ConnectorError::Unauthorized(m)) => {
                Finding::fail(format!("HubSpot refused the credentials: {m}"), fix_token)
            }
            Err(ConnectorError::Forbidden(m)) => Finding::fail(
                format!("the token cannot read contacts: {m}"),
                "give the app the crm.objects.contacts.read scope",
            ),
            Err(e) => Finding::fail(
                format!("HubSpot is not usable at {}: {e}", self.config.base_url),
                "check base_url, DNS, the proxy and the network",
            ),
        };
        out.push(finding);
        false
    }

    /// The write scope, and whether the schema scope is there (`None`: not checked).
    async fn check_scopes(&self, out: &mut Vec<Finding>) -> Option<bool> {
        match self.client.token_scopes().await {
            Ok(Some((scopes, _))) => {
                let has = |s: &str| scopes.iter().any(|x| x == s);
                out.push(scope_finding(has(WRITE_SCOPE), WRITE_SCOPE, "pushes"));
                return Some(has(SCHEMA_SCOPE));
            }
            Ok(None) => {}
            Err(e) => {
                out.push(Finding::unchecked(
                    "the OAuth token's scopes",
                    format!("cannot read them: {e}"),
                ));
                return None;
            }
        }
        let write = self.probe(
            "/crm/v3/objects/contacts/batch/update",
            json!({"inputs": []}),
        );
        match write.await {
            Some(granted) => out.push(scope_finding(granted, WRITE_SCOPE, "pushes")),
            None => out.push(Finding::unchecked(
                WRITE_SCOPE,
                "HubSpot did not answer clearly",
            )),
        }
        if !self.config.create_properties {
            return None;
        }
        self.probe("/crm/v3/properties/contacts", json!({})).await
    }

    /// Sends an empty write HubSpot refuses after checking the scope: `Some(false)` on a
    /// 403 (scope missing), `Some(true)` on the 400, `None` on anything else.
    async fn probe(&self, path: &str, body: serde_json::Value) -> Option<bool> {
        match self.client.post(Kind::Other, path, &body).await {
            Ok(r) if r.status == StatusCode::BAD_REQUEST || r.status.is_success() => Some(true),
            Err(ConnectorError::Forbidden(_)) => Some(false),
            _ => None,
        }
    }

    /// One property: exists, right type, options.
    async fn check_property(&self, name: &str, kind: &str, schema: Option<bool>) -> Vec<Finding> {
        let cfg = &self.config;
        let resp = match self
            .client
            .get(&format!("/crm/v3/properties/contacts/{name}"))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return vec![Finding::unchecked(
                    format!("contact property {name}"),
                    e.to_string(),
                )];
            }
        };
        if resp.status == StatusCode::NOT_FOUND {
            return vec![missing_property(cfg, name, schema)];
        }
        let info: PropertyInfo = match resp.success().and_then(|r| r.json()) {
            Ok(i) => i,
            Err(e) => {
                return vec![Finding::unchecked(
                    format!("contact property {name}"),
                    e.to_string(),
                )];
            }
        };
        if info.kind != kind {
            return vec![Finding::fail(
                format!(
                    "contact property {name} is of type {}, not {kind}",
                    info.kind
                ),
                format!(
                    "delete it and {}",
                    property_fix(cfg, name, "PROPERTY_DOESNT_EXIST")
                ),
            )];
        }
        if kind != "enumeration" {
            return vec![Finding::pass(format!("contact property {name} ({kind})"))];
        }
        let options: Vec<&str> = info.options.iter().map(|o| o.value.as_str()).collect();
        let missing: Vec<Finding> = [("opted_out_value", &cfg.opted_out_value), ("opted_in_value", &cfg.opted_in_value)]
            .into_iter()
            .filter(|(_, v)| !options.contains(&v.as_str()))
            .map(|(key, v)| {
                Finding::fail(
                    format!(
                        "property {name} has no option `{v}` ({key}); its options: {}",
                        options.join(", ")
                    ),
                    format!(
                        "add the option `{v}` to {name} (Settings → Properties → Contact), or set {key} to one of its options"
                    ),
                )
            })
            .collect();
        if missing.is_empty() {
            return vec![Finding::pass(format!(
                "contact property {name} (enumeration with `{}` and `{}`)",
                cfg.opted_out_value, cfg.opted_in_value
            ))];
        }
        missing
    }
}

fn scope_finding(granted: bool, scope: &str, needed_for: &str) -> Finding {
    if granted {
        Finding::pass(format!("the token has the {scope} scope"))
    } else {
        Finding::fail(
            format!("the token lacks the {scope} scope: {needed_for} would be refused (403)"),
            format!("add {scope} to the app's scopes and use the new token"),
        )
    }
}

fn missing_property(cfg: &Config, name: &str, schema: Option<bool>) -> Finding {
    let what = format!("contact property {name} does not exist");
    match (cfg.create_properties, schema) {
        (true, Some(true)) => Finding::pass(format!(
            "{what} yet; it will be created at start (create_properties = true)"
        )),
        (true, Some(false)) => Finding::fail(
            format!("{what} and the token lacks the {SCHEMA_SCOPE} scope to create it"),
            property_fix(cfg, name, "PROPERTY_DOESNT_EXIST"),
        ),
        (true, None) => Finding::unchecked(
            format!("{what}; create_properties will try to create it"),
            format!("whether the token has the {SCHEMA_SCOPE} scope is unknown"),
        ),
        (false, _) => Finding::fail(what, property_fix(cfg, name, "PROPERTY_DOESNT_EXIST")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_property_and_the_fix() {
        let cfg = Config::default();
        let text = refusal_text(
            &cfg,
            &[(
                "PROPERTY_DOESNT_EXIST".into(),
                "whatsapp_consent".into(),
                "Property \"whatsapp_consent\" does not exist".into(),
            )],
        );
        assert!(
            text.contains("contact property whatsapp_consent does not exist"),
            "{text}"
        );
        assert!(text.contains("create_properties = true"), "{text}");
        let text = refusal_text(
            &cfg,
            &[(
                "INVALID_OPTION".into(),
                "whatsapp_consent".into(),
                "\"opted_out\" was not one of the allowed options".into(),
            )],
        );
        assert!(
            text.contains("INVALID_OPTION") && text.contains("opted_out_value"),
            "{text}"
        );
    }
}
