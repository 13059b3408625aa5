//! The store: the only module that imports sled.
//!
//! Trees: `subjects` (id → consent registers, aliases, linked records), `aliases`
//! (alias → subject id), `links` (connector, record → subjects, phones, last seen and last
//! pushed value), `cursors`, `outbox` (connector, key → desired write; a newer desired
//! value for the same key replaces the pending one), `dead` (rejected pushes), `audit`
//! (append-only), `subject_audit` (subject → audit sequence index), `inbox` and
//! `quarantine` (webhook bodies), `seen` (dedup keys of delivered messages), `counts`
//! (decision totals and people), `unverified` (pushes not yet read back) and `meta`
//! (schema version).
//!
//! Every value starts with a one-byte format version followed by JSON. Changes that must
//! happen together go through [`Store::transaction`], which commits them atomically and,
//! when asked, durably (flushed to disk before it returns).

use std::path::{Path, PathBuf};

use optout_core::{PushItem, Timestamp};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::{Transactional, Tree};

use crate::audit::AuditEntry;
use crate::policy::{Consent, RecordMemory};

/// The layout this build reads and writes. A store with another version is refused.
pub const SCHEMA_VERSION: u32 = 1;
/// The encoding of each value (first byte).
const FORMAT: u8 = 1;
/// A file beside sled's own, written once the store is initialised. If it is there but
/// sled comes up empty, the data was lost or damaged: refuse rather than start afresh.
const MARKER: &str = "optout-sync.store";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error(
        "the store at {path} has schema version {found}, this build understands {expected}; refusing to start (nothing was changed)"
    )]
    Schema {
        path: String,
        found: String,
        expected: u32,
    },
    #[error("the store is corrupt: {0}")]
    Corrupt(String),
    #[error("storage error: {0}")]
    Io(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
            other => StoreError::Io(other.to_string()),
        }
    }
}

/// An error inside a transaction. Opaque so callers never see sled's types; convert
/// from [`StoreError`] with `?`.
#[derive(Debug)]
pub struct TxError(ConflictableTransactionError<StoreError>);

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError(ConflictableTransactionError::Abort(e))
    }
}

impl From<UnabortableTransactionError> for TxError {
    fn from(e: UnabortableTransactionError) -> Self {
        TxError(e.into())
    }
}

pub type TxResult<T> = Result<T, TxError>;

// ---- stored records -------------------------------------------------------------------

/// A person, as far as consent goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectRecord {
    pub id: u64,
    /// Alias keys (`p:+1…`, `w:…`, `b:…`).
    pub aliases: Vec<String>,
    pub consent: Consent,
    /// Records (connector, record id) linked to this subject.
    pub links: Vec<(String, String)>,
    /// When the customer last wrote to us on WhatsApp (the 24-hour window).
    pub last_inbound: Option<Timestamp>,
    pub created_at: Timestamp,
    /// Set when this subject was merged into another; the record stays for the audit trail.
    pub merged_into: Option<u64>,
    /// Subjects merged into this one (their audit entries belong to this person too).
    pub merged_from: Vec<u64>,
}

/// One record of one connector and what the daemon knows of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRecord {
    pub subjects: Vec<u64>,
    /// E.164 numbers the record held when last read.
    pub phones: Vec<String>,
    pub memory: RecordMemory,
    pub pushed_at: Option<Timestamp>,
    /// A push is done but no read of the record since has reflected it; until one does,
    /// the push is not re-sent and counts as unverified.
    pub awaiting_readback: bool,
    pub first_seen: Timestamp,
    pub last_read: Timestamp,
}

/// A desired write waiting for its push worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub item: PushItem,
    /// Unique per enqueue: a push result is applied only to the version it pushed, so a
    /// newer value enqueued meanwhile is never removed by an older push's success.
    pub version: u64,
    pub enqueued_at: Timestamp,
    /// When the push worker may try next.
    pub not_before: Timestamp,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Set while a push that must not be repeated (a confirmation reply) is in flight.
    pub in_flight: bool,
}

/// A push its target refused for good.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub item: PushItem,
    pub reason: String,
    pub at: Timestamp,
    pub attempts: u32,
}

/// A webhook body accepted by the listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxRecord {
    pub received_at: Timestamp,
    #[serde(with = "body_text")]
    pub body: Vec<u8>,
    /// Why it was quarantined (quarantine tree only).
    pub reason: Option<String>,
}

/// Bodies are almost always UTF-8 JSON; store them as text when they are, base64-free
/// bytes otherwise, so the store stays readable with ordinary tools.
mod body_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Body {
        Text(String),
        Bytes(Vec<u8>),
    }

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(b) {
            Ok(t) => Body::Text(t.to_string()).serialize(s),
            Err(_) => Body::Bytes(b.to_vec()).serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(match Body::deserialize(d)? {
            Body::Text(t) => t.into_bytes(),
            Body::Bytes(b) => b,
        })
    }
}

// ---- encoding -------------------------------------------------------------------------

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![FORMAT];
    serde_json::to_writer(&mut out, v).expect("store values serialise");
    out
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => {
            serde_json::from_slice(rest).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
        }
        Some((v, _)) => Err(StoreError::Corrupt(format!(
            "{what}: value format {v} is unknown to this build"
        ))),
        None => Err(StoreError::Corrupt(format!("{what}: empty value"))),
    }
}

fn link_key(connector: &str, record: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(connector.len() + record.len() + 1);
    k.extend_from_slice(connector.as_bytes());
    k.push(0);
    k.extend_from_slice(record.as_bytes());
    k
}

fn split_key(k: &[u8]) -> (String, String) {
    let pos = k.iter().position(|&b| b == 0).unwrap_or(k.len());
    let a = String::from_utf8_lossy(&k[..pos]).into_owned();
    let b = String::from_utf8_lossy(k.get(pos + 1..).unwrap_or(&[])).into_owned();
    (a, b)
}

fn prefix(connector: &str) -> Vec<u8> {
    let mut p = connector.as_bytes().to_vec();
    p.push(0);
    p
}

// ---- the store ------------------------------------------------------------------------

const TREES: [&str; 14] = [
    "subjects",
    "aliases",
    "links",
    "cursors",
    "outbox",
    "dead",
    "audit",
    "subject_audit",
    "inbox",
    "quarantine",
    "seen",
    "counts",
    "meta",
    "unverified",
];
const SUBJECTS: usize = 0;
const ALIASES: usize = 1;
const LINKS: usize = 2;
const CURSORS: usize = 3;
const OUTBOX: usize = 4;
const DEAD: usize = 5;
const AUDIT: usize = 6;
const SUBJECT_AUDIT: usize = 7;
const INBOX: usize = 8;
const QUARANTINE: usize = 9;
const SEEN: usize = 10;
const COUNTS: usize = 11;
const META: usize = 12;
const UNVERIFIED: usize = 13;

/// The embedded database. Cheap to clone (sled handles are reference-counted).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    trees: Vec<Tree>,
    path: PathBuf,
    group: std::sync::Arc<GroupCommit>,
}

/// Group commit for webhook appends: many concurrent appends share one flush to disk
/// instead of queueing one fsync each.
#[derive(Default)]
struct GroupCommit {
    /// Tickets handed out after a write (one per write that must become durable).
    written: std::sync::atomic::AtomicU64,
    /// Every ticket up to this one is on disk.
    flushed: std::sync::atomic::AtomicU64,
    /// One flush at a time; waiters find their write already covered when they get it.
    lock: tokio::sync::Mutex<()>,
    /// Serialises numbering and inserting inbox entries (never held across an await).
    append_order: std::sync::Mutex<()>,
}

impl Store {
    /// Opens (or creates) the store in `dir`. An unknown schema version or a corrupt
    /// store is an error, never a silent reset.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let shown = dir.display().to_string();
        let config = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            // sled's default cache is 1 GiB; the daemon should stay small.
            .cache_capacity(64 << 20);
        // A previous handle in this process may still be closing (sled's flusher thread
        // lets go of the lock a moment after the last handle is dropped); another process
        // holding the lock is reported clearly after that grace period.
        let mut tries = 0;
        let opened = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("acquire lock") && tries < 100 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(sled::Error::Io(e)) if e.to_string().contains("acquire lock") => {
                    return Err(StoreError::Open {
                        path: shown,
                        reason: "it is in use by another process (is optout-sync already running?)"
                            .into(),
                    });
                }
                other => break other,
            }
        };
        let db = opened.map_err(|e| match e {
            sled::Error::Corruption { .. } => {
                StoreError::Corrupt(format!("{shown}: {e}; restore it from a backup"))
            }
            other => StoreError::Open {
                path: shown.clone(),
                reason: other.to_string(),
            },
        })?;
        let trees = TREES
            .iter()
            .map(|n| db.open_tree(n))
            .collect::<Result<Vec<_>, _>>()?;
        let store = Store {
            db,
            trees,
            path: dir.to_path_buf(),
            group: Default::default(),
        };
        store.check_schema()?;
        Ok(store)
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let meta = &self.trees[META];
        match meta.get("schema_version")? {
            Some(v) => {
                let found = std::str::from_utf8(&v).unwrap_or("?").to_string();
                if found != SCHEMA_VERSION.to_string() {
                    return Err(StoreError::Schema {
                        path: self.path.display().to_string(),
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
                self.check_high_water()?;
            }
            None => {
                let has_data = self.trees.iter().any(|t| !t.is_empty());
                if self.path.join(MARKER).exists() {
                    return Err(StoreError::Corrupt(format!(
                        "{}: the store was initialised before but its data is gone or damaged; restore it from a backup (refusing to start empty)",
                        self.path.display()
                    )));
                }
                if has_data {
                    return Err(StoreError::Corrupt(format!(
                        "{}: data present but no schema version; refusing to guess",
                        self.path.display()
                    )));
                }
                meta.insert("schema_version", SCHEMA_VERSION.to_string().as_bytes())?;
                self.db.flush()?;
                std::fs::write(self.path.join(MARKER), format!("schema {SCHEMA_VERSION}\n"))
                    .map_err(|e| StoreError::Io(format!("cannot write the store marker: {e}")))?;
            }
        }
        Ok(())
    }

    /// The last audit sequence number known to be on disk, from the marker file.
    fn marker_high_water(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.path.join(MARKER)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("audit_high ")?.trim().parse().ok())
    }

    fn last_audit_seq(&self) -> Result<Option<u64>, StoreError> {
        match self.trees[AUDIT].last()? {
            Some((k, _)) => Ok(Some(u64_of(&k)?)),
            None => Ok(None),
        }
    }

    /// sled recovers a damaged log by dropping everything after the damage, silently. The
    /// marker file remembers how far the audit log (append-only, every write durable)
    /// reached; a store that now ends before that has lost acknowledged data.
    fn check_high_water(&self) -> Result<(), StoreError> {
        let Some(expected) = self.marker_high_water() else {
            return Ok(());
        };
        let found = self.last_audit_seq()?;
        if found.is_none_or(|f| f < expected) {
            return Err(StoreError::Corrupt(format!(
                "{}: the audit log ended at entry {expected} when last checked but now ends at {}; the store lost data it had acknowledged (a damaged disk or file?); restore it from a backup",
                self.path.display(),
                found.map(|f| f.to_string()).unwrap_or("nothing".into())
            )));
        }
        Ok(())
    }

    /// Records in the marker file how far the audit log reaches, for the check above.
    /// Called periodically and at shutdown; every audit entry is already durable, so the
    /// mark never runs ahead of the disk.
    pub fn save_high_water(&self) -> Result<(), StoreError> {
        let Some(seq) = self.last_audit_seq()? else {
            return Ok(());
        };
        if self.marker_high_water() == Some(seq) {
            return Ok(());
        }
        let io = |e: std::io::Error| StoreError::Io(format!("cannot write the store marker: {e}"));
        let tmp = self.path.join(format!("{MARKER}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        use std::io::Write as _;
        write!(f, "schema {SCHEMA_VERSION}\naudit_high {seq}\n").map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, self.path.join(MARKER)).map_err(io)?;
        Ok(())
    }

    /// Runs `f` as one atomic transaction over every tree. `durable` flushes to disk
    /// before returning, so what is acknowledged afterwards survives a crash. `f` may
    /// run more than once (on conflict), so it must not have side effects outside `tx`.
    pub fn transaction<R>(
        &self,
        durable: bool,
        f: impl Fn(&mut Txn<'_>) -> TxResult<R>,
    ) -> Result<R, StoreError> {
        let r = self.trees.as_slice().transaction(|view| {
            let mut tx = Txn { t: view };
            let r = f(&mut tx).map_err(|e| e.0)?;
            if durable {
                view[0].flush();
            }
            Ok(r)
        });
        match r {
            Ok(v) => Ok(v),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Flushes everything written so far to disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Makes a write that has already happened durable, sharing the flush with concurrent
    /// callers: a flush that starts after our write covers it, so whoever gets the lock
    /// after someone else flushed past our ticket returns at once.
    async fn commit_write(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let ticket = self.group.written.fetch_add(1, SeqCst) + 1;
        let _guard = self.group.lock.lock().await;
        if self.group.flushed.load(SeqCst) >= ticket {
            return Ok(());
        }
        let upto = self.group.written.load(SeqCst);
        self.db.flush_async().await?;
        self.group.flushed.fetch_max(upto, SeqCst);
        Ok(())
    }

    #[cfg(test)]
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    // -- reads outside transactions (read side: lookup, gate, status, workers) --

    pub fn subject(&self, id: u64) -> Result<Option<SubjectRecord>, StoreError> {
        self.trees[SUBJECTS]
            .get(id.to_be_bytes())?
            .map(|v| decode("subject", &v))
            .transpose()
    }

    /// The live subject an alias belongs to (following merges).
    pub fn subject_by_alias(&self, alias: &str) -> Result<Option<SubjectRecord>, StoreError> {
        let Some(id) = self.trees[ALIASES].get(alias.as_bytes())? else {
            return Ok(None);
        };
        let mut id = u64_of(&id)?;
        for _ in 0..16 {
            match self.subject(id)? {
                Some(s) => match s.merged_into {
                    Some(next) => id = next,
                    None => return Ok(Some(s)),
                },
                None => return Ok(None),
            }
        }
        Err(StoreError::Corrupt(format!(
            "merge chain of subject {id} too long"
        )))
    }

    pub fn link(&self, connector: &str, record: &str) -> Result<Option<LinkRecord>, StoreError> {
        self.trees[LINKS]
            .get(link_key(connector, record))?
            .map(|v| decode("link", &v))
            .transpose()
    }

    pub fn cursor(&self, connector: &str) -> Result<Option<String>, StoreError> {
        Ok(self.trees[CURSORS]
            .get(connector.as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Up to `limit` outbox entries of a connector that may be tried at `now` and are
    /// not in flight, oldest key first.
    pub fn due_pushes(
        &self,
        connector: &str,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<(String, OutboxEntry)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.trees[OUTBOX].scan_prefix(prefix(connector)) {
            let (k, v) = kv?;
            let e: OutboxEntry = decode("outbox", &v)?;
            if e.not_before <= now && !e.in_flight {
                out.push((split_key(&k).1, e));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The earliest time any pending entry of the connector becomes due.
    pub fn next_due(&self, connector: &str) -> Result<Option<Timestamp>, StoreError> {
        let mut min: Option<Timestamp> = None;
        for kv in self.trees[OUTBOX].scan_prefix(prefix(connector)) {
            let (_, v) = kv?;
            let e: OutboxEntry = decode("outbox", &v)?;
            if !e.in_flight {
                min = Some(min.map_or(e.not_before, |m| m.min(e.not_before)));
            }
        }
        Ok(min)
    }

    pub fn outbox_entry(
        &self,
        connector: &str,
        key: &str,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        self.trees[OUTBOX]
            .get(link_key(connector, key))?
            .map(|v| decode("outbox", &v))
            .transpose()
    }

    /// Every outbox entry (connector, key, entry); for status and tests.
    pub fn outbox(
        &self,
    ) -> impl Iterator<Item = Result<(String, String, OutboxEntry), StoreError>> + '_ {
        self.trees[OUTBOX].iter().map(|kv| {
            let (k, v) = kv?;
            let (c, key) = split_key(&k);
            Ok((c, key, decode("outbox", &v)?))
        })
    }

    #[cfg(test)]
    pub fn outbox_len(&self) -> usize {
        self.trees[OUTBOX].len()
    }

    pub fn dead_letters(
        &self,
    ) -> impl Iterator<Item = Result<(String, String, DeadLetter), StoreError>> + '_ {
        self.trees[DEAD].iter().map(|kv| {
            let (k, v) = kv?;
            let (c, key) = split_key(&k);
            Ok((c, key, decode("dead letter", &v)?))
        })
    }

    pub fn dead_letter(
        &self,
        connector: &str,
        key: &str,
    ) -> Result<Option<DeadLetter>, StoreError> {
        self.trees[DEAD]
            .get(link_key(connector, key))?
            .map(|v| decode("dead letter", &v))
            .transpose()
    }

    /// Audit entries with `seq >= from`, in order, streamed.
    pub fn audit_from(
        &self,
        from: u64,
    ) -> impl Iterator<Item = Result<AuditEntry, StoreError>> + '_ {
        self.trees[AUDIT].range(from.to_be_bytes()..).map(|kv| {
            let (k, v) = kv?;
            let mut e: AuditEntry = decode("audit", &v)?;
            e.seq = u64_of(&k)?;
            Ok(e)
        })
    }

    /// The audit entries of one subject (and of the subjects merged into it), in order.
    pub fn subject_audit(&self, subject: &SubjectRecord) -> Result<Vec<AuditEntry>, StoreError> {
        let mut seqs = Vec::new();
        for id in std::iter::once(subject.id).chain(subject.merged_from.iter().copied()) {
            for kv in self.trees[SUBJECT_AUDIT].scan_prefix(id.to_be_bytes()) {
                let (k, _) = kv?;
                seqs.push(u64_of(&k[8..])?);
            }
        }
        seqs.sort_unstable();
        seqs.dedup();
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if let Some(v) = self.trees[AUDIT].get(seq.to_be_bytes())? {
                let mut e: AuditEntry = decode("audit", &v)?;
                e.seq = seq;
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Decision totals: (`scope:decision`, count).
    pub fn counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.trees[COUNTS]
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((String::from_utf8_lossy(&k).into_owned(), i64_of(&v)))
            })
            .collect()
    }

    #[cfg(test)]
    pub fn subject_count(&self) -> usize {
        self.trees[SUBJECTS].len()
    }

    // -- webhook inbox --

    /// Appends a webhook body durably and returns its sequence number.
    pub async fn inbox_append(
        &self,
        received_at: Timestamp,
        body: &[u8],
    ) -> Result<u64, StoreError> {
        let rec = InboxRecord {
            received_at,
            body: body.to_vec(),
            reason: None,
        };
        let value = encode(&rec);
        let seq = {
            // Numbering and inserting under one lock makes entries visible in sequence
            // order: otherwise a poll could read number 6, move its cursor past 5 while 5
            // is still being written, and never read that acknowledged webhook.
            let _order = self
                .group
                .append_order
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // Sequence numbers start at 1: a cursor of 0 means "nothing read yet".
            let seq = self.db.generate_id()? + 1;
            self.trees[INBOX].insert(seq.to_be_bytes(), value)?;
            seq
        };
        self.commit_write().await?;
        Ok(seq)
    }

    /// Keeps a signed but unusable body for the operator, durably.
    pub async fn quarantine(
        &self,
        received_at: Timestamp,
        body: &[u8],
        reason: &str,
    ) -> Result<(), StoreError> {
        let seq = self.db.generate_id()?;
        let rec = InboxRecord {
            received_at,
            body: body.to_vec(),
            reason: Some(reason.to_string()),
        };
        self.trees[QUARANTINE].insert(seq.to_be_bytes(), encode(&rec))?;
        self.commit_write().await?;
        Ok(())
    }

    pub fn quarantine_len(&self) -> usize {
        self.trees[QUARANTINE].len()
    }

    /// Inbox entries after `after`, oldest first.
    pub fn inbox_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, InboxRecord)>, StoreError> {
        let start = after.saturating_add(1);
        self.trees[INBOX]
            .range(start.to_be_bytes()..)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((u64_of(&k)?, decode("inbox", &v)?))
            })
            .collect()
    }

    pub fn inbox_len(&self) -> usize {
        self.trees[INBOX].len()
    }

    /// Drops inbox entries up to and including `seq` (already applied: their cursor is
    /// saved). Safe to skip or repeat after a crash: polls read only after the cursor.
    pub fn inbox_trim(&self, seq: u64) -> Result<usize, StoreError> {
        let keys: Vec<_> = self.trees[INBOX]
            .range(..=seq.to_be_bytes())
            .keys()
            .collect::<Result<_, _>>()?;
        for k in &keys {
            self.trees[INBOX].remove(k)?;
        }
        Ok(keys.len())
    }

    /// Pushes done but not yet read back: (connector, record, pushed at).
    pub fn unverified(
        &self,
    ) -> impl Iterator<Item = Result<(String, String, Timestamp), StoreError>> + '_ {
        self.trees[UNVERIFIED].iter().map(|kv| {
            let (k, v) = kv?;
            let (c, r) = split_key(&k);
            Ok((c, r, Timestamp(i64_of(&v))))
        })
    }
}

fn u64_of(b: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = b
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt("bad id".into()))?;
    Ok(u64::from_be_bytes(arr))
}

fn i64_of(b: &[u8]) -> i64 {
    b.get(..8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(i64::from_be_bytes)
        .unwrap_or(0)
}

/// The view of the store inside one transaction.
pub struct Txn<'a> {
    t: &'a [TransactionalTree],
}

impl Txn<'_> {
    fn get<T: DeserializeOwned>(&self, tree: usize, what: &str, key: &[u8]) -> TxResult<Option<T>> {
        match self.t[tree].get(key)? {
            Some(v) => Ok(Some(decode(what, &v)?)),
            None => Ok(None),
        }
    }

    /// A fresh unique, increasing id.
    pub fn new_id(&self) -> TxResult<u64> {
        self.t[0]
            .generate_id()
            .map_err(|e| TxError::from(StoreError::from(e)))
    }

    pub fn subject(&self, id: u64) -> TxResult<Option<SubjectRecord>> {
        self.get(SUBJECTS, "subject", &id.to_be_bytes())
    }

    pub fn put_subject(&self, s: &SubjectRecord) -> TxResult<()> {
        self.t[SUBJECTS].insert(&s.id.to_be_bytes(), encode(s))?;
        Ok(())
    }

    pub fn alias(&self, alias: &str) -> TxResult<Option<u64>> {
        Ok(match self.t[ALIASES].get(alias.as_bytes())? {
            Some(v) => Some(u64_of(&v)?),
            None => None,
        })
    }

    pub fn put_alias(&self, alias: &str, subject: u64) -> TxResult<()> {
        self.t[ALIASES].insert(alias.as_bytes(), &subject.to_be_bytes())?;
        Ok(())
    }

    pub fn link(&self, connector: &str, record: &str) -> TxResult<Option<LinkRecord>> {
        self.get(LINKS, "link", &link_key(connector, record))
    }

    pub fn put_link(&self, connector: &str, record: &str, l: &LinkRecord) -> TxResult<()> {
        self.t[LINKS].insert(link_key(connector, record), encode(l))?;
        Ok(())
    }

    pub fn set_cursor(&self, connector: &str, cursor: &str) -> TxResult<()> {
        self.t[CURSORS].insert(connector.as_bytes(), cursor.as_bytes())?;
        Ok(())
    }

    pub fn outbox(&self, connector: &str, key: &str) -> TxResult<Option<OutboxEntry>> {
        self.get(OUTBOX, "outbox", &link_key(connector, key))
    }

    pub fn put_outbox(&self, connector: &str, key: &str, e: &OutboxEntry) -> TxResult<()> {
        self.t[OUTBOX].insert(link_key(connector, key), encode(e))?;
        Ok(())
    }

    pub fn remove_outbox(&self, connector: &str, key: &str) -> TxResult<()> {
        self.t[OUTBOX].remove(link_key(connector, key))?;
        Ok(())
    }

    pub fn put_dead(&self, connector: &str, key: &str, d: &DeadLetter) -> TxResult<()> {
        self.t[DEAD].insert(link_key(connector, key), encode(d))?;
        Ok(())
    }

    pub fn remove_dead(&self, connector: &str, key: &str) -> TxResult<Option<DeadLetter>> {
        match self.t[DEAD].remove(link_key(connector, key))? {
            Some(v) => Ok(Some(decode("dead letter", &v)?)),
            None => Ok(None),
        }
    }

    /// Appends an audit entry (and indexes it under its subjects); returns its sequence.
    pub fn audit(&self, entry: &AuditEntry, subjects: &[u64]) -> TxResult<u64> {
        let seq = self.new_id()?;
        self.t[AUDIT].insert(&seq.to_be_bytes(), encode(entry))?;
        for s in subjects {
            let mut k = s.to_be_bytes().to_vec();
            k.extend_from_slice(&seq.to_be_bytes());
            self.t[SUBJECT_AUDIT].insert(k, &[][..])?;
        }
        Ok(seq)
    }

    /// Records a delivery key; returns false if it was seen before (a duplicate).
    pub fn first_sight(&self, connector: &str, key: &str, now: Timestamp) -> TxResult<bool> {
        let k = link_key(connector, key);
        if self.t[SEEN].get(&k)?.is_some() {
            return Ok(false);
        }
        self.t[SEEN].insert(k, &now.millis().to_be_bytes())?;
        Ok(true)
    }

    pub fn set_unverified(
        &self,
        connector: &str,
        record: &str,
        pushed_at: Option<Timestamp>,
    ) -> TxResult<()> {
        let k = link_key(connector, record);
        match pushed_at {
            Some(t) => self.t[UNVERIFIED].insert(k, &t.millis().to_be_bytes())?,
            None => self.t[UNVERIFIED].remove(k)?,
        };
        Ok(())
    }

    /// Adds `delta` to a decision total.
    pub fn count(&self, key: &str, delta: i64) -> TxResult<()> {
        let cur = self.t[COUNTS]
            .get(key.as_bytes())?
            .map(|v| i64_of(&v))
            .unwrap_or(0);
        self.t[COUNTS].insert(key.as_bytes(), &(cur + delta).to_be_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
