//! `erase` and `store compact`.
//!
//! `erase` works on the store when this command may open it (the daemon stopped; the
//! store is then compacted at once, so no old copy of the person's data survives in its
//! files), and otherwise asks the running daemon, which compacts at its next start.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use optout_core::Timestamp;
use serde_json::Value;

use super::{existing_store, is_not_running, output, runtime, store_owner};
use crate::app;
use crate::store::StoreError;

pub(super) fn erase(config_path: &Path, id: &str, json: bool) -> Result<ExitCode> {
    let config = app::load_offline(config_path)?;
    existing_store(&config)?;
    let dir = &config.daemon.state_dir;
    let socket = &config.daemon.control_socket;
    let ask = || -> Result<Value> {
        let request = crate::control::Request::Erase { id: id.to_string() };
        Ok(runtime()?.block_on(crate::control::request(socket, &request, |_| {}))?)
    };
    let value = match store_owner(dir, "erase") {
        Ok(()) => match app::open_store(&config) {
            Ok(store) => {
                let engine = app::engine(&config, store);
                let mut done =
                    serde_json::to_value(engine.erase(id, "operator", Timestamp::now())?)?;
                if done["compaction_pending"] == true {
                    if engine.store().is_sled() {
                        drop(engine);
                        crate::store::compact(dir)?;
                    } else {
                        engine.store().compact_in_place()?;
                    }
                    done["compaction_pending"] = false.into();
                }
                done
            }
            Err(StoreError::Open { reason, .. }) if reason.contains("in use") => ask()?,
            Err(e) => return Err(e.into()),
        },
        Err(not_owner) => match ask() {
            Ok(value) => value,
            Err(e) if is_not_running(&e) => return Err(not_owner.into()),
            Err(e) => return Err(e),
        },
    };
    let mut out = std::io::stdout().lock();
    if json {
        output(writeln!(out, "{}", serde_json::to_string_pretty(&value)?))?;
    } else {
        output(print(&mut out, id, &value))?;
    }
    output(out.flush())?;
    Ok(ExitCode::SUCCESS)
}

/// An erasure's answer for people.
fn print(o: &mut impl Write, id: &str, v: &Value) -> std::io::Result<()> {
    let text = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let when = v["erased_at"]
        .as_i64()
        .map(|t| Timestamp(t).to_rfc3339())
        .unwrap_or_default();
    let kept = if v["suppressed"] == true {
        "stays opted out of all messages wherever the number or id shows up again"
    } else {
        "was not opted out; the tombstones only record the erasure"
    };
    if v["subject"].is_null() {
        return writeln!(o, "{id}: not known; nothing to erase");
    }
    if v["already_erased"] == true {
        return writeln!(
            o,
            "{id}: already erased on {when} ({}); {kept}",
            text("subject")
        );
    }
    writeln!(
        o,
        "{id}: erased subject {} at {when}: {} audit entries scrubbed, {} records forgotten, {} pending events or replies dropped, {} held opt-ins dropped, {} quarantined bodies removed",
        text("subject"),
        v["audit_entries_scrubbed"],
        v["records_forgotten"],
        v["pushes_dropped"],
        v["holds_dropped"],
        v["bodies_removed"],
    )?;
    let stones = v["tombstones"].as_array().map_or(0, Vec::len);
    writeln!(o, "  {kept} ({stones} tombstones)")?;
    if v["compaction_pending"] == true {
        writeln!(
            o,
            "  old copies remain in the store's files until the daemon's next start, which compacts the store"
        )?;
    } else {
        writeln!(
            o,
            "  the store was compacted: no old copy remains in its files"
        )?;
    }
    Ok(())
}

/// `store compact`: the daemon must be stopped (sled's lock says so otherwise).
pub(super) fn compact(config_path: &Path) -> Result<ExitCode> {
    let config = app::load_offline(config_path)?;
    existing_store(&config)?;
    store_owner(&config.daemon.state_dir, "store compact")?;
    let c = match &config.store {
        crate::store::Backend::Sled => crate::store::compact(&config.daemon.state_dir)?,
        // PostgreSQL compacts in place, with the daemons running (the table is locked
        // meanwhile).
        backend => {
            crate::store::Store::open_with(&config.daemon.state_dir, backend)?.compact_in_place()?
        }
    };
    println!(
        "compacted the store: {} entries, {} → {} bytes, in {} ms",
        c.entries, c.bytes_before, c.bytes_after, c.millis
    );
    Ok(ExitCode::SUCCESS)
}
