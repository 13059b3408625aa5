//! The offline command line, run as the real binary.

use std::path::Path;
use std::process::{Command, Output};

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

fn write_config(dir: &Path, extra_daemon: &str) -> std::path::PathBuf {
    let path = dir.join("optout-sync.toml");
    std::fs::write(
        &path,
        format!(
            "[daemon]\nstate_dir = \"{}\"\n{extra_daemon}\n\n[connectors.hubspot]\nkind = \"hubspot\"\npoll_interval = \"30s\"\ntoken = {{ env = \"PATH\" }}\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn check_config_accepts_a_good_file_and_lists_every_problem_of_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(dir.path(), "");
    let o = bin().arg("check-config").arg(&good).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("ok (1 connector)"));

    let bad = write_config(
        dir.path(),
        "default_region = \"XX\"\ngate_token = { env = \"OPTOUT_CLI_TEST_UNSET\" }",
    );
    let o = bin().arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("optout-sync.toml:3:18: daemon.default_region"),
        "{t}"
    );
    assert!(t.contains("optout-sync.toml:4:14: daemon.gate_token: environment variable OPTOUT_CLI_TEST_UNSET is not set"), "{t}");
    assert!(t.contains("2 problems found"), "{t}");

    // With the variable set, the same file passes.
    let o = bin()
        .arg("check-config")
        .arg(&bad)
        .env("OPTOUT_CLI_TEST_UNSET", "x")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "region is still bad: {}",
        text(&o)
    );

    let o = bin()
        .arg("check-config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("cannot read the file"));
}

#[test]
fn shipped_example_passes_check_config_with_its_variables_set() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/optout-sync.toml");
    let o = bin()
        .arg("check-config")
        .arg(&example)
        .env("OPTOUT_GATE_TOKEN", "example-gate-token-0123")
        .env("HUBSPOT_TOKEN", "example-hubspot")
        .env("WHATSAPP_APP_SECRET", "example-app-secret")
        .env("WHATSAPP_VERIFY_TOKEN", "example-verify")
        .env("SALESFORCE_CLIENT_SECRET", "example-salesforce")
        .env("AUTOMATIONS_WEBHOOK_SECRET", "example-automations")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn import_then_lookup_then_audit_export() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let csv = dir.path().join("list.csv");
    std::fs::write(&csv, "phone,status,time,source\n+1 415 555 2671,opted_out,2024-05-01T10:00:00Z,old ESP\nbogus,opted_out,2024-05-01T10:00:00Z,x\n").unwrap();
    let o = bin()
        .args(["import", "--config"])
        .arg(&config)
        .arg(&csv)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "a bad row makes the exit code 1: {}",
        text(&o)
    );
    let t = text(&o);
    assert!(t.contains("list.csv:3: phone `bogus`"), "{t}");
    assert!(t.contains("imported 1 row(s)"), "{t}");

    let o = bin()
        .args(["lookup", "--config"])
        .arg(&config)
        .arg("(415) 555-2671")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("p:+14155552671"), "{t}");
    assert!(
        t.contains("all        opted_out since 2024-05-01T10:00:00.000Z — import:import"),
        "{t}"
    );
    assert!(t.contains("accepted"), "{t}");

    let o = bin()
        .args(["lookup", "--json", "--config"])
        .arg(&config)
        .arg("+14155552671")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["decisions"]["all"]["decision"], "opted_out");
    assert_eq!(v["decisions"]["marketing"]["decision"], "unknown");

    let o = bin()
        .args(["lookup", "--config"])
        .arg(&config)
        .arg("+1 212 555 0100")
        .output()
        .unwrap();
    assert!(text(&o).contains("not known"));

    let o = bin()
        .args(["audit", "export", "--format", "jsonl", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(o.status.success());
    let kinds: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds, ["accepted", "decision"]);
    let o = bin()
        .args([
            "audit",
            "export",
            "--format",
            "csv",
            "--since",
            "2999-01-01",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        1,
        "only the header"
    );
    let o = bin()
        .args(["audit", "export", "--since", "last week", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("is not a time"));
}

#[test]
fn help_describes_every_command() {
    let o = bin().arg("--help").output().unwrap();
    let t = text(&o);
    for cmd in ["check-config", "lookup", "audit", "import"] {
        assert!(t.contains(cmd), "{t}");
    }
}

#[test]
fn demo_shows_the_opt_out_reaching_every_system() {
    let o = bin().arg("demo").output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for needle in [
        "signed webhook acknowledged",
        "send gate: 14155552671 blocked for every category",
        "HubSpot      contact 1 (Ada Lovelace): whatsapp_consent = opted_out",
        "HubSpot      contact 2 (A. Lovelace): whatsapp_consent = opted_out",
        "Salesforce   Contact",
        "Salesforce   Lead",
        "MessagingConsentStatus = OptedOut",
        "automations  signed event consent.changed: all opted_out",
        "WhatsApp     one confirmation reply to 14155552671",
        "another person, untouched: true",
        "outbox empty: true",
    ] {
        assert!(t.contains(needle), "missing {needle:?} in:\n{t}");
    }
}
