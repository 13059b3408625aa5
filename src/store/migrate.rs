//! `store migrate`: copies the store from one engine to the other (sled in the state
//! directory, and the configured PostgreSQL database), then proves the copy.
//!
//! Nothing may write either side meanwhile: sled's lock keeps the daemon out of a sled
//! store, an instance that reported itself to the PostgreSQL database in the last
//! [`LIVE_WITHIN_SECS`] seconds refuses a PostgreSQL source, and the target must hold no
//! store data at all (there is no `--force`: an operator empties it deliberately).
//!
//! The copy takes every tree's current entries in key order, in atomic batches of
//! [`BATCH`] entries, each made durable before the next. Meta entries that describe one database's life (the id
//! base, a pending compaction, the health probe) stay behind; instead the target's id
//! generator is set above every id the source handed out. The schema version is written
//! last: a copy interrupted before it leaves a target that every open refuses ("data
//! present but no schema version") instead of a store that silently lacks data.
//!
//! The verification pass then reads both sides again: per tree, the entries and a SHA-256
//! over the key/value pairs in key order (both engines order keys bytewise). On any
//! mismatch the schema version is taken off the target again, so it is never used.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::compact::{ID_BASE, NOT_COPIED, store_entry};
use super::kv::{Engine, KvIter, Tree};
use super::{Backend, Db, MARKER, META, PgSettings, SCHEMA_VERSION, Store, StoreError, TREES};

/// Entries written per transaction.
pub const BATCH: usize = 5_000;
/// An instance seen this recently on the PostgreSQL side may still be running.
pub const LIVE_WITHIN_SECS: i32 = 30;
const SCHEMA_KEY: &[u8] = b"schema_version";

/// Which way a migration goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// sled in the state directory → the PostgreSQL database.
    Postgres,
    /// The PostgreSQL database → a new sled store in the state directory.
    Sled,
}

/// Why a migration did not start, or what failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The sides are not ready (a daemon running, a target that is not empty, no source):
    /// nothing was written.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One tree on both sides after the copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TreeCheck {
    pub tree: String,
    pub source_entries: u64,
    pub target_entries: u64,
    pub source_sha256: String,
    pub target_sha256: String,
    /// Same entries and same checksum.
    pub matches: bool,
}

/// What a migration did.
#[derive(Clone, Debug, Serialize)]
pub struct Migrated {
    pub to: Direction,
    /// Entries copied (every tree).
    pub entries: u64,
    /// Time spent copying (without the verification pass).
    pub copy_millis: u64,
    pub verify_millis: u64,
    pub trees: Vec<TreeCheck>,
    /// Every tree matches; otherwise the target was left unusable (no schema version).
    pub verified: bool,
}

/// What a long migration reports as it goes (every batch).
#[derive(Clone, Copy, Debug)]
pub struct Progress<'a> {
    /// `"copying"` or `"verifying"`.
    pub phase: &'static str,
    pub tree: &'a str,
    /// Entries done so far in this phase (every tree).
    pub done: u64,
}

/// Copies the sled store in `dir` into the (empty) PostgreSQL database `pg`.
pub fn sled_to_postgres(
    dir: &Path,
    pg: &PgSettings,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Migrated, MigrateError> {
    if !has_sled_store(dir) {
        return Err(MigrateError::Refused(format!(
            "there is no sled store in {} (daemon.state_dir) to migrate",
            dir.display()
        )));
    }
    // Opening checks the schema and that no acknowledged data was lost, finishes an
    // interrupted compaction, and takes sled's lock (refused while the daemon runs).
    let store = Store::open(dir).map_err(in_use)?;
    let source = store.db()?;
    let target = Db::open_backend(dir, &Backend::Postgres(pg.clone()))?;
    refuse_unless_empty(&target, "the PostgreSQL database (store.url)")?;
    run(&source, &target, Direction::Postgres, progress)
}

/// Copies the PostgreSQL database `pg` into a new sled store in `dir`.
pub fn postgres_to_sled(
    pg: &PgSettings,
    dir: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Migrated, MigrateError> {
    if has_sled_store(dir) {
        return Err(MigrateError::Refused(format!(
            "{} (daemon.state_dir) already holds a sled store; the target must be new: move it away first",
            dir.display()
        )));
    }
    let source = Db::open_backend(dir, &Backend::Postgres(pg.clone()))?;
    check_pg_source(&source)?;
    super::create_state_dir(dir)
        .map_err(|e| StoreError::Io(format!("creating {}: {e}", dir.display())))?;
    let target = Db::open(dir).map_err(in_use)?;
    refuse_unless_empty(&target, &dir.display().to_string())?;
    let done = run(&source, &target, Direction::Sled, progress)?;
    if done.verified {
        write_marker(dir, &target)?;
    }
    Ok(done)
}

/// Whether `dir` holds sled's files or the store's marker.
fn has_sled_store(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| store_entry(&e.file_name().to_string_lossy()))
    })
}

/// sled's lock held by another process is a refusal (the daemon runs), not a failure.
fn in_use(e: StoreError) -> MigrateError {
    match e {
        StoreError::Open { path, reason } if reason.contains("in use") => MigrateError::Refused(
            format!("the sled store in {path} is in use: stop the daemon first"),
        ),
        other => MigrateError::Store(other),
    }
}

fn refuse_unless_empty(target: &Db, shown: &str) -> Result<(), MigrateError> {
    for (tree, name) in target.trees.iter().zip(TREES) {
        if !tree.is_empty()? {
            return Err(MigrateError::Refused(format!(
                "{shown} already holds store data (tree `{name}`); the target of a migration must be empty, so that nothing in it is overwritten or mixed with the copy: empty it (or use a new database or state directory) and run again"
            )));
        }
    }
    Ok(())
}

/// A PostgreSQL source must hold a store of this schema and no live instance.
fn check_pg_source(source: &Db) -> Result<(), MigrateError> {
    let Engine::Pg(pg) = &source.db else {
        unreachable!("opened on PostgreSQL")
    };
    let live: Vec<String> = pg.with_client(|c| {
        let rows = c.query(
            "SELECT name FROM optout_instances \
             WHERE seen_at > now() - make_interval(secs => $1) ORDER BY name",
            &[&f64::from(LIVE_WITHIN_SECS)],
        )?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    })?;
    if !live.is_empty() {
        return Err(MigrateError::Refused(format!(
            "instances of the daemon reported to PostgreSQL database {} within the last {LIVE_WITHIN_SECS} s ({}): stop every instance first, and run again once {LIVE_WITHIN_SECS} s have passed",
            pg.name(),
            live.join(", ")
        )));
    }
    match source.trees[META].get(SCHEMA_KEY)? {
        None => Err(MigrateError::Refused(format!(
            "PostgreSQL database {} holds no store to migrate",
            pg.name()
        ))),
        // An older layout is copied as it is; the daemon upgrades it at its first start.
        Some(v) if !super::schema_opens(&v) => Err(MigrateError::Store(StoreError::Schema {
            path: format!("PostgreSQL database {}", pg.name()),
            found: String::from_utf8_lossy(&v).into_owned(),
            expected: SCHEMA_VERSION,
        })),
        Some(_) => Ok(()),
    }
}

/// The copy, the id floor, the schema version, then the verification pass.
fn run(
    source: &Db,
    target: &Db,
    to: Direction,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Migrated, MigrateError> {
    let started = Instant::now();
    let mut entries = 0;
    for (i, name) in TREES.iter().enumerate() {
        let entries_before = entries;
        let mut report = |n| {
            progress(Progress {
                phase: "copying",
                tree: name,
                done: entries_before + n,
            })
        };
        entries += copy_tree(source, target, i, &mut report)?;
    }
    set_id_floor(source, target)?;
    if let Some(version) = source.trees[META].get(SCHEMA_KEY)? {
        target.trees[META].insert(SCHEMA_KEY, &*version)?;
    }
    target.db.flush()?;
    let copy_millis = started.elapsed().as_millis() as u64;
    let started = Instant::now();
    let trees = verify(source, target, progress)?;
    let verified = trees.iter().all(|t| t.matches);
    if !verified {
        // A target that differs must never be opened as the store.
        target.trees[META].remove(SCHEMA_KEY)?;
        target.db.flush()?;
    }
    Ok(Migrated {
        to,
        entries,
        copy_millis,
        verify_millis: started.elapsed().as_millis() as u64,
        trees,
        verified,
    })
}

/// The entries of tree `i` that a migration carries (meta's per-database entries and the
/// schema version, written last, stay behind).
fn carried(
    db: &Db,
    i: usize,
) -> impl Iterator<Item = Result<(super::kv::Val, super::kv::Val), StoreError>> {
    let all: KvIter = db.trees[i].iter();
    all.filter(move |kv| match kv {
        Ok((k, _)) if i == META => !NOT_COPIED.contains(&&**k) && **k != *SCHEMA_KEY,
        _ => true,
    })
}

/// Copies tree `i` in durable batches; returns the entries copied.
fn copy_tree(
    source: &Db,
    target: &Db,
    i: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, StoreError> {
    let mut n = 0;
    let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(BATCH);
    let mut entries = carried(source, i).peekable();
    while entries.peek().is_some() {
        batch.clear();
        for kv in entries.by_ref().take(BATCH) {
            let (k, v) = kv?;
            batch.push((k.to_vec(), v.to_vec()));
        }
        write_batch(target, i, &batch)?;
        n += batch.len() as u64;
        progress(n);
    }
    Ok(n)
}

fn write_batch(target: &Db, i: usize, batch: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
    match (&target.db, &target.trees[i]) {
        (Engine::Pg(pg), _) => pg_insert_batch(pg, i, batch),
        // One tree at a time: sled's atomic batch, much cheaper than its transactions.
        (Engine::Sled(db), Tree::Sled(tree)) => {
            let mut b = sled::Batch::default();
            for (k, v) in batch {
                b.insert(&k[..], &v[..]);
            }
            tree.apply_batch(b)?;
            db.flush()?;
            Ok(())
        }
        (Engine::Sled(_), Tree::Pg(..)) => unreachable!("a sled engine has sled trees"),
    }
}

/// PostgreSQL: the batch as one statement (a round trip per entry would bound the copy by
/// the network's latency), committed durably. The target is empty, so a plain INSERT.
fn pg_insert_batch(
    pg: &super::kv::pg::Pg,
    i: usize,
    batch: &[(Vec<u8>, Vec<u8>)],
) -> Result<(), StoreError> {
    // The engine numbers trees by their place in `TREES` (see `Engine::trees`).
    let tree = i as i16;
    let (keys, values): (Vec<&[u8]>, Vec<&[u8]>) =
        batch.iter().map(|(k, v)| (&k[..], &v[..])).unzip();
    pg.with_client(|c| {
        let mut tx = c.transaction()?;
        tx.batch_execute("SET LOCAL synchronous_commit TO on")?;
        tx.execute(
            "INSERT INTO optout_kv (tree, key, value) \
             SELECT $1, k, v FROM unnest($2::bytea[], $3::bytea[]) AS u(k, v)",
            &[&tree, &keys, &values],
        )?;
        tx.commit()
    })
}

/// Makes every id the target hands out exceed every id the source handed out.
fn set_id_floor(source: &Db, target: &Db) -> Result<(), StoreError> {
    // The source's next id is above all it gave; taking it costs the source nothing.
    let floor = source.next_id()?;
    match &target.db {
        Engine::Pg(pg) => pg.ensure_ids_above(floor),
        // A new sled store's generator starts at 0: offset it as a compaction does.
        Engine::Sled(_) => target.trees[META].insert(ID_BASE, (floor + 1).to_be_bytes()),
    }
}

/// Per tree: entries and checksum of what was carried, on both sides.
fn verify(
    source: &Db,
    target: &Db,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<TreeCheck>, StoreError> {
    let mut done = 0;
    let mut checks = Vec::with_capacity(TREES.len());
    for (i, name) in TREES.iter().enumerate() {
        let mut report = |n| {
            progress(Progress {
                phase: "verifying",
                tree: name,
                done: done + n,
            })
        };
        let (source_entries, source_sha256) = digest(source, i, &mut report)?;
        let (target_entries, target_sha256) = digest(target, i, &mut |_| {})?;
        done += source_entries;
        checks.push(TreeCheck {
            tree: name.to_string(),
            matches: source_entries == target_entries && source_sha256 == target_sha256,
            source_entries,
            target_entries,
            source_sha256,
            target_sha256,
        });
    }
    Ok(checks)
}

/// Entries and SHA-256 of tree `i` as a migration carries it (plus the schema version):
/// each key and value length-prefixed, in key order.
fn digest(db: &Db, i: usize, progress: &mut dyn FnMut(u64)) -> Result<(u64, String), StoreError> {
    let mut hash = Sha256::new();
    let mut n = 0u64;
    let mut add = |k: &[u8], v: &[u8]| {
        for part in [k, v] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
    };
    for kv in carried(db, i) {
        let (k, v) = kv?;
        add(&k, &v);
        n += 1;
        if n % BATCH as u64 == 0 {
            progress(n);
        }
    }
    // Written last, so it sorts wherever it sorts but is hashed after the rest.
    if i == META
        && let Some(v) = db.trees[META].get(SCHEMA_KEY)?
    {
        add(SCHEMA_KEY, &v);
        n += 1;
    }
    Ok((n, hex::encode(hash.finalize())))
}

/// The marker file a sled store carries once initialised, with how far its audit log
/// reaches (see `Store::check_high_water`).
fn write_marker(dir: &Path, target: &Db) -> Result<(), StoreError> {
    use std::io::Write as _;
    let io = |e: std::io::Error| StoreError::Io(format!("cannot write the store marker: {e}"));
    let mut text = format!("schema {SCHEMA_VERSION}\n");
    if let Some(seq) = Store::last_audit_seq(target)? {
        text += &format!("audit_high {seq}\n");
    }
    let mut f = std::fs::File::create(dir.join(MARKER)).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

#[cfg(test)]
mod tests;
