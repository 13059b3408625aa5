//! What only PostgreSQL has: several instances (here, several `Store`s) on one database,
//! its SQL layout and migrations, and the leader's fence.

use super::*;
use crate::store::testing::PgDb;
use std::sync::atomic::{AtomicBool, AtomicU32};

/// Two instances append webhooks from many tasks while a poll reads after its cursor and
/// moves it on: it must read every acknowledged entry exactly once, in order. An entry
/// that became visible after a higher-numbered one would be skipped for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_from_two_instances_reach_a_polling_reader_once_and_in_order() {
    let Some(o) = Opener::postgres() else {
        return;
    };
    let (a, b) = (o.open_as("a", 8), o.open_as("b", 8));
    let done = Arc::new(AtomicBool::new(false));
    let reader = std::thread::spawn({
        let (r, done) = (a.clone(), done.clone());
        move || {
            let (mut cursor, mut seen) = (0u64, Vec::new());
            loop {
                // Read before the poll: once every append is acknowledged, one more poll
                // must find all of them.
                let finished = done.load(SeqCst);
                let batch = r.inbox_after(cursor, 25).unwrap();
                for (seq, _) in &batch {
                    assert!(*seq > cursor, "{seq} read after cursor {cursor}");
                    cursor = *seq;
                    seen.push(*seq);
                }
                if batch.is_empty() && finished {
                    return seen;
                }
            }
        }
    });
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let s = if t % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..60 {
                    let body = format!("{{\"t\":{t},\"i\":{i}}}");
                    acked.push(s.inbox_append(Timestamp::now(), body.as_bytes()).await);
                }
                acked
            })
        })
        .collect();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap().into_iter().map(Result::unwrap));
    }
    done.store(true, SeqCst);
    let seen = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    acked.sort_unstable();
    assert_eq!(acked.len(), 16 * 60);
    let missed: Vec<_> = acked.iter().filter(|s| !seen.contains(s)).collect();
    assert!(
        missed.is_empty(),
        "the poll skipped {} acknowledged entries: {missed:?}",
        missed.len()
    );
    assert_eq!(seen, acked);
}

/// Transactions of two instances incrementing one count: serialization failures are run
/// again, and the total is exact.
#[test]
fn concurrent_counts_from_two_instances_are_exact() {
    let Some(o) = Opener::postgres() else {
        return;
    };
    let stores = [o.open_as("a", 4), o.open_as("b", 4)];
    std::thread::scope(|scope| {
        for t in 0..8 {
            let s = &stores[t % 2];
            scope.spawn(move || {
                for i in 0..40 {
                    s.transaction(i % 4 == 0, |tx| {
                        tx.count("all:opted_out", 1)?;
                        tx.count("people", 2)?;
                        Ok(())
                    })
                    .unwrap();
                }
            });
        }
    });
    let want = vec![
        ("all:opted_out".to_string(), 320),
        ("people".to_string(), 640),
    ];
    assert_eq!(stores[0].counts().unwrap(), want);
    assert_eq!(stores[1].counts().unwrap(), want);
}

/// A database whose SQL layout is newer than this build's is refused and left alone.
#[test]
fn a_newer_sql_layout_is_refused_without_changes() {
    let Some(o) = Opener::postgres() else {
        return;
    };
    let pg = o.pg().unwrap();
    {
        let s = o.open();
        s.transaction(true, |tx| tx.set_cursor("hubspot", "keep-me"))
            .unwrap();
    }
    let version = |c: &mut postgres::Client| -> i32 {
        c.query_one("SELECT version FROM optout_schema", &[])
            .unwrap()
            .get(0)
    };
    assert_eq!(pg.sql(|c| version(c)), kv::pg::SQL_VERSION);
    let rows = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM optout_kv", &[])
            .unwrap()
            .get(0)
    };
    let before = pg.sql(|c| {
        c.execute("UPDATE optout_schema SET version = 99", &[])
            .unwrap();
        rows(c)
    });
    let cursor = o.raw_get(CURSORS, b"hubspot");
    let err = o.try_open().err().expect("refused");
    assert!(matches!(err, StoreError::Schema { .. }), "{err}");
    assert!(err.to_string().contains("99"), "{err}");
    assert!(err.is_damage());
    assert_eq!(pg.sql(|c| (version(c), rows(c))), (99, before));
    assert_eq!(o.raw_get(CURSORS, b"hubspot"), cursor);
}

/// Instances starting together on an empty database create the layout once.
#[test]
fn instances_starting_together_create_the_layout_once() {
    let Some(o) = Opener::postgres() else {
        return;
    };
    let stores: Vec<Store> = std::thread::scope(|scope| {
        let opening: Vec<_> = (0..4)
            .map(|i| {
                let o = &o;
                scope.spawn(move || o.open_as(&format!("i{i}"), 2))
            })
            .collect();
        opening.into_iter().map(|h| h.join().unwrap()).collect()
    });
    stores[0]
        .transaction(true, |tx| tx.set_cursor("crm", "1"))
        .unwrap();
    for s in &stores {
        assert_eq!(s.cursor("crm").unwrap().as_deref(), Some("1"));
    }
    let n: i64 = o.pg().unwrap().sql(|c| {
        c.query_one("SELECT count(*) FROM optout_schema", &[])
            .unwrap()
            .get(0)
    });
    assert_eq!(n, 1);
}

/// Sets the lease row, as a take-over or a renewal would.
fn set_lease(o: &Opener, holder: &str, epoch: i64, valid_for_secs: i64) {
    o.pg().unwrap().sql(|c| {
        c.execute(
            "INSERT INTO optout_lease (name, holder, epoch, expires_at) \
             VALUES ('leader', $1, $2, now() + make_interval(secs => $3)) \
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, \
             epoch = EXCLUDED.epoch, expires_at = EXCLUDED.expires_at",
            &[&holder, &epoch, &(valid_for_secs as f64)],
        )
        .unwrap();
    });
}

/// A fenced instance commits while the lease is its own, and nothing once a successor
/// took it over or it expired.
#[test]
fn a_fenced_transaction_commits_only_while_the_lease_is_held() {
    let Some(o) = Opener::postgres() else {
        return;
    };
    let s = o.open();
    let cursor = |s: &Store| s.cursor("crm").unwrap();
    let write = |s: &Store, c: &str| {
        s.transaction(true, |tx| {
            tx.set_cursor("crm", c)?;
            tx.count("people", 1)
        })
    };
    set_lease(&o, "a", 7, 60);
    s.set_fence(Some(("a".into(), 7)));
    write(&s, "1").unwrap();
    assert_eq!(cursor(&s).as_deref(), Some("1"));

    // A successor took over (a new epoch).
    set_lease(&o, "b", 8, 60);
    let err = write(&s, "2").unwrap_err();
    assert!(matches!(err, StoreError::Fenced), "{err}");
    assert_eq!(cursor(&s).as_deref(), Some("1"));
    assert_eq!(s.counts().unwrap(), vec![("people".to_string(), 1)]);
    // Losing the lease is not a failing store: reads and webhooks go on.
    assert_eq!(s.failure(), None);

    // Its own lease again, but expired.
    set_lease(&o, "a", 7, -1);
    let err = write(&s, "3").unwrap_err();
    assert!(matches!(err, StoreError::Fenced), "{err}");
    assert_eq!(cursor(&s).as_deref(), Some("1"));

    // Renewed: commits again; without a fence (not the leader's work) always.
    set_lease(&o, "a", 7, 60);
    write(&s, "4").unwrap();
    set_lease(&o, "b", 9, 60);
    s.set_fence(None);
    write(&s, "5").unwrap();
    assert_eq!(cursor(&s).as_deref(), Some("5"));
}

/// A take-over that starts while the old leader's transaction is under way cannot let
/// that transaction commit after it: the take-over waits for it, or it fails fenced.
#[test]
fn a_take_over_and_the_old_leaders_commit_do_not_overlap() {
    let Some(o) = Opener::postgres() else {
        return;
    };
    let s = o.open();
    set_lease(&o, "a", 1, 60);
    s.set_fence(Some(("a".into(), 1)));
    let (in_tx, tries) = (std::sync::Barrier::new(2), AtomicU32::new(0));
    let (committed, seen_at_take_over) = std::thread::scope(|scope| {
        let leader = scope.spawn(|| {
            s.transaction(true, |tx| {
                tx.set_cursor("crm", "old-leader")?;
                if tries.fetch_add(1, SeqCst) == 0 {
                    in_tx.wait(); // the fence was checked: now the successor moves
                    in_tx.wait();
                    // Time for a take-over that did not wait to finish first.
                    std::thread::sleep(std::time::Duration::from_millis(300));
                }
                Ok(())
            })
        });
        in_tx.wait();
        let take_over = scope.spawn(|| {
            set_lease(&o, "b", 2, 60);
            o.raw_get(CURSORS, b"crm")
        });
        in_tx.wait();
        (leader.join().unwrap(), take_over.join().unwrap())
    });
    match committed {
        // Committed: before the take-over, which saw its write once it had the lease.
        Ok(()) => assert!(seen_at_take_over.is_some(), "committed after the take-over"),
        Err(e) => {
            assert!(matches!(e, StoreError::Fenced), "{e}");
            assert_eq!(s.cursor("crm").unwrap(), None);
        }
    }
    s.set_fence(Some(("b".into(), 2)));
    s.transaction(true, |tx| tx.set_cursor("crm", "new"))
        .unwrap();
}

/// Write API requests with the same idempotency keys reach two instances at once: each
/// key is recorded (and its events queued) exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_is_new_once_across_instances() {
    let Some(o) = Opener::postgres() else {
        return;
    };
    let (a, b) = (o.open_as("a", 4), o.open_as("b", 4));
    let claim = |k: usize| KeyClaim {
        key: format!("key-{k}"),
        content: format!("content-{k}"),
        body: format!("{{\"k\":{k}}}").into_bytes(),
    };
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let s = if t % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let mut new = 0;
                for k in 0..30 {
                    let got = s
                        .api_append("api", Timestamp(1), vec![claim(k)])
                        .await
                        .unwrap();
                    new += usize::from(matches!(got[0], Claimed::New(_)));
                }
                new
            })
        })
        .collect();
    let mut new = 0;
    for t in tasks {
        new += t.await.unwrap();
    }
    assert_eq!(new, 30, "each key recorded once");
    assert_eq!(a.inbox_len(), 30);
}

/// A flush makes the log durable past every commit that returned before it (commits are
/// asynchronous; webhooks are acknowledged after a flush). Checked by the server's own
/// positions: its log flushed up to where it had written when the flush began.
#[test]
fn a_flush_reaches_the_disk_past_every_earlier_commit() {
    let Some(o) = Opener::postgres() else {
        return;
    };
    let s = o.open();
    o.pg().unwrap().sql(|c| {
        for i in 0..20 {
            // One statement: a commit of its own, asynchronous.
            s.tree(SEEN, |t| t.insert(format!("k{i}"), [1])).unwrap();
            let written: String = (c.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]))
                .unwrap()
                .get(0);
            s.flush_blocking().unwrap();
            let durable: bool = c
                .query_one(
                    "SELECT pg_current_wal_flush_lsn() >= $1::text::pg_lsn",
                    &[&written],
                )
                .unwrap()
                .get(0);
            assert!(durable, "round {i}: the log was not flushed to {written}");
        }
    });
}

/// TLS: with `sslmode=require` and the server's CA as `tls_ca_file`, the store talks to
/// PostgreSQL over TLS; a CA that did not sign the server's certificate, or none (the
/// public web roots), is refused at open. Needs a server with TLS on, whose admin URL is
/// in `OPTOUT_TEST_PG_TLS` (`scripts/start-postgres.sh PORT --tls` starts one).
#[test]
fn tls_verifies_the_server_against_the_configured_ca() {
    let Some(db) = PgDb::fresh_on("OPTOUT_TEST_PG_TLS") else {
        return;
    };
    let show =
        |what: &'static str| -> String { db.sql(move |c| c.query_one(what, &[]).unwrap().get(0)) };
    assert_eq!(
        show("SHOW ssl"),
        "on",
        "the OPTOUT_TEST_PG_TLS server has TLS off"
    );
    let cert = PathBuf::from(show("SHOW ssl_cert_file"));
    let with_ca = |ca: Option<PathBuf>| {
        let mut s = db.settings("tls-test", 2);
        s.url = optout_core::Secret::new(format!("{} sslmode=require", s.url.expose()));
        s.tls_ca_file = ca;
        Backend::Postgres(s)
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path(), &with_ca(Some(cert.with_file_name("ca.crt"))))
        .expect("the server's CA is trusted");
    store
        .transaction(true, |tx| tx.set_cursor("hubspot", "over-tls"))
        .unwrap();
    let over_tls: i64 = db.sql(|c| {
        c.query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE ssl AND application_name = 'optout-sync tls-test'",
            &[],
        )
        .unwrap()
        .get(0)
    });
    assert!(over_tls >= 1, "no TLS session from the store");
    drop(store);
    // The server's own certificate is no CA of it; the public roots do not know it.
    for ca in [Some(cert.clone()), None] {
        let err = Store::open_with(dir.path(), &with_ca(ca.clone()))
            .err()
            .unwrap_or_else(|| panic!("opened with CA {ca:?}"));
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
    }
}
