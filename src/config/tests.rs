//! Bad configuration files give precise, located messages.

use super::*;

const GOOD: &str = r#"
[daemon]
state_dir = "/var/lib/optout-sync"
listen = "127.0.0.1:8088"
default_region = "GB"

[policy]
opt_in_margin = "10s"
accept_opt_ins_from = ["whatsapp"]

[connectors.whatsapp]
kind = "whatsapp"
app_secrets = [{ env = "PATH" }]
verify_token = { env = "HOME" }

[connectors.crm-eu]
kind = "hubspot"
poll_interval = "30s"
full_resync_cron = "0 0 3 * * Sun"
# Variables always set (a different one per secret): the test need not change the environment.
token = { env = "CARGO_MANIFEST_DIR" }
"#;

fn problems(src: &str) -> Problems {
    match parse(Path::new("test.toml"), src) {
        Err(p) => p,
        Ok(c) => c.validate().expect_err("expected problems"),
    }
}

#[test]
fn good_file_parses_and_validates() {
    let c = parse(Path::new("test.toml"), GOOD).unwrap();
    let checked = c.validate().unwrap();
    assert_eq!(c.connectors.len(), 2);
    assert_eq!(c.policy.opt_in_margin, Duration::from_secs(10));
    assert_eq!(checked.connector("crm-eu").unwrap().kind, "hubspot");
    assert_eq!(
        c.daemon.control_socket,
        PathBuf::from("/run/optout-sync/control.sock")
    );
}

#[test]
fn unknown_key_is_located() {
    let p = problems(&GOOD.replace(
        "default_region = \"GB\"",
        "default_region = \"GB\"\nlisten_adress = \"x\"",
    ));
    let text = p.to_string();
    assert!(text.starts_with("test.toml:6:1: "), "{text}");
    assert!(text.contains("unknown field `listen_adress`"), "{text}");
}

#[test]
fn wrong_type_is_located() {
    let p = problems(&GOOD.replace("opt_in_margin = \"10s\"", "opt_in_margin = 10"));
    let text = p.to_string();
    assert!(text.starts_with("test.toml:8:17: "), "{text}");
}

#[test]
fn unknown_connector_kind_and_common_keys() {
    let p = problems(&GOOD.replace("kind = \"hubspot\"", "kind = \"zendesk\""));
    let text = p.to_string();
    assert!(
        text.contains("connectors.crm-eu.kind") && text.contains("zendesk"),
        "{text}"
    );
    assert!(text.starts_with("test.toml:17:8: "), "{text}");
}

#[test]
fn bad_cron_and_conflicting_schedules() {
    let p = problems(&GOOD.replace("0 0 3 * * Sun", "every night").replace(
        "poll_interval = \"30s\"",
        "poll_interval = \"30s\"\npoll_cron = \"0 * * * * *\"",
    ));
    let text = p.to_string();
    assert_eq!(p.problems.len(), 2, "{text}");
    assert!(text.contains("test.toml:20:20: connectors.crm-eu.full_resync_cron: `every night` is not a cron expression"), "{text}");
    assert!(
        text.contains("connectors.crm-eu.poll_cron: set poll_interval or poll_cron, not both"),
        "{text}"
    );
}

#[test]
fn secrets_missing_inline_or_too_open() {
    // A secret written inline is refused at parse time.
    let p = problems(&GOOD.replace("[policy]", "gate_token = \"hunter2\"\n[policy]"));
    let text = p.to_string();
    assert!(
        text.contains("secrets must not be written in the configuration file"),
        "{text}"
    );
    assert!(
        !text.contains("hunter2"),
        "the secret is echoed back: {text}"
    );

    // A missing environment variable.
    let p = problems(&GOOD.replace(
        "[policy]",
        "gate_token = { env = \"OPTOUT_TEST_SURELY_UNSET\" }\n[policy]",
    ));
    let text = p.to_string();
    assert!(text.contains("test.toml:7:14: daemon.gate_token: environment variable OPTOUT_TEST_SURELY_UNSET is not set"), "{text}");

    // A world-readable secret file.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("gate");
    std::fs::write(&f, "s3cret-value-of-the-gate\n").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let src = GOOD.replace(
        "[policy]",
        &format!("gate_token = {{ file = \"{}\" }}\n[policy]", f.display()),
    );
    let text = problems(&src).to_string();
    assert!(
        text.contains("daemon.gate_token: secret file")
            && text.contains("mode 644")
            && text.contains("chmod 600"),
        "{text}"
    );
    assert!(!text.contains("s3cret-value"));
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    parse(Path::new("test.toml"), &src)
        .unwrap()
        .validate()
        .unwrap();
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let src = GOOD
        .replace("\"GB\"", "\"Atlantis\"")
        .replace("\"/var/lib/optout-sync\"", "\"relative/dir\"")
        .replace("[\"whatsapp\"]", "[\"whatsapp\", \"zapier\"]");
    let p = problems(&src);
    let keys: Vec<_> = p.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "daemon.default_region",
            "daemon.state_dir",
            "policy.accept_opt_ins_from",
        ],
        "{p}"
    );
    assert!(p.problems.iter().all(|p| p.line > 0));
}

#[test]
fn shipped_example_passes_with_its_variables_set() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/optout-sync.toml");
    let c = load(&path).unwrap();
    // The example's secrets come from the environment; check-config reports each one
    // that is missing, naming the variable.
    if let Err(p) = c.validate() {
        for problem in &p.problems {
            assert!(problem.message.contains("environment variable"), "{p}");
        }
    }
}

#[test]
fn problems_inside_a_connectors_own_settings_name_and_locate_their_key() {
    let p = problems(&GOOD.replace(
        "\ntoken = { env = \"CARGO_MANIFEST_DIR\" }",
        "\ntoken = \"pat-inline\"",
    ));
    let text = p.to_string();
    assert!(
        text.contains("test.toml:21:9: connectors.crm-eu.token: secrets must not be written"),
        "{text}"
    );
    assert!(!text.contains("pat-inline"));
    let p = problems(&GOOD.replace(
        "\ntoken = { env = \"CARGO_MANIFEST_DIR\" }",
        "\ntoken = { env = \"CARGO_MANIFEST_DIR\" }\noverlap = 5",
    ));
    assert!(
        p.to_string()
            .contains("test.toml:22:11: connectors.crm-eu.overlap: invalid type"),
        "{p}"
    );
    let p = problems(
        &(GOOD.to_string()
            + "[connectors.sf]\nkind = \"salesforce\"\nlogin_url = \"https://x.my.salesforce.com\"\nauth = { client_id = \"a\", client_secret = { env = \"PATH\" } }\n"),
    );
    assert!(
        p.to_string()
            .contains("connectors.sf.auth: missing field `flow`"),
        "{p}"
    );
    assert!(p.to_string().starts_with("test.toml:25:8: "), "{p}");
}

#[test]
fn checking_yields_parsed_values_once() {
    let checked = parse(Path::new("test.toml"), GOOD)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(checked.region, phonenumber::country::Id::GB);
    let hs = checked.connector("crm-eu").unwrap();
    assert!(matches!(hs.poll, Some(PollSchedule::Every(d)) if d == Duration::from_secs(30)));
    let full = hs.full_resync.as_ref().expect("parsed cron");
    assert!(full.upcoming(chrono::Utc).next().is_some());
    assert_eq!(hs.takes, Takes::Records);
    assert!(hs.secrets.get("token").is_ok(), "the token was read once");
    // WhatsApp has no schedule of its own in the file: its kind's default safety tick.
    let wa = checked.connector("whatsapp").unwrap();
    assert!(matches!(wa.poll, Some(PollSchedule::Every(d)) if d == Duration::from_secs(5)));
    assert_eq!(wa.takes, Takes::Nothing);
    // Without secrets, nothing is read.
    let offline = parse(Path::new("test.toml"), GOOD)
        .unwrap()
        .validate_without_secrets()
        .unwrap();
    assert!(
        offline
            .connector("crm-eu")
            .unwrap()
            .secrets
            .get("token")
            .is_err()
    );
}

#[test]
fn dangerous_settings_are_refused() {
    let cases = [
        (
            GOOD.replace("[policy]", "[policy]\nfuture_tolerance = \"100y\""),
            "policy.future_tolerance: at most 1h",
        ),
        (
            GOOD.replace("0 0 3 * * Sun", "* * * * * *"),
            "connectors.crm-eu.full_resync_cron: runs a full resync every 1s",
        ),
        (
            GOOD.replace("[connectors.crm-eu]", "[connectors.import]"),
            "connectors.import: `import` is reserved",
        ),
        (
            GOOD.replace(
                "listen = \"127.0.0.1:8088\"",
                "listen = \"127.0.0.1:8088\"\ncontrol_socket = \"/var/lib/optout-sync/control.sock\"",
            ),
            "daemon.control_socket: must not be inside daemon.state_dir",
        ),
        (
            GOOD.replace("[policy]", "gate_token = { env = \"PATH\" }\n[policy]"),
            "connectors.whatsapp.app_secrets[0]: has the same value as daemon.gate_token",
        ),
        (
            GOOD.replace("{ env = \"HOME\" }", "{ env = \"PATH\" }"),
            "connectors.whatsapp.verify_token: has the same value as connectors.whatsapp.app_secrets[0]",
        ),
    ];
    for (src, expected) in cases {
        let text = problems(&src).to_string();
        assert!(text.contains(expected), "expected {expected:?} in:\n{text}");
    }
}

#[test]
fn a_short_gate_token_is_refused_without_showing_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("gate");
    std::fs::write(&f, "short-tok\n").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let src = GOOD.replace(
        "[policy]",
        &format!("gate_token = {{ file = \"{}\" }}\n[policy]", f.display()),
    );
    let text = problems(&src).to_string();
    assert!(
        text.contains("daemon.gate_token: too short (9 characters); use at least 16"),
        "{text}"
    );
    assert!(!text.contains("short-tok"), "{text}");
}

#[test]
fn a_listener_beyond_loopback_is_a_warning() {
    let src = GOOD.replace("127.0.0.1:8088", "0.0.0.0:8088");
    let checked = parse(Path::new("test.toml"), &src)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(checked.warnings.len(), 1, "{:?}", checked.warnings);
    assert!(
        checked.warnings[0].starts_with(
            "test.toml:4:10: daemon.listen: 0.0.0.0:8088 is reachable from other hosts"
        ),
        "{:?}",
        checked.warnings
    );
    let quiet = parse(Path::new("test.toml"), GOOD)
        .unwrap()
        .validate()
        .unwrap();
    assert!(quiet.warnings.is_empty());
}

/// Two WhatsApp Business Accounts of one Meta app: two connectors, each with its own
/// route, sharing the app secret.
#[test]
fn several_whatsapp_accounts_are_accepted() {
    let src = GOOD.to_string()
        + "[connectors.wa2]\nkind = \"whatsapp\"\napp_secrets = [{ env = \"PATH\" }]\nverify_token = { env = \"HOME\" }\n";
    let c = parse(Path::new("test.toml"), &src).unwrap();
    let checked = c.validate().unwrap();
    let kinds: Vec<_> = checked.connectors.iter().map(|c| c.kind.as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "whatsapp").count(), 2);
}

#[test]
fn audit_retention_is_optional_read_as_a_duration_and_not_too_short() {
    let checked = parse(Path::new("test.toml"), GOOD)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(checked.audit_retention, None, "kept for ever by default");
    let five_years = format!("{GOOD}\n[audit]\nretention = \"5y\"\n");
    let checked = (parse(Path::new("test.toml"), &five_years)
        .unwrap()
        .validate())
    .unwrap();
    let years = checked.audit_retention.unwrap().as_secs() / (365 * 24 * 3600);
    assert_eq!(years, 5);
    let text = problems(&format!("{GOOD}\n[audit]\nretention = \"1d\"\n")).to_string();
    assert!(text.contains("audit.retention: at least 30d"), "{text}");
    let text = problems(&format!("{GOOD}\n[audit]\nretention = \"soon\"\n")).to_string();
    assert!(text.contains("audit.retention"), "{text}");
}
