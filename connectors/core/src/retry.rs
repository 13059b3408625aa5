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

    /// The delay before the next attempt. When the vendor said how long to wait (a
    /// `Retry-After`, a quota reset), that is the delay, plus a tenth (at most a second) so
    /// many clients do not return at the same instant; honoured hints do not advance the
    /// exponential state, so a run of rate limits does not inflate the delay of the next,
    /// unrelated failure.
    pub fn next_delay(&mut self, hint: Option<Duration>) -> Duration {
        match hint {
            Some(h) => h + (h / 10).min(Duration::from_secs(1)),
            None => self.inner.next_backoff().unwrap_or(self.max),
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
        // Honoured hints leave the exponential state alone.
        for _ in 0..20 {
            assert_eq!(
                b.next_delay(Some(Duration::from_secs(2))),
                Duration::from_millis(2200)
            );
        }
        assert!(b.next_delay(None) <= Duration::from_millis(130));
        b.reset();
        assert!(b.next_delay(None) <= Duration::from_millis(130));
    }
}
