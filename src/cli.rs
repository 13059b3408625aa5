//! The command line: `optout-sync <command>`. Each command is a small function over the
//! library; output for people on stdout, problems on stderr, and exit codes that scripts
//! and systemd can act on: 0 ok, 1 failure (the unit restarts the daemon), 2 bad
//! configuration or usage, 3 not running (`status`), 65 a damaged store or one of another
//! schema (not restarted: an operator restores it), 70 an internal error (a panic), 75 a
//! store that failed at run time and cannot be reopened in the process (restarted).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use optout_core::Timestamp;

use crate::app;
use crate::audit::{Exporter, Format};
use crate::config;
use crate::report::{ConnectorReport, StatusReport};
use crate::store::Store;

const DEFAULT_CONFIG: &str = "/etc/optout-sync/optout-sync.toml";

/// The store is damaged or of another schema (EX_DATAERR): restarting cannot help.
pub const EXIT_DAMAGED_STORE: u8 = 65;
/// A panic in any task (EX_SOFTWARE).
pub const EXIT_INTERNAL: u8 = 70;
/// The store failed and this process cannot reopen it; a new one can (EX_TEMPFAIL).
pub const EXIT_RESTART: u8 = 75;
/// Descriptors the daemon needs at least (HTTP connections, the store's files, vendors).
const MIN_NOFILE: u64 = 256;

/// Makes a customer's WhatsApp opt-out ("STOP") take effect in every system the business
/// messages from: WhatsApp, HubSpot, Salesforce and automation webhooks.
#[derive(Debug, Parser)]
#[command(name = "optout-sync", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: poll every connector, apply consent changes, push them to every
    /// system, serve webhooks, the send gate and metrics. This is what the systemd unit
    /// starts (Type=notify). Stops cleanly on SIGTERM.
    Run {
        #[arg(long, short, env = "OPTOUT_SYNC_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Create daemon.state_dir (mode 0700) if it does not exist. Without it a missing
        /// directory is an error: under systemd, StateDirectory= creates it, and a typo in
        /// the path must not start an empty store in which everyone is allowed.
        #[arg(long)]
        create_state_dir: bool,
    },
    /// Run everything on this machine against fakes of WhatsApp, HubSpot, Salesforce and
    /// an automation webhook: seed records, send a signed "STOP", and show what happened in
    /// each system and how long it took. Needs no credentials and no setup.
    #[cfg(feature = "demo")]
    Demo,
    /// Show the running daemon's state: per connector health, last poll, cursor, errors,
    /// outbox depth, dead letters and unverified pushes; totals of people by decision.
    /// Exit code 1 if any connector needs attention, 3 if the daemon is not running.
    Status {
        #[arg(long, short, env = "OPTOUT_SYNC_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running daemon to poll now (all connectors, or one). With --full, re-read
    /// every record from the beginning, push corrections wherever a system disagrees with
    /// the decision, and re-queue rejected pushes. Reports progress until done.
    Resync {
        /// Only this connector instance.
        #[arg(long)]
        connector: Option<String>,
        /// Re-read everything and repair drift.
        #[arg(long)]
        full: bool,
        #[arg(long, short, env = "OPTOUT_SYNC_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check a configuration file: syntax, types, schedules, and that every secret can be
    /// read. Prints every problem with file, line and column; exit code 2 if any.
    /// Use as the unit's ExecStartPre=.
    CheckConfig {
        /// The configuration file.
        #[arg(default_value = DEFAULT_CONFIG)]
        path: PathBuf,
        /// Also run every connector's live checks against its system (credentials and
        /// their expiry, scopes, HubSpot properties and options, Salesforce fields, the
        /// WhatsApp number and webhook subscription, the automation URL) and print what
        /// would fail, each with its fix. Writes nothing. Exit code 2 on any problem.
        #[arg(long)]
        connect: bool,
    },
    /// Show what is known of one person: the decision per scope and its evidence, the
    /// linked records in every system with their push state, and the full history.
    Lookup {
        /// A phone number in any format, `wa:<digits>` for a WhatsApp id, or a
        /// business-scoped user id (e.g. US.13491208655302741918).
        id: String,
        #[arg(long, short, env = "OPTOUT_SYNC_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Seed the store from an existing suppression list (CSV with columns phone, status,
    /// time and optionally source). Bad rows are reported by line; good rows are applied
    /// and pushed to every system by the running daemon.
    Import {
        /// The CSV file (`-` for standard input).
        file: PathBuf,
        #[arg(long, short, env = "OPTOUT_SYNC_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Write the audit log to standard output, oldest first, streaming.
    Export {
        /// Only entries stored at or after this time (RFC 3339, or a date).
        #[arg(long, value_parser = parse_time)]
        since: Option<Timestamp>,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: Format,
        #[arg(long, short, env = "OPTOUT_SYNC_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

fn parse_time(s: &str) -> Result<Timestamp, String> {
    Timestamp::parse(s).ok_or_else(|| {
        format!("`{s}` is not a time (use RFC 3339, e.g. 2024-05-01T10:00:00Z, or 2024-05-01)")
    })
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    private_files();
    let result = match cli.command {
        Command::Run {
            config,
            create_state_dir,
        } => run(&config, create_state_dir),
        #[cfg(feature = "demo")]
        Command::Demo => demo(),
        Command::Status { config, json } => status(&config, json),
        Command::Resync {
            connector,
            full,
            config,
        } => resync(&config, connector, full),
        Command::CheckConfig { path, connect } => return check_config(&path, connect),
        Command::Lookup { id, config, json } => lookup(&config, &id, json),
        Command::Audit {
            command:
                AuditCommand::Export {
                    since,
                    format,
                    config,
                },
        } => audit_export(&config, since, format),
        Command::Import { file, config } => import(&config, &file),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("optout-sync: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code of a failed command: see the module doc.
fn exit_code(e: &anyhow::Error) -> u8 {
    use crate::workers::store_health::StoreFatal;
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<StoreFatal>() {
            return match f {
                StoreFatal::Damaged(_) => EXIT_DAMAGED_STORE,
                StoreFatal::Restart(_) => EXIT_RESTART,
            };
        }
        if cause
            .downcast_ref::<crate::store::StoreError>()
            .is_some_and(crate::store::StoreError::is_damage)
        {
            return EXIT_DAMAGED_STORE;
        }
        if cause.downcast_ref::<Refused>().is_some() {
            return 2;
        }
    }
    1
}

/// A start refused for a reason restarting cannot cure (exit code 2, like a bad
/// configuration).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// Every file and directory the process creates is private to the service (0600/0700),
/// whatever umask it was started with: the store holds phone numbers and message texts.
/// A umask rather than a chmod after each creation, because sled creates files of its own
/// as it runs (snapshots, blobs), out of our sight.
fn private_files() {
    // SAFETY: umask(2) only changes this process's file mode creation mask.
    unsafe { libc::umask(0o077) };
}

/// Raises the soft descriptor limit to the hard one (as systemd's LimitNOFILE= sets
/// both, this is a no-op there) and refuses a limit too low to run with.
fn descriptor_limit() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Ok(u64::MAX);
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    let n: u64 = lim.rlim_cur;
    if n < MIN_NOFILE {
        return Err(Refused(format!(
            "the open-file limit (RLIMIT_NOFILE) is {n}; optout-sync needs at least {MIN_NOFILE} (set LimitNOFILE= in the unit, or ulimit -n)"
        ))
        .into());
    }
    Ok(n)
}

/// A missing `state_dir` is refused (exit code 2) unless `create` is set.
fn state_dir_ready(dir: &Path, create: bool) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if create {
        return crate::store::create_state_dir(dir)
            .with_context(|| format!("creating daemon.state_dir {}", dir.display()));
    }
    Err(Refused(format!(
        "daemon.state_dir {} does not exist; create it (systemd's StateDirectory= does), or start once with `optout-sync run --create-state-dir` for a new store",
        dir.display()
    ))
    .into())
}

/// The store commands read an existing store and never create one.
fn existing_store(config: &crate::config::Checked) -> Result<()> {
    let dir = &config.daemon.state_dir;
    if dir.is_dir() {
        return Ok(());
    }
    Err(Refused(format!(
        "there is no store at {} (daemon.state_dir)",
        dir.display()
    ))
    .into())
}

fn check_config(path: &Path, connect: bool) -> ExitCode {
    match config::load(path).and_then(|c| c.validate()) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: ok ({} connector{})",
                path.display(),
                c.connectors.len(),
                if c.connectors.len() == 1 { "" } else { "s" }
            );
            if connect {
                return check_connections(&c);
            }
            ExitCode::SUCCESS
        }
        Err(problems) => {
            eprint!("{problems}");
            eprintln!(
                "{} problem{} found",
                problems.problems.len(),
                if problems.problems.len() == 1 {
                    ""
                } else {
                    "s"
                }
            );
            ExitCode::from(2)
        }
    }
}

/// `check-config --connect`: every connector's live checks, grouped by connector, each
/// failure with its fix; exit code 2 on any problem. Findings never hold a secret.
fn check_connections(checked: &crate::config::Checked) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("optout-sync: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let results = rt.block_on(app::preflight(checked));
    let mut problems = 0;
    for r in &results {
        println!("\n[{}] ({})", r.name, r.kind);
        if r.findings.is_empty() {
            println!("  unchecked: this connector has no live checks");
        }
        for f in &r.findings {
            problems += usize::from(f.is_problem());
            for line in f.to_string().lines() {
                println!("  {line}");
            }
        }
    }
    println!();
    if problems == 0 {
        println!("every live check passed");
        ExitCode::SUCCESS
    } else {
        println!(
            "{problems} problem{} found",
            if problems == 1 { "" } else { "s" }
        );
        ExitCode::from(2)
    }
}

/// Sets up logging to standard error, or to the journal. Under systemd (`log_format` `auto`,
/// the default) the journal gets native entries: journald stamps each entry itself, so no
/// timestamp is written twice, and every field stays a field (`SUBJECT`, `CONNECTOR`, …)
/// with a `PRIORITY` from the level, so `journalctl -p warning` and
/// `journalctl CONNECTOR=hubspot` work.
fn init_tracing(format: crate::config::LogFormat) {
    use crate::config::LogFormat;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("OPTOUT_SYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let on_journal = crate::systemd::stderr_is_journal();
    let format = match format {
        LogFormat::Auto if on_journal => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        chosen => chosen,
    };
    let mut fallback = None;
    let layer: LogLayer = match format {
        LogFormat::Journald => match journald_layer() {
            Ok(journal) => Box::new(journal),
            Err(error) => {
                fallback = Some(error);
                text_layer(on_journal)
            }
        },
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_writer(std::io::stderr),
        ),
        LogFormat::Text | LogFormat::Auto => text_layer(on_journal),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .init();
    if let Some(error) = fallback {
        tracing::warn!(%error, "cannot reach the journal's socket; logging text to standard error");
    }
}

type LogLayer = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

/// Native journal entries. Fields keep their own names (no `F_` prefix): the daemon's field
/// names are plain words that never collide with journald's (`MESSAGE`, `PRIORITY`, `CODE_*`,
/// `SYSLOG_*`), and fields starting with `_` (trusted, set by journald) cannot be forged.
fn journald_layer() -> std::io::Result<tracing_journald::Layer> {
    Ok(tracing_journald::layer()?
        .with_field_prefix(None)
        .with_syslog_identifier("optout-sync".to_owned()))
}

/// Readable lines. Colours only on a terminal (escape codes would land in a log file or the
/// journal), and no timestamp when standard error is the journal, which stamps each line.
fn text_layer(on_journal: bool) -> LogLayer {
    use std::io::IsTerminal;
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if on_journal {
        Box::new(layer.without_time())
    } else {
        Box::new(layer)
    }
}

fn run(config_path: &Path, create_state_dir: bool) -> Result<ExitCode> {
    let config = app::load(config_path)?;
    init_tracing(config.daemon.log_format);
    for w in &config.warnings {
        tracing::warn!(problem = %w, "the configuration is allowed but probably a mistake");
    }
    let nofile = descriptor_limit()?;
    tracing::debug!(limit = nofile, "open-file limit");
    state_dir_ready(&config.daemon.state_dir, create_state_dir)?;
    // A panic in a worker task would leave the daemon running without that worker (its
    // pushes or polls silently stopped). Exiting instead makes the failure visible and lets
    // the service manager restart the whole daemon; nothing is lost, since every
    // acknowledged change is on disk before it is acknowledged.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // sled panics on some damaged files while opening them; the store turns that
        // into an error of its own (exit code 65), so it is neither fatal nor printed.
        if crate::store::opening_store() {
            return;
        }
        tracing::error!(panic = %info, "internal error: exiting so that the service manager restarts the daemon");
        default_hook(info);
        std::process::exit(EXIT_INTERNAL.into());
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(crate::daemon::run(config));
    // A store call stuck on a failing disk must not hold the exit: the deadline was
    // already spent waiting for work in flight.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "optout-sync stopped with an error"
            );
            Err(e)
        }
    }
}

#[cfg(feature = "demo")]
fn demo() -> Result<ExitCode> {
    use tracing_subscriber::EnvFilter;
    // Quiet by default: the demo prints its own story; OPTOUT_SYNC_LOG=info shows the logs.
    let filter =
        EnvFilter::try_from_env("OPTOUT_SYNC_LOG").unwrap_or_else(|_| EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut out = std::io::stdout();
    rt.block_on(crate::demo::demo(&mut out))?;
    Ok(ExitCode::SUCCESS)
}

/// The control socket path, from the configuration (parsed, not validated: `status`
/// needs no secrets).
fn socket_of(config_path: &Path) -> Result<PathBuf> {
    let config =
        config::load(config_path).map_err(|p| anyhow::anyhow!("bad configuration:\n{p}"))?;
    Ok(config.daemon.control_socket)
}

fn status(config_path: &Path, json: bool) -> Result<ExitCode> {
    let socket = socket_of(config_path)?;
    let report = match runtime()?.block_on(crate::control::status(&socket)) {
        Ok(r) => r,
        Err(e @ crate::control::ClientError::NotRunning(_)) => {
            eprintln!("optout-sync: {e}");
            return Ok(ExitCode::from(3));
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_status(&report);
    }
    Ok(if report.needs_attention() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_status(r: &StatusReport) {
    let ready = if r.ready { "ready" } else { "not ready" };
    println!("optout-sync {} — {ready} since {}", r.version, r.started);
    println!(
        "people: {} known; all messages: {} opted out, {} opted in; marketing: {} opted out, {} opted in",
        r.subjects_total,
        r.people("all", "opted_out"),
        r.people("all", "opted_in"),
        r.people("marketing", "opted_out"),
        r.people("marketing", "opted_in")
    );
    println!(
        "webhooks: {} waiting in the inbox, {} quarantined",
        r.webhook_inbox, r.quarantined_webhooks
    );
    if let Some(why) = &r.store_alarm {
        println!(
            "STORE ALARM: {why}; webhooks get 503 and nothing is applied until it works again"
        );
    }
    println!();
    println!(
        "{:<16} {:<11} {:<8} {:<25} {:>7} {:>6} {:>5} {:>10}",
        "CONNECTOR", "KIND", "HEALTH", "LAST POLL", "OUTBOX", "DEAD", "UNVER", "ERRORS"
    );
    for c in &r.connectors {
        print_connector(c);
    }
}

fn print_connector(c: &ConnectorReport) {
    let health = if c.alarm.is_some() {
        "ALARM"
    } else if c.healthy {
        "ok"
    } else {
        "retrying"
    };
    println!(
        "{:<16} {:<11} {:<8} {:<25} {:>7} {:>6} {:>5} {:>10}",
        c.name,
        c.kind,
        health,
        c.last_poll_ok.as_deref().unwrap_or("-"),
        c.outbox_depth,
        c.dead_letters,
        c.unverified_pushes,
        format!("{}/{}", c.poll_errors, c.push_errors),
    );
    let lines = [
        ("alarm", c.alarm.clone()),
        (
            "health check",
            c.health
                .as_ref()
                .filter(|h| !h.ok)
                .map(|h| h.detail.clone()),
        ),
        ("last error", c.last_error.clone()),
        ("reading", c.resync.clone()),
        (
            "cursor",
            c.cursor.as_deref().map(|s| crate::lookup::shorten(s, 120)),
        ),
    ];
    for (what, text) in lines {
        if let Some(text) = text {
            println!("    {what}: {text}");
        }
    }
}

fn resync(config_path: &Path, connector: Option<String>, full: bool) -> Result<ExitCode> {
    let socket = socket_of(config_path)?;
    let req = crate::control::Request::Resync { connector, full };
    match runtime()?.block_on(crate::control::request(&socket, &req, |p| println!("{p}"))) {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e @ crate::control::ClientError::NotRunning(_)) => {
            eprintln!("optout-sync: {e}");
            Ok(ExitCode::from(3))
        }
        Err(e) => Err(e.into()),
    }
}

fn lookup(config_path: &Path, id: &str, json: bool) -> Result<ExitCode> {
    let config = app::load_offline(config_path)?;
    existing_store(&config)?;
    let value = match Store::open(&config.daemon.state_dir) {
        Ok(store) => crate::lookup::lookup(&app::engine(&config, store), id)?,
        // The running daemon holds the store: ask it.
        Err(crate::store::StoreError::Open { reason, .. }) if reason.contains("in use") => {
            runtime()?.block_on(async {
                crate::control::request(
                    &config.daemon.control_socket,
                    &crate::control::Request::Lookup { id: id.to_string() },
                    |_| {},
                )
                .await
            })?
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        crate::lookup::print(&mut std::io::stdout().lock(), id, &value)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A small runtime for commands that talk to the daemon.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn audit_export(config_path: &Path, since: Option<Timestamp>, format: Format) -> Result<ExitCode> {
    let config = app::load_offline(config_path)?;
    existing_store(&config)?;
    let store = Store::open(&config.daemon.state_dir)?;
    let out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut exporter = Exporter::new(format, out)?;
    for entry in store.audit_from(0) {
        let entry = entry?;
        if since.is_some_and(|t| entry.stored_at < t) {
            continue;
        }
        if let Err(e) = exporter.write(&entry) {
            // A closed pipe (`| head`) is a normal end.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(ExitCode::SUCCESS);
            }
            return Err(e.into());
        }
    }
    exporter.finish()?;
    Ok(ExitCode::SUCCESS)
}

fn import(config_path: &Path, file: &Path) -> Result<ExitCode> {
    let config = app::load_offline(config_path)?;
    let engine = app::open_engine(&config)?;
    let input: Box<dyn std::io::Read> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?)
    };
    let report = crate::import::import(&engine, input, Timestamp::now())?;
    engine.store().save_high_water()?;
    for (line, why) in &report.bad {
        eprintln!("{}:{line}: {why}", file.display());
    }
    println!(
        "imported {} row(s); {} already imported; {} bad row(s)",
        report.applied,
        report.duplicates,
        report.bad.len()
    );
    Ok(if report.bad.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
