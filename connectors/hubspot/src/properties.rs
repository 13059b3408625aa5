//! Creating the three consent properties, and the marketing property when one is configured
//! (`create_properties = true`), through
//! `POST /crm/v3/properties/contacts`, in the `contactinformation` group.
//!
//! HubSpot answers 409 for a property that exists already, which is the normal case on
//! every start after the first. Creating does not compare an existing property's type or
//! options with what it would create: the pre-flight (`preflight.rs`, `check-config
//! --connect` and at every start) does, and a push HubSpot refuses for a missing property or
//! option raises a configuration alarm.

use optout_core::ConnectorError;
use reqwest::StatusCode;
use serde_json::json;

use crate::HubSpot;
use crate::limit::Kind;

const PROPERTIES_PATH: &str = "/crm/v3/properties/contacts";

impl HubSpot {
    /// Creates the consent, change-time and source properties (and the marketing property,
    /// when configured) that do not exist yet.
    /// Returns one line per property saying what was done. Needs the
    /// `crm.schemas.contacts.write` scope (`Forbidden` names it otherwise).
    pub async fn ensure_properties(&self) -> Result<Vec<String>, ConnectorError> {
        let cfg = &self.config;
        let options = json!([
            { "label": "Opted out", "value": cfg.opted_out_value, "displayOrder": 0, "hidden": false },
            { "label": "Opted in", "value": cfg.opted_in_value, "displayOrder": 1, "hidden": false },
        ]);
        let mut definitions = vec![
            json!({
                "name": cfg.consent_property,
                "label": "WhatsApp consent",
                "description": "Set by optout-sync: whether this contact may be messaged on WhatsApp.",
                "groupName": "contactinformation",
                "type": "enumeration",
                "fieldType": "select",
                // HubSpot's `OptionInput` requires `hidden` (and `label`, `value`,
                // `displayOrder`) on every option.
                "options": options,
            }),
            json!({
                "name": cfg.changed_at_property,
                "label": "WhatsApp consent changed at",
                "description": "Set by optout-sync: when the customer last changed their WhatsApp consent.",
                "groupName": "contactinformation",
                "type": "datetime",
                "fieldType": "date",
            }),
            json!({
                "name": cfg.source_property,
                "label": "WhatsApp consent source",
                "description": "Set by optout-sync: where the WhatsApp consent change came from.",
                "groupName": "contactinformation",
                "type": "string",
                "fieldType": "text",
            }),
        ];
        definitions.extend(cfg.marketing().map(|name| {
            json!({
                "name": name,
                "label": "WhatsApp marketing consent",
                "description": "Set by optout-sync: whether this contact may be sent marketing messages on WhatsApp.",
                "groupName": "contactinformation",
                "type": "enumeration",
                "fieldType": "select",
                "options": options,
            })
        }));
        let mut report = Vec::new();
        for def in &definitions {
            let name = def["name"].as_str().unwrap_or_default();
            let resp = self.client.post(Kind::Other, PROPERTIES_PATH, def).await?;
            match resp.status {
                StatusCode::CONFLICT => report.push(format!("property {name} already exists")),
                s if s.is_success() => report.push(format!("created property {name}")),
                _ => return Err(resp.into_error()),
            }
        }
        Ok(report)
    }

    /// Runs [`HubSpot::ensure_properties`] once per process when configured. A token
    /// without the schema scope only logs a warning: an operator may have created the
    /// properties by hand.
    pub(crate) async fn prepare(&self) -> Result<(), ConnectorError> {
        if !self.config.create_properties {
            return Ok(());
        }
        self.prepared
            .get_or_try_init(|| async {
                match self.ensure_properties().await {
                    Ok(report) => {
                        for line in report {
                            tracing::info!(connector = %self.name, "{line}");
                        }
                        Ok(())
                    }
                    Err(ConnectorError::Forbidden(why)) => {
                        tracing::warn!(connector = %self.name, "cannot create the consent properties: {why}");
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            })
            .await
            .map(|_| ())
    }
}
