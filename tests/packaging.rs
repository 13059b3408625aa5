//! The Debian package and what an operator meets around it, checked without building the
//! package: `[package.metadata.deb]` names files that exist (or that `optout-sync generate`
//! writes, as scripts/build-deb.sh runs it), the conffile and the unit are declared, and
//! the man pages and completions come out of the real binary; a package already built in
//! target/debian is listed and checked too. Then the offline commands' ownership rule (a
//! store owned by another user is never opened), private store files whatever the umask,
//! `lookup … | head` without a broken-pipe error, and `status` columns that stay aligned.

mod common;

use common::{bin, text};

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::config::Config;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `[package.metadata.deb]` of Cargo.toml.
fn deb_metadata() -> toml::Table {
    let manifest: toml::Table = std::fs::read_to_string(repo().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    manifest["package"]["metadata"]["deb"]
        .as_table()
        .expect("[package.metadata.deb]")
        .clone()
}

/// Each asset as (source, destination, mode).
fn assets(deb: &toml::Table) -> Vec<(String, String, String)> {
    deb["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().expect("assets as [source, destination, mode]");
            let s = |i: usize| a[i].as_str().unwrap().to_string();
            (s(0), s(1), s(2))
        })
        .collect()
}

const GENERATED: &str = "target/generated/";

#[test]
fn every_asset_exists_or_is_generated_by_the_build_script() {
    let deb = deb_metadata();
    let script = std::fs::read_to_string(repo().join("scripts/build-deb.sh")).unwrap();
    assert!(
        script.contains("cargo build --release --locked --no-default-features")
            && script.contains("cargo deb --no-build"),
        "the script builds the production binary and packages exactly that"
    );
    for (source, destination, mode) in assets(&deb) {
        if let Some(built) = source.strip_prefix("target/release/") {
            assert_eq!(built, "optout-sync", "only the daemon is built");
            assert_eq!((destination.as_str(), mode.as_str()), ("usr/bin/", "755"));
        } else if let Some(generated) = source.strip_prefix(GENERATED) {
            // Checked against the generator's real output below.
            let what = generated.split('/').next().unwrap();
            assert!(
                script.contains("generate \"$what\" \"$generated/$what\"")
                    && script.contains("for what in man completions"),
                "scripts/build-deb.sh writes {what} into {GENERATED}{what}"
            );
            assert_eq!(mode, "644", "{source}");
        } else {
            assert!(repo().join(&source).is_file(), "asset {source} is missing");
            assert_eq!(mode, "644", "{source}");
        }
    }
    // The production binary: no demo, hence no fakes.
    assert_eq!(deb["default-features"].as_bool(), Some(false));
    assert!(
        deb["features"].as_array().unwrap().is_empty(),
        "{:?}",
        deb["features"]
    );
}

#[test]
fn the_conffile_the_unit_and_the_maintainer_scripts_are_declared() {
    let deb = deb_metadata();
    let conffiles: Vec<&str> = deb["conf-files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(conffiles, ["/etc/optout-sync/optout-sync.toml"]);
    assert!(assets(&deb).contains(&(
        "config/optout-sync.toml".into(),
        "etc/optout-sync/optout-sync.toml".into(),
        "644".into()
    )));

    // cargo-deb installs `<package>.service` from unit-scripts as the systemd unit.
    let units = deb["systemd-units"].as_table().unwrap();
    let dir = repo().join(units["unit-scripts"].as_str().unwrap());
    let unit = std::fs::read_to_string(dir.join("optout-sync.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/optout-sync run"),
        "{unit}"
    );
    assert_eq!(units["enable"].as_bool(), Some(true), "enabled on install");
    assert_eq!(
        units["start"].as_bool(),
        Some(false),
        "not started before it has credentials"
    );

    // Each maintainer script keeps cargo-deb's systemd fragments; postrm deletes the store
    // on purge only.
    let scripts = repo().join(deb["maintainer-scripts"].as_str().unwrap());
    for entry in std::fs::read_dir(&scripts).unwrap() {
        let path = entry.unwrap().path();
        let body = std::fs::read_to_string(&path).unwrap();
        assert!(body.contains("#DEBHELPER#"), "{}", path.display());
        let syntax = Command::new("sh").arg("-n").arg(&path).output().unwrap();
        assert!(syntax.status.success(), "{}", text(&syntax));
    }
    let postrm = std::fs::read_to_string(scripts.join("postrm")).unwrap();
    let purge = postrm.find(r#"if [ "$1" = "purge" ]; then"#).unwrap();
    let delete = postrm.find("rm -rf /var/lib/private/optout-sync").unwrap();
    let end = purge + postrm[purge..].find("\nfi").unwrap();
    assert!(
        purge < delete && delete < end,
        "the store is removed inside the purge branch only:\n{postrm}"
    );
}

#[test]
fn generate_writes_man_pages_and_completions_the_assets_name() {
    let dir = tempfile::tempdir().unwrap();
    for what in ["man", "completions"] {
        let o = bin()
            .args(["generate", what])
            .arg(dir.path().join(what))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    let man = dir.path().join("man");
    for page in [
        "optout-sync.1",
        "optout-sync-run.1",
        "optout-sync-status.1",
        "optout-sync-resync.1",
        "optout-sync-check-config.1",
        "optout-sync-lookup.1",
        "optout-sync-import.1",
        "optout-sync-audit.1",
        "optout-sync-audit-export.1",
    ] {
        let roff =
            std::fs::read_to_string(man.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(roff.contains(".TH "), "{page} is a man page");
    }
    let main = std::fs::read_to_string(man.join("optout-sync.1")).unwrap();
    assert!(main.contains("check\\-config"), "{main}");
    assert!(
        !main.contains("generate"),
        "the hidden generator is not documented"
    );
    let bash = std::fs::read_to_string(dir.path().join("completions/optout-sync.bash")).unwrap();
    assert!(
        bash.contains("lookup") && bash.contains("--config"),
        "{bash}"
    );

    // Every generated asset of the package matches what the generator wrote.
    for (source, _, _) in assets(&deb_metadata()) {
        let Some(generated) = source.strip_prefix(GENERATED) else {
            continue;
        };
        let path = dir.path().join(generated);
        let found = match generated.strip_suffix("*.1") {
            Some(man_dir) => std::fs::read_dir(dir.path().join(man_dir))
                .unwrap()
                .any(|e| e.unwrap().path().extension().is_some_and(|x| x == "1")),
            None => path.is_file(),
        };
        assert!(found, "the generator wrote no {source}");
    }
}

/// The target directory this test binary was built into.
fn target_dir() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_optout-sync"));
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

#[test]
fn a_built_package_holds_the_production_binary_unit_conffile_and_docs() {
    let newest = std::fs::read_dir(target_dir().join("debian"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    let Some(deb) = newest else {
        eprintln!("skipped: no package in target/debian (scripts/build-deb.sh builds one)");
        return;
    };
    let listing = Command::new("dpkg-deb").arg("-c").arg(&deb).output();
    let Ok(listing) = listing else {
        eprintln!("skipped: dpkg-deb is not installed");
        return;
    };
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    for path in [
        "./usr/bin/optout-sync",
        "./etc/optout-sync/optout-sync.toml",
        "/systemd/system/optout-sync.service",
        "./usr/share/doc/optout-sync/README.md",
        "./usr/share/doc/optout-sync/examples/prometheus/optout-sync.rules.yml",
        "./usr/share/doc/optout-sync/examples/grafana/optout-sync.json",
        "./usr/share/man/man1/optout-sync.1.gz",
        "./usr/share/man/man1/optout-sync-lookup.1.gz",
        "./usr/share/bash-completion/completions/optout-sync",
        "./usr/share/zsh/vendor-completions/_optout-sync",
        "./usr/share/fish/vendor_completions.d/optout-sync.fish",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{} lacks {path}:\n{listing}",
            deb.display()
        );
    }
    assert!(!listing.contains("/var/lib/"), "the store is never shipped");

    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control");
    let x = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(&control)
        .output()
        .unwrap();
    assert!(x.status.success(), "{}", text(&x));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(
        conffiles
            .lines()
            .any(|l| l == "/etc/optout-sync/optout-sync.toml"),
        "{conffiles}"
    );
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(
        postinst.contains("deb-systemd-helper enable optout-sync.service"),
        "{postinst}"
    );
    let postrm = std::fs::read_to_string(control.join("postrm")).unwrap();
    assert!(
        postrm.contains("rm -rf /var/lib/private/optout-sync"),
        "{postrm}"
    );

    // The packaged binary is the production one: no demo.
    let root = dir.path().join("root");
    let x = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .output()
        .unwrap();
    assert!(x.status.success(), "{}", text(&x));
    let help = Command::new(root.join("usr/bin/optout-sync"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success(), "{}", text(&help));
    let help = text(&help);
    assert!(help.contains("lookup") && !help.contains("demo"), "{help}");
}

/// A configuration whose store and control socket are in `dir`; no daemon runs on it.
fn offline_config(dir: &Path) -> PathBuf {
    let path = dir.join("optout-sync.toml");
    std::fs::write(&path, Config::new(dir).whatsapp("app-secret").toml()).unwrap();
    path
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[test]
fn offline_commands_refuse_a_store_owned_by_another_user_and_create_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root to give the store to another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = offline_config(dir.path());
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let csv = dir.path().join("list.csv");
    std::fs::write(
        &csv,
        "phone,status,time\n+14155552671,opted_out,2024-05-01\n",
    )
    .unwrap();

    let commands: [&[&str]; 3] = [
        &["lookup", "+14155552671"],
        &["import", csv.to_str().unwrap()],
        &["audit", "export"],
    ];
    for args in commands {
        let o = bin()
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {t}");
        assert!(
            t.contains(&format!("the store {} belongs to", state.display()))
                && t.contains("uid 65534")
                && t.contains("so that every file in it stays readable by the daemon"),
            "{args:?}: {t}"
        );
        // The way that works for the packaged service, with the command named.
        let command = args[..if args[0] == "audit" { 2 } else { 1 }].join(" ");
        assert!(
            t.contains(&format!(
                "systemd-run --pipe --wait --quiet --collect -p DynamicUser=yes -p User=optout-sync -p StateDirectory=optout-sync -p StateDirectoryMode=0700 optout-sync {command} …"
            )),
            "{args:?}: {t}"
        );
        if let Some(name) = passwd_name(65534) {
            assert!(
                t.contains(&format!("runuser -u {name} -- optout-sync {command}")),
                "{t}"
            );
        }
        let left: Vec<_> = std::fs::read_dir(&state).unwrap().collect();
        assert!(left.is_empty(), "{args:?} created {left:?}");
        assert_eq!(std::fs::metadata(&state).unwrap().uid(), 65534);
    }
}

fn passwd_name(uid: u32) -> Option<String> {
    std::fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .find(|l| l.split(':').nth(2) == Some(&uid.to_string()))
        .map(|l| l.split(':').next().unwrap().to_string())
}

#[test]
fn the_store_s_files_are_private_whatever_the_callers_umask() {
    if common::sled_only("it reads the modes of sled's files") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = offline_config(dir.path());
    let csv = dir.path().join("list.csv");
    std::fs::write(
        &csv,
        "phone,status,time\n+14155552671,opted_out,2024-05-01\n",
    )
    .unwrap();
    // The caller's umask (022 in a usual shell) must not matter: run through a shell that
    // sets a permissive one.
    let o = Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$0\" import --config \"$1\" \"$2\"")
        .arg(env!("CARGO_BIN_EXE_optout-sync"))
        .arg(&config)
        .arg(&csv)
        .env_remove("OPTOUT_SYNC_CONFIG")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let state = dir.path().join("state");
    let mut seen = 0;
    let mut stack = vec![state];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(
            m.mode() & 0o077,
            0,
            "{} is mode {:o}",
            p.display(),
            m.mode() & 0o7777
        );
        seen += 1;
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(seen > 3, "the store has its files");
}

/// A standard output whose reader is gone: writing to it fails with EPIPE, as it does for
/// `optout-sync lookup … | head` once `head` has exited.
fn closed_stdout() -> Stdio {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    drop(ours);
    Stdio::from(std::os::fd::OwnedFd::from(theirs))
}

#[test]
fn lookup_into_a_closed_pipe_ends_quietly_with_exit_code_0() {
    let dir = tempfile::tempdir().unwrap();
    let config = offline_config(dir.path());
    for json in [false, true] {
        let mut cmd = bin();
        cmd.args(["lookup", "+14155552671", "--config"])
            .arg(&config);
        if json {
            cmd.arg("--json");
        }
        let o = cmd.stdout(closed_stdout()).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        assert_eq!(String::from_utf8_lossy(&o.stderr), "", "json: {json}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_columns_stay_aligned_with_wide_values() {
    let dir = tempfile::tempdir().unwrap();
    let long = "whatsapp-business-account-emea-2";
    let c = Config::new(dir.path())
        .set(long, r#"kind = "whatsapp""#)
        .set(long, r#"app_secrets = [{ env = "WA_APP_SECRET" }]"#)
        .set(long, r#"verify_token = { env = "WA_VERIFY" }"#)
        .env_var("WA_APP_SECRET", "app-secret")
        .env_var("WA_VERIFY", "verify-me")
        .automations("http://127.0.0.1:9/hook");
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    d.until(
        "a poll of the WhatsApp inbox",
        Duration::from_secs(20),
        async || {
            d.status()
                .await
                .connectors
                .iter()
                .any(|c| c.last_poll_ok.is_some())
        },
    )
    .await;
    let o = bin()
        .args(["status", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("CONNECTOR"))
        .expect(&out);
    let rows: Vec<&str> = lines[header + 1..]
        .iter()
        .copied()
        .filter(|l| !l.starts_with(' ') && !l.is_empty())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows.iter().any(|r| r.starts_with(long)), "{out}");
    assert_aligned(lines[header], &rows, &out);

    // Into a closed pipe: no error, the usual exit code.
    let o = bin()
        .args(["status", "--config"])
        .arg(&d.config)
        .stdout(closed_stdout())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stderr), "");
    assert!(o.status.code().is_some_and(|c| c <= 1), "{}", text(&o));
    d.terminate().await;
}

/// Every cell starts under its header (text columns) or ends under it (numbers).
fn assert_aligned(header: &str, rows: &[&str], out: &str) {
    const COLUMNS: [(&str, bool); 8] = [
        ("CONNECTOR", false),
        ("KIND", false),
        ("HEALTH", false),
        ("LAST POLL", false),
        ("OUTBOX", true),
        ("DEAD", true),
        ("UNVER", true),
        ("ERRORS", true),
    ];
    for row in rows {
        let cells = spans(row);
        assert_eq!(cells.len(), COLUMNS.len(), "{row:?} in\n{out}");
        for ((name, right), (start, end)) in COLUMNS.iter().zip(cells) {
            let at = header.find(name).unwrap();
            if *right {
                assert_eq!(end, at + name.len(), "{name} in\n{out}");
            } else {
                assert_eq!(start, at, "{name} in\n{out}");
            }
        }
    }
}

/// The (start, end) byte offsets of the whitespace-separated words of `line`.
fn spans(line: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = None;
    for (i, ch) in line.char_indices().chain([(line.len(), ' ')]) {
        match (ch == ' ', start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                spans.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    spans
}
