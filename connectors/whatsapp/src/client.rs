//! The Graph API client: the bearer token, a client-side send-rate limiter, the two calls
//! the connector makes (send a text message, read our phone number for health) and the
//! classification of Graph errors.
//!
//! Graph errors are decided by `error.code`, never by the HTTP status or the title (Meta
//! returns the same code under different statuses). A system-user token cannot be refreshed
//! by API; when Graph says the token is invalid (190, 0), the secret reference is read
//! again once — an operator may have rotated the file or credential — and the request is
//! retried once if the token changed.

use std::sync::{Mutex, RwLock};
use std::time::Duration;

use optout_core::{ConnectorError, Secret, SecretRef, http};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

/// What Graph said about one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// 2xx; the message id when the call was a send.
    Ok(Option<String>),
    /// A Graph error object.
    Graph(GraphError),
    /// No usable Graph error (HTTP-level failure, unreadable body, transport error).
    Http(String, Class),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GraphError {
    pub code: i64,
    pub title: String,
    pub retry_after: Option<Duration>,
}

impl GraphError {
    pub fn class(&self) -> Class {
        classify(self.code)
    }
    pub fn describe(&self) -> String {
        format!("graph error {}: {}", self.code, http::excerpt(&self.title))
    }
}

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// An app-, account- or number-wide throttle: this item and every later one in the batch
    /// waits.
    Throttled,
    /// This item may succeed later (pair rate limit, temporary Graph trouble).
    Retry,
    /// The item can never succeed as is.
    Reject,
    /// The token is invalid or expired: an alarm.
    Unauthorized,
    /// The token lacks a permission or asset access: an alarm.
    Forbidden,
}

/// Graph error codes (Meta's error-code reference; api-reference §1.5).
pub fn classify(code: i64) -> Class {
    match code {
        4 | 80007 | 130429 => Class::Throttled,
        1 | 2 | 131000 | 131016 | 131056 => Class::Retry,
        0 | 190 => Class::Unauthorized,
        10 | 200..=299 => Class::Forbidden,
        // 131047 window closed, 131026 undeliverable, 131050 marketing stopped, 131049
        // ecosystem limit, 131048 spam limit, 368/131031 policy, 100 bad parameter, ...
        _ => Class::Reject,
    }
}

pub(crate) struct Graph {
    http: reqwest::Client,
    root: String,
    phone_number_id: String,
    token_ref: SecretRef,
    token: RwLock<Secret>,
    limiter: Limiter,
}

impl Graph {
    /// `token` is `token_ref` as read at start; the reference is read again only after
    /// Meta refuses the token (it may have been rotated).
    pub fn new(
        root: String,
        phone_number_id: String,
        (token_ref, token): (SecretRef, Secret),
        timeout: Duration,
        per_second: u32,
    ) -> Self {
        Graph {
            http: http::client(timeout),
            root,
            phone_number_id,
            token_ref,
            token: RwLock::new(token),
            limiter: Limiter::new(Duration::from_secs(1) / per_second.max(1)),
        }
    }

    /// `POST /{version}/{phone_number_id}/messages`.
    pub async fn send_message(&self, body: &Value) -> Reply {
        self.limiter.wait().await;
        let url = format!("{}/{}/messages", self.root, self.phone_number_id);
        self.with_reauth(|token| self.http.post(&url).bearer_auth(token).json(body))
            .await
    }

    /// `GET /{version}/{phone_number_id}?fields=id`: can we see our own number?
    pub async fn phone_number(&self) -> Reply {
        let url = format!("{}/{}", self.root, self.phone_number_id);
        self.with_reauth(|token| {
            self.http
                .get(&url)
                .query(&[("fields", "id")])
                .bearer_auth(token)
        })
        .await
    }

    /// `GET /{version}/{waba_id}/subscribed_apps`: how many apps receive the account's
    /// webhooks, or what Graph said instead.
    pub async fn subscribed_apps(&self, waba_id: &str) -> Result<usize, Reply> {
        let url = format!("{}/{waba_id}/subscribed_apps", self.root);
        let token = self.current_token();
        let req = self.http.get(&url).bearer_auth(token.expose());
        let resp = req
            .send()
            .await
            .map_err(|e| Reply::Http(http::transport_error(e).to_string(), Class::Retry))?;
        let (status, headers) = (resp.status(), resp.headers().clone());
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(interpret(status, &headers, &text));
        }
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(v["data"].as_array().map_or(0, Vec::len))
    }

    async fn with_reauth(&self, build: impl Fn(&str) -> reqwest::RequestBuilder) -> Reply {
        let token = self.current_token();
        let reply = execute(build(token.expose())).await;
        let invalid_token = matches!(&reply, Reply::Graph(e) if e.class() == Class::Unauthorized)
            || matches!(&reply, Reply::Http(_, Class::Unauthorized));
        if !invalid_token {
            return reply;
        }
        match self.token_ref.resolve() {
            Ok(fresh) if fresh != token => {
                tracing::info!(
                    "Graph refused the access token; retrying once with the newly read one"
                );
                *self.token.write().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
                execute(build(fresh.expose())).await
            }
            _ => reply,
        }
    }

    fn current_token(&self) -> Secret {
        self.token.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn execute(req: reqwest::RequestBuilder) -> Reply {
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return Reply::Http(http::transport_error(e).to_string(), Class::Retry),
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = match resp.text().await {
        Ok(t) => t,
        Err(e) => return Reply::Http(http::transport_error(e).to_string(), Class::Retry),
    };
    interpret(status, &headers, &text)
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorObject,
}

#[derive(Deserialize)]
struct ErrorObject {
    code: Option<i64>,
    message: Option<String>,
    error_user_title: Option<String>,
}

/// Reads a Graph response. Pure, so the classification is unit-tested without a server.
pub fn interpret(status: StatusCode, headers: &HeaderMap, text: &str) -> Reply {
    if status.is_success() {
        let id = serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| v.pointer("/messages/0/id")?.as_str().map(String::from));
        return Reply::Ok(id);
    }
    if let Ok(ErrorBody {
        error:
            ErrorObject {
                code: Some(code),
                message,
                error_user_title,
            },
    }) = serde_json::from_str::<ErrorBody>(text)
    {
        return Reply::Graph(GraphError {
            code,
            title: error_user_title.or(message).unwrap_or_default(),
            retry_after: http::retry_after(headers),
        });
    }
    let err = http::classify_status(status, headers, text);
    let class = match &err {
        ConnectorError::RateLimited { .. } => Class::Throttled,
        ConnectorError::Unauthorized(_) => Class::Unauthorized,
        ConnectorError::Forbidden(_) => Class::Forbidden,
        e if e.is_retryable() => Class::Retry,
        _ => Class::Reject,
    };
    Reply::Http(err.to_string(), class)
}

/// Spaces sends at least `interval` apart, so a burst of confirmations never trips Graph's
/// throughput limit. Slots are handed out under a short lock and waited for outside it.
struct Limiter {
    interval: Duration,
    next: Mutex<Option<Instant>>,
}

impl Limiter {
    fn new(interval: Duration) -> Self {
        Limiter {
            interval,
            next: Mutex::new(None),
        }
    }

    async fn wait(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + self.interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_code_not_status() {
        for (code, class) in [
            (4, Class::Throttled),
            (80007, Class::Throttled),
            (130429, Class::Throttled),
            (131056, Class::Retry),
            (131000, Class::Retry),
            (1, Class::Retry),
            (190, Class::Unauthorized),
            (0, Class::Unauthorized),
            (10, Class::Forbidden),
            (200, Class::Forbidden),
            (299, Class::Forbidden),
            (131047, Class::Reject),
            (131050, Class::Reject),
            (131026, Class::Reject),
            (368, Class::Reject),
            (100, Class::Reject),
        ] {
            assert_eq!(classify(code), class, "code {code}");
        }
        // A throttle code under HTTP 400 is still a throttle.
        let body = r#"{"error":{"message":"(#130429) Rate limit hit","type":"OAuthException","code":130429}}"#;
        match interpret(StatusCode::BAD_REQUEST, &HeaderMap::new(), body) {
            Reply::Graph(e) => assert_eq!(e.class(), Class::Throttled),
            other => panic!("{other:?}"),
        }
        // No Graph error object: fall back to the HTTP status.
        assert!(matches!(
            interpret(StatusCode::BAD_GATEWAY, &HeaderMap::new(), "<html>"),
            Reply::Http(_, Class::Retry)
        ));
        assert_eq!(
            interpret(
                StatusCode::OK,
                &HeaderMap::new(),
                r#"{"messages":[{"id":"wamid.1"}]}"#
            ),
            Reply::Ok(Some("wamid.1".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_spaces_sends() {
        let l = Limiter::new(Duration::from_millis(100));
        let t0 = Instant::now();
        for _ in 0..5 {
            l.wait().await;
        }
        assert_eq!(t0.elapsed(), Duration::from_millis(400));
    }
}
