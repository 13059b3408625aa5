//! The `[store]` table as the real binary reads it (`check-config` names the backend, never
//! the URL; the offline commands read the URL and nothing else), and the test harness's
//! PostgreSQL databases.

mod common;

use common::{bin, text};

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const PASSWORD: &str = "pw-Tq8Lz2-of-the-store";

/// A configuration file in `dir` with one connector (its token from a variable this test
/// never sets) and `store` as its `[store]` table.
fn write_config(dir: &Path, store: &str) -> PathBuf {
    let path = dir.join("optout-sync.toml");
    std::fs::write(
        &path,
        format!(
            "[daemon]\nstate_dir = \"{}\"\n\n[connectors.hubspot]\nkind = \"hubspot\"\npoll_interval = \"30s\"\ntoken = {{ env = \"OPTOUT_STORE_TEST_HS_TOKEN\" }}\n\n{store}",
            dir.join("state").display()
        ),
    )
    .unwrap();
    path
}

/// A private file holding a PostgreSQL URL with a password in it.
fn url_file(dir: &Path) -> PathBuf {
    let f = dir.join("store-url");
    std::fs::write(
        &f,
        format!("postgresql://optout:{PASSWORD}@127.0.0.1:9/optout\n"),
    )
    .unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    f
}

#[test]
fn check_config_names_the_backend_but_never_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let sled = write_config(dir.path(), "");
    let o = bin()
        .arg("check-config")
        .arg(&sled)
        .env("OPTOUT_STORE_TEST_HS_TOKEN", "pat-token")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("\nstore: sled (in daemon.state_dir)\n"),
        "{}",
        text(&o)
    );

    let pg = write_config(
        dir.path(),
        &format!(
            "[store]\nbackend = \"postgres\"\nurl = {{ file = \"{}\" }}\ninstance = \"web-1\"\nlease = \"15s\"\n",
            url_file(dir.path()).display()
        ),
    );
    let o = bin()
        .arg("check-config")
        .arg(&pg)
        .env("OPTOUT_STORE_TEST_HS_TOKEN", "pat-token")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("ok (1 connector)"), "{t}");
    assert!(
        t.contains("\nstore: postgres, instance web-1 (pool of 8, lease 15s)\n"),
        "{t}"
    );
    assert!(!t.contains(PASSWORD) && !t.contains("127.0.0.1:9"), "{t}");
}

/// An offline command reads the store's URL (it opens the store) but no other secret: the
/// connector's token may be missing, the URL may not.
#[test]
fn offline_commands_read_the_store_url_and_no_other_secret() {
    let dir = tempfile::tempdir().unwrap();
    let missing = write_config(
        dir.path(),
        "[store]\nbackend = \"postgres\"\nurl = { env = \"OPTOUT_STORE_TEST_UNSET\" }\n",
    );
    let o = bin()
        .args(["lookup", "+14155552671", "--config"])
        .arg(&missing)
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("optout-sync.toml:11:7: store.url: environment variable OPTOUT_STORE_TEST_UNSET is not set"),
        "{t}"
    );
    assert!(
        !t.contains("OPTOUT_STORE_TEST_HS_TOKEN"),
        "the connector's token was read: {t}"
    );
}

/// `fresh_pg_database` gives each caller an empty database of its own on the server.
#[test]
fn fresh_pg_databases_are_empty_and_apart() {
    let Some(first) = common::fresh_pg_database() else {
        return;
    };
    let second = common::fresh_pg_database().expect("the server is still there");
    assert_ne!(first, second);
    for url in [&first, &second] {
        let url = url.clone();
        let (name, tables) = std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let name: String = c
                .query_one("SELECT current_database()", &[])
                .unwrap()
                .get(0);
            let tables: i64 = c
                .query_one(
                    "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
                    &[],
                )
                .unwrap()
                .get(0);
            (name, tables)
        })
        .join()
        .unwrap();
        assert!(name.starts_with("optout_t_"), "{name}");
        assert_eq!(tables, 0, "{name} is not empty");
    }
}

#[test]
fn a_database_url_is_the_admin_url_with_another_database() {
    use common::store::database_url;
    let cases = [
        (
            "postgresql://postgres@127.0.0.1:55432/postgres",
            "postgresql://postgres@127.0.0.1:55432/t1",
        ),
        (
            "postgres://u:p@db:5432/admin?sslmode=require",
            "postgres://u:p@db:5432/t1?sslmode=require",
        ),
        ("postgresql://u@db", "postgresql://u@db/t1"),
        (
            "postgresql:///postgres?host=/run/postgresql",
            "postgresql:///t1?host=/run/postgresql",
        ),
        (
            "host=127.0.0.1 port=55432 user=postgres dbname=postgres",
            "host=127.0.0.1 port=55432 user=postgres dbname=t1",
        ),
    ];
    for (admin, expected) in cases {
        assert_eq!(database_url(admin, "t1"), expected, "{admin}");
    }
}

/// Under `OPTOUT_TEST_STORE=postgres`, every configuration the harness writes for one
/// directory names that directory's database, and another directory gets another one.
#[test]
fn the_harness_gives_each_test_directory_its_own_database() {
    if !common::store::on_postgres() {
        eprintln!("skipped: only under OPTOUT_TEST_STORE=postgres");
        return;
    }
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = common::config::Config::new(a.path()).toml();
    let again = common::config::Config::new(a.path()).toml();
    let other = common::config::Config::new(b.path()).toml();
    assert_eq!(
        first, again,
        "a restart on the same directory finds its data"
    );
    assert!(first.trim_end().ends_with(&format!(
        "[store]\nbackend = \"postgres\"\nurl = {{ file = \"{}\" }}",
        a.path().join("store-url").display()
    )));
    let url = |d: &Path| std::fs::read_to_string(d.join("store-url")).unwrap();
    assert_ne!(url(a.path()), url(b.path()));
    let mode = std::fs::metadata(a.path().join("store-url"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(other.contains("[store]"));
}
