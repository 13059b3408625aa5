//! The one place that uses the `backoff` crate, so replacing it (it is flagged
//! unmaintained, RUSTSEC-2025-0012) is a one-file change.
//!
//! [`Backoff`] hands out the next delay: exponential with jitter, never shorter than a
//! vendor's `Retry-After`, reset after a success.

use std::time::Duration;

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff as _;

#[derive(Debug)]
pub struct Backoff {
    inner: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// `initial` is the first delay, `max` the ceiling. There is no give-up time: an
    /// opt-out is retried until it is done or clearly rejected.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let inner = ExponentialBackoff {
            current_interval: initial,
            initial_interval: initial,
            randomization_factor: 0.3,
            multiplier: 2.0,
            max_interval: max,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        Backoff { inner, max }
    }

    /// Defaults for HTTP calls to vendors: 200 ms doubling to 5 minutes.
    pub fn for_http() -> Self {
        Backoff::new(Duration::from_millis(200), Duration::from_secs(300))
    }

    /// The delay before the next attempt; at least `hint` when the vendor gave one.
    pub fn next_delay(&mut self, hint: Option<Duration>) -> Duration {
        let computed = self.inner.next_backoff().unwrap_or(self.max);
        match hint {
            Some(h) => h.max(computed.min(h + Duration::from_secs(1))),
            None => computed,
        }
    }

    /// Call after a success so the next failure starts from the initial delay again.
    pub fn reset(&mut self) {
        self.inner.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_honours_hints() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay(None);
        assert!(first >= Duration::from_millis(70) && first <= Duration::from_millis(130));
        for _ in 0..20 {
            assert!(b.next_delay(None) <= Duration::from_millis(2600));
        }
        assert!(b.next_delay(Some(Duration::from_secs(10))) >= Duration::from_secs(10));
        b.reset();
        assert!(b.next_delay(None) <= Duration::from_millis(130));
    }
}
