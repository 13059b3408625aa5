//! The HTTP listener (axum): health, readiness, metrics, and the send gate. The WhatsApp
//! connector's webhook routes are merged in by the daemon.
//!
//! The send gate answers "may we message this person, in this category?" for the systems
//! that send. It reads the store and never creates anything. It needs the bearer token
//! from `daemon.gate_token`; without one configured it is off. The token is checked before
//! any body is read, and a category the gate does not know is a 400, never "allowed".
//! A `template` is judged by its current category (`reconcile::templates`); a template
//! the store knows no category of is a 400 naming it, never "allowed".
//!
//! Every request passes [`guard_request`]: its body gets a deadline (`daemon.body_timeout`,
//! 408 after it) and waits its turn to be read, and webhook refusals for a bad signature
//! are counted and logged at a bounded rate ([`refusals`]). Connections are accepted and
//! limited in [`serve`]. The write API's routes (their own token) are in [`write`].

mod refusals;
mod serve;
pub mod write;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use optout_core::{Scope, Secret};
use optout_whatsapp::webhook::SignatureRefused;
use serde::Deserialize;
use serde_json::json;

use crate::metrics::Metrics;
use crate::policy::{self, Category, Consent};
use crate::reconcile::{Engine, subject_name};
use crate::report::{GateBatchReply, GateReply};
use crate::store::StoreError;

pub use refusals::Refusals;
pub use serve::{AcceptBackoff, Limits, connection_budget, descriptor_limit, serve};

/// State shared by the handlers.
pub struct HttpState {
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    pub gate_token: Option<Secret>,
    /// True once the store is open and listeners are bound; false again while stopping.
    pub ready: Arc<AtomicBool>,
    /// Refreshes store-derived gauges before a scrape.
    pub refresh: Arc<dyn Fn(&Metrics) + Send + Sync>,
}

/// The largest batch request body: 1,000 identifiers with room to spare. Larger ones are
/// refused from their `Content-Length` (or while reading, if they did not announce it).
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// The daemon's routes plus the connectors' (`routes`), behind [`guard_request`].
pub fn app(state: Arc<HttpState>, routes: Vec<Router>, guard: Arc<Guard>) -> Router {
    let own = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/v1/consent/batch",
            post(gate_batch).layer(DefaultBodyLimit::max(MAX_BATCH_BYTES)),
        )
        .route("/v1/consent/{id}", get(gate_one))
        .with_state(state);
    (routes.into_iter())
        .fold(own, Router::merge)
        .layer(axum::middleware::from_fn_with_state(guard, guard_request))
}

/// What [`guard_request`] needs.
pub struct Guard {
    pub body_timeout: Duration,
    pub refusals: Refusals,
    /// Read permits for request bodies ([`serve::MAX_BODIES_READ`]).
    readers: Arc<tokio::sync::Semaphore>,
}

impl Guard {
    pub fn new(body_timeout: Duration, refusals: Refusals) -> Self {
        Guard {
            body_timeout,
            refusals,
            readers: Arc::new(tokio::sync::Semaphore::new(serve::MAX_BODIES_READ)),
        }
    }
}

/// Every request: a deadline on its body, and the accounting of signature refusals.
async fn guard_request(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let peer = serve::peer(&req).map(|a: SocketAddr| a.ip());
    let expired = Arc::new(AtomicBool::new(false));
    let within = g.body_timeout;
    let flag = expired.clone();
    let readers = g.readers.clone();
    let req = req.map(|b| Body::new(serve::DeadlineBody::new(b, within, flag, readers)));
    let mut response = next.run(req).await;
    if expired.load(Ordering::Acquire) {
        let msg = format!(
            "request body not received within {}",
            humantime::format_duration(within)
        );
        return (
            StatusCode::REQUEST_TIMEOUT,
            [(header::CONNECTION, "close")],
            msg,
        )
            .into_response();
    }
    if let Some(r) = response.extensions_mut().remove::<SignatureRefused>() {
        g.refusals.record(peer, &r);
    }
    response
}

async fn readyz(State(s): State<Arc<HttpState>>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(s): State<Arc<HttpState>>) -> Response {
    let st = s.clone();
    let body = tokio::task::spawn_blocking(move || st.metrics.render(|m| (st.refresh)(m)))
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[derive(Deserialize)]
struct GateQuery {
    category: Option<String>,
    template: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    category: Option<String>,
    template: Option<String>,
    ids: Vec<String>,
}

/// What a request asks to be judged by: a category, or a template's current category.
enum Asked {
    Category(Category),
    Template(String),
}

fn bad_request(body: serde_json::Value) -> Box<Response> {
    Box::new((StatusCode::BAD_REQUEST, Json(body)).into_response())
}

fn unavailable(error: &str) -> Box<Response> {
    Box::new(
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": error})),
        )
            .into_response(),
    )
}

/// A category or a template, not both: a template's category is the store's to say.
fn asked(category: Option<&str>, template: Option<&str>) -> Result<Asked, Box<Response>> {
    match (category, template) {
        (Some(_), Some(_)) => Err(bad_request(json!({"error":
            "give either category or template, not both: a template is judged by its current category"}))),
        (_, Some("")) => Err(bad_request(json!({"error": "empty template name"}))),
        (_, Some(t)) => Ok(Asked::Template(t.to_string())),
        (c, None) => self::category(c).map(Asked::Category),
    }
}

/// The category to judge by, and the template it is of. Reads the store: call it off the
/// async threads. An unknown template is a 400 naming it; a store error a 503 (the gate
/// fails closed).
fn judged(engine: &Engine, asked: &Asked) -> Result<(Category, Option<String>), Box<Response>> {
    let name = match asked {
        Asked::Category(c) => return Ok((*c, None)),
        Asked::Template(name) => name,
    };
    match crate::reconcile::templates::lookup(engine.store(), name) {
        Ok(Some((c, _))) => Ok((c, Some(name.clone()))),
        Ok(None) => {
            let shown: String = name.chars().take(128).collect();
            Err(bad_request(json!({
                "error": format!("unknown template {shown:?}: no category of it is known (from WhatsApp's template webhooks or connectors.<whatsapp>.templates)"),
                "unknown_template": shown,
            })))
        }
        Err(e) => Err(Box::new(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": format!("store error: {e}")})),
            )
                .into_response(),
        )),
    }
}

const MAX_BATCH: usize = 1000;

/// The category a request names; none means marketing, the strictest common case. An
/// unknown name (a typo, an empty value, a trailing space) is a 400 with the known set.
fn category(name: Option<&str>) -> Result<Category, Box<Response>> {
    let Some(name) = name else {
        return Ok(Category::Marketing);
    };
    Category::parse(name).ok_or_else(|| {
        let shown: String = name.chars().take(64).collect();
        let known: Vec<&str> = Category::NAMES.iter().map(|(n, _)| *n).collect();
        let error = format!(
            "unknown category {shown:?}: use one of {} (any case)",
            known.join(", ")
        );
        Box::new((StatusCode::BAD_REQUEST, Json(json!({"error": error}))).into_response())
    })
}

fn authorize(s: &HttpState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &s.gate_token else {
        return Err(Box::new(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "the send gate is off: set daemon.gate_token"})),
            )
                .into_response(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
        Ok(())
    } else {
        Err(Box::new(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({"error": "missing or wrong bearer token"})),
            )
                .into_response(),
        ))
    }
}

/// The token of `Bearer <token>`; the scheme is case-insensitive (RFC 9110, 11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

/// Compares without an early exit, so response time says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

/// Why the gate found no subject to judge.
enum Unanswered {
    NotAnId(String),
    Store(StoreError),
}

/// A gate read of the store: an alias's live subject and its consent registers.
type Found = Result<Option<(u64, Consent)>, StoreError>;

/// The subject an identifier belongs to, if any, read with `read`. A canonical E.164
/// number (`+` and 8–15 digits, how senders hold numbers) is first looked up as stored,
/// before any parsing: an alias in the store was normalised when it was written, so a hit
/// is what the full parse would find. A miss falls back to the parse (unknown, or not a
/// number).
fn find_subject(
    engine: &Engine,
    read: &impl Fn(&str) -> Found,
    id: &str,
) -> Result<Option<(u64, Consent)>, Unanswered> {
    let digits = id.strip_prefix('+').unwrap_or("");
    if (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
        let mut alias = String::with_capacity(id.len() + 2);
        alias.push_str("p:");
        alias.push_str(id);
        if let Some(s) = read(&alias).map_err(Unanswered::Store)? {
            return Ok(Some(s));
        }
    }
    let aliases = engine
        .normalizer()
        .parse_query(id)
        .map_err(Unanswered::NotAnId)?;
    for a in &aliases {
        if let Some(s) = read(a.as_str()).map_err(Unanswered::Store)? {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// The gate's answer for one identifier, reading the store with `read`.
fn answer(
    engine: &Engine,
    read: &impl Fn(&str) -> Found,
    id: &str,
    category: Category,
) -> GateReply {
    let base = GateReply {
        id: id.to_string(),
        ..GateReply::default()
    };
    let subject = match find_subject(engine, read, id) {
        Ok(s) => s,
        Err(Unanswered::NotAnId(e)) => {
            return GateReply {
                error: Some(format!("not an identifier: {e}")),
                ..base
            };
        }
        // Fail closed: a store error never says "allowed".
        Err(Unanswered::Store(e)) => return store_error(base, &e),
    };
    let base = GateReply {
        category: Some(category.as_str().to_string()),
        ..base
    };
    let Some((subject, consent)) = subject else {
        return erased_or_unknown(engine, id, base);
    };
    let margin = engine.policy().margin;
    let g = policy::gate(&consent, category, margin);
    let decisions = (Scope::EVERY.iter())
        .map(|&sc| {
            (
                sc.as_str().to_string(),
                consent.decide(sc, margin).as_str().to_string(),
            )
        })
        .collect();
    GateReply {
        allowed: Some(g.allowed),
        known: Some(true),
        subject: Some(subject_name(subject)),
        blocked_by: g.blocked_by.map(|sc| sc.as_str().to_string()),
        decisions: Some(decisions),
        evidence: g.evidence.and_then(|f| serde_json::to_value(f).ok()),
        ..base
    }
}

/// No subject holds the identifier: an erased person's suppression still blocks (their
/// tombstone); anyone else is unknown, and allowed.
fn erased_or_unknown(engine: &Engine, id: &str, base: GateReply) -> GateReply {
    let aliases = engine.normalizer().parse_query(id).unwrap_or_default();
    match engine.tombstone_of(&aliases) {
        Ok(Some((_, t))) if t.suppressed => GateReply {
            allowed: Some(false),
            known: Some(true),
            blocked_by: Some(Scope::All.as_str().to_string()),
            evidence: Some(
                json!({"source": crate::reconcile::ERASURE_SOURCE, "erased_at": t.erased_at}),
            ),
            ..base
        },
        Ok(_) => GateReply {
            allowed: Some(true),
            known: Some(false),
            ..base
        },
        // Fail closed, as for any store error.
        Err(e) => store_error(base, &e),
    }
}

/// The answer when the store failed: never "allowed".
fn store_error(base: GateReply, e: &StoreError) -> GateReply {
    GateReply {
        allowed: Some(false),
        error: Some(format!("store error: {e}")),
        ..base
    }
}

/// Single gate lookups reading the store on an async worker thread right now.
static ON_WORKERS: AtomicUsize = AtomicUsize::new(0);

/// Leave to read the store on this async worker thread instead of the blocking pool. A
/// single lookup is one or two sled reads of cached (or page-cached) data, microseconds;
/// the hand-off to the blocking pool and back (thread wake-ups, the pool's lock) cost
/// more than the read itself: about a third of the daemon's CPU per lookup when profiled
/// at 32 connections. All workers but one may hold a slot, so reads stalled on a failing
/// disk can never hold every worker; without a free slot the lookup goes to the pool.
struct WorkerSlot;

/// Times a lookup lets other tasks run before it gives up waiting for a [`WorkerSlot`].
const SLOT_TRIES: usize = 4;

impl WorkerSlot {
    /// A slot, letting this worker's other tasks run while none is free: a slot is held
    /// for one read, so one is usually free again after a turn (cheaper than the pool).
    async fn wait() -> Option<WorkerSlot> {
        for _ in 0..SLOT_TRIES {
            if let Some(slot) = WorkerSlot::take() {
                return Some(slot);
            }
            tokio::task::yield_now().await;
        }
        WorkerSlot::take()
    }

    fn take() -> Option<WorkerSlot> {
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        let limit = workers.saturating_sub(1);
        (ON_WORKERS.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        }))
        .ok()
        .map(|_| WorkerSlot)
    }
}

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        ON_WORKERS.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn gate_one(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<GateQuery>,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return *r;
    }
    let asked = match asked(q.category.as_deref(), q.template.as_deref()) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let engine = s.engine.clone();
    let run = move || {
        let (category, template) = judged(&engine, &asked)?;
        let read = |alias: &str| engine.store().consent_by_alias(alias);
        Ok::<_, Box<Response>>(GateReply {
            template,
            ..answer(&engine, &read, &id, category)
        })
    };
    let v = match WorkerSlot::wait().await {
        Some(_slot) => run(),
        None => {
            (tokio::task::spawn_blocking(run).await).unwrap_or_else(|_| Ok(GateReply::default()))
        }
    };
    let v = match v {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let code = if v.error.is_some() && v.allowed.is_none() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    (code, Json(v)).into_response()
}

/// The token, then the announced length, are checked before the body is read: an
/// unauthenticated or oversized request costs no parsing and gets no `100 Continue`.
async fn gate_batch(State(s): State<Arc<HttpState>>, req: Request) -> Response {
    if let Err(r) = authorize(&s, req.headers()) {
        return *r;
    }
    if content_length(req.headers()).is_some_and(|n| n > MAX_BATCH_BYTES as u64) {
        let error = format!("body over {MAX_BATCH_BYTES} bytes");
        return (StatusCode::PAYLOAD_TOO_LARGE, Json(json!({"error": error}))).into_response();
    }
    let req = match Json::<BatchRequest>::from_request(req, &()).await {
        Ok(Json(b)) => b,
        Err(e) => {
            let code = match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            return (code, Json(json!({"error": e.body_text()}))).into_response();
        }
    };
    if req.ids.len() > MAX_BATCH {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(json!({"error": format!("at most {MAX_BATCH} ids per request")})),
        )
            .into_response();
    }
    let asked = match asked(req.category.as_deref(), req.template.as_deref()) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    match batch_answers(s.engine.clone(), asked, req.ids).await {
        Ok(results) => Json(GateBatchReply { results }).into_response(),
        Err(r) => *r,
    }
}

/// The batch's answers, in order. A batch is a thousand store reads, milliseconds, too
/// long for an async worker: its ids are read in shares on blocking threads at once, one
/// share per core, so a lone batch is not held to one core (at 1,000,000 people: p99
/// 29 ms instead of 33–36 on one thread; see BENCHMARKS.md, "The batch in shares").
async fn batch_answers(
    engine: Arc<Engine>,
    asked: Asked,
    ids: Vec<String>,
) -> Result<Vec<GateReply>, Box<Response>> {
    let stopping = || unavailable("the daemon is stopping");
    let (category, template) = match asked {
        Asked::Category(c) => (c, None),
        Asked::Template(_) => {
            let e = engine.clone();
            (tokio::task::spawn_blocking(move || judged(&e, &asked)).await)
                .unwrap_or_else(|_| Err(stopping()))?
        }
    };
    let share = ids.len().div_ceil(batch_threads(ids.len())).max(1);
    let reads: Vec<_> = (ids.chunks(share).map(<[String]>::to_vec))
        .map(|part| {
            let (engine, template) = (engine.clone(), template.clone());
            tokio::task::spawn_blocking(move || batch_read(&engine, &part, category, template))
        })
        .collect();
    let mut answers = Vec::with_capacity(ids.len());
    for read in reads {
        answers.extend(read.await.map_err(|_| stopping())?);
    }
    Ok(answers)
}

/// Ids a blocking thread takes at least: below it a second thread costs more than it saves.
const BATCH_SHARE: usize = 100;

/// Blocking threads a batch of `n` ids is read on: one per core (as the cgroup's CPU quota
/// allows, read once), each with a fair share.
fn batch_threads(n: usize) -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |c| c.get()));
    (n / BATCH_SHARE).clamp(1, cores)
}

/// Answers for `ids`, in order, all read in one store call (one connection on PostgreSQL).
fn batch_read(
    engine: &Engine,
    ids: &[String],
    category: Category,
    template: Option<String>,
) -> Vec<GateReply> {
    let with_template = |r: GateReply| GateReply {
        template: template.clone(),
        ..r
    };
    let read = engine.store().consent_reads(|reads| {
        let read = |alias: &str| reads.consent_by_alias(alias);
        (ids.iter())
            .map(|id| with_template(answer(engine, &read, id, category)))
            .collect()
    });
    read.unwrap_or_else(|e| {
        let base = |id: &String| GateReply {
            id: id.clone(),
            ..GateReply::default()
        };
        (ids.iter())
            .map(|id| with_template(store_error(base(id), &e)))
            .collect()
    })
}

/// The announced body length, if the header is present and a number.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::{bearer, constant_time_eq};

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER  abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearerabc"), None);
        assert_eq!(bearer("abc"), None);
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
