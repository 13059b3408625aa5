//! The consent write API: routes that change what the daemon knows, behind their own bearer
//! token (`daemon.write_token`). The send gate's token only reads, and is refused here
//! (403). Each route is a submodule; [`routes`] mounts them all behind [`authorize`].
//!
//! - [`events`]: `POST /v1/consent/events`, opt-outs (and accepted opt-ins) from any
//!   channel;
//! - [`erasures`]: `POST /v1/consent/erasures`, a person's erasure (as `optout-sync erase`).

mod erasures;
mod events;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use optout_core::Secret;
use serde_json::json;
use tokio::sync::Notify;

use crate::reconcile::Engine;

/// What the write routes share.
pub struct WriteState {
    pub engine: Arc<Engine>,
    /// `None`: the write API is off (503).
    pub write_token: Option<Secret>,
    /// Recognised to say why it cannot write.
    pub gate_token: Option<Secret>,
    /// Wakes the worker that applies recorded events.
    pub applied: Arc<Notify>,
}

/// Every write route.
pub fn routes(state: Arc<WriteState>) -> Router {
    Router::new()
        .merge(events::route(state.clone()))
        .merge(erasures::route(state))
}

/// The write token, checked in constant time before any body is read: missing or wrong →
/// 401; the send gate's token → 403 (it may read, never write); no token configured → 503.
pub(crate) fn authorize(s: &WriteState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let refuse = |code: StatusCode, error: &str| {
        let mut r = (code, Json(json!({ "error": error }))).into_response();
        if code == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid"));
        }
        Err(Box::new(r))
    };
    let Some(token) = &s.write_token else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the write API is off: set daemon.write_token",
        );
    };
    let given = (headers.get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .and_then(super::bearer)
        .unwrap_or("");
    if super::constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
        return Ok(());
    }
    let gate = (s.gate_token.as_ref())
        .is_some_and(|g| super::constant_time_eq(given.as_bytes(), g.expose().as_bytes()));
    if gate {
        return refuse(
            StatusCode::FORBIDDEN,
            "the send gate's token cannot write: use daemon.write_token",
        );
    }
    refuse(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
}

/// A JSON error answer.
fn error(code: StatusCode, error: impl Into<String>) -> Response {
    (code, Json(json!({ "error": error.into() }))).into_response()
}
