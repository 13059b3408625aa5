//! Migration: every tree arrives whole, ids keep increasing past the source's, the
//! verifier finds a single differing value, and a target that is not empty or a source
//! still in use is refused with nothing written.

use super::*;
use crate::audit::{AuditEntry, AuditKind};
use optout_core::Timestamp;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

/// A store with cursors, counts, aliases, audit entries (more than one batch) and the
/// per-database meta entries that must stay behind; returns the last audit sequence.
fn seeded(dir: &Path) -> u64 {
    let s = Store::open(dir).unwrap();
    let mut last = 0;
    for i in 0..60 {
        last = s
            .transaction(true, |tx| {
                tx.set_cursor("hubspot", &format!("c-{i}"))?;
                tx.count("people", 1)?;
                for j in 0..100 {
                    tx.put_alias(&format!("wa:{i}-{j}"), i * 100 + j)?;
                }
                let mut a = AuditEntry::new(AuditKind::Accepted, "hubspot", Timestamp(i as i64));
                a.evidence = Some(format!("entry {i}"));
                tx.audit(&a, &[7])
            })
            .unwrap();
    }
    s.transaction(true, |tx| tx.request_compaction()).unwrap();
    s.save_high_water().unwrap();
    last
}

fn no_progress() -> impl FnMut(Progress<'_>) {
    |_| {}
}

#[test]
fn a_copy_carries_every_tree_verifies_and_hands_out_higher_ids() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let last = seeded(a.path());
    let (source, target) = (Db::open(a.path()).unwrap(), Db::open(b.path()).unwrap());
    let mut seen = Vec::new();
    let mut record = |p: Progress<'_>| {
        if p.phase == "copying" {
            seen.push(p.done)
        }
    };
    let done = run(&source, &target, Direction::Sled, &mut record).unwrap();
    assert!(done.verified, "{:?}", done.trees);
    assert_eq!(done.trees.len(), TREES.len());
    let aliases = &done.trees[super::super::ALIASES];
    assert_eq!(
        (aliases.source_entries, aliases.target_entries),
        (6000, 6000)
    );
    // 6,000 aliases are two batches; progress only grows.
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]) && seen.len() >= 2,
        "{seen:?}"
    );
    // Per-database entries stay behind: the target asks for no compaction.
    assert!(
        target.trees[META]
            .get(super::super::erasure::COMPACT_PENDING)
            .unwrap()
            .is_none()
    );
    write_marker(b.path(), &target).unwrap();
    drop((source, target));

    let s = Store::open(b.path()).unwrap();
    assert_eq!(s.cursor("hubspot").unwrap().as_deref(), Some("c-59"));
    assert_eq!(s.counts().unwrap(), vec![("people".to_string(), 60)]);
    let next = s
        .transaction(true, |tx| {
            tx.audit(
                &AuditEntry::new(AuditKind::Accepted, "x", Timestamp(99)),
                &[7],
            )
        })
        .unwrap();
    assert!(
        next > last,
        "a new audit entry {next} must follow the copied {last}"
    );
}

#[test]
fn the_verifier_finds_one_value_that_differs() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    seeded(a.path());
    let (source, target) = (Db::open(a.path()).unwrap(), Db::open(b.path()).unwrap());
    assert!(
        run(&source, &target, Direction::Sled, &mut no_progress())
            .unwrap()
            .verified
    );

    let (key, _) = target.trees[super::super::ALIASES]
        .iter()
        .nth(1234)
        .unwrap()
        .unwrap();
    target.trees[super::super::ALIASES]
        .insert(&*key, b"other")
        .unwrap();
    let checks = verify(&source, &target, &mut no_progress()).unwrap();
    let bad: Vec<_> = checks.iter().filter(|c| !c.matches).collect();
    assert_eq!(bad.len(), 1, "{checks:?}");
    assert_eq!(bad[0].tree, "aliases");
    assert_eq!(bad[0].source_entries, bad[0].target_entries);
    assert_ne!(bad[0].source_sha256, bad[0].target_sha256);

    // One entry more is a mismatch too.
    target.trees[super::super::ALIASES]
        .insert(&*key, b"x")
        .unwrap();
    target.trees[super::super::CURSORS]
        .insert(b"extra", b"x")
        .unwrap();
    let checks = verify(&source, &target, &mut no_progress()).unwrap();
    let bad: Vec<_> = checks
        .iter()
        .filter(|c| !c.matches)
        .map(|c| c.tree.as_str())
        .collect();
    assert_eq!(bad, ["aliases", "cursors"]);
}

#[test]
fn a_sled_target_that_holds_a_store_and_a_missing_source_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    seeded(dir.path());
    let pg = settings("host=127.0.0.1 port=1 dbname=none".into());
    let err = postgres_to_sled(&pg, dir.path(), &mut no_progress()).unwrap_err();
    assert!(
        matches!(&err, MigrateError::Refused(m) if m.contains("already holds a sled store")),
        "{err}"
    );
    let empty = tempfile::tempdir().unwrap();
    let err = sled_to_postgres(empty.path(), &pg, &mut no_progress()).unwrap_err();
    assert!(
        matches!(&err, MigrateError::Refused(m) if m.contains("no sled store")),
        "{err}"
    );
}

fn settings(url: String) -> PgSettings {
    PgSettings {
        url: optout_core::Secret::new(url),
        pool_size: 4,
        tls_ca_file: None,
        instance: "migrate-test".into(),
        lease: std::time::Duration::from_secs(10),
    }
}

/// A fresh PostgreSQL database (`OPTOUT_TEST_PG` is an admin URL), or `None` outside CI.
fn fresh_pg() -> Option<(PgSettings, postgres::Client)> {
    let Ok(admin) = std::env::var("OPTOUT_TEST_PG") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set OPTOUT_TEST_PG"
        );
        eprintln!("skipped: OPTOUT_TEST_PG is not set");
        return None;
    };
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!("optout_m_{}_{}", std::process::id(), N.fetch_add(1, SeqCst));
    let mut c = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .unwrap();
    c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let mut cfg: postgres::Config = admin.parse().unwrap();
    cfg.dbname(&name);
    let url = format!(
        "host=127.0.0.1 port={} user={} dbname={name}",
        cfg.get_ports().first().unwrap_or(&5432),
        cfg.get_user().unwrap_or("postgres")
    );
    let db = cfg.connect(postgres::NoTls).unwrap();
    Some((settings(url), db))
}

#[test]
fn sled_to_postgres_and_back_keeps_everything_and_refuses_a_used_target() {
    let Some((pg, mut sql)) = fresh_pg() else {
        return;
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let last = seeded(a.path());
    let there = sled_to_postgres(a.path(), &pg, &mut no_progress()).unwrap();
    assert!(there.verified, "{:?}", there.trees);
    assert!(there.entries > 6000);
    // The database now holds a store: a second copy into it is refused.
    let err = sled_to_postgres(a.path(), &pg, &mut no_progress()).unwrap_err();
    assert!(
        matches!(&err, MigrateError::Refused(m) if m.contains("must be empty")),
        "{err}"
    );
    // PostgreSQL's ids continue above the source's.
    let on_pg = Store::open_with(b.path(), &Backend::Postgres(pg.clone())).unwrap();
    let seq = on_pg
        .transaction(true, |tx| {
            tx.audit(
                &AuditEntry::new(AuditKind::Accepted, "x", Timestamp(1)),
                &[7],
            )
        })
        .unwrap();
    assert!(seq > last, "{seq} after {last}");
    drop(on_pg);

    // An instance seen a moment ago may still write: the way back is refused.
    sql.execute(
        "INSERT INTO optout_instances VALUES ('other', 'h', 1, 'v', now(), now(), '')",
        &[],
    )
    .unwrap();
    let err = postgres_to_sled(&pg, b.path(), &mut no_progress()).unwrap_err();
    assert!(
        matches!(&err, MigrateError::Refused(m) if m.contains("other")),
        "{err}"
    );
    sql.execute(
        "UPDATE optout_instances SET seen_at = now() - interval '1 minute'",
        &[],
    )
    .unwrap();
    let back = postgres_to_sled(&pg, b.path(), &mut no_progress()).unwrap();
    assert!(back.verified, "{:?}", back.trees);
    assert_eq!(
        back.entries,
        there.entries + 2,
        "the audit entry and its index added on PostgreSQL"
    );
    let s = Store::open(b.path()).unwrap();
    assert_eq!(s.cursor("hubspot").unwrap().as_deref(), Some("c-59"));
    let next = s
        .transaction(true, |tx| {
            tx.audit(
                &AuditEntry::new(AuditKind::Accepted, "x", Timestamp(2)),
                &[7],
            )
        })
        .unwrap();
    assert!(next > seq, "{next} after {seq}");
}

#[test]
fn a_sled_store_in_use_is_refused_as_the_source() {
    let dir = tempfile::tempdir().unwrap();
    seeded(dir.path());
    // Another handle holds sled's lock, as the running daemon does.
    let daemon = Store::open(dir.path()).unwrap();
    let pg = settings("host=127.0.0.1 port=1 dbname=none".into());
    let err = sled_to_postgres(dir.path(), &pg, &mut no_progress()).unwrap_err();
    assert!(
        matches!(&err, MigrateError::Refused(m) if m.contains("stop the daemon first")),
        "{err}"
    );
    drop(daemon);
}
