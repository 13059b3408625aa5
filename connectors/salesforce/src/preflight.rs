//! Pre-flight checks of a Salesforce org (`check-config --connect`, and the daemon at
//! start), read-only:
//! - the login (client credentials or JWT bearer) and one data call (`/limits`), which
//!   also proves the user is API Enabled;
//! - the session's lifetime cannot be known: Salesforce states no expiry for these tokens
//!   (the org's session timeout applies), so that is reported as unchecked;
//! - every configured object through `GET /services/data/vXX.X/sobjects/{Object}/describe`:
//!   the object is visible, the fields written (consent, change time, source, marketing) exist and
//!   are `updateable` by the user, the phone fields exist; with `messaging_end_user`, the
//!   same for `MessagingEndUser` (`MessagingConsentStatus` editable, `MessagingPlatformKey`
//!   and `MessageType` readable).

use std::collections::HashMap;

use optout_core::{ConnectorError, Finding};
use reqwest::Method;
use serde::Deserialize;

use crate::SalesforceConnector;
use crate::config::AuthConfig;
use crate::records::Source;

#[derive(Deserialize)]
struct Describe {
    #[serde(default)]
    fields: Vec<DescribedField>,
}

#[derive(Deserialize)]
struct DescribedField {
    name: String,
    #[serde(default)]
    updateable: bool,
}

impl SalesforceConnector {
    /// Every check, in order; the objects are skipped when the login fails.
    pub(crate) async fn run_preflight(&self) -> Vec<Finding> {
        let path = format!("/services/data/{}/limits", self.config.api_version);
        let login = self.client.call(Method::GET, &path, &[], &[], None).await;
        if let Err(e) = login {
            return vec![self.login_failure(e.error)];
        }
        let mut out = vec![
            Finding::pass(format!(
                "logged in to Salesforce ({}) and the API answers",
                self.flow()
            )),
            Finding::unchecked(
                "whether the session expires soon",
                "Salesforce states no expiry for this token (the org's session timeout applies); the connector logs in again when a session ends",
            ),
        ];
        for source in &self.sources {
            out.extend(self.check_object(source).await);
        }
        out
    }

    fn flow(&self) -> &'static str {
        match self.config.auth {
            AuthConfig::ClientCredentials { .. } => "client credentials",
            AuthConfig::JwtBearer { .. } => "JWT bearer",
        }
    }

    fn login_failure(&self, e: ConnectorError) -> Finding {
        let fix = match (&e, &self.config.auth) {
            (ConnectorError::Unauthorized(_), AuthConfig::ClientCredentials { .. }) => {
                "check auth.client_id and auth.client_secret, that the app has the client credentials flow enabled with a Run As user, and that login_url is your My Domain URL"
            }
            (ConnectorError::Unauthorized(_), AuthConfig::JwtBearer { .. }) => {
                "check that the certificate uploaded to the connected app matches auth.private_key, that the app is pre-authorized for auth.username, and auth.audience (login or test)"
            }
            (ConnectorError::Forbidden(_), _) => {
                "give the integration user the API Enabled permission"
            }
            _ => "check login_url, DNS, the proxy and the network",
        };
        Finding::fail(format!("Salesforce login or API call failed: {e}"), fix)
    }

    /// One object: visible, and each field it needs present and (when written) editable.
    async fn check_object(&self, source: &Source) -> Vec<Finding> {
        let object = source.name();
        let path = format!(
            "/services/data/{}/sobjects/{object}/describe",
            self.config.api_version
        );
        let fields = match self.client.call(Method::GET, &path, &[], &[], None).await {
            Ok(v) => match serde_json::from_value::<Describe>(v) {
                Ok(d) => d.fields,
                Err(e) => {
                    return vec![Finding::unchecked(
                        format!("fields of {object}"),
                        format!("unexpected describe answer: {e}"),
                    )];
                }
            },
            Err(e) if e.code.as_deref() == Some("NOT_FOUND") => {
                return vec![Finding::fail(
                    format!("object {object} does not exist or the integration user cannot see it"),
                    format!(
                        "check the object's API name, and give the integration user Read on {object}"
                    ),
                )];
            }
            Err(e) => {
                return vec![Finding::unchecked(
                    format!("fields of {object}"),
                    e.error.to_string(),
                )];
            }
        };
        let by_name: HashMap<String, bool> = (fields.into_iter())
            .map(|f| (f.name.to_ascii_lowercase(), f.updateable))
            .collect();
        let problems: Vec<Finding> = (needed_fields(source).into_iter())
            .filter_map(|(field, written)| field_problem(object, field, written, &by_name))
            .collect();
        if problems.is_empty() {
            return vec![Finding::pass(format!(
                "{object}: every configured field exists and the written ones are editable"
            ))];
        }
        problems
    }
}

/// The fields an object needs: (name, whether the connector writes it).
fn needed_fields(source: &Source) -> Vec<(&str, bool)> {
    match source {
        Source::Object(o) => {
            let mut v = vec![(o.consent_field.as_str(), true)];
            v.extend(o.changed_at().map(|f| (f, true)));
            v.extend(o.source().map(|f| (f, true)));
            v.extend(o.marketing().map(|f| (f, true)));
            v.extend(o.phone_fields.iter().map(|f| (f.as_str(), false)));
            v
        }
        Source::MessagingEndUser => vec![
            ("MessagingConsentStatus", true),
            ("MessagingPlatformKey", false),
            ("MessageType", false),
        ],
    }
}

fn field_problem(
    object: &str,
    field: &str,
    written: bool,
    by_name: &HashMap<String, bool>,
) -> Option<Finding> {
    match by_name.get(&field.to_ascii_lowercase()) {
        None => Some(Finding::fail(
            format!(
                "field {field} does not exist on {object} (or the integration user cannot read it)"
            ),
            format!(
                "create {field} on {object} (Setup → Object Manager → {object} → Fields & Relationships) and give the integration user access to it, or correct the object's fields in the configuration"
            ),
        )),
        Some(false) if written => Some(Finding::fail(
            format!(
                "field {object}.{field} is not editable by the integration user: pushes would be refused"
            ),
            format!("give the integration user Edit on {object}.{field} (field-level security)"),
        )),
        Some(_) => None,
    }
}
