//! The leader's lease and the roll call of instances, for several daemons on one
//! PostgreSQL database (`optout_lease`, `optout_instances`), and the wake-ups that carry
//! work written by one instance to the leader's workers (`NOTIFY optout_wake`).
//!
//! Every time is the database's (`now()`): the hosts' clocks never decide who leads. On
//! sled there is one process: it always leads, holds no lease and is the only instance.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use serde::{Deserialize, Serialize};

use super::kv::Engine;
use super::kv::pg::Pg;
use super::{Store, StoreError};

/// The lease row's name (the fence in `kv/pg.rs` checks the same row).
const LEADER: &str = "leader";

/// The channel of `NOTIFY`: new work for the leader's workers.
const WAKE_CHANNEL: &str = "optout_wake";

/// A lease this instance holds: its name and the epoch it was granted with. Every grant
/// increases the epoch, so an old leader's epoch never matches again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub epoch: i64,
}

/// What an instance writes about itself in the roll call.
#[derive(Clone, Debug)]
pub struct InstanceInfo {
    pub name: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    /// When the process started (Unix milliseconds).
    pub started_ms: i64,
}

/// One instance as the roll call shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InstanceRow {
    pub name: String,
    pub host: String,
    pub pid: i64,
    pub version: String,
    pub started_at: String,
    pub last_seen: String,
    /// Seconds since its last heartbeat, by the database's clock.
    pub seen_seconds_ago: f64,
    /// Not seen for three leases: stopped, or cut off from the database.
    pub gone: bool,
    /// It holds the unexpired lease.
    pub leader: bool,
    /// What it said of itself with its last heartbeat (`leader`, `follower`).
    pub detail: String,
}

/// The lease as the database holds it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LeaseRow {
    pub holder: String,
    pub epoch: i64,
    pub expires_at: String,
    /// Seconds until it expires (negative: expired, and free to take).
    pub expires_in_seconds: f64,
}

/// Every instance that ever joined, and the lease.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RollCall {
    pub instances: Vec<InstanceRow>,
    pub lease: Option<LeaseRow>,
}

/// A timestamp as RFC 3339 in UTC, formatted by the database.
const RFC3339: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'"#;

impl Store {
    /// The PostgreSQL engine, if the store is on one.
    fn pg(&self) -> Result<Option<Pg>, StoreError> {
        self.with_db_unchecked(|db| match &db.db {
            Engine::Pg(pg) => Ok(Some(pg.clone())),
            Engine::Sled(_) => Ok(None),
        })
    }

    /// Whether several instances may share this store (PostgreSQL): leadership is then
    /// decided by the lease.
    pub fn is_shared(&self) -> bool {
        !self.is_sled()
    }

    /// Takes the leader's lease for `ttl` if it is free (expired or never taken) or
    /// already `instance`'s; each grant has a new epoch. `None`: another instance holds it.
    /// On sled this process always leads (epoch 0).
    pub fn try_lead(&self, instance: &str, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        let Some(pg) = self.pg()? else {
            return Ok(Some(Lease {
                holder: instance.to_string(),
                epoch: 0,
            }));
        };
        let secs = ttl.as_secs_f64();
        let row = pg.with_client(|c| {
            c.query_opt(
                "INSERT INTO optout_lease (name, holder, epoch, expires_at) \
                 VALUES ($1, $2, 1, now() + make_interval(secs => $3)) \
                 ON CONFLICT (name) DO UPDATE \
                 SET holder = EXCLUDED.holder, epoch = optout_lease.epoch + 1, \
                     expires_at = EXCLUDED.expires_at \
                 WHERE optout_lease.expires_at < now() OR optout_lease.holder = EXCLUDED.holder \
                 RETURNING epoch",
                &[&LEADER, &instance, &secs],
            )
        })?;
        Ok(row.map(|r| Lease {
            holder: instance.to_string(),
            epoch: r.get(0),
        }))
    }

    /// Extends `lease` by `ttl` from now. `false`: it expired or another instance took it
    /// (this instance no longer leads). Always `true` on sled.
    pub fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let Some(pg) = self.pg()? else {
            return Ok(true);
        };
        let secs = ttl.as_secs_f64();
        let n = pg.with_client(|c| {
            c.execute(
                "UPDATE optout_lease SET expires_at = now() + make_interval(secs => $4) \
                 WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > now()",
                &[&LEADER, &lease.holder, &lease.epoch, &secs],
            )
        })?;
        Ok(n == 1)
    }

    /// Gives `lease` up (a clean stop): a successor need not wait for it to expire.
    pub fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let Some(pg) = self.pg()? else {
            return Ok(());
        };
        pg.with_client(|c| {
            c.execute(
                "UPDATE optout_lease SET expires_at = now() - interval '1 millisecond' \
                 WHERE name = $1 AND holder = $2 AND epoch = $3",
                &[&LEADER, &lease.holder, &lease.epoch],
            )
        })?;
        Ok(())
    }

    /// Records that `me` is alive (its row in the roll call, seen now), with `detail`.
    pub fn heartbeat(&self, me: &InstanceInfo, detail: &str) -> Result<(), StoreError> {
        let Some(pg) = self.pg()? else {
            return Ok(());
        };
        let pid = i32::try_from(me.pid).unwrap_or(i32::MAX);
        let started = me.started_ms as f64 / 1000.0;
        pg.with_client(|c| {
            c.execute(
                "INSERT INTO optout_instances (name, host, pid, version, started_at, seen_at, detail) \
                 VALUES ($1, $2, $3, $4, to_timestamp($5), now(), $6) \
                 ON CONFLICT (name) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, \
                     version = EXCLUDED.version, started_at = EXCLUDED.started_at, \
                     seen_at = now(), detail = EXCLUDED.detail",
                &[&me.name, &me.host, &pid, &me.version, &started, &detail],
            )
        })?;
        Ok(())
    }

    /// The roll call: every instance (gone when not seen for `gone_after`) and the lease.
    /// `None` on sled (one process, no lease).
    pub fn roll_call(&self, gone_after: Duration) -> Result<Option<RollCall>, StoreError> {
        let Some(pg) = self.pg()? else {
            return Ok(None);
        };
        let gone = gone_after.as_secs_f64();
        let (lease, rows) = pg.with_client(|c| {
            let lease = c.query_opt(
                &format!(
                    "SELECT holder, epoch, to_char(expires_at AT TIME ZONE 'UTC', {RFC3339}), \
                     extract(epoch FROM expires_at - now())::float8 \
                     FROM optout_lease WHERE name = $1"
                ),
                &[&LEADER],
            )?;
            let rows = c.query(
                &format!(
                    "SELECT name, host, pid::bigint, version, \
                     to_char(started_at AT TIME ZONE 'UTC', {RFC3339}), \
                     to_char(seen_at AT TIME ZONE 'UTC', {RFC3339}), \
                     extract(epoch FROM now() - seen_at)::float8, detail \
                     FROM optout_instances ORDER BY name"
                ),
                &[],
            )?;
            Ok((lease, rows))
        })?;
        let lease = lease.map(|r| LeaseRow {
            holder: r.get(0),
            epoch: r.get(1),
            expires_at: r.get(2),
            expires_in_seconds: r.get(3),
        });
        let leader = (lease.as_ref())
            .filter(|l| l.expires_in_seconds > 0.0)
            .map(|l| l.holder.clone());
        let instances = (rows.iter())
            .map(|r| {
                let name: String = r.get(0);
                let ago: f64 = r.get(6);
                InstanceRow {
                    leader: leader.as_deref() == Some(name.as_str()),
                    host: r.get(1),
                    pid: r.get(2),
                    version: r.get(3),
                    started_at: r.get(4),
                    last_seen: r.get(5),
                    seen_seconds_ago: ago,
                    gone: ago > gone,
                    detail: r.get(7),
                    name,
                }
            })
            .collect();
        Ok(Some(RollCall { instances, lease }))
    }

    /// Tells the leader that new work is stored (a webhook, an erasure's pushes, a
    /// write-API event): `NOTIFY optout_wake`. Nothing on sled (one process).
    pub fn notify_wake(&self) -> Result<(), StoreError> {
        let Some(pg) = self.pg()? else {
            return Ok(());
        };
        pg.with_client(|c| c.batch_execute(&format!("NOTIFY {WAKE_CHANNEL}")))
    }

    /// Listens for [`Store::notify_wake`] until `stop` is set, calling `wake` for each
    /// notification and at least every `tick` (so a notification lost while the
    /// connection was down costs at most a tick). Blocking: run it on a thread of its
    /// own. It keeps one of the pool's connections; a broken connection is replaced.
    pub fn listen_wake(
        &self,
        stop: Arc<AtomicBool>,
        tick: Duration,
        wake: impl Fn() + Send + Sync,
    ) {
        let Ok(Some(pg)) = self.pg() else {
            return;
        };
        while !stop.load(Ordering::Acquire) {
            let r = pg.with_client(|c| {
                c.batch_execute(&format!("LISTEN {WAKE_CHANNEL}"))?;
                while !stop.load(Ordering::Acquire) {
                    let mut n = c.notifications();
                    let mut it = n.timeout_iter(tick);
                    // A notification or the tick: either way the workers look again.
                    it.next()?;
                    wake();
                }
                Ok(())
            });
            if let Err(e) = r {
                tracing::warn!(error = %e, "lost the wake-up connection to the database; reconnecting");
                wake();
                std::thread::sleep(tick);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::store::{Backend, PgSettings};

    /// A test's database, dropped when the test ends (after its stores: fields drop in
    /// order).
    struct TestDb(String, String);

    impl Drop for TestDb {
        fn drop(&mut self) {
            if let Ok(mut c) = postgres::Client::connect(&self.0, postgres::NoTls) {
                let _ =
                    c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.1));
            }
        }
    }

    /// Two handles ("instances") on one fresh database, or `None` without PostgreSQL.
    fn two_instances() -> Option<(Store, Store, tempfile::TempDir, TestDb)> {
        let Ok(admin) = std::env::var("OPTOUT_TEST_PG") else {
            eprintln!("skipped: OPTOUT_TEST_PG is not set");
            return None;
        };
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "optout_l_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let mut c = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
        c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        let cfg: postgres::Config = admin.parse().unwrap();
        let url = format!(
            "host=127.0.0.1 port={} user={} dbname={name}",
            cfg.get_ports().first().unwrap_or(&5432),
            cfg.get_user().unwrap_or("postgres")
        );
        let dir = tempfile::tempdir().unwrap();
        let open = |instance: &str| {
            let settings = PgSettings {
                url: optout_core::Secret::new(url.clone()),
                pool_size: 3,
                tls_ca_file: None,
                instance: instance.into(),
                lease: Duration::from_secs(3),
            };
            Store::open_with(dir.path(), &Backend::Postgres(settings)).unwrap()
        };
        let (a, b) = (open("a"), open("b"));
        Some((a, b, dir, TestDb(admin, name)))
    }

    fn info(name: &str) -> InstanceInfo {
        InstanceInfo {
            name: name.into(),
            host: "host".into(),
            pid: 1,
            version: "0".into(),
            started_ms: 0,
        }
    }

    #[test]
    fn one_leader_at_a_time_and_a_lost_lease_fences_its_holder() {
        let Some((a, b, _dir, _db)) = two_instances() else {
            return;
        };
        let short = Duration::from_millis(800);
        let la = a.try_lead("a", short).unwrap().expect("a free lease");
        assert_eq!(la.epoch, 1);
        assert_eq!(b.try_lead("b", short).unwrap(), None, "a holds it");
        assert!(a.renew(&la, short).unwrap());
        a.set_fence(Some((la.holder.clone(), la.epoch)));
        a.transaction(true, |tx| tx.set_cursor("hubspot", "1"))
            .unwrap();

        std::thread::sleep(short + Duration::from_millis(200));
        let lb = b.try_lead("b", Duration::from_secs(10)).unwrap();
        let lb = lb.expect("an expired lease is free");
        assert_eq!(lb.epoch, 2);
        assert!(!a.renew(&la, short).unwrap(), "b holds it now");
        let r = a.transaction(true, |tx| tx.set_cursor("hubspot", "2"));
        assert!(matches!(r, Err(StoreError::Fenced)), "{r:?}");
        assert_eq!(b.cursor("hubspot").unwrap().as_deref(), Some("1"));

        a.heartbeat(&info("a"), "follower").unwrap();
        b.heartbeat(&info("b"), "leader").unwrap();
        let roll = a.roll_call(Duration::from_secs(9)).unwrap().unwrap();
        let lease = roll.lease.expect("the lease");
        assert_eq!((lease.holder.as_str(), lease.epoch), ("b", 2));
        assert!(lease.expires_in_seconds > 5.0, "{lease:?}");
        let leaders: Vec<_> = (roll.instances.iter())
            .map(|i| (i.name.as_str(), i.leader, i.gone))
            .collect();
        assert_eq!(leaders, [("a", false, false), ("b", true, false)]);
        let later = a.roll_call(Duration::ZERO).unwrap().unwrap();
        assert!(later.instances.iter().all(|i| i.gone), "{later:?}");

        b.release(&lb).unwrap();
        let again = a
            .try_lead("a", short)
            .unwrap()
            .expect("a released lease is free");
        assert_eq!(again.epoch, 3);
        drop((a, b));
    }

    #[test]
    fn a_notification_wakes_the_listener() {
        let Some((a, b, _dir, _db)) = two_instances() else {
            return;
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let listener = std::thread::spawn(move || {
            a.listen_wake(flag, Duration::from_secs(30), move || {
                let _ = tx.send(());
            })
        });
        // Until the listener has subscribed, a notification is not delivered: repeat it.
        let woken = (0..50).any(|_| {
            b.notify_wake().unwrap();
            rx.recv_timeout(Duration::from_millis(100)).is_ok()
        });
        assert!(woken, "no wake-up within 5 s");
        stop.store(true, Ordering::Release);
        b.notify_wake().unwrap();
        listener.join().unwrap();
        drop(b);
    }
}
