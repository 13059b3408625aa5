//! Leadership among the instances that share one PostgreSQL store.
//!
//! Every instance serves HTTP (webhooks into the shared inbox, the send gate, the write
//! API) and the control socket; only the leader runs the work that talks to vendors or
//! advances the store on its own: the poll and push workers, the write API's apply
//! worker, retention. The leader is whoever holds the lease row (`store/lease.rs`): a
//! follower tries to take it every third of a lease and starts the leader's work when
//! it wins; the leader renews it as often.
//!
//! Losing the lease ends the process ([`LEASE_LOST_EXIT`]) rather than stopping workers
//! in place: nothing half-stopped can push afterwards, and the service manager restarts
//! it as a follower. The leader also keeps a deadline of its own on the monotonic clock
//! (the start of its last successful renewal, plus the lease, less a margin): past it,
//! the leader neither pushes ([`check_before_push`], [`within_lease`]) nor waits to hear from the
//! database, so a paused process resumed after its lease cannot push. Its transactions
//! are fenced by the lease's epoch too, so a cursor cannot move for an old leader.
//!
//! On sled there is one process: it leads from the start and holds no lease.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use optout_core::Timestamp;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::Store;
use crate::store::lease::{InstanceInfo, Lease, RollCall};

/// The exit code of an instance that lost the lease (`EX_TEMPFAIL`): its unit restarts
/// it, and it comes back as a follower.
pub const LEASE_LOST_EXIT: i32 = 75;

/// How often every instance writes its heartbeat into the roll call.
const HEARTBEAT: Duration = Duration::from_secs(2);

/// How often the leader looks for work written by other instances, should a wake-up
/// notification be lost.
const WAKE_TICK: Duration = Duration::from_secs(1);

/// Until when this process may push (`None`: no lease involved, or not leading yet).
static DEADLINE: Mutex<Option<Instant>> = Mutex::new(None);

fn deadline() -> Option<Instant> {
    *DEADLINE.lock().unwrap_or_else(|p| p.into_inner())
}

fn set_deadline(at: Option<Instant>) {
    *DEADLINE.lock().unwrap_or_else(|p| p.into_inner()) = at;
}

/// Called before each push batch is sent: past the leader's own deadline it must not
/// go out, whatever the database would say, and the process ends.
pub fn check_before_push(connector: &str) {
    if deadline().is_some_and(|d| Instant::now() >= d) {
        lost(&format!(
            "its lease ran out before a push of {connector} (not renewed in time)"
        ));
    }
}

/// Runs a push while the lease lasts: every time the push is polled — before each of the
/// requests it sends, when one batch takes several (WhatsApp sends replies one by one) —
/// the deadline is checked first, so a push paused half-way sends nothing more once
/// resumed past it.
pub async fn within_lease<F: std::future::Future>(connector: &str, push: F) -> F::Output {
    let mut push = std::pin::pin!(push);
    std::future::poll_fn(|cx| {
        check_before_push(connector);
        push.as_mut().poll(cx)
    })
    .await
}

/// Ends the process after losing the lease. Nothing is cleared from the store: the new
/// leader abandons replies left in flight and carries on from the cursors.
pub fn lost(why: &str) -> ! {
    tracing::error!(
        reason = %why,
        code = LEASE_LOST_EXIT,
        "this instance no longer leads; exiting so that it restarts as a follower"
    );
    std::process::exit(LEASE_LOST_EXIT)
}

/// This instance's part in leadership.
pub struct Leadership {
    store: Store,
    info: InstanceInfo,
    ttl: Duration,
    leading: AtomicBool,
    lease: Mutex<Option<Lease>>,
    /// Ends the renewal after a clean stop's release.
    renewing: CancellationToken,
}

impl Leadership {
    pub fn new(store: Store, name: String, ttl: Duration, started: Timestamp) -> Arc<Self> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Arc::new(Leadership {
            info: InstanceInfo {
                name,
                host,
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_ms: started.millis(),
            },
            ttl,
            // sled: one process, the leader from the start.
            leading: AtomicBool::new(!store.is_shared()),
            lease: Mutex::new(None),
            renewing: CancellationToken::new(),
            store,
        })
    }

    pub fn instance(&self) -> &str {
        &self.info.name
    }

    /// Whether this instance runs the leader's work now.
    pub fn leading(&self) -> bool {
        self.leading.load(Ordering::Acquire)
    }

    /// Every instance and the lease (`None` on sled); instances not seen for three
    /// leases are shown as gone.
    pub fn roll_call(&self) -> Result<Option<RollCall>, crate::store::StoreError> {
        self.store.roll_call(self.ttl * 3)
    }

    /// New work was stored here (a webhook, an erasure's pushes, a write-API event):
    /// when another instance leads, it is told at once rather than at its next look.
    pub fn wake_leader(&self) {
        if !self.store.is_shared() || self.leading() {
            return;
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.notify_wake() {
                tracing::debug!(error = %e, "could not wake the leader (it looks again within a second)");
            }
        });
    }

    /// Becomes the leader as soon as it can: at once on sled or when the lease is free,
    /// else when the leader's lease runs out. `lead` then starts the leader's work (once:
    /// a lost lease ends the process). Returns after the first attempt; a follower keeps
    /// trying in the background until `cancel`.
    pub async fn start(
        self: &Arc<Self>,
        lead: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        if !self.store.is_shared() {
            self.leading.store(true, Ordering::Release);
            return lead();
        }
        self.spawn_heartbeat(tracker, cancel);
        if self.try_take().await {
            return self.begin(lead);
        }
        tracing::info!(instance = %self.info.name, "another instance leads; following (webhooks, the gate and commands are served here)");
        let (me, cancel) = (self.clone(), cancel.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(me.ttl / 3) => {}
                }
                if me.try_take().await {
                    if let Err(e) = me.begin(lead) {
                        tracing::error!(error = %e, "cannot start the leader's work");
                        lost("the leader's work could not start");
                    }
                    return;
                }
            }
        });
        Ok(())
    }

    /// One attempt at the lease; on success it is this instance's, fenced and timed.
    async fn try_take(self: &Arc<Self>) -> bool {
        let me = self.clone();
        let begun = Instant::now();
        let taken = tokio::task::spawn_blocking(move || me.store.try_lead(&me.info.name, me.ttl))
            .await
            .unwrap_or_else(|e| Err(crate::store::StoreError::Io(e.to_string())));
        match taken {
            Ok(Some(lease)) => {
                set_deadline(Some(self.local_deadline(begun)));
                self.store
                    .set_fence(Some((lease.holder.clone(), lease.epoch)));
                tracing::info!(instance = %lease.holder, epoch = lease.epoch, "this instance now leads");
                *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
                self.leading.store(true, Ordering::Release);
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the lease; trying again");
                false
            }
        }
    }

    /// Where the local deadline falls for a lease granted or renewed by a request sent
    /// at `begun`: the database's expiry is later, since it counts from when it answered.
    /// The margin covers the clocks' rates differing.
    fn local_deadline(&self, begun: Instant) -> Instant {
        let margin = (self.ttl / 10).max(Duration::from_millis(100));
        begun + self.ttl.saturating_sub(margin)
    }

    /// Starts the leader's work, the renewal and the local deadline's watch.
    fn begin(self: &Arc<Self>, lead: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
        self.spawn_renewal();
        self.spawn_deadline_watch();
        lead()
    }

    /// Renews the lease every third of it; another holder or epoch ends the process.
    fn spawn_renewal(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = me.renewing.cancelled() => return,
                    _ = tokio::time::sleep(me.ttl / 3) => {}
                }
                let Some(lease) = me.lease.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
                    return;
                };
                let (m, begun) = (me.clone(), Instant::now());
                let renewed = tokio::task::spawn_blocking(move || m.store.renew(&lease, m.ttl))
                    .await
                    .unwrap_or_else(|e| Err(crate::store::StoreError::Io(e.to_string())));
                match renewed {
                    _ if me.renewing.is_cancelled() => return,
                    Ok(true) => set_deadline(Some(me.local_deadline(begun))),
                    Ok(false) => lost("its lease expired or another instance took it over"),
                    // The local deadline decides, should the database stay out of reach.
                    Err(e) => tracing::warn!(error = %e, "cannot renew the lease; trying again"),
                }
            }
        });
    }

    /// Ends the process once the local deadline passes without a renewal.
    fn spawn_deadline_watch(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let Some(at) = deadline() else { return };
                tokio::select! {
                    _ = me.renewing.cancelled() => return,
                    _ = tokio::time::sleep_until(at.into()) => {}
                }
                if deadline().is_some_and(|d| Instant::now() >= d) && !me.renewing.is_cancelled() {
                    lost("its lease ran out without a renewal");
                }
            }
        });
    }

    /// Writes this instance's heartbeat every [`HEARTBEAT`] until `cancel`.
    fn spawn_heartbeat(self: &Arc<Self>, tracker: &TaskTracker, cancel: &CancellationToken) {
        let (me, cancel) = (self.clone(), cancel.clone());
        tracker.spawn(async move {
            loop {
                let m = me.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let detail = if m.leading() { "leader" } else { "follower" };
                    if let Err(e) = m.store.heartbeat(&m.info, detail) {
                        tracing::debug!(error = %e, "cannot write this instance's heartbeat");
                    }
                })
                .await;
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                }
            }
        });
    }

    /// While leading on a shared store: wakes the workers for work stored by other
    /// instances (`wake`, on a thread of its own), on each notification and every
    /// [`WAKE_TICK`] in case one was lost. Stops when `cancel` is.
    pub fn listen(&self, wake: impl Fn() + Send + Sync + 'static, cancel: &CancellationToken) {
        if !self.store.is_shared() {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (store, flag) = (self.store.clone(), stop.clone());
        std::thread::Builder::new()
            .name("optout-wake".into())
            .spawn(move || store.listen_wake(flag, WAKE_TICK, wake))
            .map(drop)
            .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the wake-up listener"));
        let cancel = cancel.clone();
        tokio::spawn(async move {
            cancel.cancelled().await;
            stop.store(true, Ordering::Release);
        });
    }

    /// After a clean stop's last push: gives the lease up, so that a successor takes
    /// over at once instead of after it expires.
    pub async fn release(self: &Arc<Self>) {
        self.renewing.cancel();
        let Some(lease) = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        set_deadline(Some(Instant::now()));
        self.leading.store(false, Ordering::Release);
        let me = self.clone();
        match tokio::task::spawn_blocking(move || me.store.release(&lease)).await {
            Ok(Ok(())) => tracing::info!("gave the leader's lease up"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not give the lease up; it expires on its own")
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not give the lease up; it expires on its own")
            }
        }
    }
}
