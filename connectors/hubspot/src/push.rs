//! Writing consent values through `POST /crm/v3/objects/contacts/batch/update`.
//!
//! Each item becomes one input: an item of scope `all` sets the three consent properties,
//! one of scope `marketing` sets the marketing property (`marketing_property`) alone.
//! HubSpot refuses a batch that names one contact twice, so items for the same contact are
//! merged into one input carrying both fields' properties (within one field an opt-out wins
//! over an opt-in, then the later change), and share its outcome.
//!
//! Answers:
//! - 200: every input is done.
//! - 207: per-contact results; `errors[].context.ids` names the failing ids. A missing
//!   contact (deleted, merged) or refused values are `Rejected` with HubSpot's reason;
//!   other errors are `RetryLater`.
//! - A 400 for the whole batch that names a property that does not exist or a value that
//!   is not one of an enumeration's options (`PROPERTY_DOESNT_EXIST`, `INVALID_OPTION`) is
//!   a configuration error, the same for every contact: the call fails with
//!   `ConnectorError::Config` naming the property and the fix (an alarm; the batch waits
//!   in the outbox), and nothing is split — splitting would send up to 199 requests per
//!   100 contacts and end with every one rejected.
//! - Any other 400 for the whole batch (HubSpot refuses a whole batch for some invalid
//!   inputs) could block every contact in it forever. The batch is split in halves and each half
//!   sent again, down to single inputs; a single input refused that way is `Rejected`.
//!   One bad input among 100 costs about 15 requests, and the rest are written.
//! - Rate limits, authentication and server errors fail the whole call (`Err`) when
//!   nothing was written yet; once halves have been written, the unwritten items become
//!   `RetryLater` so the written ones are not reported as failed.

use std::collections::{HashMap, HashSet};

use optout_core::{ConnectorError, PushItem, PushOutcome, Scope, Status};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;

use crate::HubSpot;
use crate::client::describe;
use crate::limit::Kind;

const UPDATE_PATH: &str = "/crm/v3/objects/contacts/batch/update";

/// One contact's write, possibly standing for several items: at most one per field.
struct Input<'a> {
    id: &'a str,
    /// The consent field's value (an item of scope `all`).
    item: Option<&'a PushItem>,
    /// The marketing field's value (an item of scope `marketing`).
    marketing: Option<&'a PushItem>,
}

impl<'a> Input<'a> {
    fn new(id: &'a str) -> Self {
        Input {
            id,
            item: None,
            marketing: None,
        }
    }

    /// Takes `item` into its field's slot unless the slot holds a preferred one.
    fn absorb(&mut self, item: &'a PushItem) {
        let slot = match item.scope {
            Scope::Marketing => &mut self.marketing,
            Scope::All => &mut self.item,
        };
        if slot.is_none_or(|held| preferred(item, held)) {
            *slot = Some(item);
        }
    }
}

/// How HubSpot answered one batch request.
enum Answer {
    PerInput(Vec<PushOutcome>),
    /// The whole request was refused, for the given reason.
    Refused(String),
}

#[derive(Deserialize)]
struct BatchResponse {
    #[serde(default)]
    results: Vec<BatchResult>,
    #[serde(default)]
    errors: Vec<BatchError>,
}

#[derive(Deserialize)]
struct BatchResult {
    id: String,
}

#[derive(Deserialize)]
struct BatchError {
    category: Option<String>,
    message: Option<String>,
    #[serde(default)]
    context: HashMap<String, serde_json::Value>,
}

impl HubSpot {
    pub(crate) async fn push_batch(
        &self,
        batch: &[PushItem],
    ) -> Result<Vec<PushOutcome>, ConnectorError> {
        let mut outcomes = Vec::with_capacity(batch.len());
        // The core sends at most max_batch() items; chunking keeps a larger call correct.
        for chunk in batch.chunks(self.config.batch_size) {
            outcomes.extend(self.push_chunk(chunk).await?);
        }
        Ok(outcomes)
    }

    async fn push_chunk(&self, items: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        let mut inputs: Vec<Input> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let slots: Vec<usize> = items
            .iter()
            .map(|item| {
                let id = item.record.as_str();
                let i = *index.entry(id).or_insert_with(|| {
                    inputs.push(Input::new(id));
                    inputs.len() - 1
                });
                inputs[i].absorb(item);
                i
            })
            .collect();

        let per_input = self.send_inputs(&inputs).await?;
        Ok(slots.into_iter().map(|i| per_input[i].clone()).collect())
    }

    /// Sends the inputs, splitting a batch HubSpot refuses as a whole (see the module doc).
    async fn send_inputs(&self, inputs: &[Input<'_>]) -> Result<Vec<PushOutcome>, ConnectorError> {
        let mut outcomes: Vec<Option<PushOutcome>> = vec![None; inputs.len()];
        let mut pending = vec![(0, inputs.len())];
        let mut first = true;
        while let Some((lo, hi)) = pending.pop() {
            let part = &inputs[lo..hi];
            match self.send_once(part).await {
                Ok(Answer::PerInput(outs)) => {
                    for (slot, o) in outcomes[lo..hi].iter_mut().zip(outs) {
                        *slot = Some(o);
                    }
                }
                Ok(Answer::Refused(reason)) if part.len() == 1 => {
                    outcomes[lo] = Some(PushOutcome::Rejected {
                        reason: format!(
                            "HubSpot refused the update of contact {}: {reason}",
                            part[0].id
                        ),
                    });
                }
                Ok(Answer::Refused(reason)) => {
                    tracing::warn!(inputs = part.len(), %reason, "HubSpot refused a whole batch; splitting it");
                    let mid = lo + part.len() / 2;
                    pending.push((mid, hi));
                    pending.push((lo, mid));
                }
                Err(e) if first => return Err(e),
                Err(e) => {
                    for slot in &mut outcomes[lo..hi] {
                        *slot = Some(PushOutcome::RetryLater {
                            after: e.retry_after(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
            first = false;
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every input got an outcome"))
            .collect())
    }

    async fn send_once(&self, inputs: &[Input<'_>]) -> Result<Answer, ConnectorError> {
        let cfg = &self.config;
        let body = json!({
            "inputs": inputs.iter().map(|i| json!({
                "id": i.id,
                "properties": properties(cfg, i),
            })).collect::<Vec<_>>(),
        });
        let resp = self.client.post(Kind::Other, UPDATE_PATH, &body).await?;
        match resp.status {
            StatusCode::OK => Ok(Answer::PerInput(vec![PushOutcome::Done; inputs.len()])),
            StatusCode::MULTI_STATUS => Ok(Answer::PerInput(per_input(inputs, resp.json()?))),
            s if s.is_success() => Err(ConnectorError::Transient(format!(
                "unexpected {s} from HubSpot batch update: {}",
                describe(&resp.body)
            ))),
            StatusCode::BAD_REQUEST => {
                let refusals = crate::client::property_refusals(&resp.body);
                if !refusals.is_empty() {
                    return Err(ConnectorError::Config(crate::preflight::refusal_text(
                        cfg, &refusals,
                    )));
                }
                Ok(Answer::Refused(format!("400: {}", describe(&resp.body))))
            }
            // 404 or 415 for the whole request point at the endpoint, not at one contact.
            _ => Err(resp.into_error()),
        }
    }
}

/// The properties one input sets: the three consent properties for its `all` item, the
/// marketing property for its `marketing` item (to the same option values).
fn properties(cfg: &crate::config::Config, input: &Input<'_>) -> serde_json::Value {
    let value = |s: Status| match s {
        Status::OptedOut => cfg.opted_out_value.as_str(),
        Status::OptedIn => cfg.opted_in_value.as_str(),
    };
    let mut props = serde_json::Map::new();
    if let Some(item) = input.item {
        props.insert(cfg.consent_property.clone(), json!(value(item.status)));
        props.insert(
            cfg.changed_at_property.clone(),
            json!(item.changed_at.to_rfc3339()),
        );
        props.insert(cfg.source_property.clone(), json!(item.source));
    }
    // A marketing item reaches a connector only when the property is configured.
    if let (Some(item), Some(name)) = (input.marketing, cfg.marketing()) {
        props.insert(name.to_string(), json!(value(item.status)));
    }
    serde_json::Value::Object(props)
}

/// Whether `a` should be written rather than `b` for the same contact: an opt-out wins,
/// then the later change.
fn preferred(a: &PushItem, b: &PushItem) -> bool {
    (a.status == Status::OptedOut, a.changed_at) > (b.status == Status::OptedOut, b.changed_at)
}

/// Maps a 207 answer to one outcome per input.
fn per_input(inputs: &[Input<'_>], resp: BatchResponse) -> Vec<PushOutcome> {
    let done: HashSet<&str> = resp.results.iter().map(|r| r.id.as_str()).collect();
    let ids_of = |e: &BatchError| -> Vec<String> {
        ["ids", "id"]
            .iter()
            .filter_map(|k| e.context.get(*k))
            .flat_map(|v| match v {
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect(),
                serde_json::Value::String(s) => vec![s.clone()],
                _ => vec![],
            })
            .collect()
    };
    inputs
        .iter()
        .map(|input| {
            let named = resp
                .errors
                .iter()
                .find(|e| ids_of(e).iter().any(|x| x == input.id));
            // An error that names no ids applies to the inputs missing from the results.
            let unnamed = || resp.errors.iter().find(|e| ids_of(e).is_empty());
            match named {
                Some(e) => outcome_for(input.id, e),
                None if done.contains(input.id) => PushOutcome::Done,
                None => match unnamed() {
                    Some(e) => outcome_for(input.id, e),
                    None => PushOutcome::RetryLater {
                        after: None,
                        reason: format!(
                            "HubSpot's 207 answer neither confirmed nor refused contact {}",
                            input.id
                        ),
                    },
                },
            }
        })
        .collect()
}

fn outcome_for(id: &str, e: &BatchError) -> PushOutcome {
    let category = e.category.as_deref().unwrap_or("");
    let message = optout_core::http::excerpt(e.message.as_deref().unwrap_or(""));
    let said = |s: &str| category == s || message.contains(s);
    if said("OBJECT_NOT_FOUND")
        || (category.is_empty() && message.to_lowercase().contains("not found"))
    {
        PushOutcome::Rejected {
            reason: format!(
                "contact {id} does not exist in HubSpot (deleted or merged): {message}"
            ),
        }
    } else if [
        "VALIDATION_ERROR",
        "PROPERTY_DOESNT_EXIST",
        "INVALID_OPTION",
        "READ_ONLY_VALUE",
    ]
    .iter()
    .any(|c| said(c))
    {
        PushOutcome::Rejected {
            reason: format!("HubSpot refused the values for contact {id}: {category}: {message}"),
        }
    } else {
        PushOutcome::RetryLater {
            after: None,
            reason: format!("HubSpot could not update contact {id}: {category}: {message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use optout_core::{Scope, Timestamp};

    fn item(record: &str, status: Status, at: i64) -> PushItem {
        PushItem {
            key: record.into(),
            record: record.into(),
            status,
            scope: Scope::All,
            changed_at: Timestamp(at),
            source: "test".into(),
            subject: "s".into(),
            identities: vec![],
            reply: None,
        }
    }

    #[test]
    fn opt_out_wins_then_later_change() {
        let out = item("1", Status::OptedOut, 1);
        let later_in = item("1", Status::OptedIn, 9);
        assert!(preferred(&out, &later_in) && !preferred(&later_in, &out));
        assert!(preferred(
            &item("1", Status::OptedIn, 9),
            &item("1", Status::OptedIn, 1)
        ));
    }

    #[test]
    fn both_fields_of_one_contact_share_one_input() {
        let cfg = crate::config::Config {
            marketing_property: Some("whatsapp_marketing_consent".into()),
            ..Default::default()
        };
        let all = item("1", Status::OptedIn, 5);
        let mut marketing = item("1", Status::OptedOut, 3);
        marketing.scope = Scope::Marketing;
        let mut later_in = marketing.clone();
        later_in.status = Status::OptedIn;
        later_in.changed_at = Timestamp(9);
        let mut input = Input::new("1");
        for i in [&marketing, &all, &later_in] {
            input.absorb(i);
        }
        assert_eq!(
            properties(&cfg, &input),
            serde_json::json!({"whatsapp_consent": "opted_in", "whatsapp_marketing_consent": "opted_out",
                "whatsapp_consent_changed_at": "1970-01-01T00:00:00.005Z", "whatsapp_consent_source": "test"})
        );
        let mut only_marketing = Input::new("1");
        only_marketing.absorb(&later_in);
        assert_eq!(
            properties(&cfg, &only_marketing),
            serde_json::json!({"whatsapp_marketing_consent": "opted_in"})
        );
    }

    #[test]
    fn maps_207_errors_per_id() {
        let items = [
            item("1", Status::OptedOut, 1),
            item("2", Status::OptedOut, 1),
            item("3", Status::OptedOut, 1),
            item("4", Status::OptedOut, 1),
        ];
        let inputs: Vec<Input> = items
            .iter()
            .map(|i| Input {
                id: &i.record,
                item: Some(i),
                marketing: None,
            })
            .collect();
        let resp: BatchResponse = serde_json::from_str(r#"{"status":"COMPLETE","results":[{"id":"1","properties":{}}],"numErrors":2,"errors":[
            {"status":"error","category":"OBJECT_NOT_FOUND","message":"Could not get some CONTACT objects, they may be deleted or not exist.","context":{"ids":["2"]}},
            {"status":"error","category":"VALIDATION_ERROR","message":"Property values were not valid: INVALID_OPTION","context":{"ids":["3"]}}]}"#).unwrap();
        let out = per_input(&inputs, resp);
        assert_eq!(out[0], PushOutcome::Done);
        assert!(
            matches!(&out[1], PushOutcome::Rejected { reason } if reason.contains("contact 2 does not exist"))
        );
        assert!(
            matches!(&out[2], PushOutcome::Rejected { reason } if reason.contains("INVALID_OPTION"))
        );
        assert!(
            matches!(&out[3], PushOutcome::RetryLater { .. }),
            "unconfirmed ids are retried"
        );
    }
}
