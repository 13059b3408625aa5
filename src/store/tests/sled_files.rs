//! sled's own files: damage, a store written by hand, a log that lost its tail (the
//! marker's high-water mark). PostgreSQL keeps no files of ours and recovers its own log.

use super::suite::{engine_over, page};
use super::*;
use crate::store::testing::raw_sled;

#[test]
fn unknown_schema_version_is_refused_without_changes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = raw_sled(dir.path());
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
        msg.contains("schema version 99") && msg.contains(&format!("understands {SCHEMA_VERSION}")),
        "{msg}"
    );
    let db = raw_sled(dir.path());
    assert_eq!(
        &*db.open_tree("cursors")
            .unwrap()
            .get("hubspot")
            .unwrap()
            .unwrap(),
        b"keep-me"
    );
}

/// Data written without ever being a store (no marker file either).
#[test]
fn foreign_data_without_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = raw_sled(dir.path());
        db.open_tree("subjects").unwrap().insert("x", "y").unwrap();
        db.flush().unwrap();
    }
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Corrupt(_))
    ));
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

#[test]
fn a_store_that_lost_acknowledged_entries_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = engine_over(Store::open(dir.path()).unwrap());
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

/// A store of schema 1 (before compact values) opens, keeps its data and is marked as
/// this schema, durably, so that older builds refuse it from then on.
#[test]
fn a_schema_1_store_is_upgraded_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        s.transaction(true, |tx| tx.set_cursor("hubspot", "kept"))
            .unwrap();
        s.tree(META, |t| t.insert("schema_version", "1")).unwrap();
        s.flush_blocking().unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(s.cursor("hubspot").unwrap().as_deref(), Some("kept"));
    let v = s.tree(META, |t| t.get("schema_version")).unwrap().unwrap();
    assert_eq!(&*v, SCHEMA_VERSION.to_string().as_bytes());
    assert_eq!(SCHEMA_VERSION, 2);
}
