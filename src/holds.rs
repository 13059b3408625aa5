//! `optout-sync holds`: listing the opt-ins the mass re-opt-in guard held, and releasing
//! or discarding them. The same functions answer through the running daemon's control
//! socket and offline over the store; the answers are JSON values, printed here.

use std::collections::BTreeMap;
use std::io::Write;

use optout_core::Timestamp;
use serde::{Deserialize, Serialize};

use crate::control::Resolve;
use crate::reconcile::{ApplyReport, Engine};
use crate::store::{HoldRecord, StoreError};

/// Which held opt-ins an operator resolves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldSelection {
    /// Only holds from this source.
    #[serde(default)]
    pub source: Option<String>,
    /// These holds (`h12` or `12`); empty = every hold (of `source`).
    #[serde(default)]
    pub ids: Vec<String>,
}

impl HoldSelection {
    pub(crate) fn matches(&self, h: &HoldRecord) -> bool {
        let by_id = self.ids.is_empty()
            || (self.ids.iter()).any(|i| i.trim_start_matches('h').parse() == Ok(h.id));
        by_id && self.source.as_ref().is_none_or(|s| *s == h.fact.source)
    }
}

/// A held opt-in as `optout-sync holds` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldView {
    pub id: String,
    pub source: String,
    pub subject: String,
    pub record: String,
    pub scope: String,
    pub event_at: String,
    pub held_at: String,
    pub evidence: String,
}

impl From<&HoldRecord> for HoldView {
    fn from(h: &HoldRecord) -> Self {
        HoldView {
            id: format!("h{}", h.id),
            source: h.fact.source.clone(),
            subject: crate::reconcile::subject_name(h.subject),
            record: h.fact.record.clone(),
            scope: h.fact.scope.as_str().to_string(),
            event_at: h.fact.at.to_rfc3339(),
            held_at: h.held_at.to_rfc3339(),
            evidence: format!("{}: {}", h.fact.signal.as_str(), h.fact.evidence),
        }
    }
}

/// The answer to `holds` (a listing) or `holds release|discard`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HoldsReply {
    /// Held opt-ins matching the selection (after a release or discard: those left).
    pub holds: Vec<HoldView>,
    /// Held opt-ins per source, matching or not.
    pub by_source: BTreeMap<String, u64>,
    /// `released` or `discarded`, when something was resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default)]
    pub resolved: usize,
    /// Decisions changed by the release.
    #[serde(default)]
    pub decisions: usize,
}

/// Lists the holds `selection` names, or resolves them first. `progress` hears how many
/// were resolved after each transaction. The report is what applying released ones did,
/// for the daemon's bookkeeping (metrics, waking push workers).
pub fn holds(
    engine: &Engine,
    selection: &HoldSelection,
    resolve: Option<Resolve>,
    mut progress: impl FnMut(usize),
) -> Result<(HoldsReply, ApplyReport), StoreError> {
    let mut reply = HoldsReply::default();
    let mut report = ApplyReport::default();
    if let Some(r) = resolve {
        let release = r == Resolve::Release;
        let (n, applied) =
            engine.resolve_holds(selection, release, Timestamp::now(), &mut progress)?;
        reply.action = Some(if release { "released" } else { "discarded" }.into());
        reply.resolved = n;
        reply.decisions = applied.decisions.len();
        report = applied;
        if release || n > 0 {
            tracing::info!(
                resolved = n,
                action = reply.action.as_deref().unwrap_or_default(),
                "held opt-ins resolved by an operator"
            );
        }
    }
    reply.holds = (engine.holds(selection)?.iter())
        .map(HoldView::from)
        .collect();
    for (source, w) in engine.store().guard_windows()? {
        if w.held > 0 {
            reply.by_source.insert(source, w.held);
        }
    }
    Ok((reply, report))
}

/// Prints a [`HoldsReply`] for people.
pub fn print(o: &mut impl Write, r: &HoldsReply) -> std::io::Result<()> {
    if let Some(action) = &r.action {
        writeln!(
            o,
            "{action} {} held opt-in(s); {} decision(s) changed",
            r.resolved, r.decisions
        )?;
    }
    if r.by_source.is_empty() {
        return writeln!(o, "no opt-ins are held");
    }
    for (source, n) in &r.by_source {
        writeln!(o, "{source}: {n} opt-in(s) held")?;
    }
    if r.action.is_some() {
        return Ok(());
    }
    writeln!(o)?;
    writeln!(
        o,
        "ID\tSOURCE\tPERSON\tRECORD\tSCOPE\tEVENT TIME\tHELD AT\tEVIDENCE"
    )?;
    for h in &r.holds {
        writeln!(
            o,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            h.id,
            h.source,
            h.subject,
            h.record,
            h.scope,
            h.event_at,
            h.held_at,
            crate::lookup::shorten(&h.evidence, 80)
        )?;
    }
    writeln!(
        o,
        "\nrelease (apply as of their event times) or discard: optout-sync holds release|discard [--source NAME] [--all|ID…]"
    )
}
