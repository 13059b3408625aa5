//! `store migrate --to postgres|sled`: moves the store between sled (in
//! `daemon.state_dir`) and the PostgreSQL database of the `[store]` table, with the daemon
//! stopped, and shows the verification pass (see `store/migrate.rs`).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::{Refused, existing_store, output, store_owner};
use crate::app;
use crate::store::migrate::{self, Direction, MigrateError, Migrated, Progress};
use crate::store::{Backend, StoreError};

/// How often a long copy reports on stderr.
const EVERY: Duration = Duration::from_secs(2);

pub(super) fn migrate(config_path: &Path, to: Direction, json: bool) -> Result<ExitCode> {
    let config = app::load_offline(config_path)?;
    let Backend::Postgres(pg) = &config.store else {
        return Err(Refused(
            "store migrate copies between sled in daemon.state_dir and the PostgreSQL database of the [store] table: set `backend = \"postgres\"` and `url` there (with --to postgres, before starting the daemon on it)".into(),
        )
        .into());
    };
    let dir = &config.daemon.state_dir;
    let mut phase = ("", Instant::now());
    let mut last = Instant::now();
    let mut progress = |p: Progress<'_>| {
        if phase.0 != p.phase {
            phase = (p.phase, Instant::now());
        }
        if last.elapsed() >= EVERY {
            last = Instant::now();
            let rate = p.done as f64 / phase.1.elapsed().as_secs_f64().max(0.001);
            eprintln!("{}: {} entries ({}), {rate:.0}/s", p.phase, p.done, p.tree);
        }
    };
    let done = match to {
        Direction::Postgres => {
            existing_store(&config)?;
            store_owner(dir, "store migrate")?;
            migrate::sled_to_postgres(dir, pg, &mut progress)
        }
        Direction::Sled => {
            store_owner(dir, "store migrate")?;
            migrate::postgres_to_sled(pg, dir, &mut progress)
        }
    };
    let done = done.map_err(|e| match e {
        MigrateError::Refused(why) => anyhow::Error::new(Refused(why)),
        MigrateError::Store(e) => interrupted(e, to),
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        output(writeln!(out, "{}", serde_json::to_string_pretty(&done)?))?;
    } else {
        output(print(&mut out, &done))?;
    }
    output(out.flush())?;
    Ok(if done.verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A failure during the copy leaves a partial target, which every open refuses (it has no
/// schema version): say what to do with it.
fn interrupted(e: StoreError, to: Direction) -> anyhow::Error {
    let target = match to {
        Direction::Postgres => "the PostgreSQL database",
        Direction::Sled => "daemon.state_dir",
    };
    anyhow::Error::new(e).context(format!(
        "store migrate failed; whatever it copied into {target} is refused by the daemon (no schema version): empty it before running again"
    ))
}

/// The verification table for people.
fn print(o: &mut impl Write, m: &Migrated) -> std::io::Result<()> {
    let to = match m.to {
        Direction::Postgres => "sled → PostgreSQL",
        Direction::Sled => "PostgreSQL → sled",
    };
    let secs = m.copy_millis as f64 / 1000.0;
    writeln!(
        o,
        "copied {} entries ({to}) in {secs:.1} s ({:.0} entries/s); verified in {:.1} s",
        m.entries,
        m.entries as f64 / secs.max(0.001),
        m.verify_millis as f64 / 1000.0
    )?;
    writeln!(
        o,
        "{:<14} {:>10} {:>10}  checksum",
        "tree", "source", "target"
    )?;
    for t in &m.trees {
        let check = if t.matches {
            format!("match {}", &t.source_sha256[..16])
        } else {
            format!(
                "MISMATCH {} ≠ {}",
                &t.source_sha256[..16],
                &t.target_sha256[..16]
            )
        };
        writeln!(
            o,
            "{:<14} {:>10} {:>10}  {check}",
            t.tree, t.source_entries, t.target_entries
        )?;
    }
    if m.verified {
        writeln!(o, "every tree matches")
    } else {
        writeln!(
            o,
            "the copy does NOT match its source; the target was left unusable (no schema version): empty it and run again"
        )
    }
}
