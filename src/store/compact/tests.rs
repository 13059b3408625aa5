//! Compaction: nothing removed survives in the files, everything else does, ids keep
//! increasing, and a crash at any step leaves the old or the new store whole.

use super::*;
use crate::audit::{AuditEntry, AuditKind};
use crate::store::create_state_dir;
use optout_core::Timestamp;

const SECRET: &str = "+14155552671 said STOP PLEASE-erase-me";

/// A store with a cursor, audit entries and a value that was then removed.
fn seeded(dir: &Path) -> u64 {
    let s = Store::open(dir).unwrap();
    let mut last = 0;
    for i in 0..50 {
        last = s
            .transaction(true, |tx| {
                tx.set_cursor("hubspot", &format!("c-{i}"))?;
                tx.count("people", 1)?;
                let mut a = AuditEntry::new(AuditKind::Accepted, "hubspot", Timestamp(i));
                a.evidence = Some(format!("entry {i}"));
                tx.audit(&a, &[7])
            })
            .unwrap();
    }
    s.transaction(true, |tx| {
        tx.put_alias(SECRET, 7)?;
        tx.request_compaction()
    })
    .unwrap();
    s.transaction(true, |tx| tx.remove_alias(SECRET)).unwrap();
    s.save_high_water().unwrap();
    last
}

/// Every byte of every file under `dir` (recursively).
fn raw_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(raw_bytes(&e.path()));
        } else {
            out.extend(std::fs::read(e.path()).unwrap());
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The store opens with everything it held and hands out ids above the old ones.
fn check_intact(dir: &Path, last_seq: u64) {
    let s = Store::open(dir).unwrap();
    assert_eq!(s.cursor("hubspot").unwrap().as_deref(), Some("c-49"));
    assert_eq!(s.audit_from(0).count(), 50);
    assert_eq!(s.audit_seqs_of(&[7]).unwrap().len(), 50);
    let next = s.transaction(true, |tx| tx.new_id()).unwrap();
    assert!(next > last_seq, "{next} <= {last_seq}");
}

#[test]
fn compaction_leaves_no_removed_value_in_the_files_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let last = seeded(dir.path());
    assert!(
        contains(&raw_bytes(dir.path()), SECRET),
        "sled keeps the removed value in its log (the reason compaction exists)"
    );
    assert!(
        Store::open(dir.path())
            .unwrap()
            .compaction_pending()
            .unwrap()
    );
    let (store, c) = compact_if_pending(Store::open(dir.path()).unwrap()).unwrap();
    drop(store);
    let c = c.expect("pending");
    assert!(c.entries >= 100, "{c:?}");
    assert!(!contains(&raw_bytes(dir.path()), SECRET));
    check_intact(dir.path(), last);
    assert!(
        !Store::open(dir.path())
            .unwrap()
            .compaction_pending()
            .unwrap()
    );
    assert_eq!(
        compact_if_pending(Store::open(dir.path()).unwrap())
            .unwrap()
            .1,
        None
    );
    // Twice in a row: the id base keeps growing.
    compact(dir.path()).unwrap();
    check_intact(dir.path(), last);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".compact")),
        "{names:?}"
    );
}

/// The state directory at each point a crash could stop the swap, then `recover`.
#[test]
fn a_crash_at_any_step_leaves_the_old_or_the_new_store_whole() {
    for step in 0..6 {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let last = seeded(d);
        // Not in the state directory's listing: entries this test must never touch.
        std::fs::write(d.join("unrelated.txt"), "keep").unwrap();
        match step {
            // A partial copy without COMPLETE: thrown away, the old store stands.
            0 => {
                create_state_dir(&d.join(NEW_DIR)).unwrap();
                std::fs::write(d.join(NEW_DIR).join("db"), "half a copy").unwrap();
            }
            // The copy complete, nothing moved yet.
            1 => {
                prepare(d).unwrap();
            }
            // Half the old entries moved out.
            2 => {
                prepare(d).unwrap();
                create_state_dir(&d.join(OLD_DIR)).unwrap();
                for name in ["db", MARKER] {
                    std::fs::rename(d.join(name), d.join(OLD_DIR).join(name)).unwrap();
                }
            }
            // All old entries out, OLD_MOVED written, half the new ones in.
            3 | 4 => {
                prepare(d).unwrap();
                create_state_dir(&d.join(OLD_DIR)).unwrap();
                move_entries(d, &d.join(OLD_DIR), store_entry).unwrap();
                std::fs::write(d.join(NEW_DIR).join(OLD_MOVED), "").unwrap();
                if step == 4 {
                    std::fs::rename(d.join(NEW_DIR).join("db"), d.join("db")).unwrap();
                }
            }
            // Everything moved, the old files half deleted, COMPLETE gone.
            _ => {
                prepare(d).unwrap();
                swap(d).unwrap();
                create_state_dir(&d.join(NEW_DIR)).unwrap();
                std::fs::write(d.join(NEW_DIR).join(OLD_MOVED), "").unwrap();
            }
        }
        check_intact(d, last);
        assert!(
            !d.join(NEW_DIR).exists() && !d.join(OLD_DIR).exists(),
            "step {step}"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("unrelated.txt")).unwrap(),
            "keep"
        );
        let compacted = step >= 1;
        assert_eq!(
            !contains(&raw_bytes(d), SECRET),
            compacted,
            "step {step}: the old store stands only where the copy was unfinished"
        );
    }
}

/// The cost of a compaction per person, for the README: `OPTOUT_COMPACT_PEOPLE=1000000
/// cargo test --release --lib compaction_cost -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn compaction_cost() {
    use crate::identity::Normalizer;
    use crate::policy::PolicyConfig;
    use crate::reconcile::{Engine, Takes};
    use optout_core::{Observation, RecordSnapshot, Status};
    let people: u64 = std::env::var("OPTOUT_COMPACT_PEOPLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(
        Store::open(dir.path()).unwrap(),
        PolicyConfig::default(),
        Normalizer::new(Normalizer::parse_region("US").unwrap()),
        [("hubspot".to_string(), Takes::Records)].into(),
    );
    let now = Timestamp::now();
    for page in 0..people.div_ceil(1000) {
        let obs: Vec<Observation> = (0..1000)
            .map(|i| page * 1000 + i)
            .take_while(|n| *n < people)
            .map(|n| {
                Observation::Record(RecordSnapshot {
                    record: n.to_string(),
                    phones: vec![format!("+1 415 {:03} {:04}", 200 + n / 10_000, n % 10_000)],
                    value: Some(Status::OptedOut),
                    marketing: None,
                    changed_at: None,
                    modified_at: Timestamp(now.millis() - 60_000),
                    evidence: "whatsapp_consent=opted_out".into(),
                })
            })
            .collect();
        engine.apply_page("hubspot", &obs, None, now).unwrap();
    }
    drop(engine);
    let c = compact(dir.path()).unwrap();
    println!(
        "{people} people: {} entries, {} → {} bytes, {} ms ({:.1} s per million people)",
        c.entries,
        c.bytes_before,
        c.bytes_after,
        c.millis,
        c.millis as f64 / people as f64 * 1000.0
    );
}

/// Not a test on its own: compacts the store in `OPTOUT_COMPACT_CHILD_DIR` over and over,
/// for the SIGKILL test below.
#[test]
fn compact_crash_child() {
    let Ok(dir) = std::env::var("OPTOUT_COMPACT_CHILD_DIR") else {
        return;
    };
    loop {
        let c = compact(Path::new(&dir)).unwrap();
        // Its duration, for the parent to aim inside the next one.
        println!("compacted {}", c.millis.max(1));
    }
}

/// SIGKILLs a process at seeded moments while it compacts; the store opens whole every
/// time, with everything it held.
#[test]
fn sigkill_during_compaction_leaves_a_whole_store() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let last = seeded(dir.path());
    let exe = std::env::current_exe().unwrap();
    let mut seed: u64 = 0x00c0_ffee_0b7c;
    let mut interrupted = 0;
    for _ in 0..16 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "store::compact::tests::compact_crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("OPTOUT_COMPACT_CHILD_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut millis = 0;
        for _ in 0..1 + (seed >> 33) % 3 {
            millis = (lines.by_ref().map_while(Result::ok))
                .find_map(|l| l.strip_prefix("compacted ")?.parse::<u64>().ok())
                .expect("the child compacts");
        }
        // A moment inside the next compaction, as long as the last one took.
        std::thread::sleep(std::time::Duration::from_micros(
            (seed >> 20) % (millis * 1000),
        ));
        child.kill().unwrap();
        child.wait().unwrap();
        interrupted += usize::from(dir.path().join(NEW_DIR).exists());
        check_intact(dir.path(), last);
    }
    assert!(!dir.path().join(NEW_DIR).exists());
    eprintln!("{interrupted} of 16 kills interrupted a compaction");
    assert!(interrupted > 0, "no kill landed inside a compaction");
}
