//! The HTTP listener (axum): health, readiness, metrics, and the send gate. The WhatsApp
//! connector's webhook routes are merged in by the daemon.
//!
//! The send gate answers "may we message this person, in this category?" for the systems
//! that send. It reads the store and never creates anything. It needs the bearer token
//! from `daemon.gate_token`; without one configured it is off.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use optout_core::{Scope, Secret};
use serde::Deserialize;
use serde_json::json;

use crate::metrics::Metrics;
use crate::policy;
use crate::reconcile::{Engine, subject_name};
use crate::report::{GateBatchReply, GateReply};

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

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/consent/batch", post(gate_batch))
        .route("/v1/consent/{id}", get(gate_one))
        .with_state(state)
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    category: Option<String>,
    ids: Vec<String>,
}

const MAX_BATCH: usize = 1000;

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
        .and_then(|v| v.strip_prefix("Bearer "))
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

/// Compares without an early exit, so response time says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

/// The gate's answer for one identifier.
pub fn answer(engine: &Engine, id: &str, category: &str) -> GateReply {
    let base = GateReply {
        id: id.to_string(),
        ..GateReply::default()
    };
    let aliases = match engine.normalizer().parse_query(id) {
        Ok(a) => a,
        Err(e) => {
            return GateReply {
                error: Some(format!("not an identifier: {e}")),
                ..base
            };
        }
    };
    let mut subject = None;
    for a in &aliases {
        match engine.store().subject_by_alias(a.as_str()) {
            Ok(Some(s)) => {
                subject = Some(s);
                break;
            }
            Ok(None) => {}
            // Fail closed: a store error never says "allowed".
            Err(e) => {
                return GateReply {
                    allowed: Some(false),
                    error: Some(format!("store error: {e}")),
                    ..base
                };
            }
        }
    }
    let base = GateReply {
        category: Some(category.to_string()),
        ..base
    };
    let Some(s) = subject else {
        return GateReply {
            allowed: Some(true),
            known: Some(false),
            ..base
        };
    };
    let margin = engine.policy().margin;
    let g = policy::gate(&s.consent, category, margin);
    let decisions = (Scope::EVERY.iter())
        .map(|&sc| {
            (
                sc.as_str().to_string(),
                s.consent.decide(sc, margin).as_str().to_string(),
            )
        })
        .collect();
    GateReply {
        allowed: Some(g.allowed),
        known: Some(true),
        subject: Some(subject_name(s.id)),
        blocked_by: g.blocked_by.map(|sc| sc.as_str().to_string()),
        decisions: Some(decisions),
        evidence: g.evidence.and_then(|f| serde_json::to_value(f).ok()),
        ..base
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
    let category = q.category.unwrap_or_else(|| "marketing".into());
    let engine = s.engine.clone();
    let v = tokio::task::spawn_blocking(move || answer(&engine, &id, &category))
        .await
        .unwrap_or_default();
    let code = if v.error.is_some() && v.allowed.is_none() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    (code, Json(v)).into_response()
}

async fn gate_batch(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Result<Json<BatchRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return *r;
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": e.body_text()})),
            )
                .into_response();
        }
    };
    if req.ids.len() > MAX_BATCH {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(json!({"error": format!("at most {MAX_BATCH} ids per request")})),
        )
            .into_response();
    }
    let category = req.category.unwrap_or_else(|| "marketing".into());
    let engine = s.engine.clone();
    let results = tokio::task::spawn_blocking(move || {
        req.ids
            .iter()
            .map(|id| answer(&engine, id, &category))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    Json(GateBatchReply { results }).into_response()
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
