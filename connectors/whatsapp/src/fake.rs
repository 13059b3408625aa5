//! Fakes for tests and the daemon's `demo` command (feature `fake`):
//! - [`FakeGraph`]: a stateful Graph API server on 127.0.0.1 that checks the bearer token,
//!   records sent messages, answers with real Graph error bodies (per recipient, for the
//!   next N calls, or at a rate), enforces an optional per-recipient pair rate, and counts
//!   requests per endpoint;
//! - [`WebhookSender`]: delivers signed webhook bodies the way Meta does, retrying
//!   deliveries not acknowledged with 200, and [`envelope`] builds the bodies;
//! - [`MemoryInbox`]: an in-memory [`Inbox`] with a switch to make appends fail.
//!
//! State sits behind `std::sync::Mutex`es that are never held across an await.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};
use optout_core::Timestamp;
use optout_core::testkit::FakeServer;
use serde_json::{Value, json};
use sha2::Sha256;

use optout_core::contract::BoxFuture;
use optout_core::inbox::{Inbox, InboxEntry, InboxError};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A BSUID (`US.1349…`) or parent BSUID (`US.ENT.1181…`): a two-letter country code, a
/// period, then letters, digits and periods.
fn is_bsuid(v: &str) -> bool {
    let mut parts = v.splitn(2, '.');
    let cc = parts.next().unwrap_or("");
    let rest = parts.next().unwrap_or("");
    cc.len() == 2
        && cc.bytes().all(|b| b.is_ascii_uppercase())
        && !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
}

// ---------------------------------------------------------------------------------------
// In-memory inbox

#[derive(Default)]
struct MemState {
    entries: Vec<InboxEntry>,
    quarantined: Vec<(Bytes, String)>,
    last_seq: u64,
    /// Appends and quarantines still to fail.
    failures_left: u64,
}

impl MemState {
    fn fail(&mut self) -> Result<(), InboxError> {
        if self.failures_left == 0 {
            return Ok(());
        }
        self.failures_left -= 1;
        Err(InboxError("disk full (injected)".into()))
    }
}

/// An [`Inbox`] in memory. Sequence numbers start at 1 and are never reused.
#[derive(Default)]
pub struct MemoryInbox {
    state: Mutex<MemState>,
}

impl MemoryInbox {
    pub fn new() -> Arc<Self> {
        Arc::new(MemoryInbox::default())
    }
    /// Make every append and quarantine fail (a full disk) until switched back.
    pub fn set_failing(&self, failing: bool) {
        lock(&self.state).failures_left = if failing { u64::MAX } else { 0 };
    }
    /// Make the next `n` appends or quarantines fail.
    pub fn fail_next(&self, n: u64) {
        lock(&self.state).failures_left = n;
    }
    pub fn entries(&self) -> Vec<InboxEntry> {
        lock(&self.state).entries.clone()
    }
    /// Quarantined bodies with their reasons.
    pub fn quarantined(&self) -> Vec<(Bytes, String)> {
        lock(&self.state).quarantined.clone()
    }
    /// What the daemon does once a cursor is saved.
    pub fn delete_up_to(&self, seq: u64) {
        lock(&self.state).entries.retain(|e| e.seq > seq);
    }
}

impl Inbox for MemoryInbox {
    fn append(&self, body: Bytes, received_at: Timestamp) -> BoxFuture<'_, Result<(), InboxError>> {
        Box::pin(async move {
            let mut s = lock(&self.state);
            s.fail()?;
            s.last_seq += 1;
            let seq = s.last_seq;
            s.entries.push(InboxEntry {
                seq,
                received_at,
                body,
            });
            Ok(())
        })
    }

    fn quarantine(
        &self,
        body: Bytes,
        _received_at: Timestamp,
        reason: String,
    ) -> BoxFuture<'_, Result<(), InboxError>> {
        Box::pin(async move {
            let mut s = lock(&self.state);
            s.fail()?;
            s.quarantined.push((body, reason));
            Ok(())
        })
    }

    fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<InboxEntry>, InboxError>> {
        Box::pin(async move {
            let s = lock(&self.state);
            Ok(s.entries
                .iter()
                .filter(|e| e.seq > after)
                .take(limit)
                .cloned()
                .collect())
        })
    }

    fn trim(&self, seq: u64) -> Result<(), InboxError> {
        self.delete_up_to(seq);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Fake Graph API

/// How the fake Graph server starts.
#[derive(Clone, Debug)]
pub struct GraphOptions {
    /// The access token it accepts.
    pub token: String,
    pub phone_number_id: String,
    /// `Retry-After` sent with throttling errors (4, 80007, 130429).
    pub retry_after: Duration,
    /// When set, a second message to the same recipient within this interval fails with
    /// 131056 (Meta's pair rate limit).
    pub pair_interval: Option<Duration>,
    /// Seed of the fault-rate generator, so a run is reproducible.
    pub seed: u64,
    /// The WhatsApp Business Account whose `subscribed_apps` the fake answers.
    pub waba_id: String,
    /// Whether an app is subscribed to that account's webhooks.
    pub subscribed: bool,
}

impl Default for GraphOptions {
    fn default() -> Self {
        GraphOptions {
            token: "fake-access-token".into(),
            phone_number_id: "106540352242922".into(),
            retry_after: Duration::from_secs(1),
            pair_interval: None,
            seed: 7,
            waba_id: "102290129340398".into(),
            subscribed: true,
        }
    }
}

/// A message the fake accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct SentMessage {
    /// The id returned to the caller (`wamid.FAKE…`).
    pub id: String,
    pub to: Option<String>,
    /// The BSUID for username users.
    pub recipient: Option<String>,
    pub text: String,
    pub context_message_id: Option<String>,
    pub body: Value,
}

struct GraphState {
    opts: GraphOptions,
    token: String,
    sent: Vec<SentMessage>,
    requests: BTreeMap<&'static str, u64>,
    errors: BTreeMap<i64, u64>,
    recipient_faults: HashMap<String, i64>,
    next_faults: VecDeque<i64>,
    rate_fault: Option<(f64, i64)>,
    rng: u64,
    last_send: HashMap<String, Instant>,
}

impl GraphState {
    /// xorshift64*: enough randomness for fault rates, no dependency.
    fn roll(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A running fake Graph API. Stops when dropped.
pub struct FakeGraph {
    state: Arc<Mutex<GraphState>>,
    server: FakeServer,
}

/// Starts the fake on 127.0.0.1, port 0.
pub async fn start_graph(opts: GraphOptions) -> FakeGraph {
    let state = Arc::new(Mutex::new(GraphState {
        token: opts.token.clone(),
        rng: opts.seed.max(1),
        opts,
        sent: Vec::new(),
        requests: BTreeMap::new(),
        errors: BTreeMap::new(),
        recipient_faults: HashMap::new(),
        next_faults: VecDeque::new(),
        rate_fault: None,
        last_send: HashMap::new(),
    }));
    let app = Router::new()
        .route("/{version}/{phone}/messages", post(graph_send))
        .route("/{version}/{phone}", get(graph_phone))
        .route(
            "/{version}/{phone}/subscribed_apps",
            get(graph_subscribed_apps),
        )
        .with_state(state.clone());
    FakeGraph {
        state,
        server: FakeServer::start(app).await,
    }
}

impl FakeGraph {
    /// What goes in the connector's `base_url`.
    pub fn base_url(&self) -> String {
        self.server.url()
    }
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
    /// Messages accepted so far, in order.
    pub fn sent(&self) -> Vec<SentMessage> {
        lock(&self.state).sent.clone()
    }
    /// Requests received by endpoint: `"messages"` (sends) or `"phone_number"` (health).
    pub fn requests(&self, endpoint: &str) -> u64 {
        lock(&self.state)
            .requests
            .get(endpoint)
            .copied()
            .unwrap_or(0)
    }
    /// Error responses sent, by Graph code.
    pub fn errors_returned(&self, code: i64) -> u64 {
        lock(&self.state).errors.get(&code).copied().unwrap_or(0)
    }
    /// Every send to `recipient` (a `to` or a BSUID) fails with `code` until cleared.
    pub fn fail_recipient(&self, recipient: &str, code: i64) {
        lock(&self.state)
            .recipient_faults
            .insert(recipient.to_string(), code);
    }
    pub fn clear_recipient(&self, recipient: &str) {
        lock(&self.state).recipient_faults.remove(recipient);
    }
    /// The next `n` calls (any endpoint) fail with `code`.
    pub fn fail_next(&self, n: usize, code: i64) {
        lock(&self.state)
            .next_faults
            .extend(std::iter::repeat_n(code, n));
    }
    /// Each send fails with `code` with probability `rate` (0 turns it off).
    pub fn fail_rate(&self, rate: f64, code: i64) {
        lock(&self.state).rate_fault = (rate > 0.0).then_some((rate, code));
    }
    /// Rotate the accepted token: the old one now gets 190 (expired).
    pub fn set_token(&self, token: &str) {
        lock(&self.state).token = token.to_string();
    }
    /// Stop accepting connections now (also done on drop).
    pub fn stop(&self) {
        self.server.stop();
    }
    /// Stop serving and wait until every connection is closed.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// Titles Meta uses for the codes the fake is asked to produce.
fn title_of(code: i64) -> &'static str {
    match code {
        0 => "AuthException",
        4 => "Application request limit reached",
        10 => "Permission denied",
        100 => "Invalid parameter",
        190 => "Access token has expired",
        200..=299 => "API permission",
        368 => "Temporarily blocked for policies violations",
        80007 => "Rate limit issues",
        130429 => "Rate limit hit",
        131000 => "Something went wrong",
        131026 => "Message undeliverable",
        131031 => "Account has been locked",
        131047 => "Re-engagement message",
        131048 => "Spam rate limit hit",
        131049 => "Meta chose not to deliver",
        131050 => "User stopped marketing messages",
        131056 => "(Business Account, Consumer Account) pair rate limit hit",
        _ => "Error",
    }
}

fn graph_error(st: &mut GraphState, code: i64) -> Response {
    *st.errors.entry(code).or_default() += 1;
    let status = match code {
        0 | 190 => StatusCode::UNAUTHORIZED,
        10 | 200..=299 => StatusCode::FORBIDDEN,
        4 | 80007 | 130429 => StatusCode::TOO_MANY_REQUESTS,
        1 | 2 | 131000 | 131016 => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    let title = title_of(code);
    let body = json!({"error": {
        "message": format!("(#{code}) {title}"),
        "type": "OAuthException",
        "code": code,
        "error_data": {"messaging_product": "whatsapp", "details": title},
        "fbtrace_id": "AfakeTrace",
    }});
    let mut resp = (status, axum::Json(body)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        let secs = st.opts.retry_after.as_secs().max(1).to_string();
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_str(&secs).expect("digits"),
        );
    }
    resp
}

/// Shared front of every endpoint: count, then token, then queued faults. Returns the
/// Graph error code to answer with, if any.
fn admit(st: &mut GraphState, endpoint: &'static str, headers: &HeaderMap) -> Option<i64> {
    *st.requests.entry(endpoint).or_default() += 1;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(st.token.as_str()) {
        return Some(190);
    }
    st.next_faults.pop_front()
}

async fn graph_phone(
    State(state): State<Arc<Mutex<GraphState>>>,
    Path((_version, phone)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut st = lock(&state);
    if let Some(code) = admit(&mut st, "phone_number", &headers) {
        return graph_error(&mut st, code);
    }
    if phone != st.opts.phone_number_id {
        return graph_error(&mut st, 100);
    }
    axum::Json(json!({"id": phone})).into_response()
}

/// `GET /{version}/{waba_id}/subscribed_apps`: the apps receiving the account's webhooks.
async fn graph_subscribed_apps(
    State(state): State<Arc<Mutex<GraphState>>>,
    Path((_version, waba)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut st = lock(&state);
    if let Some(code) = admit(&mut st, "subscribed_apps", &headers) {
        return graph_error(&mut st, code);
    }
    if waba != st.opts.waba_id {
        return graph_error(&mut st, 100);
    }
    let data = if st.opts.subscribed {
        json!([{"whatsapp_business_api_data": {"id": "1234567890", "name": "optout-sync", "link": "https://www.facebook.com/games/?app_id=1234567890"}}])
    } else {
        json!([])
    };
    axum::Json(json!({ "data": data })).into_response()
}

async fn graph_send(
    State(state): State<Arc<Mutex<GraphState>>>,
    Path((_version, phone)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = lock(&state);
    if let Some(code) = admit(&mut st, "messages", &headers) {
        return graph_error(&mut st, code);
    }
    if phone != st.opts.phone_number_id {
        return graph_error(&mut st, 100);
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return graph_error(&mut st, 100);
    };
    let to = v.get("to").and_then(Value::as_str).map(String::from);
    let recipient = v.get("recipient").and_then(Value::as_str).map(String::from);
    let text = v
        .pointer("/text/body")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    // Meta's BSUID rules for the Messages API: `to` takes a phone number, `recipient` a
    // BSUID (or parent BSUID); with both, `to` wins; with neither, the request is invalid.
    let valid = v.get("messaging_product").and_then(Value::as_str) == Some("whatsapp")
        && v.get("type").and_then(Value::as_str) == Some("text")
        && (to.is_some() || recipient.is_some())
        && to.as_deref().is_none_or(|t| !is_bsuid(t))
        && recipient.as_deref().is_none_or(is_bsuid)
        && !text.is_empty()
        && text.chars().count() <= 4096;
    if !valid {
        return graph_error(&mut st, 100);
    }
    let who = to.clone().or_else(|| recipient.clone()).unwrap_or_default();
    if let Some(code) = st.recipient_faults.get(&who).copied() {
        return graph_error(&mut st, code);
    }
    if let Some((rate, code)) = st.rate_fault {
        if st.roll() < rate {
            return graph_error(&mut st, code);
        }
    }
    if let Some(interval) = st.opts.pair_interval {
        let now = Instant::now();
        if st
            .last_send
            .get(&who)
            .is_some_and(|t| now.duration_since(*t) < interval)
        {
            return graph_error(&mut st, 131056);
        }
        st.last_send.insert(who.clone(), now);
    }
    let id = format!("wamid.FAKE{:06}", st.sent.len() + 1);
    st.sent.push(SentMessage {
        id: id.clone(),
        to: to.clone(),
        recipient,
        text,
        context_message_id: v
            .pointer("/context/message_id")
            .and_then(Value::as_str)
            .map(String::from),
        body: v,
    });
    // `wa_id` for a send by phone number, `user_id` for a BSUID-only one.
    let mut contact = json!({"input": who});
    match &to {
        Some(t) => contact["wa_id"] = json!(t.trim_start_matches('+')),
        None => contact["user_id"] = json!(who),
    }
    axum::Json(
        json!({"messaging_product": "whatsapp", "contacts": [contact], "messages": [{"id": id}]}),
    )
    .into_response()
}

// ---------------------------------------------------------------------------------------
// Webhook sender

/// `sha256=<hex HMAC-SHA256(app secret, body)>`, the `X-Hub-Signature-256` value.
pub fn sign(app_secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()).expect("any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!("sha256={}", hex::encode(digest))
}

/// Delivers webhook bodies like Meta: signed, retried (with doubling delays, up to
/// `max_attempts`) until acknowledged with 200.
#[derive(Clone, Debug)]
pub struct WebhookSender {
    client: reqwest::Client,
    url: String,
    app_secret: String,
    pub max_attempts: u32,
    pub retry_delay: Duration,
}

/// What happened to one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Per attempt: the HTTP status, or the transport error.
    pub attempts: Vec<Result<u16, String>>,
    /// Acknowledged with 200.
    pub delivered: bool,
}

impl WebhookSender {
    /// `url` is the full webhook URL (`http://127.0.0.1:port/webhooks/whatsapp`). Three
    /// attempts, 10 ms apart then doubling, unless changed.
    pub fn new(url: impl Into<String>, app_secret: impl Into<String>) -> Self {
        WebhookSender {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
            url: url.into(),
            app_secret: app_secret.into(),
            max_attempts: 3,
            retry_delay: Duration::from_millis(10),
        }
    }

    pub fn with_retries(mut self, max_attempts: u32, retry_delay: Duration) -> Self {
        self.max_attempts = max_attempts.max(1);
        self.retry_delay = retry_delay;
        self
    }

    /// Signs and delivers `body`.
    pub async fn deliver(&self, body: &[u8]) -> Delivery {
        let sig = sign(&self.app_secret, body);
        self.deliver_with(body, Some(&sig)).await
    }

    /// Delivers with the given `X-Hub-Signature-256` value (or none), for testing refusals.
    pub async fn deliver_with(&self, body: &[u8], signature: Option<&str>) -> Delivery {
        let mut attempts = Vec::new();
        let mut delay = self.retry_delay;
        for attempt in 0..self.max_attempts {
            if attempt > 0 {
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2);
            }
            let mut req = self
                .client
                .post(&self.url)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.to_vec());
            if let Some(s) = signature {
                req = req.header(crate::webhook::SIGNATURE_HEADER, s);
            }
            match req.send().await {
                Ok(r) if r.status() == StatusCode::OK => {
                    attempts.push(Ok(200));
                    return Delivery {
                        attempts,
                        delivered: true,
                    };
                }
                Ok(r) => attempts.push(Ok(r.status().as_u16())),
                Err(e) => attempts.push(Err(e.to_string())),
            }
        }
        Delivery {
            attempts,
            delivered: false,
        }
    }
}

/// Builders of webhook bodies shaped like Meta's (see the fixtures in the tests).
pub mod envelope {
    use serde_json::{Value, json};

    /// Who a payload is about: a `wa_id`, a BSUID, or both.
    #[derive(Clone, Debug, Default)]
    pub struct Who {
        pub wa_id: Option<String>,
        pub user_id: Option<String>,
    }

    impl Who {
        pub fn wa(wa_id: &str) -> Self {
            Who {
                wa_id: Some(wa_id.into()),
                user_id: None,
            }
        }
        /// A username user: no phone number, only a BSUID.
        pub fn bsuid(user_id: &str) -> Self {
            Who {
                wa_id: None,
                user_id: Some(user_id.into()),
            }
        }
        pub fn both(wa_id: &str, user_id: &str) -> Self {
            Who {
                wa_id: Some(wa_id.into()),
                user_id: Some(user_id.into()),
            }
        }

        fn contact(&self) -> Value {
            let mut c = json!({"profile": {"name": "Fake Customer"}});
            if let Some(w) = &self.wa_id {
                c["wa_id"] = json!(w);
            }
            if let Some(u) = &self.user_id {
                c["user_id"] = json!(u);
            }
            c
        }
    }

    /// One envelope with one change.
    pub fn wrap(field: &str, value: Value) -> Vec<u8> {
        let mut value = value;
        value["messaging_product"] = json!("whatsapp");
        value["metadata"] =
            json!({"display_phone_number": "15550783881", "phone_number_id": "106540352242922"});
        serde_json::to_vec(&json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "419561257915477", "changes": [{"value": value, "field": field}]}]
        }))
        .expect("serialisable")
    }

    fn message(who: &Who, message_id: &str, timestamp: i64, kind: &str, content: Value) -> Vec<u8> {
        let mut m = json!({"id": message_id, "timestamp": timestamp.to_string(), "type": kind});
        m[kind] = content;
        if let Some(w) = &who.wa_id {
            m["from"] = json!(w);
        }
        if let Some(u) = &who.user_id {
            m["from_user_id"] = json!(u);
        }
        wrap(
            "messages",
            json!({"contacts": [who.contact()], "messages": [m]}),
        )
    }

    pub fn text(who: &Who, message_id: &str, timestamp: i64, body: &str) -> Vec<u8> {
        message(who, message_id, timestamp, "text", json!({"body": body}))
    }

    /// A `user_changed_number` notice, shaped as Meta's reference example: the old number
    /// is the sender, the new one is `system.wa_id`; no contacts block.
    pub fn number_change(
        old_wa_id: &str,
        new_wa_id: &str,
        message_id: &str,
        timestamp: i64,
    ) -> Vec<u8> {
        let m = json!({
            "from": old_wa_id, "id": message_id, "timestamp": timestamp.to_string(),
            "type": "system",
            "system": {"body": format!("User changed from {old_wa_id} to {new_wa_id}"),
                       "wa_id": new_wa_id, "type": "user_changed_number"}
        });
        wrap("messages", json!({"messages": [m]}))
    }

    /// A `user_changed_user_id` notice: the old id is the sender's `from_user_id`, the
    /// new one `system.user_id`.
    pub fn user_id_change(
        who: &Who,
        new_user_id: &str,
        message_id: &str,
        timestamp: i64,
    ) -> Vec<u8> {
        let old = who.user_id.clone().unwrap_or_default();
        let mut m = json!({
            "id": message_id, "timestamp": timestamp.to_string(), "type": "system",
            "system": {"body": format!("User changed from {old} to {new_user_id}"),
                       "user_id": new_user_id, "type": "user_changed_user_id"}
        });
        if let Some(w) = &who.wa_id {
            m["from"] = json!(w);
        }
        if let Some(u) = &who.user_id {
            m["from_user_id"] = json!(u);
        }
        wrap("messages", json!({"messages": [m]}))
    }

    /// A template quick-reply tap.
    pub fn button(
        who: &Who,
        message_id: &str,
        timestamp: i64,
        payload: &str,
        text: &str,
    ) -> Vec<u8> {
        message(
            who,
            message_id,
            timestamp,
            "button",
            json!({"payload": payload, "text": text}),
        )
    }

    /// An interactive reply-button tap.
    pub fn button_reply(
        who: &Who,
        message_id: &str,
        timestamp: i64,
        id: &str,
        title: &str,
    ) -> Vec<u8> {
        message(
            who,
            message_id,
            timestamp,
            "interactive",
            json!({"type": "button_reply", "button_reply": {"id": id, "title": title}}),
        )
    }

    /// Meta's marketing preference change; `value` is `stop` or `resume`.
    pub fn user_preference(who: &Who, value: &str, timestamp: i64) -> Vec<u8> {
        let mut p = json!({
            "detail": format!("User requested to {value} marketing messages"),
            "category": "marketing_messages",
            "value": value,
            "timestamp": timestamp,
        });
        if let Some(w) = &who.wa_id {
            p["wa_id"] = json!(w);
        }
        if let Some(u) = &who.user_id {
            p["user_id"] = json!(u);
        }
        wrap(
            "user_preferences",
            json!({"contacts": [who.contact()], "user_preferences": [p]}),
        )
    }

    /// A WhatsApp Business Account notice (template webhooks): no `messaging_product` or
    /// `metadata`, and the entry's `time` (Unix seconds) says when Meta triggered it.
    pub fn waba_notice(field: &str, time: i64, value: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "entry": [{"id": "102290129340398", "time": time,
                       "changes": [{"field": field, "value": value}]}],
            "object": "whatsapp_business_account"
        }))
        .expect("serialisable")
    }

    /// `template_category_update` for a change done: the template (`name`, `language`, id
    /// `id`) moved from `previous` to `new` (Meta's names: `UTILITY`, `MARKETING`…).
    pub fn template_recategorised(
        id: u64,
        name: &str,
        language: &str,
        previous: &str,
        new: &str,
        time: i64,
    ) -> Vec<u8> {
        waba_notice(
            "template_category_update",
            time,
            json!({"message_template_id": id, "message_template_name": name,
                   "message_template_language": language,
                   "previous_category": previous, "new_category": new}),
        )
    }

    /// `template_category_update` announcing a change: the template is `current` now and
    /// becomes `correct` at `effective` (Unix seconds; Meta announces a day ahead).
    pub fn template_recategorisation_announced(
        id: u64,
        name: &str,
        language: &str,
        current: &str,
        correct: &str,
        time: i64,
        effective: i64,
    ) -> Vec<u8> {
        waba_notice(
            "template_category_update",
            time,
            json!({"message_template_id": id, "message_template_name": name,
                   "message_template_language": language, "new_category": current,
                   "correct_category": correct, "category_update_timestamp": effective}),
        )
    }

    /// `message_template_status_update`: `event` (`APPROVED`, `REJECTED`, `PAUSED`…) for a
    /// template of `category`.
    pub fn template_status(
        id: u64,
        name: &str,
        language: &str,
        event: &str,
        category: &str,
        time: i64,
    ) -> Vec<u8> {
        waba_notice(
            "message_template_status_update",
            time,
            json!({"event": event, "message_template_id": id, "message_template_name": name,
                   "message_template_language": language, "reason": "NONE",
                   "message_template_category": category}),
        )
    }

    /// A `failed` status for one of our sends, with one error code.
    pub fn failed_status(who: &Who, message_id: &str, timestamp: i64, code: i64) -> Vec<u8> {
        let mut s = json!({
            "id": message_id,
            "status": "failed",
            "timestamp": timestamp.to_string(),
            "errors": [{"code": code, "title": super::title_of(code), "message": super::title_of(code)}],
        });
        if let Some(w) = &who.wa_id {
            s["recipient_id"] = json!(w);
        }
        if let Some(u) = &who.user_id {
            s["recipient_user_id"] = json!(u);
        }
        wrap("messages", json!({"statuses": [s]}))
    }
}
