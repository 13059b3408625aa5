//! The store's health worker: turns a failing store into "not ready" and brings it back.
//!
//! A store call that fails in sled marks the store failing (see [`Store`]); from then on
//! webhooks answer 503 and nothing is written. This worker notices at once, lowers the
//! `optout_store_healthy` gauge and readiness (which also stops the systemd watchdog
//! pings), then tries [`Store::recover`] with a growing delay until it succeeds: the
//! gauge and readiness come back, and every poll and push worker is woken to catch up
//! (the WhatsApp poll re-reads the inbox). Damage found while reopening cannot be cured by
//! retrying, nor can a database this process cannot let go of: both end the daemon
//! (`fatal`), with an exit code that says whether a restart can help.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// The first retry of a failing store; the delay doubles up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(10);

/// Why the daemon must stop because of its store.
#[derive(Debug, thiserror::Error)]
pub enum StoreFatal {
    /// Damage or a foreign schema found while reopening: an operator must restore it.
    #[error("the store cannot be used: {0}")]
    Damaged(StoreError),
    /// The store failed and this process cannot reopen it; a fresh process can.
    #[error(
        "the store failed and cannot be reopened in this process ({0}); exiting so that the service manager restarts the daemon"
    )]
    Restart(StoreError),
}

/// What the worker tells the rest of the daemon.
pub struct StoreHooks {
    /// The store's health changed: recompute readiness.
    pub changed: Box<dyn Fn() + Send + Sync>,
    /// The store works again: wake the workers.
    pub recovered: Box<dyn Fn() + Send + Sync>,
    /// The daemon must stop.
    pub fatal: mpsc::UnboundedSender<StoreFatal>,
}

/// Watches the store until `cancel` fires; see the module doc.
pub async fn store_health_worker(
    store: Store,
    metrics: Arc<Metrics>,
    hooks: StoreHooks,
    cancel: CancellationToken,
) {
    metrics.store_healthy.set(1);
    let mut health = store.health();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = health.wait_for(Option::is_some) => if r.is_err() { return },
        }
        metrics.store_healthy.set(0);
        (hooks.changed)();
        match bring_back(&store, &cancel).await {
            Some(Ok(())) => {}
            Some(Err(fatal)) => {
                let _ = hooks.fatal.send(fatal);
                return;
            }
            None => return,
        }
        metrics.store_healthy.set(1);
        (hooks.changed)();
        tracing::info!("the store works again; catching up");
        (hooks.recovered)();
    }
}

/// Tries to recover the store until it works (`Ok`), cannot (`Err`), or the daemon stops
/// (`None`).
async fn bring_back(store: &Store, cancel: &CancellationToken) -> Option<Result<(), StoreFatal>> {
    let mut delay = FIRST_DELAY;
    let mut attempts = 0u32;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        let s = store.clone();
        let r = tokio::task::spawn_blocking(move || s.recover())
            .await
            .unwrap_or_else(|e| Err(StoreError::Io(format!("recovery task failed: {e}"))));
        attempts += 1;
        match r {
            Ok(()) => return Some(Ok(())),
            Err(e) if e.is_damage() => return Some(Err(StoreFatal::Damaged(e))),
            // Our own old handle still holds sled's lock: only a new process can open it.
            Err(e @ StoreError::Open { .. }) if e.to_string().contains("in use") => {
                return Some(Err(StoreFatal::Restart(e)));
            }
            Err(e) => {
                // One line per episode, then one a minute or so: a full disk may last.
                if attempts == 1 || delay == MAX_DELAY && attempts % 6 == 0 {
                    tracing::warn!(error = %e, attempts, "the store still fails; retrying");
                }
                delay = (delay * 2).min(MAX_DELAY);
            }
        }
    }
}
