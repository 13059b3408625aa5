//! A fake webhook receiver (feature `fake`) for tests and the daemon's `demo` command: an
//! axum server on 127.0.0.1, port 0, that behaves like a careful receiver.
//!
//! `POST /hook` checks `X-Optout-Signature-256` with [`verify_signature`] and refuses
//! timestamps older or newer than the allowed skew (401, counted as a bad signature),
//! then records the event. Every other path answers 404. Faults are injected before the
//! signature check, from a script ("the next requests fail like this") or at random rates
//! from a seeded generator (reproducible runs): 500, 429 with `Retry-After`, a slow
//! answer (the event IS recorded first, as a receiver that processes then stalls would,
//! so the sender's timeout and retry produce a duplicate delivery), a dropped connection,
//! and 410 Gone. Events of a subject marked refused are answered 422.
//!
//! The state sits behind a `std::sync::Mutex` that is never held across an await.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use optout_core::testkit::FakeServer;

use crate::event::Event;
use crate::signature::verify_signature;

/// One injected misbehaviour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 500 Internal Server Error.
    ServerError,
    /// 429 Too Many Requests with `Retry-After: <secs>`.
    TooManyRequests { retry_after_secs: u64 },
    /// Records the event, then waits this long before answering 200.
    Slow(Duration),
    /// Closes the connection without a response.
    Drop,
    /// 410 Gone.
    Gone,
}

/// Probabilities (0.0–1.0) of each fault per request, when no scripted fault is queued.
/// They are tried in field order; their sum should not exceed 1.
#[derive(Clone, Debug, Default)]
pub struct FaultRates {
    pub server_error: f64,
    pub too_many_requests: f64,
    pub slow: f64,
    pub drop: f64,
    pub gone: f64,
    /// The `Retry-After` of random 429s, in seconds.
    pub retry_after_secs: u64,
    /// How long random slow answers take.
    pub slow_for: Duration,
}

/// How the receiver starts.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// The HMAC key events must be signed with.
    pub secret: Vec<u8>,
    /// How far `X-Optout-Timestamp` may be from the receiver's clock.
    pub max_skew: Duration,
    /// Seed of the fault generator.
    pub seed: u64,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            secret: b"fake-webhook-secret".to_vec(),
            max_skew: Duration::from_secs(300),
            seed: 0x5eed,
        }
    }
}

/// One accepted delivery (signature valid, body an event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub event: Event,
    /// The raw body, as signed.
    pub body: Bytes,
    /// Every request header, names lower-case.
    pub headers: BTreeMap<String, String>,
}

/// Request counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Every request to any path.
    pub requests: u64,
    /// Requests to `/hook`.
    pub hook_requests: u64,
    /// Requests answered with an injected fault.
    pub faults: u64,
    /// Requests refused for a missing, wrong or stale signature.
    pub bad_signatures: u64,
    /// Deliveries accepted (duplicates included).
    pub accepted: u64,
}

struct Inner {
    options: FakeOptions,
    script: VecDeque<Fault>,
    rates: FaultRates,
    rng: u64,
    received: Vec<Received>,
    /// Subjects whose events are answered 422.
    refused: HashSet<String>,
    counters: Counters,
}

impl Inner {
    fn next_fault(&mut self) -> Option<Fault> {
        if let Some(f) = self.script.pop_front() {
            return Some(f);
        }
        let r = &self.rates;
        let table = [
            (r.server_error, Fault::ServerError),
            (
                r.too_many_requests,
                Fault::TooManyRequests {
                    retry_after_secs: r.retry_after_secs,
                },
            ),
            (r.slow, Fault::Slow(r.slow_for)),
            (r.drop, Fault::Drop),
            (r.gone, Fault::Gone),
        ];
        if table.iter().all(|(p, _)| *p <= 0.0) {
            return None;
        }
        let roll = self.roll();
        let mut acc = 0.0;
        for (p, fault) in table {
            acc += p;
            if roll < acc {
                return Some(fault);
            }
        }
        None
    }

    /// splitmix64, mapped to [0, 1): reproducible without a dependency.
    fn roll(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

type Shared = Arc<Mutex<Inner>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Inner> {
    // A panicking test thread must not hide the state from the others.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running fake receiver; stops when dropped or on [`FakeHandle::stop`].
pub struct FakeHandle {
    base_url: String,
    shared: Shared,
    server: FakeServer,
}

/// Starts a receiver on 127.0.0.1 on a free port.
pub async fn start(options: FakeOptions) -> FakeHandle {
    let shared: Shared = Arc::new(Mutex::new(Inner {
        rng: options.seed,
        options,
        script: VecDeque::new(),
        rates: FaultRates::default(),
        received: Vec::new(),
        refused: HashSet::new(),
        counters: Counters::default(),
    }));
    let app = Router::new()
        .route("/hook", post(receive))
        .fallback(not_found)
        .with_state(shared.clone());
    let server = FakeServer::start(app).await;
    FakeHandle {
        base_url: server.url(),
        shared,
        server,
    }
}

impl FakeHandle {
    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The receiving endpoint, `<base_url>/hook`.
    pub fn url(&self) -> String {
        format!("{}/hook", self.base_url)
    }

    /// Queues faults for the next requests, in order, ahead of the random rates.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.shared).script.extend(faults);
    }

    /// Sets the random fault rates (all zero by default).
    pub fn set_rates(&self, rates: FaultRates) {
        lock(&self.shared).rates = rates;
    }

    /// Every accepted delivery, duplicates included, in arrival order.
    pub fn deliveries(&self) -> Vec<Received> {
        lock(&self.shared).received.clone()
    }

    /// The deduplicated view: one event per event id, first delivery kept, in order.
    pub fn events(&self) -> Vec<Event> {
        let inner = lock(&self.shared);
        let mut seen = HashSet::new();
        inner
            .received
            .iter()
            .filter(|r| seen.insert(r.event.id.clone()))
            .map(|r| r.event.clone())
            .collect()
    }

    pub fn counters(&self) -> Counters {
        lock(&self.shared).counters
    }

    /// Forgets deliveries and counters (faults and rates stay).
    pub fn clear(&self) {
        let mut inner = lock(&self.shared);
        inner.received.clear();
        inner.counters = Counters::default();
    }

    /// Events for this subject are refused with 422 from now on (after the signature
    /// check), as a receiver that cannot process them would.
    pub fn refuse_subject(&self, subject: &str) {
        lock(&self.shared).refused.insert(subject.to_string());
    }

    /// Stops accepting connections and waits for open ones to finish.
    pub async fn stop(self) {
        self.server.shutdown().await;
    }
}

async fn not_found(State(shared): State<Shared>) -> StatusCode {
    lock(&shared).counters.requests += 1;
    StatusCode::NOT_FOUND
}

async fn receive(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let (fault, options) = {
        let mut inner = lock(&shared);
        inner.counters.requests += 1;
        inner.counters.hook_requests += 1;
        let fault = inner.next_fault();
        if fault.is_some() {
            inner.counters.faults += 1;
        }
        (fault, inner.options.clone())
    };
    let slow = match fault {
        None => None,
        Some(Fault::Slow(d)) => Some(d),
        Some(Fault::ServerError) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "fake: injected server error",
            )
                .into_response();
        }
        Some(Fault::TooManyRequests { retry_after_secs }) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", retry_after_secs.to_string())],
                "fake: slow down",
            )
                .into_response();
        }
        Some(Fault::Gone) => {
            return (StatusCode::GONE, "fake: this hook was deleted").into_response();
        }
        Some(Fault::Drop) => return dropped_connection(),
    };

    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let timestamp = header("x-optout-timestamp");
    let fresh = timestamp.parse::<i64>().is_ok_and(|t| {
        let now = chrono::Utc::now().timestamp();
        t.abs_diff(now) <= options.max_skew.as_secs()
    });
    let signed = verify_signature(
        &options.secret,
        timestamp,
        &body,
        header("x-optout-signature-256"),
    );
    if !(fresh && signed) {
        lock(&shared).counters.bad_signatures += 1;
        return (StatusCode::UNAUTHORIZED, "fake: bad or stale signature").into_response();
    }
    let Ok(event) = serde_json::from_slice::<Event>(&body) else {
        return (StatusCode::BAD_REQUEST, "fake: body is not an event").into_response();
    };
    if lock(&shared).refused.contains(&event.subject) {
        return (StatusCode::UNPROCESSABLE_ENTITY, "fake: subject refused").into_response();
    }
    let headers = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    {
        let mut inner = lock(&shared);
        inner.counters.accepted += 1;
        inner.received.push(Received {
            event,
            body,
            headers,
        });
    }
    if let Some(d) = slow {
        tokio::time::sleep(d).await;
    }
    StatusCode::OK.into_response()
}

/// A response whose body fails before its first byte: hyper then closes the connection
/// without having written the status line, which the client sees as a dropped connection.
fn dropped_connection() -> Response {
    let failing = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("fake: connection dropped"))
    });
    Response::new(Body::from_stream(failing))
}
