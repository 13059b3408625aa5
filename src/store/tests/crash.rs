//! Atomicity and durability under SIGKILL, on either engine: a child process (a test of
//! this binary) writes and prints what it acknowledged; the parent kills it at seeded
//! moments and checks the store it opens afterwards. On PostgreSQL the child opens the
//! parent's database (its name in `OPTOUT_CRASH_PG`).

use super::suite::{PAGE, engine_over, page};
use super::*;
use crate::store::testing::PgDb;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

on_both!(
    sigkill_during_writes_keeps_whole_pages_only,
    acknowledged_inbox_entries_survive_sigkill,
    acknowledged_inbox_entries_survive_sigkill_under_concurrent_writes,
);

/// The store of a child process: the directory in `env`, and the parent's PostgreSQL
/// database if it has one. `None` outside a child.
fn child_store(env: &str) -> Option<Store> {
    let dir = std::env::var(env).ok()?;
    let pg = std::env::var("OPTOUT_CRASH_PG")
        .ok()
        .map(|n| PgDb::existing(&n));
    let backend = match &pg {
        Some(db) => Backend::Postgres(db.settings("crash-child", 4)),
        None => Backend::Sled,
    };
    Some(Store::open_with(Path::new(&dir), &backend).unwrap())
}

/// Starts the test `child` of this binary on the store of `o` (its directory in `env`).
fn spawn_child(o: &Opener, child: &str, env: &str) -> Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", child, "--nocapture", "--test-threads=1"])
        .env(env, o.dir())
        .env_remove("OPTOUT_CRASH_PG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(db) = o.pg() {
        cmd.env("OPTOUT_CRASH_PG", db.name());
    }
    cmd.spawn().unwrap()
}

/// The writer half of the page crash test: runs only as a child process.
#[test]
fn crash_child_writer() {
    let Some(store) = child_store("OPTOUT_CRASH_CHILD_DIR") else {
        return;
    };
    let e = engine_over(store);
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
fn sigkill_during_writes_keeps_whole_pages_only(o: &Opener) {
    let mut seed: u64 = 0x0005_eed0_f0b7;
    let mut acknowledged: Option<usize> = None;
    for round in 0..5 {
        let mut child = spawn_child(
            o,
            "store::tests::crash::crash_child_writer",
            "OPTOUT_CRASH_CHILD_DIR",
        );
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
        let acked = acknowledged.expect("the child committed pages");
        check_whole_pages(&engine_over(o.open()), round, acked);
    }
}

/// Every page up to the cursor is whole, nothing after it is visible, counts agree.
fn check_whole_pages(e: &crate::reconcile::Engine, round: usize, acked: usize) {
    let cursor: usize = (e.store().cursor("crm").unwrap())
        .expect("a cursor")
        .parse()
        .unwrap();
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
        let link = (e.store())
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

/// The writer half of the inbox crash test: runs only as a child process.
#[test]
fn crash_child_inbox_writer() {
    let Some(store) = child_store("OPTOUT_CRASH_INBOX_DIR") else {
        return;
    };
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
fn acked_inbox_entries_survive_kills(o: &Opener, child: &str, env: &str, rounds: u64) {
    let mut acked: Vec<u64> = Vec::new();
    for round in 0..rounds {
        let mut proc = spawn_child(o, child, env);
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
        let store = o.open();
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
fn acknowledged_inbox_entries_survive_sigkill(o: &Opener) {
    acked_inbox_entries_survive_kills(
        o,
        "store::tests::crash::crash_child_inbox_writer",
        "OPTOUT_CRASH_INBOX_DIR",
        5,
    );
}

/// The writer half of the concurrent crash test: webhook appends while pages are applied.
#[test]
fn crash_child_concurrent_writer() {
    let Some(store) = child_store("OPTOUT_CRASH_CONC_DIR") else {
        return;
    };
    let e = std::sync::Arc::new(engine_over(store));
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
fn acknowledged_inbox_entries_survive_sigkill_under_concurrent_writes(o: &Opener) {
    acked_inbox_entries_survive_kills(
        o,
        "store::tests::crash::crash_child_concurrent_writer",
        "OPTOUT_CRASH_CONC_DIR",
        20,
    );
}
