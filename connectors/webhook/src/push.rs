//! One `push` call: every item is its own signed POST (one event per request is what
//! automation tools expect), at most `concurrency` in flight, outcomes in item order.
//!
//! Two answers stop the rest of a batch from being sent, because sending them would only
//! fail the same way: a 429 (the remaining items come back as `RetryLater` with the same
//! hint, so we do not hammer a receiver that asked us to slow down) and a connection that
//! cannot be opened (the endpoint is down). When no item of the batch got an answer at
//! all, the whole call fails with `Transient`, so the core backs off the connector
//! instead of counting a retry per item.

use std::sync::Mutex;
use std::time::Duration;

use futures_util::{StreamExt, stream};
use optout_core::{ConnectorError, PushItem, PushOutcome};

use crate::client::{Delivery, Sender};

/// Why the rest of a batch was held back.
#[derive(Clone, Debug)]
enum Hold {
    RateLimited(Option<Duration>),
    Unreachable(String),
}

pub(crate) async fn push(
    name: &str,
    sender: &Sender,
    batch: &[PushItem],
    concurrency: usize,
) -> Result<Vec<PushOutcome>, ConnectorError> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    // Set by the first 429 or unreachable endpoint; checked before each request starts.
    let hold: Mutex<Option<Hold>> = Mutex::new(None);
    // Indices rather than `&PushItem`s: a closure over references trips the compiler's
    // `Send` check of the connector's future (a higher-ranked lifetime limitation).
    let results: Vec<Result<Delivery, Hold>> = stream::iter(0..batch.len())
        .map(|i| {
            let (hold, item) = (&hold, &batch[i]);
            async move {
                if let Some(h) = hold.lock().expect("hold lock").clone() {
                    return Err(h);
                }
                let delivery = sender.deliver(item).await;
                let new_hold = match &delivery {
                    Delivery::Retry {
                        rate_limited: true,
                        after,
                        ..
                    } => Some(Hold::RateLimited(*after)),
                    Delivery::Transport {
                        unreachable: true,
                        reason,
                    } => Some(Hold::Unreachable(reason.clone())),
                    _ => None,
                };
                if let Some(h) = new_hold {
                    hold.lock().expect("hold lock").get_or_insert(h);
                }
                log(name, sender.host(), item, &delivery);
                Ok(delivery)
            }
        })
        .buffered(concurrency.max(1))
        .collect()
        .await;

    let answered = results.iter().any(|r| {
        matches!(
            r,
            Ok(Delivery::Done | Delivery::Retry { .. } | Delivery::Rejected(_))
        )
    });
    if !answered {
        let first = results.iter().find_map(|r| match r {
            Ok(Delivery::Transport { reason, .. }) => Some(reason.as_str()),
            _ => None,
        });
        return Err(ConnectorError::Transient(format!(
            "webhook receiver at {} did not answer: {}",
            sender.host(),
            first.unwrap_or("no request completed")
        )));
    }
    Ok(results.into_iter().map(outcome).collect())
}

fn outcome(result: Result<Delivery, Hold>) -> PushOutcome {
    match result {
        Ok(Delivery::Done) => PushOutcome::Done,
        Ok(Delivery::Retry { after, reason, .. }) => PushOutcome::RetryLater { after, reason },
        Ok(Delivery::Rejected(reason)) => PushOutcome::Rejected { reason },
        Ok(Delivery::Transport { reason, .. }) => PushOutcome::RetryLater {
            after: None,
            reason,
        },
        Err(Hold::RateLimited(after)) => PushOutcome::RetryLater {
            after,
            reason: "not sent: the receiver asked to slow down (429)".into(),
        },
        Err(Hold::Unreachable(reason)) => PushOutcome::RetryLater {
            after: None,
            reason: format!("not sent: the receiver is unreachable ({reason})"),
        },
    }
}

fn log(name: &str, host: &str, item: &PushItem, delivery: &Delivery) {
    let id = crate::event::event_id(item);
    match delivery {
        Delivery::Done => tracing::debug!(connector = name, host, event = %id, "event delivered"),
        Delivery::Retry { reason, .. } | Delivery::Transport { reason, .. } => {
            tracing::info!(connector = name, host, event = %id, %reason, "event not delivered; will retry")
        }
        Delivery::Rejected(reason) => {
            tracing::warn!(connector = name, host, event = %id, %reason, "event rejected by the receiver")
        }
    }
}
