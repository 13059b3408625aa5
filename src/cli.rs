//! The command line: `optout-sync <command>`. Each command is a small function over the
//! library; output for people on stdout, problems on stderr, and exit codes that scripts
//! and systemd can act on (0 ok, 1 failure, 2 bad configuration or usage).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use optout_core::{Scope, Timestamp};

use crate::audit::{Exporter, Format};
use crate::config::{self, Config, Kind};
use crate::policy::Decision;
use crate::reconcile::{Engine, Takes, subject_name};
use crate::store::Store;

const DEFAULT_CONFIG: &str = "/etc/optout-sync/optout-sync.toml";

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
    /// Check a configuration file: syntax, types, schedules, and that every secret can be
    /// read. Prints every problem with file, line and column; exit code 2 if any.
    /// Use as the unit's ExecStartPre=.
    CheckConfig {
        /// The configuration file.
        #[arg(default_value = DEFAULT_CONFIG)]
        path: PathBuf,
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
    let result = match cli.command {
        Command::CheckConfig { path } => return check_config(&path),
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
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &Path) -> ExitCode {
    match config::load(path).and_then(|c| c.validate().map(|()| c)) {
        Ok(c) => {
            println!(
                "{}: ok ({} connector{})",
                path.display(),
                c.connectors.len(),
                if c.connectors.len() == 1 { "" } else { "s" }
            );
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

/// Loads and validates the configuration, turning problems into one error.
pub fn load_config(path: &Path) -> Result<Config> {
    let c = config::load(path).map_err(|p| anyhow::anyhow!("bad configuration:\n{p}"))?;
    c.validate()
        .map_err(|p| anyhow::anyhow!("bad configuration:\n{p}"))?;
    Ok(c)
}

/// What each configured connector takes as pushes.
pub fn targets(config: &Config) -> BTreeMap<String, Takes> {
    config
        .connectors
        .iter()
        .map(|c| {
            let takes = match c.common.kind {
                Kind::Hubspot | Kind::Salesforce => Takes::Records,
                Kind::Whatsapp => Takes::Replies,
                Kind::Webhook => Takes::Events,
            };
            (c.name.clone(), takes)
        })
        .collect()
}

/// Opens the store and builds the engine the configuration describes.
pub fn open_engine(config: &Config) -> Result<Engine> {
    let store = Store::open(&config.daemon.state_dir).with_context(|| "opening the store")?;
    Ok(Engine::new(
        store,
        config.policy.to_policy(),
        config.normalizer(),
        targets(config),
    ))
}

fn lookup(config_path: &Path, id: &str, json: bool) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let engine = open_engine(&config)?;
    let store = engine.store();
    let aliases = engine
        .normalizer()
        .parse_query(id)
        .map_err(|e| anyhow::anyhow!("`{id}`: {e}"))?;
    let mut subject = None;
    for a in &aliases {
        if let Some(s) = store.subject_by_alias(a.as_str())? {
            subject = Some(s);
            break;
        }
    }
    let Some(s) = subject else {
        if json {
            println!("{}", serde_json::json!({ "query": id, "known": false }));
        } else {
            println!("{id}: not known (no observation names this person; messages are allowed)");
        }
        return Ok(ExitCode::SUCCESS);
    };
    let margin = engine.policy().margin;
    let mut records = Vec::new();
    for (c, r) in &s.links {
        let link = store.link(c, r)?;
        let pending = store.outbox_entry(c, r)?;
        let dead = store.dead_letter(c, r)?;
        records.push(serde_json::json!({
            "connector": c,
            "record": r,
            "last_seen": link.as_ref().and_then(|l| l.memory.last_seen),
            "last_pushed": link.as_ref().and_then(|l| l.memory.last_pushed.map(|(st, _)| st)),
            "pushed_at": link.as_ref().and_then(|l| l.pushed_at),
            "awaiting_readback": link.as_ref().is_some_and(|l| l.awaiting_readback),
            "pending": pending.as_ref().map(|p| serde_json::json!({"status": p.item.status, "attempts": p.attempts, "last_error": p.last_error})),
            "dead_letter": dead.as_ref().map(|d| serde_json::json!({"status": d.item.status, "reason": d.reason, "at": d.at})),
        }));
    }
    let history = store.subject_audit(&s)?;
    if json {
        let decisions: serde_json::Map<_, _> = Scope::EVERY
            .iter()
            .map(|&sc| {
                let reg = s.consent.registers(sc);
                (
                    sc.as_str().to_string(),
                    serde_json::json!({
                        "decision": reg.decide(margin),
                        "evidence": reg.deciding(margin),
                        "opt_out": reg.opt_out, "opt_in": reg.opt_in,
                    }),
                )
            })
            .collect();
        let out = serde_json::json!({
            "query": id, "known": true, "subject": subject_name(s.id), "aliases": s.aliases,
            "decisions": decisions, "last_inbound": s.last_inbound, "records": records, "history": history,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut o = std::io::stdout().lock();
    writeln!(
        o,
        "{id}: subject {} ({})",
        subject_name(s.id),
        s.aliases.join(", ")
    )?;
    for sc in Scope::EVERY {
        let reg = s.consent.registers(sc);
        let d = reg.decide(margin);
        match reg.deciding(margin) {
            Some(f) => writeln!(
                o,
                "  {:<10} {:<9} since {} — {} {} ({})",
                sc.as_str(),
                d.as_str(),
                f.at,
                f.origin(),
                f.record,
                f.evidence
            )?,
            None => writeln!(o, "  {:<10} {}", sc.as_str(), Decision::Unknown.as_str())?,
        }
    }
    if let Some(t) = s.last_inbound {
        writeln!(
            o,
            "  last WhatsApp message {t}; reply window until {}",
            t.plus(crate::reconcile::REPLY_WINDOW)
        )?;
    }
    writeln!(o, "linked records:")?;
    if records.is_empty() {
        writeln!(o, "  (none)")?;
    }
    for r in &records {
        let state = if let Some(d) = r["dead_letter"].as_object() {
            format!(
                "REJECTED: {} ({})",
                d["reason"].as_str().unwrap_or(""),
                d["status"].as_str().unwrap_or("")
            )
        } else if let Some(p) = r["pending"].as_object() {
            format!(
                "push pending: {} (attempts {}{})",
                p["status"].as_str().unwrap_or(""),
                p["attempts"],
                p["last_error"]
                    .as_str()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            )
        } else if r["awaiting_readback"].as_bool() == Some(true) {
            format!(
                "pushed {}, not yet read back",
                r["last_pushed"].as_str().unwrap_or("")
            )
        } else {
            format!("holds {}", r["last_seen"].as_str().unwrap_or("no value"))
        };
        writeln!(
            o,
            "  {:<12} {:<28} {state}",
            r["connector"].as_str().unwrap_or(""),
            r["record"].as_str().unwrap_or("")
        )?;
    }
    writeln!(o, "history:")?;
    for a in &history {
        writeln!(
            o,
            "  {} {:<17} {:<12} {}{}{}{}",
            a.stored_at,
            a.kind.as_str(),
            a.source,
            a.status.map(|s| format!("{s} ")).unwrap_or_default(),
            a.scope.map(|s| format!("[{s}] ")).unwrap_or_default(),
            a.evidence.clone().unwrap_or_default(),
            a.reason
                .as_ref()
                .map(|r| format!(" — {r}"))
                .unwrap_or_default(),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn audit_export(config_path: &Path, since: Option<Timestamp>, format: Format) -> Result<ExitCode> {
    let config = load_config(config_path)?;
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
    let config = load_config(config_path)?;
    let engine = open_engine(&config)?;
    let input: Box<dyn std::io::Read> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?)
    };
    let report = crate::import::import(&engine, input, Timestamp::now())?;
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
