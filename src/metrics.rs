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
use prometheus_client::registry::{Metric, Registry};

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
pub struct ConnectorReason {
    pub connector: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FromTo {
    pub from: String,
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectorLabel {
    pub connector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabel {
    pub instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

/// Opt-ins held by the mass re-opt-in guard, by source: ever (a counter), and now (a
/// gauge, refreshed from the store before each scrape).
#[derive(Clone)]
pub struct GuardMetrics {
    pub opt_ins_held: Family<SourceLabel, Counter>,
    pub held_opt_ins: Family<SourceLabel, Gauge>,
}

impl GuardMetrics {
    fn register(r: &mut Registry) -> Self {
        GuardMetrics {
            opt_ins_held: registered(
                r,
                "opt_ins_held",
                "Opt-ins held by the mass re-opt-in guard, by source",
            ),
            held_opt_ins: registered(
                r,
                "held_opt_ins",
                "Opt-ins held now, waiting for an operator (optout-sync holds), by source",
            ),
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub observations: Family<SourceResult, Counter>,
    pub decisions: Family<ScopeDecision, Counter>,
    pub pushes: Family<ConnectorOutcome, Counter>,
    pub poll_errors: Family<ConnectorOutcome, Counter>,
    pub webhooks: Family<SourceResult, Counter>,
    /// Messages that may be opt-outs, recorded for review and never decided on.
    pub possible_opt_outs: Family<ConnectorLabel, Counter>,
    /// Webhooks refused for their signature (`missing`, `invalid`): a wrong app secret
    /// after a rotation, or someone probing the endpoint.
    pub signature_failures: Family<ConnectorReason, Counter>,
    pub outbox_depth: Family<ConnectorLabel, Gauge>,
    pub dead_letters: Family<ConnectorLabel, Gauge>,
    pub unverified: Family<ConnectorLabel, Gauge>,
    /// CRM phone values that could not be read as numbers.
    pub unreadable_numbers: Family<ConnectorLabel, Gauge>,
    pub cursor_lag: Family<ConnectorLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub alarm: Family<ConnectorLabel, Gauge>,
    pub subjects: Family<ScopeDecision, Gauge>,
    /// 1 while the store takes writes, 0 while it is failing (an alarm).
    pub store_healthy: Gauge,
    /// Seconds from the customer's act (event time) to the push that carries it being
    /// done in a target system.
    pub propagation: Family<ConnectorLabel, Histogram>,
    /// Seconds from a push being done to the read-back that confirms it.
    pub verification: Family<ConnectorLabel, Histogram>,
    /// Templates whose category, as the send gate judges it, changed (`utility` →
    /// `marketing`): sends of them are gated differently from then on.
    pub template_recategorisations: Family<FromTo, Counter>,
    /// The mass re-opt-in guard's holds.
    pub guard: GuardMetrics,
    /// 1 while this instance leads (runs the poll and push workers), 0 while it follows.
    pub leader: Family<InstanceLabel, Gauge>,
    /// Serialises scrapes (gauges are refreshed then encoded).
    scrape: Mutex<()>,
}

const POSSIBLE_OPT_OUTS_HELP: &str =
    "Messages that may be opt-outs (recorded for review, never applied), by connector";

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const RECAT: &str = "Message templates whose gated category changed, by old and new category";

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("optout");
        let buckets = || Histogram::new(exponential_buckets(0.005, 2.0, 20));
        Metrics {
            observations: registered(&mut r, "observations", help::OBSERVATIONS),
            decisions: registered(&mut r, "decisions", help::DECISIONS),
            pushes: registered(&mut r, "pushes", help::PUSHES),
            poll_errors: registered(&mut r, "poll_errors", help::POLL_ERRORS),
            webhooks: registered(&mut r, "webhooks", help::WEBHOOKS),
            possible_opt_outs: registered(&mut r, "possible_optouts", POSSIBLE_OPT_OUTS_HELP),
            signature_failures: registered(
                &mut r,
                "webhook_signature_failures",
                help::WEBHOOK_SIGNATURE_FAILURES,
            ),
            outbox_depth: registered(&mut r, "outbox_depth", help::OUTBOX_DEPTH),
            dead_letters: registered(&mut r, "dead_letters", help::DEAD_LETTERS),
            unverified: registered(&mut r, "unverified_pushes", help::UNVERIFIED_PUSHES),
            unreadable_numbers: registered(&mut r, "unreadable_numbers", help::UNREADABLE_NUMBERS),
            cursor_lag: registered(&mut r, "cursor_lag_seconds", help::CURSOR_LAG_SECONDS),
            alarm: registered(&mut r, "connector_alarm", help::CONNECTOR_ALARM),
            subjects: registered(&mut r, "subjects", help::SUBJECTS),
            store_healthy: registered(&mut r, "store_healthy", help::STORE_HEALTHY),
            propagation: registered_as(
                &mut r,
                "propagation_seconds",
                "From the customer's act to the push being done, by target",
                Family::new_with_constructor(buckets),
            ),
            verification: registered_as(
                &mut r,
                "verification_seconds",
                "From a push to the read-back that confirms it",
                Family::new_with_constructor(buckets),
            ),
            template_recategorisations: registered(&mut r, "template_recategorisations", RECAT),
            guard: GuardMetrics::register(&mut r),
            leader: registered(&mut r, "leader", help::LEADER),
            // Last: the fields above register into it first.
            registry: r,
            scrape: Mutex::new(()),
        }
    }

    pub fn source(s: &str) -> SourceLabel {
        SourceLabel {
            source: s.to_string(),
        }
    }

    pub fn connector(c: &str) -> ConnectorLabel {
        ConnectorLabel {
            connector: c.to_string(),
        }
    }

    /// The signature-failure counter of one connector and reason (`missing`, `invalid`).
    pub fn signature_failure(&self, connector: &str, reason: &str) -> Counter {
        self.signature_failures
            .get_or_create(&ConnectorReason {
                connector: connector.to_string(),
                reason: reason.to_string(),
            })
            .clone()
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

/// A new metric registered under `name`; see [`registered_as`].
fn registered<M: Metric + Clone + Default>(registry: &mut Registry, name: &str, help: &str) -> M {
    registered_as(registry, name, help, M::default())
}

/// Registers `metric` under `name` and returns it: the registry keeps one handle for
/// encoding, the caller the other for updating (handles share their values).
fn registered_as<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Help texts, one per family, kept apart so the registration reads as a list.
mod help {
    pub const LEADER: &str =
        "1 while this instance leads (runs the poll and push workers), 0 while it follows";
    pub const OBSERVATIONS: &str = "Observations read, by source and result";
    pub const DECISIONS: &str = "Decision changes, by scope and new decision";
    pub const PUSHES: &str = "Push items, by connector and outcome (done, retry, rejected)";
    pub const POLL_ERRORS: &str = "Failed polls and pushes, by connector and error kind";
    pub const WEBHOOK_SIGNATURE_FAILURES: &str =
        "Webhooks refused for a missing or invalid signature, by connector and reason";
    pub const DEAD_LETTERS: &str = "Pushes rejected for good, by connector";
    pub const UNVERIFIED_PUSHES: &str = "Pushes not read back within unverified_after (an alarm)";
    pub const UNREADABLE_NUMBERS: &str =
        "Phone values of CRM records that are not numbers, by connector";
    pub const CURSOR_LAG_SECONDS: &str = "Seconds since the connector last completed a poll";
    pub const CONNECTOR_ALARM: &str =
        "1 when a connector needs an operator (credentials, quota, configuration)";
    pub const STORE_HEALTHY: &str =
        "1 while the store takes writes; 0 while it fails (webhooks get 503, not ready)";
    pub const WEBHOOKS: &str = "Webhook deliveries, by result";
    pub const OUTBOX_DEPTH: &str = "Pushes waiting, by connector";
    pub const SUBJECTS: &str = "People by scope and decision";
}
