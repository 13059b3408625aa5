//! Turns one stored webhook body into observations. Pure: no I/O, no clock (the body's
//! receive time is passed in).
//!
//! What counts:
//! - an inbound message whose text or button is an opt-out/opt-in keyword → an event with a
//!   status (signal `Keyword` or `Button`) and the keyword's configured scope, if it has one
//!   (otherwise the core maps the signal to a scope);
//! - any other inbound customer message → `status: None, signal: Inbound` (it opens the
//!   24-hour reply window);
//! - `user_preferences` `marketing_messages` stop/resume → `MarketingPreference`;
//! - a `failed` status with error 131050 → `MarketingSendFailure` opted out;
//! - a template's category in `template_category_update` (`new_category`, and the
//!   announced `correct_category` of an impending change) or `message_template_status_update`
//!   (`message_template_category`) → a [`TemplateCategory`], timed by the entry's `time`;
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
//! statuses and `"pref:<wa_id or user_id>:<value>:<timestamp>"` for preferences (a key of
//! the preference's content: a redelivery of it counts once). The poll removes duplicates
//! within a page; across pages the core dedupes on the same key.
//!
//! A typed text that is no keyword but holds a strong revocation word is an inbound event
//! marked `possible_opt_out` (with the word's language): the core records it for review and
//! may ask the customer, and never applies it.
//!
//! The parser is lenient the way Meta's payloads require (timestamps as strings or integers,
//! fields missing for username users) and isolates failures: a body is read as a sequence
//! of parts ([`parts`]), and a part that cannot be read (bytes that are not UTF-8, nesting
//! too deep, a wrong shape, no sender) is returned as [`Part::Unreadable`] with its byte
//! span, for the quarantine, while the rest of the body still counts. Nothing here logs:
//! what a body holds (numbers, texts) never reaches a log line.

use optout_core::{
    ChangeKind, ConsentEvent, Identity, IdentityChange, Observation, Signal, Status,
    TemplateCategory, Timestamp,
};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use crate::detect::Detector;

/// Error code of a failed send to someone who stopped marketing messages.
pub const MARKETING_STOPPED: i64 = 131050;

/// Why a whole body is unusable. The text never quotes the body.
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
    // serde_json's message can quote the body; only its class and position are kept.
    let shape: Shape = serde_json::from_slice(&body).map_err(|e| {
        let at = format!("at line {} column {}", e.line(), e.column());
        if e.is_data() {
            BodyError::NotEnvelope(format!("{} {at}", why(&e)))
        } else {
            BodyError::NotJson(format!("{:?} error {at}", e.classify()))
        }
    })?;
    match (shape.object.as_deref(), shape.entry) {
        (Some("whatsapp_business_account"), Some(_)) => Ok(()),
        (Some("whatsapp_business_account"), None) => {
            Err(BodyError::NotEnvelope("no entry array".into()))
        }
        (Some(_), _) => Err(BodyError::NotEnvelope(
            "object is not whatsapp_business_account".into(),
        )),
        (None, _) => Err(BodyError::NotEnvelope("no object".into())),
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

/// The most events and unreadable parts the poll takes into one page, however many one
/// body holds: each page is one store transaction, and a 9,000-message envelope in one
/// transaction held hundreds of megabytes.
pub const MAX_PAGE_PARTS: usize = 500;

/// Why a part of a body (or a whole body) cannot be used. The text names the kind of
/// damage only and never quotes the body: it is logged and kept as the quarantine reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Bytes that are not UTF-8 inside it.
    InvalidUtf8,
    /// Nested deeper than the reader follows (serde_json's recursion limit).
    TooDeep,
    /// Not the shape Meta documents (a string where an object belongs, say).
    Shape,
    /// A message or preference that names nobody.
    NoSender,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Why::InvalidUtf8 => "invalid UTF-8",
            Why::TooDeep => "nested too deep",
            Why::Shape => "not the documented shape",
            Why::NoSender => "names no sender",
        })
    }
}

/// serde_json's message may quote the offending value (a number, a text): it is only
/// classified here, never shown.
fn why(e: &serde_json::Error) -> Why {
    if e.to_string().contains("recursion limit") {
        Why::TooDeep
    } else {
        Why::Shape
    }
}

/// One unit of a body. A body is read as a fixed sequence of units (each entry's changes,
/// and in each change its contacts, then messages, statuses or preferences), so the poll
/// can stop inside a large body and resume at the same unit.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// A customer's act or inbound message.
    Event(ConsentEvent),
    /// A `system` notice that the person's number or business-scoped user id changed.
    Change(IdentityChange),
    /// A template's category, from a template webhook.
    Template(TemplateCategory),
    /// Readable, and says nothing the core needs (a delivery status, a contact).
    Nothing,
    /// Cannot be used: `span` (bytes of the stored body) goes to the quarantine; `at`
    /// locates it by position (`entry 0 change 1 message 3`).
    Unreadable {
        span: std::ops::Range<usize>,
        at: String,
        why: Why,
    },
}

/// All observations in one body, in the body's order; unreadable parts are left out
/// (the poll uses [`parts`], which keeps them for the quarantine).
pub fn parse(
    body: &[u8],
    received_at: Timestamp,
    detector: &Detector,
) -> Result<Vec<Observation>, BodyError> {
    Ok(parts(body, received_at, detector)?
        .into_iter()
        .filter_map(|p| match p {
            Part::Event(e) => Some(Observation::Event(e)),
            Part::Change(c) => Some(Observation::IdentityChange(c)),
            Part::Template(t) => Some(Observation::TemplateCategory(t)),
            _ => None,
        })
        .collect())
}

/// Every unit of one body, in order. A body whose envelope cannot be read at all is an
/// error (the whole body is quarantined); within a readable envelope, each entry, change,
/// contact, message, status and preference stands alone: a damaged one (bytes that are not
/// UTF-8, nesting too deep, a wrong shape) becomes [`Part::Unreadable`] and the others
/// still count. Damage is charged to the smallest unit that holds it.
///
/// No tree of the body is built: the body is read once into borrowed spans
/// (`RawValue`), and each item into its own small struct.
pub fn parts(
    body: &[u8],
    received_at: Timestamp,
    detector: &Detector,
) -> Result<Vec<Part>, BodyError> {
    check_envelope(body)?;
    let repaired = repair_surrogates(body);
    let (text, bad) = mark_invalid_utf8(&repaired);
    let envelope: Envelope<'_> = serde_json::from_str(&text)
        .map_err(|e| BodyError::NotEnvelope(format!("{} at column {}", why(&e), e.column())))?;
    let mut walk = Walk {
        base: text.as_ptr() as usize,
        bad,
        received_at,
        detector,
        out: Vec::new(),
    };
    let in_entries: usize = envelope.entry.iter().map(|e| walk.bad_in(e)).sum();
    if in_entries < walk.bad.len() {
        return Err(BodyError::NotEnvelope(
            "invalid UTF-8 outside the entries".into(),
        ));
    }
    for (i, e) in envelope.entry.iter().enumerate() {
        walk.entry(i, e);
    }
    Ok(walk.out)
}

/// The body as text with each byte of an invalid UTF-8 sequence replaced by `?` (same
/// length, so every span still locates the stored bytes), and where those bytes were.
fn mark_invalid_utf8(body: &[u8]) -> (std::borrow::Cow<'_, str>, Vec<usize>) {
    if let Ok(s) = std::str::from_utf8(body) {
        return (std::borrow::Cow::Borrowed(s), Vec::new());
    }
    let mut out = body.to_vec();
    let mut bad = Vec::new();
    let mut at = 0;
    while at < out.len() {
        match std::str::from_utf8(&out[at..]) {
            Ok(_) => break,
            Err(e) => {
                let start = at + e.valid_up_to();
                let len = e.error_len().unwrap_or(out.len() - start);
                out[start..start + len].fill(b'?');
                bad.extend(start..start + len);
                at = start + len;
            }
        }
    }
    let text = String::from_utf8(out).expect("every invalid sequence was replaced");
    (std::borrow::Cow::Owned(text), bad)
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    entry: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct EntryRaw<'a> {
    #[serde(borrow, default)]
    changes: Option<Vec<&'a RawValue>>,
    /// When Meta triggered the webhook (Unix seconds); times template notices.
    #[serde(default)]
    time: Option<Lenient>,
}

#[derive(Deserialize)]
struct ChangeRaw<'a> {
    field: String,
    #[serde(borrow)]
    value: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ValueRaw<'a> {
    #[serde(borrow, default)]
    contacts: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    messages: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    statuses: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    user_preferences: Option<Vec<&'a RawValue>>,
}

/// The state of one body's reading: where the text starts (to turn borrowed spans into
/// offsets), where its damaged bytes are, and the units found so far.
struct Walk<'d> {
    base: usize,
    bad: Vec<usize>,
    received_at: Timestamp,
    detector: &'d Detector,
    out: Vec<Part>,
}

impl<'d> Walk<'d> {
    fn span(&self, raw: &RawValue) -> std::ops::Range<usize> {
        let start = raw.get().as_ptr() as usize - self.base;
        start..start + raw.get().len()
    }

    /// How many damaged bytes lie inside `raw`.
    fn bad_in(&self, raw: &RawValue) -> usize {
        let s = self.span(raw);
        self.bad.partition_point(|&b| b < s.end) - self.bad.partition_point(|&b| b < s.start)
    }

    /// Whether `raw` holds damaged bytes outside all of `children` (then `raw` itself is
    /// the smallest unit holding them).
    fn bad_outside<'r>(
        &self,
        raw: &RawValue,
        children: impl Iterator<Item = &'r RawValue>,
    ) -> bool {
        self.bad_in(raw) > children.map(|c| self.bad_in(c)).sum()
    }

    fn unreadable(&mut self, raw: &RawValue, at: String, why: Why) {
        let span = self.span(raw);
        self.out.push(Part::Unreadable { span, at, why });
    }

    fn entry(&mut self, i: usize, raw: &RawValue) {
        let at = format!("entry {i}");
        let entry = match serde_json::from_str::<EntryRaw<'_>>(raw.get()) {
            Ok(e) => e,
            Err(e) => return self.unreadable(raw, at, why(&e)),
        };
        let changes = entry.changes.unwrap_or_default();
        if self.bad_outside(raw, changes.iter().copied()) {
            return self.unreadable(raw, at, Why::InvalidUtf8);
        }
        let time = entry.time.as_ref().and_then(Lenient::seconds);
        for (j, c) in changes.iter().enumerate() {
            self.change(&format!("{at} change {j}"), c, time);
        }
    }

    fn change(&mut self, at: &str, raw: &RawValue, time: Option<i64>) {
        let change = match serde_json::from_str::<ChangeRaw<'_>>(raw.get()) {
            Ok(c) => c,
            Err(e) => return self.unreadable(raw, at.to_string(), why(&e)),
        };
        if let (Some(field), Some(value)) = (template_field(&change.field), change.value) {
            return self.template(at, raw, value, field, time);
        }
        let consent = matches!(change.field.as_str(), "messages" | "user_preferences");
        let value = match change.value {
            // Account, template and other management updates say nothing about consent;
            // damage inside their value is not read.
            Some(v) if !consent => {
                let damaged = self.bad_outside(raw, std::iter::once(v));
                return self.nothing_or_damaged(raw, at, damaged);
            }
            None => {
                let damaged = self.bad_in(raw) > 0;
                return self.nothing_or_damaged(raw, at, damaged);
            }
            Some(v) => v,
        };
        let v = match serde_json::from_str::<ValueRaw<'_>>(value.get()) {
            Ok(v) => v,
            Err(e) => return self.unreadable(raw, at.to_string(), why(&e)),
        };
        let contacts = v.contacts.unwrap_or_default();
        let items: Vec<(&str, &RawValue)> = if change.field == "messages" {
            let m = v
                .messages
                .unwrap_or_default()
                .into_iter()
                .map(|r| ("message", r));
            m.chain(
                v.statuses
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| ("status", r)),
            )
            .collect()
        } else {
            let p = v.user_preferences.unwrap_or_default();
            p.into_iter().map(|r| ("preference", r)).collect()
        };
        let children = contacts.iter().chain(items.iter().map(|(_, r)| r)).copied();
        if self.bad_outside(raw, children) {
            return self.unreadable(raw, at.to_string(), Why::InvalidUtf8);
        }
        let cx = self.contacts(at, &contacts);
        for (k, (what, item)) in items.into_iter().enumerate() {
            self.item(format!("{at} {what} {k}"), item, |text| match what {
                "message" => cx.message(serde_json::from_str(text).map_err(|e| why(&e))?),
                "status" => cx.status(text).map(|e| e.map(Part::Event)),
                _ => cx
                    .preference(serde_json::from_str(text).map_err(|e| why(&e))?)
                    .map(|e| e.map(Part::Event)),
            });
        }
    }

    /// A template notice: its category, or nothing when it names none (an older status
    /// update); unreadable when it names a category but no template.
    fn template(
        &mut self,
        at: &str,
        raw: &RawValue,
        value: &RawValue,
        field: TemplateField,
        time: Option<i64>,
    ) {
        if self.bad_in(raw) > 0 {
            return self.unreadable(raw, at.to_string(), Why::InvalidUtf8);
        }
        let v = match serde_json::from_str::<TemplateValue>(value.get()) {
            Ok(v) => v,
            Err(e) => return self.unreadable(raw, at.to_string(), why(&e)),
        };
        let at_time = time.map_or(self.received_at, Timestamp::from_secs);
        match template_category(v, field, at_time) {
            Ok(Some(t)) => self.out.push(Part::Template(t)),
            Ok(None) => self.out.push(Part::Nothing),
            Err(w) => self.unreadable(raw, at.to_string(), w),
        }
    }

    fn nothing_or_damaged(&mut self, raw: &RawValue, at: &str, damaged: bool) {
        if damaged {
            self.unreadable(raw, at.to_string(), Why::InvalidUtf8);
        } else {
            self.out.push(Part::Nothing);
        }
    }

    /// The change's readable contacts; each unreadable one is a part of its own (it only
    /// ever links identities, so leaving it out links less, never wrongly).
    fn contacts(&mut self, at: &str, raws: &[&RawValue]) -> Cx<'d> {
        let mut contacts = Vec::new();
        for (k, raw) in raws.iter().enumerate() {
            let read = match self.bad_in(raw) {
                0 => serde_json::from_str::<Contact>(raw.get()).map_err(|e| why(&e)),
                _ => Err(Why::InvalidUtf8),
            };
            match read {
                Ok(c) => {
                    contacts.push(c);
                    self.out.push(Part::Nothing);
                }
                Err(w) => self.unreadable(raw, format!("{at} contact {k}"), w),
            }
        }
        Cx {
            contacts,
            received_at: self.received_at,
            detector: self.detector,
        }
    }

    /// One message, status or preference: an event, nothing, or unreadable.
    fn item(
        &mut self,
        at: String,
        raw: &RawValue,
        judge: impl FnOnce(&str) -> Result<Option<Part>, Why>,
    ) {
        let judged = match self.bad_in(raw) {
            0 => judge(raw.get()),
            _ => Err(Why::InvalidUtf8),
        };
        match judged {
            Ok(Some(part)) => self.out.push(part),
            Ok(None) => self.out.push(Part::Nothing),
            Err(w) => self.unreadable(raw, at, w),
        }
    }
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
    system: Option<System>,
}

/// A `system` notice's body object.
#[derive(Deserialize)]
struct System {
    #[serde(rename = "type")]
    kind: Option<String>,
    body: Option<String>,
    wa_id: Option<Lenient>,
    customer: Option<Lenient>,
    user_id: Option<Lenient>,
    previous_user_id: Option<Lenient>,
}

/// The old identity in a notice body "User NAME changed from OLD to NEW".
fn changed_from(body: &str) -> Option<String> {
    let rest = &body[body.rfind(" changed from ")? + " changed from ".len()..];
    let old = rest.split(" to ").next()?.trim();
    (!old.is_empty()).then(|| old.to_string())
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
    /// The act's time by Meta's clock; the receive time if Meta's is missing, so an opt-out
    /// with a damaged timestamp is still honoured. A readable but implausible time (0, a
    /// negative one) is passed on as it is: the policy refuses it as evidence, visibly.
    fn time(&self, ts: &Option<Lenient>) -> Timestamp {
        match ts.as_ref().and_then(Lenient::seconds) {
            Some(s) => Timestamp::from_secs(s),
            None => self.received_at,
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

    fn message(&self, m: Message) -> Result<Option<Part>, Why> {
        let id = text_of(&m.id);
        let kind = m.kind.clone().unwrap_or_else(|| "unknown".to_string());
        // A system notice and a deleted message are not the customer writing to us; a
        // number or user id change still moves their consent.
        if kind == "system" {
            return Ok(self.system(&m).map(Part::Change));
        }
        if kind == "revoke" {
            return Ok(None);
        }
        let identities = self.identities(text_of(&m.from), text_of(&m.from_user_id));
        if identities.is_empty() {
            return Err(Why::NoSender);
        }
        let at = self.time(&m.timestamp);
        let (detection, signal, evidence) = self.read(&m, &kind);
        // A possible opt-out is an ordinary inbound message for the decision.
        let possible_opt_out = signal == Signal::Inbound && detection.is_some();
        Ok(Some(Part::Event(ConsentEvent {
            identities,
            status: (detection.as_ref())
                .filter(|_| !possible_opt_out)
                .map(|d| d.status),
            signal,
            at,
            inbound: true,
            message_id: id,
            evidence,
            scope: detection.as_ref().and_then(|d| d.scope),
            possible_opt_out,
            language: detection.and_then(|d| d.language),
        })))
    }

    /// A `system` notice as an identity change. `user_changed_number` names the new number
    /// in `system.wa_id` (the old one is the sender, or `system.customer` in Meta's
    /// reference example); `user_changed_user_id` names the new id in `system.user_id`
    /// and the old one as the sender's `from_user_id` (some payloads carry it as
    /// `system.previous_user_id`, or only in the body "… changed from OLD to NEW").
    /// Other notices (`customer_identity_changed`: a new security code) change nothing.
    fn system(&self, m: &Message) -> Option<IdentityChange> {
        let sys = m.system.as_ref()?;
        let body_from = sys.body.as_deref().and_then(changed_from);
        let (kind, from, to) = match sys.kind.as_deref()? {
            "user_changed_number" => {
                let old = text_of(&m.from).or_else(|| text_of(&sys.customer));
                let from = self.identities(old, None);
                (
                    ChangeKind::Number,
                    from,
                    vec![Identity::WaId(text_of(&sys.wa_id)?)],
                )
            }
            "user_changed_user_id" => {
                let old = text_of(&m.from_user_id)
                    .or_else(|| text_of(&sys.previous_user_id))
                    .or(body_from);
                let from = self.identities(text_of(&m.from), old);
                (
                    ChangeKind::UserId,
                    from,
                    vec![Identity::Bsuid(text_of(&sys.user_id)?)],
                )
            }
            _ => return None,
        };
        if from.is_empty() {
            return None;
        }
        Some(IdentityChange {
            kind,
            from,
            to,
            at: self.time(&m.timestamp),
            message_id: text_of(&m.id),
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
                self.keyword(body, "text")
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
                match self.detector.detect_text(body) {
                    Some(d) if d.status == Status::OptedOut => {
                        keyword(Some(d), body, "edited text")
                    }
                    Some(_) => keyword(None, body, "edited text"),
                    None => self.keyword(body, "edited text"),
                }
            }
            other => (None, Signal::Inbound, format!("inbound {}", short(other))),
        }
    }

    /// A typed text: a keyword, a possible opt-out, or nothing about consent.
    fn keyword(&self, body: &str, what: &str) -> Read {
        if let Some(d) = self.detector.detect_text(body) {
            return keyword(Some(d), body, what);
        }
        match self.detector.possible_opt_out(body) {
            // Kept for an operator's review: the text, bounded, is the evidence.
            Some(d) => {
                let ev = format!(
                    "{what} {:?} may be an opt-out ({} is a revocation word)",
                    short(body),
                    d.matched
                );
                (Some(d), Signal::Inbound, ev)
            }
            None => keyword(None, body, what),
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

    fn status(&self, text: &str) -> Result<Option<ConsentEvent>, Why> {
        // Most statuses are sent/delivered/read: look before reading the rest.
        #[derive(Deserialize)]
        struct Head {
            status: Option<Lenient>,
        }
        let head: Head = serde_json::from_str(text).map_err(|e| why(&e))?;
        if text_of(&head.status).as_deref() != Some("failed") {
            return Ok(None);
        }
        let s: StatusItem = serde_json::from_str(text).map_err(|e| why(&e))?;
        let err = s
            .errors
            .iter()
            .find(|e| e.code.as_ref().and_then(Lenient::seconds) == Some(MARKETING_STOPPED));
        let Some(err) = err else {
            return Ok(None);
        };
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
            return Err(Why::NoSender);
        }
        Ok(Some(ConsentEvent {
            identities,
            status: Some(Status::OptedOut),
            signal: Signal::MarketingSendFailure,
            at: self.time(&s.timestamp),
            inbound: false,
            message_id: Some(format!("{id}:{}", s.status.as_deref().unwrap_or("failed"))),
            evidence: format!(
                "send {} failed with error {MARKETING_STOPPED} ({})",
                short(&id),
                short(err.title.as_deref().unwrap_or(""))
            ),
            language: None,
            scope: None,
            possible_opt_out: false,
        }))
    }

    fn preference(&self, p: Preference) -> Result<Option<ConsentEvent>, Why> {
        if p.category.as_deref() != Some("marketing_messages") {
            return Ok(None);
        }
        let value = p.value.as_deref().unwrap_or("");
        let status = match value {
            "stop" => Status::OptedOut,
            "resume" => Status::OptedIn,
            _ => return Ok(None), // "signup" and future values express no stop/resume
        };
        let (wa, bsuid) = (text_of(&p.wa_id), text_of(&p.user_id));
        let who = wa.clone().or_else(|| bsuid.clone());
        let identities = self.identities(wa, bsuid);
        let Some(first) = who.or_else(|| identities.first().map(identity_value)) else {
            return Err(Why::NoSender);
        };
        let at = self.time(&p.timestamp);
        // The dedup key is the preference's content: a redelivery has the same sender,
        // value and time. Without Meta's time, a resume is keyed by its content alone (a
        // repeat is dropped, which can only keep an opt-out); a stop by its receive time,
        // so a real second stop is never dropped (the core finds a repeat changes nothing).
        let when = match (p.timestamp.as_ref().and_then(Lenient::seconds), status) {
            (Some(_), _) => (at.millis() / 1000).to_string(),
            (None, Status::OptedIn) => "untimed".to_string(),
            (None, Status::OptedOut) => format!("received {}", at.millis()),
        };
        Ok(Some(ConsentEvent {
            identities,
            status: Some(status),
            signal: Signal::MarketingPreference,
            at,
            inbound: false,
            message_id: Some(format!("pref:{first}:{value}:{when}")),
            evidence: format!("user_preferences marketing_messages={value}"),
            language: None,
            scope: None,
            possible_opt_out: false,
        }))
    }
}

/// The two webhook fields that carry a template's category.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TemplateField {
    /// `template_category_update`: a change done, or announced a day ahead.
    CategoryUpdate,
    /// `message_template_status_update`: approved, rejected, paused…, with the category.
    StatusUpdate,
}

fn template_field(field: &str) -> Option<TemplateField> {
    match field {
        "template_category_update" => Some(TemplateField::CategoryUpdate),
        "message_template_status_update" => Some(TemplateField::StatusUpdate),
        _ => None,
    }
}

/// The value of a template notice (both fields share the `message_template_*` names).
#[derive(Deserialize)]
struct TemplateValue {
    event: Option<Lenient>,
    message_template_id: Option<Lenient>,
    message_template_name: Option<Lenient>,
    message_template_language: Option<Lenient>,
    message_template_category: Option<Lenient>,
    previous_category: Option<Lenient>,
    new_category: Option<Lenient>,
    correct_category: Option<Lenient>,
}

/// What a template notice says of the template's category. In an impending change
/// (`correct_category` present) `new_category` is the category the template has *now*, and
/// `correct_category` the one it will have in 24 hours.
fn template_category(
    v: TemplateValue,
    field: TemplateField,
    at: Timestamp,
) -> Result<Option<TemplateCategory>, Why> {
    let (category, upcoming, evidence) = match field {
        TemplateField::CategoryUpdate => {
            let Some(now) = text_of(&v.new_category) else {
                return Ok(None);
            };
            let upcoming = text_of(&v.correct_category);
            let evidence = match (&upcoming, text_of(&v.previous_category)) {
                (Some(next), _) => format!("template_category_update {now}, {next} announced"),
                (None, Some(prev)) => format!("template_category_update {prev} → {now}"),
                (None, None) => format!("template_category_update → {now}"),
            };
            (now, upcoming, evidence)
        }
        TemplateField::StatusUpdate => {
            let Some(category) = text_of(&v.message_template_category) else {
                return Ok(None);
            };
            let event = text_of(&v.event).unwrap_or_default();
            let evidence = format!(
                "message_template_status_update {} {category}",
                short(&event)
            );
            (category, None, evidence)
        }
    };
    // A category for no template cannot be kept: the operator sees it in the quarantine.
    let name = text_of(&v.message_template_name).ok_or(Why::Shape)?;
    Ok(Some(TemplateCategory {
        name,
        language: text_of(&v.message_template_language).unwrap_or_default(),
        category: short(&category),
        upcoming: upcoming.map(|u| short(&u)),
        at,
        id: text_of(&v.message_template_id),
        evidence,
    }))
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
    use serde_json::{Value, json};

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
        .filter_map(|o| match o {
            Observation::Event(e) => Some(e),
            Observation::IdentityChange(_) | Observation::TemplateCategory(_) => None,
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

    fn text_message(body: &str) -> Vec<u8> {
        envelope(
            "messages",
            json!({"messages": [{"from": "15551230000", "id": "wamid.T", "timestamp": "1700000000",
                "type": "text", "text": {"body": body}}]}),
        )
    }

    #[test]
    fn keywords_carry_their_scope_and_possible_opt_outs_decide_nothing() {
        let ev = &events(&text_message("Stop promotions"))[0];
        assert_eq!(ev.status, Some(Status::OptedOut));
        assert_eq!(ev.scope, Some(optout_core::Scope::Marketing));
        assert!(!ev.possible_opt_out);
        let ev = &events(&text_message("I want to opt out"))[0];
        assert_eq!((ev.status, ev.scope), (Some(Status::OptedOut), None));
        let ev = &events(&text_message(
            "stop sending me the catalogue, I want orders only",
        ))[0];
        assert_eq!(ev.status, None);
        assert!(ev.possible_opt_out);
        assert_eq!(ev.signal, Signal::Inbound);
        assert_eq!(ev.language.as_deref(), Some("en"));
        assert!(ev.evidence.contains("may be an opt-out"), "{}", ev.evidence);
        let ev = &events(&text_message("stop by the store"))[0];
        assert_eq!((ev.status, ev.possible_opt_out), (None, false));
        assert_eq!(ev.evidence, "inbound text");
        let button = envelope(
            "messages",
            json!({"messages": [{"from": "1", "id": "b", "timestamp": "1", "type": "button",
                "button": {"payload": "Detener promociones", "text": "Detener promociones"}}]}),
        );
        let ev = &events(&button)[0];
        assert_eq!(ev.signal, Signal::Button);
        assert_eq!(ev.scope, Some(optout_core::Scope::Marketing));
    }

    #[test]
    fn a_preference_is_keyed_by_its_content() {
        let pref = |value: &str, ts: Option<i64>| {
            let mut p = json!({"wa_id": "1555", "category": "marketing_messages", "value": value});
            if let Some(ts) = ts {
                p["timestamp"] = json!(ts);
            }
            envelope("user_preferences", json!({"user_preferences": [p]}))
        };
        let id = |b: &[u8]| events(b)[0].message_id.clone().unwrap();
        assert_eq!(id(&pref("stop", Some(5))), id(&pref("stop", Some(5))));
        assert_ne!(id(&pref("stop", Some(5))), id(&pref("stop", Some(6))));
        assert_eq!(id(&pref("resume", None)), "pref:1555:resume:untimed");
        // An untimed stop keeps its receive time: a real second stop is never dropped.
        assert!(id(&pref("stop", None)).starts_with("pref:1555:stop:received "));
    }
}
