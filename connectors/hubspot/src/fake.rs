//! A stateful fake HubSpot portal on 127.0.0.1, for tests and the daemon's `demo` command.
//!
//! It serves what the connector uses, with HubSpot's semantics where a connector could get
//! them wrong:
//! - `POST /crm/v3/objects/contacts/search`: filter groups (OR of ANDed filters) with
//!   EQ/NEQ/LT/LTE/GT/GTE/BETWEEN/IN/NOT_IN/HAS_PROPERTY/NOT_HAS_PROPERTY, one sort, `limit`
//!   at most 200, `after` offsets refused from 10,000 on, `total`. Ties in the sort come
//!   back in a scrambled order (not by id). Writes reach the search index only after a
//!   configurable lag, and search shows the indexed (possibly stale) version.
//! - `POST /crm/v3/objects/contacts/batch/update`: at most 100 inputs, duplicate ids refused
//!   (400), unknown or archived ids and invalid values reported per id (207). Every write
//!   moves `lastmodifieddate`.
//!   A batch naming a property that does not exist, or an enumeration value that is not
//!   one of the property's options, is refused as a whole (400 `VALIDATION_ERROR` with
//!   `PROPERTY_DOESNT_EXIST` / `INVALID_OPTION` in its `errors`), as HubSpot does.
//! - `GET /crm/v3/objects/contacts`, `POST /crm/v3/properties/contacts` (409 when the
//!   property exists), `GET /crm/v3/properties/contacts/{name}` (404 when it does not),
//!   `POST /oauth/v3/token` (refresh-token grant; access tokens expire),
//!   `GET /oauth/v1/access-tokens/{token}` (an OAuth access token's scopes and lifetime).
//! - Private-app or OAuth bearer tokens (401 when missing, unknown or expired), scopes
//!   (403 naming the missing scope), the 10-second window, the per-second search limit and
//!   a daily limit (real 429 bodies), and injected faults: 5xx answers, slow answers, and
//!   connections dropped mid-body. Faults and limits apply to the API, not to the token
//!   endpoint.
//!
//! All state sits behind one `std::sync::Mutex`, never held across an await.

// Refusals are carried as ready `Response`s (`Result<(), Response>`): they are answered at
// once, so their size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use optout_core::Timestamp;
use optout_core::testkit::FakeServer;
use serde::Deserialize;
use serde_json::{Value, json};

/// The private-app token the fake accepts unless told otherwise.
pub const TOKEN: &str = "pat-na1-fake-0000";
/// Scopes granted to every token unless told otherwise.
pub const ALL_SCOPES: [&str; 3] = [
    "crm.objects.contacts.read",
    "crm.objects.contacts.write",
    "crm.schemas.contacts.write",
];
/// The default names of the consent properties (they exist at start unless told otherwise).
pub const CONSENT_PROPERTIES: [&str; 3] = [
    "whatsapp_consent",
    "whatsapp_consent_changed_at",
    "whatsapp_consent_source",
];
/// The marketing-consent property's name in the README's examples. It does not exist at
/// start: a portal gets it from `create_properties` or [`FakeHandle::add_consent_enumeration`].
pub const MARKETING_PROPERTY: &str = "whatsapp_marketing_consent";

const READ_SCOPE: &str = "crm.objects.contacts.read";
const WRITE_SCOPE: &str = "crm.objects.contacts.write";
const SCHEMA_SCOPE: &str = "crm.schemas.contacts.write";
const MAX_RESULTS: usize = 10_000;

#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// The private-app token accepted; `None` for an OAuth-only portal.
    pub token: Option<String>,
    /// Scopes every token carries.
    pub scopes: Vec<String>,
    pub oauth: Option<FakeOAuth>,
    /// Whether the three default consent properties exist at start.
    pub consent_properties: bool,
    pub limits: Limits,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            token: Some(TOKEN.to_string()),
            scopes: ALL_SCOPES.map(String::from).to_vec(),
            oauth: None,
            consent_properties: true,
            limits: Limits::free_tier(),
        }
    }
}

/// An OAuth app: the refresh-token grant answers access tokens living `expires_in`
/// (whole seconds, as HubSpot reports it).
#[derive(Clone, Debug)]
pub struct FakeOAuth {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    pub expires_in: Duration,
}

/// Rate limits; `None` turns one off.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Requests per rolling `window` (HubSpot: 100 or 190 per 10 s).
    pub per_window: Option<u32>,
    /// The rolling window's length (10 s at HubSpot; tests shorten it).
    pub window: Duration,
    /// Search requests per second (HubSpot: 5).
    pub search_per_second: Option<u32>,
    /// Requests until `DAILY` answers 429.
    pub daily: Option<u64>,
}

impl Limits {
    /// A Free/Starter portal.
    pub fn free_tier() -> Self {
        Limits {
            per_window: Some(100),
            window: Duration::from_secs(10),
            search_per_second: Some(5),
            daily: Some(250_000),
        }
    }

    /// No limits at all, for fast bulk tests.
    pub fn off() -> Self {
        Limits {
            per_window: None,
            window: Duration::from_secs(10),
            search_per_second: None,
            daily: None,
        }
    }
}

/// Injected failures. `*_next` counts fail the next requests deterministically; `*_rate`
/// fail a random share (a fixed-seed generator, so runs repeat).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Status of injected errors; 0 means 503.
    pub error_status: u16,
    pub error_next: u32,
    pub error_rate: f64,
    /// Answer after `slow_by`.
    pub slow_next: u32,
    pub slow_rate: f64,
    pub slow_by: Duration,
    /// Send the headers and part of the body, then close the connection.
    pub drop_next: u32,
    pub drop_rate: f64,
}

/// Requests received, per endpoint, and how many were refused and why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub search: u64,
    pub batch_update: u64,
    pub token: u64,
    /// Every other endpoint (contact list, property creation, unknown paths).
    pub other: u64,
    pub rate_limited: u64,
    pub unauthorized: u64,
    pub forbidden: u64,
    pub faults: u64,
}

/// A contact to seed. Seeded contacts are searchable at once.
#[derive(Clone, Debug, Default)]
pub struct NewContact {
    pub properties: Vec<(String, String)>,
    /// `lastmodifieddate` in epoch ms; the fake clock's now when unset.
    pub modified_at: Option<i64>,
}

impl NewContact {
    pub fn new() -> Self {
        NewContact::default()
    }

    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.properties.push((name.to_string(), value.to_string()));
        self
    }

    pub fn modified_at(mut self, ms: i64) -> Self {
        self.modified_at = Some(ms);
        self
    }
}

/// A contact as stored now (not as the search index shows it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeContact {
    pub id: String,
    pub properties: BTreeMap<String, String>,
    pub modified_at: i64,
    pub archived: bool,
}

/// The running fake. Dropping it stops the server.
pub struct FakeHandle {
    shared: Arc<Shared>,
    server: FakeServer,
}

/// Starts a fake portal on 127.0.0.1 and an ephemeral port.
pub async fn start(opts: FakeOptions) -> FakeHandle {
    let shared = Arc::new(Shared {
        portal: Mutex::new(Portal::new(opts)),
    });
    let app = Router::new()
        .route("/crm/v3/objects/contacts/search", post(search))
        .route("/crm/v3/objects/contacts/batch/update", post(batch_update))
        .route("/crm/v3/objects/contacts", get(list))
        .route("/crm/v3/properties/contacts", post(create_property))
        .route("/crm/v3/properties/contacts/{name}", get(read_property))
        .route("/oauth/v3/token", post(token))
        .route("/oauth/v1/access-tokens/{token}", get(token_info))
        .fallback(not_found)
        .layer(axum::middleware::map_response_with_state(
            shared.clone(),
            add_date,
        ))
        .with_state(shared.clone());
    FakeHandle {
        shared,
        server: FakeServer::start(app).await,
    }
}

impl FakeHandle {
    pub fn base_url(&self) -> String {
        self.server.url()
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    fn portal(&self) -> MutexGuard<'_, Portal> {
        self.shared.lock()
    }

    /// Seeds contacts; returns their ids in order.
    pub fn create_contacts(&self, contacts: impl IntoIterator<Item = NewContact>) -> Vec<String> {
        let mut p = self.portal();
        contacts
            .into_iter()
            .map(|c| p.seed(c).to_string())
            .collect()
    }

    pub fn create_contact(&self, properties: &[(&str, &str)]) -> String {
        let c = properties
            .iter()
            .fold(NewContact::new(), |c, (k, v)| c.with(k, v));
        self.create_contacts([c]).remove(0)
    }

    /// Changes properties as an agent in HubSpot's UI would: `lastmodifieddate` moves to
    /// now and search sees the change after the index lag. False if there is no such contact.
    pub fn edit_contact(&self, id: &str, properties: &[(&str, &str)]) -> bool {
        let mut p = self.portal();
        let Some(id) = p.live_id(id) else {
            return false;
        };
        let changes: Vec<(String, String)> = properties
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p.write(id, &changes);
        true
    }

    /// Archives (deletes) a contact: search and batch update no longer find it.
    pub fn delete_contact(&self, id: &str) -> bool {
        let mut p = self.portal();
        let Some(id) = p.live_id(id) else {
            return false;
        };
        p.contacts.get_mut(&id).expect("live").archived = true;
        true
    }

    pub fn contact(&self, id: &str) -> Option<FakeContact> {
        let p = self.portal();
        let n: u64 = id.parse().ok()?;
        let c = p.contacts.get(&n)?;
        Some(FakeContact {
            id: id.to_string(),
            properties: c.props.clone(),
            modified_at: c.modified,
            archived: c.archived,
        })
    }

    /// One current property value of a contact.
    pub fn property(&self, id: &str, name: &str) -> Option<String> {
        self.contact(id)?.properties.get(name).cloned()
    }

    /// Ids of the contacts that are not archived.
    pub fn contact_ids(&self) -> Vec<String> {
        self.portal()
            .contacts
            .iter()
            .filter(|(_, c)| !c.archived)
            .map(|(id, _)| id.to_string())
            .collect()
    }

    /// The fake clock (epoch ms) that stamps writes.
    pub fn now_ms(&self) -> i64 {
        self.portal().now_ms()
    }

    pub fn advance_clock(&self, by: Duration) {
        self.portal().clock_offset_ms += by.as_millis() as i64;
    }

    /// Stamps every write with `at` (forcing equal timestamps) until called with `None`.
    pub fn freeze_clock(&self, at: Option<i64>) {
        self.portal().frozen_at = at;
    }

    /// How long a write takes to become visible to search.
    pub fn set_index_lag(&self, lag: Duration) {
        self.portal().index_lag = lag;
    }

    /// Makes every pending write visible to search now.
    pub fn flush_index(&self) {
        let mut p = self.portal();
        let pending = std::mem::take(&mut p.pending);
        for (_, id, snapshot) in pending {
            if let Some(c) = p.contacts.get_mut(&id) {
                c.indexed = Some(snapshot);
            }
        }
    }

    pub fn set_limits(&self, limits: Limits) {
        let mut p = self.portal();
        p.limits = limits;
        p.sent.clear();
        p.searches.clear();
        p.daily_used = 0;
    }

    pub fn set_faults(&self, faults: Faults) {
        self.portal().faults = faults;
    }

    pub fn counts(&self) -> Counts {
        self.portal().counts
    }

    pub fn reset_counts(&self) {
        self.portal().counts = Counts::default();
    }

    /// Every access token issued so far expires now (the next use answers 401).
    pub fn expire_access_tokens(&self) {
        let now = Instant::now();
        for exp in self.portal().access_tokens.values_mut() {
            *exp = now;
        }
    }

    /// The refresh token stops working (an uninstalled app).
    pub fn revoke_refresh_token(&self) {
        self.portal().refresh_revoked = true;
    }

    pub fn set_scopes(&self, scopes: &[&str]) {
        self.portal().scopes = scopes.iter().map(|s| s.to_string()).collect();
    }

    pub fn has_property(&self, name: &str) -> bool {
        self.portal().properties.contains_key(name)
    }

    /// Deletes a contact property (a portal where it was never created, or was renamed).
    pub fn remove_property(&self, name: &str) {
        self.portal().properties.remove(name);
    }

    /// Creates an enumeration contact property with the options `opted_out` and `opted_in`
    /// (the marketing-consent property an operator created by hand).
    pub fn add_consent_enumeration(&self, name: &str) {
        self.portal().properties.insert(
            name.to_string(),
            PropertyDef {
                kind: PropKind::Enumeration,
                options: vec!["opted_out".into(), "opted_in".into()],
                read_only: false,
            },
        );
    }

    /// Replaces an enumeration property's options (an option renamed in the portal).
    pub fn set_property_options(&self, name: &str, options: &[&str]) {
        if let Some(d) = self.portal().properties.get_mut(name) {
            d.options = options.iter().map(|o| o.to_string()).collect();
        }
    }

    /// Every batch update naming this contact is refused as a whole (400), as HubSpot does
    /// for some invalid inputs.
    pub fn poison(&self, id: &str) {
        self.portal().poisoned.insert(id.to_string());
    }

    /// The next API request answers 429 (the ten-secondly limit) with `Retry-After` set to
    /// `retry_after` in whole seconds, at least one.
    pub fn throttle_next(&self, retry_after: Duration) {
        self.portal().throttle_next = Some(retry_after);
    }

    /// Stops the server (also done on drop).
    pub fn stop(self) {
        self.server.stop();
    }

    /// Stops the server and waits until its connections are closed.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

struct Shared {
    portal: Mutex<Portal>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Portal> {
        // A panicking test thread must not take every later request down with it.
        self.portal.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PropKind {
    Text,
    Number,
    DateTime,
    Enumeration,
}

struct PropertyDef {
    kind: PropKind,
    options: Vec<String>,
    read_only: bool,
}

struct Contact {
    /// Current values (without the computed `hs_object_id`, `createdate`, `lastmodifieddate`).
    props: BTreeMap<String, String>,
    created: i64,
    modified: i64,
    archived: bool,
    /// What search sees; `None` until the creating write is indexed.
    indexed: Option<Indexed>,
}

#[derive(Clone)]
struct Indexed {
    modified: i64,
    props: BTreeMap<String, String>,
}

struct Portal {
    contacts: BTreeMap<u64, Contact>,
    next_id: u64,
    properties: BTreeMap<String, PropertyDef>,
    index_lag: Duration,
    /// Writes waiting for the index: (visible at, contact, version).
    pending: Vec<(Instant, u64, Indexed)>,
    clock_offset_ms: i64,
    frozen_at: Option<i64>,
    limits: Limits,
    sent: VecDeque<Instant>,
    searches: VecDeque<Instant>,
    daily_used: u64,
    faults: Faults,
    rng: u64,
    counts: Counts,
    private_token: Option<String>,
    scopes: HashSet<String>,
    oauth: Option<FakeOAuth>,
    access_tokens: HashMap<String, Instant>,
    issued: u64,
    refresh_revoked: bool,
    poisoned: HashSet<String>,
    /// The next API request answers the ten-secondly 429 with this `Retry-After`.
    throttle_next: Option<Duration>,
}

enum Fault {
    Error(u16),
    Slow(Duration),
    Drop,
}

enum Endpoint {
    Search,
    BatchUpdate,
    Token,
    Other,
}

impl Portal {
    fn new(opts: FakeOptions) -> Portal {
        let mut properties = BTreeMap::new();
        let def = |kind, read_only| PropertyDef {
            kind,
            options: vec![],
            read_only,
        };
        for name in [
            "email",
            "firstname",
            "lastname",
            "phone",
            "mobilephone",
            "hs_whatsapp_phone_number",
        ] {
            properties.insert(name.to_string(), def(PropKind::Text, false));
        }
        properties.insert("hs_object_id".into(), def(PropKind::Number, true));
        properties.insert("createdate".into(), def(PropKind::DateTime, true));
        properties.insert("lastmodifieddate".into(), def(PropKind::DateTime, true));
        if opts.consent_properties {
            let [consent, changed_at, source] = CONSENT_PROPERTIES;
            properties.insert(
                consent.into(),
                PropertyDef {
                    kind: PropKind::Enumeration,
                    options: vec!["opted_out".into(), "opted_in".into()],
                    read_only: false,
                },
            );
            properties.insert(changed_at.into(), def(PropKind::DateTime, false));
            properties.insert(source.into(), def(PropKind::Text, false));
        }
        Portal {
            contacts: BTreeMap::new(),
            next_id: 1,
            properties,
            index_lag: Duration::ZERO,
            pending: Vec::new(),
            clock_offset_ms: 0,
            frozen_at: None,
            limits: opts.limits,
            sent: VecDeque::new(),
            searches: VecDeque::new(),
            daily_used: 0,
            faults: Faults::default(),
            rng: 0x2545_f491_4f6c_dd1d,
            counts: Counts::default(),
            private_token: opts.token,
            scopes: opts.scopes.into_iter().collect(),
            oauth: opts.oauth,
            access_tokens: HashMap::new(),
            issued: 0,
            refresh_revoked: false,
            poisoned: HashSet::new(),
            throttle_next: None,
        }
    }

    fn now_ms(&self) -> i64 {
        self.frozen_at
            .unwrap_or_else(|| Timestamp::now().millis() + self.clock_offset_ms)
    }

    fn seed(&mut self, c: NewContact) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let modified = c.modified_at.unwrap_or_else(|| self.now_ms());
        let props: BTreeMap<String, String> = c.properties.into_iter().collect();
        let indexed = Some(Indexed {
            modified,
            props: props.clone(),
        });
        self.contacts.insert(
            id,
            Contact {
                props,
                created: modified,
                modified,
                archived: false,
                indexed,
            },
        );
        id
    }

    fn live_id(&self, id: &str) -> Option<u64> {
        let n: u64 = id.parse().ok()?;
        self.contacts.get(&n).filter(|c| !c.archived).map(|_| n)
    }

    /// Applies a write: new values, a new `lastmodifieddate`, and an index update that
    /// search sees after the lag.
    fn write(&mut self, id: u64, changes: &[(String, String)]) {
        let now = self.now_ms();
        let c = self
            .contacts
            .get_mut(&id)
            .expect("write to an existing contact");
        for (k, v) in changes {
            c.props.insert(k.clone(), v.clone());
        }
        c.modified = now;
        let snapshot = Indexed {
            modified: now,
            props: c.props.clone(),
        };
        if self.index_lag.is_zero() {
            c.indexed = Some(snapshot);
        } else {
            self.pending
                .push((Instant::now() + self.index_lag, id, snapshot));
        }
    }

    fn promote_due(&mut self) {
        let now = Instant::now();
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.pending = waiting;
        for (_, id, snapshot) in due {
            if let Some(c) = self.contacts.get_mut(&id) {
                c.indexed = Some(snapshot);
            }
        }
    }

    fn chance(&mut self, rate: f64) -> bool {
        if rate <= 0.0 {
            return false;
        }
        // xorshift64: deterministic, good enough for fault injection.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        ((self.rng >> 11) as f64 / (1u64 << 53) as f64) < rate
    }

    fn pick_fault(&mut self) -> Option<Fault> {
        let status = if self.faults.error_status == 0 {
            503
        } else {
            self.faults.error_status
        };
        let f = &mut self.faults;
        let fault = if f.drop_next > 0 {
            f.drop_next -= 1;
            Some(Fault::Drop)
        } else if f.error_next > 0 {
            f.error_next -= 1;
            Some(Fault::Error(status))
        } else if f.slow_next > 0 {
            f.slow_next -= 1;
            Some(Fault::Slow(f.slow_by))
        } else {
            let (drop, error, slow, slow_by) = (f.drop_rate, f.error_rate, f.slow_rate, f.slow_by);
            if self.chance(drop) {
                Some(Fault::Drop)
            } else if self.chance(error) {
                Some(Fault::Error(status))
            } else if self.chance(slow) {
                Some(Fault::Slow(slow_by))
            } else {
                None
            }
        };
        if fault.is_some() {
            self.counts.faults += 1;
        }
        fault
    }

    fn authenticate(&mut self, headers: &HeaderMap, scope: &str) -> Result<(), Response> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let refused = |category: &str, message: &str| {
            error(
                StatusCode::UNAUTHORIZED,
                json!({ "status": "error", "message": message, "category": category }),
            )
        };
        let verdict = match token {
            None => Err(refused(
                "INVALID_AUTHENTICATION",
                "Authentication credentials not found.",
            )),
            Some(t) if self.private_token.as_deref() == Some(t) => Ok(()),
            Some(t) => match self.access_tokens.get(t) {
                Some(exp) if Instant::now() < *exp => Ok(()),
                Some(_) => Err(refused(
                    "EXPIRED_AUTHENTICATION",
                    "The OAuth token used to make this call expired.",
                )),
                None => Err(refused(
                    "INVALID_AUTHENTICATION",
                    "Authentication credentials not found.",
                )),
            },
        };
        if verdict.is_err() {
            self.counts.unauthorized += 1;
            return verdict;
        }
        if !self.scopes.contains(scope) {
            self.counts.forbidden += 1;
            return Err(error(
                StatusCode::FORBIDDEN,
                json!({
                    "status": "error",
                    "message": "This app hasn't been granted all required scopes to make this call.",
                    "errors": [{ "message": "One or more of the following scopes are required.", "context": { "requiredGranularScopes": [scope] } }],
                    "category": "MISSING_SCOPES",
                }),
            ));
        }
        Ok(())
    }

    fn rate_check(&mut self, search: bool) -> Result<(), Response> {
        let now = Instant::now();
        let limited = |message: &str, policy: Option<&str>, retry_after: Option<u64>| {
            let mut body = json!({ "status": "error", "message": message, "errorType": "RATE_LIMIT", "correlationId": "fake" });
            if let Some(p) = policy {
                body["policyName"] = json!(p);
            }
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, body);
            if let Some(s) = retry_after {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(s));
            }
            r
        };
        let verdict = if let Some(wait) = self.throttle_next.take() {
            Err(limited(
                "You have reached your ten_secondly_rolling limit.",
                Some("TEN_SECONDLY_ROLLING"),
                Some(wait.as_secs().max(1)),
            ))
        } else if self.limits.daily.is_some_and(|d| self.daily_used >= d) {
            Err(limited(
                "You have reached your daily limit.",
                Some("DAILY"),
                None,
            ))
        } else if let Some(n) = self.limits.per_window {
            let window = self.limits.window;
            while self
                .sent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= window)
            {
                self.sent.pop_front();
            }
            if self.sent.len() >= n as usize {
                let wait = window - now.duration_since(self.sent[0]);
                Err(limited(
                    "You have reached your ten_secondly_rolling limit.",
                    Some("TEN_SECONDLY_ROLLING"),
                    Some(wait.as_secs_f64().ceil().max(1.0) as u64),
                ))
            } else {
                Ok(())
            }
        } else {
            Ok(())
        };
        let verdict = verdict.and_then(|()| match self.limits.search_per_second {
            Some(n) if search => {
                while self
                    .searches
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
                {
                    self.searches.pop_front();
                }
                if self.searches.len() >= n as usize {
                    Err(limited("You have reached your secondly limit.", None, None))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        });
        match verdict {
            Ok(()) => {
                self.sent.push_back(now);
                if search {
                    self.searches.push_back(now);
                }
                self.daily_used += 1;
                Ok(())
            }
            Err(r) => {
                self.counts.rate_limited += 1;
                Err(r)
            }
        }
    }

    fn count(&mut self, endpoint: &Endpoint) {
        let c = &mut self.counts;
        match endpoint {
            Endpoint::Search => c.search += 1,
            Endpoint::BatchUpdate => c.batch_update += 1,
            Endpoint::Token => c.token += 1,
            Endpoint::Other => c.other += 1,
        }
    }

    /// The value search or a read shows for a property of a (possibly indexed) version.
    fn shown(
        id: u64,
        created: i64,
        modified: i64,
        props: &BTreeMap<String, String>,
        name: &str,
    ) -> Option<String> {
        match name {
            "hs_object_id" => Some(id.to_string()),
            "createdate" => Some(Timestamp(created).to_rfc3339()),
            "lastmodifieddate" => Some(Timestamp(modified).to_rfc3339()),
            _ => props.get(name).filter(|v| !v.is_empty()).cloned(),
        }
    }

    fn object_json(&self, id: u64, names: &[String], version: &Indexed) -> Value {
        let c = &self.contacts[&id];
        let mut props = serde_json::Map::new();
        for name in names.iter().map(String::as_str).chain([
            "hs_object_id",
            "createdate",
            "lastmodifieddate",
        ]) {
            props.insert(
                name.to_string(),
                json!(Portal::shown(
                    id,
                    c.created,
                    version.modified,
                    &version.props,
                    name
                )),
            );
        }
        json!({
            "id": id.to_string(),
            "properties": props,
            "createdAt": Timestamp(c.created).to_rfc3339(),
            "updatedAt": Timestamp(version.modified).to_rfc3339(),
            "archived": false,
        })
    }

    fn search(&mut self, req: SearchRequest, body_len: usize) -> Response {
        self.promote_due();
        let bad = |message: String| {
            error(
                StatusCode::BAD_REQUEST,
                json!({ "status": "error", "message": message, "category": "VALIDATION_ERROR", "correlationId": "fake" }),
            )
        };
        let limit = req.limit.unwrap_or(10);
        if !(1..=200).contains(&limit) {
            return bad(format!("limit must be between 1 and 200, got {limit}"));
        }
        if body_len > 3_000 {
            return bad("The request body exceeds 3000 characters.".into());
        }
        let total_filters: usize = req.filter_groups.iter().map(|g| g.filters.len()).sum();
        if req.filter_groups.len() > 5
            || req.filter_groups.iter().any(|g| g.filters.len() > 6)
            || total_filters > 18
        {
            return bad("Too many filter groups or filters (at most 5 groups, 6 filters per group, 18 in total).".into());
        }
        if req.sorts.len() > 1 {
            return bad("Only one sort is supported.".into());
        }
        let offset: usize = match req.after.as_deref().map(str::parse).transpose() {
            Ok(o) => o.unwrap_or(0),
            Err(_) => return bad("after must be a number".into()),
        };
        if offset >= MAX_RESULTS {
            return bad(format!(
                "There was a problem with the request. Paging is limited to {MAX_RESULTS} results (after={offset})."
            ));
        }
        let groups: Vec<Vec<Cond>> = match req
            .filter_groups
            .iter()
            .map(|g| {
                g.filters
                    .iter()
                    .map(|f| Cond::compile(f, &self.properties))
                    .collect()
            })
            .collect()
        {
            Ok(g) => g,
            Err(m) => return bad(m),
        };
        let sort = req.sorts.first();
        let sort_name = sort.map(|s| s.property_name.as_str());
        let descending = sort.and_then(|s| s.direction.as_deref()) == Some("DESCENDING");
        let numeric_sort = sort_name.is_some_and(|n| self.is_numeric(n));

        let mut hits: Vec<(SortKey, u64, u64)> = Vec::new();
        for (&id, c) in &self.contacts {
            let Some(v) = c.indexed.as_ref().filter(|_| !c.archived) else {
                continue;
            };
            if !groups.is_empty()
                && !groups
                    .iter()
                    .any(|g| g.iter().all(|cond| cond.holds(id, c.created, v)))
            {
                continue;
            }
            let key = match sort_name {
                None => SortKey::Missing,
                Some(n) => match Portal::shown(id, c.created, v.modified, &v.props, n) {
                    None => SortKey::Missing,
                    Some(s) if numeric_sort => {
                        SortKey::Num(numeric(n, id, c.created, v.modified, &s).unwrap_or(i64::MIN))
                    }
                    Some(s) => SortKey::Str(s),
                },
            };
            hits.push((key, scramble(id), id));
        }
        let total = hits.len();
        let cmp = |a: &(SortKey, u64, u64), b: &(SortKey, u64, u64)| {
            let by_key = if descending {
                b.0.cmp(&a.0)
            } else {
                a.0.cmp(&b.0)
            };
            // Ties come back in a scrambled order, as at HubSpot: never by id.
            by_key.then(a.1.cmp(&b.1))
        };
        let end = (offset + limit as usize).min(total);
        if end < total {
            hits.select_nth_unstable_by(end, cmp);
            hits.truncate(end);
        }
        hits.sort_unstable_by(cmp);
        let results: Vec<Value> = hits
            .iter()
            .skip(offset)
            .map(|(_, _, id)| {
                self.object_json(
                    *id,
                    &req.properties,
                    self.contacts[id].indexed.as_ref().expect("indexed"),
                )
            })
            .collect();
        let mut body = json!({ "total": total, "results": results });
        if end < total {
            body["paging"] = json!({ "next": { "after": end.to_string() } });
        }
        Json(body).into_response()
    }

    fn is_numeric(&self, name: &str) -> bool {
        self.properties
            .get(name)
            .is_some_and(|d| matches!(d.kind, PropKind::Number | PropKind::DateTime))
    }

    fn batch_update(&mut self, req: BatchRequest) -> Response {
        let bad = |message: String| {
            error(
                StatusCode::BAD_REQUEST,
                json!({ "status": "error", "message": message, "category": "VALIDATION_ERROR", "correlationId": "fake" }),
            )
        };
        if req.inputs.is_empty() || req.inputs.len() > 100 {
            return bad(format!(
                "A batch must hold between 1 and 100 inputs, got {}.",
                req.inputs.len()
            ));
        }
        let mut ids = HashSet::new();
        if let Some(dup) = req.inputs.iter().find(|i| !ids.insert(i.id.as_str())) {
            return bad(format!(
                "Duplicate IDs found in batch input: [{}]. IDs must be unique",
                dup.id
            ));
        }
        if let Some(refusal) = self.invalid_properties(&req) {
            return refusal;
        }
        if let Some(p) = req.inputs.iter().find(|i| self.poisoned.contains(&i.id)) {
            return bad(format!(
                "Property values were not valid for contact {}",
                p.id
            ));
        }
        let started = Timestamp(self.now_ms()).to_rfc3339();
        let mut results = Vec::new();
        let mut errors = Vec::new();
        let mut missing = Vec::new();
        for input in req.inputs {
            let Some(id) = self.live_id(&input.id) else {
                missing.push(input.id);
                continue;
            };
            let mut changes = Vec::new();
            let mut problems = Vec::new();
            for (name, value) in input.properties {
                let value = match value {
                    Value::String(s) => s,
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                match self.check_value(&name, &value) {
                    Ok(v) => changes.push((name, v)),
                    Err(code) => problems.push(json!({ "isValid": false, "message": format!("{value:?} is not valid for {name}"), "error": code, "name": name })),
                }
            }
            if problems.is_empty() {
                self.write(id, &changes);
                let names: Vec<String> = changes.iter().map(|(k, _)| k.clone()).collect();
                let c = &self.contacts[&id];
                let now = Indexed {
                    modified: c.modified,
                    props: c.props.clone(),
                };
                results.push(self.object_json(id, &names, &now));
            } else {
                errors.push(json!({
                    "status": "error",
                    "category": "VALIDATION_ERROR",
                    "message": format!("Property values were not valid: {}", Value::Array(problems)),
                    "context": { "ids": [input.id] },
                }));
            }
        }
        if !missing.is_empty() {
            errors.push(json!({
                "status": "error",
                "category": "OBJECT_NOT_FOUND",
                "message": "Could not get some CONTACT objects, they may be deleted or not exist. Check that ids are valid.",
                "context": { "ids": missing },
            }));
        }
        let completed = Timestamp(self.now_ms()).to_rfc3339();
        let mut body = json!({ "status": "COMPLETE", "results": results, "startedAt": started, "completedAt": completed });
        if errors.is_empty() {
            return Json(body).into_response();
        }
        body["numErrors"] = json!(errors.len());
        body["errors"] = Value::Array(errors);
        (StatusCode::MULTI_STATUS, Json(body)).into_response()
    }

    /// Validates a value for a property; returns the value as stored or HubSpot's error code.
    fn check_value(&self, name: &str, value: &str) -> Result<String, &'static str> {
        let def = self.properties.get(name).ok_or("PROPERTY_DOESNT_EXIST")?;
        if def.read_only {
            return Err("READ_ONLY_VALUE");
        }
        if value.is_empty() {
            return Ok(String::new());
        }
        match def.kind {
            PropKind::Enumeration if !def.options.iter().any(|o| o == value) => {
                Err("INVALID_OPTION")
            }
            PropKind::DateTime => Timestamp::parse(value)
                .map(Timestamp::to_rfc3339)
                .ok_or("INVALID_DATETIME"),
            PropKind::Number if value.parse::<f64>().is_err() => Err("INVALID_INTEGER"),
            _ => Ok(value.to_string()),
        }
    }

    /// HubSpot refuses a whole batch (400, not a per-contact 207) when an input names a
    /// property that does not exist or an enumeration value that is not an option.
    fn invalid_properties(&self, req: &BatchRequest) -> Option<Response> {
        let mut errors = Vec::new();
        let mut listed = Vec::new();
        for (name, value) in req.inputs.iter().flat_map(|i| &i.properties) {
            let value = value.as_str().unwrap_or_default();
            let (code, message) = match self.properties.get(name) {
                None => (
                    "PROPERTY_DOESNT_EXIST",
                    format!("Property \"{name}\" does not exist"),
                ),
                Some(d)
                    if d.kind == PropKind::Enumeration
                        && !value.is_empty()
                        && !d.options.iter().any(|o| o == value) =>
                {
                    (
                        "INVALID_OPTION",
                        format!(
                            "{value:?} was not one of the allowed options: [{}]",
                            d.options.join(", ")
                        ),
                    )
                }
                _ => continue,
            };
            if errors
                .iter()
                .any(|e: &Value| e["message"] == json!(message))
            {
                continue;
            }
            listed.push(json!({ "isValid": false, "message": message, "error": code, "name": name, "localizedErrorMessage": message }));
            errors.push(
                json!({ "message": message, "code": code, "context": { "propertyName": [name] } }),
            );
        }
        if errors.is_empty() {
            return None;
        }
        Some(error(
            StatusCode::BAD_REQUEST,
            json!({
                "status": "error",
                "message": format!("Property values were not valid: {}", Value::Array(listed)),
                "correlationId": "fake",
                "category": "VALIDATION_ERROR",
                "errors": errors,
            }),
        ))
    }

    /// `GET /crm/v3/properties/contacts/{name}`: the definition, or 404.
    fn property_json(&self, name: &str) -> Response {
        let Some(d) = self.properties.get(name) else {
            return error(
                StatusCode::NOT_FOUND,
                json!({ "status": "error", "message": format!("Unable to find property named '{name}' for object type 0-1"), "category": "OBJECT_NOT_FOUND", "correlationId": "fake" }),
            );
        };
        let (kind, field) = match d.kind {
            PropKind::Text => ("string", "text"),
            PropKind::Number => ("number", "number"),
            PropKind::DateTime => ("datetime", "date"),
            PropKind::Enumeration => ("enumeration", "select"),
        };
        let options: Vec<Value> = (d.options.iter().enumerate())
            .map(|(i, o)| json!({ "label": o, "value": o, "displayOrder": i, "hidden": false }))
            .collect();
        Json(json!({
            "name": name, "label": name, "type": kind, "fieldType": field,
            "groupName": "contactinformation", "options": options, "hidden": false,
            "modificationMetadata": { "archivable": true, "readOnlyDefinition": false, "readOnlyValue": d.read_only },
        }))
        .into_response()
    }

    fn create_property(&mut self, def: Value) -> Response {
        let name = def["name"].as_str().unwrap_or_default().to_string();
        let kind = match def["type"].as_str() {
            Some("string") => PropKind::Text,
            Some("number") => PropKind::Number,
            Some("datetime") | Some("date") => PropKind::DateTime,
            Some("enumeration") => PropKind::Enumeration,
            _ => PropKind::Text,
        };
        if name.is_empty() || def["type"].as_str().is_none() || def["groupName"].as_str().is_none()
        {
            return error(
                StatusCode::BAD_REQUEST,
                json!({ "status": "error", "message": "name, type and groupName are required", "category": "VALIDATION_ERROR" }),
            );
        }
        if self.properties.contains_key(&name) {
            return error(
                StatusCode::CONFLICT,
                json!({ "status": "error", "message": format!("Property named '{name}' already exists."), "category": "OBJECT_ALREADY_EXISTS" }),
            );
        }
        // Like HubSpot's `OptionInput`: `label`, `value`, `displayOrder` and `hidden` are
        // required on every option.
        let raw_options = def["options"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if let Some(bad) = raw_options.iter().find(|o| {
            !(o["label"].is_string()
                && o["value"].is_string()
                && o["displayOrder"].is_i64()
                && o["hidden"].is_boolean())
        }) {
            return error(
                StatusCode::BAD_REQUEST,
                json!({ "status": "error", "message": format!("Invalid input JSON: an option needs label, value, displayOrder and hidden: {bad}"), "category": "VALIDATION_ERROR" }),
            );
        }
        let options: Vec<String> = raw_options
            .iter()
            .filter_map(|o| o["value"].as_str().map(String::from))
            .collect();
        if kind == PropKind::Enumeration && options.is_empty() {
            return error(
                StatusCode::BAD_REQUEST,
                json!({ "status": "error", "message": "enumeration properties need options", "category": "VALIDATION_ERROR" }),
            );
        }
        self.properties.insert(
            name,
            PropertyDef {
                kind,
                options,
                read_only: false,
            },
        );
        (StatusCode::CREATED, Json(def)).into_response()
    }
}

/// A compiled search filter.
enum Cond {
    Num {
        name: String,
        op: Op,
        lo: i64,
        hi: i64,
    },
    Text {
        name: String,
        op: Op,
        values: Vec<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    Between,
    In,
    NotIn,
    Has,
    NotHas,
}

impl Cond {
    fn compile(f: &Filter, defs: &BTreeMap<String, PropertyDef>) -> Result<Cond, String> {
        let op = match f.operator.as_str() {
            "EQ" => Op::Eq,
            "NEQ" => Op::Neq,
            "LT" => Op::Lt,
            "LTE" => Op::Lte,
            "GT" => Op::Gt,
            "GTE" => Op::Gte,
            "BETWEEN" => Op::Between,
            "IN" => Op::In,
            "NOT_IN" => Op::NotIn,
            "HAS_PROPERTY" => Op::Has,
            "NOT_HAS_PROPERTY" => Op::NotHas,
            other => return Err(format!("Unsupported filter operator {other}")),
        };
        let name = f.property_name.clone();
        let value = f.value.clone();
        let needs_value = !matches!(op, Op::Has | Op::NotHas | Op::In | Op::NotIn);
        if needs_value && value.is_none() {
            return Err(format!(
                "Filter on {name} with {} needs a value",
                f.operator
            ));
        }
        let numeric_prop = defs
            .get(&name)
            .is_some_and(|d| matches!(d.kind, PropKind::Number | PropKind::DateTime));
        if numeric_prop && needs_value {
            let parse = |v: &str| {
                v.parse::<i64>()
                    .ok()
                    .or_else(|| Timestamp::parse(v).map(Timestamp::millis))
            };
            let lo = value.as_deref().and_then(parse).ok_or_else(|| {
                format!("{name}: {value:?} is not a number or epoch-ms timestamp")
            })?;
            let hi = match op {
                Op::Between => f
                    .high_value
                    .as_deref()
                    .and_then(parse)
                    .ok_or_else(|| format!("{name}: BETWEEN needs highValue"))?,
                _ => lo,
            };
            return Ok(Cond::Num { name, op, lo, hi });
        }
        let values = match op {
            Op::In | Op::NotIn => f.values.clone(),
            _ => value.into_iter().collect(),
        };
        Ok(Cond::Text { name, op, values })
    }

    fn holds(&self, id: u64, created: i64, v: &Indexed) -> bool {
        match self {
            Cond::Num { name, op, lo, hi } => {
                let Some(x) = Portal::shown(id, created, v.modified, &v.props, name)
                    .and_then(|s| numeric(name, id, created, v.modified, &s))
                else {
                    return *op == Op::Neq;
                };
                match op {
                    Op::Eq => x == *lo,
                    Op::Neq => x != *lo,
                    Op::Lt => x < *lo,
                    Op::Lte => x <= *lo,
                    Op::Gt => x > *lo,
                    Op::Gte => x >= *lo,
                    Op::Between => (*lo..=*hi).contains(&x),
                    _ => false,
                }
            }
            Cond::Text { name, op, values } => {
                let x = Portal::shown(id, created, v.modified, &v.props, name);
                let first = values.first().map(String::as_str).unwrap_or("");
                match (op, x.as_deref()) {
                    (Op::Has, x) => x.is_some(),
                    (Op::NotHas, x) => x.is_none(),
                    (Op::Neq, None) | (Op::NotIn, None) => true,
                    (_, None) => false,
                    (Op::Eq, Some(x)) => x == first,
                    (Op::Neq, Some(x)) => x != first,
                    (Op::Lt, Some(x)) => x < first,
                    (Op::Lte, Some(x)) => x <= first,
                    (Op::Gt, Some(x)) => x > first,
                    (Op::Gte, Some(x)) => x >= first,
                    (Op::In, Some(x)) => values.iter().any(|v| v == x),
                    (Op::NotIn, Some(x)) => !values.iter().any(|v| v == x),
                    (Op::Between, Some(_)) => false,
                }
            }
        }
    }
}

/// A numeric view of a property value; the computed properties avoid re-parsing.
fn numeric(name: &str, id: u64, created: i64, modified: i64, shown: &str) -> Option<i64> {
    match name {
        "hs_object_id" => Some(id as i64),
        "createdate" => Some(created),
        "lastmodifieddate" => Some(modified),
        _ => shown
            .parse::<i64>()
            .ok()
            .or_else(|| Timestamp::parse(shown).map(Timestamp::millis)),
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum SortKey {
    Missing,
    Num(i64),
    Str(String),
}

/// A fixed permutation of ids, so ties are not returned in id order.
fn scramble(id: u64) -> u64 {
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    x.wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

fn error(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SearchRequest {
    #[serde(default)]
    filter_groups: Vec<FilterGroup>,
    #[serde(default)]
    sorts: Vec<SortSpec>,
    #[serde(default)]
    properties: Vec<String>,
    limit: Option<i64>,
    after: Option<String>,
}

#[derive(Deserialize)]
struct FilterGroup {
    #[serde(default)]
    filters: Vec<Filter>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filter {
    property_name: String,
    operator: String,
    value: Option<String>,
    high_value: Option<String>,
    #[serde(default)]
    values: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SortSpec {
    property_name: String,
    direction: Option<String>,
}

#[derive(Deserialize)]
struct BatchRequest {
    inputs: Vec<BatchInput>,
}

#[derive(Deserialize)]
struct BatchInput {
    id: String,
    #[serde(default)]
    properties: BTreeMap<String, Value>,
}

/// Counts the request, injects a fault, then checks authentication, scope and rate limits.
async fn admit(
    shared: &Shared,
    endpoint: Endpoint,
    headers: &HeaderMap,
    scope: &str,
) -> Result<(), Response> {
    let fault = {
        let mut p = shared.lock();
        p.count(&endpoint);
        p.pick_fault()
    };
    match fault {
        Some(Fault::Error(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Err(error(
                status,
                json!({ "status": "error", "message": "internal error (injected)", "category": "INTERNAL_ERROR" }),
            ));
        }
        Some(Fault::Drop) => return Err(cut_short()),
        Some(Fault::Slow(by)) => tokio::time::sleep(by).await,
        None => {}
    }
    let mut p = shared.lock();
    p.authenticate(headers, scope)?;
    p.rate_check(matches!(endpoint, Endpoint::Search))
}

async fn search(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: String) -> Response {
    if let Err(r) = admit(&shared, Endpoint::Search, &headers, READ_SCOPE).await {
        return r;
    }
    match serde_json::from_str::<SearchRequest>(&body) {
        Ok(req) => shared.lock().search(req, body.len()),
        Err(e) => invalid_json(e),
    }
}

async fn batch_update(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Err(r) = admit(&shared, Endpoint::BatchUpdate, &headers, WRITE_SCOPE).await {
        return r;
    }
    match serde_json::from_str::<BatchRequest>(&body) {
        Ok(req) => shared.lock().batch_update(req),
        Err(e) => invalid_json(e),
    }
}

async fn create_property(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Err(r) = admit(&shared, Endpoint::Other, &headers, SCHEMA_SCOPE).await {
        return r;
    }
    match serde_json::from_str::<Value>(&body) {
        Ok(def) => shared.lock().create_property(def),
        Err(e) => invalid_json(e),
    }
}

async fn read_property(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    if let Err(r) = admit(&shared, Endpoint::Other, &headers, READ_SCOPE).await {
        return r;
    }
    shared.lock().property_json(&name)
}

/// `GET /oauth/v1/access-tokens/{token}`: what HubSpot knows of an OAuth access token
/// (not of a private-app token, which it answers 404 for). Needs no authorization header.
async fn token_info(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(token): axum::extract::Path<String>,
) -> Response {
    let mut p = shared.lock();
    p.count(&Endpoint::Token);
    let left = p
        .access_tokens
        .get(&token)
        .map(|exp| exp.saturating_duration_since(Instant::now()));
    match left {
        Some(left) if !left.is_zero() => {
            let mut scopes: Vec<&String> = p.scopes.iter().collect();
            scopes.sort();
            Json(json!({
                "token": token, "user": "integration@example.com", "hub_domain": "fake.hubspot.com",
                "scopes": scopes, "hub_id": 62515, "app_id": 456789, "expires_in": left.as_secs(),
                "user_id": 123456, "token_type": "access",
            }))
            .into_response()
        }
        _ => error(
            StatusCode::NOT_FOUND,
            json!({ "status": "error", "message": "The access token is expired or unknown", "category": "OBJECT_NOT_FOUND" }),
        ),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn list(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(r) = admit(&shared, Endpoint::Other, &headers, READ_SCOPE).await {
        return r;
    }
    let limit = q.limit.unwrap_or(10);
    if limit > 100 {
        return error(
            StatusCode::BAD_REQUEST,
            json!({ "status": "error", "message": "limit is at most 100", "category": "VALIDATION_ERROR" }),
        );
    }
    let p = shared.lock();
    let results: Vec<Value> = p
        .contacts
        .iter()
        .filter(|(_, c)| !c.archived)
        .take(limit)
        .map(|(id, c)| {
            p.object_json(
                *id,
                &[],
                &Indexed {
                    modified: c.modified,
                    props: c.props.clone(),
                },
            )
        })
        .collect();
    Json(json!({ "results": results })).into_response()
}

async fn token(
    State(shared): State<Arc<Shared>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut p = shared.lock();
    p.count(&Endpoint::Token);
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let refused = |status: &str, message: &str| {
        error(
            StatusCode::BAD_REQUEST,
            json!({ "status": status, "message": message }),
        )
    };
    let Some(app) = p.oauth.clone() else {
        return refused("BAD_CLIENT_ID", "no OAuth app is installed in this portal");
    };
    if field("grant_type") != "refresh_token" {
        return refused("UNSUPPORTED_GRANT_TYPE", "grant_type must be refresh_token");
    }
    if field("client_id") != app.client_id || field("client_secret") != app.client_secret {
        return refused("BAD_CLIENT_ID", "missing or invalid client id or secret");
    }
    if field("refresh_token") != app.refresh_token || p.refresh_revoked {
        return refused("BAD_REFRESH_TOKEN", "missing or unknown refresh token");
    }
    p.issued += 1;
    let access = format!("fake-access-{}", p.issued);
    let lifetime = Duration::from_secs(app.expires_in.as_secs().max(1));
    p.access_tokens
        .insert(access.clone(), Instant::now() + lifetime);
    Json(json!({
        "access_token": access,
        "refresh_token": app.refresh_token,
        "expires_in": lifetime.as_secs(),
        "token_type": "bearer",
        "token_use": "access_token",
    }))
    .into_response()
}

async fn not_found(State(shared): State<Arc<Shared>>) -> Response {
    shared.lock().count(&Endpoint::Other);
    error(
        StatusCode::NOT_FOUND,
        json!({ "status": "error", "message": "resource not found", "category": "OBJECT_NOT_FOUND" }),
    )
}

fn invalid_json(e: serde_json::Error) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        json!({ "status": "error", "message": format!("Invalid input JSON: {e}"), "category": "VALIDATION_ERROR" }),
    )
}

/// Every answer carries the fake clock as its `Date`, as HubSpot's carry the server's.
async fn add_date(State(shared): State<Arc<Shared>>, mut resp: Response) -> Response {
    let now = Timestamp(shared.lock().now_ms()).to_datetime();
    let date = now.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    if let Ok(v) = HeaderValue::from_str(&date) {
        resp.headers_mut().insert(header::DATE, v);
    }
    resp
}

/// A 200 whose body stops after its first bytes: the connection is closed mid-response.
fn cut_short() -> Response {
    struct CutBody {
        sent: bool,
    }
    impl http_body::Body for CutBody {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            if self.sent {
                Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection dropped (injected)",
                ))))
            } else {
                self.sent = true;
                Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                    b"{\"results\":[{\"id\":",
                )))))
            }
        }
    }
    let mut r = Response::new(Body::new(CutBody { sent: false }));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
