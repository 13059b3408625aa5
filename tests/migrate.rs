//! `store migrate`, run as the real binary: a sled store with imported content goes to a
//! fresh PostgreSQL database and back into a new sled store, each step verified, and the
//! round-tripped store answers `lookup` and `audit export` exactly as the original;
//! a target that already holds a store is refused. Needs `OPTOUT_TEST_PG` (an admin URL
//! of a PostgreSQL server); without it the test says so and passes, except under CI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// People imported: the `aliases` and `subjects` trees take more than one batch.
const PEOPLE: usize = 6_000;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_optout-sync"));
    c.env_remove("OPTOUT_SYNC_CONFIG");
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A fresh database on the test server; its URL.
fn fresh_database() -> Option<String> {
    let Ok(admin) = std::env::var("OPTOUT_TEST_PG") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set OPTOUT_TEST_PG"
        );
        eprintln!("skipped: OPTOUT_TEST_PG is not set");
        return None;
    };
    let name = format!("optout_mig_{}", std::process::id());
    let mut c = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .unwrap();
    c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let cfg: postgres::Config = admin.parse().unwrap();
    Some(format!(
        "postgresql://{}@127.0.0.1:{}/{name}",
        cfg.get_user().unwrap_or("postgres"),
        cfg.get_ports().first().unwrap_or(&5432)
    ))
}

/// A configuration with its store in `state`; with `postgres`, the `[store]` table naming
/// the database through `OPTOUT_STORE_URL`.
fn config(dir: &Path, name: &str, state: &Path, postgres: bool) -> PathBuf {
    let mut text = format!(
        "[daemon]\nstate_dir = \"{}\"\n\n[connectors.hubspot]\nkind = \"hubspot\"\npoll_interval = \"30s\"\ntoken = {{ env = \"PATH\" }}\n",
        state.display()
    );
    if postgres {
        text += "\n[store]\nbackend = \"postgres\"\nurl = { env = \"OPTOUT_STORE_URL\" }\n";
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn run(config: &Path, url: &str, args: &[&str]) -> Output {
    bin()
        .args(args)
        .arg("--config")
        .arg(config)
        .env("OPTOUT_STORE_URL", url)
        .output()
        .unwrap()
}

fn number(i: usize) -> String {
    format!("+1415555{:04}", i)
}

/// What people and the audit see of a store: lookups of a sample and the whole export.
fn answers(config: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for i in (0..PEOPLE).step_by(997).chain([PEOPLE - 1]) {
        let o = run(config, "", &["lookup", "--json", &number(i)]);
        assert!(o.status.success(), "{}", text(&o));
        out.push(String::from_utf8(o.stdout).unwrap());
    }
    for format in ["jsonl", "csv"] {
        let o = run(config, "", &["audit", "export", "--format", format]);
        assert!(o.status.success(), "{}", text(&o));
        out.push(String::from_utf8(o.stdout).unwrap());
    }
    out
}

/// Checks a `--json` report: every tree there and matching; returns the entries copied.
fn verified(o: &Output) -> u64 {
    assert!(o.status.success(), "{}", text(o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verified"], true, "{v}");
    let trees = v["trees"].as_array().unwrap();
    assert_eq!(trees.len(), 19, "{v}");
    for t in trees {
        assert_eq!(t["matches"], true, "{t}");
        assert_eq!(t["source_entries"], t["target_entries"], "{t}");
        assert_eq!(t["source_sha256"], t["target_sha256"], "{t}");
    }
    let subjects = trees.iter().find(|t| t["tree"] == "subjects").unwrap();
    assert_eq!(subjects["target_entries"], PEOPLE as u64, "{v}");
    v["entries"].as_u64().unwrap()
}

#[test]
fn a_store_goes_to_postgres_and_back_unchanged_and_a_used_target_is_refused() {
    let Some(url) = fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    std::fs::create_dir(&one).unwrap();
    let plain_one = config(dir.path(), "one.toml", &one, false);
    let plain_two = config(dir.path(), "two.toml", &two, false);
    let pg_one = config(dir.path(), "pg-one.toml", &one, true);
    let pg_two = config(dir.path(), "pg-two.toml", &two, true);

    let csv = dir.path().join("list.csv");
    let mut rows = String::from("phone,status,time,source\n");
    for i in 0..PEOPLE {
        let status = if i % 3 == 0 { "opted_in" } else { "opted_out" };
        rows += &format!("{},{status},2024-05-01T10:00:00Z,old ESP\n", number(i));
    }
    std::fs::write(&csv, rows).unwrap();
    let o = run(&plain_one, "", &["import", csv.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let before = answers(&plain_one);
    assert!(before[1].contains("opted_out"), "{}", before[1]);

    // Without [store] there is no PostgreSQL side.
    let o = run(&plain_one, "", &["store", "migrate", "--to", "postgres"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("[store]"), "{}", text(&o));

    let o = run(
        &pg_one,
        &url,
        &["store", "migrate", "--to", "postgres", "--json"],
    );
    let there = verified(&o);
    assert!(there > 3 * PEOPLE as u64, "{there}");

    // The database now holds a store: a second copy into it is refused, nothing written.
    let o = run(&pg_one, &url, &["store", "migrate", "--to", "postgres"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("must be empty"), "{}", text(&o));

    let o = run(&pg_two, &url, &["store", "migrate", "--to", "sled"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains(&format!("copied {there} entries (PostgreSQL → sled)")),
        "{t}"
    );
    assert!(t.contains("every tree matches"), "{t}");
    assert!(t.contains("aliases"), "{t}");

    // A state directory that holds a store is not a target.
    let o = run(&pg_two, &url, &["store", "migrate", "--to", "sled"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("already holds a sled store"),
        "{}",
        text(&o)
    );

    assert_eq!(
        answers(&plain_two),
        before,
        "the round trip changed what the store answers"
    );
}
