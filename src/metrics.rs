//! Prometheus metrics (`/metrics`): what the daemon did and what is pending.
//!
//! Counters are updated as things happen; gauges that reflect the store (outbox depth,
//! dead letters, unverified pushes, decision totals) are refreshed just before each
//! scrape, so they can never drift from the truth.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceResult {
    pub source: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeDecision {
    pub scope: String,
    pub decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectorOutcome {
    pub connector: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectorLabel {
    pub connector: String,
}

pub struct Metrics {
    registry: Registry,
    pub observations: Family<SourceResult, Counter>,
    pub decisions: Family<ScopeDecision, Counter>,
    pub pushes: Family<ConnectorOutcome, Counter>,
    pub poll_errors: Family<ConnectorOutcome, Counter>,
    pub webhooks: Family<SourceResult, Counter>,
    pub outbox_depth: Family<ConnectorLabel, Gauge>,
    pub dead_letters: Family<ConnectorLabel, Gauge>,
    pub unverified: Family<ConnectorLabel, Gauge>,
    pub cursor_lag: Family<ConnectorLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub alarm: Family<ConnectorLabel, Gauge>,
    pub subjects: Family<ScopeDecision, Gauge>,
    /// Seconds from the customer's act (event time) to the push that carries it being
    /// done in a target system.
    pub propagation: Family<ConnectorLabel, Histogram>,
    /// Seconds from a push being done to the read-back that confirms it.
    pub verification: Family<ConnectorLabel, Histogram>,
    /// Serialises scrapes (gauges are refreshed then encoded).
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("optout");
        let observations = Family::<SourceResult, Counter>::default();
        registry.register(
            "observations",
            "Observations read, by source and result",
            observations.clone(),
        );
        let decisions = Family::<ScopeDecision, Counter>::default();
        registry.register(
            "decisions",
            "Decision changes, by scope and new decision",
            decisions.clone(),
        );
        let pushes = Family::<ConnectorOutcome, Counter>::default();
        registry.register(
            "pushes",
            "Push items, by connector and outcome (done, retry, rejected)",
            pushes.clone(),
        );
        let poll_errors = Family::<ConnectorOutcome, Counter>::default();
        registry.register(
            "poll_errors",
            "Failed polls and pushes, by connector and error kind",
            poll_errors.clone(),
        );
        let webhooks = Family::<SourceResult, Counter>::default();
        registry.register(
            "webhooks",
            "Webhook deliveries, by result",
            webhooks.clone(),
        );
        let outbox_depth = Family::<ConnectorLabel, Gauge>::default();
        registry.register(
            "outbox_depth",
            "Pushes waiting, by connector",
            outbox_depth.clone(),
        );
        let dead_letters = Family::<ConnectorLabel, Gauge>::default();
        registry.register(
            "dead_letters",
            "Pushes rejected for good, by connector",
            dead_letters.clone(),
        );
        let unverified = Family::<ConnectorLabel, Gauge>::default();
        registry.register(
            "unverified_pushes",
            "Pushes not read back within unverified_after (an alarm)",
            unverified.clone(),
        );
        let cursor_lag =
            Family::<ConnectorLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "cursor_lag_seconds",
            "Seconds since the connector last completed a poll",
            cursor_lag.clone(),
        );
        let alarm = Family::<ConnectorLabel, Gauge>::default();
        registry.register(
            "connector_alarm",
            "1 when a connector needs an operator (credentials, quota, configuration)",
            alarm.clone(),
        );
        let subjects = Family::<ScopeDecision, Gauge>::default();
        registry.register("subjects", "People by scope and decision", subjects.clone());
        let buckets = || Histogram::new(exponential_buckets(0.005, 2.0, 20));
        let propagation = Family::<ConnectorLabel, Histogram>::new_with_constructor(buckets);
        registry.register(
            "propagation_seconds",
            "From the customer's act to the push being done, by target",
            propagation.clone(),
        );
        let verification = Family::<ConnectorLabel, Histogram>::new_with_constructor(buckets);
        registry.register(
            "verification_seconds",
            "From a push to the read-back that confirms it",
            verification.clone(),
        );
        Metrics {
            registry,
            observations,
            decisions,
            pushes,
            poll_errors,
            webhooks,
            outbox_depth,
            dead_letters,
            unverified,
            cursor_lag,
            alarm,
            subjects,
            propagation,
            verification,
            scrape: Mutex::new(()),
        }
    }

    pub fn connector(c: &str) -> ConnectorLabel {
        ConnectorLabel {
            connector: c.to_string(),
        }
    }

    pub fn observe_propagation(&self, connector: &str, d: Duration) {
        self.propagation
            .get_or_create(&Self::connector(connector))
            .observe(d.as_secs_f64());
    }

    /// Encodes the registry after `refresh` has set the gauges.
    pub fn render(&self, refresh: impl FnOnce(&Metrics)) -> String {
        let _guard = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        refresh(self);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
