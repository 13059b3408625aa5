//! A stateful fake Salesforce org on 127.0.0.1, for tests and the daemon's `demo` command.
//!
//! It behaves like the real service where the connector depends on it: the token endpoint
//! for client credentials and JWT bearer (the RS256 signature and the iss/sub/aud/exp claims
//! really verified), sessions that expire (401 `INVALID_SESSION_ID`), Contacts, Leads and
//! MessagingEndUsers with `SystemModstamp` bumped on every write, real SOQL parsing and
//! evaluation (`fake::soql`), `nextRecordsUrl` paging with query locators honouring
//! `Sforce-Query-Options: batchSize`, sObject Collections updates with per-record errors
//! (and a request-level 400 `INVALID_FIELD` when a record names a field its object lacks),
//! `sobjects/{Object}/describe` (fields with `updateable`). Contacts and Leads carry the
//! consent checkbox, its change-time and source fields, and a marketing-consent checkbox
//! `WhatsApp_Marketing_Opt_Out__c` (`remove_field` models an org without one);
//! `Sforce-Limit-Info` on every data response and 403 `REQUEST_LIMIT_EXCEEDED` once the daily
//! allocation is used, plus injected faults (5xx, slow answers, dropped connections, malformed
//! JSON, row locks) and request counters per endpoint.
//!
//! Salesforce REST does not answer 429; its throttles are the 403 above (daily total) and
//! `REQUEST_LIMIT_EXCEEDED` for concurrent long requests, so the fake has no 429.
//!
//! ```no_run
//! # async fn demo() {
//! use optout_salesforce::fake::{self, FakeOptions};
//! let org = fake::start(FakeOptions::default()).await;
//! let id = org.insert("Contact", serde_json::json!({"LastName": "Ng", "MobilePhone": "+15550100001"}));
//! // point the connector's login_url at org.base_url(), client_id/secret at FakeOptions'
//! # let _ = id;
//! # }
//! ```

mod soql;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Form, Json, Router};
use chrono::{TimeZone, Utc};
use optout_core::Timestamp;
use optout_core::testkit::FakeServer;
use serde::Deserialize;
use serde_json::{Map, Value, json};

pub use soql::{Literal, SyntaxError, parse as parse_soql};

/// What the fake trusts and how it misbehaves.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// Client credentials accepted by the token endpoint.
    pub client_id: String,
    pub client_secret: String,
    /// Accept JWT bearer logins signed by this key.
    pub jwt: Option<JwtTrust>,
    /// How long an access token works.
    pub token_ttl: Duration,
    /// The org's daily API allocation.
    pub api_limit: u64,
    pub faults: Faults,
    /// Seed of the fault dice, so a failing run can be repeated.
    pub seed: u64,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            client_id: "fake-client-id".into(),
            client_secret: "fake-client-secret".into(),
            jwt: None,
            token_ttl: Duration::from_secs(2 * 3600),
            api_limit: 100_000,
            faults: Faults::default(),
            seed: 0x5eed,
        }
    }
}

/// The connected app's JWT settings: the certificate's public key and who may log in.
#[derive(Clone, Debug)]
pub struct JwtTrust {
    /// `-----BEGIN PUBLIC KEY-----` (SPKI) or `-----BEGIN RSA PUBLIC KEY-----` PEM.
    pub public_key_pem: String,
    /// The consumer key (`iss`).
    pub client_id: String,
    /// The pre-approved user (`sub`).
    pub username: String,
    /// The expected `aud`.
    pub audience: String,
}

/// Fault rates (0.0–1.0) applied to data calls (query, query more, collections, limits).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Answer 503 `SERVER_UNAVAILABLE` without doing anything.
    pub server_error_rate: f64,
    /// Do the work, then cut the connection while sending the answer.
    pub drop_rate: f64,
    /// Do the work, then send a truncated JSON body.
    pub malformed_rate: f64,
    /// Wait `slow_delay` before answering.
    pub slow_rate: f64,
    pub slow_delay: Duration,
    /// Fail a collections record with `UNABLE_TO_LOCK_ROW`.
    pub lock_rate: f64,
}

/// Requests seen, per endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub token: u64,
    pub query: u64,
    pub query_more: u64,
    pub collections: u64,
    /// Records in all collections requests.
    pub collection_records: u64,
    pub limits: u64,
    /// `sobjects/{Object}/describe` calls.
    pub describe: u64,
    /// 401 answers to data calls.
    pub unauthorized: u64,
    /// 403 `REQUEST_LIMIT_EXCEEDED` answers.
    pub limit_exceeded: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Id,
    Text,
    Bool,
    DateTime,
    /// A restricted picklist.
    Picklist(&'static [&'static str]),
}

#[derive(Clone, Debug)]
struct FieldDef {
    name: String,
    kind: Kind,
    updatable: bool,
}

const CONSENT_STATUSES: &[&str] = &[
    "ImplicitlyOptedIn",
    "ExplicitlyOptedIn",
    "DoublyOptedIn",
    "OptedOut",
];
const MESSAGE_TYPES: &[&str] = &[
    "WhatsApp",
    "Text",
    "Phone",
    "Facebook",
    "Voice",
    "EmbeddedMessaging",
    "AppleBusinessChat",
    "Custom",
];

fn schema(object: &str) -> Option<(&'static str, Vec<FieldDef>)> {
    let f = |name: &str, kind: Kind, updatable: bool| FieldDef {
        name: name.into(),
        kind,
        updatable,
    };
    let system = |v: &mut Vec<FieldDef>| {
        v.push(f("SystemModstamp", Kind::DateTime, false));
        v.push(f("LastModifiedDate", Kind::DateTime, false));
    };
    let person = |extra: &[FieldDef]| {
        let mut v = vec![
            f("Id", Kind::Id, false),
            f("FirstName", Kind::Text, true),
            f("LastName", Kind::Text, true),
            f("Email", Kind::Text, true),
            f("Phone", Kind::Text, true),
            f("MobilePhone", Kind::Text, true),
            f("WhatsApp_Opt_Out__c", Kind::Bool, true),
            f("WhatsApp_Consent_Changed_At__c", Kind::DateTime, true),
            f("WhatsApp_Consent_Source__c", Kind::Text, true),
            // The marketing-consent checkbox an org may add (`marketing_field`).
            f("WhatsApp_Marketing_Opt_Out__c", Kind::Bool, true),
        ];
        v.extend_from_slice(extra);
        system(&mut v);
        v
    };
    match object.to_ascii_lowercase().as_str() {
        "contact" => Some(("Contact", person(&[]))),
        "lead" => Some(("Lead", person(&[f("Company", Kind::Text, true)]))),
        "messagingenduser" => {
            let mut v = vec![
                f("Id", Kind::Id, false),
                f("Name", Kind::Text, true),
                f("MessageType", Kind::Picklist(MESSAGE_TYPES), false),
                // Create-only in Salesforce: a new number means a new row.
                f("MessagingPlatformKey", Kind::Text, false),
                f(
                    "MessagingConsentStatus",
                    Kind::Picklist(CONSENT_STATUSES),
                    true,
                ),
                f("ContactId", Kind::Id, true),
                f("LeadId", Kind::Id, true),
            ];
            system(&mut v);
            Some(("MessagingEndUser", v))
        }
        _ => None,
    }
}

fn id_prefix(object: &str) -> &'static str {
    match object {
        "Contact" => "003",
        "Lead" => "00Q",
        _ => "0PA",
    }
}

struct Row {
    object: String,
    fields: BTreeMap<String, Value>,
    modstamp: i64,
    /// False until an open transaction commits (commit lag).
    visible: bool,
    deleted: bool,
}

struct Locator {
    rows: Vec<Value>,
    batch: usize,
}

struct OrgState {
    schemas: HashMap<String, Vec<FieldDef>>,
    rows: BTreeMap<String, Row>,
    next_id: u64,
    clock: i64,
    tokens: HashMap<String, Instant>,
    next_token: u64,
    token_ttl: Duration,
    refuse_sessions: bool,
    locators: HashMap<String, Locator>,
    next_locator: u64,
    used: u64,
    limit: u64,
    counters: Counters,
    faults: Faults,
    locked: HashSet<String>,
    rng: u64,
    /// The next data call answers 429 with this `Retry-After`.
    throttle_next: Option<Duration>,
}

impl OrgState {
    /// A fresh `SystemModstamp`: now in whole seconds, as Salesforce stores it, and never
    /// earlier than the previous one. Rows written within one second share a stamp, as
    /// they do in a real org under a bulk load.
    fn tick(&mut self) -> i64 {
        self.clock = whole_second(Utc::now().timestamp_millis()).max(self.clock);
        self.clock
    }

    fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        // xorshift64*: deterministic per seed, good enough for dice.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((r >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn field<'a>(&'a self, object: &str, name: &str) -> Option<&'a FieldDef> {
        self.schemas
            .get(object)?
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
    }

    fn insert_row(
        &mut self,
        object: &str,
        id: Option<&str>,
        fields: Value,
        modstamp: Option<i64>,
        visible: bool,
    ) -> String {
        let (canonical, _) = schema(object).unwrap_or_else(|| panic!("the fake has no {object}"));
        let id = match id {
            Some(id) => id.to_string(),
            None => {
                self.next_id += 1;
                format!("{}FK{:010}AAA", id_prefix(canonical), self.next_id)
            }
        };
        let mut row = Row {
            object: canonical.to_string(),
            fields: BTreeMap::new(),
            modstamp: modstamp.map_or_else(|| self.tick(), whole_second),
            visible,
            deleted: false,
        };
        // Checkboxes are never empty in Salesforce: unchecked is false.
        for def in &self.schemas[canonical] {
            if def.kind == Kind::Bool {
                row.fields.insert(def.name.clone(), json!(false));
            }
        }
        for (k, v) in fields.as_object().cloned().unwrap_or_default() {
            let def = self
                .field(canonical, &k)
                .unwrap_or_else(|| panic!("{canonical} has no field {k}"))
                .clone();
            row.fields.insert(def.name, v);
        }
        row.fields
            .insert("LastModifiedDate".into(), json!(sf_time(row.modstamp)));
        self.rows.insert(id.clone(), row);
        id
    }

    fn value_of(&self, id: &str, row: &Row, name: &str) -> Value {
        match name {
            "Id" => json!(id),
            "SystemModstamp" => json!(sf_time(row.modstamp)),
            _ => row.fields.get(name).cloned().unwrap_or(Value::Null),
        }
    }
}

/// Salesforce datetimes are whole seconds: a stamp given with milliseconds (a test's
/// `insert_at`) is stored rounded down, as Salesforce would store it.
fn whole_second(ms: i64) -> i64 {
    ms - ms.rem_euclid(1000)
}

/// Salesforce's JSON datetime form: milliseconds (`.000` for system stamps) and an offset
/// without a colon.
fn sf_time(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3f+0000").to_string())
        .unwrap_or_default()
}

fn literal_of(kind: Kind, v: &Value) -> Literal {
    match (kind, v) {
        (_, Value::Null) => Literal::Null,
        (Kind::Bool, Value::Bool(b)) => Literal::Bool(*b),
        (Kind::DateTime, Value::String(s)) => Timestamp::parse(s)
            .map(|t| Literal::DateTime(t.millis()))
            .unwrap_or(Literal::Null),
        (_, Value::String(s)) => Literal::Str(s.clone()),
        (_, Value::Number(n)) => Literal::Number(n.as_f64().unwrap_or(0.0)),
        (_, Value::Bool(b)) => Literal::Bool(*b),
        _ => Literal::Null,
    }
}

struct Shared {
    state: Mutex<OrgState>,
    opts: FakeOptions,
    base_url: String,
}

/// The running fake. Dropping it stops the server.
pub struct FakeHandle {
    shared: Arc<Shared>,
    server: FakeServer,
}

/// Starts the fake on 127.0.0.1 on a free port.
pub async fn start(opts: FakeOptions) -> FakeHandle {
    let mut schemas = HashMap::new();
    for o in ["Contact", "Lead", "MessagingEndUser"] {
        let (name, fields) = schema(o).expect("known object");
        schemas.insert(name.to_string(), fields);
    }
    let state = OrgState {
        schemas,
        rows: BTreeMap::new(),
        next_id: 0,
        clock: 0,
        tokens: HashMap::new(),
        next_token: 0,
        token_ttl: opts.token_ttl,
        refuse_sessions: false,
        locators: HashMap::new(),
        next_locator: 0,
        used: 0,
        limit: opts.api_limit,
        counters: Counters::default(),
        faults: opts.faults.clone(),
        locked: HashSet::new(),
        rng: opts.seed.max(1),
        throttle_next: None,
    };
    // Answers name the instance URL, so the router is built once the port is known.
    let mut shared = None;
    let server = FakeServer::start_with(|addr| {
        let s = Arc::new(Shared {
            state: Mutex::new(state),
            opts,
            base_url: format!("http://{addr}"),
        });
        shared = Some(s.clone());
        Router::new()
            .route("/services/oauth2/token", post(token))
            .route("/services/data/{ver}/query", get(query))
            .route("/services/data/{ver}/query/{locator}", get(query_more))
            .route(
                "/services/data/{ver}/composite/sobjects",
                patch(collections),
            )
            .route("/services/data/{ver}/limits", get(limits))
            .route(
                "/services/data/{ver}/sobjects/{object}/describe",
                get(describe),
            )
            .with_state(s)
    })
    .await;
    FakeHandle {
        shared: shared.expect("the router was built"),
        server,
    }
}

impl FakeHandle {
    /// `http://127.0.0.1:<port>`: the login URL and the instance URL alike.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn options(&self) -> &FakeOptions {
        &self.shared.opts
    }

    fn state(&self) -> std::sync::MutexGuard<'_, OrgState> {
        self.shared.state.lock().unwrap()
    }

    /// Creates a committed record with a fresh `SystemModstamp`; returns its id. `fields` is a
    /// JSON object of field values (unknown fields panic: that is a bug in the test).
    pub fn insert(&self, object: &str, fields: Value) -> String {
        self.state().insert_row(object, None, fields, None, true)
    }

    /// Seeds a small org for the demo: one number (+1 555 010 0001) on a Contact (in another
    /// format), a Lead and a WhatsApp MessagingEndUser, plus unrelated records. Returns the
    /// ids of the three records holding that number.
    pub fn seed_demo(&self) -> Vec<String> {
        let shared = vec![
            self.insert(
                "Contact",
                json!({"FirstName": "Ana", "LastName": "Silva", "MobilePhone": "+1 (555) 010-0001"}),
            ),
            self.insert(
                "Lead",
                json!({"LastName": "Silva", "Company": "Acme", "Phone": "15550100001"}),
            ),
            self.insert(
                "MessagingEndUser",
                json!({"Name": "Ana on WhatsApp", "MessageType": "WhatsApp",
                       "MessagingPlatformKey": "whatsapp:+15550100001",
                       "MessagingConsentStatus": "ImplicitlyOptedIn"}),
            ),
        ];
        self.insert(
            "Contact",
            json!({"FirstName": "Ben", "LastName": "Okafor", "Phone": "+44 20 7946 0958"}),
        );
        self.insert(
            "Contact",
            json!({"FirstName": "Chen", "LastName": "Wei", "MobilePhone": "+15550100002",
                   "WhatsApp_Opt_Out__c": true}),
        );
        shared
    }

    /// Creates a committed record with the given `SystemModstamp` (ties, old rows).
    pub fn insert_at(&self, object: &str, fields: Value, modstamp: Timestamp) -> String {
        self.state()
            .insert_row(object, None, fields, Some(modstamp.millis()), true)
    }

    /// Creates a record with a chosen id (any string, for escaping tests).
    pub fn insert_with_id(&self, object: &str, id: &str, fields: Value, modstamp: Timestamp) {
        self.state()
            .insert_row(object, Some(id), fields, Some(modstamp.millis()), true);
    }

    /// Creates a record inside a transaction that has not committed yet: invisible to
    /// queries until [`FakeHandle::commit`], and then with this (older) `SystemModstamp`.
    pub fn insert_uncommitted(&self, object: &str, fields: Value, modstamp: Timestamp) -> String {
        self.state()
            .insert_row(object, None, fields, Some(modstamp.millis()), false)
    }

    /// Commits a record made by [`FakeHandle::insert_uncommitted`], keeping its timestamp.
    pub fn commit(&self, id: &str) {
        self.state().rows.get_mut(id).expect("known id").visible = true;
    }

    /// Changes fields as a user would, bumping `SystemModstamp`.
    pub fn update(&self, id: &str, fields: Value) {
        let mut s = self.state();
        let t = s.tick();
        let object = s.rows.get(id).expect("known id").object.clone();
        let mut defs = Vec::new();
        for (k, v) in fields.as_object().cloned().unwrap_or_default() {
            let def = s.field(&object, &k).expect("known field").name.clone();
            defs.push((def, v));
        }
        let row = s.rows.get_mut(id).expect("known id");
        row.fields.extend(defs);
        row.modstamp = t;
        row.fields
            .insert("LastModifiedDate".into(), json!(sf_time(t)));
    }

    /// Sets a record's `SystemModstamp` (to force ties or age a record).
    pub fn set_modstamp(&self, id: &str, t: Timestamp) {
        self.state().rows.get_mut(id).expect("known id").modstamp = whole_second(t.millis());
    }

    /// Moves a record to the recycle bin: queries skip it, updates fail `ENTITY_IS_DELETED`.
    pub fn delete(&self, id: &str) {
        self.state().rows.get_mut(id).expect("known id").deleted = true;
    }

    /// A record's fields with `Id` and `SystemModstamp`, as stored; `None` if unknown.
    pub fn get(&self, id: &str) -> Option<Value> {
        let s = self.state();
        let row = s.rows.get(id)?;
        let mut m: Map<String, Value> = row.fields.clone().into_iter().collect();
        m.insert("Id".into(), json!(id));
        m.insert("SystemModstamp".into(), json!(sf_time(row.modstamp)));
        Some(Value::Object(m))
    }

    /// Ids of the live, committed records of one object.
    pub fn ids(&self, object: &str) -> Vec<String> {
        let s = self.state();
        s.rows
            .iter()
            .filter(|(_, r)| r.object.eq_ignore_ascii_case(object) && r.visible && !r.deleted)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Removes a field from an object's schema (a field missing in this org).
    pub fn remove_field(&self, object: &str, field: &str) {
        let mut s = self.state();
        if let Some(defs) = s.schemas.get_mut(object) {
            defs.retain(|f| !f.name.eq_ignore_ascii_case(field));
        }
    }

    /// Makes a field read-only for the integration user (no Edit in its field-level
    /// security).
    pub fn set_field_updateable(&self, object: &str, field: &str, updateable: bool) {
        let mut s = self.state();
        if let Some(f) = (s.schemas.get_mut(object).into_iter().flatten())
            .find(|f| f.name.eq_ignore_ascii_case(field))
        {
            f.updatable = updateable;
        }
    }

    /// Makes every issued access token invalid, as a session timeout does.
    pub fn expire_tokens(&self) {
        self.state().tokens.clear();
    }

    pub fn set_token_ttl(&self, ttl: Duration) {
        self.state().token_ttl = ttl;
    }

    /// Refuses every session, even fresh ones (an IP restriction, a frozen user).
    pub fn refuse_sessions(&self, refuse: bool) {
        self.state().refuse_sessions = refuse;
    }

    /// Forgets every query locator, as Salesforce does after 15 idle minutes.
    pub fn expire_locators(&self) {
        self.state().locators.clear();
    }

    /// Sets the org's API usage (all clients together) and daily allocation.
    pub fn set_api_usage(&self, used: u64, limit: u64) {
        let mut s = self.state();
        s.used = used;
        s.limit = limit;
    }

    /// (used, limit) of the org's daily API allocation.
    pub fn api_usage(&self) -> (u64, u64) {
        let s = self.state();
        (s.used, s.limit)
    }

    pub fn set_faults(&self, faults: Faults) {
        self.state().faults = faults;
    }

    /// Updates of these records fail with `UNABLE_TO_LOCK_ROW` until unlocked.
    pub fn lock(&self, ids: &[&str]) {
        self.state()
            .locked
            .extend(ids.iter().map(|s| s.to_string()));
    }

    pub fn unlock_all(&self) {
        self.state().locked.clear();
    }

    pub fn counters(&self) -> Counters {
        self.state().counters
    }

    pub fn reset_counters(&self) {
        self.state().counters = Counters::default();
    }

    /// The next data call (query, query more, collections, limits) answers 429 with
    /// `Retry-After` set to `retry_after` in whole seconds, at least one, as a gateway in
    /// front of the org would.
    pub fn throttle_next(&self, retry_after: Duration) {
        self.state().throttle_next = Some(retry_after);
    }

    /// Stops the server (also done on drop).
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Stops the server and waits until its connections are closed.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------
// Token endpoint

#[derive(Deserialize)]
struct JwtClaims {
    sub: String,
    exp: i64,
}

fn token_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

async fn token(
    State(shared): State<Arc<Shared>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    shared.state.lock().unwrap().counters.token += 1;
    let opts = &shared.opts;
    let param = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let jwt = match param("grant_type") {
        "client_credentials" => {
            if param("client_id") != opts.client_id || param("client_secret") != opts.client_secret
            {
                return token_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_client",
                    "invalid client credentials",
                );
            }
            false
        }
        "urn:ietf:params:oauth:grant-type:jwt-bearer" => {
            let Some(trust) = &opts.jwt else {
                return token_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "invalid assertion",
                );
            };
            if let Err((error, description)) = verify_assertion(trust, param("assertion")) {
                return token_error(StatusCode::BAD_REQUEST, error, description);
            }
            true
        }
        _ => {
            return token_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant type not supported",
            );
        }
    };
    let mut s = shared.state.lock().unwrap();
    s.next_token += 1;
    let token = format!(
        "00DFK0000000001!AR{}.{}",
        s.next_token,
        Utc::now().timestamp_nanos_opt().unwrap_or(0)
    );
    let expires = Instant::now() + s.token_ttl;
    s.tokens.insert(token.clone(), expires);
    let mut body = json!({
        "access_token": token,
        "instance_url": shared.base_url,
        "id": format!("{}/id/00DFK0000000001AAA/005FK0000000001AAA", shared.base_url),
        "token_type": "Bearer",
        "issued_at": Utc::now().timestamp_millis().to_string(),
        "signature": "ZmFrZQ==",
    });
    if jwt {
        body["scope"] = json!("api");
    } else {
        body["token_format"] = json!("opaque");
    }
    Json(body).into_response()
}

/// Checks a JWT bearer assertion; the error is the token endpoint's (error, description).
fn verify_assertion(trust: &JwtTrust, assertion: &str) -> Result<(), (&'static str, &'static str)> {
    use jsonwebtoken::errors::ErrorKind;
    let invalid = |d: &'static str| ("invalid_grant", d);
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(trust.public_key_pem.as_bytes())
        .map_err(|_| invalid("the connected app's certificate is unusable"))?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&[&trust.audience]);
    v.set_issuer(&[&trust.client_id]);
    v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    v.leeway = 0;
    let data =
        jsonwebtoken::decode::<JwtClaims>(assertion, &key, &v).map_err(|e| match e.kind() {
            ErrorKind::InvalidIssuer => ("invalid_client_id", "client identifier invalid"),
            ErrorKind::InvalidAudience => invalid("audience is invalid"),
            ErrorKind::ExpiredSignature => invalid("expired authorization code"),
            _ => invalid("invalid assertion"),
        })?;
    if data.claims.sub != trust.username {
        return Err(invalid("user hasn't approved this consumer"));
    }
    // Salesforce wants assertions that expire within minutes.
    if data.claims.exp > Utc::now().timestamp() + 300 {
        return Err(invalid("invalid assertion"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Data endpoints: shared admission (auth, allocation, faults) and answer shaping

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Query,
    QueryMore,
    Collections,
    Limits,
    Describe,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Damage {
    None,
    Drop,
    Malformed,
}

fn sf_error(status: StatusCode, code: &str, message: &str) -> (StatusCode, Value) {
    (status, json!([{ "message": message, "errorCode": code }]))
}

/// Counts the call, checks the session and the allocation, and rolls the fault dice.
async fn admit(shared: &Shared, headers: &HeaderMap, ep: Endpoint) -> Result<Damage, Response> {
    let (damage, slow) = {
        let mut s = shared.state.lock().unwrap();
        match ep {
            Endpoint::Query => s.counters.query += 1,
            Endpoint::QueryMore => s.counters.query_more += 1,
            Endpoint::Collections => s.counters.collections += 1,
            Endpoint::Limits => s.counters.limits += 1,
            Endpoint::Describe => s.counters.describe += 1,
        }
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let live = s.tokens.get(token).is_some_and(|exp| Instant::now() < *exp);
        if !live || s.refuse_sessions {
            s.counters.unauthorized += 1;
            let (st, body) = sf_error(
                StatusCode::UNAUTHORIZED,
                "INVALID_SESSION_ID",
                "Session expired or invalid",
            );
            return Err((st, Json(body)).into_response());
        }
        if s.used >= s.limit {
            s.counters.limit_exceeded += 1;
            let (st, body) = sf_error(
                StatusCode::FORBIDDEN,
                "REQUEST_LIMIT_EXCEEDED",
                "TotalRequests Limit exceeded.",
            );
            return Err(with_limit_info(&s, (st, Json(body)).into_response()));
        }
        if let Some(wait) = s.throttle_next.take() {
            let (st, body) = sf_error(
                StatusCode::TOO_MANY_REQUESTS,
                "TOO_MANY_REQUESTS",
                "Too many requests; retry later.",
            );
            let mut r = (st, Json(body)).into_response();
            r.headers_mut()
                .insert("retry-after", HeaderValue::from(wait.as_secs().max(1)));
            return Err(r);
        }
        s.used += 1;
        let f = s.faults.clone();
        if s.chance(f.server_error_rate) {
            let (st, body) = sf_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "SERVER_UNAVAILABLE",
                "The server is temporarily unavailable",
            );
            return Err(with_limit_info(&s, (st, Json(body)).into_response()));
        }
        let damage = if s.chance(f.drop_rate) {
            Damage::Drop
        } else if s.chance(f.malformed_rate) {
            Damage::Malformed
        } else {
            Damage::None
        };
        let slow = s.chance(f.slow_rate).then_some(f.slow_delay);
        (damage, slow)
    };
    if let Some(d) = slow {
        tokio::time::sleep(d).await;
    }
    Ok(damage)
}

fn with_limit_info(s: &OrgState, mut r: Response) -> Response {
    if let Ok(v) = HeaderValue::from_str(&format!("api-usage={}/{}", s.used, s.limit)) {
        r.headers_mut().insert("sforce-limit-info", v);
    }
    r
}

fn answer(shared: &Shared, damage: Damage, status: StatusCode, body: Value) -> Response {
    let text = body.to_string();
    let resp = match damage {
        Damage::None => (status, [("content-type", "application/json")], text).into_response(),
        Damage::Malformed => {
            let cut = text.len() / 2;
            let cut = (0..=cut)
                .rev()
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(0);
            (
                status,
                [("content-type", "application/json")],
                text[..cut].to_string(),
            )
                .into_response()
        }
        Damage::Drop => {
            let head = Bytes::from(text[..text.len().min(8)].to_string());
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(head),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "dropped by the fake",
                )),
            ];
            let mut r = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
            *r.status_mut() = status;
            r
        }
    };
    with_limit_info(&shared.state.lock().unwrap(), resp)
}

// ---------------------------------------------------------------------------------------
// Query

fn batch_size(headers: &HeaderMap) -> usize {
    headers
        .get("sforce-query-options")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',').find_map(|p| {
                p.trim()
                    .strip_prefix("batchSize=")?
                    .trim()
                    .parse::<usize>()
                    .ok()
            })
        })
        .map(|n| n.clamp(200, 2000))
        .unwrap_or(2000)
}

async fn query(
    State(shared): State<Arc<Shared>>,
    Path(ver): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let damage = match admit(&shared, &headers, Endpoint::Query).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let q = params.get("q").map(String::as_str).unwrap_or("");
    let (status, body) = run_query(&shared, &ver, q, batch_size(&headers));
    answer(&shared, damage, status, body)
}

fn run_query(shared: &Shared, ver: &str, q: &str, batch: usize) -> (StatusCode, Value) {
    let parsed = match soql::parse(q) {
        Ok(p) => p,
        Err(e) => return sf_error(StatusCode::BAD_REQUEST, "MALFORMED_QUERY", &e.0),
    };
    let mut s = shared.state.lock().unwrap();
    let Some(object) = s
        .schemas
        .keys()
        .find(|k| k.eq_ignore_ascii_case(&parsed.object))
        .cloned()
    else {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "INVALID_TYPE",
            &format!("sObject type '{}' is not supported.", parsed.object),
        );
    };
    // Resolve every name to its definition; unknown names are INVALID_FIELD.
    let mut names: Vec<&str> = parsed.fields.iter().map(String::as_str).collect();
    names.extend(parsed.order.iter().map(|o| o.field.as_str()));
    let comparisons = parsed
        .filter
        .as_ref()
        .map(|f| f.comparisons())
        .unwrap_or_default();
    names.extend(comparisons.iter().map(|(f, _)| *f));
    for n in &names {
        if s.field(&object, n).is_none() {
            return sf_error(
                StatusCode::BAD_REQUEST,
                "INVALID_FIELD",
                &format!("No such column '{n}' on entity '{object}'."),
            );
        }
    }
    for (f, lit) in &comparisons {
        let kind = s.field(&object, f).expect("checked").kind;
        let fits = matches!(
            (kind, lit),
            (_, Literal::Null)
                | (Kind::DateTime, Literal::DateTime(_))
                | (Kind::Bool, Literal::Bool(_))
                | (Kind::Id | Kind::Text | Kind::Picklist(_), Literal::Str(_))
        );
        if !fits {
            return sf_error(
                StatusCode::BAD_REQUEST,
                "INVALID_FIELD",
                &format!("value of filter criterion for field '{f}' must be of type {kind:?}"),
            );
        }
    }
    let canonical = |s: &OrgState, n: &str| s.field(&object, n).expect("checked").clone();
    let selected: Vec<FieldDef> = parsed.fields.iter().map(|n| canonical(&s, n)).collect();
    let order: Vec<(FieldDef, bool)> = parsed
        .order
        .iter()
        .map(|o| (canonical(&s, &o.field), o.desc))
        .collect();

    let lit = |s: &OrgState, id: &str, row: &Row, name: &str| {
        let def = s.field(&object, name).expect("checked");
        if def.name == "SystemModstamp" {
            return Literal::DateTime(row.modstamp);
        }
        literal_of(def.kind, &s.value_of(id, row, &def.name))
    };
    let mut hits: Vec<&String> = s
        .rows
        .iter()
        .filter(|(_, r)| r.object == object && r.visible && !r.deleted)
        .filter(|(id, r)| {
            parsed
                .filter
                .as_ref()
                .is_none_or(|f| f.matches(&|name| lit(&s, id, r, name)))
        })
        .map(|(id, _)| id)
        .collect();
    hits.sort_by(|a, b| {
        for (def, desc) in &order {
            let x = lit(&s, a, &s.rows[*a], &def.name);
            let y = lit(&s, b, &s.rows[*b], &def.name);
            // Nulls first when ascending, last when descending.
            let o = match (&x, &y) {
                (Literal::Null, Literal::Null) => std::cmp::Ordering::Equal,
                (Literal::Null, _) => std::cmp::Ordering::Less,
                (_, Literal::Null) => std::cmp::Ordering::Greater,
                _ => soql::compare(&x, &y).unwrap_or(std::cmp::Ordering::Equal),
            };
            let o = if *desc { o.reverse() } else { o };
            if o != std::cmp::Ordering::Equal {
                return o;
            }
        }
        std::cmp::Ordering::Equal
    });
    if let Some(l) = parsed.limit {
        hits.truncate(l);
    }
    let rows: Vec<Value> = hits
        .iter()
        .map(|id| {
            let row = &s.rows[*id];
            let mut m = Map::new();
            m.insert(
                "attributes".into(),
                json!({"type": object, "url": format!("/services/data/{ver}/sobjects/{object}/{id}")}),
            );
            for def in &selected {
                m.insert(def.name.clone(), s.value_of(id, row, &def.name));
            }
            Value::Object(m)
        })
        .collect();
    let total = rows.len();
    if total <= batch {
        return (
            StatusCode::OK,
            json!({"totalSize": total, "done": true, "records": rows}),
        );
    }
    s.next_locator += 1;
    let lid = format!("01gFK{:013}", s.next_locator);
    let first: Vec<Value> = rows[..batch].to_vec();
    s.locators.insert(lid.clone(), Locator { rows, batch });
    (
        StatusCode::OK,
        json!({"totalSize": total, "done": false,
               "nextRecordsUrl": format!("/services/data/{ver}/query/{lid}-{batch}"),
               "records": first}),
    )
}

async fn query_more(
    State(shared): State<Arc<Shared>>,
    Path((ver, locator)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let damage = match admit(&shared, &headers, Endpoint::QueryMore).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let (status, body) = {
        let mut s = shared.state.lock().unwrap();
        let parsed = locator
            .rsplit_once('-')
            .and_then(|(lid, off)| Some((lid.to_string(), off.parse::<usize>().ok()?)));
        match parsed.filter(|(lid, off)| s.locators.get(lid).is_some_and(|l| *off < l.rows.len())) {
            None => sf_error(
                StatusCode::BAD_REQUEST,
                "INVALID_QUERY_LOCATOR",
                "invalid query locator",
            ),
            Some((lid, off)) => {
                let loc = &s.locators[&lid];
                let end = (off + loc.batch).min(loc.rows.len());
                let total = loc.rows.len();
                let records: Vec<Value> = loc.rows[off..end].to_vec();
                let mut body =
                    json!({"totalSize": total, "done": end == total, "records": records});
                if end == total {
                    s.locators.remove(&lid);
                } else {
                    body["nextRecordsUrl"] =
                        json!(format!("/services/data/{ver}/query/{lid}-{end}"));
                }
                (StatusCode::OK, body)
            }
        }
    };
    answer(&shared, damage, status, body)
}

// ---------------------------------------------------------------------------------------
// sObject Collections update

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CollectionsBody {
    #[serde(default)]
    all_or_none: bool,
    records: Vec<Value>,
}

async fn collections(
    State(shared): State<Arc<Shared>>,
    Path(_ver): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let damage = match admit(&shared, &headers, Endpoint::Collections).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let (status, body) = match serde_json::from_slice::<CollectionsBody>(&body) {
        Err(e) => sf_error(StatusCode::BAD_REQUEST, "JSON_PARSER_ERROR", &e.to_string()),
        Ok(b) if b.records.len() > 200 => sf_error(
            StatusCode::BAD_REQUEST,
            "EXCEEDED_ID_LIMIT",
            "record limit reached. cannot submit more than 200 records into this call",
        ),
        Ok(b) => {
            let refusal = unknown_field(&shared.state.lock().unwrap(), &b.records);
            refusal.unwrap_or_else(|| (StatusCode::OK, update_records(&shared, b)))
        }
    };
    answer(&shared, damage, status, body)
}

/// Salesforce refuses the whole request, before any record, when a record names a field
/// its object does not have: 400 with a request-level `INVALID_FIELD` (an array with
/// `errorCode` at the top level), not a per-record result.
fn unknown_field(s: &OrgState, records: &[Value]) -> Option<(StatusCode, Value)> {
    records.iter().find_map(|rec| {
        let ty = rec["attributes"]["type"].as_str()?;
        let object = s.schemas.keys().find(|k| k.eq_ignore_ascii_case(ty))?;
        let field = (rec.as_object()?.keys())
            .filter(|k| *k != "attributes" && !k.eq_ignore_ascii_case("id"))
            .find(|k| s.field(object, k).is_none())?;
        Some((
            StatusCode::BAD_REQUEST,
            json!([{
                "message": format!("No such column '{field}' on sobject of type {object}"),
                "errorCode": "INVALID_FIELD",
                "fields": [field],
            }]),
        ))
    })
}

/// `GET /services/data/{ver}/sobjects/{object}/describe`: the object's fields, each with
/// its `name`, `type` and whether the user may `updateable` it; 404 `NOT_FOUND` for an
/// object the org does not have.
async fn describe(
    State(shared): State<Arc<Shared>>,
    Path((_ver, object)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let damage = match admit(&shared, &headers, Endpoint::Describe).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let (status, body) = {
        let s = shared.state.lock().unwrap();
        match s
            .schemas
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(&object))
        {
            None => sf_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "The requested resource does not exist",
            ),
            Some((name, defs)) => {
                let fields: Vec<Value> = (defs.iter())
                    .map(|f| {
                        let ty = match f.kind {
                            Kind::Id => "id",
                            Kind::Text => "string",
                            Kind::Bool => "boolean",
                            Kind::DateTime => "datetime",
                            Kind::Picklist(_) => "picklist",
                        };
                        json!({"name": f.name, "type": ty, "updateable": f.updatable, "createable": f.updatable, "nillable": true})
                    })
                    .collect();
                (
                    StatusCode::OK,
                    json!({"name": name, "queryable": true, "updateable": true, "fields": fields}),
                )
            }
        }
    };
    answer(&shared, damage, status, body)
}

/// A valid record update: the id and the (canonical field, value) pairs to set.
type Change = (String, Vec<(String, Value)>);
/// A refused record: statusCode, message, fields.
type RecordError = (String, String, Vec<String>);

/// Per-record validation, then (all or the valid ones) applied.
fn update_records(shared: &Shared, body: CollectionsBody) -> Value {
    let mut s = shared.state.lock().unwrap();
    s.counters.collection_records += body.records.len() as u64;
    let mut checked: Vec<Result<Change, RecordError>> = Vec::new();
    for rec in &body.records {
        checked.push(check_record(&mut s, rec));
    }
    let failed = checked.iter().any(Result::is_err);
    let mut results = Vec::new();
    for c in checked {
        match c {
            Ok((id, changes)) if !(body.all_or_none && failed) => {
                let t = s.tick();
                let row = s.rows.get_mut(&id).expect("checked");
                row.fields.extend(changes);
                row.modstamp = t;
                row.fields.insert("LastModifiedDate".into(), json!(sf_time(t)));
                results.push(json!({"id": id, "success": true, "errors": []}));
            }
            Ok((id, _)) => results.push(json!({"id": id, "success": false, "errors": [{
                "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                "message": "Record rolled back because not all records were valid and the request was using AllOrNone header",
                "fields": []}]})),
            Err((code, message, fields)) => results.push(json!({"success": false, "errors": [{
                "statusCode": code, "message": message, "fields": fields}]})),
        }
    }
    Value::Array(results)
}

fn check_record(s: &mut OrgState, rec: &Value) -> Result<Change, RecordError> {
    let fail = |code: &str, msg: String, fields: &[&str]| {
        Err((
            code.to_string(),
            msg,
            fields.iter().map(|f| f.to_string()).collect(),
        ))
    };
    let ty = rec["attributes"]["type"].as_str().unwrap_or("");
    let Some(object) = s
        .schemas
        .keys()
        .find(|k| k.eq_ignore_ascii_case(ty))
        .cloned()
    else {
        return fail(
            "INVALID_TYPE",
            format!("sObject type '{ty}' is not supported"),
            &[],
        );
    };
    let id = rec["id"].as_str().unwrap_or("");
    if !(id.len() == 15 || id.len() == 18) || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return fail("MALFORMED_ID", format!("Id: invalid id: {id}"), &["Id"]);
    }
    let Some(row) = s.rows.get(id) else {
        return fail(
            "INVALID_CROSS_REFERENCE_KEY",
            "invalid cross reference id".into(),
            &[],
        );
    };
    if row.object != object {
        return fail(
            "MALFORMED_ID",
            format!("malformed id {id} for {object}"),
            &["Id"],
        );
    }
    if row.deleted {
        return fail("ENTITY_IS_DELETED", "entity is deleted".into(), &[]);
    }
    let mut changes = Vec::new();
    for (k, v) in rec.as_object().into_iter().flatten() {
        if k == "attributes" || k.eq_ignore_ascii_case("id") {
            continue;
        }
        let Some(def) = s.field(&object, k).cloned() else {
            return fail(
                "INVALID_FIELD",
                format!("No such column '{k}' on sobject of type {object}"),
                &[k],
            );
        };
        if !def.updatable {
            return fail(
                "INVALID_FIELD_FOR_INSERT_UPDATE",
                format!(
                    "Unable to create/update fields: {}. Please check the security settings of this field and verify that it is read/write for your profile or permission set.",
                    def.name
                ),
                &[&def.name],
            );
        }
        let ok = match (def.kind, v) {
            (_, Value::Null) => !matches!(def.kind, Kind::Picklist(_) | Kind::Bool),
            (Kind::Bool, Value::Bool(_)) => true,
            (Kind::DateTime, Value::String(t)) => Timestamp::parse(t).is_some(),
            (Kind::Picklist(values), Value::String(x)) => values.contains(&x.as_str()),
            (Kind::Text | Kind::Id, Value::String(_)) => true,
            _ => false,
        };
        if !ok {
            let code = match def.kind {
                Kind::Picklist(_) => "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                _ => "INVALID_TYPE_ON_FIELD_IN_RECORD",
            };
            return fail(
                code,
                format!("{}: bad value for field: {v}", def.name),
                &[&def.name],
            );
        }
        changes.push((def.name, v.clone()));
    }
    let lock_rate = s.faults.lock_rate;
    if s.locked.contains(id) || s.chance(lock_rate) {
        return fail(
            "UNABLE_TO_LOCK_ROW",
            "unable to obtain exclusive access to this record or 1 records".into(),
            &[],
        );
    }
    Ok((id.to_string(), changes))
}

// ---------------------------------------------------------------------------------------
// Limits

async fn limits(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let damage = match admit(&shared, &headers, Endpoint::Limits).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let body = {
        let s = shared.state.lock().unwrap();
        json!({"DailyApiRequests": {"Max": s.limit, "Remaining": s.limit.saturating_sub(s.used)}})
    };
    answer(&shared, damage, StatusCode::OK, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salesforce_time_format() {
        let t = Timestamp::parse("2026-01-02T10:11:12.345Z").unwrap();
        assert_eq!(sf_time(t.millis()), "2026-01-02T10:11:12.345+0000");
        assert_eq!(Timestamp::parse(&sf_time(t.millis())), Some(t));
    }

    #[test]
    fn dice_follow_the_rate() {
        let mut s = OrgState {
            schemas: HashMap::new(),
            rows: BTreeMap::new(),
            next_id: 0,
            clock: 0,
            tokens: HashMap::new(),
            next_token: 0,
            token_ttl: Duration::ZERO,
            refuse_sessions: false,
            locators: HashMap::new(),
            next_locator: 0,
            used: 0,
            limit: 0,
            counters: Counters::default(),
            faults: Faults::default(),
            locked: HashSet::new(),
            rng: 7,
            throttle_next: None,
        };
        let hits = (0..10_000).filter(|_| s.chance(0.25)).count();
        assert!((2_200..2_800).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|_| s.chance(0.0)));
        assert!((0..1000).all(|_| s.chance(1.0)));
    }
}
