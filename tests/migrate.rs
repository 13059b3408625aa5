//! `store migrate`, run as the real binary: a sled store filled by an import and by the
//! daemon against the CRM fakes (records linked, pushes done, cursors) goes to a fresh
//! PostgreSQL database and back into a new sled store, each step verified, and the
//! round-tripped store answers `lookup` and `audit export` exactly as the original; a
//! target that already holds a store is refused. Needs `OPTOUT_TEST_PG` (an admin URL of a
//! PostgreSQL server); without it the test says so and passes, except under CI.

mod common;

use common::{bin, text};

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::json;

/// People imported: the `aliases` and `subjects` trees take more than one batch.
const PEOPLE: usize = 6_000;

/// `base` (a configuration's text) with its store in `state`; with `postgres`, the
/// `[store]` table naming the database through `OPTOUT_STORE_URL`.
fn config(base: &str, dir: &Path, name: &str, state: &Path, postgres: bool) -> PathBuf {
    let mut text = base.replace(
        &format!("state_dir = \"{}\"", dir.join("state").display()),
        &format!("state_dir = \"{}\"", state.display()),
    );
    assert!(text.contains(&state.display().to_string()));
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
    // Two people whose CRM records the daemon linked, then a sample of the rest.
    let sample = [1, 4].into_iter().chain((0..PEOPLE).step_by(997));
    for i in sample.chain([PEOPLE - 1]) {
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

/// Imports [`PEOPLE`], then runs the daemon until it has linked and suppressed the CRM
/// records of a few of them; returns the configuration's text.
async fn filled_store(dir: &Path, f: &common::Fakes) -> String {
    let c = common::config::Config::new(dir)
        .hubspot(&f.hubspot.base_url())
        .salesforce(&f.salesforce.base_url());
    let path = dir.join("optout-sync.toml");
    std::fs::write(&path, c.toml()).unwrap();
    let csv = dir.join("list.csv");
    let mut rows = String::from("phone,status,time,source\n");
    for i in 0..PEOPLE {
        let status = if i % 3 == 0 { "opted_in" } else { "opted_out" };
        rows += &format!("{},{status},2024-05-01T10:00:00Z,old ESP\n", number(i));
    }
    std::fs::write(&csv, rows).unwrap();
    let o = run(&path, "", &["import", csv.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));

    let mut suppressed = Vec::new();
    for i in (1..60).step_by(3) {
        f.hubspot
            .create_contact(&[("firstname", "Ada"), ("phone", &number(i))]);
        let fields = json!({"LastName": "L", "Phone": number(i), "WhatsApp_Opt_Out__c": false});
        suppressed.push(f.salesforce.insert("Contact", fields));
    }
    let mut d = common::start(dir, &c.toml(), &c.env()).await;
    d.until(
        "the CRM records suppressed",
        Duration::from_secs(60),
        async || {
            suppressed.iter().all(|id| {
                f.salesforce
                    .get(id)
                    .is_some_and(|v| v["WhatsApp_Opt_Out__c"] == json!(true))
            }) && (d.status().await.connectors.iter()).all(|c| c.outbox_depth == 0)
        },
    )
    .await;
    assert!(d.terminate().await.success());
    c.toml()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_goes_to_postgres_and_back_unchanged_and_a_used_target_is_refused() {
    let Some(url) = tokio::task::block_in_place(common::fresh_pg_database) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let f = common::fakes().await;
    let base = filled_store(dir.path(), &f).await;
    let (one, two) = (dir.path().join("state"), dir.path().join("two"));
    let plain_one = config(&base, dir.path(), "one.toml", &one, false);
    let plain_two = config(&base, dir.path(), "two.toml", &two, false);
    let pg_one = config(&base, dir.path(), "pg-one.toml", &one, true);
    let pg_two = config(&base, dir.path(), "pg-two.toml", &two, true);
    let before = answers(&plain_one);
    assert!(before[1].contains("opted_out"), "{}", before[1]);
    assert!(
        before[0].contains("salesforce"),
        "a linked record: {}",
        before[0]
    );

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
    for tree in ["links", "cursors", "aliases"] {
        let line = t.lines().find(|l| l.starts_with(tree)).unwrap();
        assert!(!line.contains(" 0  match"), "{tree} is empty: {t}");
    }

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
