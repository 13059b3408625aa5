//! `POST /v1/consent/events`: one event (a JSON object) or a batch (`{"events": [...]}`
//! or a JSON array) of at most [`MAX_EVENTS`]. Answered only once the events are on disk
//! (see [`crate::api`]); a batch is answered item by item, in order.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use optout_core::Timestamp;
use serde_json::{Value, json};

use super::{WriteState, authorize, error};
use crate::api::{self, ItemAnswer, MAX_EVENTS};

/// The largest body: 1,000 events with room for their evidence.
pub const MAX_EVENTS_BYTES: usize = 4 * 1024 * 1024;

pub fn route(state: Arc<WriteState>) -> Router {
    Router::new()
        .route(
            "/v1/consent/events",
            post(events).layer(DefaultBodyLimit::max(MAX_EVENTS_BYTES)),
        )
        .with_state(state)
}

/// A request's events, and whether it was a single event (answered on its own).
fn events_of(body: &[u8]) -> Result<(Vec<Value>, bool), Box<Response>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        let why = "empty body: send one event (a JSON object) or {\"events\": [...]}";
        return Err(Box::new(error(StatusCode::BAD_REQUEST, why)));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        )
    })?;
    let (items, single) = match value {
        Value::Array(items) => (items, false),
        Value::Object(mut o) if o.contains_key("events") => match o.remove("events") {
            Some(Value::Array(items)) if o.is_empty() => (items, false),
            _ => {
                let why = "`events` must be an array, and the only key beside it";
                return Err(Box::new(error(StatusCode::BAD_REQUEST, why)));
            }
        },
        v @ Value::Object(_) => (vec![v], true),
        _ => {
            let why = "send one event (a JSON object) or {\"events\": [...]}";
            return Err(Box::new(error(StatusCode::BAD_REQUEST, why)));
        }
    };
    if items.is_empty() {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "no events in the request",
        )));
    }
    if items.len() > MAX_EVENTS {
        let why = format!("{} events: at most {MAX_EVENTS} per request", items.len());
        return Err(Box::new(error(StatusCode::PAYLOAD_TOO_LARGE, why)));
    }
    Ok((items, single))
}

/// The token, then the announced length, are checked before the body is read.
async fn events(State(s): State<Arc<WriteState>>, req: Request) -> Response {
    if let Err(r) = authorize(&s, req.headers()) {
        return *r;
    }
    if crate::http::content_length(req.headers()).is_some_and(|n| n > MAX_EVENTS_BYTES as u64) {
        let why = format!("body over {MAX_EVENTS_BYTES} bytes");
        return error(StatusCode::PAYLOAD_TOO_LARGE, why);
    }
    let body = match Bytes::from_request(req, &()).await {
        Ok(b) => b,
        Err(e) => return error(e.status(), e.body_text()),
    };
    let (items, single) = match events_of(&body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    drop(body);
    let answers = api::record(&s.engine, items, Timestamp::now()).await;
    if answers.iter().any(|a| a.result == "accepted") {
        s.applied.notify_one();
    }
    if single {
        let a = answers.into_iter().next().expect("one answer");
        return (single_status(&a), Json(a)).into_response();
    }
    let store_failed = answers.iter().any(|a| a.unavailable);
    let code = if store_failed {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(json!({ "results": answers }))).into_response()
}

/// A single event's status: 200 recorded (or recorded before), 409 a key reused for
/// another event, 503 the store failed (retry), 422 the event itself is refused.
fn single_status(a: &ItemAnswer) -> StatusCode {
    match a.result {
        "accepted" | "duplicate" => StatusCode::OK,
        _ if a.conflict => StatusCode::CONFLICT,
        _ if a.unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}
