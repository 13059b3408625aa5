//! `POST /v1/consent/erasures`: a data subject's erasure request from another system (a
//! privacy portal, a ticketing tool), the same as `optout-sync erase`: the person's
//! personal data goes, their suppression stays under tombstones. Answered once the
//! erasure is committed; the old copies leave the store's files at the next start's
//! compaction.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use optout_core::Timestamp;
use serde::Deserialize;

use super::{WriteState, authorize, error};
use crate::reconcile::EraseError;

/// An erasure request is one id and a source name: a few hundred bytes.
const MAX_BYTES: usize = 4 * 1024;

pub fn route(state: Arc<WriteState>) -> Router {
    Router::new()
        .route(
            "/v1/consent/erasures",
            post(erase).layer(DefaultBodyLimit::max(MAX_BYTES)),
        )
        .with_state(state)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Erase {
    /// A number in any format, `wa:<digits>` or a business-scoped user id.
    id: String,
    /// Who asked (a system's name), for the audit log; `api` when not given.
    #[serde(default)]
    source: Option<String>,
}

/// The token, then the announced length, are checked before the body is read.
async fn erase(State(s): State<Arc<WriteState>>, req: Request) -> Response {
    if let Err(r) = authorize(&s, req.headers()) {
        return *r;
    }
    if crate::http::content_length(req.headers()).is_some_and(|n| n > MAX_BYTES as u64) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body over {MAX_BYTES} bytes"),
        );
    }
    let body = match Bytes::from_request(req, &()).await {
        Ok(b) => b,
        Err(e) => return error(e.status(), e.body_text()),
    };
    let ask: Erase = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            let why = format!("send {{\"id\": \"+1…\", \"source\": \"…\"}}: {e}");
            return error(StatusCode::BAD_REQUEST, why);
        }
    };
    let source = match ask.source.as_deref().map(str::trim) {
        None => "api".to_string(),
        Some(s) if (1..=64).contains(&s.chars().count()) => format!("api:{s}"),
        Some(_) => return error(StatusCode::BAD_REQUEST, "`source` must be 1–64 characters"),
    };
    let engine = s.engine.clone();
    let done =
        tokio::task::spawn_blocking(move || engine.erase(&ask.id, &source, Timestamp::now())).await;
    match done {
        Ok(Ok(erasure)) => {
            if let Some(subject) = &erasure.subject {
                tracing::info!(subject = %subject, "erased a person's personal data (write API)");
            }
            (StatusCode::OK, Json(erasure)).into_response()
        }
        Ok(Err(e @ EraseError::BadId(..))) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
