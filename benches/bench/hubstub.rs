//! An indexed, read-only stand-in for HubSpot's CRM search, for the bulk resync benchmark.
//!
//! The HubSpot fake (`optout_hubspot::fake`) answers every search by scanning and sorting
//! every contact it holds, so one page costs it time proportional to the portal's size:
//! at 1,000,000 contacts the fake, not the daemon, would be what is measured. This stand-in
//! serves the same wire format for the searches the connector sends during a sync
//! (`lastmodifieddate` GTE/GT/EQ, optionally `hs_object_id` GT, one ascending sort,
//! `properties`, `limit`, `total`, and a `Date` header) from contacts kept sorted by
//! `(lastmodifieddate, id)`, so a page costs a binary search. It holds no writes: a batch
//! update is answered 503 and counted (a resync of consistent records pushes nothing).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use optout_core::Timestamp;
use serde_json::{Map, Value, json};

/// One contact: its id, `lastmodifieddate` (epoch ms) and its other properties.
pub struct StubContact {
    pub id: u64,
    pub modified: i64,
    pub props: Vec<(&'static str, String)>,
}

struct Shared {
    contacts: Vec<StubContact>,
    searches: AtomicU64,
    batch_updates: AtomicU64,
    served: AtomicU64,
}

/// The running stand-in. Dropping it stops the server.
pub struct HubStub {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl HubStub {
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// (search requests, contacts returned by them, batch updates refused).
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.shared.searches.load(Ordering::Relaxed),
            self.shared.served.load(Ordering::Relaxed),
            self.shared.batch_updates.load(Ordering::Relaxed),
        )
    }
}

impl Drop for HubStub {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts the stand-in on 127.0.0.1; `contacts` are sorted here by (modified, id).
pub async fn start(mut contacts: Vec<StubContact>) -> HubStub {
    contacts.sort_unstable_by_key(|c| (c.modified, c.id));
    let shared = Arc::new(Shared {
        contacts,
        searches: AtomicU64::new(0),
        batch_updates: AtomicU64::new(0),
        served: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/crm/v3/objects/contacts/search", post(search))
        .route("/crm/v3/objects/contacts/batch/update", post(batch_update))
        .route("/crm/v3/objects/contacts", get(list))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    HubStub {
        shared,
        addr,
        stop: Some(tx),
    }
}

fn authorised(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        == Some(optout_hubspot::fake::TOKEN)
}

fn with_date(mut r: Response) -> Response {
    let date = Timestamp::now()
        .to_datetime()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    if let Ok(v) = HeaderValue::from_str(&date) {
        r.headers_mut().insert(header::DATE, v);
    }
    r
}

fn bad(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(
            json!({ "status": "error", "message": message, "category": "VALIDATION_ERROR" }),
        ),
    )
        .into_response()
}

/// The connector's health check (`GET /crm/v3/objects/contacts?limit=1`).
async fn list(headers: HeaderMap) -> Response {
    if !authorised(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    with_date(axum::Json(json!({ "results": [] })).into_response())
}

async fn batch_update(State(shared): State<Arc<Shared>>) -> Response {
    shared.batch_updates.fetch_add(1, Ordering::Relaxed);
    (StatusCode::SERVICE_UNAVAILABLE, "read-only stand-in").into_response()
}

async fn search(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    shared.searches.fetch_add(1, Ordering::Relaxed);
    if !authorised(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({ "status": "error", "message": "Authentication credentials not found.", "category": "INVALID_AUTHENTICATION" })),
        )
            .into_response();
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return bad("Invalid input JSON");
    };
    let limit = req["limit"].as_u64().unwrap_or(10) as usize;
    if !(1..=200).contains(&limit) {
        return bad("limit must be between 1 and 200");
    }
    let filters = req["filterGroups"][0]["filters"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let num = |f: &Value| {
        f["value"]
            .as_str()
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(0)
    };
    let (mut lo, mut hi, mut after_id) = (i64::MIN, i64::MAX, None);
    for f in &filters {
        match (f["propertyName"].as_str(), f["operator"].as_str()) {
            (Some("lastmodifieddate"), Some("GTE")) => lo = num(f),
            (Some("lastmodifieddate"), Some("GT")) => lo = num(f).saturating_add(1),
            (Some("lastmodifieddate"), Some("EQ")) => (lo, hi) = (num(f), num(f)),
            (Some("hs_object_id"), Some("GT")) => after_id = Some(num(f) as u64),
            _ => return bad("filter not supported by the benchmark stand-in"),
        }
    }
    let all = &shared.contacts;
    let start = all.partition_point(|c| c.modified < lo);
    let end = all.partition_point(|c| c.modified <= hi);
    let mut range = &all[start..end.max(start)];
    if let Some(after) = after_id {
        // Only used on one timestamp (a tie run), where the slice is sorted by id.
        range = &range[range.partition_point(|c| c.id <= after)..];
    }
    let names: Vec<String> = req["properties"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let page = &range[..limit.min(range.len())];
    let results: Vec<Value> = page
        .iter()
        .map(|c| {
            let at = Timestamp(c.modified).to_rfc3339();
            let mut props = Map::new();
            for n in &names {
                let v = c.props.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
                props.insert(n.clone(), json!(v));
            }
            props.insert("hs_object_id".into(), json!(c.id.to_string()));
            props.insert("createdate".into(), json!(at));
            props.insert("lastmodifieddate".into(), json!(at));
            json!({ "id": c.id.to_string(), "properties": props, "createdAt": at, "updatedAt": at, "archived": false })
        })
        .collect();
    shared
        .served
        .fetch_add(results.len() as u64, Ordering::Relaxed);
    let mut out = json!({ "total": range.len(), "results": results });
    if page.len() < range.len() {
        out["paging"] = json!({ "next": { "after": page.len().to_string() } });
    }
    with_date(axum::Json(out).into_response())
}
