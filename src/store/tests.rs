//! Store tests: reopening, schema checks, corrupt files, and atomicity under SIGKILL.

use super::*;
use crate::identity::Normalizer;
use crate::policy::PolicyConfig;
use crate::reconcile::{Engine, Takes};
use optout_core::{Observation, RecordSnapshot, Status};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn reopen_keeps_committed_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        s.transaction(true, |tx| {
            tx.set_cursor("hubspot", "c-1")?;
            tx.count("all:opted_out", 3)?;
            Ok(())
        })
        .unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(s.cursor("hubspot").unwrap().as_deref(), Some("c-1"));
    assert_eq!(s.counts().unwrap(), vec![("all:opted_out".to_string(), 3)]);
}

#[test]
fn aborted_transaction_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let r: Result<(), _> = s.transaction(true, |tx| {
        tx.set_cursor("hubspot", "c-1")?;
        Err(StoreError::Io("injected".into()).into())
    });
    assert!(r.is_err());
    assert_eq!(s.cursor("hubspot").unwrap(), None);
}

#[test]
fn unknown_schema_version_is_refused_without_changes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("schema_version", "99")
            .unwrap();
        db.open_tree("cursors")
            .unwrap()
            .insert("hubspot", "keep-me")
            .unwrap();
        db.flush().unwrap();
    }
    let err = Store::open(dir.path()).err().expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("schema version 99") && msg.contains("understands 1"),
        "{msg}"
    );
    let db = sled::open(dir.path()).unwrap();
    assert_eq!(
        &*db.open_tree("cursors")
            .unwrap()
            .get("hubspot")
            .unwrap()
            .unwrap(),
        b"keep-me"
    );
}

#[test]
fn data_without_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("subjects").unwrap().insert("x", "y").unwrap();
        db.flush().unwrap();
    }
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Corrupt(_))
    ));
}

#[test]
fn unknown_value_format_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let mut v = vec![42u8];
    v.extend_from_slice(b"{}");
    s.tree(SUBJECTS, |t| t.insert(7u64.to_be_bytes(), v))
        .unwrap();
    let err = s.subject(7).unwrap_err().to_string();
    assert!(err.contains("value format 42"), "{err}");
}

#[test]
fn corrupt_files_are_an_error_not_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        s.transaction(true, |tx| tx.set_cursor("hubspot", "c-1"))
            .unwrap();
    }
    // Overwrite the middle of every data file with garbage.
    for entry in walk(dir.path())
        .into_iter()
        .filter(|p| !p.ends_with(MARKER))
    {
        let mut bytes = std::fs::read(&entry).unwrap();
        if bytes.len() > 64 {
            let mid = bytes.len() / 2;
            for b in bytes.iter_mut().skip(16).take(mid) {
                *b = 0xA5;
            }
            std::fs::write(&entry, bytes).unwrap();
        }
    }
    let err = Store::open(dir.path())
        .err()
        .expect("a damaged store must not open as empty");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

const PAGE: usize = 40;

fn crash_engine(dir: &Path) -> Engine {
    Engine::new(
        Store::open(dir).unwrap(),
        PolicyConfig::default(),
        Normalizer::new(Normalizer::parse_region("US").unwrap()),
        BTreeMap::from([("crm".to_string(), Takes::Records)]),
    )
}

fn page(n: usize) -> Vec<Observation> {
    (0..PAGE)
        .map(|i| {
            Observation::Record(RecordSnapshot {
                record: format!("rec-{n}-{i}"),
                phones: vec![format!("+14155{:06}", n * PAGE + i)],
                value: Some(Status::OptedOut),
                marketing: None,
                changed_at: None,
                modified_at: Timestamp::from_secs(1_700_000_000 + n as i64),
                evidence: "consent=opted_out".into(),
            })
        })
        .collect()
}

/// The writer half of the crash test: runs only as a child process.
#[test]
fn crash_child_writer() {
    let Ok(dir) = std::env::var("OPTOUT_CRASH_CHILD_DIR") else {
        return;
    };
    let e = crash_engine(Path::new(&dir));
    let start: usize = e
        .store()
        .cursor("crm")
        .unwrap()
        .map(|c| c.parse::<usize>().unwrap() + 1)
        .unwrap_or(0);
    for n in start.. {
        e.apply_page("crm", &page(n), Some(&n.to_string()), Timestamp::now())
            .unwrap();
        println!("committed {n}");
    }
}

/// Kills a writer with SIGKILL at seeded moments while pages are being committed, then
/// checks every acknowledged page is whole and no partial page is visible.
#[test]
fn sigkill_during_writes_keeps_whole_pages_only() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut seed: u64 = 0x0005_eed0_f0b7;
    let mut acknowledged: Option<usize> = None;
    for round in 0..5 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "store::tests::crash_child_writer",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("OPTOUT_CRASH_CHILD_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let kill_after = 3 + (seed >> 33) as usize % 25;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        while let Some(Ok(line)) = lines.next() {
            if let Some(n) = line.strip_prefix("committed ") {
                acknowledged = Some(n.parse().unwrap());
                seen += 1;
                if seen >= kill_after {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL, mid-way through the next page
        child.wait().unwrap();

        let e = crash_engine(dir.path());
        let cursor: usize = e
            .store()
            .cursor("crm")
            .unwrap()
            .expect("a cursor")
            .parse()
            .unwrap();
        let acked = acknowledged.expect("the child committed pages");
        assert!(
            cursor >= acked,
            "round {round}: acknowledged page {acked} lost (cursor {cursor})"
        );
        for n in 0..=cursor {
            for i in 0..PAGE {
                let link = e.store().link("crm", &format!("rec-{n}-{i}")).unwrap();
                assert!(
                    link.is_some(),
                    "round {round}: page {n} is missing record {i}"
                );
            }
        }
        for i in 0..PAGE {
            let link = e
                .store()
                .link("crm", &format!("rec-{}-{i}", cursor + 1))
                .unwrap();
            assert!(
                link.is_none(),
                "round {round}: part of uncommitted page {} is visible",
                cursor + 1
            );
        }
        let n = ((cursor + 1) * PAGE) as i64;
        assert_eq!(
            e.store().counts().unwrap(),
            vec![("all:opted_out".to_string(), n), ("people".to_string(), n)]
        );
    }
}

#[tokio::test]
async fn inbox_sequence_numbers_start_above_zero() {
    // A cursor of 0 means "nothing read"; an entry numbered 0 would never be read.
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let seq = s.inbox_append(Timestamp::now(), b"{}").await.unwrap();
    assert!(seq > 0);
    assert_eq!(s.inbox_after(0, 10).unwrap().len(), 1);
}

#[test]
fn counts_follow_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let e = crash_engine(dir.path());
    let r = e
        .apply_page("crm", &page(0), Some("0"), Timestamp::now())
        .unwrap();
    assert_eq!(r.decisions.len(), PAGE);
    assert_eq!(
        e.store().counts().unwrap(),
        vec![
            ("all:opted_out".to_string(), PAGE as i64),
            ("people".to_string(), PAGE as i64)
        ]
    );
}

/// The writer half of the inbox crash test: runs only as a child process.
#[test]
fn crash_child_inbox_writer() {
    let Ok(dir) = std::env::var("OPTOUT_CRASH_INBOX_DIR") else {
        return;
    };
    let store = Store::open(Path::new(&dir)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for n in 0u64.. {
            let seq = store
                .inbox_append(Timestamp::now(), format!("body {n}").as_bytes())
                .await
                .unwrap();
            println!("acked {seq}");
        }
    });
}

/// Runs `child` (a test of this binary printing `acked <seq>` per acknowledged append)
/// `rounds` times, SIGKILLs it after a varying number of acknowledgements, and checks that
/// every acknowledged inbox entry is present after each reopen.
fn acked_inbox_entries_survive_kills(child: &str, env: &str, rounds: u64) {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked: Vec<u64> = Vec::new();
    for round in 0..rounds {
        let mut proc = Command::new(&exe)
            .args(["--exact", child, "--nocapture", "--test-threads=1"])
            .env(env, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(proc.stdout.take().unwrap()).lines();
        let stop_after = 1 + (round * 7) % 13;
        let mut n = 0;
        while let Some(Ok(line)) = lines.next() {
            if let Some(seq) = line.strip_prefix("acked ") {
                acked.push(seq.parse().unwrap());
                n += 1;
                if n >= stop_after {
                    break;
                }
            }
        }
        proc.kill().unwrap(); // SIGKILL
        proc.wait().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let present: Vec<u64> = store
            .inbox_after(0, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        let lost: Vec<_> = acked.iter().filter(|s| !present.contains(s)).collect();
        assert!(
            lost.is_empty(),
            "round {round}: acknowledged inbox entries lost: {lost:?} of {}",
            acked.len()
        );
    }
}

/// Every webhook body acknowledged (appended and flushed) survives a SIGKILL.
#[test]
fn acknowledged_inbox_entries_survive_sigkill() {
    acked_inbox_entries_survive_kills(
        "store::tests::crash_child_inbox_writer",
        "OPTOUT_CRASH_INBOX_DIR",
        5,
    );
}

/// The writer half of the concurrent crash test: webhook appends while pages are applied.
#[test]
fn crash_child_concurrent_writer() {
    let Ok(dir) = std::env::var("OPTOUT_CRASH_CONC_DIR") else {
        return;
    };
    let e = std::sync::Arc::new(crash_engine(Path::new(&dir)));
    let e2 = e.clone();
    std::thread::spawn(move || {
        for n in 0.. {
            e2.apply_page(
                "crm",
                &page(n % 1000),
                Some(&n.to_string()),
                Timestamp::now(),
            )
            .unwrap();
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for n in 0u64.. {
            let seq = e
                .store()
                .inbox_append(Timestamp::now(), format!("body {n}").as_bytes())
                .await
                .unwrap();
            println!("acked {seq}");
        }
    });
}

/// Acknowledged webhook bodies survive SIGKILL while other threads commit pages.
#[test]
fn acknowledged_inbox_entries_survive_sigkill_under_concurrent_writes() {
    acked_inbox_entries_survive_kills(
        "store::tests::crash_child_concurrent_writer",
        "OPTOUT_CRASH_CONC_DIR",
        20,
    );
}

/// Concurrent appends share flushes (group commit) and every one is durable and distinct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_all_stored() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                seqs.push(
                    s.inbox_append(Timestamp::now(), format!("{t}-{i}").as_bytes())
                        .await
                        .unwrap(),
                );
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 400);
    assert_eq!(s.inbox_len(), 400);
    assert!(
        s.shared
            .group
            .flushed
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 400
    );
}

#[test]
fn a_store_that_lost_acknowledged_entries_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = crash_engine(dir.path());
        e.apply_page("crm", &page(0), Some("0"), Timestamp::now())
            .unwrap();
        e.store().save_high_water().unwrap();
        // The mark is idempotent and a reopen with everything present is fine.
        e.store().save_high_water().unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    // Simulate sled dropping the tail of its log: the last audit entries vanish.
    let last = s.tree(AUDIT, |t| t.last()).unwrap().unwrap().0;
    s.tree(AUDIT, |t| t.remove(last)).unwrap();
    s.flush_blocking().unwrap();
    drop(s);
    let err = Store::open(dir.path()).err().expect("refused");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("lost data"), "{err}");
}

/// A failure of sled's own marks the store failing: every call answers at once without
/// touching sled, until `recover` proves it works (here the probe write succeeds).
#[tokio::test]
async fn a_failing_store_refuses_work_until_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let seq = s.inbox_append(Timestamp(1), b"{}").await.unwrap();
    let health = s.health();
    s.note(&StoreError::Io(
        "No space left on device (os error 28)".into(),
    ));
    assert!(health.has_changed().unwrap());
    assert!(s.failure().unwrap().contains("No space left"));
    let err = s.inbox_append(Timestamp(2), b"{}").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(matches!(
        s.inbox_after(0, 10),
        Err(StoreError::Unavailable(_))
    ));
    // A bad value of ours is not a failing store.
    s.note(&StoreError::Corrupt("a bad value".into()));
    assert!(s.failure().unwrap().contains("No space left"));

    tokio::task::spawn_blocking({
        let s = s.clone();
        move || s.recover()
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(s.failure(), None);
    let next = s.inbox_append(Timestamp(3), b"{}").await.unwrap();
    assert!(next > seq);
    assert_eq!(s.inbox_after(0, 10).unwrap().len(), 2);
}

/// Reopening in the process keeps everything made durable and numbers new entries after
/// the old ones (the WhatsApp poll's cursor stays valid).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_keeps_durable_data_and_ordering() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let first = s.inbox_append(Timestamp(1), b"one").await.unwrap();
    let clone = s.clone();
    tokio::task::spawn_blocking(move || clone.reopen())
        .await
        .unwrap()
        .unwrap();
    let second = s.inbox_append(Timestamp(2), b"two").await.unwrap();
    assert!(second > first, "{second} after {first}");
    let bodies: Vec<_> = (s.inbox_after(0, 10).unwrap().into_iter())
        .map(|(_, r)| r.body)
        .collect();
    assert_eq!(bodies, vec![b"one".to_vec(), b"two".to_vec()]);
}

#[tokio::test]
async fn retention_prunes_only_what_is_older_than_the_cutoff() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let (old, new) = (Timestamp(1_000_000), Timestamp(9_000_000));
    s.transaction(true, |tx| {
        assert!(tx.first_sight("whatsapp", "wamid.old", old)?);
        assert!(tx.first_sight("whatsapp", "wamid.new", new)?);
        Ok(())
    })
    .unwrap();
    s.quarantine(old, b"old body", "unusable").await.unwrap();
    s.quarantine(new, b"new body", "unusable").await.unwrap();

    let cutoff = Timestamp(5_000_000);
    assert_eq!(s.prune_seen(cutoff).unwrap(), 1);
    assert_eq!(s.prune_quarantine(cutoff).unwrap(), 1);
    assert_eq!(s.quarantine_len(), 1);
    s.transaction(true, |tx| {
        // The old id is forgotten (a delivery now would count again), the new one kept.
        assert!(!tx.first_sight("whatsapp", "wamid.new", new)?);
        assert!(tx.first_sight("whatsapp", "wamid.old", new)?);
        Ok(())
    })
    .unwrap();
    assert_eq!(s.prune_seen(cutoff).unwrap(), 0);
}

#[test]
fn the_gate_read_follows_merges_and_decodes_only_the_registers() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let mut consent = Consent::default();
    consent.record(&crate::policy::Fact {
        status: Status::OptedOut,
        scope: optout_core::Scope::All,
        at: Timestamp(1_700_000_000_000),
        source: "whatsapp".into(),
        record: "wamid.1".into(),
        signal: optout_core::Signal::Keyword,
        evidence: "STOP".into(),
    });
    let merged = SubjectRecord {
        id: 1,
        aliases: vec!["p:+14155550001".into()],
        merged_into: Some(2),
        ..SubjectRecord::default()
    };
    let live = SubjectRecord {
        id: 2,
        aliases: vec!["p:+14155550002".into()],
        consent: consent.clone(),
        links: vec![("hubspot".into(), "c-1".into())],
        merged_from: vec![1],
        ..SubjectRecord::default()
    };
    s.transaction(true, |tx| {
        tx.put_subject(&merged)?;
        tx.put_subject(&live)?;
        tx.put_alias("p:+14155550001", 1)?;
        tx.put_alias("p:+14155550002", 2)
    })
    .unwrap();
    let want = Some((2, consent));
    assert_eq!(s.consent_by_alias("p:+14155550001").unwrap(), want);
    let both = s
        .consent_reads(|r| {
            ["p:+14155550002", "p:+19995550000"].map(|a| r.consent_by_alias(a).unwrap())
        })
        .unwrap();
    assert_eq!(both, [want, None]);
    assert_eq!(
        s.subject_by_alias("p:+14155550001")
            .unwrap()
            .map(|s| s.consent),
        both[0].clone().map(|(_, c)| c)
    );
}

/// A fresh PostgreSQL database for one test (`OPTOUT_TEST_PG` is an admin URL), or `None`.
fn pg_store_for_test() -> Option<Store> {
    let admin = std::env::var("OPTOUT_TEST_PG").ok()?;
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!("optout_u_{}_{}", std::process::id(), N.fetch_add(1, SeqCst));
    let mut c = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .unwrap();
    c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let mut cfg: postgres::Config = admin.parse().unwrap();
    cfg.dbname(&name);
    let url = format!(
        "host={} port={} user={} dbname={name}",
        "127.0.0.1",
        cfg.get_ports().first().unwrap_or(&5432),
        cfg.get_user().unwrap_or("postgres")
    );
    let settings = PgSettings {
        url: optout_core::Secret::new(url),
        pool_size: 4,
        tls_ca_file: None,
        instance: "test".into(),
        lease: std::time::Duration::from_secs(10),
    };
    let dir = tempfile::tempdir().unwrap();
    Some(Store::open_with(dir.path(), &Backend::Postgres(settings)).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_smoke() {
    let Some(s) = tokio::task::block_in_place(pg_store_for_test) else {
        return;
    };
    s.transaction(true, |tx| {
        tx.set_cursor("hubspot", "c-1")?;
        tx.count("all:opted_out", 3)?;
        tx.count("all:opted_out", 2)?;
        Ok(())
    })
    .unwrap();
    assert_eq!(s.cursor("hubspot").unwrap().as_deref(), Some("c-1"));
    assert_eq!(s.counts().unwrap(), vec![("all:opted_out".to_string(), 5)]);
    for i in 0..2500 {
        s.inbox_append(Timestamp(i), format!("{{\"n\":{i}}}").as_bytes())
            .await
            .unwrap();
    }
    let all = s.inbox_after(0, 5000).unwrap();
    assert_eq!(all.len(), 2500);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    let r: Result<(), _> = s.transaction(true, |tx| {
        tx.set_cursor("hubspot", "c-2")?;
        Err(StoreError::Io("injected".into()).into())
    });
    assert!(r.is_err());
    assert_eq!(s.cursor("hubspot").unwrap().as_deref(), Some("c-1"));
}
