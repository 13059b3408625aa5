//! The vocabulary shared by connectors and the core: what a connector reads
//! ([`Observation`] inside a [`Page`]) and what it is asked to write ([`PushItem`]).
//!
//! Connectors report facts as the source shows them (raw phone strings, the source's own
//! clock); normalising identities and deciding are the core's job.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// A point in time in milliseconds since the Unix epoch, UTC.
///
/// Milliseconds because HubSpot and Salesforce report milliseconds and ties at that
/// resolution are real (thousands of records can share one `lastmodifieddate`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const MIN: Timestamp = Timestamp(i64::MIN);

    pub fn now() -> Self {
        Timestamp(Utc::now().timestamp_millis())
    }

    pub fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    pub fn from_secs(s: i64) -> Self {
        Timestamp(s.saturating_mul(1000))
    }

    pub fn millis(self) -> i64 {
        self.0
    }

    pub fn plus(self, d: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_add(d.as_millis().min(i64::MAX as u128) as i64),
        )
    }

    pub fn minus(self, d: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_sub(d.as_millis().min(i64::MAX as u128) as i64),
        )
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }

    pub fn to_datetime(self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.0)
            .single()
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// RFC 3339 with milliseconds and `Z`, the form HubSpot and our audit log use.
    pub fn to_rfc3339(self) -> String {
        self.to_datetime()
            .to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    /// Parses RFC 3339 and the near-misses vendors send: Salesforce's `+0000` offset
    /// without a colon, a missing offset (taken as UTC), a bare date, or epoch
    /// milliseconds as digits (HubSpot date properties).
    pub fn parse(s: &str) -> Option<Timestamp> {
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse::<i64>().ok().map(Timestamp);
        }
        if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
            return Some(Timestamp(dt.timestamp_millis()));
        }
        for fmt in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%dT%H:%M:%S%z"] {
            if let Ok(dt) = DateTime::parse_from_str(s, fmt) {
                return Some(Timestamp(dt.timestamp_millis()));
            }
        }
        for fmt in [
            "%Y-%m-%dT%H:%M:%S%.f",
            "%Y-%m-%d %H:%M:%S%.f",
            "%Y-%m-%d %H:%M:%S",
        ] {
            if let Ok(dt) = NaiveDateTime::parse_from_str(s, fmt) {
                return Some(Timestamp(dt.and_utc().timestamp_millis()));
            }
        }
        if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            return Some(Timestamp(
                d.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis(),
            ));
        }
        None
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// A consent value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    OptedOut,
    OptedIn,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::OptedOut => "opted_out",
            Status::OptedIn => "opted_in",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a consent decision covers. `All` blocks every category of message;
/// `Marketing` blocks marketing messages only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    All,
    Marketing,
}

impl Scope {
    pub const EVERY: [Scope; 2] = [Scope::All, Scope::Marketing];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::All => "all",
            Scope::Marketing => "marketing",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of act an observation reports. The consent policy (not the connector) maps a
/// signal to a [`Scope`], so operators configure scopes in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// The customer typed a keyword (STOP, START…).
    Keyword,
    /// The customer tapped a button (template quick reply, interactive reply).
    Button,
    /// Meta's own marketing preference (`user_preferences` stop/resume).
    MarketingPreference,
    /// A send failed because the customer stopped marketing messages (error 131050).
    MarketingSendFailure,
    /// A CRM record's consent field.
    CrmField,
    /// A row of an imported suppression list.
    Import,
    /// An act reported through the daemon's consent write API (a preference centre, a
    /// call-centre agent, an IVR); the scope the caller named is the event's own.
    Api,
    /// A message that says nothing about consent (it only opens the 24-hour window).
    Inbound,
    /// The suppression an erased person left behind (their tombstone), met again.
    Erasure,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Keyword => "keyword",
            Signal::Button => "button",
            Signal::MarketingPreference => "marketing_preference",
            Signal::MarketingSendFailure => "marketing_send_failure",
            Signal::CrmField => "crm_field",
            Signal::Import => "import",
            Signal::Api => "api",
            Signal::Inbound => "inbound",
            Signal::Erasure => "erasure",
        }
    }
}

/// One way a source names a person. Values are raw, as the source sent them; the core
/// normalises phone numbers to E.164 and links identities seen together.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Identity {
    /// A phone number in any format (CRM free text, `+1 (555) …`).
    Phone(String),
    /// A WhatsApp `wa_id`: the phone number's digits as WhatsApp knows them.
    WaId(String),
    /// A WhatsApp business-scoped user id (`user_id`, e.g. `US.13491208655302741918`).
    Bsuid(String),
}

/// A customer's own act on a messaging channel, as reported by that channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentEvent {
    /// Every identity the source showed for the sender; the core links them to one subject.
    pub identities: Vec<Identity>,
    /// The consent value the act expresses; `None` for a message that says nothing about
    /// consent (it still opens the 24-hour reply window).
    pub status: Option<Status>,
    pub signal: Signal,
    /// When the person acted, by the source's clock.
    pub at: Timestamp,
    /// True when the customer sent a message to us (opens the 24-hour window).
    pub inbound: bool,
    /// The source's id for the act (`wamid…`); duplicate deliveries share it.
    pub message_id: Option<String>,
    /// What was seen, for the audit log (keyword text, button payload, error code).
    pub evidence: String,
    /// Language of the matched keyword, if known (chooses the confirmation text).
    pub language: Option<String>,
    /// The scope the source attributes to this act (a keyword or button payload configured
    /// as `marketing`, such as Meta's "Stop promotions"); `None` leaves it to the policy's
    /// scope for the signal. Absent in data stored before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// The message may be an opt-out but is not clearly one (a revocation word in a
    /// sentence): recorded for review and answered with a clarification, never applied.
    /// `status` is `None`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub possible_opt_out: bool,
}

/// The state of one CRM record as read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordSnapshot {
    /// The record's id, unique within the connector instance (e.g. `Contact/003xx…`).
    pub record: String,
    /// Raw values of every configured phone field that is not empty.
    pub phones: Vec<String>,
    /// The consent field's value; `None` when empty or not set.
    pub value: Option<Status>,
    /// The marketing-consent field's value, for a connector configured with one (it
    /// carries the `marketing` decision); `None` when empty, not set or not configured.
    #[serde(default)]
    pub marketing: Option<Status>,
    /// The companion change-time field, when the system has one and it is set.
    pub changed_at: Option<Timestamp>,
    /// The record's modification time by the server's clock.
    pub modified_at: Timestamp,
    /// What was read, for the audit log (`whatsapp_consent=opted_out`).
    pub evidence: String,
}

/// One fact read from one system.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Observation {
    Event(ConsentEvent),
    Record(RecordSnapshot),
    IdentityChange(IdentityChange),
    TemplateCategory(TemplateCategory),
}

/// A message template's category as the channel announced it (WhatsApp's template
/// webhooks), or as configured for a template approved before the daemon started. The core
/// keeps each template's newest category and gates sends of it by that category.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateCategory {
    /// The template's name, as a send names it.
    pub name: String,
    /// Its language code (`en_US`); empty for a configured category that holds for every
    /// language of the name.
    pub language: String,
    /// The category as the channel names it (`MARKETING`, `UTILITY`, `AUTHENTICATION`).
    pub category: String,
    /// A category the channel announced the template will move to (Meta warns a day
    /// ahead); the core may gate by it already when it is the stricter one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upcoming: Option<String>,
    /// When the channel announced it, by its clock; [`Timestamp::MIN`] for a configured
    /// category, which any announcement replaces.
    pub at: Timestamp,
    /// The channel's id for the template, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// What was seen, for the audit log (`template_category_update UTILITY → MARKETING`).
    pub evidence: String,
}

/// What changed about a person's identity on a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The person moved to a new phone number (WhatsApp `user_changed_number`). The old
    /// number may be given to someone else, so the two are not merged: the person's
    /// opt-outs are copied to the new number and the old number keeps its own.
    Number,
    /// The person's business-scoped user id changed (`user_changed_user_id`): the old and
    /// new ids name the same person and are linked.
    UserId,
}

/// A channel's notice that a person's identity changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityChange {
    pub kind: ChangeKind,
    /// The identities the person had (the notice's sender).
    pub from: Vec<Identity>,
    /// The identities the person has now.
    pub to: Vec<Identity>,
    /// When the change happened, by the source's clock.
    pub at: Timestamp,
    /// The source's id for the notice; duplicate deliveries share it.
    pub message_id: Option<String>,
}

/// A connector's position in its source. Opaque to the core, which stores it only in the
/// same transaction as the effects of the page that produced it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cursor(pub String);

/// How far a long read (a full sync) has come, for progress reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: Option<u64>,
}

/// What one `poll` returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    pub observations: Vec<Observation>,
    /// The position after this page; saved together with the page's effects.
    pub cursor: Cursor,
    /// True when the source has more to read right now (poll again without waiting).
    pub more: bool,
    pub progress: Option<Progress>,
}

/// A confirmation reply to a customer's WhatsApp message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The recipient: a `wa_id` or, for username users, a BSUID.
    pub to: Identity,
    /// The message being answered; a confirmation is sent at most once per message.
    pub in_reply_to: String,
    /// End of the 24-hour customer service window; nothing is sent after it.
    pub window_ends: Timestamp,
    pub language: Option<String>,
    /// A clarification ("Reply STOP to stop all messages") to a possible opt-out, not a
    /// confirmation of a decision.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clarify: bool,
}

/// One desired write to one target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushItem {
    /// The outbox key within the connector: a newer desired value for the same key
    /// replaces an older pending one.
    pub key: String,
    /// The record to write (CRM record id, as reported in [`RecordSnapshot::record`]).
    pub record: String,
    /// The value the record should hold.
    pub status: Status,
    pub scope: Scope,
    /// Event time of the deciding observation (written to the change-time field).
    pub changed_at: Timestamp,
    /// Where the deciding observation came from (`whatsapp:keyword`), for the source field.
    pub source: String,
    /// The core's subject id, for logs and outbound events.
    pub subject: String,
    /// Identities of the subject (E.164 numbers, BSUIDs), for outbound events.
    pub identities: Vec<Identity>,
    /// Set for WhatsApp confirmation replies only.
    pub reply: Option<Reply>,
}

/// The result of pushing one item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum PushOutcome {
    /// The target holds the value now.
    Done,
    /// Not applied this time; try again (after the hint, if any).
    RetryLater {
        #[serde(with = "opt_duration_ms")]
        after: Option<Duration>,
        reason: String,
    },
    /// The target refused the item for good (record deleted, validation error); it goes to
    /// the dead letters and is shown to the operator.
    Rejected { reason: String },
}

mod opt_duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vendor_timestamps() {
        let sf = Timestamp::parse("2013-05-20T20:49:32.000+0000").unwrap();
        let rfc = Timestamp::parse("2013-05-20T20:49:32Z").unwrap();
        assert_eq!(sf, rfc);
        assert_eq!(
            Timestamp::parse("1572480000000"),
            Some(Timestamp(1572480000000))
        );
        assert_eq!(
            Timestamp::parse("2025-07-07T20:27:17.947Z")
                .unwrap()
                .millis()
                % 1000,
            947
        );
        assert_eq!(
            Timestamp::parse("2024-01-02").unwrap(),
            Timestamp::parse("2024-01-02T00:00:00Z").unwrap()
        );
        assert!(Timestamp::parse("yesterday").is_none());
        assert_eq!(rfc.to_rfc3339(), "2013-05-20T20:49:32.000Z");
    }
}
