//! The client-side rate limiter one connector instance (one portal) shares between polling
//! and pushing, so the daemon waits instead of provoking HubSpot's 429s.
//!
//! HubSpot counts every request in a rolling 10-second window, search requests also per
//! second, and all requests per day. We record the instant each request is sent and, before
//! the next one, sleep until it fits. The windows are a little longer than HubSpot's
//! because HubSpot counts arrivals, which lag our send instants by the network latency.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{Datelike, Utc};
use optout_core::ConnectorError;
use tokio::time::Instant;

const WINDOW: Duration = Duration::from_millis(10_250);
const SEARCH_WINDOW: Duration = Duration::from_millis(1_100);

/// Which of HubSpot's limits a request counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// CRM search: the rolling window and the per-second search limit.
    Search,
    /// Any other API request: the rolling window only.
    Other,
}

pub(crate) struct Limiter {
    per_window: usize,
    search_per_second: usize,
    daily: Option<u64>,
    // A tokio mutex held while waiting: requests go out in the order they asked.
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    sent: VecDeque<Instant>,
    searches: VecDeque<Instant>,
    /// Days since the epoch (UTC) that `today` counts.
    day: i32,
    today: u64,
}

impl Limiter {
    pub(crate) fn new(per_10s: u32, search_per_second: u32, daily: Option<u64>) -> Self {
        Limiter {
            per_window: per_10s.max(1) as usize,
            search_per_second: search_per_second.max(1) as usize,
            daily,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// Waits until one more request of `kind` fits every limit, then counts it as sent.
    /// Fails at once when the configured daily allowance is used up: waiting hours inside a
    /// request would only hide the condition from the operator.
    pub(crate) async fn acquire(&self, kind: Kind) -> Result<(), ConnectorError> {
        let mut st = self.state.lock().await;
        if let Some(limit) = self.daily {
            let day = Utc::now().date_naive().num_days_from_ce();
            if st.day != day {
                st.day = day;
                st.today = 0;
            }
            if st.today >= limit {
                return Err(ConnectorError::QuotaExhausted {
                    retry_after: until_utc_midnight(),
                    detail: format!("the configured daily_limit of {limit} requests is used up"),
                });
            }
        }
        loop {
            let now = Instant::now();
            let mut ready_at = earliest_slot(&mut st.sent, self.per_window, WINDOW, now);
            if kind == Kind::Search {
                let search_at =
                    earliest_slot(&mut st.searches, self.search_per_second, SEARCH_WINDOW, now);
                ready_at = ready_at.max(search_at);
            }
            match ready_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => break,
            }
        }
        let now = Instant::now();
        st.sent.push_back(now);
        if kind == Kind::Search {
            st.searches.push_back(now);
        }
        st.today += 1;
        Ok(())
    }
}

/// Drops instants older than `window`; returns when the next request may go, or `None` if
/// it may go now.
fn earliest_slot(
    sent: &mut VecDeque<Instant>,
    limit: usize,
    window: Duration,
    now: Instant,
) -> Option<Instant> {
    while sent
        .front()
        .is_some_and(|t| now.duration_since(*t) >= window)
    {
        sent.pop_front();
    }
    // With `limit` or more requests inside the window, the one that must leave it first is
    // the `limit`-th most recent.
    (sent.len() >= limit).then(|| sent[sent.len() - limit] + window)
}

/// Time until the next midnight UTC, when HubSpot's daily allowance is taken to reset.
pub(crate) fn until_utc_midnight() -> Duration {
    let now = Utc::now();
    let midnight = (now.date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    (midnight - now).to_std().unwrap_or(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rolling_window_spaces_requests() {
        let l = Limiter::new(3, 100, None);
        let start = Instant::now();
        for _ in 0..3 {
            l.acquire(Kind::Other).await.unwrap();
        }
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the first three fit the window"
        );
        l.acquire(Kind::Other).await.unwrap();
        assert_eq!(
            start.elapsed(),
            WINDOW,
            "the fourth waits until the first leaves the window"
        );
        for _ in 0..2 {
            l.acquire(Kind::Other).await.unwrap();
        }
        assert_eq!(start.elapsed(), WINDOW);
        l.acquire(Kind::Other).await.unwrap();
        assert_eq!(start.elapsed(), WINDOW * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn searches_have_their_own_per_second_limit() {
        let l = Limiter::new(1000, 4, None);
        let start = Instant::now();
        for _ in 0..4 {
            l.acquire(Kind::Search).await.unwrap();
        }
        // Other requests are not held back by the search limit...
        l.acquire(Kind::Other).await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
        // ...but the fifth search waits for the per-second window.
        l.acquire(Kind::Search).await.unwrap();
        assert_eq!(start.elapsed(), SEARCH_WINDOW);
        // 12 searches take at least two more windows.
        for _ in 0..7 {
            l.acquire(Kind::Search).await.unwrap();
        }
        assert_eq!(start.elapsed(), SEARCH_WINDOW * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn daily_limit_fails_fast_until_midnight() {
        let l = Limiter::new(1000, 100, Some(2));
        l.acquire(Kind::Other).await.unwrap();
        l.acquire(Kind::Search).await.unwrap();
        let e = l.acquire(Kind::Other).await.unwrap_err();
        assert!(matches!(e, ConnectorError::QuotaExhausted { .. }), "{e}");
        let wait = e.retry_after().unwrap();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(86_400));
    }
}
