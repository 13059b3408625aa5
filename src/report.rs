//! What the daemon answers, as types: the `status` report, a connector's part of it, the
//! end of a resync, and the send gate's answer. The daemon serialises them; the
//! command line, the demo and the tests deserialise them rather than index JSON.

use std::collections::BTreeMap;

use optout_core::Health;
use serde::{Deserialize, Serialize};

/// `optout-sync status` (`{"command":"status"}` on the control socket).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub ready: bool,
    /// RFC 3339.
    pub started: String,
    /// People known.
    pub subjects_total: i64,
    /// People by `scope:decision` (`all:opted_out`).
    pub subjects: BTreeMap<String, i64>,
    pub webhook_inbox: usize,
    pub quarantined_webhooks: usize,
    /// Messages that may be opt-outs (a revocation word in a sentence that is not clearly
    /// one), recorded for review and never decided on; `lookup` and the audit log show each.
    #[serde(default)]
    pub possible_opt_outs: i64,
    /// Message templates whose category the send gate knows (`?template=`).
    #[serde(default)]
    pub templates_known: usize,
    /// Set while the store fails (a full disk, an I/O error): webhooks get 503 and nothing
    /// is applied until it works again.
    #[serde(default)]
    pub store_alarm: Option<String>,
    pub connectors: Vec<ConnectorReport>,
    /// Opt-ins held by the mass re-opt-in guard, per source (an alarm while any is held:
    /// `optout-sync holds` lists them).
    #[serde(default)]
    pub held_opt_ins: BTreeMap<String, u64>,
    /// This instance's name (`store.instance`; the host's name on sled).
    #[serde(default)]
    pub instance: String,
    /// Whether this instance leads, running the poll and push workers (always on sled).
    #[serde(default)]
    pub leader: bool,
    /// Every instance sharing the PostgreSQL store, and the leader's lease; `None` on
    /// sled (one process).
    #[serde(default)]
    pub cluster: Option<crate::store::lease::RollCall>,
}

impl StatusReport {
    /// People with `decision` in `scope` (`"all"`, `"opted_out"`).
    pub fn people(&self, scope: &str, decision: &str) -> i64 {
        let key = format!("{scope}:{decision}");
        self.subjects.get(&key).copied().unwrap_or(0)
    }

    /// Whether the store or any connector needs an operator (exit code 1 of `status`).
    pub fn needs_attention(&self) -> bool {
        self.store_alarm.is_some()
            || self.connectors.iter().any(ConnectorReport::needs_attention)
            || self.held_opt_ins.values().any(|n| *n > 0)
    }

    pub fn connector(&self, name: &str) -> Option<&ConnectorReport> {
        self.connectors.iter().find(|c| c.name == name)
    }
}

/// One connector instance in [`StatusReport`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectorReport {
    pub name: String,
    pub kind: String,
    /// No alarm, no failing step, and its own health check passes.
    pub healthy: bool,
    /// Set when the connector needs an operator (credentials, quota, configuration).
    pub alarm: Option<String>,
    /// RFC 3339: the last poll that read to the end.
    pub last_poll_ok: Option<String>,
    pub poll_lag_seconds: Option<u64>,
    pub last_push_ok: Option<String>,
    pub cursor: Option<String>,
    pub poll_errors: u64,
    pub push_errors: u64,
    pub last_error: Option<String>,
    /// Progress of a running full resync.
    pub resync: Option<String>,
    pub health: Option<Health>,
    pub outbox_depth: i64,
    pub dead_letters: i64,
    /// Pushes not read back within `unverified_after`.
    pub unverified_pushes: i64,
    /// Phone values of this connector's records that are not numbers: those records are
    /// matched by no one until fixed (`optout-sync numbers --unreadable` lists them).
    #[serde(default)]
    pub unreadable_numbers: i64,
}

impl ConnectorReport {
    pub fn needs_attention(&self) -> bool {
        self.alarm.is_some() || self.unverified_pushes > 0 || self.dead_letters > 0
    }
}

/// The final answer to a resync request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResyncReport {
    /// The last line of each connector resynced.
    pub resynced: Vec<String>,
    pub full: bool,
}

/// `resync --full --dry-run`: what a full resync would change, per connector read.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DryRunReport {
    pub connectors: Vec<DryRunConnector>,
}

/// One connector's part of a [`DryRunReport`]. The counts are of its own records;
/// `changes` also lists pushes its records would cause to other systems' records.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DryRunConnector {
    pub name: String,
    /// Records (observations) read.
    pub records: u64,
    pub suppressed: u64,
    pub re_enabled: u64,
    pub left_alone: u64,
    /// Opt-ins the mass re-opt-in guard would hold.
    pub held: u64,
    pub changes: Vec<DryRunChange>,
}

/// One record a full resync would write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRunChange {
    pub connector: String,
    pub record: String,
    /// The person (`s12`; `s12,s40` for a record holding two people's numbers).
    pub subject: String,
    /// The value last read from the record (`None`: empty or never read).
    pub from: Option<String>,
    pub to: String,
    /// The fact that decides it: `source:signal evidence`.
    pub evidence: String,
    /// RFC 3339: when the deciding act happened.
    pub event_at: String,
}

/// The send gate's answer for one identifier (`GET /v1/consent/{id}` and each item of the
/// batch form). Fields absent from the JSON are `None`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GateReply {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// The template asked about (`?template=`); `category` is its current category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Absent only when the identifier could not be read (`error` says why); `false` on a
    /// store error: the gate fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The scope whose opt-out blocks (`all`, `marketing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
    /// The decision per scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decisions: Option<BTreeMap<String, String>>,
    /// The fact behind the answer (the opt-out that blocks, or the opt-in that restored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/consent/batch`: one reply per id, in order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GateBatchReply {
    pub results: Vec<GateReply>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_reply_omits_what_does_not_apply() {
        let unknown = GateReply {
            id: "+1".into(),
            category: Some("marketing".into()),
            allowed: Some(true),
            known: Some(false),
            ..GateReply::default()
        };
        let v = serde_json::to_value(&unknown).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "+1", "category": "marketing", "allowed": true, "known": false})
        );
    }
}
