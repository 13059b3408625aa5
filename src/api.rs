//! The consent write API's intake: what an event sent to `POST /v1/consent/events` must
//! hold, how it is recorded, and the worker that applies what was recorded.
//!
//! An event is checked first (identity, status, scope, time, source, evidence, key); a
//! good one is recorded with its idempotency key in the store's durable inbox, the same
//! path a WhatsApp webhook takes before its 200, and only then answered. The worker here
//! reads those entries back and applies them as observations of source `api`, like a
//! connector's page, so the decision, the audit entries and the pushes follow as for any
//! other observation. A crash between the answer and the apply loses nothing: the entry
//! stays in the inbox until its page and cursor are stored.

use std::sync::Arc;
use std::time::Duration;

use optout_core::{ConsentEvent, Identity, Observation, Scope, Signal, Status, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::policy::PolicyConfig;
use crate::reconcile::Engine;
use crate::store::{ApiKeyRecord, Claimed, KeyClaim};
use crate::workers::WorkerContext;

/// The source the API's observations are recorded under (a reserved connector name).
pub const SOURCE: &str = "api";
/// Events per request, at most.
pub const MAX_EVENTS: usize = 1000;
const MAX_SOURCE_CHARS: usize = 64;
const MAX_KEY_CHARS: usize = 200;
const MAX_EVIDENCE_CHARS: usize = 2000;

/// One event as a client sends it. Field order is the content's identity: the hash that
/// tells a retry from a different event under the same key is taken over this form.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRequest {
    /// A phone number in any format, `wa:<digits>` or a business-scoped user id.
    pub id: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// When the person acted (RFC 3339); the time received when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    /// Where the person acted: `preference-centre`, `call-centre`, `ivr`, …
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
    pub idempotency_key: String,
}

/// A checked event, as stored in the inbox until it is applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StoredEvent {
    identity: Identity,
    status: Status,
    scope: Scope,
    at: Timestamp,
    source: String,
    evidence: String,
    /// The hashed idempotency key: the observation's delivery id.
    key: String,
}

/// The answer for one event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ItemAnswer {
    /// `accepted`, `duplicate` or `rejected`.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Names the recording; a retry gets the first answer's receipt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorded_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The key was used before for a different event (HTTP 409 for a single event).
    #[serde(skip)]
    pub conflict: bool,
    /// Not recorded because the store failed: a retry may succeed (HTTP 503).
    #[serde(skip)]
    pub unavailable: bool,
}

impl ItemAnswer {
    fn rejected(key: Option<String>, error: String) -> Self {
        ItemAnswer {
            result: "rejected",
            idempotency_key: key,
            receipt: None,
            recorded_at: None,
            error: Some(error),
            conflict: false,
            unavailable: false,
        }
    }

    fn recorded(result: &'static str, key: String, r: &ApiKeyRecord) -> Self {
        ItemAnswer {
            result,
            idempotency_key: Some(key),
            receipt: Some(r.receipt.clone()),
            recorded_at: Some(r.recorded_at.to_rfc3339()),
            error: None,
            conflict: false,
            unavailable: false,
        }
    }
}

/// Checks, records (durably) and answers a request's events, in order.
pub async fn record(engine: &Engine, items: Vec<Value>, now: Timestamp) -> Vec<ItemAnswer> {
    let mut answers: Vec<Option<ItemAnswer>> = Vec::with_capacity(items.len());
    let mut claims = Vec::new();
    let mut keys = Vec::new();
    for item in items {
        match check(engine, item, now) {
            Ok((claim, key)) => {
                claims.push(claim);
                keys.push((answers.len(), key));
                answers.push(None);
            }
            Err((key, why)) => answers.push(Some(ItemAnswer::rejected(key, why))),
        }
    }
    if !claims.is_empty() {
        match engine.store().api_append(SOURCE, now, claims).await {
            Ok(claimed) => {
                for ((i, key), c) in keys.into_iter().zip(claimed) {
                    answers[i] = Some(answer(key, c));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record consent events from the write API");
                let why = format!("not recorded: the store failed ({e}); retry later");
                for (i, key) in keys {
                    let a = ItemAnswer::rejected(Some(key), why.clone());
                    answers[i] = Some(ItemAnswer {
                        unavailable: true,
                        ..a
                    });
                }
            }
        }
    }
    answers.into_iter().map(|a| a.expect("answered")).collect()
}

fn answer(key: String, c: Claimed) -> ItemAnswer {
    match c {
        Claimed::New(r) => ItemAnswer::recorded("accepted", key, &r),
        Claimed::Same(r) => ItemAnswer::recorded("duplicate", key, &r),
        Claimed::Conflict(_) => ItemAnswer {
            conflict: true,
            ..ItemAnswer::rejected(
                Some(key),
                "this idempotency key was used before for a different event".into(),
            )
        },
    }
}

/// A good event's claim on its key (and the key as sent), or why the event is refused.
fn check(
    engine: &Engine,
    item: Value,
    now: Timestamp,
) -> Result<(KeyClaim, String), (Option<String>, String)> {
    let key = (item.get("idempotency_key").and_then(Value::as_str)).map(|k| bounded(k, 80));
    let req: EventRequest =
        serde_json::from_value(item).map_err(|e| (key.clone(), e.to_string()))?;
    let stored = validate(engine, &req, now).map_err(|why| (key.clone(), why))?;
    let content = hex::encode(Sha256::digest(
        serde_json::to_vec(&req).expect("requests serialise"),
    ));
    let body = serde_json::to_vec(&stored).expect("events serialise");
    let claim = KeyClaim {
        key: stored.key.clone(),
        content,
        body,
    };
    Ok((claim, req.idempotency_key))
}

fn validate(engine: &Engine, r: &EventRequest, now: Timestamp) -> Result<StoredEvent, String> {
    let policy = engine.policy();
    let k = r.idempotency_key.trim();
    if k.is_empty() || k.chars().count() > MAX_KEY_CHARS {
        return Err(format!("idempotency_key: 1 to {MAX_KEY_CHARS} characters"));
    }
    let source = r.source.trim();
    let source_ok = (1..=MAX_SOURCE_CHARS).contains(&source.chars().count())
        && source
            .chars()
            .all(|c| c.is_alphanumeric() || "-_. :/".contains(c));
    if !source_ok {
        return Err(format!(
            "source: 1 to {MAX_SOURCE_CHARS} letters, digits, spaces or `-_.:/` (e.g. preference-centre)"
        ));
    }
    let evidence = r.evidence.as_deref().unwrap_or("").trim();
    if evidence.chars().count() > MAX_EVIDENCE_CHARS {
        return Err(format!("evidence: at most {MAX_EVIDENCE_CHARS} characters"));
    }
    let status = crate::import::parse_status(&r.status).ok_or_else(|| {
        format!(
            "status `{}`: use opted_out or opted_in",
            bounded(&r.status, 40)
        )
    })?;
    if status == Status::OptedIn && !accepts_opt_ins(policy) {
        return Err("opt-ins through the API are not accepted: list `api` in policy.accept_opt_ins_from to accept them".into());
    }
    let scope = match r.scope.as_deref().map(str::trim) {
        None | Some("all") => Scope::All,
        Some("marketing") => Scope::Marketing,
        Some(other) => {
            return Err(format!(
                "scope `{}`: use all or marketing",
                bounded(other, 40)
            ));
        }
    };
    let at = event_time(r.event_time.as_deref(), policy, now)?;
    let identity = identity(engine, &r.id)?;
    Ok(StoredEvent {
        identity,
        status,
        scope,
        at,
        source: source.to_string(),
        evidence: evidence.to_string(),
        key: hex::encode(&Sha256::digest(k.as_bytes())[..16]),
    })
}

/// The API's opt-ins count only when `policy.accept_opt_ins_from` names `api`: not listing
/// sources (every connector's opt-ins count) does not open this door.
fn accepts_opt_ins(policy: &PolicyConfig) -> bool {
    (policy.accept_opt_ins_from.as_ref()).is_some_and(|set| set.contains(SOURCE))
}

fn event_time(t: Option<&str>, policy: &PolicyConfig, now: Timestamp) -> Result<Timestamp, String> {
    let Some(t) = t else { return Ok(now) };
    let at = Timestamp::parse(t)
        .filter(|_| !t.trim().bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            format!(
                "event_time `{}`: use RFC 3339, e.g. 2024-05-01T10:00:00Z",
                bounded(t, 40)
            )
        })?;
    if at < policy.event_time_floor {
        return Err(format!(
            "event_time lies before the floor {} (policy.event_time_floor)",
            policy.event_time_floor
        ));
    }
    if at > now.plus(policy.future_tolerance) {
        return Err("event_time lies in the future".into());
    }
    Ok(at)
}

/// The identity an id names, as `lookup` and the send gate read ids; refused when it
/// names no one the store could hold (a number that is not one).
fn identity(engine: &Engine, id: &str) -> Result<Identity, String> {
    let s = id.trim();
    let identity = if let Some(w) = s.strip_prefix("wa:") {
        Identity::WaId(w.to_string())
    } else if s.contains('/') {
        return Err("id: a portfolio-scoped id (`portfolio/…`) cannot be written; send the phone number or wa: id".into());
    } else if s.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) && s.contains('.') {
        Identity::Bsuid(s.to_string())
    } else {
        Identity::Phone(s.to_string())
    };
    engine
        .normalizer()
        .aliases(&identity)
        .map_err(|why| format!("id: {why}"))?;
    Ok(identity)
}

fn bounded(s: &str, n: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(n).collect()
}

impl StoredEvent {
    /// The observation this event stands for. The signal carries the scope the caller
    /// chose; the record is the source name, so the audit log says where the person acted.
    fn observation(self) -> Observation {
        let evidence = if self.evidence.is_empty() {
            format!("{} (consent API)", self.source)
        } else {
            format!("{} (consent API): {}", self.source, self.evidence)
        };
        Observation::Event(ConsentEvent {
            identities: vec![self.identity],
            status: Some(self.status),
            signal: Signal::Api,
            at: self.at,
            inbound: false,
            message_id: Some(format!("{}#{}", self.source, self.key)),
            evidence,
            language: None,
            scope: Some(self.scope),
            possible_opt_out: false,
        })
    }
}

/// How often the worker looks at the inbox without being woken (a wake-up lost to a
/// restart costs at most this).
const SAFETY_TICK: Duration = Duration::from_secs(5);
/// Inbox entries (requests) applied per round.
const ENTRIES_PER_ROUND: usize = 16;

/// Applies recorded events: at start (what a crash left), after each request, and on a
/// safety tick. A failing store is retried on the next round.
pub async fn apply_worker(ctx: Arc<WorkerContext>, wake: Arc<Notify>) {
    loop {
        loop {
            let c = ctx.clone();
            let round = tokio::task::spawn_blocking(move || apply_round(&c)).await;
            match round {
                Ok(Ok(true)) => continue,
                Ok(Ok(false)) => break,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot apply consent API events yet; retrying");
                    break;
                }
                Err(_) => return,
            }
        }
        tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(SAFETY_TICK) => {}
        }
    }
}

/// Applies the next inbox entries of the API, each with its cursor in one transaction,
/// then trims them; returns whether there may be more.
fn apply_round(ctx: &WorkerContext) -> Result<bool, crate::store::StoreError> {
    let store = ctx.engine.store();
    let after: u64 = store
        .cursor(SOURCE)?
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let entries = store.inbox_after_where(after, ENTRIES_PER_ROUND, |t| t == Some(SOURCE))?;
    let Some(last) = entries.last().map(|(seq, _)| *seq) else {
        return Ok(false);
    };
    for (seq, rec) in &entries {
        let observations: Vec<Observation> = match serde_json::from_slice::<Vec<StoredEvent>>(
            &rec.body,
        ) {
            Ok(events) => events.into_iter().map(StoredEvent::observation).collect(),
            Err(e) => {
                // Written by this daemon; unreadable only if the store was tampered with.
                tracing::error!(error = %e, seq, "a recorded consent API entry is unreadable; skipped");
                Vec::new()
            }
        };
        let report = ctx.engine.apply_page(
            SOURCE,
            &observations,
            Some(&seq.to_string()),
            Timestamp::now(),
        )?;
        ctx.after_apply(SOURCE, &report);
    }
    store.inbox_trim_where(last, |t| t == Some(SOURCE))?;
    Ok(entries.len() == ENTRIES_PER_ROUND)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Normalizer;
    use crate::policy::Decision;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn engine(dir: &std::path::Path) -> Engine {
        Engine::new(
            crate::store::testing::open(dir),
            PolicyConfig::default(),
            Normalizer::new(Normalizer::parse_region("US").unwrap()),
            BTreeMap::new(),
        )
    }

    fn event(key: &str, evidence: &str) -> Value {
        json!({"id": "(415) 555-2671", "status": "STOP", "event_time": "2025-03-01T10:00:00Z",
               "source": "ivr", "evidence": evidence, "idempotency_key": key})
    }

    /// New keys are recorded together, a repeated key with the same event is a duplicate
    /// with the first receipt (also within one request), another event under it a
    /// conflict; only the new ones reach the inbox, and applying them decides.
    #[tokio::test]
    async fn keys_are_claimed_once_and_recorded_events_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let now = Timestamp::now();
        let first = record(
            &e,
            vec![event("a", "pressed 9"), event("a", "pressed 9")],
            now,
        )
        .await;
        let results: Vec<_> = first.iter().map(|a| a.result).collect();
        assert_eq!(results, ["accepted", "duplicate"]);
        assert_eq!(first[0].receipt, first[1].receipt);
        let again = record(
            &e,
            vec![event("a", "pressed 9"), event("a", "other"), event("b", "")],
            now,
        )
        .await;
        let results: Vec<_> = again.iter().map(|a| a.result).collect();
        assert_eq!(results, ["duplicate", "rejected", "accepted"]);
        assert!(again[1].conflict && !again[1].unavailable);
        assert_eq!(again[0].receipt, first[0].receipt);
        assert_eq!(
            e.store().inbox_len(),
            2,
            "one entry per request with new events"
        );

        let ctx = WorkerContext {
            engine: Arc::new(e),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            push_wakers: BTreeMap::new(),
            cancel: tokio_util::sync::CancellationToken::new(),
        };
        assert!(!apply_round(&ctx).unwrap(), "everything in one round");
        let store = ctx.engine.store();
        assert_eq!(store.inbox_len(), 0, "applied entries are trimmed");
        let s = store.subject_by_alias("p:+14155552671").unwrap().unwrap();
        assert_eq!(
            s.consent.decide(Scope::All, ctx.engine.policy().margin),
            Decision::OptedOut
        );
        let history = store.subject_audit(&s).unwrap();
        let accepted: Vec<_> = history
            .iter()
            .filter(|a| a.kind == crate::audit::AuditKind::Accepted)
            .collect();
        assert_eq!(accepted.len(), 2, "two acts (keys a and b): {history:?}");
        assert!(accepted.iter().all(|a| a.source == SOURCE));
        let evidence = accepted[0].evidence.as_deref().unwrap();
        assert!(
            evidence.ends_with("ivr (consent API): pressed 9"),
            "{evidence}"
        );
        assert!(!apply_round(&ctx).unwrap(), "nothing applied twice");
    }

    #[test]
    fn opt_ins_need_the_api_listed() {
        let mut p = PolicyConfig::default();
        assert!(
            !accepts_opt_ins(&p),
            "not listing sources does not admit the API"
        );
        p.accept_opt_ins_from = Some(["hubspot".to_string()].into());
        assert!(!accepts_opt_ins(&p));
        p.accept_opt_ins_from = Some(["api".to_string()].into());
        assert!(accepts_opt_ins(&p));
    }
}
