//! Webhooks refused for their signature: every one is counted in
//! `optout_webhook_signature_failures_total{connector,reason}`, and logged at most once per
//! [`LOG_INTERVAL`] per source address, with the number refused since that source's last
//! line. A wrong app secret after a rotation shows in the metric (and its alert); a client
//! hammering the endpoint cannot flood the journal.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use optout_whatsapp::webhook::SignatureRefused;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// At most one log line per source address per this.
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Sources remembered at once; beyond it (a flood from many addresses) the rest share one
/// entry, so memory stays bounded.
const MAX_SOURCES: usize = 4096;

/// One source's refusals since its last log line.
struct Source {
    logged_at: Instant,
    since: u64,
}

pub struct Refusals {
    metrics: Arc<Metrics>,
    /// `None`: every source that did not fit in [`MAX_SOURCES`].
    sources: Mutex<HashMap<Option<IpAddr>, Source>>,
}

impl Refusals {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Refusals {
            metrics,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one refusal and logs it if `peer` has had no line for [`LOG_INTERVAL`].
    pub fn record(&self, peer: Option<IpAddr>, refused: &SignatureRefused) {
        self.metrics
            .signature_failure(&refused.connector, refused.reason.as_str())
            .inc();
        if let Some(count) = self.due(peer, Instant::now()) {
            let source = peer.map_or_else(|| "(many sources)".to_string(), |ip| ip.to_string());
            tracing::warn!(
                connector = %refused.connector,
                reason = %refused.reason.as_str(),
                source = %source,
                refused = count,
                "webhooks refused for a missing or wrong X-Hub-Signature-256 (check the app secrets; at most one line per source per minute)"
            );
        }
    }

    /// Adds one refusal from `peer`; returns the count to log when a line is due.
    fn due(&self, peer: Option<IpAddr>, now: Instant) -> Option<u64> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if sources.len() >= MAX_SOURCES && !sources.contains_key(&peer) {
            // Sources quiet for an interval have nothing pending worth a line of their own.
            sources.retain(|k, s| k.is_none() || now.duration_since(s.logged_at) < LOG_INTERVAL);
        }
        let key = match sources.len() < MAX_SOURCES || sources.contains_key(&peer) {
            true => peer,
            false => None,
        };
        match sources.get_mut(&key) {
            None => {
                sources.insert(
                    key,
                    Source {
                        logged_at: now,
                        since: 0,
                    },
                );
                Some(1)
            }
            Some(s) if now.duration_since(s.logged_at) >= LOG_INTERVAL => {
                let count = s.since + 1;
                *s = Source {
                    logged_at: now,
                    since: 0,
                };
                Some(count)
            }
            Some(s) => {
                s.since += 1;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source's first refusal is logged, the rest of the interval only counted, and the
    /// next line carries the count since the last one.
    #[tokio::test(start_paused = true)]
    async fn one_line_per_source_per_interval() {
        let r = Refusals::new(Arc::new(Metrics::new()));
        let (a, b) = (
            Some("10.0.0.1".parse().unwrap()),
            Some("10.0.0.2".parse().unwrap()),
        );
        let now = Instant::now();
        assert_eq!(r.due(a, now), Some(1));
        assert_eq!(r.due(b, now), Some(1));
        for _ in 0..999 {
            assert_eq!(r.due(a, now + Duration::from_secs(30)), None);
        }
        assert_eq!(r.due(a, now + LOG_INTERVAL), Some(1000));
        assert_eq!(r.due(b, now + LOG_INTERVAL), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded() {
        let r = Refusals::new(Arc::new(Metrics::new()));
        let now = Instant::now();
        for i in 0..(MAX_SOURCES as u32 + 100) {
            r.due(Some(IpAddr::from(i.to_be_bytes())), now);
        }
        // The shared entry is the one beyond the bound.
        assert!(r.sources.lock().unwrap().len() <= MAX_SOURCES + 1);
        // Once the others have been quiet for an interval, a new source gets its own line.
        let late = now + LOG_INTERVAL;
        assert_eq!(r.due(Some("192.0.2.1".parse().unwrap()), late), Some(1));
        assert!(r.sources.lock().unwrap().len() < 10);
    }
}
