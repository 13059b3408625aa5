//! Writing desired values through sObject Collections (`PATCH /composite/sobjects`,
//! `allOrNone: false`), up to `batch_size` records per request, with one outcome per item.
//!
//! Items naming the same record are written once: equal values share the outcome; when they
//! disagree the opt-out is written (the product leans to opt-out) and the other item is
//! rejected with the reason. Records are grouped by type inside a request because Salesforce
//! processes a mixed request in chunks of consecutive same-type records and allows only ten.

use std::collections::HashMap;

use optout_core::{ConnectorError, PushItem, PushOutcome, Status};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::SalesforceConnector;
use crate::records::{Source, is_record_id};

/// Per-record codes that say "not now" rather than "never".
const RETRYABLE_CODES: &[&str] = &[
    "UNABLE_TO_LOCK_ROW",
    "ALL_OR_NONE_OPERATION_ROLLED_BACK",
    "REQUEST_RUNNING_TOO_LONG",
    "SERVER_UNAVAILABLE",
    "QUERY_TIMEOUT",
];

#[derive(Deserialize)]
struct SaveResult {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    errors: Vec<SaveError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SaveError {
    #[serde(default)]
    status_code: String,
    #[serde(default)]
    message: String,
}

/// One record to write and the items it answers.
struct Write<'a> {
    source: &'a Source,
    id: &'a str,
    item: &'a PushItem,
    items: Vec<usize>,
}

impl SalesforceConnector {
    pub(crate) async fn push_batch(
        &self,
        batch: &[PushItem],
    ) -> Result<Vec<PushOutcome>, ConnectorError> {
        let mut outcomes: Vec<Option<PushOutcome>> = vec![None; batch.len()];
        let mut writes: Vec<Write<'_>> = Vec::new();
        let mut by_record: HashMap<(&str, &str), usize> = HashMap::new();

        for (i, item) in batch.iter().enumerate() {
            let target = item.record.split_once('/').and_then(|(ty, id)| {
                let source = self
                    .sources
                    .iter()
                    .find(|s| s.name().eq_ignore_ascii_case(ty))?;
                Some((source, id))
            });
            let Some((source, id)) = target else {
                outcomes[i] = Some(PushOutcome::Rejected {
                    reason: format!(
                        "{:?} names no configured Salesforce object (expected Object/Id)",
                        item.record
                    ),
                });
                continue;
            };
            if !is_record_id(id) {
                outcomes[i] = Some(PushOutcome::Rejected {
                    reason: format!("MALFORMED_ID: {id:?} is not a Salesforce id"),
                });
                continue;
            }
            match by_record.get(&(source.name(), id)) {
                None => {
                    by_record.insert((source.name(), id), writes.len());
                    writes.push(Write {
                        source,
                        id,
                        item,
                        items: vec![i],
                    });
                }
                Some(&w) => {
                    let kept = &mut writes[w];
                    if kept.item.status == item.status {
                        if item.changed_at > kept.item.changed_at {
                            kept.item = item;
                        }
                        kept.items.push(i);
                    } else {
                        // Opt-out wins; the loser is answered now.
                        let (winner, loser) = if item.status == Status::OptedOut {
                            let old = std::mem::replace(&mut kept.items, vec![i]);
                            kept.item = item;
                            (item.status, old)
                        } else {
                            (kept.item.status, vec![i])
                        };
                        for l in loser {
                            outcomes[l] = Some(PushOutcome::Rejected {
                                reason: format!(
                                    "another item in the same batch sets {} on {}; opt-out wins",
                                    winner, batch[l].record
                                ),
                            });
                        }
                    }
                }
            }
        }

        // Same-type records together (stable, so order within a type is kept).
        writes.sort_by(|a, b| a.source.name().cmp(b.source.name()));
        let path = format!(
            "/services/data/{}/composite/sobjects",
            self.config.api_version
        );
        for chunk in writes.chunks(self.config.batch_size) {
            let records: Vec<Value> = chunk.iter().map(|w| w.source.write(w.id, w.item)).collect();
            let body = json!({ "allOrNone": false, "records": records });
            let resp = self
                .client
                .call(Method::PATCH, &path, &[], &[], Some(&body))
                .await?;
            let results: Vec<SaveResult> = serde_json::from_value(resp).map_err(|e| {
                ConnectorError::Transient(format!("unexpected collections response shape: {e}"))
            })?;
            if results.len() != chunk.len() {
                return Err(ConnectorError::Transient(format!(
                    "collections answered {} results for {} records",
                    results.len(),
                    chunk.len()
                )));
            }
            for (w, r) in chunk.iter().zip(results) {
                let outcome = outcome(r);
                if !matches!(outcome, PushOutcome::Done) {
                    tracing::info!(connector = %self.name, record = %w.item.record, ?outcome, "record not written");
                }
                for &i in &w.items {
                    outcomes[i] = Some(outcome.clone());
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every item is answered"))
            .collect())
    }
}

fn outcome(r: SaveResult) -> PushOutcome {
    if r.success {
        return PushOutcome::Done;
    }
    let Some(e) = r.errors.into_iter().next() else {
        return PushOutcome::RetryLater {
            after: None,
            reason: "Salesforce reported a failure without an error".into(),
        };
    };
    let reason = format!(
        "{}: {}",
        e.status_code,
        optout_core::http::excerpt(&e.message)
    );
    if RETRYABLE_CODES.contains(&e.status_code.as_str()) {
        PushOutcome::RetryLater {
            after: None,
            reason,
        }
    } else {
        PushOutcome::Rejected { reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(v: Value) -> PushOutcome {
        outcome(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn classifies_record_results() {
        assert_eq!(
            result(json!({"id": "003", "success": true, "errors": []})),
            PushOutcome::Done
        );
        let lock = result(
            json!({"success": false, "errors": [{"statusCode": "UNABLE_TO_LOCK_ROW", "message": "unable to obtain exclusive access to this record", "fields": []}]}),
        );
        assert!(
            matches!(lock, PushOutcome::RetryLater { ref reason, .. } if reason.starts_with("UNABLE_TO_LOCK_ROW: "))
        );
        for code in [
            "ENTITY_IS_DELETED",
            "INVALID_FIELD",
            "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
            "MALFORMED_ID",
            "INVALID_CROSS_REFERENCE_KEY",
            "FIELD_CUSTOM_VALIDATION_EXCEPTION",
        ] {
            let r =
                result(json!({"success": false, "errors": [{"statusCode": code, "message": "m"}]}));
            assert_eq!(
                r,
                PushOutcome::Rejected {
                    reason: format!("{code}: m")
                }
            );
        }
    }
}
