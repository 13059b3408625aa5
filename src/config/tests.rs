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

/// A private file holding a PostgreSQL URL, and `GOOD` with a `[store]` table reading it
/// plus `extra` lines.
fn with_pg_store(dir: &Path, extra: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let f = dir.join("store-url");
    std::fs::write(
        &f,
        "postgresql://optout:pw-of-the-store@db.example:5432/optout\n",
    )
    .unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        "{GOOD}\n[store]\nbackend = \"postgres\"\nurl = {{ file = \"{}\" }}\n{extra}",
        f.display()
    )
}

fn pg_of(src: &str) -> crate::store::PgSettings {
    let checked = parse(Path::new("test.toml"), src)
        .unwrap()
        .validate()
        .unwrap();
    match checked.store {
        crate::store::Backend::Postgres(pg) => pg,
        other => panic!("expected postgres, got {other:?}"),
    }
}

#[test]
fn the_store_is_sled_unless_the_file_says_otherwise() {
    let checked = parse(Path::new("test.toml"), GOOD)
        .unwrap()
        .validate()
        .unwrap();
    assert!(matches!(checked.store, crate::store::Backend::Sled));
    let explicit = format!("{GOOD}\n[store]\nbackend = \"sled\"\n");
    let checked = (parse(Path::new("test.toml"), &explicit).unwrap().validate()).unwrap();
    assert!(matches!(checked.store, crate::store::Backend::Sled));
}

#[test]
fn postgres_settings_have_their_defaults_and_the_url_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let pg = pg_of(&with_pg_store(dir.path(), ""));
    assert_eq!(
        pg.url.expose(),
        "postgresql://optout:pw-of-the-store@db.example:5432/optout",
        "read from the file, its newline dropped"
    );
    assert_eq!(pg.pool_size, 8);
    assert_eq!(pg.lease, Duration::from_secs(10));
    assert_eq!(pg.tls_ca_file, None);
    // The host name when it is a valid instance name, which a Linux host name always is.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let expected = Some(host.trim())
        .filter(|h| valid_instance(h))
        .unwrap_or(FALLBACK_INSTANCE);
    assert_eq!(pg.instance, expected);

    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let pg = pg_of(&with_pg_store(
        dir.path(),
        &format!(
            "pool_size = 64\nlease = \"5m\"\ninstance = \"web-1.eu_west\"\ntls_ca_file = \"{}\"\n",
            ca.display()
        ),
    ));
    assert_eq!(pg.pool_size, 64);
    assert_eq!(pg.lease, Duration::from_secs(300));
    assert_eq!(pg.instance, "web-1.eu_west");
    assert_eq!(pg.tls_ca_file.as_deref(), Some(ca.as_path()));
}

#[test]
fn the_store_url_is_a_secret_reference_and_never_shown() {
    let inline = format!(
        "{GOOD}\n[store]\nbackend = \"postgres\"\nurl = \"postgresql://u:hunter2@db/optout\"\n"
    );
    let text = problems(&inline).to_string();
    assert!(
        text.contains(
            "test.toml:25:7: store.url: secrets must not be written in the configuration file"
        ),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");

    // Neither a URL nor key=value pairs: refused, naming the file but not the value.
    let dir = tempfile::tempdir().unwrap();
    let src = with_pg_store(dir.path(), "");
    std::fs::write(dir.path().join("store-url"), "pw-of-the-store\n").unwrap();
    let text = problems(&src).to_string();
    assert!(
        text.contains("store.url: file ") && text.contains("holds neither a postgresql:// URL"),
        "{text}"
    );
    assert!(!text.contains("pw-of-the-store"), "{text}");
    // A libpq key=value string is accepted.
    std::fs::write(
        dir.path().join("store-url"),
        "host=/run/postgresql dbname=optout\n",
    )
    .unwrap();
    assert_eq!(
        pg_of(&src).url.expose(),
        "host=/run/postgresql dbname=optout"
    );
}

#[test]
fn postgres_needs_a_url() {
    let src = format!("{GOOD}\n[store]\nbackend = \"postgres\"\n");
    let text = problems(&src).to_string();
    assert!(
        text.contains("test.toml:23:1: store.url: required with backend = \"postgres\""),
        "{text}"
    );
}

#[test]
fn postgres_keys_are_refused_with_sled() {
    let src = format!(
        "{GOOD}\n[store]\nurl = {{ env = \"PATH\" }}\npool_size = 4\nlease = \"10s\"\ntls_ca_file = \"/etc/ssl/ca.pem\"\n"
    );
    let p = problems(&src);
    let keys: Vec<_> = p.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "store.url",
            "store.pool_size",
            "store.tls_ca_file",
            "store.lease"
        ],
        "{p}"
    );
    assert!(
        p.to_string()
            .contains("test.toml:24:7: store.url: only for backend = \"postgres\""),
        "{p}"
    );
}

#[test]
fn store_bounds_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("pool_size = 0", "store.pool_size: must be from 1 to 64"),
        ("pool_size = 65", "store.pool_size: must be from 1 to 64"),
        ("pool_size = -1", "store.pool_size: invalid value"),
        ("lease = \"2s\"", "store.lease: must be between 3s and 5m"),
        ("lease = \"301s\"", "store.lease: must be between 3s and 5m"),
        ("lease = \"soon\"", "store.lease"),
        ("instance = \"\"", "store.instance: use 1 to 64 letters"),
        (
            "instance = \"web 1\"",
            "store.instance: use 1 to 64 letters",
        ),
        (
            "instance = \"web/1\"",
            "store.instance: use 1 to 64 letters",
        ),
        (
            "tls_ca_file = \"ca.pem\"",
            "store.tls_ca_file: must be an absolute path",
        ),
        (
            "tls_ca_file = \"/nonexistent/ca.pem\"",
            "store.tls_ca_file: /nonexistent/ca.pem cannot be read",
        ),
        (
            "backend = \"mysql\"",
            "store.backend: unknown variant `mysql`",
        ),
    ];
    for (line, expected) in cases {
        let src = with_pg_store(dir.path(), &format!("{line}\n"));
        // A key given twice is a syntax error; `backend` is replaced instead.
        let src = if line.starts_with("backend") {
            src.replace("backend = \"postgres\"\n", "")
        } else {
            src
        };
        let text = problems(&src).to_string();
        assert!(text.contains(expected), "expected {expected:?} in:\n{text}");
    }
    let long = format!("instance = \"{}\"\n", "a".repeat(65));
    let text = problems(&with_pg_store(dir.path(), &long)).to_string();
    assert!(text.contains("store.instance"), "{text}");
    let longest = format!("instance = \"{}\"\n", "a".repeat(64));
    assert_eq!(
        pg_of(&with_pg_store(dir.path(), &longest)).instance.len(),
        64
    );
    let shortest = "lease = \"3s\"\npool_size = 1\n";
    let pg = pg_of(&with_pg_store(dir.path(), shortest));
    assert_eq!((pg.lease, pg.pool_size), (Duration::from_secs(3), 1));
}

#[test]
fn an_unknown_store_key_is_located() {
    let dir = tempfile::tempdir().unwrap();
    let text = problems(&with_pg_store(dir.path(), "pool = 4\n")).to_string();
    assert!(
        text.starts_with("test.toml:26:1: store.pool: unknown field `pool`"),
        "{text}"
    );
}

/// Offline commands open the store: its URL is read even when no other secret is, and a
/// missing one is a located problem there too.
#[test]
fn the_store_url_is_read_without_other_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let src = with_pg_store(dir.path(), "");
    let offline = (parse(Path::new("test.toml"), &src).unwrap())
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
    match offline.store {
        crate::store::Backend::Postgres(pg) => {
            assert!(pg.url.expose().starts_with("postgresql://"))
        }
        other => panic!("expected postgres, got {other:?}"),
    }
    let missing = src.replace(
        &format!(
            "{{ file = \"{}\" }}",
            dir.path().join("store-url").display()
        ),
        "{ env = \"OPTOUT_TEST_SURELY_UNSET\" }",
    );
    let p = (parse(Path::new("test.toml"), &missing).unwrap())
        .validate_without_secrets()
        .expect_err("the URL cannot be read");
    assert!(
        p.to_string().contains(
            "test.toml:25:7: store.url: environment variable OPTOUT_TEST_SURELY_UNSET is not set"
        ),
        "{p}"
    );
}

#[test]
fn the_store_url_is_a_role_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let src = with_pg_store(dir.path(), "").replace(
        "[policy]",
        &format!(
            "write_token = {{ file = \"{}\" }}\n[policy]",
            dir.path().join("store-url").display()
        ),
    );
    let text = problems(&src).to_string();
    assert!(
        text.contains("daemon.write_token: has the same value as store.url"),
        "{text}"
    );
}
