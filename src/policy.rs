//! The consent policy: pure code, no I/O, cannot fail.
//!
//! Per subject and scope we keep two registers — the latest opt-out and the latest
//! *accepted* opt-in — each chosen by event time, ties broken by a stable order of
//! (source, record, evidence) so the result never depends on arrival order. The decision:
//! opted out if there is an opt-out and the opt-in is absent or not later than
//! `opt_out.at + margin`; opted in if the opt-in is later than that; unknown if neither.
//! A tie or near-tie therefore goes to opt-out.
//!
//! The judging functions turn one observation into a [`Judgement`]: a [`Fact`] for the
//! registers, an echo of our own write, an unchanged re-read, an ignored opt-in, or an act
//! refused because its time lies before the event-time floor (with the reason, for the
//! audit log).
//!
//! Time is bounded on both sides: an event time further in the future than the tolerance
//! is clamped to the observed time, and one before the floor ([`EVENT_TIME_FLOOR`] by
//! default: WhatsApp did not exist before it) is no evidence at all. A 0, -1 or year-0001
//! timestamp is a sender's bug, not an act in 1970; taking it as one would also let it lose
//! every tie it should not be in.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::time::Duration;

use optout_core::{ConsentEvent, RecordSnapshot, Scope, Signal, Status, Timestamp};
use serde::{Deserialize, Serialize};

/// The policy's settings (from the `[policy]` section of the configuration).
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    /// An opt-in must be later than the opt-out by more than this to win.
    pub margin: Duration,
    /// Event times further than this in the future are clamped to the observed time.
    pub future_tolerance: Duration,
    /// Event times before this are refused as evidence (audited, not decided on).
    pub event_time_floor: Timestamp,
    /// Which scope each kind of signal affects.
    pub scopes: ScopeMap,
    /// Sources whose opt-ins count; `None` = every source.
    pub accept_opt_ins_from: Option<BTreeSet<String>>,
    /// How many opt-ins that lift a suppression one source may apply per window before
    /// the rest are held for an operator; `None` = no guard.
    pub opt_in_guard: Option<OptInGuard>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            margin: Duration::from_secs(5),
            future_tolerance: Duration::from_secs(300),
            event_time_floor: EVENT_TIME_FLOOR,
            scopes: ScopeMap::default(),
            accept_opt_ins_from: None,
            opt_in_guard: Some(OptInGuard::DEFAULT),
        }
    }
}

/// The default event-time floor, 2009-01-01T00:00:00Z: WhatsApp's founding. No consent
/// act any source reports can be older (HubSpot and Salesforce fields included); an
/// import of older records needs `policy.event_time_floor` set lower.
pub const EVENT_TIME_FLOOR: Timestamp = Timestamp(1_230_768_000_000);

impl PolicyConfig {
    pub fn accepts_opt_ins_from(&self, source: &str) -> bool {
        self.accept_opt_ins_from
            .as_ref()
            .is_none_or(|set| set.contains(source))
    }
}

/// Signal → scope. Defaults follow the product brief: keywords, buttons, CRM values and
/// imports are `all`; Meta's marketing preference and error 131050 are `marketing`. A
/// keyword or button payload configured with a scope of its own (the WhatsApp connector's
/// `keywords.scopes`; "Stop promotions" is `marketing` by default) overrides this map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScopeMap {
    pub keyword: Scope,
    pub button: Scope,
    pub marketing_preference: Scope,
    pub marketing_send_failure: Scope,
    pub crm_field: Scope,
    pub import: Scope,
}

impl Default for ScopeMap {
    fn default() -> Self {
        ScopeMap {
            keyword: Scope::All,
            button: Scope::All,
            marketing_preference: Scope::Marketing,
            marketing_send_failure: Scope::Marketing,
            crm_field: Scope::All,
            import: Scope::All,
        }
    }
}

impl ScopeMap {
    pub fn scope_for(&self, signal: Signal) -> Scope {
        match signal {
            Signal::Keyword => self.keyword,
            Signal::Button => self.button,
            Signal::MarketingPreference => self.marketing_preference,
            Signal::MarketingSendFailure => self.marketing_send_failure,
            Signal::CrmField => self.crm_field,
            Signal::Import => self.import,
            // The write API names the scope on each event; this is only its fallback.
            Signal::Api | Signal::Inbound | Signal::Erasure => Scope::All,
        }
    }
}

/// One consent fact that entered (or was offered to) the registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fact {
    pub status: Status,
    pub scope: Scope,
    /// Event time: when the person acted, by the source (clamped if in the future).
    pub at: Timestamp,
    /// The connector instance (or `import`) it came from.
    pub source: String,
    /// The record or message id in that source.
    pub record: String,
    pub signal: Signal,
    pub evidence: String,
}

impl Fact {
    /// The total order used by the registers: event time, then a stable tie-break that
    /// does not depend on arrival order.
    fn order(&self, other: &Fact) -> Ordering {
        (
            self.at,
            &self.source,
            &self.record,
            &self.evidence,
            self.signal,
        )
            .cmp(&(
                other.at,
                &other.source,
                &other.record,
                &other.evidence,
                other.signal,
            ))
    }

    /// `source:signal`, as written to CRM source fields.
    pub fn origin(&self) -> String {
        format!("{}:{}", self.source, self.signal.as_str())
    }
}

/// Latest opt-out and latest accepted opt-in of one scope.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registers {
    pub opt_out: Option<Fact>,
    pub opt_in: Option<Fact>,
}

impl Registers {
    /// Offers a fact; keeps it if it is later (by the register order). Returns whether
    /// the registers changed.
    pub fn record(&mut self, fact: &Fact) -> bool {
        let slot = match fact.status {
            Status::OptedOut => &mut self.opt_out,
            Status::OptedIn => &mut self.opt_in,
        };
        match slot {
            Some(cur) if cur.order(fact) != Ordering::Less => false,
            _ => {
                *slot = Some(fact.clone());
                true
            }
        }
    }

    pub fn merge(&mut self, other: &Registers) {
        for f in other.opt_out.iter().chain(other.opt_in.iter()) {
            self.record(f);
        }
    }

    pub fn decide(&self, margin: Duration) -> Decision {
        match (&self.opt_out, &self.opt_in) {
            (None, None) => Decision::Unknown,
            (Some(_), None) => Decision::OptedOut,
            (None, Some(_)) => Decision::OptedIn,
            (Some(out), Some(inn)) => {
                if inn.at > out.at.plus(margin) {
                    Decision::OptedIn
                } else {
                    Decision::OptedOut
                }
            }
        }
    }

    /// The fact behind the current decision.
    pub fn deciding(&self, margin: Duration) -> Option<&Fact> {
        match self.decide(margin) {
            Decision::OptedOut => self.opt_out.as_ref(),
            Decision::OptedIn => self.opt_in.as_ref(),
            Decision::Unknown => None,
        }
    }
}

/// A subject's consent: registers per scope.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    pub all: Registers,
    pub marketing: Registers,
}

impl Consent {
    pub fn registers(&self, scope: Scope) -> &Registers {
        match scope {
            Scope::All => &self.all,
            Scope::Marketing => &self.marketing,
        }
    }

    pub fn record(&mut self, fact: &Fact) -> bool {
        match fact.scope {
            Scope::All => self.all.record(fact),
            Scope::Marketing => self.marketing.record(fact),
        }
    }

    pub fn merge(&mut self, other: &Consent) {
        self.all.merge(&other.all);
        self.marketing.merge(&other.marketing);
    }

    pub fn decide(&self, scope: Scope, margin: Duration) -> Decision {
        self.registers(scope).decide(margin)
    }

    pub fn decisions(&self, margin: Duration) -> [(Scope, Decision); 2] {
        Scope::EVERY.map(|s| (s, self.decide(s, margin)))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    OptedOut,
    OptedIn,
    Unknown,
}

impl Decision {
    pub fn status(self) -> Option<Status> {
        match self {
            Decision::OptedOut => Some(Status::OptedOut),
            Decision::OptedIn => Some(Status::OptedIn),
            Decision::Unknown => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::OptedOut => "opted_out",
            Decision::OptedIn => "opted_in",
            Decision::Unknown => "unknown",
        }
    }
}

/// The send gate's answer for one subject and message category.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GateAnswer {
    pub allowed: bool,
    /// The scope whose decision blocked the message, if any.
    pub blocked_by: Option<Scope>,
    /// The fact behind the answer (the opt-out that blocks, or the opt-in that restored).
    pub evidence: Option<Fact>,
}

/// A message category the send gate knows: Meta's template categories, plus `service` for
/// free-form replies inside the 24-hour window. The set is closed on purpose: a category
/// the gate cannot name is refused (a 400), never guessed, so a misspelling cannot turn
/// into "allowed".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    Marketing,
    Utility,
    Authentication,
    Service,
}

impl Category {
    /// Every name [`Category::parse`] accepts (case-insensitive), with its category. Meta's
    /// names are aliases: `marketing_messages` (the Marketing Messages API and the
    /// `user_preferences` webhook), `marketing_lite` and `authentication_international`
    /// (pricing categories).
    pub const NAMES: [(&'static str, Category); 7] = [
        ("marketing", Category::Marketing),
        ("marketing_messages", Category::Marketing),
        ("marketing_lite", Category::Marketing),
        ("utility", Category::Utility),
        ("authentication", Category::Authentication),
        ("authentication_international", Category::Authentication),
        ("service", Category::Service),
    ];

    /// The category a name stands for, ignoring ASCII case only: no trimming, no
    /// guessing.
    pub fn parse(name: &str) -> Option<Category> {
        (Self::NAMES.iter())
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, c)| c)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Marketing => "marketing",
            Category::Utility => "utility",
            Category::Authentication => "authentication",
            Category::Service => "service",
        }
    }
}

/// May a message of `category` be sent? An `all` opt-out blocks every category; a
/// `marketing` opt-out blocks marketing only.
pub fn gate(consent: &Consent, category: Category, margin: Duration) -> GateAnswer {
    let blocked = |scope: Scope| GateAnswer {
        allowed: false,
        blocked_by: Some(scope),
        evidence: consent.registers(scope).opt_out.clone(),
    };
    if consent.all.decide(margin) == Decision::OptedOut {
        return blocked(Scope::All);
    }
    let marketing = category == Category::Marketing;
    if marketing && consent.marketing.decide(margin) == Decision::OptedOut {
        return blocked(Scope::Marketing);
    }
    let evidence = if marketing {
        consent
            .marketing
            .deciding(margin)
            .or(consent.all.deciding(margin))
    } else {
        consent.all.deciding(margin)
    };
    GateAnswer {
        allowed: true,
        blocked_by: None,
        evidence: evidence.cloned(),
    }
}

/// What the core remembers of one record between reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordMemory {
    /// The consent value last read from the record.
    pub last_seen: Option<Status>,
    /// The value (and change time) the daemon last wrote to it.
    pub last_pushed: Option<(Status, Timestamp)>,
    /// The value the daemon is writing now (an outbox entry not yet done): the push may
    /// have reached the record before its outcome was recorded. Not stored; filled from
    /// the outbox at judging time.
    #[serde(skip)]
    pub pending: Option<Status>,
}

/// The mass re-opt-in guard: at most `max` opt-ins that lift a suppression per source in
/// any window of `per` (estimated from two fixed windows, the previous one weighted by how
/// much of it still overlaps the sliding window). Once a source has an opt-in held, every
/// further one is held too until an operator resolves them: a bad import read over hours
/// must not leak `max` people per window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptInGuard {
    pub max: u64,
    pub per: Duration,
}

impl OptInGuard {
    /// 100 per hour per source: far above what people re-subscribe at by hand, far below
    /// what one bulk edit does.
    pub const DEFAULT: OptInGuard = OptInGuard {
        max: 100,
        per: Duration::from_secs(3600),
    };

    /// Decides one opt-in that would lift a suppression, from its source's window as
    /// stored; returns the verdict and the window to store back.
    pub fn judge(&self, w: GuardWindow, now: Timestamp) -> (GuardVerdict, GuardWindow) {
        let per = i64::try_from(self.per.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let bucket = now.millis().div_euclid(per);
        let mut w = match bucket - w.bucket {
            0 => w,
            1 => GuardWindow {
                bucket,
                previous: w.current,
                current: 0,
                ..w
            },
            _ => GuardWindow {
                bucket,
                previous: 0,
                current: 0,
                ..w
            },
        };
        // previous × (part of the previous window still inside the sliding one) + current,
        // compared with max, all scaled by `per` to stay in integers.
        let elapsed = u128::try_from(now.millis().rem_euclid(per)).unwrap_or(0);
        let per = u128::try_from(per).unwrap_or(1);
        let estimate = u128::from(w.previous) * (per - elapsed) + u128::from(w.current) * per;
        if w.held > 0 || estimate >= u128::from(self.max) * per {
            w.held += 1;
            (GuardVerdict::Hold, w)
        } else {
            w.current += 1;
            (GuardVerdict::Apply, w)
        }
    }
}

/// One source's guard counts, kept in the store so a restart resets nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardWindow {
    /// The current fixed window's number (`now / per`).
    pub bucket: i64,
    /// Opt-ins applied in the current and in the previous window.
    pub current: u64,
    pub previous: u64,
    /// Opt-ins held and not yet resolved.
    pub held: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardVerdict {
    Apply,
    Hold,
}

/// Whether recording `fact` would lift a suppression of `consent` (an opted-out scope
/// becoming opted in): what the guard counts. Other opt-ins change nobody's gate answer.
pub fn lifts_suppression(consent: &Consent, fact: &Fact, margin: Duration) -> bool {
    if fact.status != Status::OptedIn {
        return false;
    }
    let before = consent.decide(fact.scope, margin);
    let mut after = consent.clone();
    after.record(fact);
    before == Decision::OptedOut && after.decide(fact.scope, margin) == Decision::OptedIn
}

/// What one observation amounts to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// A consent fact for the registers.
    Fact(Fact),
    /// An opt-in from a source whose opt-ins are not accepted: audited, not decided on.
    NotAccepted(Fact, String),
    /// An act whose time lies before the event-time floor: audited, not decided on.
    Refused(Fact, String),
    /// A read-back of what the daemon itself wrote: confirms the push, decides nothing.
    Echo(Status),
    /// The record still holds the value last seen.
    Unchanged,
    /// The first value seen on a record is an opt-in: not a change, so not an act.
    InitialOptIn,
    /// Nothing about consent (an empty field, an ordinary inbound message).
    NoConsentValue,
}

/// Clamps an event time that lies in the future beyond the tolerance to the observed time.
pub fn clamp(at: Timestamp, observed: Timestamp, tolerance: Duration) -> Timestamp {
    if at > observed.plus(tolerance) {
        observed
    } else {
        at
    }
}

/// Judges a CRM record read: only a *change* of value counts, and a value equal to what
/// we last wrote is an echo.
pub fn judge_record(
    memory: Option<&RecordMemory>,
    snap: &RecordSnapshot,
    source: &str,
    observed: Timestamp,
    cfg: &PolicyConfig,
) -> Judgement {
    let Some(value) = snap.value else {
        return Judgement::NoConsentValue;
    };
    let last_seen = memory.and_then(|m| m.last_seen);
    let last_pushed = memory.and_then(|m| m.last_pushed);
    if last_seen == Some(value) {
        return Judgement::Unchanged;
    }
    let pending = memory.and_then(|m| m.pending);
    if last_pushed.map(|(s, _)| s) == Some(value) || pending == Some(value) {
        return Judgement::Echo(value);
    }
    // A first value of opted_in is not an act; but if the daemon wrote the record before
    // (and no read showed it yet), the earlier value is known and this is a change.
    if value == Status::OptedIn && last_seen.is_none() && last_pushed.is_none() {
        return Judgement::InitialOptIn;
    }
    // The companion change-time field is trusted only when someone other than us set it:
    // if it still holds the time we wrote, the value changed without it (a bulk edit, an
    // import), and the record's modification time is the better witness.
    // A change time before the floor is no witness either (a date field set to 0001 by
    // hand): the record's own modification time stands in, and is itself checked.
    let our_stamp = last_pushed.map(|(_, t)| t);
    let at = match snap.changed_at {
        Some(t) if Some(t) != our_stamp && t >= cfg.event_time_floor => t,
        _ => snap.modified_at,
    };
    let fact = Fact {
        status: value,
        scope: cfg.scopes.scope_for(Signal::CrmField),
        at: clamp(at, observed, cfg.future_tolerance),
        source: source.to_string(),
        record: snap.record.clone(),
        signal: Signal::CrmField,
        evidence: snap.evidence.clone(),
    };
    offer(fact, cfg)
}

/// Judges a customer's act reported by a channel.
pub fn judge_event(
    ev: &ConsentEvent,
    source: &str,
    observed: Timestamp,
    cfg: &PolicyConfig,
) -> Judgement {
    let Some(status) = ev.status else {
        return Judgement::NoConsentValue;
    };
    let fact = Fact {
        status,
        scope: event_scope(ev, cfg),
        at: clamp(ev.at, observed, cfg.future_tolerance),
        source: source.to_string(),
        record: ev.message_id.clone().unwrap_or_default(),
        signal: ev.signal,
        evidence: ev.evidence.clone(),
    };
    offer(fact, cfg)
}

/// The scope of a channel's act: the one its keyword or button payload is configured for
/// ("Stop promotions" → `marketing`), else the policy's scope for its kind of signal.
pub fn event_scope(ev: &ConsentEvent, cfg: &PolicyConfig) -> Scope {
    ev.scope.unwrap_or_else(|| cfg.scopes.scope_for(ev.signal))
}

/// Whether an accepted fact only repeats the subject's current decision for its scope
/// through Meta's marketing preference (a `user_preferences` stop while stopped): it
/// changes no decision and earns nothing to push.
pub fn repeats_preference(consent: &Consent, fact: &Fact, margin: Duration) -> bool {
    fact.signal == Signal::MarketingPreference
        && consent.decide(fact.scope, margin).status() == Some(fact.status)
}

fn offer(fact: Fact, cfg: &PolicyConfig) -> Judgement {
    if fact.at < cfg.event_time_floor {
        let why = format!(
            "event time {} lies before the floor {}: refused as evidence",
            fact.at, cfg.event_time_floor
        );
        return Judgement::Refused(fact, why);
    }
    if fact.status == Status::OptedIn && !cfg.accepts_opt_ins_from(&fact.source) {
        let why = format!("opt-ins from {} are not accepted", fact.source);
        return Judgement::NotAccepted(fact, why);
    }
    Judgement::Fact(fact)
}

/// The value a CRM record linked to these subjects' decisions should hold. An opt-out of
/// any linked subject wins (a record holding an opted-out number must be suppressed).
pub fn desired_record_value<'a>(
    subjects: impl IntoIterator<Item = &'a Consent>,
    margin: Duration,
) -> Option<Fact> {
    let mut opted_in: Option<&Fact> = None;
    for consent in subjects {
        match consent.all.decide(margin) {
            Decision::OptedOut => return consent.all.opt_out.clone(),
            Decision::OptedIn => opted_in = opted_in.or(consent.all.opt_in.as_ref()),
            Decision::Unknown => {}
        }
    }
    opted_in.cloned()
}

/// The value a record's marketing-consent field should hold. Marketing is blocked whenever
/// all messages are: an `all` opt-out of any linked subject, or a `marketing` opt-out, makes
/// it opted out; otherwise a `marketing` opt-in, or an `all` opt-in where marketing has no
/// decision of its own, makes it opted in.
pub fn desired_marketing_value<'a>(
    subjects: impl IntoIterator<Item = &'a Consent>,
    margin: Duration,
) -> Option<Fact> {
    let mut opted_in: Option<&Fact> = None;
    for consent in subjects {
        let all = consent.all.decide(margin);
        if all == Decision::OptedOut {
            return consent.all.opt_out.clone();
        }
        match consent.marketing.decide(margin) {
            Decision::OptedOut => return consent.marketing.opt_out.clone(),
            Decision::OptedIn => opted_in = opted_in.or(consent.marketing.opt_in.as_ref()),
            Decision::Unknown if all == Decision::OptedIn => {
                opted_in = opted_in.or(consent.all.opt_in.as_ref())
            }
            Decision::Unknown => {}
        }
    }
    opted_in.cloned()
}

/// Whether an accepted fact earns the customer a confirmation reply: only a keyword or
/// button the customer sent on WhatsApp.
pub fn wants_confirmation(fact: &Fact) -> bool {
    matches!(fact.signal, Signal::Keyword | Signal::Button)
}

#[cfg(test)]
mod guard_tests;
#[cfg(test)]
mod tests;
