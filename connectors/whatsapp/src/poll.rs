//! The read side: drains the webhook inbox one page at a time.
//!
//! The cursor is the last inbox sequence number read, as a decimal string (`None` = from
//! the start), or `<seq>:<n>` inside a large body: entries before `seq` are read, and the
//! first `n` parts of entry `seq` ([`parse::parts`]). A page holds at most
//! [`MAX_PAGE_PARTS`] events and unreadable parts, however many a body carries, so one
//! 9,000-message envelope is applied in bounded transactions rather than one huge one.
//!
//! The daemon saves the cursor together with the page's effects and may then delete inbox
//! entries up to it (only whole ones: a `<seq>:<n>` cursor trims nothing); a crash re-reads
//! at most one page, and the core's dedup on `message_id` makes the re-read harmless.
//!
//! Unreadable parts of a body go to the quarantine (one record per body and page, holding
//! their bytes), and the rest of the body is applied. Quarantine reasons and log lines name
//! positions and kinds of damage only, never what a message says or who sent it.

use std::collections::HashSet;

use bytes::{Bytes, BytesMut};
use optout_core::{ConnectorError, Cursor, Inbox, InboxEntry, Observation, Page};

use crate::detect::Detector;
use crate::parse::{self, Part};

use crate::parse::MAX_PAGE_PARTS;

/// Where the poll stands in the inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Position {
    /// Every entry up to this sequence number is read.
    After(u64),
    /// Entries before `seq` are read, and the first `parts` parts of entry `seq`.
    Within { seq: u64, parts: usize },
}

impl Position {
    fn parse(cursor: Option<&Cursor>) -> Result<Position, ConnectorError> {
        let Some(c) = cursor else {
            return Ok(Position::After(0));
        };
        let bad = || {
            ConnectorError::Rejected(format!(
                "whatsapp cursor {:?} is not an inbox position",
                c.0
            ))
        };
        let text = c.0.trim();
        match text.split_once(':') {
            None => text.parse().map(Position::After).map_err(|_| bad()),
            Some((seq, parts)) => Ok(Position::Within {
                seq: seq.parse().ok().filter(|&s| s > 0).ok_or_else(bad)?,
                parts: parts.parse().map_err(|_| bad())?,
            }),
        }
    }

    fn cursor(self) -> Cursor {
        match self {
            Position::After(seq) => Cursor(seq.to_string()),
            Position::Within { seq, parts } => Cursor(format!("{seq}:{parts}")),
        }
    }
}

/// The page being gathered.
struct Gather<'a, I: Inbox + ?Sized> {
    name: &'a str,
    inbox: &'a I,
    /// Meta redelivers a body it thinks we missed; the same message then sits in the inbox
    /// twice. One observation per message id per page; the core dedupes across pages.
    seen: HashSet<String>,
    observations: Vec<Observation>,
    /// Events and unreadable parts so far, against [`MAX_PAGE_PARTS`].
    used: usize,
}

pub(crate) async fn poll<I: Inbox + ?Sized>(
    name: &str,
    inbox: &I,
    detector: &Detector,
    cursor: Option<&Cursor>,
    page_size: usize,
) -> Result<Page, ConnectorError> {
    let start = Position::parse(cursor)?;
    let after = match start {
        Position::After(seq) => seq,
        Position::Within { seq, .. } => seq - 1,
    };
    let entries = inbox
        .read_after(after, page_size)
        .await
        .map_err(|e| ConnectorError::Transient(e.to_string()))?;
    let mut more = entries.len() >= page_size;
    let mut at = Position::After(after);
    let mut page = Gather {
        name,
        inbox,
        seen: HashSet::new(),
        observations: Vec::new(),
        used: 0,
    };
    for entry in &entries {
        if page.used >= MAX_PAGE_PARTS {
            more = true;
            break;
        }
        let skip = match start {
            Position::Within { seq, parts } if seq == entry.seq => parts,
            _ => 0,
        };
        at = page.entry(entry, detector, skip).await?;
        if matches!(at, Position::Within { .. }) {
            more = true;
            break;
        }
    }
    Ok(Page {
        observations: page.observations,
        cursor: at.cursor(),
        more,
        progress: None,
    })
}

impl<I: Inbox + ?Sized> Gather<'_, I> {
    /// Takes the parts of one entry after the first `skip`, as many as the page has room
    /// for; returns where the page then stands.
    async fn entry(
        &mut self,
        entry: &InboxEntry,
        detector: &Detector,
        skip: usize,
    ) -> Result<Position, ConnectorError> {
        let parts = match parse::parts(&entry.body, entry.received_at, detector) {
            Ok(parts) => parts,
            // The intake's check is lighter than the reader: a body whose envelope still
            // cannot be read goes to the quarantine whole, where the operator sees it.
            Err(e) => {
                self.used += 1;
                let reason = format!("unreadable at poll: {e}");
                self.quarantine(entry, entry.body.clone(), reason).await?;
                return Ok(Position::After(entry.seq));
            }
        };
        let total = parts.len();
        let mut unreadable = Vec::new();
        let mut next = skip;
        for part in parts.into_iter().skip(skip) {
            if self.used >= MAX_PAGE_PARTS {
                break;
            }
            next += 1;
            match part {
                Part::Nothing => {}
                Part::Event(ev) => {
                    self.used += 1;
                    let fresh = ev
                        .message_id
                        .as_ref()
                        .is_none_or(|id| self.seen.insert(id.clone()));
                    if fresh {
                        self.observations.push(Observation::Event(ev));
                    }
                }
                Part::Change(change) => {
                    self.used += 1;
                    let fresh = change
                        .message_id
                        .as_ref()
                        .is_none_or(|id| self.seen.insert(id.clone()));
                    if fresh {
                        self.observations.push(Observation::IdentityChange(change));
                    }
                }
                Part::Template(t) => {
                    self.used += 1;
                    self.observations.push(Observation::TemplateCategory(t));
                }
                Part::Unreadable { span, at, why } => {
                    self.used += 1;
                    unreadable.push((span, format!("{at}: {why}")));
                }
            }
        }
        self.quarantine_parts(entry, &unreadable).await?;
        Ok(if next >= total {
            Position::After(entry.seq)
        } else {
            Position::Within {
                seq: entry.seq,
                parts: next,
            }
        })
    }

    /// One quarantine record for the unreadable parts of one body read in this page: their
    /// bytes as a JSON array (as stored, damage included), and where they were.
    async fn quarantine_parts(
        &self,
        entry: &InboxEntry,
        parts: &[(std::ops::Range<usize>, String)],
    ) -> Result<(), ConnectorError> {
        if parts.is_empty() {
            return Ok(());
        }
        let mut bytes = BytesMut::from(&b"["[..]);
        for (i, (span, _)) in parts.iter().enumerate() {
            if i > 0 {
                bytes.extend_from_slice(b",");
            }
            bytes.extend_from_slice(&entry.body[span.clone()]);
        }
        bytes.extend_from_slice(b"]");
        const LISTED: usize = 8;
        let mut reason = format!(
            "{} unreadable part(s) of a webhook body; the rest of it was applied: ",
            parts.len()
        );
        let listed: Vec<&str> = parts.iter().take(LISTED).map(|(_, r)| r.as_str()).collect();
        reason.push_str(&listed.join("; "));
        if parts.len() > LISTED {
            reason.push_str(&format!("; and {} more", parts.len() - LISTED));
        }
        self.quarantine(entry, bytes.freeze(), reason).await
    }

    /// If even the quarantine fails, the page fails and is read again: nothing
    /// acknowledged is dropped.
    async fn quarantine(
        &self,
        entry: &InboxEntry,
        body: Bytes,
        reason: String,
    ) -> Result<(), ConnectorError> {
        tracing::warn!(
            connector = self.name,
            seq = entry.seq,
            bytes = body.len(),
            "unreadable webhook content quarantined"
        );
        self.inbox
            .quarantine(body, entry.received_at, reason)
            .await
            .map_err(|q| {
                ConnectorError::Transient(format!(
                    "cannot quarantine inbox entry {}: {q}",
                    entry.seq
                ))
            })
    }
}
