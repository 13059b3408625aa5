//! The audit log's entry type, its export formats and the export's filter.
//!
//! Every observation (accepted, echo, ignored and why), every decision change and every
//! push outcome becomes one entry, appended and never rewritten, except to remove personal
//! data: an erasure removes a person's evidence text and record ids, and `audit.retention`
//! removes evidence text past its age; both are audited as entries of their own. The store assigns the
//! sequence number and persists entries; this module only describes and formats them.

use std::io::Write;

use optout_core::{Scope, Status, Timestamp};
use serde::{Deserialize, Serialize};

/// What an entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// An observation that entered the consent registers.
    Accepted,
    /// An observation that did not (an opt-in from a source whose opt-ins are not
    /// accepted, a first-sight opt-in, a duplicate delivery); `reason` says why.
    Ignored,
    /// A read-back of what the daemon wrote: the push is verified.
    Echo,
    /// A subject's decision for a scope changed.
    Decision,
    /// A push reached its target.
    PushDone,
    /// A target refused a push for good (dead letter).
    PushRejected,
    /// A push was abandoned without a known outcome (a confirmation reply interrupted by
    /// a crash is never re-sent: at most one reply per message).
    PushAbandoned,
    /// An identity could not be understood (an unparseable phone number).
    IdentityRejected,
    /// Two subjects turned out to be one person (a payload showed both identities).
    Merged,
    /// An operator's action (import, dead-letter retry).
    Operator,
    /// A message that may be an opt-out but is not clearly one ("stop sending me the
    /// catalogue, I only want my orders"): kept for an operator's review, never decided on.
    PossibleOptOut,
    /// A message template's category, as the send gate will judge it, was set or changed.
    Template,
    /// An opt-in held by the mass re-opt-in guard: not applied until an operator decides.
    Held,
    /// A held opt-in an operator released: applied as of its original event time.
    HoldReleased,
    /// A held opt-in an operator discarded: never applied.
    HoldDiscarded,
    /// A person's personal data was erased; the entry names only the subject id and the
    /// tombstones that keep their suppression.
    Erased,
    /// Evidence text past `audit.retention` was dropped from older entries.
    Retention,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Accepted => "accepted",
            AuditKind::Ignored => "ignored",
            AuditKind::Echo => "echo",
            AuditKind::Decision => "decision",
            AuditKind::PushDone => "push_done",
            AuditKind::PushRejected => "push_rejected",
            AuditKind::PushAbandoned => "push_abandoned",
            AuditKind::IdentityRejected => "identity_rejected",
            AuditKind::Merged => "merged",
            AuditKind::Operator => "operator",
            AuditKind::PossibleOptOut => "possible_opt_out",
            AuditKind::Template => "template",
            AuditKind::Held => "held",
            AuditKind::HoldReleased => "hold_released",
            AuditKind::HoldDiscarded => "hold_discarded",
            AuditKind::Erased => "erased",
            AuditKind::Retention => "retention",
        }
    }
}

/// One audit entry: who, what, when (event, observed, stored), from where, with what
/// evidence, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log; assigned by the store.
    #[serde(default)]
    pub seq: u64,
    pub kind: AuditKind,
    pub subject: Option<String>,
    /// The connector instance (or `import`, `operator`) involved.
    pub source: String,
    pub record: Option<String>,
    pub scope: Option<Scope>,
    pub status: Option<Status>,
    /// When the person acted, by the source's clock.
    pub event_at: Option<Timestamp>,
    /// When the daemon read it.
    pub observed_at: Timestamp,
    /// When the entry was written.
    pub stored_at: Timestamp,
    pub evidence: Option<String>,
    pub reason: Option<String>,
}

impl AuditEntry {
    pub fn new(kind: AuditKind, source: &str, now: Timestamp) -> Self {
        AuditEntry {
            seq: 0,
            kind,
            subject: None,
            source: source.to_string(),
            record: None,
            scope: None,
            status: None,
            event_at: None,
            observed_at: now,
            stored_at: now,
            evidence: None,
            reason: None,
        }
    }
}

/// Export formats of `optout-sync audit export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Jsonl,
}

/// Writes entries one by one (constant memory: the caller streams from the store).
pub struct Exporter<W: Write> {
    format: Format,
    csv: Option<csv::Writer<W>>,
    raw: Option<W>,
}

const CSV_HEADER: [&str; 13] = [
    "seq",
    "kind",
    "subject",
    "source",
    "record",
    "scope",
    "status",
    "event_at",
    "observed_at",
    "stored_at",
    "evidence",
    "reason",
    "",
];

impl<W: Write> Exporter<W> {
    pub fn new(format: Format, out: W) -> std::io::Result<Self> {
        match format {
            Format::Csv => {
                let mut w = csv::Writer::from_writer(out);
                w.write_record(&CSV_HEADER[..12])
                    .map_err(std::io::Error::other)?;
                Ok(Exporter {
                    format,
                    csv: Some(w),
                    raw: None,
                })
            }
            Format::Jsonl => Ok(Exporter {
                format,
                csv: None,
                raw: Some(out),
            }),
        }
    }

    pub fn write(&mut self, e: &AuditEntry) -> std::io::Result<()> {
        match self.format {
            Format::Jsonl => {
                let out = self.raw.as_mut().expect("jsonl writer");
                serde_json::to_writer(&mut *out, e)?;
                out.write_all(b"\n")
            }
            Format::Csv => {
                let opt = |t: Option<Timestamp>| t.map(|t| t.to_rfc3339()).unwrap_or_default();
                let row: [String; 12] = [
                    e.seq.to_string(),
                    e.kind.as_str().to_string(),
                    e.subject.clone().unwrap_or_default(),
                    e.source.clone(),
                    e.record.clone().unwrap_or_default(),
                    e.scope.map(|s| s.as_str().to_string()).unwrap_or_default(),
                    e.status.map(|s| s.as_str().to_string()).unwrap_or_default(),
                    opt(e.event_at),
                    e.observed_at.to_rfc3339(),
                    e.stored_at.to_rfc3339(),
                    e.evidence.clone().unwrap_or_default(),
                    e.reason.clone().unwrap_or_default(),
                ]
                .map(spreadsheet_safe);
                self.csv
                    .as_mut()
                    .expect("csv writer")
                    .write_record(&row)
                    .map_err(std::io::Error::other)
            }
        }
    }

    pub fn finish(self) -> std::io::Result<()> {
        if let Some(mut w) = self.csv {
            w.flush()?;
        }
        if let Some(mut w) = self.raw {
            w.flush()?;
        }
        Ok(())
    }
}

/// A cell a spreadsheet would read as a formula (`=`, `+`, `-`, `@`, or a tab or carriage
/// return first) gets a leading `'`, which makes it text: evidence and record ids come
/// from customers and CRMs, and a cell like `=HYPERLINK(…)` must not run when an operator
/// opens the export (OWASP's "CSV injection").
pub fn spreadsheet_safe(cell: String) -> String {
    match cell.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{cell}"),
        _ => cell,
    }
}

/// Which entries `audit export` writes: stored at or after `since`, before `until`, and
/// (with `subject`) only those of one person.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
    /// A subject (`s42`), a phone number, `wa:<digits>` or a business-scoped id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

impl Filter {
    fn admits(&self, e: &AuditEntry) -> bool {
        self.since.is_none_or(|t| e.stored_at >= t) && self.until.is_none_or(|t| e.stored_at < t)
    }
}

type Entries<'a> = Box<dyn Iterator<Item = Result<AuditEntry, crate::store::StoreError>> + 'a>;

/// The entries `filter` selects, oldest first, streamed from the store (one person's
/// history is read as a whole: it is small). An unknown person is an error, so that a
/// typo is not mistaken for an empty history.
pub fn select<'a>(
    engine: &'a crate::reconcile::Engine,
    filter: &Filter,
) -> Result<Entries<'a>, String> {
    let f = filter.clone();
    let Some(who) = &filter.subject else {
        let all = engine.store().audit_from(0);
        return Ok(Box::new(
            all.filter(move |e| e.as_ref().map_or(true, |e| f.admits(e))),
        ));
    };
    let subject = find_subject(engine, who)?;
    let history = engine
        .store()
        .subject_audit(&subject)
        .map_err(|e| e.to_string())?;
    Ok(Box::new(
        history.into_iter().filter(move |e| f.admits(e)).map(Ok),
    ))
}

/// The subject `who` names: `s<number>` as the audit log writes it, or an identity.
fn find_subject(
    engine: &crate::reconcile::Engine,
    who: &str,
) -> Result<crate::store::SubjectRecord, String> {
    let store = engine.store();
    let by_name = (who.strip_prefix('s').and_then(|n| n.parse::<u64>().ok()))
        .map(|id| store.subject(id))
        .transpose()
        .map_err(|e| e.to_string())?
        .flatten();
    if let Some(s) = by_name {
        return Ok(s);
    }
    let aliases = engine.normalizer().parse_query(who)?;
    for a in &aliases {
        if let Some(s) = store
            .subject_by_alias(a.as_str())
            .map_err(|e| e.to_string())?
        {
            return Ok(s);
        }
    }
    Err("no one is known by that identifier (use a subject such as s42, a phone number, wa:<digits> or a business-scoped id)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_a_spreadsheet_would_run_are_made_text() {
        for bad in ["=1+1", "+15551234567", "-2", "@SUM(A1)", "\tx", "\rx"] {
            assert_eq!(spreadsheet_safe(bad.into()), format!("'{bad}"));
        }
        for good in ["opted_out", "s42", "", "2024-05-01T10:00:00.000Z"] {
            assert_eq!(spreadsheet_safe(good.into()), good);
        }
    }

    #[test]
    fn csv_export_neutralises_formulas() {
        let mut e = AuditEntry::new(AuditKind::Accepted, "api", Timestamp(0));
        e.evidence = Some("=HYPERLINK(\"http://x\")".into());
        e.record = Some("+14155552671".into());
        let mut out = Vec::new();
        let mut x = Exporter::new(Format::Csv, &mut out).unwrap();
        x.write(&e).unwrap();
        x.finish().unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("'+14155552671"), "{text}");
        assert!(text.contains("\"'=HYPERLINK"), "{text}");
    }
}
