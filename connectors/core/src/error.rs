//! The one error type connectors return. Each variant says what the caller does next:
//! wait and retry, re-authenticate or raise an alarm, or give up on the request.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The vendor asked us to slow down (429, throughput error codes). Retry after the hint.
    #[error("rate limited ({policy}); retry after {}", fmt_after(.retry_after))]
    RateLimited {
        retry_after: Option<Duration>,
        policy: String,
    },
    /// A daily or org-wide allocation is used up. Pause for long and raise an alarm;
    /// retrying sooner only burns what is left.
    #[error("quota exhausted ({detail}); paused for {}", humanize(*.retry_after))]
    QuotaExhausted {
        retry_after: Duration,
        detail: String,
    },
    /// Credentials were refused even after re-authenticating. An alarm: nothing moves
    /// until an operator fixes the credentials.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Credentials are valid but lack a permission (e.g. a missing scope). An alarm.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// 5xx, timeouts, reset connections, unparseable responses: retry with backoff.
    #[error("transient: {0}")]
    Transient(String),
    /// The request itself was refused (400 and the like); retrying the same request fails
    /// the same way.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The connector is misconfigured (bad field name, missing setting).
    #[error("configuration: {0}")]
    Config(String),
}

impl ConnectorError {
    /// Whether retrying later can succeed without an operator's help.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ConnectorError::RateLimited { .. }
                | ConnectorError::QuotaExhausted { .. }
                | ConnectorError::Transient(_)
        )
    }

    /// Whether the operator must be told (status, metrics) rather than only the log.
    pub fn is_alarm(&self) -> bool {
        matches!(
            self,
            ConnectorError::QuotaExhausted { .. }
                | ConnectorError::Unauthorized(_)
                | ConnectorError::Forbidden(_)
                | ConnectorError::Config(_)
        )
    }

    /// The least time to wait before the next attempt, when the vendor said so.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ConnectorError::RateLimited { retry_after, .. } => *retry_after,
            ConnectorError::QuotaExhausted { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectorError::RateLimited { .. } => "rate_limited",
            ConnectorError::QuotaExhausted { .. } => "quota_exhausted",
            ConnectorError::Unauthorized(_) => "unauthorized",
            ConnectorError::Forbidden(_) => "forbidden",
            ConnectorError::Transient(_) => "transient",
            ConnectorError::Rejected(_) => "rejected",
            ConnectorError::Config(_) => "config",
        }
    }
}

fn fmt_after(d: &Option<Duration>) -> String {
    match d {
        Some(d) => humanize(*d),
        None => "backoff".to_string(),
    }
}

fn humanize(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
