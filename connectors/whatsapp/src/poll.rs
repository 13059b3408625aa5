//! The read side: drains the webhook inbox one page at a time.
//!
//! The cursor is the last inbox sequence number read, as a decimal string (`None` = from
//! the start). The daemon saves it together with the page's effects and may then delete
//! inbox entries up to it; a crash re-reads at most one page, and the core's dedup on
//! `message_id` makes the re-read harmless.

use std::collections::HashSet;

use optout_core::{ConnectorError, Cursor, Observation, Page};

use crate::detect::Detector;
use crate::parse;
use optout_core::Inbox;

pub(crate) async fn poll<I: Inbox + ?Sized>(
    name: &str,
    inbox: &I,
    detector: &Detector,
    cursor: Option<&Cursor>,
    page_size: usize,
) -> Result<Page, ConnectorError> {
    let after = match cursor {
        None => 0,
        Some(c) => c.0.trim().parse::<u64>().map_err(|_| {
            ConnectorError::Rejected(format!(
                "whatsapp cursor {:?} is not an inbox sequence number",
                c.0
            ))
        })?,
    };
    let entries = inbox
        .read_after(after, page_size)
        .await
        .map_err(|e| ConnectorError::Transient(e.to_string()))?;
    let more = entries.len() >= page_size;
    let last = entries.last().map_or(after, |e| e.seq);
    // Meta redelivers a body it thinks we missed; the same message then sits in the inbox
    // twice. One observation per message id per page; the core dedupes across pages.
    let mut seen: HashSet<String> = HashSet::new();
    let mut observations = Vec::new();
    for entry in &entries {
        match parse::parse(&entry.body, entry.received_at, detector) {
            Ok(obs) => observations.extend(obs.into_iter().filter(|o| {
                match o {
                    Observation::Event(e) => e
                        .message_id
                        .as_ref()
                        .is_none_or(|id| seen.insert(id.clone())),
                    Observation::Record(_) => true,
                }
            })),
            // The intake's check is lighter than the full parse (deeply nested bodies pass
            // it): a body that still cannot be read goes to the quarantine, where the
            // operator sees it, rather than vanishing. If even that fails, the page fails
            // and is read again.
            Err(e) => {
                tracing::warn!(connector = name, seq = entry.seq, error = %e, "unreadable inbox entry quarantined");
                inbox
                    .quarantine(
                        entry.body.clone(),
                        entry.received_at,
                        format!("unreadable at poll: {e}"),
                    )
                    .await
                    .map_err(|q| {
                        ConnectorError::Transient(format!(
                            "cannot quarantine inbox entry {}: {q}",
                            entry.seq
                        ))
                    })?;
            }
        }
    }
    Ok(Page {
        observations,
        cursor: Cursor(last.to_string()),
        more,
        progress: None,
    })
}
