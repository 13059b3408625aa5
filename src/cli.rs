//! The command line: `optout-sync <command>`. Each command is a small function over the
//! library; output for people on stdout, problems on stderr, and exit codes that scripts
//! and systemd can act on: 0 ok, 1 failure (the unit restarts the daemon), 2 bad
//! configuration or usage, 3 not running (`status`), 65 a damaged store or one of another
//! schema (not restarted: an operator restores it), 70 an internal error (a panic), 75 a
//! store that failed at run time and cannot be reopened in the process (restarted).

use std::io::Write;
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
        /// With --full: report what would change (per connector: suppressed, re-enabled,
        /// left alone, and each record's change with its evidence), changing nothing.
        #[arg(long, requires = "full")]
        dry_run: bool,
        /// With --dry-run: the report as JSON (progress goes to standard error).
        #[arg(long, requires = "dry_run")]
        json: bool,
        #[arg(long, short, env = "OPTOUT_SYNC_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Opt-ins held by the mass re-opt-in guard (policy.opt_in_guard): list them, or
    /// release them (applied as of their event times; a newer opt-out still wins) or
    /// discard them. Through the running daemon, or over the store while it is stopped.
    Holds {
        #[command(subcommand)]
        action: Option<HoldsAction>,
        /// Only holds from this source (a connector instance, `import`, an API source).
        #[arg(long, global = true)]
        source: Option<String>,
        /// Machine-readable output.
        #[arg(long, global = true)]
        json: bool,
        #[arg(long, short, global = true, env = "OPTOUT_SYNC_CONFIG", default_value = DEFAULT_CONFIG)]
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
    /// CRM phone values that could not be read as numbers: connector, record id, field
    /// and the value as read. Such a record is matched by no one until it is fixed.
    /// Reads the store, or asks the running daemon.
    Numbers {
        /// List the unreadable numbers (the only listing so far).
        #[arg(long, required = true)]
        unreadable: bool,
        /// Only this connector instance.
        #[arg(long)]
        connector: Option<String>,
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
    /// Erase one person's personal data (numbers, ids, message texts, record ids) from the
    /// store and the audit log, keeping a keyed-hash tombstone of each identity so that a
    /// person who had opted out stays opted out of all messages wherever the number shows
    /// up again. Through the running daemon, or on the store while it is stopped (which is
    /// then compacted at once). Irreversible.
    Erase {
        /// A phone number in any format, `wa:<digits>`, or a business-scoped user id.
        id: String,
        #[arg(long, short, env = "OPTOUT_SYNC_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The store: compaction, and migration between sled and PostgreSQL.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Seed the store from an existing suppression list (CSV with columns phone, status,
    /// time and optionally source). Bad rows are reported by line; good rows are applied
    /// and pushed to every system by the daemon (through the running daemon when it runs).
    Import {
        /// The CSV file (`-` for standard input).
        file: PathBuf,
        #[arg(long, short, env = "OPTOUT_SYNC_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Write man pages or shell completions, from this command line's definition, into a
    /// directory (for packaging).
    #[cfg(feature = "generate")]
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: generate::What,
        /// The directory to write into (created if missing).
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum HoldsAction {
    /// Apply the held opt-ins named, as of their original event times.
    Release(HoldTargets),
    /// Drop the held opt-ins named: the people stay suppressed.
    Discard(HoldTargets),
}

#[derive(Debug, clap::Args)]
struct HoldTargets {
    /// Every held opt-in (of --source, if given).
    #[arg(long, conflicts_with = "ids")]
    all: bool,
    /// Hold ids as `holds` lists them (`h123`).
    ids: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Rewrite the store into fresh files (the daemon stopped), leaving no old copies of
    /// erased or expired data in them. The daemon does this itself at start after an
    /// erasure.
    Compact {
        #[arg(long, short, env = "OPTOUT_SYNC_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Copy the store between sled (in daemon.state_dir) and the PostgreSQL database of
    /// the [store] table, every instance of the daemon stopped, then verify the copy:
    /// entries and a SHA-256 per tree on both sides (exit 1 on any mismatch). The target
    /// must be empty: `--to postgres` needs a database without store data, `--to sled` a
    /// state directory without a sled store. The source is left as it was.
    Migrate {
        /// `postgres`: sled → PostgreSQL; `sled`: PostgreSQL → a new sled store.
        #[arg(long, value_enum)]
        to: MigrateTo,
        #[arg(long, short, env = "OPTOUT_SYNC_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum MigrateTo {
    Postgres,
    Sled,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Write the audit log to standard output, oldest first, streaming. Reads the store,
    /// or asks the running daemon.
    Export {
        /// Only entries stored at or after this time (RFC 3339, or a date).
        #[arg(long, value_parser = parse_time)]
        since: Option<Timestamp>,
        /// Only entries stored before this time (RFC 3339, or a date).
        #[arg(long, value_parser = parse_time)]
        until: Option<Timestamp>,
        /// Only one person's entries: a subject (s42), a phone number, wa:<digits> or a
        /// business-scoped id.
        #[arg(long)]
        subject: Option<String>,
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
    // Every file this program creates (the store's files when a command opens it, the
    // control socket) is private to its user, whatever the caller's umask: a root shell's
    // 022 would otherwise leave the store's files world-readable.
    #[cfg(feature = "generate")]
    let private = !matches!(cli.command, Command::Generate { .. });
    #[cfg(not(feature = "generate"))]
    let private = true;
    if private {
        private_files();
    }
    let result = dispatch(cli.command);
    match result {
        Ok(code) => code,
        // The reader went away (`lookup … | head`): what it wanted was written.
        Err(e) if e.is::<OutputClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("optout-sync: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Runs one command.
fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run {
            config,
            create_state_dir,
        } => run(&config, create_state_dir),
        #[cfg(feature = "demo")]
        Command::Demo => demo(),
        Command::Status { config, json } => status(&config, json),
        Command::Resync {
            connector,
            full: _,
            dry_run: true,
            json,
            config,
        } => dry_run(&config, connector, json),
        Command::Resync {
            connector,
            full,
            config,
            ..
        } => resync(&config, connector, full),
        Command::Holds {
            action,
            source,
            json,
            config,
        } => holds(&config, action, source, json),
        Command::CheckConfig { path, connect } => Ok(check_config(&path, connect)),
        Command::Lookup { id, config, json } => lookup(&config, &id, json),
        Command::Numbers {
            unreadable: _,
            connector,
            config,
            json,
        } => numbers(&config, connector, json),
        Command::Audit {
            command:
                AuditCommand::Export {
                    since,
                    until,
                    subject,
                    format,
                    config,
                },
        } => {
            let filter = crate::audit::Filter {
                since,
                until,
                subject,
            };
            audit_export(&config, filter, format)
        }
        Command::Import { file, config } => import(&config, &file),
        Command::Erase { id, config, json } => erase::erase(&config, &id, json),
        Command::Store {
            command: StoreCommand::Compact { config },
        } => erase::compact(&config),
        Command::Store {
            command: StoreCommand::Migrate { to, config, json },
        } => {
            let to = match to {
                MigrateTo::Postgres => crate::store::migrate::Direction::Postgres,
                MigrateTo::Sled => crate::store::migrate::Direction::Sled,
            };
            migrate::migrate(&config, to, json)
        }
        #[cfg(feature = "generate")]
        Command::Generate { what, dir } => generate::write(what, &dir),
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
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Raises the soft descriptor limit to the hard one (as systemd's LimitNOFILE= sets
/// both, this is a no-op there) and refuses a limit too low to run with.
fn descriptor_limit() -> Result<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if let (Some(current), Some(maximum)) = (lim.current, lim.maximum)
        && current < maximum
    {
        let raised = Rlimit {
            current: Some(maximum),
            maximum: Some(maximum),
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            lim = raised;
        }
    }
    // `None` is unlimited.
    let n: u64 = lim.current.unwrap_or(u64::MAX);
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
            println!("store: {}", describe_store(&c.store));
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

/// The store's engine for `check-config`, with the settings an operator may want to see;
/// never the URL (it holds the password).
fn describe_store(store: &crate::store::Backend) -> String {
    match store {
        crate::store::Backend::Sled => "sled (in daemon.state_dir)".into(),
        crate::store::Backend::Postgres(pg) => {
            let tls = match &pg.tls_ca_file {
                Some(f) => format!(", TLS roots from {}", f.display()),
                None => String::new(),
            };
            format!(
                "postgres, instance {} (pool of {}, lease {}{tls})",
                pg.instance,
                pg.pool_size,
                humantime::format_duration(pg.lease)
            )
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
    let mut out = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string_pretty(&report)?;
        output(writeln!(out, "{text}"))?;
    } else {
        output(print_status(&mut out, &report))?;
    }
    output(out.flush())?;
    Ok(if report.needs_attention() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Standard output was closed by its reader (`optout-sync lookup … | head`): a normal end
/// of the command, not a failure to report.
#[derive(Debug, thiserror::Error)]
#[error("standard output closed")]
struct OutputClosed;

/// A write to standard output, with a closed pipe turned into [`OutputClosed`].
fn output(written: std::io::Result<()>) -> Result<()> {
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(OutputClosed.into()),
        other => Ok(other?),
    }
}

fn print_status(o: &mut impl Write, r: &StatusReport) -> std::io::Result<()> {
    let ready = if r.ready { "ready" } else { "not ready" };
    writeln!(o, "optout-sync {} — {ready} since {}", r.version, r.started)?;
    writeln!(
        o,
        "people: {} known; all messages: {} opted out, {} opted in; marketing: {} opted out, {} opted in",
        r.subjects_total,
        r.people("all", "opted_out"),
        r.people("all", "opted_in"),
        r.people("marketing", "opted_out"),
        r.people("marketing", "opted_in")
    )?;
    writeln!(
        o,
        "webhooks: {} waiting in the inbox, {} quarantined; templates: {} known",
        r.webhook_inbox, r.quarantined_webhooks, r.templates_known
    )?;
    if let Some(cluster) = &r.cluster {
        print_cluster(o, r, cluster)?;
    }
    if r.possible_opt_outs > 0 {
        writeln!(
            o,
            "possible opt-outs: {} (not applied; `optout-sync audit export` or `lookup` shows each for review)",
            r.possible_opt_outs
        )?;
    }
    if let Some(why) = &r.store_alarm {
        writeln!(
            o,
            "STORE ALARM: {why}; webhooks get 503 and nothing is applied until it works again"
        )?;
    }
    for (source, n) in r.held_opt_ins.iter().filter(|(_, n)| **n > 0) {
        writeln!(
            o,
            "HELD OPT-INS: {source}: {n} held by the mass re-opt-in guard; review with `optout-sync holds`"
        )?;
    }
    writeln!(o)?;
    let rows: Vec<Row> = r.connectors.iter().map(connector_row).collect();
    let widths = column_widths(&rows);
    write_row(o, &COLUMNS.map(|(name, _)| name.to_string()), &widths)?;
    for (c, row) in r.connectors.iter().zip(&rows) {
        write_row(o, row, &widths)?;
        print_connector_details(o, c)?;
    }
    Ok(())
}

/// The instances sharing the PostgreSQL store, and which one leads.
fn print_cluster(
    o: &mut impl Write,
    r: &StatusReport,
    c: &crate::store::lease::RollCall,
) -> std::io::Result<()> {
    match c.lease.as_ref().filter(|l| l.expires_in_seconds > 0.0) {
        Some(l) => writeln!(
            o,
            "leader: {} (lease epoch {}, expires {}, in {:.1}s)",
            l.holder, l.epoch, l.expires_at, l.expires_in_seconds
        )?,
        None => writeln!(
            o,
            "leader: none (the lease is free; an instance takes it within a third of a lease)"
        )?,
    }
    for i in &c.instances {
        let role = match (i.gone, i.leader) {
            (true, _) => "GONE",
            (false, true) => "leader",
            (false, false) => "follower",
        };
        let me = if i.name == r.instance {
            " (this one)"
        } else {
            ""
        };
        writeln!(
            o,
            "  instance {}{me}: {role}; host {}, pid {}, version {}, last seen {} ({:.0}s ago)",
            i.name, i.host, i.pid, i.version, i.last_seen, i.seen_seconds_ago
        )?;
    }
    Ok(())
}

/// The connector table's columns, and whether each is right-aligned (numbers).
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

type Row = [String; COLUMNS.len()];

fn connector_row(c: &ConnectorReport) -> Row {
    let health = if c.alarm.is_some() {
        "ALARM"
    } else if c.healthy {
        "ok"
    } else {
        "retrying"
    };
    [
        c.name.clone(),
        c.kind.clone(),
        health.to_string(),
        c.last_poll_ok.clone().unwrap_or_else(|| "-".into()),
        c.outbox_depth.to_string(),
        c.dead_letters.to_string(),
        c.unverified_pushes.to_string(),
        format!("{}/{}", c.poll_errors, c.push_errors),
    ]
}

/// Each column as wide as its widest cell or its header, so that a long connector name
/// or a large count never pushes the columns after it out of line.
fn column_widths(rows: &[Row]) -> [usize; COLUMNS.len()] {
    std::array::from_fn(|i| {
        (rows.iter().map(|r| r[i].chars().count()))
            .chain([COLUMNS[i].0.len()])
            .max()
            .unwrap_or(0)
    })
}

fn write_row(
    o: &mut impl Write,
    cells: &Row,
    widths: &[usize; COLUMNS.len()],
) -> std::io::Result<()> {
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        let pad = " ".repeat(widths[i].saturating_sub(cell.chars().count()));
        if i > 0 {
            line.push(' ');
        }
        if COLUMNS[i].1 {
            line += &pad;
            line += cell;
        } else {
            line += cell;
            line += &pad;
        }
    }
    writeln!(o, "{}", line.trim_end())
}

/// What needs explaining under a connector's row: its alarm, failed health check, last
/// error, resync progress and cursor.
fn print_connector_details(o: &mut impl Write, c: &ConnectorReport) -> std::io::Result<()> {
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
            "unreadable numbers",
            (c.unreadable_numbers > 0).then(|| {
                format!(
                    "{} (optout-sync numbers --unreadable --connector {})",
                    c.unreadable_numbers, c.name
                )
            }),
        ),
        (
            "cursor",
            c.cursor.as_deref().map(|s| crate::lookup::shorten(s, 120)),
        ),
    ];
    for (what, text) in lines {
        if let Some(text) = text {
            writeln!(o, "    {what}: {text}")?;
        }
    }
    Ok(())
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

/// `resync --full --dry-run`: through the running daemon only (it reads with its workers).
fn dry_run(config_path: &Path, connector: Option<String>, json: bool) -> Result<ExitCode> {
    let socket = socket_of(config_path)?;
    let req = crate::control::Request::DryRun { connector };
    let shown = |p: &str| match json {
        true => eprintln!("{p}"),
        false => println!("{p}"),
    };
    let value = match runtime()?.block_on(crate::control::request(&socket, &req, shown)) {
        Ok(v) => v,
        Err(e @ crate::control::ClientError::NotRunning(_)) => {
            eprintln!("optout-sync: {e}");
            return Ok(ExitCode::from(3));
        }
        Err(e) => return Err(e.into()),
    };
    let report: crate::report::DryRunReport = serde_json::from_value(value)?;
    let mut out = std::io::stdout().lock();
    if json {
        output(writeln!(out, "{}", serde_json::to_string_pretty(&report)?))?;
    } else {
        output(print_dry_run(&mut out, &report))?;
    }
    output(out.flush())?;
    Ok(ExitCode::SUCCESS)
}

fn print_dry_run(o: &mut impl Write, r: &crate::report::DryRunReport) -> std::io::Result<()> {
    writeln!(o, "\ndry run: nothing was pushed, changed or moved")?;
    for c in &r.connectors {
        writeln!(
            o,
            "\n{}: {} read; would suppress {}, re-enable {}, leave alone {}; {} opt-in(s) would be held",
            c.name, c.records, c.suppressed, c.re_enabled, c.left_alone, c.held
        )?;
        for ch in &c.changes {
            writeln!(
                o,
                "  {}/{} {}: {} → {} ({} at {})",
                ch.connector,
                ch.record,
                ch.subject,
                ch.from.as_deref().unwrap_or("-"),
                ch.to,
                crate::lookup::shorten(&ch.evidence, 100),
                ch.event_at
            )?;
        }
    }
    Ok(())
}

/// `holds [release|discard]`: over the store, or through the running daemon when it
/// holds the store or the store is not this user's (as `numbers`).
fn holds(
    config_path: &Path,
    action: Option<HoldsAction>,
    source: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    use crate::control::Resolve;
    let (resolve, targets) = match action {
        None => (None, None),
        Some(HoldsAction::Release(t)) => (Some(Resolve::Release), Some(t)),
        Some(HoldsAction::Discard(t)) => (Some(Resolve::Discard), Some(t)),
    };
    if let Some(t) = &targets
        && !t.all
        && t.ids.is_empty()
        && source.is_none()
    {
        return Err(Refused(
            "name the holds to resolve: --all, --source NAME, or their ids".into(),
        )
        .into());
    }
    let selection = crate::holds::HoldSelection {
        source,
        ids: targets.map(|t| t.ids).unwrap_or_default(),
    };
    let config = app::load_offline(config_path)?;
    existing_store(&config)?;
    let socket = &config.daemon.control_socket;
    let ask = || -> Result<serde_json::Value> {
        let request = crate::control::Request::Holds {
            selection: selection.clone(),
            resolve,
        };
        Ok(runtime()?.block_on(crate::control::request(socket, &request, |_| {}))?)
    };
    let offline = || -> Result<serde_json::Value> {
        let engine = app::open_engine(&config)?;
        let (reply, _) = crate::holds::holds(&engine, &selection, resolve, |_| {})?;
        engine.store().save_high_water()?;
        Ok(serde_json::to_value(reply)?)
    };
    let value = match store_owner(&config.daemon.state_dir, "holds") {
        Ok(()) => match offline() {
            Ok(v) => v,
            Err(e) if in_use(&e) => ask()?,
            Err(e) => return Err(e),
        },
        Err(not_owner) => match ask() {
            Ok(value) => value,
            Err(e) if is_not_running(&e) => return Err(not_owner.into()),
            Err(e) => return Err(e),
        },
    };
    let reply: crate::holds::HoldsReply = serde_json::from_value(value)?;
    let mut out = std::io::stdout().lock();
    if json {
        output(writeln!(out, "{}", serde_json::to_string_pretty(&reply)?))?;
    } else {
        output(crate::holds::print(&mut out, &reply))?;
    }
    output(out.flush())?;
    Ok(ExitCode::SUCCESS)
}

/// The store is open in the running daemon.
fn in_use(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<crate::store::StoreError>(),
            Some(crate::store::StoreError::Open { reason, .. }) if reason.contains("in use")
        )
    })
}

fn lookup(config_path: &Path, id: &str, json: bool) -> Result<ExitCode> {
    let config = app::load_offline(config_path)?;
    existing_store(&config)?;
    let value = match store_owner(&config.daemon.state_dir, "lookup") {
        Ok(()) => match app::open_store(&config) {
            Ok(store) => crate::lookup::lookup(&app::engine(&config, store), id)?,
            // The running daemon holds the store: ask it.
            Err(crate::store::StoreError::Open { reason, .. }) if reason.contains("in use") => {
                ask_daemon(&config.daemon.control_socket, id)?
            }
            Err(e) => return Err(e.into()),
        },
        // Not ours to open; the running daemon can answer without touching its files.
        Err(not_owner) => match ask_daemon(&config.daemon.control_socket, id) {
            Ok(value) => value,
            Err(e) if is_not_running(&e) => return Err(not_owner.into()),
            Err(e) => return Err(e),
        },
    };
    let mut out = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string_pretty(&value)?;
        output(writeln!(out, "{text}"))?;
    } else {
        output(crate::lookup::print(&mut out, id, &value))?;
    }
    output(out.flush())?;
    Ok(ExitCode::SUCCESS)
}

/// `numbers --unreadable`: from the store, or from the running daemon when it holds the
/// store or the store is not this user's (as `lookup`).
fn numbers(config_path: &Path, connector: Option<String>, json: bool) -> Result<ExitCode> {
    let config = app::load_offline(config_path)?;
    existing_store(&config)?;
    let socket = &config.daemon.control_socket;
    let ask = |connector: Option<String>| -> Result<serde_json::Value> {
        let request = crate::control::Request::Numbers { connector };
        Ok(runtime()?.block_on(crate::control::request(socket, &request, |_| {}))?)
    };
    let value = match store_owner(&config.daemon.state_dir, "numbers") {
        Ok(()) => match app::open_store(&config) {
            Ok(store) => crate::lookup::unreadable(&store, connector.as_deref())?,
            Err(crate::store::StoreError::Open { reason, .. }) if reason.contains("in use") => {
                ask(connector)?
            }
            Err(e) => return Err(e.into()),
        },
        Err(not_owner) => match ask(connector) {
            Ok(value) => value,
            Err(e) if is_not_running(&e) => return Err(not_owner.into()),
            Err(e) => return Err(e),
        },
    };
    let mut out = std::io::stdout().lock();
    if json {
        output(writeln!(out, "{}", serde_json::to_string_pretty(&value)?))?;
    } else {
        output(crate::lookup::print_unreadable(&mut out, &value))?;
    }
    output(out.flush())?;
    Ok(ExitCode::SUCCESS)
}

/// `lookup` through the running daemon's control socket.
fn ask_daemon(socket: &Path, id: &str) -> Result<serde_json::Value> {
    let request = crate::control::Request::Lookup { id: id.to_string() };
    Ok(runtime()?.block_on(crate::control::request(socket, &request, |_| {}))?)
}

fn is_not_running(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<crate::control::ClientError>(),
        Some(crate::control::ClientError::NotRunning(_))
    )
}

/// The store directory belongs to another user than the one running this command.
#[derive(Debug, thiserror::Error)]
#[error(
    "the store {dir} {whose}, and this command runs as uid {me}; it opens a store only as \
     its owner, so that every file in it stays readable by the daemon. Run it as the \
     store's owner:\n{how}"
)]
struct NotOwner {
    dir: String,
    whose: String,
    me: u32,
    how: String,
}

/// Refuses to open a store that belongs to another user. Opening it (sled creates and
/// rewrites files as it opens) as root, say, would leave root-owned files that the daemon's
/// own user cannot read: under `DynamicUser=yes`, systemd re-owns the state directory at
/// start only when the directory itself has the wrong owner, never the files inside it, so
/// the daemon would then fail to start. A store that does not exist yet is no one's: what
/// this command creates is private to its user (umask 077), and systemd hands a new
/// `StateDirectory=` over to the service as a whole.
fn store_owner(dir: &Path, command: &str) -> Result<(), NotOwner> {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    let (owner, whose) = match std::fs::metadata(dir) {
        Ok(m) if m.uid() == me => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Ok(m) => match user_name(m.uid()) {
            Some(name) => (
                Some(name.clone()),
                format!("belongs to user {name} (uid {})", m.uid()),
            ),
            None => (None, format!("belongs to uid {}", m.uid())),
        },
        // E.g. a dynamic user's own uid outside its service: /var/lib/private is 0700 root.
        Err(e) => (None, format!("cannot be examined ({e})")),
    };
    let mut how = format!(
        "  the packaged service (DynamicUser=yes; systemd runs this as the uid that owns the \
         store):\n    systemd-run --pipe --wait --quiet --collect -p DynamicUser=yes \
         -p User=optout-sync -p StateDirectory=optout-sync -p StateDirectoryMode=0700 \
         optout-sync {command} …"
    );
    if let Some(name) = owner {
        how += &format!(
            "\n  a store owned by a regular account:\n    runuser -u {name} -- optout-sync {command} …"
        );
    }
    Err(NotOwner {
        dir: dir.display().to_string(),
        whose,
        me,
        how,
    })
}

/// The account name of `uid` in /etc/passwd. A dynamic user (systemd's `DynamicUser=`)
/// has none while its service is stopped.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_string())
    })
}

/// A small runtime for commands that talk to the daemon.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Through the running daemon when it answers on its control socket (it holds the store),
/// else with the store: `live` runs through the daemon, `offline` with the store, opened
/// only by its owner (see [`store_owner`]).
fn store_or_daemon(
    config: &crate::config::Checked,
    command: &str,
    offline: impl FnOnce(Store) -> Result<ExitCode>,
    live: impl FnOnce(&Path) -> Result<ExitCode>,
) -> Result<ExitCode> {
    match live(&config.daemon.control_socket) {
        Err(e) if is_not_running(&e) => {}
        answered => return answered,
    }
    store_owner(&config.daemon.state_dir, command)?;
    offline(app::open_store(config)?)
}

fn audit_export(
    config_path: &Path,
    filter: crate::audit::Filter,
    format: Format,
) -> Result<ExitCode> {
    let config = app::load_offline(config_path)?;
    existing_store(&config)?;
    let out = || Exporter::new(format, std::io::BufWriter::new(std::io::stdout().lock()));
    let offline = |store: Store| -> Result<ExitCode> {
        let engine = app::engine(&config, store);
        let entries = crate::audit::select(&engine, &filter).map_err(|e| anyhow::anyhow!(e))?;
        let mut exporter = out()?;
        for entry in entries {
            if let Err(e) = exporter.write(&entry?) {
                return finish_output(Err(e));
            }
        }
        finish_output(exporter.finish())
    };
    let live = |socket: &Path| -> Result<ExitCode> {
        let request = crate::control::Request::AuditExport {
            since: filter.since,
            until: filter.until,
            subject: filter.subject.clone(),
        };
        // Made at the first entry: nothing (not even a CSV header) is written when the
        // daemon cannot be asked.
        let mut exporter: Option<Exporter<std::io::BufWriter<std::io::StdoutLock<'static>>>> = None;
        let mut closed = false;
        let on_line = |mut v: serde_json::Value| -> std::io::Result<()> {
            let entry: crate::audit::AuditEntry = serde_json::from_value(v["entry"].take())
                .map_err(|e| std::io::Error::other(format!("bad entry from the daemon: {e}")))?;
            let written = match &mut exporter {
                Some(x) => x.write(&entry),
                None => out().and_then(|x| exporter.insert(x).write(&entry)),
            };
            closed = matches!(&written, Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe);
            written
        };
        let streamed = crate::control::stream(socket, &request, None, |_| {}, on_line);
        match runtime()?.block_on(streamed) {
            Ok(_) => finish_output(exporter.map_or_else(out, Ok)?.finish()),
            Err(_) if closed => Ok(ExitCode::SUCCESS),
            Err(e) => Err(e.into()),
        }
    };
    store_or_daemon(&config, "audit export", offline, live)
}

/// The end of a streamed output: a closed pipe (`| head`) is a normal end.
fn finish_output(written: std::io::Result<()>) -> Result<ExitCode> {
    output(written).map(|()| ExitCode::SUCCESS)
}

fn import(config_path: &Path, file: &Path) -> Result<ExitCode> {
    let config = app::load_offline(config_path)?;
    let input = || -> Result<Box<dyn std::io::Read + Send>> {
        Ok(if file == Path::new("-") {
            Box::new(std::io::stdin())
        } else {
            let f =
                std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
            Box::new(f)
        })
    };
    let offline = |store: Store| -> Result<ExitCode> {
        let engine = app::engine(&config, store);
        let report = crate::import::import(&engine, input()?, Timestamp::now())?;
        engine.store().save_high_water()?;
        for (line, why) in &report.bad {
            eprintln!("{}:{line}: {why}", file.display());
        }
        import_summary(report.applied, report.duplicates, report.bad.len())
    };
    let live = |socket: &Path| -> Result<ExitCode> {
        let on_bad = |v: serde_json::Value| {
            let line = v["bad_row"]["line"].as_u64().unwrap_or(0);
            let why = v["bad_row"]["why"].as_str().unwrap_or("");
            eprintln!("{}:{line}: {why}", file.display());
            Ok(())
        };
        let request = crate::control::Request::Import;
        let streamed = crate::control::stream(socket, &request, Some(input()?), |_| {}, on_bad);
        let r = runtime()?.block_on(streamed)?;
        let n = |k: &str| r[k].as_u64().unwrap_or(0) as usize;
        import_summary(n("applied"), n("duplicates"), n("bad_rows"))
    };
    if !config.daemon.state_dir.is_dir() {
        // No store yet: created here (as before the daemon ever ran), never through it.
        store_owner(&config.daemon.state_dir, "import")?;
        return offline(app::open_store(&config)?);
    }
    store_or_daemon(&config, "import", offline, live)
}

fn import_summary(applied: usize, duplicates: usize, bad: usize) -> Result<ExitCode> {
    println!("imported {applied} row(s); {duplicates} already imported; {bad} bad row(s)");
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

mod erase;
mod migrate;

/// `generate`: man pages and shell completions from the command line's own definition, so
/// they can never disagree with it. Built only with the `generate` feature: the packaging
/// script runs it from a separate build, and the packaged binary carries none of it.
#[cfg(feature = "generate")]
mod generate {
    use std::path::Path;
    use std::process::ExitCode;

    use anyhow::{Context, Result};
    use clap::CommandFactory;
    use clap_complete::Shell;

    #[derive(Clone, Copy, Debug, clap::ValueEnum)]
    pub enum What {
        /// `optout-sync.1` and one page per command (`optout-sync-status.1`, …).
        Man,
        /// bash (`optout-sync.bash`), zsh (`_optout-sync`) and fish (`optout-sync.fish`).
        Completions,
    }

    pub fn write(what: What, dir: &Path) -> Result<ExitCode> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cmd = super::Cli::command();
        match what {
            What::Man => clap_mangen::generate_to(cmd, dir)?,
            What::Completions => {
                for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                    clap_complete::generate_to(shell, &mut cmd.clone(), "optout-sync", dir)?;
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
