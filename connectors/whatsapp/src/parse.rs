//! Turns one stored webhook body into observations. Pure: no I/O, no clock (the body's
//! receive time is passed in).
//!
//! What counts:
//! - an inbound message whose text or button is an opt-out/opt-in keyword → an event with a
//!   status (signal `Keyword` or `Button`; the core maps the signal to a scope);
//! - any other inbound customer message → `status: None, signal: Inbound` (it opens the
//!   24-hour reply window);
//! - `user_preferences` `marketing_messages` stop/resume → `MarketingPreference`;
//! - a `failed` status with error 131050 → `MarketingSendFailure` opted out;
//! - other statuses, system messages, revocations (deleted messages) and value-level errors
//!   → nothing.
//!
//! Every identity shown for the sender is carried (`wa_id` and BSUID `user_id`), so the core
//! links them. `contacts[]` entries are joined to a message only when they share an id with
//! it (or when the message names no sender at all and there is a single contact), because
//! linking two different people would be far worse than not linking one person's two ids.
//! Parent BSUIDs (`parent_user_id`) are not reported: they name the person across a business
//! portfolio, not within this business.
//!
//! `message_id` is the dedup key: the message's `id` for messages, `"<id>:<status>"` for
//! statuses and `"pref:<wa_id or user_id>:<value>:<timestamp>"` for preferences. The poll
//! removes duplicates within a page; across pages the core dedupes on the same key.
//!
//! The parser is lenient the way Meta's payloads require (timestamps as strings or integers,
//! fields missing for username users) and isolates failures: a message that cannot be read
//! is skipped with a warning naming only its id, and the rest of the body still counts.

use optout_core::{ConsentEvent, Identity, Observation, Signal, Status, Timestamp};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

use crate::detect::Detector;

/// Error code of a failed send to someone who stopped marketing messages.
pub const MARKETING_STOPPED: i64 = 131050;

/// Why a whole body is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a WhatsApp webhook envelope: {0}")]
    NotEnvelope(String),
}

/// The minimal shape check the webhook does before storing a body: JSON with
/// `object = "whatsapp_business_account"` and an `entry` array. Cheap enough for the hot path
/// (nothing inside `entry` is materialised).
pub fn check_envelope(body: &[u8]) -> Result<(), BodyError> {
    #[derive(Deserialize)]
    struct Shape {
        object: Option<String>,
        entry: Option<Vec<IgnoredAny>>,
    }
    let body = repair_surrogates(body);
    let shape: Shape = serde_json::from_slice(&body).map_err(|e| {
        if e.is_data() {
            BodyError::NotEnvelope(e.to_string())
        } else {
            BodyError::NotJson(e.to_string())
        }
    })?;
    match (shape.object.as_deref(), shape.entry) {
        (Some("whatsapp_business_account"), Some(_)) => Ok(()),
        (Some("whatsapp_business_account"), None) => {
            Err(BodyError::NotEnvelope("no entry array".into()))
        }
        (other, _) => Err(BodyError::NotEnvelope(format!("object is {other:?}"))),
    }
}

/// Replaces `\uXXXX` escapes of unpaired UTF-16 surrogates with `\uFFFD`.
///
/// Such an escape is valid JSON syntax but no string can hold it, so serde refuses the
/// whole body: one customer's broken emoji would otherwise hide another customer's STOP in
/// the same webhook. Paired surrogates (real emoji) and every other byte are kept.
pub fn repair_surrogates(body: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    fn unit(b: &[u8], at: usize) -> Option<u16> {
        if b.get(at) != Some(&b'\\') || b.get(at + 1) != Some(&b'u') {
            return None;
        }
        let mut unit = [0u8; 2];
        hex::decode_to_slice(b.get(at + 2..at + 6)?, &mut unit).ok()?;
        Some(u16::from_be_bytes(unit))
    }
    let is_high = |u: u16| (0xD800..0xDC00).contains(&u);
    let is_low = |u: u16| (0xDC00..0xE000).contains(&u);
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < body.len() {
        if body[i] != b'\\' {
            if let Some(o) = out.as_mut() {
                o.push(body[i]);
            }
            i += 1;
            continue;
        }
        // An escape: `\uXXXX` (6 bytes) or a two-byte one such as `\\` or `\"`.
        let len = match unit(body, i) {
            Some(u) if is_high(u) && unit(body, i + 6).is_some_and(is_low) => 12,
            Some(u) if is_high(u) || is_low(u) => {
                let o = out.get_or_insert_with(|| body[..i].to_vec());
                o.extend_from_slice(b"\\uFFFD");
                i += 6;
                continue;
            }
            Some(_) => 6,
            None => 2,
        };
        let end = (i + len).min(body.len());
        if let Some(o) = out.as_mut() {
            o.extend_from_slice(&body[i..end]);
        }
        i = end;
    }
    match out {
        Some(v) => std::borrow::Cow::Owned(v),
        None => std::borrow::Cow::Borrowed(body),
    }
}

/// All observations in one body, in the body's order.
pub fn parse(
    body: &[u8],
    received_at: Timestamp,
    detector: &Detector,
) -> Result<Vec<Observation>, BodyError> {
    check_envelope(body)?;
    let body = repair_surrogates(body);
    let envelope: Envelope =
        serde_json::from_slice(&body).map_err(|e| BodyError::NotEnvelope(e.to_string()))?;
    let mut out = Vec::new();
    for entry in envelope.entry {
        let Ok(entry) = serde_json::from_value::<EntryRaw>(entry) else {
            tracing::warn!("skipping a webhook entry without a readable changes array");
            continue;
        };
        for change in entry.changes {
            let Ok(change) = serde_json::from_value::<ChangeRaw>(change) else {
                tracing::warn!("skipping a webhook change without field/value");
                continue;
            };
            let cx = Cx::new(&change.value, received_at, detector);
            match change.field.as_str() {
                "messages" => {
                    out.extend(items(&change.value, "messages").filter_map(|m| cx.message(m)));
                    out.extend(items(&change.value, "statuses").filter_map(|s| cx.status(s)));
                }
                "user_preferences" => {
                    out.extend(
                        items(&change.value, "user_preferences").filter_map(|p| cx.preference(p)),
                    );
                }
                _ => {} // account, template and other management updates say nothing about consent
            }
        }
    }
    Ok(out.into_iter().map(Observation::Event).collect())
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    entry: Vec<Value>,
}

#[derive(Deserialize)]
struct EntryRaw {
    #[serde(default)]
    changes: Vec<Value>,
}

#[derive(Deserialize)]
struct ChangeRaw {
    field: String,
    #[serde(default)]
    value: Value,
}

fn items<'a>(value: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    value
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// A string or a number, as Meta sends ids and timestamps either way.
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
enum Lenient {
    Str(String),
    Int(i64),
    Float(f64),
}

impl Lenient {
    fn text(&self) -> String {
        match self {
            Lenient::Str(s) => s.trim().to_string(),
            Lenient::Int(i) => i.to_string(),
            Lenient::Float(f) => f.to_string(),
        }
    }
    /// Unix seconds.
    fn seconds(&self) -> Option<i64> {
        match self {
            Lenient::Str(s) => s.trim().parse().ok(),
            Lenient::Int(i) => Some(*i),
            Lenient::Float(f) if f.is_finite() => Some(*f as i64),
            Lenient::Float(_) => None,
        }
    }
}

fn text_of(v: &Option<Lenient>) -> Option<String> {
    v.as_ref().map(Lenient::text).filter(|s| !s.is_empty())
}

#[derive(Deserialize, Default)]
struct Contact {
    wa_id: Option<Lenient>,
    user_id: Option<Lenient>,
}

#[derive(Deserialize)]
struct Message {
    id: Option<Lenient>,
    from: Option<Lenient>,
    from_user_id: Option<Lenient>,
    timestamp: Option<Lenient>,
    #[serde(rename = "type")]
    kind: Option<String>,
    text: Option<Text>,
    button: Option<Button>,
    interactive: Option<Interactive>,
    edit: Option<Edit>,
}

#[derive(Deserialize)]
struct Text {
    body: Option<String>,
}

#[derive(Deserialize)]
struct Button {
    payload: Option<String>,
    text: Option<String>,
}

#[derive(Deserialize)]
struct Interactive {
    #[serde(rename = "type")]
    kind: Option<String>,
    button_reply: Option<Choice>,
    list_reply: Option<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    id: Option<String>,
    title: Option<String>,
}

#[derive(Deserialize)]
struct Edit {
    message: Option<EditedMessage>,
}

#[derive(Deserialize)]
struct EditedMessage {
    #[serde(rename = "type")]
    kind: Option<String>,
    text: Option<Text>,
}

#[derive(Deserialize)]
struct StatusItem {
    id: Option<Lenient>,
    status: Option<String>,
    timestamp: Option<Lenient>,
    recipient_id: Option<Lenient>,
    recipient_user_id: Option<Lenient>,
    recipient_type: Option<String>,
    recipient_participant_id: Option<Lenient>,
    recipient_participant_user_id: Option<Lenient>,
    #[serde(default)]
    errors: Vec<ErrorItem>,
}

#[derive(Deserialize)]
struct ErrorItem {
    code: Option<Lenient>,
    title: Option<String>,
}

#[derive(Deserialize)]
struct Preference {
    wa_id: Option<Lenient>,
    user_id: Option<Lenient>,
    category: Option<String>,
    value: Option<String>,
    timestamp: Option<Lenient>,
}

/// What one change shares among its items.
struct Cx<'a> {
    contacts: Vec<Contact>,
    received_at: Timestamp,
    detector: &'a Detector,
}

impl<'a> Cx<'a> {
    fn new(value: &Value, received_at: Timestamp, detector: &'a Detector) -> Self {
        let contacts = items(value, "contacts")
            .filter_map(|c| Contact::deserialize(c).ok())
            .collect();
        Cx {
            contacts,
            received_at,
            detector,
        }
    }

    /// The act's time by Meta's clock; the receive time if Meta's is missing, so an opt-out
    /// with a damaged timestamp is still honoured.
    fn time(&self, ts: &Option<Lenient>, what: &str, id: &str) -> Timestamp {
        match ts.as_ref().and_then(Lenient::seconds) {
            Some(s) => Timestamp::from_secs(s),
            None => {
                tracing::warn!(
                    item = what,
                    id,
                    "no readable timestamp; using the receive time"
                );
                self.received_at
            }
        }
    }

    /// The sender's identities: the ids on the item plus every id of a contact that shares
    /// one of them.
    fn identities(&self, wa_id: Option<String>, bsuid: Option<String>) -> Vec<Identity> {
        let mut ids = Vec::new();
        let anonymous = wa_id.is_none() && bsuid.is_none();
        for c in &self.contacts {
            let (cw, cb) = (text_of(&c.wa_id), text_of(&c.user_id));
            let shares = (wa_id.is_some() && cw == wa_id) || (bsuid.is_some() && cb == bsuid);
            if shares || (anonymous && self.contacts.len() == 1) {
                ids.extend(cw.map(Identity::WaId));
                ids.extend(cb.map(Identity::Bsuid));
            }
        }
        ids.extend(wa_id.map(Identity::WaId));
        ids.extend(bsuid.map(Identity::Bsuid));
        ids.sort();
        ids.dedup();
        ids
    }

    fn message(&self, raw: &Value) -> Option<ConsentEvent> {
        let raw_id = raw.get("id").map(|v| v.to_string()).unwrap_or_default();
        let m = match Message::deserialize(raw) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(id = %raw_id, error = %e, "skipping an unreadable message");
                return None;
            }
        };
        let id = text_of(&m.id);
        let kind = m.kind.clone().unwrap_or_else(|| "unknown".to_string());
        // A system notice (number or identity change) and a deleted message are not the
        // customer writing to us.
        if matches!(kind.as_str(), "system" | "revoke") {
            return None;
        }
        let identities = self.identities(text_of(&m.from), text_of(&m.from_user_id));
        if identities.is_empty() {
            tracing::warn!(
                id = id.as_deref().unwrap_or(""),
                "skipping a message that names no sender"
            );
            return None;
        }
        let at = self.time(&m.timestamp, "message", id.as_deref().unwrap_or(""));
        let (detection, signal, evidence) = self.read(&m, &kind);
        Some(ConsentEvent {
            identities,
            status: detection.as_ref().map(|d| d.status),
            signal,
            at,
            inbound: true,
            message_id: id,
            evidence,
            language: detection.and_then(|d| d.language),
        })
    }

    /// What a message says, by its kind: a keyword in a text or an edit, a button or list
    /// choice, or nothing about consent.
    fn read(&self, m: &Message, kind: &str) -> Read {
        match kind {
            "text" => {
                let body = m
                    .text
                    .as_ref()
                    .and_then(|t| t.body.as_deref())
                    .unwrap_or("");
                keyword(self.detector.detect_text(body), body, "text")
            }
            "button" => {
                let b = m.button.as_ref();
                let payload = b.and_then(|b| b.payload.as_deref());
                let title = b.and_then(|b| b.text.as_deref());
                button(
                    self.detector.detect_button(payload, title),
                    payload,
                    title,
                    "button",
                )
            }
            "interactive" => self.interactive(m.interactive.as_ref()),
            "edit" => {
                // An edit that turns a message into STOP is honoured; an edit into START is
                // not taken as consent (the customer never sent START as a message).
                let e = m.edit.as_ref().and_then(|e| e.message.as_ref());
                let body = e
                    .filter(|e| e.kind.as_deref() == Some("text"))
                    .and_then(|e| e.text.as_ref()?.body.as_deref())
                    .unwrap_or("");
                let d = self
                    .detector
                    .detect_text(body)
                    .filter(|d| d.status == Status::OptedOut);
                keyword(d, body, "edited text")
            }
            other => (None, Signal::Inbound, format!("inbound {}", short(other))),
        }
    }

    /// A tapped interactive reply. The reply object names the kind; some senders omit
    /// `interactive.type`.
    fn interactive(&self, i: Option<&Interactive>) -> Read {
        let choice = i.and_then(|i| {
            (i.button_reply.as_ref().map(|c| ("button_reply", c)))
                .or(i.list_reply.as_ref().map(|c| ("list_reply", c)))
        });
        match choice {
            Some((sub, c)) => {
                let (p, t) = (c.id.as_deref(), c.title.as_deref());
                button(self.detector.detect_button(p, t), p, t, sub)
            }
            None => {
                let sub = i.and_then(|i| i.kind.as_deref()).unwrap_or("without body");
                (
                    None,
                    Signal::Inbound,
                    format!("inbound interactive {}", short(sub)),
                )
            }
        }
    }

    fn status(&self, raw: &Value) -> Option<ConsentEvent> {
        // Most statuses are sent/delivered/read: look before deserialising.
        if raw.get("status").and_then(Value::as_str) != Some("failed") {
            return None;
        }
        let s = match StatusItem::deserialize(raw) {
            Ok(s) => s,
            Err(e) => {
                let id = raw.get("id").map(|v| v.to_string()).unwrap_or_default();
                tracing::warn!(%id, error = %e, "skipping an unreadable status");
                return None;
            }
        };
        let err = s
            .errors
            .iter()
            .find(|e| e.code.as_ref().and_then(Lenient::seconds) == Some(MARKETING_STOPPED))?;
        let id = text_of(&s.id).unwrap_or_default();
        let (wa, bsuid) = if s.recipient_type.as_deref() == Some("group") {
            (
                text_of(&s.recipient_participant_id),
                text_of(&s.recipient_participant_user_id),
            )
        } else {
            (text_of(&s.recipient_id), text_of(&s.recipient_user_id))
        };
        let identities = self.identities(wa, bsuid);
        if identities.is_empty() {
            tracing::warn!(%id, "skipping a 131050 status that names no recipient");
            return None;
        }
        Some(ConsentEvent {
            identities,
            status: Some(Status::OptedOut),
            signal: Signal::MarketingSendFailure,
            at: self.time(&s.timestamp, "status", &id),
            inbound: false,
            message_id: Some(format!("{id}:{}", s.status.as_deref().unwrap_or("failed"))),
            evidence: format!(
                "send {} failed with error {MARKETING_STOPPED} ({})",
                short(&id),
                short(err.title.as_deref().unwrap_or(""))
            ),
            language: None,
        })
    }

    fn preference(&self, raw: &Value) -> Option<ConsentEvent> {
        let p = match Preference::deserialize(raw) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "skipping an unreadable user preference");
                return None;
            }
        };
        if p.category.as_deref() != Some("marketing_messages") {
            return None;
        }
        let value = p.value.as_deref().unwrap_or("");
        let status = match value {
            "stop" => Status::OptedOut,
            "resume" => Status::OptedIn,
            _ => return None, // "signup" and future values express no stop/resume
        };
        let (wa, bsuid) = (text_of(&p.wa_id), text_of(&p.user_id));
        let who = wa.clone().or_else(|| bsuid.clone());
        let identities = self.identities(wa, bsuid);
        let Some(first) = who.or_else(|| identities.first().map(identity_value)) else {
            tracing::warn!(value, "skipping a user preference that names nobody");
            return None;
        };
        let at = self.time(&p.timestamp, "user_preference", &first);
        Some(ConsentEvent {
            identities,
            status: Some(status),
            signal: Signal::MarketingPreference,
            at,
            inbound: false,
            message_id: Some(format!("pref:{first}:{value}:{}", at.millis() / 1000)),
            evidence: format!("user_preferences marketing_messages={value}"),
            language: None,
        })
    }
}

fn identity_value(i: &Identity) -> String {
    match i {
        Identity::Phone(v) | Identity::WaId(v) | Identity::Bsuid(v) => v.clone(),
    }
}

type Read = (Option<crate::detect::Detection>, Signal, String);

fn keyword(d: Option<crate::detect::Detection>, body: &str, what: &str) -> Read {
    match d {
        // The matched text is short by construction (keyword plus filler) and is the
        // evidence the audit log needs.
        Some(d) => {
            let ev = format!(
                "{what} {:?} matched {} ({})",
                short(body),
                d.matched,
                d.status
            );
            (Some(d), Signal::Keyword, ev)
        }
        // Ordinary messages stay out of the audit log: only their kind is recorded.
        None => (None, Signal::Inbound, format!("inbound {what}")),
    }
}

fn button(
    d: Option<crate::detect::Detection>,
    payload: Option<&str>,
    title: Option<&str>,
    what: &str,
) -> Read {
    let ev = format!(
        "{what} payload {:?} title {:?}",
        short(payload.unwrap_or("")),
        short(title.unwrap_or(""))
    );
    match d {
        Some(d) => {
            let ev = format!("{ev} matched {} ({})", d.matched, d.status);
            (Some(d), Signal::Button, ev)
        }
        None => (None, Signal::Inbound, ev),
    }
}

/// At most 80 characters, control characters removed, for evidence strings.
fn short(s: &str) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).take(80).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn lone_surrogate_escapes_are_replaced_and_pairs_kept() {
        let fix =
            |s: &str| String::from_utf8(repair_surrogates(s.as_bytes()).into_owned()).unwrap();
        assert_eq!(fix(r#"{"a":"\ud83d"}"#), r#"{"a":"\uFFFD"}"#);
        assert_eq!(fix(r#"{"a":"x\udc00y"}"#), r#"{"a":"x\uFFFDy"}"#);
        assert_eq!(
            fix(r#"{"a":"\ud83d\ude00"}"#),
            r#"{"a":"\ud83d\ude00"}"#,
            "a real emoji"
        );
        assert_eq!(
            fix(r#"{"a":"\\ud83d"}"#),
            r#"{"a":"\\ud83d"}"#,
            "an escaped backslash, not an escape"
        );
        assert_eq!(fix(r#"{"a":"\u00e9\"q"}"#), r#"{"a":"\u00e9\"q"}"#);
        assert!(matches!(
            repair_surrogates(b"{}"),
            std::borrow::Cow::Borrowed(_)
        ));
        let v: serde_json::Value = serde_json::from_str(&fix(r#"{"a":"\ud83d!"}"#)).unwrap();
        assert_eq!(v["a"], "\u{fffd}!");
    }

    use super::*;
    use serde_json::json;

    fn envelope(field: &str, value: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":field,"value":value}]}]})).unwrap()
    }

    fn events(body: &[u8]) -> Vec<ConsentEvent> {
        parse(
            body,
            Timestamp::from_secs(2_000_000_000),
            &Detector::default(),
        )
        .unwrap()
        .into_iter()
        .map(|o| match o {
            Observation::Event(e) => e,
            Observation::Record(_) => panic!("records are never produced"),
        })
        .collect()
    }

    #[test]
    fn envelope_check() {
        assert!(matches!(
            check_envelope(b"nope"),
            Err(BodyError::NotJson(_))
        ));
        assert!(matches!(
            check_envelope(b"[1,2]"),
            Err(BodyError::NotEnvelope(_))
        ));
        assert!(matches!(
            check_envelope(br#"{"object":"page","entry":[]}"#),
            Err(BodyError::NotEnvelope(_))
        ));
        assert!(matches!(
            check_envelope(br#"{"object":"whatsapp_business_account"}"#),
            Err(BodyError::NotEnvelope(_))
        ));
        assert_eq!(
            check_envelope(br#"{"object":"whatsapp_business_account","entry":[]}"#),
            Ok(())
        );
    }

    #[test]
    fn one_bad_message_does_not_hide_the_others() {
        let body = envelope(
            "messages",
            json!({
                "contacts": [{"wa_id": "15551230000"}],
                "messages": [
                    {"from": "15551230000", "id": "wamid.bad", "type": "text", "text": "not an object"},
                    {"from": "15551230000", "id": "wamid.good", "timestamp": 1700000000, "type": "text", "text": {"body": "STOP"}},
                    {"id": "wamid.nobody", "type": "text", "text": {"body": "STOP"}}
                ]
            }),
        );
        // "wamid.nobody" has no sender but the single contact names it.
        let ev = events(&body);
        let ids: Vec<_> = ev.iter().map(|e| e.message_id.clone().unwrap()).collect();
        assert_eq!(ids, vec!["wamid.good", "wamid.nobody"]);
        assert_eq!(ev[0].status, Some(Status::OptedOut));
        assert_eq!(ev[0].at, Timestamp::from_secs(1_700_000_000));
        // Missing timestamp: the receive time stands in.
        assert_eq!(ev[1].at, Timestamp::from_secs(2_000_000_000));
    }

    #[test]
    fn contacts_are_joined_only_by_a_shared_id() {
        let body = envelope(
            "messages",
            json!({
                "contacts": [{"wa_id": "111", "user_id": "US.1"}, {"wa_id": "222", "user_id": "US.2"}],
                "messages": [
                    {"from": "222", "id": "m1", "timestamp": "1", "type": "text", "text": {"body": "hi"}},
                    {"from_user_id": "US.1", "id": "m2", "timestamp": "1", "type": "text", "text": {"body": "hi"}},
                    {"from": "333", "id": "m3", "timestamp": "1", "type": "image"}
                ]
            }),
        );
        let ev = events(&body);
        assert_eq!(
            ev[0].identities,
            vec![Identity::WaId("222".into()), Identity::Bsuid("US.2".into())]
        );
        assert_eq!(
            ev[1].identities,
            vec![Identity::WaId("111".into()), Identity::Bsuid("US.1".into())]
        );
        assert_eq!(ev[2].identities, vec![Identity::WaId("333".into())]);
        assert_eq!(ev[2].evidence, "inbound image");
    }

    #[test]
    fn failed_131050_is_a_marketing_opt_out_and_other_failures_are_not() {
        let body = envelope(
            "messages",
            json!({"statuses": [
                {"id": "wamid.A", "status": "failed", "timestamp": "1700000000", "recipient_id": "15551230000",
                 "recipient_user_id": "US.9", "errors": [{"code": 131050, "title": "User stopped marketing"}]},
                {"id": "wamid.B", "status": "failed", "timestamp": "1700000000", "recipient_id": "15551230000",
                 "errors": [{"code": 131049, "title": "Not delivered to maintain ecosystem health"}]},
                {"id": "wamid.C", "status": "delivered", "timestamp": "1700000000", "recipient_id": "15551230000"}
            ]}),
        );
        let ev = events(&body);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].signal, Signal::MarketingSendFailure);
        assert_eq!(ev[0].status, Some(Status::OptedOut));
        assert_eq!(ev[0].message_id.as_deref(), Some("wamid.A:failed"));
        assert!(!ev[0].inbound);
        assert_eq!(
            ev[0].identities,
            vec![
                Identity::WaId("15551230000".into()),
                Identity::Bsuid("US.9".into())
            ]
        );
    }

    #[test]
    fn preference_stop_and_resume() {
        let stop = envelope(
            "user_preferences",
            json!({"user_preferences": [{"user_id": "US.7", "category": "marketing_messages", "value": "stop", "timestamp": 1731705721}]}),
        );
        let ev = events(&stop);
        assert_eq!(ev[0].status, Some(Status::OptedOut));
        assert_eq!(ev[0].signal, Signal::MarketingPreference);
        assert_eq!(
            ev[0].message_id.as_deref(),
            Some("pref:US.7:stop:1731705721")
        );
        assert_eq!(ev[0].identities, vec![Identity::Bsuid("US.7".into())]);
    }

    #[test]
    fn edits_can_opt_out_but_never_in() {
        let mk = |text: &str| {
            envelope(
                "messages",
                json!({"messages": [{"from": "1", "id": "e", "timestamp": "1", "type": "edit",
                    "edit": {"original_message_id": "o", "message": {"type": "text", "text": {"body": text}}}}]}),
            )
        };
        assert_eq!(events(&mk("STOP"))[0].status, Some(Status::OptedOut));
        assert_eq!(events(&mk("START"))[0].status, None);
    }
}
