//! The event JSON receivers get: a public contract, documented in the crate's README.
//! Changing a field here is a breaking change for every receiver.

use optout_core::{Identity, PushItem, Timestamp};
use serde::{Deserialize, Serialize};

/// The `type` of every event this connector sends.
pub const EVENT_TYPE: &str = "consent.changed";

/// One consent change, as sent. `Deserialize` is there for receivers written in Rust
/// (and the fake receiver).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: String,
    /// Stable for one item across retries, so receivers can drop duplicates.
    pub id: String,
    pub subject: String,
    /// `all` or `marketing`.
    pub scope: String,
    /// `opted_out` or `opted_in`.
    pub status: String,
    /// When the person acted (RFC 3339, milliseconds, UTC).
    pub changed_at: String,
    /// Where the deciding observation came from (`whatsapp:keyword`, `hubspot:crm_field`).
    pub source: String,
    pub identities: Identities,
    /// When this delivery attempt was made; differs between retries of one event.
    pub sent_at: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identities {
    /// E.164 phone numbers.
    pub phones: Vec<String>,
    pub wa_ids: Vec<String>,
    /// WhatsApp business-scoped user ids.
    pub bsuids: Vec<String>,
}

/// The event id of an item: the same decision (subject, scope, status and event time)
/// under the same identities always gets the same id, so receivers can drop retries; a
/// later decision, or the same decision re-announced because the person gained an identity
/// (a BSUID linked to a number), gets a different one.
pub fn event_id(item: &PushItem) -> String {
    use sha2::{Digest, Sha256};
    let mut names: Vec<String> = item.identities.iter().map(|i| format!("{i:?}")).collect();
    names.sort();
    names.dedup();
    let digest = Sha256::digest(names.join("\n"));
    let tag = hex::encode(&digest[..4]);
    format!(
        "{}:{}:{}:{}:{tag}",
        item.subject,
        item.scope,
        item.status,
        item.changed_at.millis()
    )
}

impl Event {
    pub fn from_item(item: &PushItem, sent_at: Timestamp) -> Event {
        let mut ids = Identities::default();
        for identity in &item.identities {
            let (list, value) = match identity {
                Identity::Phone(v) => (&mut ids.phones, v),
                Identity::WaId(v) => (&mut ids.wa_ids, v),
                Identity::Bsuid(v) => (&mut ids.bsuids, v),
            };
            if !list.contains(value) {
                list.push(value.clone());
            }
        }
        Event {
            kind: EVENT_TYPE.to_string(),
            id: event_id(item),
            subject: item.subject.clone(),
            scope: item.scope.as_str().to_string(),
            status: item.status.as_str().to_string(),
            changed_at: item.changed_at.to_rfc3339(),
            source: item.source.clone(),
            identities: ids,
            sent_at: sent_at.to_rfc3339(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use optout_core::{Scope, Status};

    #[test]
    fn serialises_the_documented_shape() {
        let item = PushItem {
            key: "s12:all".into(),
            record: "s12".into(),
            status: Status::OptedOut,
            scope: Scope::All,
            changed_at: Timestamp(1_751_920_037_947),
            source: "whatsapp:keyword".into(),
            subject: "s12".into(),
            identities: vec![
                Identity::Phone("+15551234567".into()),
                Identity::WaId("15551234567".into()),
                Identity::Bsuid("US.13491208655302741918".into()),
                Identity::Phone("+15551234567".into()),
            ],
            reply: None,
        };
        let json =
            serde_json::to_value(Event::from_item(&item, Timestamp(1_751_920_040_000))).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "consent.changed",
                "id": "s12:all:opted_out:1751920037947:9a2a49ed",
                "subject": "s12",
                "scope": "all",
                "status": "opted_out",
                "changed_at": "2025-07-07T20:27:17.947Z",
                "source": "whatsapp:keyword",
                "identities": {
                    "phones": ["+15551234567"],
                    "wa_ids": ["15551234567"],
                    "bsuids": ["US.13491208655302741918"]
                },
                "sent_at": "2025-07-07T20:27:20.000Z"
            })
        );
        let later = PushItem {
            changed_at: Timestamp(1_751_920_037_948),
            ..item.clone()
        };
        assert_ne!(event_id(&item), event_id(&later));
        let reopt = PushItem {
            status: Status::OptedIn,
            ..item.clone()
        };
        assert_ne!(event_id(&item), event_id(&reopt));
        // The same identities in another order: the same event; one more identity: a new one.
        let mut shuffled = item.clone();
        shuffled.identities.reverse();
        assert_eq!(event_id(&item), event_id(&shuffled));
        let mut linked = item.clone();
        linked
            .identities
            .push(Identity::WaId("5215551234567".into()));
        assert_ne!(event_id(&item), event_id(&linked));
    }
}
