//! Writing desired values through sObject Collections (`PATCH /composite/sobjects`,
//! `allOrNone: false`), up to `batch_size` records per request, with one outcome per item.
//!
//! Items naming the same record are written once: an item of scope `all` sets the consent
//! field (with its change time and source), one of scope `marketing` the object's
//! `marketing_field`, both in the same record entry. Within one field, equal values share
//! the outcome; when they disagree the opt-out is written (the product leans to opt-out)
//! and the other item is rejected with the reason. A marketing item for an object without a
//! marketing field (another object of the same connector, or `MessagingEndUser`) has
//! nothing to write and is done at once. Records are grouped by type inside a request because Salesforce
//! processes a mixed request in chunks of consecutive same-type records and allows only ten.
//!
//! A request Salesforce refuses as a whole because a record names a field its object lacks
//! (a request-level 400 `INVALID_FIELD`, which names the object) is a configuration
//! problem of that object, not of the records: that object's records wait
//! ([`CONFIG_RETRY`]) and the request is sent again without them, so the other objects are
//! still written. The refusal stays a configuration alarm (`config_alarm`) naming the
//! object and the field until a write of that object goes through.

use std::collections::HashMap;
use std::time::Duration;

use optout_core::{ConnectorError, PushItem, PushOutcome, Scope, Status};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::SalesforceConnector;
use crate::client::CallError;
use crate::records::{Source, is_record_id};

/// How long the records of an object Salesforce refused for its configuration wait before
/// they are tried again (the alarm asks an operator to fix the field meanwhile).
pub const CONFIG_RETRY: Duration = Duration::from_secs(300);

/// Request-level codes that mean a configured object or field is wrong.
const CONFIG_CODES: &[&str] = &[
    "INVALID_FIELD",
    "INVALID_FIELD_FOR_INSERT_UPDATE",
    "INVALID_TYPE",
];

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
pub(crate) struct Write<'a> {
    pub(crate) source: &'a Source,
    id: &'a str,
    /// Per field (the consent field, the marketing field): the item written and the items
    /// its outcome answers.
    fields: [Option<(&'a PushItem, Vec<usize>)>; 2],
}

impl<'a> Write<'a> {
    fn new(source: &'a Source, id: &'a str) -> Self {
        Write {
            source,
            id,
            fields: [None, None],
        }
    }

    /// The item written to the field of `scope`, if any.
    fn item(&self, scope: Scope) -> Option<&'a PushItem> {
        self.fields[slot(scope)].as_ref().map(|(item, _)| *item)
    }

    /// The record, for logs.
    fn record(&self) -> &str {
        (self.fields.iter().flatten())
            .map(|(item, _)| item.record.as_str())
            .next()
            .unwrap_or(self.id)
    }

    /// Every item the write answers.
    fn items(&self) -> impl Iterator<Item = usize> + '_ {
        (self.fields.iter().flatten()).flat_map(|(_, items)| items.iter().copied())
    }

    /// Adds item `i`, which names the same record. Within its field, equal values share
    /// the write (the later change is written); when they disagree the opt-out is written.
    /// Returns the value written and the items that lost, if any.
    fn absorb(&mut self, i: usize, item: &'a PushItem) -> Option<(Status, Vec<usize>)> {
        let Some((held, items)) = &mut self.fields[slot(item.scope)] else {
            self.fields[slot(item.scope)] = Some((item, vec![i]));
            return None;
        };
        if held.status == item.status {
            if item.changed_at > held.changed_at {
                *held = item;
            }
            items.push(i);
            return None;
        }
        if item.status == Status::OptedOut {
            let old = std::mem::replace(items, vec![i]);
            *held = item;
            Some((item.status, old))
        } else {
            Some((held.status, vec![i]))
        }
    }
}

/// The index of a scope's field in [`Write::fields`].
fn slot(scope: Scope) -> usize {
    match scope {
        Scope::All => 0,
        Scope::Marketing => 1,
    }
}

/// A batch sorted out before any request: the records to write, and the items answered
/// without one (malformed records, and the losers of a disagreement).
struct Plan<'a> {
    writes: Vec<Write<'a>>,
    outcomes: Vec<Option<PushOutcome>>,
}

impl SalesforceConnector {
    pub(crate) async fn push_batch(
        &self,
        batch: &[PushItem],
    ) -> Result<Vec<PushOutcome>, ConnectorError> {
        let Plan {
            mut writes,
            mut outcomes,
        } = self.plan(batch);
        // Same-type records together (stable, so order within a type is kept).
        writes.sort_by(|a, b| a.source.name().cmp(b.source.name()));
        for chunk in writes.chunks(self.config.batch_size) {
            for (w, outcome) in self.write_chunk(chunk).await? {
                if !matches!(outcome, PushOutcome::Done) {
                    tracing::info!(connector = %self.name, record = %w.record(), ?outcome, "record not written");
                }
                for i in w.items() {
                    outcomes[i] = Some(outcome.clone());
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every item is answered"))
            .collect())
    }

    /// One write per record the batch names; see the module doc for how items naming the
    /// same record are merged.
    fn plan<'a>(&'a self, batch: &'a [PushItem]) -> Plan<'a> {
        let mut plan = Plan {
            writes: Vec::new(),
            outcomes: vec![None; batch.len()],
        };
        let mut by_record: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, item) in batch.iter().enumerate() {
            let (source, id) = match self.target(item) {
                Ok(target) => target,
                Err(reason) => {
                    plan.outcomes[i] = Some(PushOutcome::Rejected { reason });
                    continue;
                }
            };
            if item.scope == Scope::Marketing && !source.has_marketing() {
                plan.outcomes[i] = Some(PushOutcome::Done);
                continue;
            }
            let w = *by_record.entry((source.name(), id)).or_insert_with(|| {
                plan.writes.push(Write::new(source, id));
                plan.writes.len() - 1
            });
            // Opt-out wins; the loser is answered now.
            if let Some((winner, losers)) = plan.writes[w].absorb(i, item) {
                for l in losers {
                    plan.outcomes[l] = Some(PushOutcome::Rejected {
                        reason: format!(
                            "another item in the same batch sets {} on {}; opt-out wins",
                            winner, batch[l].record
                        ),
                    });
                }
            }
        }
        plan
    }

    /// The configured object and the record id an item's `Object/Id` names, or why not.
    fn target<'a>(&'a self, item: &'a PushItem) -> Result<(&'a Source, &'a str), String> {
        let target = item.record.split_once('/').and_then(|(ty, id)| {
            let source = self
                .sources
                .iter()
                .find(|s| s.name().eq_ignore_ascii_case(ty))?;
            Some((source, id))
        });
        let Some((source, id)) = target else {
            return Err(format!(
                "{:?} names no configured Salesforce object (expected Object/Id)",
                item.record
            ));
        };
        if !is_record_id(id) {
            return Err(format!("MALFORMED_ID: {id:?} is not a Salesforce id"));
        }
        Ok((source, id))
    }

    /// Writes one request's worth of records, sending it again without an object that
    /// Salesforce refuses the whole request for (see the module doc).
    async fn write_chunk<'w, 'a>(
        &self,
        chunk: &'w [Write<'a>],
    ) -> Result<Vec<(&'w Write<'a>, PushOutcome)>, ConnectorError> {
        let mut part: Vec<&Write> = chunk.iter().collect();
        let mut done = Vec::new();
        while !part.is_empty() {
            let error = match self.write(&part).await {
                Ok(written) => {
                    self.config_cleared(&part);
                    done.extend(part.into_iter().zip(written));
                    break;
                }
                Err(CallError {
                    code: Some(code),
                    error,
                }) if CONFIG_CODES.contains(&code.as_str()) => (code, error),
                Err(e) => return Err(e.error),
            };
            let object = refused_object(&error.1.to_string(), &part);
            let reason = format!(
                "Salesforce refused every write to {object} ({}): {}; fix: create the field on {object} (Setup → Object Manager → {object} → Fields & Relationships), give the integration user Edit access to it, or correct the object's fields in the configuration",
                error.0, error.1
            );
            tracing::error!(connector = %self.name, object = %object, "{reason}");
            self.config_refused(&object, &reason);
            let (refused, rest): (Vec<&Write>, Vec<&Write>) = part
                .into_iter()
                .partition(|w| w.source.name().eq_ignore_ascii_case(&object));
            let outcome = PushOutcome::RetryLater {
                after: Some(CONFIG_RETRY),
                reason: reason.clone(),
            };
            done.extend(refused.into_iter().map(|w| (w, outcome.clone())));
            part = rest;
        }
        Ok(done)
    }

    /// Writes one request's worth of records; one outcome per write, in order.
    async fn write(&self, chunk: &[&Write<'_>]) -> Result<Vec<PushOutcome>, CallError> {
        let path = format!(
            "/services/data/{}/composite/sobjects",
            self.config.api_version
        );
        let records: Vec<Value> = (chunk.iter())
            .map(|w| (w.source).write(w.id, w.item(Scope::All), w.item(Scope::Marketing)))
            .collect();
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
            ))
            .into());
        }
        Ok(results.into_iter().map(outcome).collect())
    }
}

/// The object a request-level refusal names (`… on sobject of type Lead`), or else the
/// first object of the request (the whole request is then held back object by object).
fn refused_object(message: &str, part: &[&Write<'_>]) -> String {
    let named = message
        .rsplit_once("of type ")
        .map(|(_, t)| t.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_'))
        .and_then(|t| {
            t.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .next()
        })
        .and_then(|t| {
            part.iter()
                .map(|w| w.source.name())
                .find(|n| n.eq_ignore_ascii_case(t))
        });
    named
        .or_else(|| part.first().map(|w| w.source.name()))
        .unwrap_or_default()
        .to_string()
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
