//! The store: the only module that imports sled.
//!
//! Trees: `subjects` (id → consent registers, aliases, linked records), `aliases`
//! (alias → subject id), `links` (connector, record → subjects, phones, last seen and last
//! pushed value), `cursors`, `outbox` (connector, key → desired write; a newer desired
//! value for the same key replaces the pending one), `dead` (rejected pushes), `audit`
//! (append-only), `subject_audit` (subject → audit sequence index), `inbox` and
//! `quarantine` (webhook bodies), `seen` (dedup keys of delivered messages), `counts`
//! (decision totals and people), `unverified` (pushes not yet read back), `unreadable`
//! (connector, record → phone values that are not numbers), `templates` (template name →
//! its newest category per language), `holds` (opt-ins held by the mass re-opt-in guard),
//! `guard` (source → its window), `api_keys` (the write API's idempotency keys, hashed)
//! and `meta` (schema version; the erasure key, tombstones and pending compaction of
//! `store/erasure.rs`; the id base of `store/compact.rs`, which rewrites the store after
//! an erasure).
//!
//! Every value starts with a one-byte format: 1 is JSON (the first encoding, still read,
//! and still written for the rare values whose types use attributes only a
//! self-describing format supports), 2 is postcard (fields in declaration order without
//! names, integers as varints), written for every value a person has. Changes that must
//! happen together go through [`Store::transaction`], which commits them atomically and,
//! when asked, durably (flushed to disk before it returns).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex, RwLock};

use kv::{Engine, KvIter, Tree, TxErr, TxFail, TxOpts, TxTree};
use optout_core::{PushItem, Timestamp};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::audit::AuditEntry;
use crate::policy::{Consent, Fact, GuardWindow, RecordMemory};

/// The layout this build reads and writes. A store with another version is refused.
///
/// 2: hot values (subjects, links, audit entries …) may be compact (format byte 2), which
/// builds of schema 1 cannot read. A schema-1 store is upgraded at open (its values stay
/// readable and are rewritten compact as they change); a build of schema 1 then refuses
/// the store at open, clearly, instead of failing on values as it reads them.
pub const SCHEMA_VERSION: u32 = 2;
/// The oldest layout this build opens (and upgrades).
const OLDEST_SCHEMA: u32 = 1;

/// Whether a stored schema version is one this build opens.
fn schema_opens(version: &[u8]) -> bool {
    (std::str::from_utf8(version).ok())
        .and_then(|v| v.parse::<u32>().ok())
        .is_some_and(|n| (OLDEST_SCHEMA..=SCHEMA_VERSION).contains(&n))
}
/// The first byte of a JSON value.
const FORMAT_JSON: u8 = 1;
/// The first byte of a postcard value. postcard is not self-describing: a field added to a
/// type stored this way cannot default when absent (as JSON's `#[serde(default)]` does), so
/// such a change needs a new format byte and the old layout kept for reading.
const FORMAT_COMPACT: u8 = 2;
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
    /// A value or the store's layout is not what this build wrote.
    #[error("the store is corrupt: {0}")]
    Corrupt(String),
    /// sled itself reports damage.
    #[error("the store is corrupt: {0}")]
    Damaged(String),
    #[error("storage error: {0}")]
    Io(String),
    /// The store failed earlier and has not been proved to work again.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The end of a [`Store::rehearse`]: its writes are discarded on purpose.
    #[error("a rehearsal's writes are discarded")]
    Rehearsed,
    /// This instance no longer holds the leader's lease: the leader's work is refused.
    #[error("this instance no longer leads (its lease was lost or taken over)")]
    Fenced,
}

impl StoreError {
    /// Damage or a foreign schema: retrying or restarting cannot cure it; an operator must
    /// restore the store (the daemon exits with a code its unit does not restart on).
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            StoreError::Corrupt(_) | StoreError::Damaged(_) | StoreError::Schema { .. }
        )
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => StoreError::Damaged(e.to_string()),
            other => StoreError::Io(other.to_string()),
        }
    }
}

/// An error inside a transaction. Opaque so callers never see an engine's types; convert
/// from [`StoreError`] with `?`.
#[derive(Debug)]
pub struct TxError(TxErr);

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError(TxErr::Abort(e))
    }
}

impl From<TxErr> for TxError {
    fn from(e: TxErr) -> Self {
        TxError(e)
    }
}

pub type TxResult<T> = Result<T, TxError>;

// ---- the engine ----------------------------------------------------------------------

/// Which engine holds the store (`[store]` in the configuration).
#[derive(Clone, Debug, Default)]
pub enum Backend {
    /// sled, in `daemon.state_dir`: one process on one host, nothing to install.
    #[default]
    Sled,
    /// PostgreSQL, shared by every instance of the daemon.
    Postgres(PgSettings),
}

/// How to reach the PostgreSQL database and how this instance takes part.
#[derive(Clone, Debug)]
pub struct PgSettings {
    /// A libpq-style URL or key=value string, password included: a secret.
    pub url: optout_core::Secret,
    /// Connections this instance keeps open.
    pub pool_size: u32,
    /// PEM certificates to trust for TLS instead of the public web roots.
    pub tls_ca_file: Option<PathBuf>,
    /// This instance's name in `status` (unique among the instances on one database).
    pub instance: String,
    /// How long the leader's lease lasts without renewal; a successor takes over after it.
    pub lease: std::time::Duration,
}

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
    /// The record's marketing-consent field, when its connector keeps one.
    #[serde(default)]
    pub marketing: MarketingField,
}

/// What the daemon knows of one record's marketing-consent field: the same memory, push
/// time and read-back flag as the consent field's, kept apart so each field's echo and
/// verification are its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketingField {
    pub memory: RecordMemory,
    pub pushed_at: Option<Timestamp>,
    pub awaiting_readback: bool,
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
    /// The connector instance whose webhook route received it (several WhatsApp accounts
    /// share the inbox); absent in entries written before accounts were told apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector: Option<String>,
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

/// A message template's newest known category (see `reconcile::templates`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub name: String,
    /// Empty for a configured category (every language of the name).
    pub language: String,
    /// As the channel named it (`MARKETING`).
    pub category: String,
    /// A category announced for later (Meta's notice a day before a change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upcoming: Option<String>,
    /// Event time of the notice that set it; `Timestamp::MIN` when configured.
    pub at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The connector instance it came from.
    pub source: String,
    pub evidence: String,
    /// When the daemon stored it.
    pub stored_at: Timestamp,
}

// ---- encoding -------------------------------------------------------------------------

/// A CRM phone value that could not be read as a number: kept until the record is read
/// again without it, so an operator can see and fix it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadableNumber {
    /// Which of the record's phone values (`phone 1` is the first non-empty one).
    pub field: String,
    /// The value as read, bounded.
    pub raw: String,
    pub reason: String,
    pub at: Timestamp,
}

/// An opt-in held by the mass re-opt-in guard until an operator releases or discards it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRecord {
    pub id: u64,
    /// The person it would have re-enabled (as then; merges are followed on release).
    pub subject: u64,
    /// The opt-in, with its original event time.
    pub fact: Fact,
    pub held_at: Timestamp,
}

/// One event offered to the write API: its idempotency key (hashed by the caller, so no
/// personal data a client puts in a key is kept), a hash of its content, and the JSON it
/// is stored as.
#[derive(Clone, Debug)]
pub struct KeyClaim {
    pub key: String,
    pub content: String,
    pub body: Vec<u8>,
}

/// What the store remembers of an idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// The hash of the event first recorded under the key.
    pub content: String,
    pub recorded_at: Timestamp,
    /// The receipt the first answer carried.
    pub receipt: String,
}

/// How the store took one [`KeyClaim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claimed {
    /// Recorded now.
    New(ApiKeyRecord),
    /// The key was recorded before with the same event: nothing changes.
    Same(ApiKeyRecord),
    /// The key was recorded before with another event.
    Conflict(ApiKeyRecord),
}

/// The compact encoding (format 2), for the values each person has (subjects, links,
/// audit entries) and the other types whose serde attributes postcard supports: none of
/// `skip_serializing_if`, `untagged`, internally or adjacently tagged enums, `flatten`.
fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_extend(v, vec![FORMAT_COMPACT]).expect("store values serialise")
}

/// The JSON encoding (format 1), for types that use attributes postcard cannot carry:
/// inbox bodies, templates, outbox entries and dead letters (a push item's identities and
/// reply). None of them is kept per person.
fn encode_json<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_JSON];
    serde_json::to_writer(&mut out, v).expect("store values serialise");
    out
}

/// Reads a value of either format, whichever wrote it.
fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("{what}: {e}"));
    match bytes.split_first() {
        Some((&FORMAT_JSON, rest)) => serde_json::from_slice(rest).map_err(|e| corrupt(&e)),
        Some((&FORMAT_COMPACT, rest)) => match postcard::take_from_bytes(rest) {
            Ok((v, [])) => Ok(v),
            Ok((_, extra)) => Err(corrupt(&format_args!(
                "{} bytes past the value",
                extra.len()
            ))),
            Err(e) => Err(corrupt(&e)),
        },
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

pub(crate) const TREES: [&str; 19] = [
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
    "unreadable",
    "templates",
    "holds",
    "guard",
    "api_keys",
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
const UNREADABLE: usize = 14;
const TEMPLATES: usize = 15;
const HOLDS: usize = 16;
const GUARD: usize = 17;
const API_KEYS: usize = 18;

/// The embedded database. Cheap to clone: clones share one open database, its health and
/// its group commit.
///
/// sled poisons itself after a failed write to its log (a full disk, an I/O error): every
/// later write fails with the same error until the database is opened again. So the first
/// failure of sled's own marks the store *failing* ([`Store::failure`]): every call then
/// answers [`StoreError::Unavailable`] at once, without touching sled, until
/// [`Store::recover`] has proved the store works again (a probe write made durable) or
/// reopened it in-process (sled recovers the on-disk log as after a crash; what was not
/// flushed was never acknowledged).
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

struct Shared {
    /// sled's directory (PostgreSQL: the state directory, which holds no store files).
    path: PathBuf,
    backend: Backend,
    /// `None` only while [`Store::recover`] reopens the database.
    db: RwLock<Option<Arc<Db>>>,
    group: GroupCommit,
    /// `Some(reason)` while the store is failing; watched by the daemon.
    health: watch::Sender<Option<String>>,
    reserve: FdReserve,
}

/// One open engine (sled or PostgreSQL) and its trees.
struct Db {
    db: Engine,
    trees: Vec<Tree>,
    /// Added to sled's id generator: a compacted store starts a fresh generator, and ids
    /// must keep increasing past the ones the old store handed out (see `compact`).
    id_base: u64,
}

/// Group commit for webhook appends: many concurrent appends share one flush to disk
/// instead of queueing one fsync each.
#[derive(Default)]
struct GroupCommit {
    /// Tickets handed out after a write (one per write that must become durable).
    written: AtomicU64,
    /// Every ticket up to this one is on disk.
    flushed: AtomicU64,
    /// One flush at a time; waiters find their write already covered when they get it.
    lock: tokio::sync::Mutex<()>,
    /// Serialises numbering and inserting inbox entries.
    append_order: Mutex<()>,
}

/// File descriptors kept for the store: a flood of connections can take every descriptor
/// the process may open, and sled opens files as it runs (a blob file for each large
/// value, snapshots). Each store call gives one placeholder back to the kernel for its
/// duration, so the store finds a free descriptor where an accept loop found none.
struct FdReserve {
    spare: Mutex<Vec<std::fs::File>>,
}

/// Placeholders kept (each a descriptor of `/dev/null`).
const FD_RESERVE: usize = 8;

impl FdReserve {
    fn new() -> Self {
        let r = FdReserve {
            spare: Mutex::new(Vec::new()),
        };
        r.refill();
        r
    }

    /// Tops the reserve up, as far as descriptors allow.
    fn refill(&self) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        while spare.len() < FD_RESERVE {
            match std::fs::File::open("/dev/null") {
                Ok(f) => spare.push(f),
                Err(_) => break,
            }
        }
    }

    /// Frees one placeholder for the caller's store call.
    fn lend(&self) {
        drop(self.spare.lock().unwrap_or_else(|p| p.into_inner()).pop());
    }
}

/// Whether this thread is opening the store (a panic inside sled is then turned into an
/// error by the caller; the process-wide panic hook must not end the process).
pub fn opening_store() -> bool {
    OPENING.with(|o| o.get())
}

thread_local! {
    static OPENING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Creates `dir` (and its parents) for a new store, private to the service (0700).
pub fn create_state_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Opens sled in `dir`, retrying while a handle of this process lets go of the lock, and
/// turning a panic inside sled (it panics on some damaged files) into an error.
fn open_sled(dir: &Path) -> Result<sled::Db, StoreError> {
    let shown = dir.display().to_string();
    let config = sled::Config::new()
        .path(dir)
        .mode(sled::Mode::HighThroughput)
        // sled's default cache is 1 GiB; the daemon should stay small.
        .cache_capacity(64 << 20);
    // A previous handle in this process may still be closing (sled's flusher thread lets
    // go of the lock a moment after the last handle is dropped); another process holding
    // the lock is reported clearly after that grace period.
    let mut tries = 0;
    let opened = loop {
        match guarded_open(&config) {
            Err(sled::Error::Io(e)) if e.to_string().contains("acquire lock") && tries < 100 => {
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
    opened.map_err(|e| match e {
        sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) => {
            StoreError::Corrupt(format!("{shown}: {e}; restore it from a backup"))
        }
        other => StoreError::Open {
            path: shown.clone(),
            reason: other.to_string(),
        },
    })
}

/// `config.open()`, with a panic inside sled reported as corruption.
fn guarded_open(config: &sled::Config) -> sled::Result<sled::Db> {
    OPENING.with(|o| o.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
    OPENING.with(|o| o.set(false));
    r.unwrap_or_else(|panic| {
        let what = (panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".into());
        Err(sled::Error::ReportableBug(format!(
            "sled could not read its files ({what})"
        )))
    })
}

impl Db {
    fn open(dir: &Path) -> Result<Db, StoreError> {
        Self::over(Engine::Sled(open_sled(dir)?))
    }

    fn open_backend(dir: &Path, backend: &Backend) -> Result<Db, StoreError> {
        match backend {
            Backend::Sled => Self::open(dir),
            Backend::Postgres(settings) => Self::over(Engine::Pg(kv::pg::Pg::open(settings)?)),
        }
    }

    fn over(db: Engine) -> Result<Db, StoreError> {
        let trees = db.trees(&TREES)?;
        let id_base = compact::id_base(&trees[META])?;
        Ok(Db { db, trees, id_base })
    }

    fn is_sled(&self) -> bool {
        matches!(self.db, Engine::Sled(_))
    }

    /// A fresh unique, increasing id.
    fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.id_base + self.db.generate_id()?)
    }
}

/// Runs store work off the async threads; a task that could not run is a storage error.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Io(format!("store task failed: {e}"))))
}

impl Store {
    /// Opens (or creates) the store in `dir`. An unknown schema version or a corrupt
    /// store is an error, never a silent reset.
    ///
    /// sled rewrites a damaged log while opening it (it keeps what precedes the damage and
    /// drops the rest). A small store's files are therefore read beforehand and, when the
    /// store is refused as damaged, written back as they were, for whoever restores it.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        // A compaction interrupted by a crash is finished (or undone) before anything else.
        compact::recover(dir)?;
        let saved = Saved::take(dir);
        let opened = Self::open_checked(dir, &Backend::Sled);
        if let (Err(e), Some(saved)) = (&opened, saved)
            && e.is_damage()
        {
            saved.restore(dir);
        }
        opened
    }

    /// Opens the store on the configured engine: sled in `dir`, or PostgreSQL.
    pub fn open_with(dir: &Path, backend: &Backend) -> Result<Store, StoreError> {
        match backend {
            Backend::Sled => Self::open(dir),
            Backend::Postgres(_) => Self::open_checked(dir, backend),
        }
    }

    fn open_checked(dir: &Path, backend: &Backend) -> Result<Store, StoreError> {
        let reserve = FdReserve::new();
        let db = Db::open_backend(dir, backend)?;
        let store = Store {
            shared: Arc::new(Shared {
                path: dir.to_path_buf(),
                backend: backend.clone(),
                db: RwLock::new(Some(Arc::new(db))),
                group: Default::default(),
                health: watch::Sender::new(None),
                reserve,
            }),
        };
        store.check_schema()?;
        Ok(store)
    }

    fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Fences this instance's transactions with the leader's lease `(holder, epoch)`:
    /// from now on each commits only while that lease is still this instance's
    /// (PostgreSQL; sled has one process and needs no fence). `None` lifts it.
    pub fn set_fence(&self, fence: Option<(String, i64)>) {
        if let Ok(db) = self.db()
            && let Engine::Pg(pg) = &db.db
        {
            pg.set_fence(fence);
        }
    }

    /// Whether the store is sled's (its files in the state directory).
    pub fn is_sled(&self) -> bool {
        matches!(self.shared.backend, Backend::Sled)
    }

    /// Where the store is, for messages: sled's directory or the PostgreSQL database.
    fn shown(&self) -> String {
        match &self.shared.backend {
            Backend::Sled => self.path().display().to_string(),
            Backend::Postgres(_) => self
                .with_db_unchecked(|db| match &db.db {
                    Engine::Pg(pg) => Ok(format!("PostgreSQL database {}", pg.name())),
                    Engine::Sled(_) => Ok(String::new()),
                })
                .unwrap_or_else(|_| "the PostgreSQL database".into()),
        }
    }

    /// The open database, unless the store is failing.
    fn db(&self) -> Result<Arc<Db>, StoreError> {
        if let Some(reason) = self.failure() {
            return Err(StoreError::Unavailable(reason));
        }
        let db = self.shared.db.read().unwrap_or_else(|p| p.into_inner());
        db.clone()
            .ok_or_else(|| StoreError::Unavailable("the store is being reopened".into()))
    }

    /// Runs `f` on the open database: with a descriptor of the reserve freed for it, and
    /// marking the store failing if sled itself fails.
    fn with<T>(&self, f: impl FnOnce(&Db) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let db = self.db()?;
        self.shared.reserve.lend();
        let r = f(&db);
        self.shared.reserve.refill();
        if let Err(e) = &r {
            self.note(e);
        }
        r
    }

    /// Marks the store failing after an error of sled's own (not a bad value of ours).
    fn note(&self, e: &StoreError) {
        if !matches!(e, StoreError::Io(_) | StoreError::Damaged(_)) {
            return;
        }
        let reason = e.to_string();
        let first = self.shared.health.send_if_modified(|h| {
            let first = h.is_none();
            if first {
                *h = Some(reason.clone());
            }
            first
        });
        if first {
            tracing::error!(error = %reason, "the store failed; refusing work until it is proved to work again");
        }
    }

    /// Why the store is failing, while it is.
    pub fn failure(&self) -> Option<String> {
        self.shared.health.borrow().clone()
    }

    /// Follows the store's health: `Some(reason)` while failing.
    pub fn health(&self) -> watch::Receiver<Option<String>> {
        self.shared.health.subscribe()
    }

    /// Brings a failing store back (blocking): a probe write made durable proves the open
    /// database works; otherwise the database is closed and opened again, which replays
    /// sled's log as after a crash. An error leaves the store failing; see
    /// [`StoreError::is_damage`] for the ones retrying cannot cure.
    pub fn recover(&self) -> Result<(), StoreError> {
        if self.failure().is_none() {
            return Ok(());
        }
        let current = self
            .shared
            .db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(db) = current
            && probe(&db).is_ok()
        {
            self.shared.health.send_replace(None);
            return Ok(());
        }
        self.reopen()?;
        self.with_db_unchecked(probe)?;
        self.shared.health.send_replace(None);
        Ok(())
    }

    /// Closes the database (every handle of this store) and opens it again.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.shared.db.write().unwrap_or_else(|p| p.into_inner());
        // Dropping our handle lets sled release its files once calls under way return;
        // `open_sled` waits a moment for that.
        drop(slot.take());
        let db = Db::open_backend(self.path(), &self.shared.backend)?;
        *slot = Some(Arc::new(db));
        drop(slot);
        // The reopened store must still be the one we had.
        self.check_schema()
    }

    fn with_db_unchecked<T>(
        &self,
        f: impl FnOnce(&Db) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let db = (self
            .shared
            .db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
        .ok_or_else(|| StoreError::Unavailable("the store is closed".into()))?;
        self.shared.reserve.lend();
        let r = f(&db);
        self.shared.reserve.refill();
        r
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        self.with_db_unchecked(|db| {
            let meta = &db.trees[META];
            match meta.get("schema_version")? {
                Some(v) => {
                    let found = std::str::from_utf8(&v).unwrap_or("?").to_string();
                    match found.parse::<u32>() {
                        Ok(SCHEMA_VERSION) => {}
                        Ok(n) if (OLDEST_SCHEMA..SCHEMA_VERSION).contains(&n) => {
                            Self::upgrade(db, n)?
                        }
                        _ => {
                            return Err(StoreError::Schema {
                                path: self.shown(),
                                found,
                                expected: SCHEMA_VERSION,
                            });
                        }
                    }
                    if db.is_sled() {
                        self.check_high_water(db)?;
                    }
                    Ok(())
                }
                None => self.initialise(db),
            }
        })
    }

    /// Moves a store of an older layout to this one. Schema 1 → 2 changes no stored value
    /// (both encodings are read); only the version, made durable, so older builds refuse
    /// the store from now on.
    fn upgrade(db: &Db, from: u32) -> Result<(), StoreError> {
        db.trees[META].insert("schema_version", SCHEMA_VERSION.to_string().as_bytes())?;
        db.db.flush()?;
        tracing::info!(
            from,
            to = SCHEMA_VERSION,
            "upgraded the store's schema (builds before this one will refuse it)"
        );
        Ok(())
    }

    /// A store without a schema version: a new one (initialised now), or one whose data
    /// is gone (refused).
    fn initialise(&self, db: &Db) -> Result<(), StoreError> {
        let mut has_data = false;
        for t in &db.trees {
            has_data |= !t.is_empty()?;
        }
        if db.is_sled() && self.path().join(MARKER).exists() {
            return Err(StoreError::Corrupt(format!(
                "{}: the store was initialised before but its data is gone or damaged; restore it from a backup (refusing to start empty)",
                self.path().display()
            )));
        }
        if has_data && !db.is_sled() {
            // Another instance on the database may have initialised it meanwhile (its
            // version is written before anything else).
            if let Some(v) = db.trees[META].get("schema_version")? {
                let found = std::str::from_utf8(&v).unwrap_or("?").to_string();
                if found == SCHEMA_VERSION.to_string() {
                    return Ok(());
                }
                return Err(StoreError::Schema {
                    path: self.shown(),
                    found,
                    expected: SCHEMA_VERSION,
                });
            }
        }
        if has_data {
            return Err(StoreError::Corrupt(format!(
                "{}: data present but no schema version; refusing to guess",
                self.shown()
            )));
        }
        db.trees[META].insert("schema_version", SCHEMA_VERSION.to_string().as_bytes())?;
        db.db.flush()?;
        if !db.is_sled() {
            return Ok(());
        }
        std::fs::write(
            self.path().join(MARKER),
            format!("schema {SCHEMA_VERSION}\n"),
        )
        .map_err(|e| StoreError::Io(format!("cannot write the store marker: {e}")))
    }

    /// The last audit sequence number known to be on disk, from the marker file.
    fn marker_high_water(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.path().join(MARKER)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("audit_high ")?.trim().parse().ok())
    }

    fn last_audit_seq(db: &Db) -> Result<Option<u64>, StoreError> {
        match db.trees[AUDIT].last()? {
            Some((k, _)) => Ok(Some(u64_of(&k)?)),
            None => Ok(None),
        }
    }

    /// sled recovers a damaged log by dropping everything after the damage, silently. The
    /// marker file remembers how far the audit log (append-only, every write durable)
    /// reached; a store that now ends before that has lost acknowledged data.
    fn check_high_water(&self, db: &Db) -> Result<(), StoreError> {
        let Some(expected) = self.marker_high_water() else {
            return Ok(());
        };
        let found = Self::last_audit_seq(db)?;
        if found.is_none_or(|f| f < expected) {
            return Err(StoreError::Corrupt(format!(
                "{}: the audit log ended at entry {expected} when last checked but now ends at {}; the store lost data it had acknowledged (a damaged disk or file?); restore it from a backup",
                self.path().display(),
                found.map(|f| f.to_string()).unwrap_or("nothing".into())
            )));
        }
        Ok(())
    }

    /// Records in the marker file how far the audit log reaches, for the check above.
    /// Called periodically and at shutdown; every audit entry is already durable, so the
    /// mark never runs ahead of the disk.
    pub fn save_high_water(&self) -> Result<(), StoreError> {
        if !self.is_sled() {
            // PostgreSQL does not drop a log's tail when it recovers.
            return Ok(());
        }
        let Some(seq) = self.with(Self::last_audit_seq)? else {
            return Ok(());
        };
        if self.marker_high_water() == Some(seq) {
            return Ok(());
        }
        let io = |e: std::io::Error| StoreError::Io(format!("cannot write the store marker: {e}"));
        let tmp = self.path().join(format!("{MARKER}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        use std::io::Write as _;
        write!(f, "schema {SCHEMA_VERSION}\naudit_high {seq}\n").map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, self.path().join(MARKER)).map_err(io)?;
        Ok(())
    }

    /// Runs `f` as one atomic transaction over every tree. `durable` flushes to disk
    /// before returning, so what is acknowledged afterwards survives a crash. `f` may
    /// run more than once (on conflict), so it must not have side effects outside `tx`.
    pub fn transaction<R: Send>(
        &self,
        durable: bool,
        f: impl Fn(&mut Txn<'_>) -> TxResult<R> + Sync,
    ) -> Result<R, StoreError> {
        let opts = TxOpts {
            durable,
            fenced: true,
            ..TxOpts::default()
        };
        self.with(|db| {
            let r = db.db.transaction(&db.trees, opts, |view| {
                let mut tx = Txn {
                    t: view,
                    id_base: db.id_base,
                };
                f(&mut tx).map_err(|e| e.0)
            });
            // Only the engine's own failures mark the store failing, not an abort of ours.
            match r {
                Ok(v) => Ok(Ok(v)),
                Err(TxFail::Abort(e)) => Ok(Err(e)),
                Err(TxFail::Storage(e)) => Err(e),
            }
        })?
    }

    /// Flushes everything written so far to disk (off the async threads).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let store = self.clone();
        off_runtime(move || store.with(|db| db.db.flush().map(drop))).await
    }

    /// Makes a write that has already happened durable, sharing the flush with concurrent
    /// callers: a flush that starts after our write covers it, so whoever gets the lock
    /// after someone else flushed past our ticket returns at once.
    async fn commit_write(&self) -> Result<(), StoreError> {
        let group = &self.shared.group;
        let ticket = group.written.fetch_add(1, SeqCst) + 1;
        let _guard = group.lock.lock().await;
        if group.flushed.load(SeqCst) >= ticket {
            return Ok(());
        }
        let upto = group.written.load(SeqCst);
        self.flush().await?;
        group.flushed.fetch_max(upto, SeqCst);
        Ok(())
    }

    /// Runs `f` on one of the engine's trees, for tests that tamper with the store.
    #[cfg(test)]
    fn tree<T>(&self, i: usize, f: impl FnOnce(&Tree) -> T) -> T {
        f(&self.db().expect("store open").trees[i])
    }

    #[cfg(test)]
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.with(|db| db.db.flush().map(drop))
    }

    /// A tree's entries (in `range`), streamed; an unavailable store yields one error.
    fn scan(&self, tree: usize, range: impl std::ops::RangeBounds<Vec<u8>>) -> KvIter {
        match self.db() {
            Ok(db) => db.trees[tree].range(range),
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }

    // -- reads outside transactions (read side: lookup, gate, status, workers) --

    pub fn subject(&self, id: u64) -> Result<Option<SubjectRecord>, StoreError> {
        self.with(|db| {
            db.trees[SUBJECTS]
                .get(id.to_be_bytes())?
                .map(|v| decode("subject", &v))
                .transpose()
        })
    }

    /// The live subject an alias belongs to (following merges).
    pub fn subject_by_alias(&self, alias: &str) -> Result<Option<SubjectRecord>, StoreError> {
        let Some(id) = self.with(|db| db.trees[ALIASES].get(alias.as_bytes()))? else {
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

    /// The send gate's read: the live subject an alias belongs to (following merges) and
    /// its consent registers. Only the registers are decoded; a subject's alias and link
    /// lists, which the gate's answer does not use, are skipped.
    pub fn consent_by_alias(&self, alias: &str) -> Result<Option<(u64, Consent)>, StoreError> {
        self.with(|db| consent_of(db, alias))
    }

    /// Runs `f` with a [`ConsentReads`] (many gate reads in one store call: the batch
    /// gate); `Err` only if the store is unavailable.
    pub fn consent_reads<T>(&self, f: impl FnOnce(&ConsentReads) -> T) -> Result<T, StoreError> {
        self.with(|db| Ok(f(&ConsentReads { store: self, db })))
    }

    pub fn link(&self, connector: &str, record: &str) -> Result<Option<LinkRecord>, StoreError> {
        self.with(|db| {
            db.trees[LINKS]
                .get(link_key(connector, record))?
                .map(|v| decode("link", &v))
                .transpose()
        })
    }

    pub fn cursor(&self, connector: &str) -> Result<Option<String>, StoreError> {
        self.with(|db| {
            Ok(db.trees[CURSORS]
                .get(connector.as_bytes())?
                .map(|v| String::from_utf8_lossy(&v).into_owned()))
        })
    }

    /// Up to `limit` outbox entries of a connector that may be tried at `now` and are
    /// not in flight, oldest key first.
    pub fn due_pushes(
        &self,
        connector: &str,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<(String, OutboxEntry)>, StoreError> {
        self.with(|db| {
            let mut out = Vec::new();
            for kv in db.trees[OUTBOX].scan_prefix(prefix(connector)) {
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
        })
    }

    /// The earliest time any pending entry of the connector becomes due.
    pub fn next_due(&self, connector: &str) -> Result<Option<Timestamp>, StoreError> {
        self.with(|db| {
            let mut min: Option<Timestamp> = None;
            for kv in db.trees[OUTBOX].scan_prefix(prefix(connector)) {
                let (_, v) = kv?;
                let e: OutboxEntry = decode("outbox", &v)?;
                if !e.in_flight {
                    min = Some(min.map_or(e.not_before, |m| m.min(e.not_before)));
                }
            }
            Ok(min)
        })
    }

    pub fn outbox_entry(
        &self,
        connector: &str,
        key: &str,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        self.with(|db| {
            db.trees[OUTBOX]
                .get(link_key(connector, key))?
                .map(|v| decode("outbox", &v))
                .transpose()
        })
    }

    /// Every outbox entry (connector, key, entry); for status and tests.
    pub fn outbox(
        &self,
    ) -> impl Iterator<Item = Result<(String, String, OutboxEntry), StoreError>> + '_ {
        self.scan(OUTBOX, ..).map(|kv| {
            let (k, v) = kv?;
            let (c, key) = split_key(&k);
            Ok((c, key, decode("outbox", &v)?))
        })
    }

    #[cfg(test)]
    pub fn outbox_len(&self) -> usize {
        self.with(|db| db.trees[OUTBOX].len()).unwrap_or(0)
    }

    pub fn dead_letters(
        &self,
    ) -> impl Iterator<Item = Result<(String, String, DeadLetter), StoreError>> + '_ {
        self.scan(DEAD, ..).map(|kv| {
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
        self.with(|db| {
            db.trees[DEAD]
                .get(link_key(connector, key))?
                .map(|v| decode("dead letter", &v))
                .transpose()
        })
    }

    /// Audit entries with `seq >= from`, in order, streamed.
    pub fn audit_from(
        &self,
        from: u64,
    ) -> impl Iterator<Item = Result<AuditEntry, StoreError>> + '_ {
        self.scan(AUDIT, from.to_be_bytes().to_vec()..).map(|kv| {
            let (k, v) = kv?;
            let mut e: AuditEntry = decode("audit", &v)?;
            e.seq = u64_of(&k)?;
            Ok(e)
        })
    }

    /// The audit entries of one subject (and of the subjects merged into it), in order.
    pub fn subject_audit(&self, subject: &SubjectRecord) -> Result<Vec<AuditEntry>, StoreError> {
        self.with(|db| {
            let mut seqs = Vec::new();
            for id in std::iter::once(subject.id).chain(subject.merged_from.iter().copied()) {
                for kv in db.trees[SUBJECT_AUDIT].scan_prefix(id.to_be_bytes()) {
                    let (k, _) = kv?;
                    seqs.push(u64_of(&k[8..])?);
                }
            }
            seqs.sort_unstable();
            seqs.dedup();
            let mut out = Vec::with_capacity(seqs.len());
            for seq in seqs {
                if let Some(v) = db.trees[AUDIT].get(seq.to_be_bytes())? {
                    let mut e: AuditEntry = decode("audit", &v)?;
                    e.seq = seq;
                    out.push(e);
                }
            }
            Ok(out)
        })
    }

    /// Held opt-ins, oldest first.
    pub fn holds(&self) -> impl Iterator<Item = Result<HoldRecord, StoreError>> + Send {
        (self.scan(HOLDS, ..)).map(|kv| kv.and_then(|(_, v)| decode("hold", &v)))
    }

    /// Every source's guard window (held opt-ins included).
    pub fn guard_windows(&self) -> Result<Vec<(String, GuardWindow)>, StoreError> {
        (self.scan(GUARD, ..))
            .map(|kv| {
                let (k, v) = kv?;
                Ok((
                    String::from_utf8_lossy(&k).into_owned(),
                    decode("guard", &v)?,
                ))
            })
            .collect()
    }

    /// Runs `f` as a transaction and then discards every write it made: what a page
    /// would do, without doing it (`resync --dry-run`). `f` may run more than once.
    pub fn rehearse<R: Send>(
        &self,
        f: impl Fn(&mut Txn<'_>) -> TxResult<R> + Sync,
    ) -> Result<R, StoreError> {
        let kept: Mutex<Option<R>> = Mutex::new(None);
        let r = self.transaction(false, |tx| {
            let r = f(tx)?;
            *kept.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            Err(StoreError::Rehearsed.into())
        });
        match (r, kept.into_inner().unwrap_or_else(|p| p.into_inner())) {
            (Err(StoreError::Rehearsed), Some(r)) => Ok(r),
            (Err(e), _) => Err(e),
            (Ok(()), _) => unreachable!("a rehearsal always aborts"),
        }
    }

    /// Decision totals: (`scope:decision`, count).
    pub fn counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.with(|db| {
            db.trees[COUNTS]
                .iter()
                .map(|kv| {
                    let (k, v) = kv?;
                    Ok((String::from_utf8_lossy(&k).into_owned(), i64_of(&v)))
                })
                .collect()
        })
    }

    #[cfg(test)]
    pub fn subject_count(&self) -> usize {
        self.with(|db| db.trees[SUBJECTS].len()).unwrap_or(0)
    }

    // -- webhook inbox --

    /// An untagged append (as written before inboxes named their connector).
    #[cfg(test)]
    pub async fn inbox_append(
        &self,
        received_at: Timestamp,
        body: &[u8],
    ) -> Result<u64, StoreError> {
        self.inbox_append_for(None, received_at, body).await
    }

    /// Appends a webhook body received by connector `connector` durably and returns its
    /// sequence number. The store's work (numbering, inserting, the flush) runs off the
    /// async threads.
    pub async fn inbox_append_for(
        &self,
        connector: Option<&str>,
        received_at: Timestamp,
        body: &[u8],
    ) -> Result<u64, StoreError> {
        let rec = InboxRecord {
            received_at,
            body: body.to_vec(),
            reason: None,
            connector: connector.map(str::to_string),
        };
        let value = encode_json(&rec);
        drop(rec);
        let store = self.clone();
        let seq = off_runtime(move || store.insert_inbox(value)).await?;
        self.commit_write().await?;
        Ok(seq)
    }

    fn insert_inbox(&self, value: Vec<u8>) -> Result<u64, StoreError> {
        self.with(|db| {
            // Numbering and inserting under one lock makes entries visible in sequence
            // order: otherwise a poll could read number 6, move its cursor past 5 while 5
            // is still being written, and never read that acknowledged webhook. On sled
            // the lock is ours; PostgreSQL holds one for every process on the database
            // (see `append`), on the server, so appends do not queue here.
            let group = &self.shared.group;
            let _order = (db.is_sled())
                .then(|| group.append_order.lock().unwrap_or_else(|p| p.into_inner()));
            // Sequence numbers start at 1: a cursor of 0 means "nothing read yet".
            db.db.append(&db.trees[INBOX], db.id_base, &value)
        })
    }

    /// Keeps a signed but unusable body for the operator, durably.
    pub async fn quarantine(
        &self,
        received_at: Timestamp,
        body: &[u8],
        reason: &str,
    ) -> Result<(), StoreError> {
        let rec = InboxRecord {
            received_at,
            body: body.to_vec(),
            reason: Some(reason.to_string()),
            connector: None,
        };
        let value = encode_json(&rec);
        let store = self.clone();
        off_runtime(move || {
            store.with(|db| {
                let seq = db.next_id()?;
                db.trees[QUARANTINE].insert(seq.to_be_bytes(), value)?;
                Ok(())
            })
        })
        .await?;
        self.commit_write().await
    }

    pub fn quarantine_len(&self) -> usize {
        self.with(|db| db.trees[QUARANTINE].len()).unwrap_or(0)
    }

    /// Inbox entries after `after`, oldest first.
    #[cfg(test)]
    pub fn inbox_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, InboxRecord)>, StoreError> {
        self.inbox_after_where(after, limit, |_| true)
    }

    /// Inbox entries after `after` whose connector tag `mine` accepts, oldest first.
    pub fn inbox_after_where(
        &self,
        after: u64,
        limit: usize,
        mine: impl Fn(Option<&str>) -> bool,
    ) -> Result<Vec<(u64, InboxRecord)>, StoreError> {
        let start = after.saturating_add(1);
        self.with(|db| {
            let mut out = Vec::new();
            for kv in db.trees[INBOX].range(start.to_be_bytes()..) {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = kv?;
                let rec: InboxRecord = decode("inbox", &v)?;
                if mine(rec.connector.as_deref()) {
                    out.push((u64_of(&k)?, rec));
                }
            }
            Ok(out)
        })
    }

    pub fn inbox_len(&self) -> usize {
        self.with(|db| db.trees[INBOX].len()).unwrap_or(0)
    }

    /// Drops inbox entries up to and including `seq` (already applied: their cursor is
    /// saved). Safe to skip or repeat after a crash: polls read only after the cursor.
    /// Only entries whose connector tag `mine` accepts: another account's entries wait for
    /// its own poll.
    pub fn inbox_trim_where(
        &self,
        seq: u64,
        mine: impl Fn(Option<&str>) -> bool,
    ) -> Result<usize, StoreError> {
        self.with(|db| {
            let mut keys = Vec::new();
            for kv in db.trees[INBOX].range(..=seq.to_be_bytes()) {
                let (k, v) = kv?;
                let rec: InboxRecord = decode("inbox", &v)?;
                if mine(rec.connector.as_deref()) {
                    keys.push(k);
                }
            }
            for k in &keys {
                db.trees[INBOX].remove(k)?;
            }
            Ok(keys.len())
        })
    }

    // -- the write API's intake --

    /// Records the write API's events durably, with their idempotency keys: the events
    /// whose key is new become one inbox entry of `connector` (a JSON array of their
    /// `body`s, for its worker to apply); a key seen before is answered from its record.
    /// Returns once the entry and the keys are on disk, sharing the flush with webhooks.
    pub async fn api_append(
        &self,
        connector: &str,
        received_at: Timestamp,
        claims: Vec<KeyClaim>,
    ) -> Result<Vec<Claimed>, StoreError> {
        let store = self.clone();
        let connector = connector.to_string();
        let claimed =
            off_runtime(move || store.insert_api(&connector, received_at, &claims)).await?;
        if claimed.iter().any(|c| matches!(c, Claimed::New(_))) {
            self.commit_write().await?;
        }
        Ok(claimed)
    }

    fn insert_api(
        &self,
        connector: &str,
        received_at: Timestamp,
        claims: &[KeyClaim],
    ) -> Result<Vec<Claimed>, StoreError> {
        self.with(|db| {
            let group = &self.shared.group;
            // The same order as webhooks: inbox entries become visible in sequence order.
            // The keys are read inside the transaction, under that order, so that two
            // requests with one key (in any process on the database) cannot both find it
            // new.
            let _order = group.append_order.lock().unwrap_or_else(|p| p.into_inner());
            let ordered = TxOpts {
                ordered: true,
                ..TxOpts::default()
            };
            let claimed = db.db.transaction(&db.trees, ordered, |t| {
                let seq = db.id_base + t[INBOX].generate_id()? + 1;
                let (out, fresh) = claim_keys(claims, received_at, seq, |key| {
                    match t[API_KEYS].get(key.as_bytes())? {
                        Some(v) => Ok(Some(decode("api key", &v).map_err(TxErr::Abort)?)),
                        None => Ok(None),
                    }
                })?;
                if fresh.is_empty() {
                    return Ok(out);
                }
                let mut body = b"[".to_vec();
                for (i, (c, _)) in fresh.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(&c.body);
                }
                body.push(b']');
                let entry = encode_json(&InboxRecord {
                    received_at,
                    body,
                    reason: None,
                    connector: Some(connector.to_string()),
                });
                t[INBOX].insert(seq.to_be_bytes(), entry.as_slice())?;
                for (c, r) in &fresh {
                    t[API_KEYS].insert(c.key.as_bytes(), encode(r))?;
                }
                Ok(out)
            });
            claimed.map_err(|(TxFail::Abort(e) | TxFail::Storage(e))| e)
        })
    }

    /// Pushes done but not yet read back: (connector, record, pushed at).
    pub fn unverified(
        &self,
    ) -> impl Iterator<Item = Result<(String, String, Timestamp), StoreError>> + '_ {
        self.scan(UNVERIFIED, ..).map(|kv| {
            let (k, v) = kv?;
            let (c, r) = split_key(&k);
            Ok((c, r, Timestamp(i64_of(&v))))
        })
    }

    /// Records with phone values that are not numbers: (connector, record, values).
    pub fn unreadable(
        &self,
        connector: Option<&str>,
    ) -> impl Iterator<Item = Result<(String, String, Vec<UnreadableNumber>), StoreError>> + '_
    {
        let scan = match connector {
            Some(c) => {
                // Keys are `connector \0 record`: the range ends before `connector \1`.
                let mut end = c.as_bytes().to_vec();
                end.push(1);
                self.scan(UNREADABLE, prefix(c)..end)
            }
            None => self.scan(UNREADABLE, ..),
        };
        scan.map(|kv| {
            let (k, v) = kv?;
            let (c, r) = split_key(&k);
            Ok((c, r, decode("unreadable numbers", &v)?))
        })
    }

    /// Unreadable phone values per connector.
    /// Every stored category of the template `name`: one per language, and the
    /// configured one.
    pub fn templates_named(&self, name: &str) -> Result<Vec<TemplateRecord>, StoreError> {
        self.with(|db| match db.trees[TEMPLATES].get(name.as_bytes())? {
            Some(v) => decode("template", &v),
            None => Ok(Vec::new()),
        })
    }

    /// How many template names the store knows a category of.
    pub fn template_names(&self) -> Result<usize, StoreError> {
        self.with(|db| db.trees[TEMPLATES].len())
    }

    pub fn unreadable_counts(&self) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        for (c, _, n) in self.unreadable(None).flatten() {
            *out.entry(c).or_insert(0) += n.len() as u64;
        }
        out
    }

    // -- retention --

    /// Forgets delivery keys (`seen`) first seen before `before`; returns how many. A key
    /// seen again meanwhile is kept (the removal compares the stored value).
    pub fn prune_seen(&self, before: Timestamp) -> Result<usize, StoreError> {
        self.prune(SEEN, |v| Ok(i64_of(v) < before.millis()))
    }

    /// Drops quarantined bodies received before `before`; returns how many.
    pub fn prune_quarantine(&self, before: Timestamp) -> Result<usize, StoreError> {
        self.prune(QUARANTINE, |v| {
            let rec: InboxRecord = decode("quarantine", v)?;
            Ok(rec.received_at < before)
        })
    }

    fn prune(
        &self,
        tree: usize,
        expired: impl Fn(&[u8]) -> Result<bool, StoreError>,
    ) -> Result<usize, StoreError> {
        self.with(|db| {
            let mut removed = 0;
            for kv in db.trees[tree].iter() {
                let (k, v) = kv?;
                // An undecodable entry is left for an operator to look at.
                if expired(&v).unwrap_or(false)
                    && db.trees[tree].compare_and_swap(&k, Some(&v), None)?
                {
                    removed += 1;
                }
            }
            Ok(removed)
        })
    }
}

/// The files of an initialised store, read before sled opens them (see [`Store::open`]).
struct Saved {
    files: Vec<(PathBuf, Vec<u8>)>,
}

/// Stores larger than this are not copied before opening (the copy is held in memory).
const SAVE_LIMIT: u64 = 64 << 20;

impl Saved {
    /// The regular files directly in `dir`, if the store was initialised before and they
    /// are small enough to hold.
    fn take(dir: &Path) -> Option<Saved> {
        if !dir.join(MARKER).exists() {
            return None;
        }
        let mut files = Vec::new();
        let mut total = 0;
        for entry in std::fs::read_dir(dir).ok()? {
            let entry = entry.ok()?;
            let meta = entry.metadata().ok()?;
            if !meta.is_file() {
                continue;
            }
            total += meta.len();
            if total > SAVE_LIMIT {
                return None;
            }
            files.push((entry.path(), std::fs::read(entry.path()).ok()?));
        }
        Some(Saved { files })
    }

    /// Writes every saved file back as it was and removes regular files sled added.
    fn restore(self, dir: &Path) {
        let known: Vec<&Path> = self.files.iter().map(|(p, _)| p.as_path()).collect();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if entry.metadata().is_ok_and(|m| m.is_file()) && !known.contains(&p.as_path()) {
                let _ = std::fs::remove_file(&p);
            }
        }
        for (path, bytes) in &self.files {
            if let Err(e) = std::fs::write(path, bytes) {
                tracing::warn!(file = %path.display(), error = %e, "cannot put a store file back as it was");
            }
        }
    }
}

/// Makes one small write durable: proves the database takes writes again.
/// What each claim of one write API request finds (`stored` reads a recorded key), and
/// the claims recorded now, numbered after the request's inbox entry `seq`.
#[allow(clippy::type_complexity)]
fn claim_keys(
    claims: &[KeyClaim],
    received_at: Timestamp,
    seq: u64,
    stored: impl Fn(&str) -> Result<Option<ApiKeyRecord>, TxErr>,
) -> Result<(Vec<Claimed>, Vec<(&KeyClaim, ApiKeyRecord)>), TxErr> {
    let mut out: Vec<Claimed> = Vec::with_capacity(claims.len());
    let mut fresh: Vec<(&KeyClaim, ApiKeyRecord)> = Vec::new();
    for c in claims {
        let earlier = match fresh.iter().find(|(f, _)| f.key == c.key) {
            Some((_, r)) => Some(r.clone()),
            None => stored(&c.key)?,
        };
        out.push(match earlier {
            Some(r) if r.content == c.content => Claimed::Same(r),
            Some(r) => Claimed::Conflict(r),
            None => {
                let r = ApiKeyRecord {
                    content: c.content.clone(),
                    recorded_at: received_at,
                    receipt: format!("api-{seq}-{}", fresh.len()),
                };
                fresh.push((c, r.clone()));
                Claimed::New(r)
            }
        });
    }
    Ok((out, fresh))
}

fn probe(db: &Db) -> Result<(), StoreError> {
    db.trees[META].insert("probe", Timestamp::now().millis().to_be_bytes())?;
    db.db.flush()?;
    Ok(())
}

/// Gate reads within one [`Store::consent_reads`] call.
pub struct ConsentReads<'a> {
    store: &'a Store,
    db: &'a Db,
}

impl ConsentReads<'_> {
    /// As [`Store::consent_by_alias`].
    pub fn consent_by_alias(&self, alias: &str) -> Result<Option<(u64, Consent)>, StoreError> {
        let r = consent_of(self.db, alias);
        if let Err(e) = &r {
            self.store.note(e);
        }
        r
    }
}

/// What the gate decodes of a subject; from JSON, serde skips the other fields without
/// building them.
#[derive(Deserialize)]
struct ConsentView {
    consent: Consent,
    merged_into: Option<u64>,
}

/// The same from a compact subject. postcard reads fields in [`SubjectRecord`]'s order and
/// cannot skip one unread, so the fields before `merged_into` are read borrowed (no string
/// copied) and those after it not at all.
#[derive(Deserialize)]
struct CompactConsentView<'a> {
    _id: u64,
    #[serde(borrow)]
    _aliases: Vec<&'a str>,
    consent: Consent,
    #[serde(borrow)]
    _links: Vec<(&'a str, &'a str)>,
    _last_inbound: Option<Timestamp>,
    _created_at: Timestamp,
    merged_into: Option<u64>,
}

impl ConsentView {
    fn decode(bytes: &[u8]) -> Result<ConsentView, StoreError> {
        match bytes.split_first() {
            Some((&FORMAT_COMPACT, rest)) => {
                let v: CompactConsentView = postcard::from_bytes(rest)
                    .map_err(|e| StoreError::Corrupt(format!("subject: {e}")))?;
                Ok(ConsentView {
                    consent: v.consent,
                    merged_into: v.merged_into,
                })
            }
            _ => decode("subject", bytes),
        }
    }
}

/// The live subject of `alias` and its registers (see [`Store::consent_by_alias`]).
fn consent_of(db: &Db, alias: &str) -> Result<Option<(u64, Consent)>, StoreError> {
    let Some(id) = db.trees[ALIASES].get(alias.as_bytes())? else {
        return Ok(None);
    };
    let mut id = u64_of(&id)?;
    for _ in 0..16 {
        let Some(v) = db.trees[SUBJECTS].get(id.to_be_bytes())? else {
            return Ok(None);
        };
        let s = ConsentView::decode(&v)?;
        match s.merged_into {
            Some(next) => id = next,
            None => return Ok(Some((id, s.consent))),
        }
    }
    Err(StoreError::Corrupt(format!(
        "merge chain of subject {id} too long"
    )))
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
    t: &'a [TxTree<'a>],
    id_base: u64,
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
        let id = self.t[0].generate_id()?;
        Ok(self.id_base + id)
    }

    pub fn subject(&self, id: u64) -> TxResult<Option<SubjectRecord>> {
        self.get(SUBJECTS, "subject", &id.to_be_bytes())
    }

    pub fn put_subject(&self, s: &SubjectRecord) -> TxResult<()> {
        self.t[SUBJECTS].insert(s.id.to_be_bytes(), encode(s))?;
        Ok(())
    }

    pub fn alias(&self, alias: &str) -> TxResult<Option<u64>> {
        Ok(match self.t[ALIASES].get(alias.as_bytes())? {
            Some(v) => Some(u64_of(&v)?),
            None => None,
        })
    }

    pub fn put_alias(&self, alias: &str, subject: u64) -> TxResult<()> {
        self.t[ALIASES].insert(alias.as_bytes(), subject.to_be_bytes())?;
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
        self.t[OUTBOX].insert(link_key(connector, key), encode_json(e))?;
        Ok(())
    }

    pub fn remove_outbox(&self, connector: &str, key: &str) -> TxResult<()> {
        self.t[OUTBOX].remove(link_key(connector, key))?;
        Ok(())
    }

    pub fn put_dead(&self, connector: &str, key: &str, d: &DeadLetter) -> TxResult<()> {
        self.t[DEAD].insert(link_key(connector, key), encode_json(d))?;
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
        self.t[AUDIT].insert(seq.to_be_bytes(), encode(entry))?;
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
        self.t[SEEN].insert(k, now.millis().to_be_bytes())?;
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
            Some(t) => self.t[UNVERIFIED].insert(k, t.millis().to_be_bytes())?,
            None => drop(self.t[UNVERIFIED].remove(k)?),
        };
        Ok(())
    }

    /// Replaces a record's unreadable phone values (none: forgets them).
    pub fn set_unreadable(
        &self,
        connector: &str,
        record: &str,
        numbers: &[UnreadableNumber],
    ) -> TxResult<()> {
        let k = link_key(connector, record);
        if numbers.is_empty() {
            self.t[UNREADABLE].remove(k)?;
        } else {
            self.t[UNREADABLE].insert(k, encode(&numbers))?;
        }
        Ok(())
    }

    /// The stored categories of template `name`, one per language.
    pub fn templates(&self, name: &str) -> TxResult<Vec<TemplateRecord>> {
        Ok(self
            .get(TEMPLATES, "template", name.as_bytes())?
            .unwrap_or_default())
    }

    pub fn put_templates(&self, name: &str, records: &[TemplateRecord]) -> TxResult<()> {
        self.t[TEMPLATES].insert(name.as_bytes(), encode_json(&records))?;
        Ok(())
    }

    pub fn put_hold(&self, h: &HoldRecord) -> TxResult<()> {
        self.t[HOLDS].insert(h.id.to_be_bytes(), encode(h))?;
        Ok(())
    }

    pub fn remove_hold(&self, id: u64) -> TxResult<Option<HoldRecord>> {
        match self.t[HOLDS].remove(id.to_be_bytes())? {
            Some(v) => Ok(Some(decode("hold", &v)?)),
            None => Ok(None),
        }
    }

    pub fn guard_window(&self, source: &str) -> TxResult<GuardWindow> {
        Ok(self
            .get(GUARD, "guard", source.as_bytes())?
            .unwrap_or_default())
    }

    pub fn put_guard_window(&self, source: &str, w: &GuardWindow) -> TxResult<()> {
        self.t[GUARD].insert(source.as_bytes(), encode(w))?;
        Ok(())
    }

    /// Adds `delta` to a decision total.
    pub fn count(&self, key: &str, delta: i64) -> TxResult<()> {
        let cur = self.t[COUNTS]
            .get(key.as_bytes())?
            .map(|v| i64_of(&v))
            .unwrap_or(0);
        self.t[COUNTS].insert(key.as_bytes(), (cur + delta).to_be_bytes())?;
        Ok(())
    }
}

mod compact;
mod erasure;
mod kv;
pub mod lease;
pub mod migrate;
pub use compact::{compact, compact_if_pending};
pub use erasure::Tombstone;

#[cfg(test)]
pub mod testing;
#[cfg(test)]
mod tests;
