//! PostgreSQL as the store's engine, for several instances on one replicated database.
//!
//! Every tree lives in one table, `optout_kv (tree, key, value)`, ordered by its primary
//! key exactly as sled orders a tree (bytewise). Ids come from the sequence `optout_ids`.
//! Transactions run SERIALIZABLE and are run again on a serialization failure, as sled runs
//! a conflicting transaction again: the store's closures are written for that.
//!
//! Durability follows sled's model: sessions commit with `synchronous_commit = off`, and a
//! durable transaction or [`Pg::flush`] commits with it on. PostgreSQL writes one log in
//! commit order and flushes it up to a durable commit's record, so a durable commit covers
//! every commit that returned before it began: concurrent webhooks share one log flush
//! (group commit) just as they share one sled flush.
//!
//! The leader's lease (`optout_lease`) fences its transactions: once this process is told
//! it leads, each of its fenced transactions first checks, inside the same serializable
//! transaction, that the lease is still its own and unexpired, and keeps the lease row
//! share-locked until it ends. A take-over (an update of that row) therefore waits for a
//! fenced transaction under way, and one that began before a take-over committed fails to
//! serialize and, run again, finds the lease gone: an old leader never commits after its
//! successor took over.
//!
//! The driver is the synchronous `postgres` crate, which runs its own small runtime: calls
//! made on one of tokio's worker threads are moved out of the way first ([`blocking`]).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, Statement};

use super::{TxErr, TxFail, TxOpts, TxTree, Val};
use crate::store::{PgSettings, StoreError};

/// The SQL layout this build reads and writes (see [`MIGRATIONS`]).
pub const SQL_VERSION: i32 = 1;

/// Forward migrations: entry `i` takes the layout from version `i` to `i + 1`.
const MIGRATIONS: [&str; SQL_VERSION as usize] = [r#"
CREATE TABLE optout_kv (
    tree smallint NOT NULL,
    key bytea NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (tree, key)
);
CREATE SEQUENCE optout_ids;
CREATE TABLE optout_lease (
    name text PRIMARY KEY,
    holder text NOT NULL,
    epoch bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE TABLE optout_instances (
    name text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    version text NOT NULL,
    started_at timestamptz NOT NULL,
    seen_at timestamptz NOT NULL,
    detail text NOT NULL DEFAULT ''
);
"#];

/// Advisory lock keys (one namespace of this program's own).
const LOCK_SCHEMA: i64 = 0x6f70_746f_7574_0001;
const LOCK_APPEND: i64 = 0x6f70_746f_7574_0002;

/// Entries fetched per round trip while scanning a tree.
const PAGE: i64 = 1000;

/// An open PostgreSQL engine: a pool of connections. Cheap to clone.
#[derive(Clone)]
pub struct Pg(Arc<Inner>);

struct Inner {
    pool: r2d2::Pool<Manager>,
    /// What fenced transactions check: (holder, epoch) while this process leads.
    fence: RwLock<Option<(String, i64)>>,
    /// The database's name, for messages (never the URL: it may hold a password).
    name: String,
}

/// One pooled connection and its prepared statements.
pub struct Conn {
    /// Always `Some` until dropped: closing a connection blocks, so it is closed where
    /// blocking is allowed (see the `Drop` below).
    client: Option<Client>,
    st: Statements,
}

impl Conn {
    fn parts(&mut self) -> (&mut Client, &Statements) {
        (self.client.as_mut().expect("open connection"), &self.st)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            blocking(move || drop(client));
        }
    }
}

struct Statements {
    get: Statement,
    upsert: Statement,
    delete: Statement,
    page: Statement,
    page_to: Statement,
    last: Statement,
    count: Statement,
    next_id: Statement,
    upsert_many: Statement,
    delete_many: Statement,
    append: Statement,
}

impl Statements {
    fn prepare(c: &mut Client) -> Result<Statements, postgres::Error> {
        Ok(Statements {
            get: c.prepare("SELECT value FROM optout_kv WHERE tree = $1 AND key = $2")?,
            upsert: c.prepare(
                "INSERT INTO optout_kv (tree, key, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value",
            )?,
            delete: c
                .prepare("DELETE FROM optout_kv WHERE tree = $1 AND key = $2 RETURNING value")?,
            page: c.prepare(
                "SELECT key, value FROM optout_kv WHERE tree = $1 AND key >= $2 \
                 ORDER BY key LIMIT $3",
            )?,
            page_to: c.prepare(
                "SELECT key, value FROM optout_kv WHERE tree = $1 AND key >= $2 AND key < $4 \
                 ORDER BY key LIMIT $3",
            )?,
            last: c.prepare(
                "SELECT key, value FROM optout_kv WHERE tree = $1 ORDER BY key DESC LIMIT 1",
            )?,
            count: c.prepare("SELECT count(*) FROM optout_kv WHERE tree = $1")?,
            next_id: c.prepare("SELECT nextval('optout_ids')")?,
            upsert_many: c.prepare(
                "INSERT INTO optout_kv (tree, key, value) \
                 SELECT * FROM unnest($1::smallint[], $2::bytea[], $3::bytea[]) \
                 ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value",
            )?,
            delete_many: c.prepare(
                "DELETE FROM optout_kv k USING unnest($1::smallint[], $2::bytea[]) AS d(tree, key) \
                 WHERE k.tree = d.tree AND k.key = d.key",
            )?,
            // The lock (held to the statement's commit) is taken before the number is
            // drawn: numbers commit, and so become visible, in increasing order.
            append: c.prepare(
                "WITH ordered AS (SELECT pg_advisory_xact_lock($1)) \
                 INSERT INTO optout_kv (tree, key, value) \
                 SELECT $2, int8send(nextval('optout_ids') + $3), $4 FROM ordered \
                 RETURNING key",
            )?,
        })
    }
}

/// Opens connections for the pool, each with its statements prepared.
pub(in crate::store) struct Manager {
    config: postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Conn, postgres::Error> {
        let mut client = self.config.connect(self.tls.clone())?;
        let st = Statements::prepare(&mut client)?;
        Ok(Conn {
            client: Some(client),
            st,
        })
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), postgres::Error> {
        conn.parts().0.simple_query("").map(drop)
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.client.as_ref().is_none_or(Client::is_closed)
    }
}

/// Runs blocking database work: on a tokio worker thread it is moved out of the way (the
/// driver runs a runtime of its own, which cannot start inside another).
pub(in crate::store) fn blocking<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        Ok(_) => std::thread::scope(|s| s.spawn(f).join().expect("store thread")),
        Err(_) => f(),
    }
}

fn io(e: postgres::Error) -> StoreError {
    StoreError::Io(format!("PostgreSQL: {e}"))
}

fn is_conflict(e: &postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(&SqlState::T_R_SERIALIZATION_FAILURE) | Some(&SqlState::T_R_DEADLOCK_DETECTED)
    )
}

fn tx_err(e: postgres::Error) -> TxErr {
    if is_conflict(&e) {
        TxErr::Retry
    } else {
        TxErr::Storage(io(e))
    }
}

/// The TLS set-up: the configured CA file, else the public web roots. Whether TLS is used
/// at all is the URL's `sslmode` (`disable`, `prefer` — the default — or `require`).
fn tls(settings: &PgSettings) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match &settings.tls_ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read store.tls_ca_file {}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("store.tls_ca_file: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("store.tls_ca_file: {e}"))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl Pg {
    /// Connects, brings the SQL layout up to date (refusing a newer one) and returns the
    /// engine.
    pub fn open(settings: &PgSettings) -> Result<Pg, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: "the PostgreSQL database (store.url)".into(),
            reason,
        };
        let mut config: postgres::Config = (settings.url.expose().parse())
            .map_err(|e| open_err(format!("store.url is not a PostgreSQL URL: {e}")))?;
        // A session stalled inside a transaction (its process paused or cut off) is ended
        // by the server after one lease: a leader's transaction holds the lease row
        // share-locked, and a successor's take-over must not wait on it for ever. The
        // stalled transaction is rolled back, so it can never commit afterwards.
        let options = format!(
            "-c synchronous_commit=off -c client_min_messages=warning \
             -c idle_in_transaction_session_timeout={}",
            settings.lease.as_millis().max(1000)
        );
        config
            .options(&options)
            .application_name(&format!("optout-sync {}", settings.instance))
            .connect_timeout(Duration::from_secs(10))
            .keepalives_idle(Duration::from_secs(30));
        let name = config.get_dbname().unwrap_or("postgres").to_string();
        let manager = Manager {
            config,
            tls: tls(settings).map_err(open_err)?,
        };
        // The layout first: pooled connections prepare statements over its tables.
        blocking(|| migrate(&manager, &name))?;
        let pool = blocking(|| {
            r2d2::Pool::builder()
                .max_size(settings.pool_size)
                .min_idle(Some(1))
                // No round trip to check each connection handed out (it was half the
                // gate's); a broken one fails its statement, is reported, and is dropped.
                .test_on_check_out(false)
                .connection_timeout(Duration::from_secs(10))
                .error_handler(Box::new(r2d2::NopErrorHandler))
                .build(manager)
        })
        .map_err(|e| open_err(format!("cannot connect: {e}")))?;
        Ok(Pg(Arc::new(Inner {
            pool,
            fence: RwLock::new(None),
            name,
        })))
    }

    /// The database's name (for messages).
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// A pooled connection; failing to get one is a storage error.
    pub(in crate::store) fn conn(&self) -> Result<r2d2::PooledConnection<Manager>, StoreError> {
        blocking(|| self.0.pool.get())
            .map_err(|e| StoreError::Io(format!("PostgreSQL: no connection: {e}")))
    }

    /// Runs `f` on a pooled connection's client (lease and instance bookkeeping).
    pub(in crate::store) fn with_client<T: Send>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn()?;
        blocking(|| f(conn.parts().0)).map_err(io)
    }

    /// Fences this process's transactions with the lease `(holder, epoch)` (`None`: no
    /// longer, or never, the leader).
    pub(in crate::store) fn set_fence(&self, fence: Option<(String, i64)>) {
        *self.0.fence.write().unwrap_or_else(|p| p.into_inner()) = fence;
    }

    fn query_one_val(
        &self,
        st: fn(&Statements) -> &Statement,
        tree: i16,
        key: &[u8],
    ) -> Result<Option<Val>, StoreError> {
        let mut conn = self.conn()?;
        let (client, s) = conn.parts();
        let rows = blocking(|| client.query(st(s), &[&tree, &key])).map_err(io)?;
        Ok(rows.first().map(|r| Val::Owned(r.get(0))))
    }

    pub fn get(&self, tree: i16, key: &[u8]) -> Result<Option<Val>, StoreError> {
        self.query_one_val(|s| &s.get, tree, key)
    }

    pub fn remove(&self, tree: i16, key: &[u8]) -> Result<Option<Val>, StoreError> {
        self.query_one_val(|s| &s.delete, tree, key)
    }

    pub fn insert(&self, tree: i16, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let (client, st) = conn.parts();
        blocking(|| client.execute(&st.upsert, &[&tree, &key, &value])).map_err(io)?;
        Ok(())
    }

    pub fn compare_and_swap(
        &self,
        tree: i16,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let client = conn.parts().0;
        let n = blocking(|| match (old, new) {
            (None, None) => client.execute(
                "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM optout_kv WHERE tree = $1 AND key = $2)",
                &[&tree, &key],
            ),
            (None, Some(new)) => client.execute(
                "INSERT INTO optout_kv (tree, key, value) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&tree, &key, &new],
            ),
            (Some(old), None) => client.execute(
                "DELETE FROM optout_kv WHERE tree = $1 AND key = $2 AND value = $3",
                &[&tree, &key, &old],
            ),
            (Some(old), Some(new)) => client.execute(
                "UPDATE optout_kv SET value = $4 WHERE tree = $1 AND key = $2 AND value = $3",
                &[&tree, &key, &old, &new],
            ),
        })
        .map_err(io)?;
        Ok(n == 1)
    }

    /// Entries from `from` to `to`, a page per round trip.
    pub fn range(&self, tree: i16, from: Bound<Vec<u8>>, to: Bound<Vec<u8>>) -> PgRange {
        // Bytewise order: the first key after `k` is `k` followed by a zero byte.
        let after = |mut k: Vec<u8>| {
            k.push(0);
            k
        };
        let from = match from {
            Bound::Included(k) => k,
            Bound::Excluded(k) => after(k),
            Bound::Unbounded => Vec::new(),
        };
        let to = match to {
            Bound::Included(k) => Some(after(k)),
            Bound::Excluded(k) => Some(k),
            Bound::Unbounded => None,
        };
        PgRange {
            pg: self.clone(),
            tree,
            next: Some(from),
            to,
            page: std::collections::VecDeque::new(),
        }
    }

    pub fn last(&self, tree: i16) -> Result<Option<(Val, Val)>, StoreError> {
        let mut conn = self.conn()?;
        let (client, st) = conn.parts();
        let rows = blocking(|| client.query(&st.last, &[&tree])).map_err(io)?;
        Ok(rows
            .first()
            .map(|r| (Val::Owned(r.get(0)), Val::Owned(r.get(1)))))
    }

    pub fn first(&self, tree: i16) -> Result<Option<(Val, Val)>, StoreError> {
        self.range(tree, Bound::Unbounded, Bound::Unbounded)
            .next()
            .transpose()
    }

    pub fn len(&self, tree: i16) -> Result<usize, StoreError> {
        let mut conn = self.conn()?;
        let (client, st) = conn.parts();
        let row = blocking(|| client.query_one(&st.count, &[&tree])).map_err(io)?;
        Ok(row.get::<_, i64>(0) as usize)
    }

    /// Inserts `value` under the next id + `offset` in the append order (see
    /// [`super::Engine::append`]); returns that number.
    pub fn append(&self, tree: i16, offset: u64, value: &[u8]) -> Result<u64, StoreError> {
        let offset =
            i64::try_from(offset).map_err(|_| StoreError::Corrupt("id base too large".into()))?;
        let mut conn = self.conn()?;
        let (client, st) = conn.parts();
        let row =
            blocking(|| client.query_one(&st.append, &[&LOCK_APPEND, &tree, &offset, &value]))
                .map_err(io)?;
        let key: Vec<u8> = row.get(0);
        let key: [u8; 8] = (key.as_slice().try_into())
            .map_err(|_| StoreError::Corrupt("an appended key is not a number".into()))?;
        Ok(u64::from_be_bytes(key))
    }

    pub fn next_id(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn()?;
        let (client, st) = conn.parts();
        let row = blocking(|| client.query_one(&st.next_id, &[])).map_err(io)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Makes ids handed out from now on exceed `floor` (a store migrated in).
    pub fn ensure_ids_above(&self, floor: u64) -> Result<(), StoreError> {
        let floor = i64::try_from(floor).map_err(|_| StoreError::Corrupt("id too large".into()))?;
        self.with_client(|c| {
            c.execute(
                "SELECT setval('optout_ids', GREATEST($1, (SELECT last_value FROM optout_ids)))",
                &[&floor],
            )
            .map(drop)
        })
    }

    /// Makes every commit that returned before this call durable: a synchronous commit
    /// waits for the log to be flushed up to its record, which follows theirs.
    ///
    /// PostgreSQL commits synchronously only a transaction that has a transaction id *and*
    /// wrote to the log (an id alone, as `txid_current()` takes, commits asynchronously
    /// and flushes nothing). A transactional log message is both, and touches no table.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.with_client(|c| {
            c.batch_execute(
                "BEGIN; SET LOCAL synchronous_commit TO on; \
                 SELECT pg_logical_emit_message(true, 'optout-sync', 'flush'); COMMIT",
            )
        })
    }

    /// Rewrites the table so that removed values leave the database's files (after an
    /// erasure). Takes an exclusive lock on the table for its duration.
    pub fn vacuum_full(&self) -> Result<(), StoreError> {
        self.with_client(|c| c.batch_execute("VACUUM FULL optout_kv"))
    }

    /// Runs `f` as one serializable transaction, again after a conflict.
    pub fn transaction<R: Send>(
        &self,
        opts: TxOpts,
        f: impl Fn(&[TxTree<'_>]) -> Result<R, TxErr> + Sync,
    ) -> Result<R, TxFail> {
        let fence = (opts.fenced)
            .then(|| {
                self.0
                    .fence
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            })
            .flatten();
        let mut conn = self.conn().map_err(TxFail::Storage)?;
        for attempt in 0u32.. {
            let (client, st) = conn.parts();
            match blocking(|| attempt_once(client, st, opts, fence.as_ref(), &f)) {
                Err(TxErr::Retry) if attempt < 10_000 => {
                    // Conflicts come in bursts; a short pause lets the winner finish.
                    std::thread::sleep(Duration::from_micros(100 * u64::from(attempt.min(50))));
                }
                Err(TxErr::Retry) => {
                    return Err(TxFail::Storage(StoreError::Io(
                        "PostgreSQL: a transaction kept conflicting".into(),
                    )));
                }
                Err(TxErr::Abort(e)) => return Err(TxFail::Abort(e)),
                Err(TxErr::Storage(e)) => return Err(TxFail::Storage(e)),
                Err(TxErr::Sled(e)) => return Err(TxFail::Storage(StoreError::Io(e.to_string()))),
                Ok(r) => return Ok(r),
            }
        }
        unreachable!("the loop returns")
    }
}

/// Creates or upgrades the tables, one process at a time; refuses a newer layout.
fn migrate(manager: &Manager, name: &str) -> Result<(), StoreError> {
    let mut c = (manager.config.connect(manager.tls.clone())).map_err(|e| StoreError::Open {
        path: format!("PostgreSQL database {name}"),
        reason: format!("cannot connect: {e}"),
    })?;
    c.execute("SELECT pg_advisory_lock($1)", &[&LOCK_SCHEMA])
        .map_err(io)?;
    let r = migrate_locked(&mut c).map_err(io)?;
    c.execute("SELECT pg_advisory_unlock($1)", &[&LOCK_SCHEMA])
        .map_err(io)?;
    r.map_err(|found| StoreError::Schema {
        path: format!("PostgreSQL database {name}"),
        found: format!("{found} (its SQL layout)"),
        expected: SQL_VERSION as u32,
    })
}

/// Brings the layout up to [`SQL_VERSION`]; `Err(found)` for a newer layout.
fn migrate_locked(c: &mut Client) -> Result<Result<(), i32>, postgres::Error> {
    c.batch_execute("CREATE TABLE IF NOT EXISTS optout_schema (version integer NOT NULL)")?;
    let found: i32 = match c.query_opt("SELECT version FROM optout_schema", &[])? {
        Some(row) => row.get(0),
        None => {
            c.execute("INSERT INTO optout_schema (version) VALUES (0)", &[])?;
            0
        }
    };
    if found > SQL_VERSION {
        return Ok(Err(found));
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let mut tx = c.transaction()?;
        tx.batch_execute(sql)?;
        tx.execute(
            "UPDATE optout_schema SET version = $1",
            &[&(from as i32 + 1)],
        )?;
        tx.commit()?;
    }
    Ok(Ok(()))
}

/// The statements that open a transaction, sent as one round trip: serializable; durable
/// when asked; the append order when asked; and the lease check when fenced (its count
/// is the batch's only row).
fn begin_sql(opts: TxOpts, fence: Option<&(String, i64)>) -> String {
    let mut sql = String::from("BEGIN ISOLATION LEVEL SERIALIZABLE;");
    if opts.durable {
        sql.push_str("SET LOCAL synchronous_commit TO on;");
    }
    if opts.ordered {
        sql.push_str(&format!("SELECT pg_advisory_xact_lock({LOCK_APPEND});"));
    }
    if let Some((holder, epoch)) = fence {
        // The holder is an instance name the configuration restricts to [A-Za-z0-9._-];
        // quotes are doubled all the same.
        let holder = holder.replace('\'', "''");
        // FOR SHARE: a successor's take-over (an UPDATE of the row) waits for this
        // transaction, or this one fails to serialize and finds the lease gone on retry.
        sql.push_str(&format!(
            "SELECT 1 FROM optout_lease WHERE name = 'leader' AND holder = '{holder}' \
             AND epoch = {epoch} AND expires_at > clock_timestamp() FOR SHARE;"
        ));
    }
    sql
}

/// Whether the lease check of [`begin_sql`] found the lease still held (its one row is
/// `1`; the batch's other statements return no row or an empty one).
fn lease_held(msgs: &[postgres::SimpleQueryMessage]) -> bool {
    msgs.iter().any(|m| match m {
        postgres::SimpleQueryMessage::Row(r) => r.get(r.len() - 1) == Some("1"),
        _ => false,
    })
}

/// An open transaction on a connection: rolled back unless it was committed, so that no
/// connection goes back to the pool inside a transaction (an error, or a panic in the
/// closure).
struct Open<'a> {
    client: &'a mut Client,
    done: bool,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.client.batch_execute("ROLLBACK");
        }
    }
}

/// One try of a transaction; `TxErr::Retry` when PostgreSQL found a conflict. Reads go to
/// the database as they come; writes are kept and sent at the end in two statements, so
/// a page of a hundred records costs its reads plus a handful of round trips.
fn attempt_once<R>(
    client: &mut Client,
    st: &Statements,
    opts: TxOpts,
    fence: Option<&(String, i64)>,
    f: &impl Fn(&[TxTree<'_>]) -> Result<R, TxErr>,
) -> Result<R, TxErr> {
    let begin = begin_sql(opts, fence);
    let mut open = Open {
        client,
        done: false,
    };
    let msgs = open.client.simple_query(&begin).map_err(tx_err)?;
    if fence.is_some() && !lease_held(&msgs) {
        return Err(TxErr::Abort(StoreError::Fenced));
    }
    let ptx = PgTx {
        client: RefCell::new(&mut *open.client),
        st,
        writes: RefCell::new(BTreeMap::new()),
    };
    let trees: Vec<TxTree<'_>> = (0..super::super::TREES.len() as i16)
        .map(|i| TxTree::Pg(&ptx, i))
        .collect();
    let r = f(&trees)?;
    drop(trees);
    let writes = ptx.writes.into_inner();
    write_all(open.client, st, writes)?;
    // A failed COMMIT has ended the transaction already.
    open.done = true;
    open.client.batch_execute("COMMIT").map_err(tx_err)?;
    Ok(r)
}

/// A transaction's kept writes: (tree, key) → the new value, or `None` for a removal.
type Writes = BTreeMap<(i16, Vec<u8>), Option<Vec<u8>>>;

/// Sends a transaction's writes: one upsert and one delete, in key order (concurrent
/// transactions lock rows in the same order).
fn write_all(client: &mut Client, st: &Statements, writes: Writes) -> Result<(), TxErr> {
    let (mut ut, mut uk, mut uv) = (Vec::new(), Vec::new(), Vec::new());
    let (mut dt, mut dk) = (Vec::new(), Vec::new());
    for ((tree, key), value) in writes {
        match value {
            Some(v) => {
                ut.push(tree);
                uk.push(key);
                uv.push(v);
            }
            None => {
                dt.push(tree);
                dk.push(key);
            }
        }
    }
    if !ut.is_empty() {
        (client.execute(&st.upsert_many, &[&ut, &uk, &uv])).map_err(tx_err)?;
    }
    if !dt.is_empty() {
        (client.execute(&st.delete_many, &[&dt, &dk])).map_err(tx_err)?;
    }
    Ok(())
}

/// What a transaction's trees do on PostgreSQL (a trait object, so that the trees need
/// not name the connection's lifetime).
pub trait TxOps {
    fn get(&self, tree: i16, key: &[u8]) -> Result<Option<Val>, TxErr>;
    fn insert(&self, tree: i16, key: &[u8], value: &[u8]) -> Result<(), TxErr>;
    fn remove(&self, tree: i16, key: &[u8]) -> Result<Option<Val>, TxErr>;
    fn next_id(&self) -> Result<u64, TxErr>;
}

/// An open transaction, shared by its trees: reads see its own kept writes first.
pub struct PgTx<'a> {
    client: RefCell<&'a mut Client>,
    st: &'a Statements,
    writes: RefCell<Writes>,
}

impl PgTx<'_> {
    fn read(&self, tree: i16, key: &[u8]) -> Result<Option<Vec<u8>>, TxErr> {
        if let Some(kept) = self.writes.borrow().get(&(tree, key.to_vec())) {
            return Ok(kept.clone());
        }
        let rows =
            (self.client.borrow_mut().query(&self.st.get, &[&tree, &key])).map_err(tx_err)?;
        Ok(rows.first().map(|r| r.get(0)))
    }
}

impl TxOps for PgTx<'_> {
    fn get(&self, tree: i16, key: &[u8]) -> Result<Option<Val>, TxErr> {
        Ok(self.read(tree, key)?.map(Val::Owned))
    }

    fn insert(&self, tree: i16, key: &[u8], value: &[u8]) -> Result<(), TxErr> {
        (self.writes.borrow_mut()).insert((tree, key.to_vec()), Some(value.to_vec()));
        Ok(())
    }

    fn remove(&self, tree: i16, key: &[u8]) -> Result<Option<Val>, TxErr> {
        let before = self.read(tree, key)?;
        (self.writes.borrow_mut()).insert((tree, key.to_vec()), None);
        Ok(before.map(Val::Owned))
    }

    fn next_id(&self) -> Result<u64, TxErr> {
        let row = (self.client.borrow_mut().query_one(&self.st.next_id, &[])).map_err(tx_err)?;
        Ok(row.get::<_, i64>(0) as u64)
    }
}

/// A tree's entries in order, fetched a page at a time as they are read.
pub struct PgRange {
    pg: Pg,
    tree: i16,
    /// Where the next page starts (`None`: the range is exhausted).
    next: Option<Vec<u8>>,
    to: Option<Vec<u8>>,
    page: std::collections::VecDeque<(Val, Val)>,
}

impl PgRange {
    fn fetch(&mut self) -> Result<(), StoreError> {
        let Some(from) = self.next.take() else {
            return Ok(());
        };
        let mut conn = self.pg.conn()?;
        let (client, st) = conn.parts();
        let (tree, to) = (self.tree, &self.to);
        let rows = blocking(|| match to {
            Some(to) => client.query(&st.page_to, &[&tree, &from, &PAGE, to]),
            None => client.query(&st.page, &[&tree, &from, &PAGE]),
        })
        .map_err(io)?;
        if rows.len() as i64 == PAGE {
            let mut last: Vec<u8> = rows[rows.len() - 1].get(0);
            last.push(0);
            self.next = Some(last);
        }
        self.page.extend(
            rows.iter()
                .map(|r| (Val::Owned(r.get(0)), Val::Owned(r.get(1)))),
        );
        Ok(())
    }
}

impl Iterator for PgRange {
    type Item = Result<(Val, Val), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.page.is_empty() {
            if let Err(e) = self.fetch() {
                self.next = None;
                return Some(Err(e));
            }
        }
        self.page.pop_front().map(Ok)
    }
}
