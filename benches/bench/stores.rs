//! The store dimension of the harness: which engine the daemons of a benchmark run on
//! (`BENCH_STORES=sled,postgres`), a fresh PostgreSQL database per daemon directory, the
//! server's own counters for a database, and the side-by-side table printed at the end.
//!
//! PostgreSQL needs an admin URL (`BENCH_PG`, else `OPTOUT_TEST_PG`): the harness creates
//! `optout_bench_<pid>_<n>` databases on that server and drops them when the run ends (and
//! those an earlier, interrupted run left, once its process is gone).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The engine under a benchmark's daemons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    Sled,
    Postgres,
}

impl Backend {
    pub fn label(self) -> &'static str {
        match self {
            Backend::Sled => "sled",
            Backend::Postgres => "postgres",
        }
    }
}

/// The backends this run benchmarks, in `BENCH_STORES` order, and PostgreSQL's admin URL.
pub struct Stores {
    pub list: Vec<Backend>,
    pub pg_admin: Option<String>,
}

/// Reads `BENCH_STORES` (default `sled`); `Err` says what is wrong.
pub fn from_env() -> Result<Stores, String> {
    let spec = std::env::var("BENCH_STORES").unwrap_or_default();
    let mut list = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let b = match name {
            "sled" => Backend::Sled,
            "postgres" | "postgresql" | "pg" => Backend::Postgres,
            other => return Err(format!("BENCH_STORES: unknown store {other:?}")),
        };
        if !list.contains(&b) {
            list.push(b);
        }
    }
    if list.is_empty() {
        list.push(Backend::Sled);
    }
    let pg_admin = ["BENCH_PG", "OPTOUT_TEST_PG"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
        .map(|v| v.trim().to_string());
    if list.contains(&Backend::Postgres) && pg_admin.is_none() {
        return Err("BENCH_STORES names postgres: set BENCH_PG (or OPTOUT_TEST_PG) to the admin URL of a server the harness may create databases on".into());
    }
    Ok(Stores { list, pg_admin })
}

/// The engine the daemons started now run on (benchmarks without the dimension: sled).
static CURRENT: Mutex<Backend> = Mutex::new(Backend::Sled);
static ADMIN: Mutex<Option<String>> = Mutex::new(None);
/// Databases this run created, dropped by [`drop_all`].
static CREATED: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub fn init(stores: &Stores) {
    *ADMIN.lock().expect("admin") = stores.pg_admin.clone();
}

pub fn set_current(b: Backend) {
    *CURRENT.lock().expect("backend") = b;
}

pub fn current() -> Backend {
    *CURRENT.lock().expect("backend")
}

/// Where a daemon directory's database URL is kept (0600, as any secret file).
const URL_FILE: &str = "store-url";
/// The database name of a daemon directory, next to its URL.
const NAME_FILE: &str = "store-db";

/// The `[store]` table for the daemon whose files are in `dir`: empty on sled. On
/// PostgreSQL the first call for a directory creates its database; later ones (restarts
/// on the same store) name the same one.
pub fn store_table(dir: &Path) -> String {
    if current() == Backend::Sled {
        return String::new();
    }
    let file = dir.join(URL_FILE);
    if !file.exists() {
        let admin = ADMIN.lock().expect("admin").clone().expect("admin URL");
        let name = create_database(&admin);
        write_private(&file, &database_url(&admin, &name));
        std::fs::write(dir.join(NAME_FILE), &name).expect("write the database name");
    }
    format!(
        "\n[store]\nbackend = \"postgres\"\nurl = {{ file = \"{}\" }}\npool_size = 8\ninstance = \"bench\"\nlease = \"10s\"\n",
        file.display()
    )
}

/// The database of a daemon directory, when it has one.
pub fn database_of(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(NAME_FILE)).ok()
}

fn write_private(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.write_all(text.as_bytes()).expect("write the URL");
}

/// Runs `f` with a client of the admin URL's server, on a thread of its own: the
/// synchronous driver runs a runtime of its own, which cannot start on one of tokio's.
fn with_admin<T: Send + 'static>(
    f: impl FnOnce(&mut postgres::Client) -> Result<T, postgres::Error> + Send + 'static,
) -> T {
    let admin = ADMIN.lock().expect("admin").clone().expect("admin URL");
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&admin, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot reach the PostgreSQL admin URL: {e}"));
        f(&mut c).unwrap_or_else(|e| panic!("PostgreSQL: {e}"))
    })
    .join()
    .expect("the PostgreSQL helper panicked")
}

/// Creates `optout_bench_<pid>_<n>` and returns its name; the first call also drops what
/// earlier runs whose process is gone left behind.
fn create_database(_admin: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "optout_bench_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let first = NEXT.load(Ordering::Relaxed) == 1;
    let db = name.clone();
    with_admin(move |c| {
        if first {
            sweep_stale(c);
        }
        c.batch_execute(&format!("CREATE DATABASE {db}"))
    });
    CREATED.lock().expect("created").push(name.clone());
    name
}

fn sweep_stale(c: &mut postgres::Client) {
    let Ok(rows) = c.query(
        "SELECT datname FROM pg_database WHERE datname LIKE 'optout\\_bench\\_%'",
        &[],
    ) else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        let pid = name.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        if pid.is_none_or(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"));
        }
    }
}

/// Drops every database this run created (a daemon still connected is disconnected).
pub fn drop_all() {
    let names = std::mem::take(&mut *CREATED.lock().expect("created"));
    if names.is_empty() {
        return;
    }
    with_admin(move |c| {
        for n in names {
            c.batch_execute(&format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"))?;
        }
        Ok(())
    });
}

/// The admin URL with its database replaced by `name` (a `postgresql://…` URL or a libpq
/// `key=value` string).
fn database_url(admin: &str, name: &str) -> String {
    let Some(scheme) = admin.find("://") else {
        let kept: Vec<&str> = (admin.split_whitespace())
            .filter(|kv| !kv.starts_with("dbname="))
            .collect();
        return format!("{} dbname={name}", kept.join(" "));
    };
    let (base, query) = admin.split_at(admin.find('?').unwrap_or(admin.len()));
    let authority = scheme + 3;
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    format!("{}/{name}{query}", &base[..path])
}

/// The server's counters for one database (`pg_stat_database`) and its size.
#[derive(Clone, Copy, Debug, Default)]
pub struct DbStats {
    pub commits: i64,
    pub rollbacks: i64,
    pub inserted: i64,
    pub updated: i64,
    pub deleted: i64,
    pub fetched: i64,
    pub blks_read: i64,
    pub blks_hit: i64,
    /// Index scans of the store's tables (`pg_stat_user_tables`): about one per keyed read,
    /// update, delete or range page the engine sends.
    pub idx_scans: i64,
    pub size: i64,
}

impl DbStats {
    pub fn minus(self, o: DbStats) -> DbStats {
        DbStats {
            commits: self.commits - o.commits,
            rollbacks: self.rollbacks - o.rollbacks,
            inserted: self.inserted - o.inserted,
            updated: self.updated - o.updated,
            deleted: self.deleted - o.deleted,
            fetched: self.fetched - o.fetched,
            blks_read: self.blks_read - o.blks_read,
            blks_hit: self.blks_hit - o.blks_hit,
            idx_scans: self.idx_scans - o.idx_scans,
            size: self.size,
        }
    }

    /// Per unit of work (`per` webhooks, pages, lookups), in words.
    pub fn per(&self, per: f64, unit: &str) -> String {
        let f = |v: i64| v as f64 / per;
        format!(
            "per {unit}: {:.2} commits, {:.2} rollbacks (serialization retries), {:.1} index scans, {:.2} rows inserted, {:.2} updated, {:.2} deleted, {:.1} fetched; {:.1} buffer hits, {:.2} reads",
            f(self.commits),
            f(self.rollbacks),
            f(self.idx_scans),
            f(self.inserted),
            f(self.updated),
            f(self.deleted),
            f(self.fetched),
            f(self.blks_hit),
            f(self.blks_read),
        )
    }
}

/// Backends flush their statistics when a transaction ends at least a second after the
/// last flush, or after 10 s idle: waiting this long after the work makes a snapshot
/// complete (the daemon is idle then).
pub const STATS_SETTLE: Duration = Duration::from_secs(11);

/// The counters of `db` now (see [`STATS_SETTLE`] for when they are complete).
pub fn db_stats(db: &str) -> DbStats {
    let idx_scans = in_database(db, |c| {
        c.query_one(
            "SELECT coalesce(sum(idx_scan), 0)::int8 FROM pg_stat_user_tables",
            &[],
        )
        .map(|r| r.get(0))
    });
    let db = db.to_string();
    with_admin(move |c| {
        let r = c.query_one(
            "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, tup_fetched, \
             blks_read, blks_hit, pg_database_size(datname) FROM pg_stat_database WHERE datname = $1",
            &[&db],
        )?;
        Ok(DbStats {
            commits: r.get(0),
            rollbacks: r.get(1),
            inserted: r.get(2),
            updated: r.get(3),
            deleted: r.get(4),
            fetched: r.get(5),
            blks_read: r.get(6),
            blks_hit: r.get(7),
            idx_scans,
            size: r.get(8),
        })
    })
}

/// Runs `f` with a client of database `db` (on the admin URL's server), on a thread of
/// its own.
fn in_database<T: Send + 'static>(
    db: &str,
    f: impl FnOnce(&mut postgres::Client) -> Result<T, postgres::Error> + Send + 'static,
) -> T {
    let admin = ADMIN.lock().expect("admin").clone().expect("admin URL");
    let url = database_url(&admin, db);
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot reach the benchmark's database: {e}"));
        f(&mut c).unwrap_or_else(|e| panic!("PostgreSQL: {e}"))
    })
    .join()
    .expect("the PostgreSQL helper panicked")
}

/// Waits until no session is connected to `db` (a stopped daemon's backends have exited
/// and so flushed their statistics), up to 10 s.
pub fn wait_disconnected(db: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = db.to_string();
        let n: i64 = with_admin(move |c| {
            c.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                &[&d],
            )
            .map(|r| r.get(0))
        });
        if n == 0 || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One tree of `optout_kv`: (tree number, entries, average key bytes, average value bytes).
pub type TreeRow = (i16, i64, f64, f64);

/// Per tree its [`TreeRow`], and the table's and its index's sizes in bytes.
pub fn tree_stats(db: &str) -> (Vec<TreeRow>, i64, i64) {
    in_database(db, |c| {
        let trees = c
            .query(
                "SELECT tree, count(*), avg(length(key))::float8, avg(length(value))::float8 \
                 FROM optout_kv GROUP BY tree ORDER BY tree",
                &[],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        let r = c.query_one(
            "SELECT pg_table_size('optout_kv'), pg_indexes_size('optout_kv')",
            &[],
        )?;
        Ok((trees, r.get(0), r.get(1)))
    })
}

/// The server's version and the settings that bear on the figures.
pub fn server_summary() -> String {
    with_admin(|c| {
        let v: String = c.query_one("SELECT version()", &[])?.get(0);
        let mut parts = vec![v.split(" on ").next().unwrap_or(&v).to_string()];
        for s in ["shared_buffers", "fsync", "synchronous_commit", "wal_level"] {
            let r = c.query_one(&format!("SHOW {s}"), &[])?;
            parts.push(format!("{s} = {}", r.get::<_, String>(0)));
        }
        Ok(parts.join(", "))
    })
}

// ---------------------------------------------------------------------------------------
// The side-by-side table

/// (benchmark, figure, backend, value), in the order recorded.
static FIGURES: Mutex<Vec<(String, String, Backend, String)>> = Mutex::new(Vec::new());

/// Records one figure of the current backend for the closing table.
pub fn record(bench: &str, figure: &str, value: impl Into<String>) {
    FIGURES.lock().expect("figures").push((
        bench.to_string(),
        figure.to_string(),
        current(),
        value.into(),
    ));
}

/// The table: one row per (benchmark, figure), one column per backend.
pub fn print_side_by_side(list: &[Backend]) {
    let figures = FIGURES.lock().expect("figures").clone();
    if figures.is_empty() {
        return;
    }
    let mut rows: Vec<(String, String)> = Vec::new();
    for (b, f, _, _) in &figures {
        if !rows.iter().any(|(rb, rf)| rb == b && rf == f) {
            rows.push((b.clone(), f.clone()));
        }
    }
    println!("## sled and PostgreSQL side by side\n");
    let mut head = vec!["benchmark".to_string(), "figure".to_string()];
    head.extend(list.iter().map(|b| b.label().to_string()));
    println!("| {} |", head.join(" | "));
    println!("|{}|", vec!["---"; head.len()].join("|"));
    for (b, f) in rows {
        let mut cells = vec![b.clone(), f.clone()];
        for backend in list {
            let v = figures
                .iter()
                .find(|(rb, rf, rk, _)| *rb == b && *rf == f && rk == backend)
                .map_or("—".to_string(), |x| x.3.clone());
            cells.push(v);
        }
        println!("| {} |", cells.join(" | "));
    }
    println!();
}
