//! The audit log's entry type and its export formats.
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
                let row = [
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
                ];
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
