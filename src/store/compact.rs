//! Compaction: rewrites the store into a fresh directory so that nothing erased survives
//! in its files.
//!
//! sled is log-structured: a removed or rewritten value stays readable in its segment
//! files until sled happens to reuse the space. After an erasure the store is therefore
//! copied, tree by tree and current values only, into `state_dir/.compact.new`, made
//! durable, and swapped in; the old files are then deleted.
//!
//! The swap cannot be one rename (the state directory itself belongs to systemd's
//! `StateDirectory=`), so it is a short journal of steps, each a rename or a marker file,
//! and [`recover`] (run by every [`Store::open`](super::Store::open)) finishes or undoes
//! an interrupted one:
//!
//! 1. `.compact.new` is built; `COMPLETE` is written into it last. Without `COMPLETE` the
//!    old store was never touched: the partial copy is removed.
//! 2. The old store's entries move into `.compact.old`; then `OLD_MOVED` is written into
//!    `.compact.new`. With `COMPLETE` but without `OLD_MOVED`, whatever store entries are
//!    left in the state directory are old ones: moving them on is safe to repeat.
//! 3. The new entries move into the state directory; `.compact.old` is deleted, then
//!    `COMPLETE`, then `.compact.new`. With both markers, the remaining new entries are
//!    moved and the rest deleted.

use std::path::Path;
use std::time::Instant;

use sled::Tree;

use super::kv::{self, Engine};
use super::{Db, MARKER, META, Store, StoreError, erasure::COMPACT_PENDING};

const NEW_DIR: &str = ".compact.new";
const OLD_DIR: &str = ".compact.old";
const COMPLETE: &str = "COMPLETE";
const OLD_MOVED: &str = "OLD_MOVED";
/// The offset added to sled's id generator (see [`Db::next_id`]).
pub(super) const ID_BASE: &[u8] = b"id_base";
/// Meta entries that describe one database's life, not the data: not copied.
pub(super) const NOT_COPIED: [&[u8]; 3] = [COMPACT_PENDING, ID_BASE, b"probe"];
/// Entries written per batch while copying.
const BATCH: usize = 10_000;

/// What a compaction did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Compacted {
    /// Bytes of the store's files before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Entries copied (every tree).
    pub entries: u64,
    pub millis: u64,
}

/// The id offset recorded in a store's meta tree (0 for a store never compacted).
pub(super) fn id_base(meta: &kv::Tree) -> Result<u64, StoreError> {
    Ok(meta
        .get(ID_BASE)?
        .map(|v| super::u64_of(&v))
        .transpose()?
        .unwrap_or(0))
}

/// Whether `name`, directly in the state directory, is one of the store's own entries
/// (sled's files and our marker); nothing else there is moved.
pub(super) fn store_entry(name: &str) -> bool {
    matches!(name, "conf" | "db" | "blobs") || name.starts_with("snap.") || name == MARKER
}

/// Compacts the store just opened if an erasure asked for it (the daemon, at start), and
/// opens it again. A store that cannot be compacted now (a full disk) is opened as it is:
/// the erasure already holds in the live data, and the next start tries again.
pub fn compact_if_pending(store: Store) -> Result<(Store, Option<Compacted>), StoreError> {
    if !store.compaction_pending()? {
        return Ok((store, None));
    }
    if !store.is_sled() {
        let done = store.compact_in_place()?;
        return Ok((store, Some(done)));
    }
    let dir = store.path().to_path_buf();
    // The only handle: dropping it closes the database (see `open_sled` for the wait).
    drop(store);
    let done = match compact(&dir) {
        Ok(c) => Some(c),
        Err(e) if e.is_damage() => return Err(e),
        Err(e) => {
            tracing::error!(error = %e, "could not compact the store after an erasure; old copies of erased data remain in its files until a compaction succeeds (`optout-sync store compact`)");
            None
        }
    };
    Ok((Store::open(&dir)?, done))
}

impl Store {
    /// PostgreSQL: rewrites the table in place (`VACUUM FULL`, which locks it meanwhile),
    /// so that erased values leave the database's files; then clears the request. Copies
    /// in the database's write-ahead log, replicas and backups age out with them.
    pub fn compact_in_place(&self) -> Result<Compacted, StoreError> {
        let started = Instant::now();
        self.with(|db| {
            if let Engine::Pg(pg) = &db.db {
                pg.vacuum_full()?;
            }
            db.trees[META].remove(COMPACT_PENDING)?;
            db.db.flush()
        })?;
        Ok(Compacted {
            bytes_before: 0,
            bytes_after: 0,
            entries: 0,
            millis: started.elapsed().as_millis() as u64,
        })
    }
}

/// Rewrites the store in `dir` (which nothing may have open) into fresh files and swaps
/// them in; see the module doc.
pub fn compact(dir: &Path) -> Result<Compacted, StoreError> {
    let started = Instant::now();
    recover(dir)?;
    let bytes_before = store_bytes(dir);
    let entries = prepare(dir)?;
    swap(dir)?;
    Ok(Compacted {
        bytes_before,
        bytes_after: store_bytes(dir),
        entries,
        millis: started.elapsed().as_millis() as u64,
    })
}

/// Step 1 of the module doc: the complete copy in `.compact.new`; returns its entries.
fn prepare(dir: &Path) -> Result<u64, StoreError> {
    // Opening checks the schema and the audit high-water mark: a damaged store is refused
    // here rather than copied.
    drop(Store::open(dir)?);
    let new = dir.join(NEW_DIR);
    if new.exists() {
        std::fs::remove_dir_all(&new).map_err(io("removing an old partial copy"))?;
    }
    super::create_state_dir(&new).map_err(io("creating the copy's directory"))?;
    let entries = copy_store(dir, &new)?;
    if let Ok(marker) = std::fs::read(dir.join(MARKER)) {
        write_synced(&new.join(MARKER), &marker)?;
    }
    sync_tree(&new)?;
    write_synced(&new.join(COMPLETE), b"")?;
    sync_dir(&new)?;
    Ok(entries)
}

/// Copies every tree's current entries from the store in `from` into a new one in `to`,
/// made durable; returns how many.
fn copy_store(from: &Path, to: &Path) -> Result<u64, StoreError> {
    let old = Db::open(from)?;
    let new = Db::open(to)?;
    let (Engine::Sled(old_db), Engine::Sled(new_db)) = (&old.db, &new.db) else {
        unreachable!("Db::open opens sled");
    };
    let mut entries = 0;
    for name in old_db.tree_names() {
        let (src, dst) = (old_db.open_tree(&name)?, new_db.open_tree(&name)?);
        entries += copy_tree(&src, &dst)?;
    }
    // Ids handed out from now on must exceed every id the old store gave.
    let base = old.next_id()? + 1;
    let meta = &new.trees[META];
    for k in NOT_COPIED {
        meta.remove(k)?;
    }
    meta.insert(ID_BASE, base.to_be_bytes())?;
    new.db.flush()?;
    drop((old, new));
    Ok(entries)
}

fn copy_tree(src: &Tree, dst: &Tree) -> Result<u64, StoreError> {
    let mut n = 0;
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    for kv in src.iter() {
        let (k, v) = kv?;
        batch.insert(k, v);
        in_batch += 1;
        n += 1;
        if in_batch == BATCH {
            dst.apply_batch(std::mem::take(&mut batch))?;
            in_batch = 0;
        }
    }
    dst.apply_batch(batch)?;
    Ok(n)
}

/// Finishes or undoes a compaction interrupted by a crash (see the module doc). A store
/// that was never compacted is left alone.
pub fn recover(dir: &Path) -> Result<(), StoreError> {
    let new = dir.join(NEW_DIR);
    let old = dir.join(OLD_DIR);
    if !new.exists() {
        // `.compact.old` outlives `.compact.new` only if something else removed the latter;
        // its files are garbage only if the store itself is in place.
        if old.exists() && dir.join("db").exists() {
            std::fs::remove_dir_all(&old).map_err(io("removing the old store's files"))?;
        }
        return Ok(());
    }
    if !new.join(COMPLETE).exists() {
        // The copy was never finished, or the swap was and only its markers remained.
        tracing::warn!("removing an unfinished store compaction");
        std::fs::remove_dir_all(&new).map_err(io("removing an unfinished copy"))?;
        return sync_dir(dir);
    }
    tracing::warn!("finishing a store compaction interrupted by a crash");
    swap(dir)
}

/// Steps 2 and 3 of the module doc, each safe to repeat.
fn swap(dir: &Path) -> Result<(), StoreError> {
    let new = dir.join(NEW_DIR);
    let old = dir.join(OLD_DIR);
    if !new.join(OLD_MOVED).exists() {
        super::create_state_dir(&old).map_err(io("creating the old store's directory"))?;
        move_entries(dir, &old, store_entry)?;
        sync_dir(&old)?;
        write_synced(&new.join(OLD_MOVED), b"")?;
        sync_dir(&new)?;
    }
    move_entries(&new, dir, |n| n != COMPLETE && n != OLD_MOVED)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io("removing the old store's files"))?;
    }
    std::fs::remove_file(new.join(COMPLETE)).map_err(io("finishing the compaction"))?;
    sync_dir(&new)?;
    std::fs::remove_dir_all(&new).map_err(io("finishing the compaction"))?;
    sync_dir(dir)
}

/// Renames every entry of `from` that `which` selects into `to`, then makes both
/// directories durable.
fn move_entries(from: &Path, to: &Path, which: impl Fn(&str) -> bool) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(from).map_err(io("listing the store"))?;
    for entry in entries {
        let entry = entry.map_err(io("listing the store"))?;
        let name = entry.file_name();
        if which(&name.to_string_lossy()) {
            std::fs::rename(entry.path(), to.join(&name)).map_err(io("moving a store file"))?;
        }
    }
    sync_dir(from)?;
    sync_dir(to)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).map_err(io("writing a compaction marker"))?;
    f.write_all(bytes)
        .map_err(io("writing a compaction marker"))?;
    f.sync_all().map_err(io("writing a compaction marker"))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing a directory"))
}

/// fsyncs every file under `dir` and the directories themselves: sled flushes its log, but
/// the copy's files must be on disk before `COMPLETE` says so.
fn sync_tree(dir: &Path) -> Result<(), StoreError> {
    for entry in std::fs::read_dir(dir).map_err(io("listing the copy"))? {
        let path = entry.map_err(io("listing the copy"))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io("syncing the copy"))?;
        }
    }
    sync_dir(dir)
}

/// The size of the store's files in `dir`.
fn store_bytes(dir: &Path) -> u64 {
    fn size(p: &Path) -> u64 {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => std::fs::read_dir(p)
                .map(|r| r.flatten().map(|e| size(&e.path())).sum())
                .unwrap_or(0),
            Ok(m) => m.len(),
            Err(_) => 0,
        }
    }
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .filter(|e| store_entry(&e.file_name().to_string_lossy()))
                .map(|e| size(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

fn io(doing: &'static str) -> impl Fn(std::io::Error) -> StoreError {
    move |e| StoreError::Io(format!("compacting the store: {doing}: {e}"))
}

#[cfg(test)]
mod tests;
