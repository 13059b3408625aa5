//! The webhook route Meta calls: `GET /webhooks/whatsapp/{name}` (subscription handshake)
//! and `POST /webhooks/whatsapp/{name}` (deliveries), also without `/{name}` for the
//! daemon's only WhatsApp account. The daemon mounts [`instance_router`] on its listener.
//!
//! The POST path is the hot path, so it does the least that keeps the guarantees:
//! 1. `X-Hub-Signature-256` must be present and well-formed (else 401) — checked before the
//!    body is even read;
//! 2. a `Content-Length` over `max_body_bytes` is a 413 at once, before reading (so no
//!    `100 Continue` is sent for it); the body is read up to `max_body_bytes` (else 413);
//! 3. the HMAC-SHA256 of the raw bytes must verify with one of the app secrets, compared in
//!    constant time (else 403). Nothing unsigned or badly signed is ever stored;
//! 4. a WhatsApp envelope is appended to the inbox and acknowledged 200 only after the
//!    append returned; anything else that was signed is quarantined and acknowledged 200,
//!    so Meta does not redeliver it forever; a storage failure answers 503 (Meta retries).
//!
//! A refusal for the signature (401, 403) carries a [`SignatureRefused`] response extension
//! and is logged here only at DEBUG: the host counts refusals and logs them at a bounded
//! rate, so a client hammering the endpoint cannot flood the journal.
//!
//! Parsing into observations happens later, in the poll, so a parser bug can never lose a
//! delivery: the raw body is what is stored.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hmac::{Hmac, Mac};
use optout_core::{ConnectorError, Inbox, Secrets, Timestamp};
use sha2::Sha256;
use tokio::sync::Notify;

use crate::config::Config;
use crate::parse;

/// Where Meta is told to deliver.
pub const PATH: &str = "/webhooks/whatsapp";
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";

type HmacSha256 = Hmac<Sha256>;

/// Attached as a response extension to every delivery refused for its signature, for the
/// host to count (`connector`, `reason`) and to log at a bounded rate per source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureRefused {
    /// The connector instance that refused it.
    pub connector: String,
    pub reason: RefusalReason,
}

/// Why a delivery's signature was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// No `X-Hub-Signature-256` header.
    Missing,
    /// A malformed header, or a signature that no app secret verifies.
    Invalid,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Missing => "missing",
            RefusalReason::Invalid => "invalid",
        }
    }
}

/// Everything the handlers need, shared by all requests.
pub struct WebhookState<I: ?Sized> {
    name: String,
    inbox: Arc<I>,
    /// One keyed HMAC per app secret, cloned per request (cheaper than re-keying).
    macs: Vec<HmacSha256>,
    /// HMAC of the verify token under a fixed key: comparing digests with `verify_slice` is
    /// constant-time and does not leak the token's length.
    verify_digest: Vec<u8>,
    max_body_bytes: usize,
    appended: Arc<Notify>,
}

impl<I: ?Sized> std::fmt::Debug for WebhookState<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookState")
            .field("name", &self.name)
            .field("secrets", &self.macs.len())
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

const VERIFY_KEY: &[u8] = b"optout-sync webhook verify token";

impl<I: Inbox + ?Sized> WebhookState<I> {
    /// Keys one HMAC per app secret; `secrets` holds the resolved `app_secrets[i]` and
    /// `verify_token`.
    pub fn new(
        name: &str,
        config: &Config,
        secrets: &Secrets,
        inbox: Arc<I>,
    ) -> Result<Self, ConnectorError> {
        let macs: Vec<HmacSha256> = secrets
            .list("app_secrets")
            .iter()
            .map(|s| {
                HmacSha256::new_from_slice(s.expose().as_bytes())
                    .expect("HMAC takes keys of any length")
            })
            .collect();
        if macs.is_empty() {
            return Err(ConnectorError::Config(
                "app_secrets: at least one is needed".into(),
            ));
        }
        let token = secrets.get("verify_token")?;
        Ok(WebhookState {
            name: name.to_string(),
            inbox,
            macs,
            verify_digest: verify_digest(token.expose().as_bytes()),
            max_body_bytes: config.max_body_bytes,
            appended: Arc::new(Notify::new()),
        })
    }

    /// Notified (`notify_one`, so a wake-up is kept if nobody waits yet) after every
    /// successful append: the daemon's poll worker can wait on it instead of polling an
    /// idle inbox on a timer.
    pub fn appended(&self) -> Arc<Notify> {
        self.appended.clone()
    }

    fn signature_ok(&self, body: &[u8], sig: &[u8; 32]) -> bool {
        // Every secret is tried (no early exit on the first), keeping the time independent
        // of which secret matched.
        self.macs.iter().fold(false, |ok, mac| {
            let mut m = mac.clone();
            m.update(body);
            m.verify_slice(sig).is_ok() | ok
        })
    }

    fn token_ok(&self, token: &str) -> bool {
        let mut m = HmacSha256::new_from_slice(VERIFY_KEY).expect("fixed key");
        m.update(token.as_bytes());
        m.verify_slice(&self.verify_digest).is_ok()
    }
}

fn verify_digest(token: &[u8]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(VERIFY_KEY).expect("fixed key");
    m.update(token);
    m.finalize().into_bytes().to_vec()
}

/// `GET` and `POST` on [`PATH`], with the body limit applied.
pub fn router<I: Inbox + ?Sized>(state: Arc<WebhookState<I>>) -> Router {
    routes(state, &[PATH.to_string()])
}

/// The routes of the connector instance `name`: `{PATH}/{name}` always, and [`PATH`]
/// itself when it is the daemon's only WhatsApp connector (so a single account keeps the
/// callback URL it always had, and several accounts each get their own).
pub fn instance_router<I: Inbox + ?Sized>(
    state: Arc<WebhookState<I>>,
    name: &str,
    sole: bool,
) -> Router {
    let mut paths = vec![format!("{PATH}/{name}")];
    if sole {
        paths.push(PATH.to_string());
    }
    routes(state, &paths)
}

fn routes<I: Inbox + ?Sized>(state: Arc<WebhookState<I>>, paths: &[String]) -> Router {
    let limit = state.max_body_bytes;
    let mut r = Router::new();
    for p in paths {
        r = r.route(p, get(handshake::<I>).post(receive::<I>));
    }
    r.layer(DefaultBodyLimit::max(limit)).with_state(state)
}

async fn handshake<I: Inbox + ?Sized>(
    State(st): State<Arc<WebhookState<I>>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mode = q.get("hub.mode").map(String::as_str);
    let token = q.get("hub.verify_token").map(String::as_str).unwrap_or("");
    let Some(challenge) = q.get("hub.challenge") else {
        return (StatusCode::BAD_REQUEST, "hub.challenge missing").into_response();
    };
    if mode == Some("subscribe") && st.token_ok(token) {
        tracing::info!(connector = %st.name, "webhook subscription verified");
        ([(header::CONTENT_TYPE, "text/plain")], challenge.clone()).into_response()
    } else {
        tracing::warn!(connector = %st.name, "webhook verification refused: wrong mode or verify token");
        (StatusCode::FORBIDDEN, "verification failed").into_response()
    }
}

async fn receive<I: Inbox + ?Sized>(
    State(st): State<Arc<WebhookState<I>>>,
    req: Request,
) -> Response {
    let received_at = Timestamp::now();
    let Some(sig) = signature(req.headers()) else {
        let reason = match req.headers().contains_key(SIGNATURE_HEADER) {
            true => RefusalReason::Invalid,
            false => RefusalReason::Missing,
        };
        tracing::debug!(connector = %st.name, "webhook without a valid X-Hub-Signature-256 refused");
        let msg = "missing or malformed X-Hub-Signature-256";
        return st.refused(StatusCode::UNAUTHORIZED, msg, reason);
    };
    // Refused before the body is touched: hyper sends `100 Continue` only when a body is
    // first read, and a client announcing too much need not send a byte of it.
    if content_length(req.headers()).is_some_and(|n| n > st.max_body_bytes as u64) {
        let msg = format!("body over {} bytes", st.max_body_bytes);
        return (StatusCode::PAYLOAD_TOO_LARGE, msg).into_response();
    }
    // Bytes honours the DefaultBodyLimit layer: a body over the limit is a 413 rejection.
    let body = match Bytes::from_request(req, &()).await {
        Ok(b) => b,
        Err(rejection) => return rejection.into_response(),
    };
    if !st.signature_ok(&body, &sig) {
        tracing::debug!(connector = %st.name, bytes = body.len(), "webhook with a wrong signature refused");
        return st.refused(
            StatusCode::FORBIDDEN,
            "signature mismatch",
            RefusalReason::Invalid,
        );
    }
    let stored = match parse::check_envelope(&body) {
        Ok(()) => st
            .inbox
            .append(body, received_at)
            .await
            .map(|()| st.appended.notify_one()),
        Err(why) => {
            tracing::warn!(connector = %st.name, reason = %why, "signed webhook body is unusable; quarantined");
            st.inbox
                .quarantine(body, received_at, why.to_string())
                .await
        }
    };
    match stored {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => {
            tracing::error!(connector = %st.name, error = %e, "webhook not stored; Meta will redeliver");
            (StatusCode::SERVICE_UNAVAILABLE, "not stored").into_response()
        }
    }
}

impl<I: ?Sized> WebhookState<I> {
    /// A refusal for the signature, marked for the host's accounting.
    fn refused(&self, code: StatusCode, msg: &'static str, reason: RefusalReason) -> Response {
        let mut r = (code, msg).into_response();
        r.extensions_mut().insert(SignatureRefused {
            connector: self.name.clone(),
            reason,
        });
        r
    }
}

/// The announced body length, if the header is present and a number.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `sha256=<64 hex>` → the 32 bytes; anything else is `None`.
fn signature(headers: &HeaderMap) -> Option<[u8; 32]> {
    let v = headers.get(SIGNATURE_HEADER)?.to_str().ok()?.trim();
    let mut out = [0u8; 32];
    hex::decode_to_slice(v.strip_prefix("sha256=")?, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn parses_signature_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(signature(&h), None);
        h.insert(SIGNATURE_HEADER, HeaderValue::from_static("sha1=abcd"));
        assert_eq!(signature(&h), None);
        h.insert(
            SIGNATURE_HEADER,
            HeaderValue::from_str(&format!("sha256={}", "zz".repeat(32))).unwrap(),
        );
        assert_eq!(signature(&h), None);
        h.insert(
            SIGNATURE_HEADER,
            HeaderValue::from_str(&format!("sha256={}", "0A".repeat(32))).unwrap(),
        );
        assert_eq!(signature(&h), Some([0x0a; 32]));
    }
}
