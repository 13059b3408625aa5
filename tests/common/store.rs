//! The store a test's daemon runs on: sled in the test's directory (the default), or, with
//! `OPTOUT_TEST_STORE=postgres`, a PostgreSQL database of its own on the server whose admin
//! URL `OPTOUT_TEST_PG` holds (`scripts/start-postgres.sh` starts one and prints it).
//!
//! Under the switch every configuration [`super::config::Config`] writes, and every one
//! [`super::start`] is given without a `[store]` table, gets one naming a fresh database,
//! created at the first configuration for a test directory and kept for the later ones: a
//! daemon restarted on the same directory finds its data, as it does on sled. The URL is
//! read from a file in the directory, so no variable has to reach the child process.
//!
//! Tests that need PostgreSQL whatever the switch ask [`fresh_pg_database`]; tests that
//! look at or damage sled's own files skip themselves under the switch ([`sled_only`]).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

/// `postgres` puts every daemon the harness starts on PostgreSQL; unset (or `sled`): sled.
pub const STORE_VAR: &str = "OPTOUT_TEST_STORE";
/// The admin URL of a PostgreSQL server the tests may create databases on.
pub const PG_VAR: &str = "OPTOUT_TEST_PG";
/// Where a test directory's database URL is kept (mode 0600, as any secret file).
pub const URL_FILE: &str = "store-url";

/// Whether the harness runs daemons on PostgreSQL. Any other value than `sled` or
/// `postgres` is a mistake that would silently test sled: refused.
pub fn on_postgres() -> bool {
    match std::env::var(STORE_VAR).as_deref() {
        Err(_) | Ok("") | Ok("sled") => false,
        Ok("postgres") => true,
        Ok(other) => panic!("{STORE_VAR}={other}: use `sled` or `postgres`"),
    }
}

/// Whether this run is CI, where a missing server is a failure rather than a skip.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The server's admin URL from `OPTOUT_TEST_PG`. Without it: `None`, after printing that
/// the calling test is skipped, or, in CI (`CI` set), a panic: a CI without the server
/// must fail, not pass by skipping.
pub fn pg_admin_url() -> Option<String> {
    match std::env::var(PG_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url.trim().to_string()),
        _ if in_ci() => panic!(
            "{PG_VAR} is not set: CI must run the PostgreSQL tests (scripts/start-postgres.sh prints the URL)"
        ),
        _ => {
            eprintln!("skipped: {PG_VAR} is not set (PostgreSQL tests need a server; see README)");
            None
        }
    }
}

/// A new, empty database on the `OPTOUT_TEST_PG` server, and its URL; `None` (the test
/// skips) as [`pg_admin_url`] says.
pub fn fresh_pg_database() -> Option<String> {
    pg_admin_url().map(|admin| create_database(&admin))
}

/// For a test that reads or damages sled's own files: whether to skip it now, because the
/// harness runs the daemons on PostgreSQL (the reason is printed).
///
/// ```ignore
/// if common::sled_only("it corrupts sled's log file") { return; }
/// ```
pub fn sled_only(why: &str) -> bool {
    if !on_postgres() {
        return false;
    }
    let current = std::thread::current();
    let test = current.name().unwrap_or("this test");
    eprintln!("skipped under {STORE_VAR}=postgres: {test}: {why}");
    true
}

/// The `[store]` table's lines for the daemon whose files are in `dir`: `None` on sled.
/// The first call for a directory creates its database; later ones name the same one.
pub fn store_lines(dir: &Path) -> Option<Vec<String>> {
    if !on_postgres() {
        return None;
    }
    let file = dir.join(URL_FILE);
    if !file.exists() {
        let Ok(admin) = std::env::var(PG_VAR) else {
            panic!(
                "{STORE_VAR}=postgres needs {PG_VAR}, the admin URL of a server (scripts/start-postgres.sh prints one)"
            );
        };
        write_private(&file, &create_database(admin.trim()));
    }
    Some(vec![
        r#"backend = "postgres""#.to_string(),
        format!("url = {{ file = \"{}\" }}", file.display()),
    ])
}

/// The `[store]` table to append to a configuration written by hand: empty on sled.
pub fn store_table(dir: &Path) -> String {
    match store_lines(dir) {
        Some(lines) => format!("\n[store]\n{}\n", lines.join("\n")),
        None => String::new(),
    }
}

/// Fails the test when a daemon started on this directory's database (the harness's
/// `[store]` in `config`) is ready but has created no table there: it is not running on
/// PostgreSQL, and a suite passing on sled must not pass for one on PostgreSQL.
pub fn check_on_postgres(dir: &Path, config: &str, log: impl FnOnce() -> String) {
    let file = dir.join(URL_FILE);
    if !on_postgres() || !config.contains(&format!("url = {{ file = \"{}\" }}", file.display())) {
        return;
    }
    let url = std::fs::read_to_string(&file).expect("the database's URL");
    let tables = std::thread::spawn(move || -> Result<i64, postgres::Error> {
        let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
        let row = client.query_one(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )?;
        Ok(row.get(0))
    })
    .join()
    .expect("the database check panicked");
    match tables {
        Ok(0) => panic!(
            "{STORE_VAR}=postgres: the daemon is ready but created no table in its database: it does not run on PostgreSQL; log:\n{}",
            log()
        ),
        Ok(_) => {}
        Err(e) => panic!("cannot read the test database on the {PG_VAR} server: {e}"),
    }
}

/// On PostgreSQL, which of `needles` the store of the daemon whose files are in `dir` still
/// holds: in its table's rows (keys or values), or anywhere in the files of the table and
/// of its index on the server's disk (what a compaction must have rewritten). `None` on
/// sled.
pub fn traces_in_database(dir: &Path, needles: &[&str]) -> Option<Vec<String>> {
    if !on_postgres() {
        return None;
    }
    let url = std::fs::read_to_string(dir.join(URL_FILE)).expect("the database's URL");
    let needles: Vec<String> = needles.iter().map(|n| n.to_string()).collect();
    let found = std::thread::spawn(move || -> Result<Vec<String>, postgres::Error> {
        let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
        let data: String = client.query_one("SHOW data_directory", &[])?.get(0);
        let mut found = Vec::new();
        for n in &needles {
            let needle: &[u8] = n.as_bytes();
            let rows: i64 = client
                .query_one(
                    "SELECT count(*) FROM optout_kv WHERE position($1 IN key) > 0 \
                     OR position($1 IN value) > 0",
                    &[&needle],
                )?
                .get(0);
            if rows > 0 {
                found.push(format!("{rows} rows hold `{n}`"));
            }
        }
        for rel in ["optout_kv", "optout_kv_pkey"] {
            let file: String =
                (client.query_one("SELECT pg_relation_filepath($1::text)", &[&rel])?).get(0);
            // A relation's file and its 1 GB segments; unreadable when the server runs
            // elsewhere, then only the rows are checked.
            let Ok(bytes) = std::fs::read(Path::new(&data).join(&file)) else {
                continue;
            };
            for n in &needles {
                if bytes.windows(n.len()).any(|w| w == n.as_bytes()) {
                    found.push(format!("the files of {rel} hold `{n}`"));
                }
            }
        }
        Ok(found)
    })
    .join()
    .expect("the database search panicked");
    Some(found.unwrap_or_else(|e| panic!("cannot search the test database: {e}")))
}

/// Writes a secret file as the daemon accepts it: created 0600, never over another.
fn write_private(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.write_all(text.as_bytes()).unwrap();
}

/// Creates `optout_t_<pid>_<n>` and returns its URL. The `postgres` client runs a runtime
/// of its own, which cannot start inside a test's runtime: it runs on a thread of its own.
fn create_database(admin: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "optout_t_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let (url, db) = (admin.to_string(), name.clone());
    let made = std::thread::spawn(move || -> Result<(), postgres::Error> {
        let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
        static SWEPT: Once = Once::new();
        SWEPT.call_once(|| drop_stale_databases(&mut client));
        client.batch_execute(&format!("CREATE DATABASE {db}"))
    })
    .join()
    .expect("the database creator panicked");
    // The error names what failed (connection refused, authentication), never the URL.
    if let Err(e) = made {
        panic!("cannot create a test database on the {PG_VAR} server: {e}");
    }
    database_url(admin, &name)
}

/// Drops the databases earlier test processes left (their process is gone), so repeated
/// local runs do not fill the server. Best effort: a database still in use stays.
fn drop_stale_databases(client: &mut postgres::Client) {
    let Ok(rows) = client.query(
        "SELECT datname FROM pg_database WHERE datname LIKE 'optout\\_t\\_%'",
        &[],
    ) else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        let pid = name.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_none_or(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"));
        }
    }
}

/// The admin URL with its database replaced by `name`: a `postgresql://…/db?…` URL or a
/// libpq `key=value` string.
pub fn database_url(admin: &str, name: &str) -> String {
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
