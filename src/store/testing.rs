//! Test helpers: a store on either engine. Unit tests that open a store call [`open`],
//! which opens sled, or PostgreSQL when `OPTOUT_TEST_STORE=postgres` (a database of its
//! own per directory, created from the admin URL in `OPTOUT_TEST_PG`). The store's own
//! suite runs each test on both engines with an [`Opener`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

use super::{Backend, PgSettings, Store, StoreError};

/// Opens a sled database directly, around the store. sled's flusher thread lets go of the
/// file lock a moment after the last handle is dropped (a store just refused or closed by
/// this process may still hold it), so a held lock is waited for, as the store itself does.
pub fn raw_sled(dir: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(sled::Error::Io(e))
                if e.to_string().contains("acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("opening {}: {e}", dir.display()),
        }
    }
}

/// The admin URL of the test server, or `None` after saying the test is skipped. Under CI
/// (`CI` set) a missing server fails the test: CI must not pass by skipping.
pub fn pg_admin() -> Option<String> {
    admin_url("OPTOUT_TEST_PG")
}

/// The admin URL in the environment variable `var`, as [`pg_admin`].
fn admin_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set, and CI must not skip the PostgreSQL tests")
        }
        _ => {
            println!("skipped: {var} is not set");
            None
        }
    }
}

/// Runs admin work on a thread of its own: the driver runs a runtime of its own, which
/// cannot start on a thread that is inside tokio's.
fn admin<T: Send>(url: &str, f: impl FnOnce(&mut postgres::Client) -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut c = postgres::Client::connect(url, postgres::NoTls)
                .expect("connect to the test PostgreSQL (OPTOUT_TEST_PG)");
            f(&mut c)
        })
        .join()
        .expect("admin thread")
    })
}

/// A database of the test server, made for one test and dropped with this value.
pub struct PgDb {
    admin: String,
    name: String,
    /// Whether this value created the database (a child process only borrows it).
    owned: bool,
}

impl PgDb {
    /// A fresh, empty database (`None`: no test server, see [`pg_admin`]).
    pub fn fresh() -> Option<PgDb> {
        Self::fresh_on("OPTOUT_TEST_PG")
    }

    /// A fresh database on the server whose admin URL is in the variable `var`.
    pub fn fresh_on(var: &str) -> Option<PgDb> {
        let admin_url = admin_url(var)?;
        static N: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let name = format!("optout_u_{pid}_{}", N.fetch_add(1, SeqCst));
        admin(&admin_url, |c| {
            drop_stale(c);
            c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
                .unwrap();
            c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        });
        Some(PgDb {
            admin: admin_url,
            name,
            owned: true,
        })
    }

    /// The database `name`, made by another process of this test run (a crash test's
    /// parent); it is left in place.
    pub fn existing(name: &str) -> PgDb {
        PgDb {
            admin: pg_admin().expect("the parent had a test server"),
            name: name.to_string(),
            owned: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// How a store reaches this database, as instance `instance`.
    pub fn settings(&self, instance: &str, pool_size: u32) -> PgSettings {
        let mut cfg: postgres::Config = self.admin.parse().expect("OPTOUT_TEST_PG is a URL");
        cfg.dbname(&self.name);
        let host = match cfg.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_string(),
        };
        let mut url = format!(
            "host={host} port={} user={} dbname={}",
            cfg.get_ports().first().unwrap_or(&5432),
            cfg.get_user().unwrap_or("postgres"),
            self.name
        );
        if let Some(pw) = cfg.get_password() {
            url.push_str(&format!(" password={}", String::from_utf8_lossy(pw)));
        }
        PgSettings {
            url: optout_core::Secret::new(url),
            pool_size,
            tls_ca_file: None,
            instance: instance.into(),
            lease: std::time::Duration::from_secs(10),
        }
    }

    /// Runs `f` on a connection to this database (to look at or tamper with its tables).
    pub fn sql<T: Send>(&self, f: impl FnOnce(&mut postgres::Client) -> T + Send) -> T {
        let mut cfg: postgres::Config = self.admin.parse().expect("OPTOUT_TEST_PG is a URL");
        cfg.dbname(&self.name);
        std::thread::scope(|s| {
            s.spawn(|| f(&mut cfg.connect(postgres::NoTls).expect("connect")))
                .join()
                .expect("sql thread")
        })
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if self.owned && !std::thread::panicking() {
            let name = self.name.clone();
            // Stores still open elsewhere are cut off; a failure only leaves a database
            // behind for the next run's clean-up.
            let _ = std::panic::catch_unwind(|| {
                admin(&self.admin, |c| {
                    let _ =
                        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
                })
            });
        }
    }
}

/// Drops test databases left by runs that ended without dropping them (their process is
/// gone).
fn drop_stale(c: &mut postgres::Client) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(rows) = c.query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'optout\\_u\\_%'",
            &[],
        ) else {
            return;
        };
        for row in rows {
            let name: String = row.get(0);
            let pid = name.split('_').nth(2).unwrap_or("");
            // Without FORCE: a database someone is still connected to stays.
            if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"));
            }
        }
    });
}

/// Opens the same store again and again: a directory for sled, and for PostgreSQL a
/// database of its own. Dropping it removes both.
pub struct Opener {
    dir: tempfile::TempDir,
    pg: Option<PgDb>,
}

impl Opener {
    pub fn sled() -> Opener {
        Opener {
            dir: tempfile::tempdir().unwrap(),
            pg: None,
        }
    }

    /// `None`: no test server (the test passes, see [`pg_admin`]).
    pub fn postgres() -> Option<Opener> {
        Some(Opener {
            dir: tempfile::tempdir().unwrap(),
            pg: Some(PgDb::fresh()?),
        })
    }

    /// The store's directory (sled's files; PostgreSQL keeps none there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The test database, on PostgreSQL.
    pub fn pg(&self) -> Option<&PgDb> {
        self.pg.as_ref()
    }

    pub fn backend(&self, instance: &str) -> Backend {
        match &self.pg {
            None => Backend::Sled,
            Some(db) => Backend::Postgres(db.settings(instance, 4)),
        }
    }

    pub fn try_open(&self) -> Result<Store, StoreError> {
        Store::open_with(self.dir(), &self.backend("test"))
    }

    pub fn open(&self) -> Store {
        self.try_open().expect("open the store")
    }

    /// Another instance's store on the same database (PostgreSQL), with `pool`
    /// connections.
    pub fn open_as(&self, instance: &str, pool: u32) -> Store {
        let db = self.pg.as_ref().expect("several instances need PostgreSQL");
        Store::open_with(self.dir(), &Backend::Postgres(db.settings(instance, pool)))
            .expect("open the store")
    }

    /// The raw value of `key` in tree `tree`, read by the engine's own means (the store
    /// need not open).
    pub fn raw_get(&self, tree: usize, key: &[u8]) -> Option<Vec<u8>> {
        let name = super::TREES[tree];
        match &self.pg {
            None => {
                let db = raw_sled(self.dir());
                db.open_tree(name)
                    .unwrap()
                    .get(key)
                    .unwrap()
                    .map(|v| v.to_vec())
            }
            Some(pg) => pg.sql(|c| {
                c.query_opt(
                    "SELECT value FROM optout_kv WHERE tree = $1 AND key = $2",
                    &[&(tree as i16), &key],
                )
                .unwrap()
                .map(|r| r.get(0))
            }),
        }
    }
}

/// Which engine [`open`] uses: `OPTOUT_TEST_STORE=postgres` for PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var("OPTOUT_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// Opens the store of `dir` for a test: sled in `dir`, or, with
/// `OPTOUT_TEST_STORE=postgres`, a database of the test server that belongs to `dir` (made
/// on first use, so opening `dir` again finds the same data).
pub fn open(dir: &Path) -> Store {
    try_open(dir).expect("open the test store")
}

/// As [`open`], returning the error.
pub fn try_open(dir: &Path) -> Result<Store, StoreError> {
    if !on_postgres() {
        return Store::open(dir);
    }
    static DBS: Mutex<Option<HashMap<PathBuf, PgDb>>> = Mutex::new(None);
    let settings = {
        let mut dbs = DBS.lock().unwrap_or_else(|p| p.into_inner());
        let dbs = dbs.get_or_insert_with(HashMap::new);
        if !dbs.contains_key(dir) {
            let Some(mut db) = PgDb::fresh() else {
                panic!("OPTOUT_TEST_STORE=postgres needs OPTOUT_TEST_PG");
            };
            // Kept for the process's life: a test may open its directory again, and a
            // later run drops what is left (see `drop_stale`).
            db.owned = false;
            dbs.insert(dir.to_path_buf(), db);
        }
        dbs[dir].settings("test", 4)
    };
    Store::open_with(dir, &Backend::Postgres(settings))
}
