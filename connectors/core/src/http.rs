//! Small HTTP helpers every connector shares: one way to build a client, to read
//! `Retry-After`, and to classify a failed response or transport error.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

use crate::ConnectorError;

/// A client with a request timeout and no redirects (a redirect from a vendor API is a
/// misconfiguration worth seeing, not following with a bearer token attached).
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("optout-sync/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a TLS backend is compiled in")
}

/// `Retry-After`, in either form HTTP allows: delay-seconds or an HTTP-date (RFC 7231;
/// a date in the past means "now"). Capped at a day.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(s) = v.parse::<f64>() {
        return (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(86_400.0)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let wait = at.timestamp_millis() - chrono::Utc::now().timestamp_millis();
    Some(Duration::from_millis(wait.clamp(0, 86_400_000) as u64))
}

/// A transport failure (connect, timeout, reset, truncated body) is always transient.
/// The message never includes the URL's query, which could carry a token.
pub fn transport_error(e: reqwest::Error) -> ConnectorError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_decode() {
        "could not decode the response"
    } else if e.is_body() {
        "the response body was cut off"
    } else {
        "request failed"
    };
    let host = e
        .url()
        .map(|u| format!("{}{}", u.host_str().unwrap_or(""), u.path()))
        .unwrap_or_default();
    ConnectorError::Transient(format!("{what} ({host})"))
}

/// The fallback classification of a non-success status, for responses the connector has
/// no vendor-specific rule for. `body` is a short excerpt for the message.
pub fn classify_status(status: StatusCode, headers: &HeaderMap, body: &str) -> ConnectorError {
    let excerpt = excerpt(body);
    match status.as_u16() {
        429 => ConnectorError::RateLimited {
            retry_after: retry_after(headers),
            policy: "http 429".into(),
        },
        401 => ConnectorError::Unauthorized(format!("401: {excerpt}")),
        403 => ConnectorError::Forbidden(format!("403: {excerpt}")),
        408 | 423 | 425 | 500..=599 => ConnectorError::Transient(format!("{status}: {excerpt}")),
        _ => ConnectorError::Rejected(format!("{status}: {excerpt}")),
    }
}

/// At most 300 characters of a response body, with control characters removed, for
/// error messages and logs.
pub fn excerpt(body: &str) -> String {
    let mut s: String = body.chars().filter(|c| !c.is_control()).take(300).collect();
    if body.chars().count() > 300 {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn reads_retry_after_and_classifies() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO), "a date in the past");
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
        h.insert(RETRY_AFTER, HeaderValue::from_str(&soon).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(110) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        let e = classify_status(StatusCode::TOO_MANY_REQUESTS, &h, "");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        assert!(classify_status(StatusCode::BAD_GATEWAY, &h, "").is_retryable());
        assert!(!classify_status(StatusCode::BAD_REQUEST, &h, "").is_retryable());
        assert!(classify_status(StatusCode::UNAUTHORIZED, &h, "").is_alarm());
        assert_eq!(excerpt(&"x".repeat(400)).chars().count(), 301);
    }
}
