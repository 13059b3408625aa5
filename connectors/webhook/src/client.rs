//! One delivery: builds and signs the request for one item, sends it, and classifies what
//! happened. The only code here that touches HTTP.
//!
//! Messages never contain the URL (its path or query may carry a token), so reqwest's own
//! error text, which does, is never shown; only its innermost cause is.

use std::error::Error as _;
use std::fmt;
use std::time::Duration;

use optout_core::{ConnectorError, PushItem, Secret, Timestamp};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Response, StatusCode, Url};

use crate::config::{Config, parse_url};
use crate::event::Event;
use crate::signature::sign;

/// How many bytes of a response body are read: enough for an error excerpt, and a
/// receiver cannot make us buffer a large body.
const BODY_LIMIT: usize = 4096;

/// What became of one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The receiver answered 2xx.
    Done,
    /// The receiver answered but asked for a later attempt (408, 425, 429, 5xx).
    Retry {
        after: Option<Duration>,
        reason: String,
        /// A 429: the rest of the batch is held back rather than sent into the limit.
        rate_limited: bool,
    },
    /// The receiver refused the event for good (410, 404, other 4xx, a redirect).
    Rejected(String),
    /// No answer: timeout, refused or reset connection.
    Transport {
        reason: String,
        /// The connection could not even be opened: the endpoint is down, so the rest
        /// of the batch is not tried.
        unreachable: bool,
    },
}

/// Sends signed events to the configured URL.
pub(crate) struct Sender {
    http: reqwest::Client,
    url: Url,
    host: String,
    timeout: Duration,
    secret: Secret,
    /// Static headers and the bearer token, built once.
    headers: HeaderMap,
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("host", &self.host)
            .field("timeout", &self.timeout)
            .field("secret", &self.secret)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Sender {
    pub(crate) fn new(
        config: &Config,
        secret: Secret,
        bearer_token: Option<Secret>,
    ) -> Result<Sender, ConnectorError> {
        // The settings are checked (`optout_core::contract`); these conversions cannot fail
        // for them, and fail cleanly, naming the key, for anything else.
        let url =
            parse_url(&config.url).map_err(|e| ConnectorError::Config(format!("url: {e}")))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ConnectorError::Config(format!("headers.{name}: invalid name")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| ConnectorError::Config(format!("headers.{name}: invalid value")))?;
            headers.insert(name, value);
        }
        if let Some(token) = bearer_token {
            let mut value =
                HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
                    ConnectorError::Config("bearer_token: not a valid header value".into())
                })?;
            // Keeps the value out of reqwest's and hyper's debug output.
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        Ok(Sender {
            http: optout_core::http::client(config.timeout),
            host: config.host(),
            url,
            timeout: config.timeout,
            secret,
            headers,
        })
    }

    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    pub(crate) fn url(&self) -> &Url {
        &self.url
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Delivers one item as one signed POST.
    pub(crate) async fn deliver(&self, item: &PushItem) -> Delivery {
        let now = Timestamp::now();
        let event = Event::from_item(item, now);
        let body = serde_json::to_vec(&event).expect("an event always serialises");
        // Seconds by the same clock as `sent_at`, so the two never disagree.
        let timestamp = now.millis().div_euclid(1000).to_string();
        let signature = sign(self.secret.expose().as_bytes(), &timestamp, &body);
        let request = self
            .http
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("x-optout-event-id", &event.id)
            .header("x-optout-timestamp", &timestamp)
            .header("x-optout-signature-256", signature)
            .body(body);
        match request.send().await {
            Ok(response) => classify(response).await,
            Err(e) => transport(&e, self.timeout),
        }
    }
}

async fn classify(mut response: Response) -> Delivery {
    let status = response.status();
    let after = optout_core::http::retry_after(response.headers());
    // Read (a bounded part of) the body even on success, so the connection can be reused.
    let mut body = Vec::new();
    while body.len() < BODY_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            // A body cut short after the status still leaves us the status.
            Ok(None) | Err(_) => break,
        }
    }
    let excerpt = optout_core::http::excerpt(&String::from_utf8_lossy(&body));
    let said = |what: &str| {
        if excerpt.is_empty() {
            format!("{status} {what}")
        } else {
            format!("{status} {what}: {excerpt}")
        }
    };
    match status.as_u16() {
        200..=299 => Delivery::Done,
        408 | 425 | 429 | 500..=599 => Delivery::Retry {
            after,
            reason: said("from the receiver"),
            rate_limited: status == StatusCode::TOO_MANY_REQUESTS,
        },
        404 | 410 => Delivery::Rejected(said("the endpoint is gone; check the url")),
        // Redirects are not followed (the signature and bearer token would go along);
        // the Location is not shown, as it may carry a token like the url itself.
        300..=399 => Delivery::Rejected(said("redirect not followed; update the url")),
        _ => Delivery::Rejected(said("refused by the receiver")),
    }
}

/// `Retry-After` as seconds (the core's reading) or as an HTTP date, which webhook
/// receivers also send; at most a day.
fn transport(e: &reqwest::Error, timeout: Duration) -> Delivery {
    let unreachable = e.is_connect();
    let what = if e.is_timeout() {
        format!("no answer within {timeout:?}")
    } else if unreachable {
        "could not connect".to_string()
    } else {
        "connection failed".to_string()
    };
    // The innermost cause ("Connection refused", "connection closed before message
    // completed") says what happened without the URL that reqwest's own text carries.
    let mut cause = e.source();
    while let Some(next) = cause.and_then(|c| c.source()) {
        cause = Some(next);
    }
    let reason = match cause {
        Some(cause) => format!("{what}: {cause}"),
        None => what,
    };
    Delivery::Transport {
        reason,
        unreachable,
    }
}
