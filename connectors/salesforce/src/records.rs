//! How records map both ways: which fields a query selects for each object, how a returned
//! record becomes a [`RecordSnapshot`], and which fields a push writes.
//!
//! Two shapes exist: a configured object with a checkbox consent field (Contact, Lead, any
//! custom object) and, when configured, a checkbox marketing field beside it, and the standard `MessagingEndUser`, whose WhatsApp rows carry the phone in
//! `MessagingPlatformKey` and consent in the `MessagingConsentStatus` picklist.

use optout_core::{PushItem, RecordSnapshot, Status, Timestamp};
use serde_json::{Map, Value, json};

use crate::config::{MESSAGING_END_USER, ObjectConfig};
use crate::soql;

/// One object the connector reads and writes.
#[derive(Clone, Debug)]
pub enum Source {
    Object(ObjectConfig),
    MessagingEndUser,
}

/// Text fields are commonly 255 characters; a longer source label would make the whole
/// record fail with STRING_TOO_LONG.
const SOURCE_MAX_CHARS: usize = 255;

impl Source {
    pub fn name(&self) -> &str {
        match self {
            Source::Object(o) => &o.name,
            Source::MessagingEndUser => MESSAGING_END_USER,
        }
    }

    /// The fields to select, `Id` and `SystemModstamp` first.
    pub fn fields(&self) -> Vec<&str> {
        let mut f = vec!["Id", "SystemModstamp"];
        match self {
            Source::Object(o) => {
                f.extend(o.phone_fields.iter().map(String::as_str));
                f.push(&o.consent_field);
                f.extend(o.changed_at());
                f.extend(o.marketing());
            }
            Source::MessagingEndUser => {
                f.extend(["MessagingPlatformKey", "MessagingConsentStatus"]);
            }
        }
        // Phone fields may repeat a standard name; SOQL refuses a duplicated field.
        let mut seen = Vec::new();
        f.retain(|x| {
            let lower = x.to_ascii_lowercase();
            let fresh = !seen.contains(&lower);
            seen.push(lower);
            fresh
        });
        f
    }

    /// A condition every query of this object carries, besides the cursor's.
    pub fn filter(&self) -> Option<String> {
        match self {
            Source::Object(_) => None,
            Source::MessagingEndUser => Some(format!(
                "MessageType = {}",
                soql::string_literal("WhatsApp")
            )),
        }
    }

    /// The snapshot of one returned record; `None` when it lacks `Id` or `SystemModstamp`
    /// (which every record has, so the response is broken).
    pub fn snapshot(&self, rec: &Value) -> Option<(RecordSnapshot, Timestamp, String)> {
        let id = field(rec, "Id")?.as_str()?.to_string();
        let modified_at = Timestamp::parse(field(rec, "SystemModstamp")?.as_str()?)?;
        let text = |name: &str| {
            field(rec, name)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
        };
        let snap = match self {
            Source::Object(o) => {
                let checkbox = |name: &str| {
                    let raw = field(rec, name).cloned().unwrap_or(Value::Null);
                    let value = match &raw {
                        Value::Bool(true) => Some(Status::OptedOut),
                        Value::Bool(false) => Some(Status::OptedIn),
                        _ => None,
                    };
                    (value, format!("{name}={raw}"))
                };
                let (value, mut evidence) = checkbox(&o.consent_field);
                let marketing = o.marketing().and_then(|m| {
                    let (value, seen) = checkbox(m);
                    evidence = format!("{evidence} {seen}");
                    value
                });
                RecordSnapshot {
                    record: format!("{}/{id}", o.name),
                    phones: o
                        .phone_fields
                        .iter()
                        .filter_map(|f| text(f))
                        .map(str::to_string)
                        .collect(),
                    value,
                    marketing,
                    changed_at: o.changed_at().and_then(text).and_then(Timestamp::parse),
                    modified_at,
                    evidence,
                }
            }
            Source::MessagingEndUser => {
                let status = text("MessagingConsentStatus");
                let value = match status {
                    Some("OptedOut") => Some(Status::OptedOut),
                    Some("ExplicitlyOptedIn" | "DoublyOptedIn") => Some(Status::OptedIn),
                    // Implicit opt-in is no decision by the person; empty says nothing.
                    _ => None,
                };
                let phones = text("MessagingPlatformKey")
                    .map(strip_whatsapp_prefix)
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .into_iter()
                    .collect();
                RecordSnapshot {
                    record: format!("{MESSAGING_END_USER}/{id}"),
                    phones,
                    value,
                    marketing: None,
                    changed_at: None,
                    modified_at,
                    evidence: format!("MessagingConsentStatus={}", status.unwrap_or("")),
                }
            }
        };
        Some((snap, modified_at, id))
    }

    /// Whether the object has a marketing field to write.
    pub fn has_marketing(&self) -> bool {
        matches!(self, Source::Object(o) if o.marketing().is_some())
    }

    /// The sObject Collections entry that writes to record `id` the consent field's value
    /// (`item`, with its change time and source) and the marketing field's (`marketing`).
    pub fn write(&self, id: &str, item: Option<&PushItem>, marketing: Option<&PushItem>) -> Value {
        let mut rec = Map::new();
        rec.insert("attributes".into(), json!({ "type": self.name() }));
        rec.insert("id".into(), json!(id));
        if let (Some(m), Source::Object(o)) = (marketing, self)
            && let Some(f) = o.marketing()
        {
            rec.insert(f.into(), json!(m.status == Status::OptedOut));
        }
        let Some(item) = item else {
            return Value::Object(rec);
        };
        match self {
            Source::Object(o) => {
                rec.insert(
                    o.consent_field.clone(),
                    json!(item.status == Status::OptedOut),
                );
                if let Some(f) = o.changed_at() {
                    rec.insert(f.into(), json!(item.changed_at.to_rfc3339()));
                }
                if let Some(f) = o.source() {
                    let s: String = item.source.chars().take(SOURCE_MAX_CHARS).collect();
                    rec.insert(f.into(), json!(s));
                }
            }
            Source::MessagingEndUser => {
                let v = match item.status {
                    Status::OptedOut => "OptedOut",
                    Status::OptedIn => "ExplicitlyOptedIn",
                };
                rec.insert("MessagingConsentStatus".into(), json!(v));
            }
        }
        Value::Object(rec)
    }
}

/// A record's field by API name. Salesforce names are case-insensitive and responses use the
/// org's spelling, which may differ from the configuration's.
fn field<'a>(rec: &'a Value, name: &str) -> Option<&'a Value> {
    let obj = rec.as_object()?;
    obj.get(name).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// WhatsApp rows may store the key as `whatsapp:+15551234567`.
fn strip_whatsapp_prefix(key: &str) -> &str {
    match key.get(..9) {
        Some(p) if p.eq_ignore_ascii_case("whatsapp:") => key[9..].trim(),
        _ => key,
    }
}

/// A Salesforce id: 15 (case-sensitive) or 18 (case-safe) letters and digits.
pub fn is_record_id(id: &str) -> bool {
    matches!(id.len(), 15 | 18) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;
    use optout_core::{Scope, Timestamp};

    fn item(status: Status) -> PushItem {
        PushItem {
            key: "k".into(),
            record: "Contact/003xx0000000001AAA".into(),
            status,
            scope: Scope::All,
            changed_at: Timestamp::parse("2026-03-04T05:06:07.089Z").unwrap(),
            source: "whatsapp:keyword".into(),
            subject: "s".into(),
            identities: vec![],
            reply: None,
        }
    }

    #[test]
    fn contact_snapshot_and_write() {
        let mut o = ObjectConfig::named("Contact");
        o.source_field = Some("WhatsApp_Consent_Source__c".into());
        let s = Source::Object(o);
        assert_eq!(
            s.fields(),
            [
                "Id",
                "SystemModstamp",
                "MobilePhone",
                "Phone",
                "WhatsApp_Opt_Out__c",
                "WhatsApp_Consent_Changed_At__c"
            ]
        );
        let rec = json!({"attributes": {"type": "Contact"}, "Id": "003xx0000000001AAA",
            "SystemModstamp": "2026-01-02T10:11:12.000+0000", "MobilePhone": null, "Phone": " +1 (555) 010-0001 ",
            "whatsapp_opt_out__c": true, "WhatsApp_Consent_Changed_At__c": "2026-01-02T10:00:00.000+0000"});
        let (snap, t, id) = s.snapshot(&rec).unwrap();
        assert_eq!(snap.record, "Contact/003xx0000000001AAA");
        assert_eq!(snap.phones, ["+1 (555) 010-0001"]);
        assert_eq!(snap.value, Some(Status::OptedOut));
        assert_eq!(snap.evidence, "WhatsApp_Opt_Out__c=true");
        assert_eq!(snap.changed_at, Timestamp::parse("2026-01-02T10:00:00Z"));
        assert_eq!(t, Timestamp::parse("2026-01-02T10:11:12Z").unwrap());
        assert_eq!(id, "003xx0000000001AAA");
        let w = s.write("003xx0000000001AAA", Some(&item(Status::OptedIn)), None);
        assert_eq!(
            w,
            json!({"attributes": {"type": "Contact"}, "id": "003xx0000000001AAA", "WhatsApp_Opt_Out__c": false,
                "WhatsApp_Consent_Changed_At__c": "2026-03-04T05:06:07.089Z", "WhatsApp_Consent_Source__c": "whatsapp:keyword"})
        );
    }

    #[test]
    fn messaging_end_user_mapping() {
        let s = Source::MessagingEndUser;
        let rec = |status: Value, key: &str| {
            json!({"Id": "0PAxx0000000001AAA", "SystemModstamp": "2026-01-02T10:11:12.000+0000",
                "MessagingPlatformKey": key, "MessagingConsentStatus": status})
        };
        let value = |st: Value| s.snapshot(&rec(st, "x")).unwrap().0.value;
        assert_eq!(value(json!("OptedOut")), Some(Status::OptedOut));
        assert_eq!(value(json!("ExplicitlyOptedIn")), Some(Status::OptedIn));
        assert_eq!(value(json!("DoublyOptedIn")), Some(Status::OptedIn));
        assert_eq!(value(json!("ImplicitlyOptedIn")), None);
        assert_eq!(value(Value::Null), None);
        let snap = s
            .snapshot(&rec(json!("OptedOut"), "WhatsApp:+15550100001"))
            .unwrap()
            .0;
        assert_eq!(snap.phones, ["+15550100001"]);
        assert_eq!(snap.record, "MessagingEndUser/0PAxx0000000001AAA");
        assert_eq!(
            s.write("0PAxx0000000001AAA", Some(&item(Status::OptedOut)), None)["MessagingConsentStatus"],
            "OptedOut"
        );
        assert_eq!(
            s.write("0PAxx0000000001AAA", Some(&item(Status::OptedIn)), None)["MessagingConsentStatus"],
            "ExplicitlyOptedIn"
        );
    }

    #[test]
    fn marketing_checkbox_read_and_written_beside_the_consent_field() {
        let mut o = ObjectConfig::named("Contact");
        o.marketing_field = Some("WhatsApp_Marketing_Opt_Out__c".into());
        let s = Source::Object(o);
        assert!(s.fields().contains(&"WhatsApp_Marketing_Opt_Out__c"));
        let rec = json!({"Id": "003xx0000000001AAA", "SystemModstamp": "2026-01-02T10:11:12.000+0000",
            "Phone": "+15550100001", "WhatsApp_Opt_Out__c": false, "whatsapp_marketing_opt_out__c": true});
        let snap = s.snapshot(&rec).unwrap().0;
        assert_eq!(
            (snap.value, snap.marketing),
            (Some(Status::OptedIn), Some(Status::OptedOut))
        );
        assert_eq!(
            snap.evidence,
            "WhatsApp_Opt_Out__c=false WhatsApp_Marketing_Opt_Out__c=true"
        );
        let mut m = item(Status::OptedOut);
        m.scope = Scope::Marketing;
        assert_eq!(
            s.write("003xx0000000001AAA", None, Some(&m)),
            json!({"attributes": {"type": "Contact"}, "id": "003xx0000000001AAA", "WhatsApp_Marketing_Opt_Out__c": true})
        );
        let both = s.write("003xx0000000001AAA", Some(&item(Status::OptedIn)), Some(&m));
        assert_eq!(
            (
                both["WhatsApp_Opt_Out__c"].clone(),
                both["WhatsApp_Marketing_Opt_Out__c"].clone()
            ),
            (json!(false), json!(true))
        );
        // Without a configured field nothing is read or written for marketing.
        let plain = Source::Object(ObjectConfig::named("Contact"));
        assert_eq!(plain.snapshot(&rec).unwrap().0.marketing, None);
        assert!(!plain.has_marketing());
        assert_eq!(
            plain
                .write("003xx0000000001AAA", None, Some(&m))
                .as_object()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn ids() {
        assert!(is_record_id("003xx0000000001AAA"));
        assert!(is_record_id("003xx0000000001"));
        assert!(!is_record_id("003xx000000001'"));
        assert!(!is_record_id(""));
    }
}
