//! Configuration: the TOML file, its validation, and where each problem is.
//!
//! Parsing ([`load`]) only reads the file into typed sections; [`Config::validate`]
//! checks meaning (regions, cron expressions, connector references, secrets) and collects
//! every problem with file, line and column. `optout-sync check-config` runs both and is
//! the unit's `ExecStartPre=`, so a bad file never stops a running daemon.
//!
//! Connector tables are read in two steps: the daemon's own keys (`kind`, schedules,
//! push settings) are taken out, and the rest is the connector's own `Config`, which its
//! crate defines and validates. Every struct refuses unknown keys.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use optout_core::{Polling, Secret, SecretRef, Secrets, Settings, Takes};
use serde::Deserialize;

use crate::policy::{PolicyConfig, ScopeMap};
use crate::registry::{Entry, ParseError};
use crate::workers::Linger;

/// One problem in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path (`connectors.hubspot.poll_cron`), empty for the whole file.
    pub key: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Every problem found, with the file they are in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problems {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.problems {
            let key = if p.key.is_empty() {
                String::new()
            } else {
                format!("{}: ", p.key)
            };
            writeln!(
                f,
                "{}:{}:{}: {key}{}",
                self.file.display(),
                p.line,
                p.column,
                p.message
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `journald` when standard error is the journal (systemd says so in `JOURNAL_STREAM`),
    /// `text` otherwise: the right choice under systemd and on a terminal alike.
    #[default]
    Auto,
    /// Human-readable lines for a terminal (without timestamps when standard error is the
    /// journal, which stamps each line itself).
    Text,
    /// One JSON object per line (log shippers).
    Json,
    /// Native journal entries: structured fields (`SUBJECT`, `CONNECTOR`, …) and a
    /// `PRIORITY` from the level, sent to journald's socket.
    Journald,
}

/// `[daemon]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Where the store lives (systemd: `StateDirectory=` → `/var/lib/optout-sync`).
    pub state_dir: PathBuf,
    /// The HTTP listener: WhatsApp webhooks, send gate, metrics, health.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The local control socket (`status`, `resync`); mode 0600.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Region for phone numbers written without a country code (ISO 3166 two letters).
    #[serde(default = "default_region")]
    pub default_region: String,
    #[serde(default)]
    pub log_format: LogFormat,
    /// The daemon exits within this after SIGTERM (keep it below `TimeoutStopSec=`).
    #[serde(default = "default_shutdown", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Bearer token for the send gate (`/v1/consent`). Without it the gate is off.
    #[serde(default)]
    pub gate_token: Option<SecretRef>,
    /// Bearer token for the consent write API (`POST /v1/consent/events`). Without it
    /// the write API is off. Never the gate's token: the gate only reads.
    #[serde(default)]
    pub write_token: Option<SecretRef>,
    /// A push not confirmed by a read-back within this is an alarm.
    #[serde(default = "default_unverified", with = "humantime_serde")]
    pub unverified_after: Duration,
    /// How long WhatsApp message ids already applied are remembered (duplicate deliveries
    /// within it count once); longer than Meta's redelivery window of 7 days.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub dedup_retention: Duration,
    /// How long quarantined webhook bodies are kept for an operator.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub quarantine_retention: Duration,
    /// HTTP connections served at once; further ones wait in the kernel's backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time allowed for a request's headers, counted from the connection's opening or
    /// from the end of the previous response (so it also closes idle keep-alives).
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time allowed for a request's whole body, from the end of its headers.
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:8088".parse().expect("valid")
}
fn default_control_socket() -> PathBuf {
    "/run/optout-sync/control.sock".into()
}
fn default_region() -> String {
    "US".into()
}
fn default_shutdown() -> Duration {
    Duration::from_secs(20)
}
fn default_unverified() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_retention() -> Duration {
    Duration::from_secs(30 * DAY)
}
const DAY: u64 = 24 * 3600;
fn default_max_connections() -> usize {
    1024
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `[policy]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// An opt-in wins only when later than the opt-out by more than this.
    #[serde(default = "default_margin", with = "humantime_serde")]
    pub opt_in_margin: Duration,
    /// Event times further in the future than this are clamped to the observed time.
    #[serde(default = "default_tolerance", with = "humantime_serde")]
    pub future_tolerance: Duration,
    /// Connector instances (and `import`) whose opt-ins count; omitted = all.
    #[serde(default)]
    pub accept_opt_ins_from: Option<Vec<String>>,
    /// Which scope each kind of signal affects.
    #[serde(default)]
    pub scopes: ScopeMap,
    /// Event times before this date (`YYYY-MM-DD` or RFC 3339) are refused as evidence;
    /// omitted = 2009-01-01.
    #[serde(default)]
    pub event_time_floor: Option<String>,
    /// `{ max = 100, per = "1h" }` (the default) or `"off"`: see [`OptInGuardSetting`].
    #[serde(default)]
    pub opt_in_guard: OptInGuardSetting,
}

/// `policy.opt_in_guard`: how many opt-ins that lift a suppression one source may apply
/// per window before the rest are held, or `"off"`.
#[derive(Clone, Debug)]
pub enum OptInGuardSetting {
    Word(String),
    Limit(GuardLimit),
}

/// A word or a table, each with serde's own precise errors (an unknown key, a missing
/// `per`), rather than an untagged enum's "did not match any variant".
impl<'de> Deserialize<'de> for OptInGuardSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OptInGuardSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"{ max = 100, per = "1h" } or "off""#)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(OptInGuardSetting::Word(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<Self::Value, A::Error> {
                let d = serde::de::value::MapAccessDeserializer::new(m);
                GuardLimit::deserialize(d).map(OptInGuardSetting::Limit)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `{ max = 100, per = "1h" }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardLimit {
    pub max: u64,
    #[serde(with = "humantime_serde")]
    pub per: Duration,
}

impl Default for OptInGuardSetting {
    fn default() -> Self {
        let d = crate::policy::OptInGuard::DEFAULT;
        OptInGuardSetting::Limit(GuardLimit {
            max: d.max,
            per: d.per,
        })
    }
}

impl OptInGuardSetting {
    /// The guard, or `None` when off (or not understood: `check_policy` refuses that).
    fn guard(&self) -> Option<crate::policy::OptInGuard> {
        match self {
            OptInGuardSetting::Limit(l) => Some(crate::policy::OptInGuard {
                max: l.max,
                per: l.per,
            }),
            OptInGuardSetting::Word(_) => None,
        }
    }

    /// What is wrong with it, if anything.
    fn problem(&self) -> Option<&'static str> {
        let limit = match self {
            OptInGuardSetting::Word(w) if w == "off" => return None,
            OptInGuardSetting::Word(_) => {
                return Some("write { max = 100, per = \"1h\" } or \"off\"");
            }
            OptInGuardSetting::Limit(l) => l,
        };
        if limit.max == 0 {
            Some("max must be at least 1 (\"off\" turns the guard off)")
        } else if limit.per < Duration::from_secs(60) {
            Some("per must be at least 1m: a shorter window lets a bulk edit through in bursts")
        } else if limit.per > Duration::from_secs(30 * 86_400) {
            Some("per must be at most 30d")
        } else {
            None
        }
    }
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            opt_in_margin: default_margin(),
            future_tolerance: default_tolerance(),
            accept_opt_ins_from: None,
            scopes: ScopeMap::default(),
            event_time_floor: None,
            opt_in_guard: OptInGuardSetting::default(),
        }
    }
}

fn default_margin() -> Duration {
    Duration::from_secs(5)
}
fn default_tolerance() -> Duration {
    Duration::from_secs(300)
}

impl PolicySection {
    pub fn to_policy(&self) -> PolicyConfig {
        PolicyConfig {
            margin: self.opt_in_margin,
            future_tolerance: self.future_tolerance,
            // Checked by `check_policy`: an unreadable floor never gets this far.
            event_time_floor: (self.event_time_floor.as_deref())
                .and_then(optout_core::Timestamp::parse)
                .unwrap_or(crate::policy::EVENT_TIME_FLOOR),
            scopes: self.scopes,
            accept_opt_ins_from: self
                .accept_opt_ins_from
                .as_ref()
                .map(|v| v.iter().cloned().collect()),
            opt_in_guard: self.opt_in_guard.guard(),
        }
    }
}

/// `[audit]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Evidence text (message texts, record values) older than this is dropped from the
    /// audit log; the entries and their decisions stay. Omitted = kept for ever.
    #[serde(default, with = "humantime_serde")]
    pub retention: Option<Duration>,
}

/// The shortest `audit.retention`: evidence is what answers a dispute about a recent act.
pub const MIN_AUDIT_RETENTION: Duration = Duration::from_secs(30 * DAY);

/// `[store]`: which engine holds the store, and for PostgreSQL how to reach it. Every key
/// is read as written (an `Option` where it has a default) so that [`Config::check_store`]
/// can refuse a PostgreSQL key given with sled instead of ignoring it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    #[serde(default)]
    pub backend: BackendKind,
    /// Secret: the connection URL or key=value string (its password included).
    #[serde(default)]
    pub url: Option<SecretRef>,
    #[serde(default)]
    pub pool_size: Option<u32>,
    /// PEM certificates to trust for TLS instead of the public web roots.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// This instance's name among the daemons sharing one database; default the host name.
    #[serde(default)]
    pub instance: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub lease: Option<Duration>,
}

/// `store.backend`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Files in `daemon.state_dir`: one process on one host, nothing to install.
    #[default]
    Sled,
    /// A PostgreSQL database, shared by every instance.
    Postgres,
}

/// `store.pool_size` when not given, and its bounds.
pub const DEFAULT_POOL_SIZE: u32 = 8;
pub const MAX_POOL_SIZE: u32 = 64;
/// `store.lease` when not given, and its bounds: shorter than the minimum, a busy leader
/// (a long transaction, a GC pause) loses its lease without being dead; longer than the
/// maximum, a dead leader stops every poll and push for that long.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
pub const MIN_LEASE: Duration = Duration::from_secs(3);
pub const MAX_LEASE: Duration = Duration::from_secs(300);
/// `store.instance` when neither given nor readable from the host name.
pub const FALLBACK_INSTANCE: &str = "optout-sync";

/// This host's name as the kernel knows it, when it is a valid instance name.
fn host_instance() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| valid_instance(h))
        .unwrap_or_else(|| FALLBACK_INSTANCE.to_string())
}

/// 1–64 characters of letters, digits, `.`, `_` and `-`: it stands in `status`, in logs and
/// in the lease row, so nothing that needs quoting.
fn valid_instance(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The daemon's own keys in a connector table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Common {
    /// The connector kind, a name in the registry (`hubspot`).
    pub kind: String,
    /// Poll every this long (default 30 s for CRMs; WhatsApp is woken by each webhook).
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
    /// Or poll on a cron schedule (seconds field first: `0 */5 * * * *`).
    #[serde(default)]
    pub poll_cron: Option<String>,
    /// A full resync (re-read everything, repair drift) on this cron schedule.
    #[serde(default)]
    pub full_resync_cron: Option<String>,
    /// Entries arriving more often than one per this long (or per round-trip, if longer)
    /// are batched; slower ones go at once (`0s`: never hold).
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub push_linger: Duration,
    /// The longest it holds one while entries keep arriving fast enough to fill it.
    #[serde(default, with = "humantime_serde")]
    pub push_max_linger: Option<Duration>,
    /// The most push batches in flight at once (never two of the same record); the
    /// connector's own limiter still paces the requests.
    #[serde(default = "default_pipeline")]
    pub push_pipeline: usize,
}

impl Common {
    /// The push worker's hold bounds: `push_max_linger` defaults to 250 ms, or to
    /// `push_linger` when that is longer.
    fn linger(&self) -> crate::workers::Linger {
        let max = self
            .push_max_linger
            .unwrap_or(Duration::from_millis(250).max(self.push_linger));
        crate::workers::Linger {
            min: self.push_linger,
            max,
        }
    }
}

/// Four batches in flight keep a connector busy while a slow vendor answers (an 80 ms
/// round-trip and an opt-out every 15 ms need about six slots to never queue one, four
/// keep the wait short) without many requests at once at the vendor's rate limit.
pub const DEFAULT_PIPELINE: usize = 4;
/// More than this in flight would only queue in the connector's limiter.
const MAX_PIPELINE: usize = 32;

fn default_pipeline() -> usize {
    DEFAULT_PIPELINE
}

fn default_linger() -> Duration {
    // Long enough to gather a burst into one batch request, short enough that a lone
    // opt-out is not held back noticeably.
    Duration::from_millis(10)
}

const COMMON_KEYS: [&str; 7] = [
    "kind",
    "poll_interval",
    "poll_cron",
    "full_resync_cron",
    "push_linger",
    "push_max_linger",
    "push_pipeline",
];

/// One `[connectors.NAME]` table.
#[derive(Clone, Debug)]
pub struct ConnectorConfig {
    pub name: String,
    pub common: Common,
    /// Its own settings, parsed by its kind's registry entry.
    pub settings: Arc<dyn Settings>,
}

/// The whole configuration file.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub daemon: DaemonConfig,
    pub policy: PolicySection,
    pub audit: AuditSection,
    pub store: StoreSection,
    pub connectors: Vec<ConnectorConfig>,
    /// The file's text, kept to locate problems found after parsing.
    source: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: DaemonConfig,
    #[serde(default)]
    policy: PolicySection,
    #[serde(default)]
    audit: AuditSection,
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    connectors: BTreeMap<String, toml::Table>,
}

/// Reads and parses a configuration file. Problems of syntax and type come back located.
pub fn load(path: &Path) -> Result<Config, Problems> {
    let source = std::fs::read_to_string(path).map_err(|e| Problems {
        file: path.to_path_buf(),
        problems: vec![Problem {
            key: String::new(),
            line: 0,
            column: 0,
            message: format!("cannot read the file: {e}"),
        }],
    })?;
    parse(path, &source)
}

/// Parses configuration text (`path` is only used in messages).
pub fn parse(path: &Path, source: &str) -> Result<Config, Problems> {
    parse_with(path, source, crate::registry::KINDS)
}

/// Like [`parse`], with connector kinds from `kinds` (a registry of one's own in tests).
pub fn parse_with(path: &Path, source: &str, kinds: &[&dyn Entry]) -> Result<Config, Problems> {
    let locator = Locator::new(source);
    let fail = |problems: Vec<Problem>| Problems {
        file: path.to_path_buf(),
        problems,
    };
    let raw: RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(source))
        .map_err(|e| fail(vec![syntax_problem(&locator, e)]))?;
    let mut problems = Vec::new();
    let mut connectors = Vec::new();
    for (name, table) in raw.connectors {
        match parse_connector(&name, table, kinds) {
            Ok(c) => connectors.push(c),
            Err((key, message)) => problems.push(locator.problem(&key, message)),
        }
    }
    if !problems.is_empty() {
        return Err(fail(problems));
    }
    Ok(Config {
        path: path.to_path_buf(),
        daemon: raw.daemon,
        policy: raw.policy,
        audit: raw.audit,
        store: raw.store,
        connectors,
        source: source.to_string(),
    })
}

/// A syntax or type error of the whole file, located and naming its key.
fn syntax_problem(locator: &Locator, e: serde_path_to_error::Error<toml::de::Error>) -> Problem {
    let key = e.path().to_string();
    let e = e.into_inner();
    let (line, column) = e
        .span()
        .map(|s| locator.line_col(s.start))
        .unwrap_or((1, 1));
    let key = if key == "." { String::new() } else { key };
    // An unknown key's path is its table; name the key itself.
    let key = match unknown_field_key(e.message()) {
        Some(f) if key.is_empty() => f,
        Some(f) if !key.ends_with(&f) => format!("{key}.{f}"),
        _ => key,
    };
    Problem {
        key,
        line,
        column,
        message: e.message().trim().to_string(),
    }
}

/// One `[connectors.NAME]` table: the daemon's keys, then the rest by its kind's registry
/// entry. An error is (full key, message).
fn parse_connector(
    name: &str,
    mut table: toml::Table,
    kinds: &[&dyn Entry],
) -> Result<ConnectorConfig, (String, String)> {
    let path_of = |k: &str| format!("connectors.{name}.{k}");
    let mut common_table = toml::Table::new();
    for k in COMMON_KEYS {
        if let Some(v) = table.remove(k) {
            common_table.insert(k.to_string(), v);
        }
    }
    let common = Common::deserialize(toml::Value::Table(common_table)).map_err(|e| {
        let msg = e.to_string();
        let key = match unknown_field_key(&msg) {
            Some(f) => path_of(&f),
            None if msg.contains("variant") || msg.contains("`kind`") => path_of("kind"),
            None => (COMMON_KEYS.iter().find(|k| msg.contains(*k)))
                .map(|k| path_of(k))
                .unwrap_or(format!("connectors.{name}")),
        };
        (key, clean_serde(&msg))
    })?;
    let Some(entry) = crate::registry::find(kinds, &common.kind) else {
        // Worded as serde words an unknown enum variant, which is what a kind is.
        let known = crate::registry::names(kinds);
        let message = format!("unknown variant `{}`, expected one of {known}", common.kind);
        return Err((path_of("kind"), message));
    };
    let settings = entry.parse(toml::Value::Table(table)).map_err(|e| {
        let (key, msg) = located(e);
        let key = if key.is_empty() {
            format!("connectors.{name}")
        } else {
            path_of(&key)
        };
        (key, msg)
    })?;
    Ok(ConnectorConfig {
        name: name.to_string(),
        common,
        settings,
    })
}

/// Where a connector's table failed to deserialise: (the key's path within the table,
/// message). The table was detached from the file, so toml itself can no longer say where.
fn located(e: ParseError) -> (String, String) {
    let msg = clean_serde(&e.inner().to_string());
    let mut path: Vec<String> = (e.path().iter())
        .filter_map(|seg| match seg {
            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
            serde_path_to_error::Segment::Seq { .. }
            | serde_path_to_error::Segment::Enum { .. }
            | serde_path_to_error::Segment::Unknown => None,
        })
        .collect();
    if let Some(field) = unknown_field_key(&msg)
        && path.last() != Some(&field)
    {
        path.push(field);
    }
    (path.join("."), msg)
}

/// serde's messages for nested values end with " in `...`" noise from toml; keep the gist.
fn clean_serde(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}

/// The field named in serde's "unknown field `x`" message, to point at it.
fn unknown_field_key(msg: &str) -> Option<String> {
    let rest = msg.split("unknown field `").nth(1)?;
    Some(rest.split('`').next()?.to_string())
}

/// A configuration that passed every check, with each value parsed once: what the
/// daemon and the commands are built from. Nothing downstream parses a schedule or a
/// region again, or falls back to a default.
#[derive(Clone, Debug)]
pub struct Checked {
    pub daemon: DaemonConfig,
    pub policy: PolicyConfig,
    /// Region for numbers written without a country code.
    pub region: phonenumber::country::Id,
    /// The send gate's token; `None` when the gate is off or secrets were not read.
    pub gate_token: Option<Secret>,
    /// `audit.retention`: evidence text older than this is dropped.
    pub audit_retention: Option<Duration>,
    /// The write API's token; `None` when the write API is off or secrets were not read.
    pub write_token: Option<Secret>,
    pub connectors: Vec<CheckedConnector>,
    /// The store's engine; PostgreSQL's URL is read even without secrets (every command
    /// that opens the store needs it).
    pub store: crate::store::Backend,
    /// Allowed but probably a mistake (`file:line:column: key: message`).
    pub warnings: Vec<String>,
}

/// One connector instance, checked.
#[derive(Clone, Debug)]
pub struct CheckedConnector {
    pub name: String,
    pub kind: String,
    pub settings: Arc<dyn Settings>,
    /// Its secrets, read once (empty when checked without secrets).
    pub secrets: Secrets,
    pub takes: Takes,
    /// When it polls on its own; `None` for a push-only connector.
    pub poll: Option<PollSchedule>,
    /// Full resyncs on this schedule.
    pub full_resync: Option<cron::Schedule>,
    pub linger: Linger,
    /// The most push batches in flight at once.
    pub pipeline: usize,
}

/// When a connector polls on its own.
#[derive(Clone, Debug)]
pub enum PollSchedule {
    Every(Duration),
    Cron(Box<cron::Schedule>),
}

impl Checked {
    pub fn connector(&self, name: &str) -> Option<&CheckedConnector> {
        self.connectors.iter().find(|c| c.name == name)
    }

    pub fn normalizer(&self) -> crate::identity::Normalizer {
        crate::identity::Normalizer::new(self.region)
    }
}

/// Problems found so far, located in the file.
struct Found<'a> {
    loc: Locator<'a>,
    problems: Vec<Problem>,
    /// Allowed but probably a mistake: shown by `check-config` and logged by `run`.
    warnings: Vec<Problem>,
}

impl Found<'_> {
    fn add(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(self.loc.problem(key, message.into()));
    }

    fn warn(&mut self, key: &str, message: impl Into<String>) {
        self.warnings.push(self.loc.problem(key, message.into()));
    }
}

/// The shortest send-gate token accepted: a guessable token opens the gate to anyone on
/// the network path.
pub const MIN_TOKEN_CHARS: usize = 16;
/// A full resync re-reads every record (API quota, time): at most this often.
pub const MIN_FULL_RESYNC_INTERVAL: Duration = Duration::from_secs(3600);
/// The most `policy.future_tolerance` may be: beyond it, a clock far ahead would let an
/// opt-in dated in the future outrank every later STOP.
pub const MAX_FUTURE_TOLERANCE: Duration = Duration::from_secs(3600);
/// Connector names with a meaning of their own elsewhere (sources in the audit log and in
/// `policy.accept_opt_ins_from`).
pub const RESERVED_NAMES: [&str; 3] = ["import", "api", "operator"];

impl Config {
    /// Checks meaning: regions, schedules, references between sections, and that every
    /// secret can be read now (env set, file private). Returns every problem found, or the
    /// checked configuration with its secrets read.
    pub fn validate(&self) -> Result<Checked, Problems> {
        self.check(true)
    }

    /// Like [`Config::validate`] but without reading secrets, except `store.url`: for
    /// commands that only open the store or talk to the running daemon.
    pub fn validate_without_secrets(&self) -> Result<Checked, Problems> {
        self.check(false)
    }

    fn check(&self, secrets: bool) -> Result<Checked, Problems> {
        let mut found = Found {
            loc: Locator::new(&self.source),
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        let region = self.check_daemon(&mut found);
        let store = self.check_store(&mut found);
        let gate_token = match &self.daemon.gate_token {
            Some(s) if secrets => s
                .resolve()
                .map_err(|e| found.add("daemon.gate_token", e.to_string()))
                .ok(),
            _ => None,
        };
        let write_token = match &self.daemon.write_token {
            Some(s) if secrets => s
                .resolve()
                .map_err(|e| found.add("daemon.write_token", e.to_string()))
                .ok(),
            _ => None,
        };
        self.check_policy(&mut found);
        if self
            .audit
            .retention
            .is_some_and(|r| r < MIN_AUDIT_RETENTION)
        {
            found.add(
                "audit.retention",
                "at least 30d: the evidence answers disputes about recent opt-outs",
            );
        }
        let connectors: Vec<CheckedConnector> = (self.connectors.iter())
            .filter_map(|c| check_connector(c, secrets, &mut found))
            .collect();
        let tokens = [
            ("daemon.gate_token", gate_token.as_ref()),
            ("daemon.write_token", write_token.as_ref()),
        ];
        let store_url = match &store {
            Some(crate::store::Backend::Postgres(pg)) => Some(&pg.url),
            _ => None,
        };
        check_secrets_apart(store_url, &tokens, &connectors, &mut found);
        let warnings = (found.warnings.iter())
            .map(|w| {
                format!(
                    "{}:{}:{}: {}: {}",
                    self.path.display(),
                    w.line,
                    w.column,
                    w.key,
                    w.message
                )
            })
            .collect();
        match (region, store) {
            (Some(region), Some(store)) if found.problems.is_empty() => Ok(Checked {
                daemon: self.daemon.clone(),
                policy: self.policy.to_policy(),
                region,
                gate_token,
                audit_retention: self.audit.retention,
                write_token,
                connectors,
                store,
                warnings,
            }),
            _ => Err(Problems {
                file: self.path.clone(),
                problems: found.problems,
            }),
        }
    }

    /// `[daemon]`: the region (parsed), paths and the shutdown deadline.
    fn check_daemon(&self, found: &mut Found) -> Option<phonenumber::country::Id> {
        let d = &self.daemon;
        let region = crate::identity::Normalizer::parse_region(&d.default_region);
        if region.is_none() {
            found.add(
                "daemon.default_region",
                format!(
                    "`{}` is not a two-letter region code (e.g. US, GB, BR)",
                    d.default_region
                ),
            );
        }
        if !d.state_dir.is_absolute() {
            found.add("daemon.state_dir", "must be an absolute path");
        }
        if !d.control_socket.is_absolute() {
            found.add("daemon.control_socket", "must be an absolute path");
        }
        if d.control_socket.starts_with(&d.state_dir) {
            found.add(
                "daemon.control_socket",
                "must not be inside daemon.state_dir: the store's files live there",
            );
        }
        if !d.listen.ip().is_loopback() {
            found.warn(
                "daemon.listen",
                format!(
                    "{} is reachable from other hosts; the send gate, /metrics and the webhook intake are served there (put a TLS reverse proxy in front and listen on 127.0.0.1)",
                    d.listen
                ),
            );
        }
        if d.shutdown_timeout < Duration::from_secs(1)
            || d.shutdown_timeout > Duration::from_secs(300)
        {
            found.add(
                "daemon.shutdown_timeout",
                "must be between 1s and 5m (and below systemd's TimeoutStopSec)",
            );
        }
        check_retention(d, found);
        check_http_limits(d, found);
        region
    }

    /// `[store]`: the engine, and for PostgreSQL its settings with the URL read, also when
    /// other secrets are not (every command that opens the store needs it). `None` when
    /// something is wrong (a problem is recorded).
    fn check_store(&self, found: &mut Found) -> Option<crate::store::Backend> {
        let s = &self.store;
        let before = found.problems.len();
        let instance = match &s.instance {
            Some(name) if !valid_instance(name) => {
                found.add(
                    "store.instance",
                    "use 1 to 64 letters, digits, `.`, `_` or `-` (it names this instance in `status`)",
                );
                String::new()
            }
            Some(name) => name.clone(),
            None => host_instance(),
        };
        let backend = match s.backend {
            BackendKind::Sled => {
                let postgres_only = [
                    ("store.url", s.url.is_some()),
                    ("store.pool_size", s.pool_size.is_some()),
                    ("store.tls_ca_file", s.tls_ca_file.is_some()),
                    ("store.lease", s.lease.is_some()),
                ];
                for (key, _) in postgres_only.iter().filter(|(_, given)| *given) {
                    found.add(
                        key,
                        "only for backend = \"postgres\"; sled keeps the store in daemon.state_dir",
                    );
                }
                crate::store::Backend::Sled
            }
            BackendKind::Postgres => {
                crate::store::Backend::Postgres(pg_settings(s, instance, found)?)
            }
        };
        (found.problems.len() == before).then_some(backend)
    }

    /// `[policy]`: the margin and the sources whose opt-ins count.
    fn check_policy(&self, found: &mut Found) {
        let pol = &self.policy;
        if pol.future_tolerance > MAX_FUTURE_TOLERANCE {
            found.add(
                "policy.future_tolerance",
                "at most 1h: a longer tolerance lets an event dated in the future outrank every later opt-out",
            );
        }
        match pol
            .event_time_floor
            .as_deref()
            .map(|s| (s, optout_core::Timestamp::parse(s)))
        {
            Some((_, None)) => found.add(
                "policy.event_time_floor",
                "not a date: write YYYY-MM-DD or an RFC 3339 date-time",
            ),
            Some((_, Some(t))) if t > optout_core::Timestamp::now() => found.add(
                "policy.event_time_floor",
                "lies in the future: every act would be refused",
            ),
            _ => {}
        }
        if pol.opt_in_margin > Duration::from_secs(24 * 3600) {
            found.add(
                "policy.opt_in_margin",
                "more than a day would ignore genuine opt-ins; use seconds to minutes",
            );
        }
        if let Some(why) = pol.opt_in_guard.problem() {
            found.add("policy.opt_in_guard", why);
        }
        for name in pol.accept_opt_ins_from.iter().flatten() {
            let own = name == "import" || name == "api";
            if !own && !self.connectors.iter().any(|c| &c.name == name) {
                found.add(
                    "policy.accept_opt_ins_from",
                    format!("`{name}` is not a configured connector (nor `import` or `api`)"),
                );
            }
        }
    }
}

/// `[store]` with `backend = "postgres"`: bounds, the CA file, and the URL read now. `None`
/// without a readable URL (a problem is recorded); other problems are recorded and the
/// caller sees them by count.
fn pg_settings(
    s: &StoreSection,
    instance: String,
    found: &mut Found,
) -> Option<crate::store::PgSettings> {
    let pool_size = s.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
    if !(1..=MAX_POOL_SIZE).contains(&pool_size) {
        found.add(
            "store.pool_size",
            format!("must be from 1 to {MAX_POOL_SIZE}"),
        );
    }
    let lease = s.lease.unwrap_or(DEFAULT_LEASE);
    if !(MIN_LEASE..=MAX_LEASE).contains(&lease) {
        found.add(
            "store.lease",
            "must be between 3s and 5m: shorter, a busy leader loses its lease; longer, a dead one stops polls and pushes that long",
        );
    }
    if let Some(ca) = &s.tls_ca_file {
        if !ca.is_absolute() {
            found.add("store.tls_ca_file", "must be an absolute path");
        } else if let Err(e) = std::fs::File::open(ca) {
            found.add(
                "store.tls_ca_file",
                format!("{} cannot be read: {}", ca.display(), e.kind()),
            );
        }
    }
    let Some(reference) = &s.url else {
        found.add(
            "store.url",
            "required with backend = \"postgres\": a secret reference such as { credential = \"store-url\" }",
        );
        return None;
    };
    let url = (reference.resolve())
        .map_err(|e| found.add("store.url", e.to_string()))
        .ok()?;
    if !looks_like_pg_url(url.expose()) {
        // Never the value: it holds the password.
        found.add(
            "store.url",
            format!(
                "{} holds neither a postgresql:// URL nor a key=value connection string",
                reference.describe()
            ),
        );
    }
    Some(crate::store::PgSettings {
        url,
        pool_size,
        tls_ca_file: s.tls_ca_file.clone(),
        instance,
        lease,
    })
}

/// The two forms libpq reads: a URI, or `host=… dbname=…` pairs.
fn looks_like_pg_url(v: &str) -> bool {
    let v = v.trim();
    v.starts_with("postgresql://") || v.starts_with("postgres://") || v.contains('=')
}

/// One `[connectors.NAME]` table: the daemon's keys, then the connector's own settings and
/// secrets through the connector contract.
fn check_connector(
    c: &ConnectorConfig,
    read_secrets: bool,
    found: &mut Found,
) -> Option<CheckedConnector> {
    let key = |k: &str| format!("connectors.{}.{k}", c.name);
    let before = found.problems.len();
    if !valid_name(&c.name) {
        found.add(
            &format!("connectors.{}", c.name),
            "connector names use letters, digits, `-` and `_` (at most 64)",
        );
    }
    if RESERVED_NAMES.contains(&c.name.as_str()) {
        found.add(
            &format!("connectors.{}", c.name),
            format!(
                "`{}` is reserved (it names a source of its own); reserved: {}",
                c.name,
                RESERVED_NAMES.join(", ")
            ),
        );
    }
    let (poll, full_resync) = check_schedules(c, found);
    for p in c.settings.validate() {
        found.add(&key(&p.key), p.message);
    }
    let secrets = if read_secrets {
        let (secrets, problems) = optout_core::contract::resolve(c.settings.as_ref());
        for p in problems {
            found.add(&key(&p.key), p.message);
        }
        secrets
    } else {
        Secrets::default()
    };
    let (Some(poll), Some(full_resync)) = (poll, full_resync) else {
        return None;
    };
    (found.problems.len() == before).then(|| CheckedConnector {
        name: c.name.clone(),
        kind: c.common.kind.clone(),
        takes: c.settings.takes(),
        poll,
        full_resync,
        linger: c.common.linger(),
        pipeline: c.common.push_pipeline,
        secrets,
        settings: c.settings.clone(),
    })
}

/// The poll and full-resync schedules, parsed: `None` for one that is wrong (a problem is
/// recorded); `Some(None)` when there is none.
#[allow(clippy::type_complexity)]
fn check_schedules(
    c: &ConnectorConfig,
    found: &mut Found,
) -> (Option<Option<PollSchedule>>, Option<Option<cron::Schedule>>) {
    let key = |k: &str| format!("connectors.{}.{k}", c.name);
    let common = &c.common;
    if common.poll_interval.is_some() && common.poll_cron.is_some() {
        found.add(
            &key("poll_cron"),
            "set poll_interval or poll_cron, not both",
        );
    }
    if let Some(max) = common.push_max_linger
        && max < common.push_linger
    {
        found.add(&key("push_max_linger"), "must be at least push_linger");
    }
    if !(1..=MAX_PIPELINE).contains(&common.push_pipeline) {
        found.add(
            &key("push_pipeline"),
            format!("must be from 1 to {MAX_PIPELINE}"),
        );
    }
    if let Some(i) = common.poll_interval
        && i < Duration::from_millis(100)
    {
        found.add(&key("poll_interval"), "must be at least 100ms");
    }
    let mut cron_of = |field: &str, expr: &Option<String>| match expr {
        None => Some(None),
        Some(expr) => match cron::Schedule::from_str(expr) {
            Ok(s) => Some(Some(s)),
            Err(e) => {
                found.add(&key(field), cron_problem(expr, &e));
                None
            }
        },
    };
    let poll_cron = cron_of("poll_cron", &common.poll_cron);
    let full = cron_of("full_resync_cron", &common.full_resync_cron);
    if let Some(Some(every)) = full.as_ref().map(|f| f.as_ref().and_then(shortest_gap))
        && every < MIN_FULL_RESYNC_INTERVAL
    {
        found.add(
            &key("full_resync_cron"),
            format!(
                "runs a full resync every {}; a full resync re-reads every record, so at most once an hour (nightly or weekly is usual)",
                humantime::format_duration(every)
            ),
        );
    }
    let poll = poll_cron.map(|cron| match (c.settings.polling(), cron) {
        (Polling::Never, _) => None,
        (_, Some(cron)) => Some(PollSchedule::Cron(Box::new(cron))),
        (Polling::Every(default), None) => {
            Some(PollSchedule::Every(common.poll_interval.unwrap_or(default)))
        }
    });
    (poll, full)
}

/// The shortest gap between the next few runs of a schedule.
fn shortest_gap(s: &cron::Schedule) -> Option<Duration> {
    let next: Vec<_> = s.upcoming(chrono::Utc).take(8).collect();
    (next.windows(2))
        .filter_map(|w| (w[1] - w[0]).to_std().ok())
        .min()
}

/// Every secret read is used for one role only, and the gate's token is long enough: a
/// shared value means one leak (a log of bearer tokens, a rotated app secret) opens both
/// doors. A role is a key: two WhatsApp accounts of one Meta app share its app secret
/// legitimately. Messages name keys, never values.
fn check_secrets_apart(
    store_url: Option<&Secret>,
    tokens: &[(&str, Option<&Secret>)],
    connectors: &[CheckedConnector],
    found: &mut Found,
) {
    // (role, full key, value)
    let mut seen: Vec<(String, String, Secret)> = Vec::new();
    // The store's URL is no bearer token (no length rule), but a role all the same.
    if let Some(url) = store_url {
        seen.push(("store.url".into(), "store.url".into(), url.clone()));
    }
    for (key, token) in tokens.iter().filter_map(|(k, t)| Some((*k, (*t)?))) {
        let chars = token.expose().chars().count();
        if chars < MIN_TOKEN_CHARS {
            found.add(
                key,
                format!("too short ({chars} characters); use at least {MIN_TOKEN_CHARS} random characters, e.g. `openssl rand -hex 32`"),
            );
        }
        // The gate's read token must not also write (nor the reverse).
        if let Some((_, other, _)) = seen.iter().find(|(_, _, s)| s == token) {
            let message =
                format!("has the same value as {other}; give each role a secret of its own");
            found.add(key, message);
        }
        seen.push((key.to_string(), key.to_string(), token.clone()));
    }
    for c in connectors {
        for (key, secret) in c.secrets.iter() {
            let role = key.split('[').next().unwrap_or(key).to_string();
            let full = format!("connectors.{}.{key}", c.name);
            if let Some((_, other, _)) = seen.iter().find(|(r, _, s)| s == secret && *r != role) {
                let message =
                    format!("has the same value as {other}; give each role a secret of its own");
                found.add(&full, message);
            }
            seen.push((role, full, secret.clone()));
        }
    }
}

/// The HTTP listener's limits: a connection limit of 0 would serve nothing, and timeouts
/// outside these bounds either cut off honest clients or let slow ones hold connections.
fn check_http_limits(d: &DaemonConfig, found: &mut Found) {
    if !(1..=65_536).contains(&d.max_connections) {
        found.add("daemon.max_connections", "must be between 1 and 65536");
    }
    let second = Duration::from_secs(1);
    if d.header_timeout < second || d.header_timeout > Duration::from_secs(300) {
        found.add("daemon.header_timeout", "must be between 1s and 5m");
    }
    if d.body_timeout < second || d.body_timeout > Duration::from_secs(600) {
        found.add("daemon.body_timeout", "must be between 1s and 10m");
    }
}

fn cron_problem(expr: &str, e: &cron::error::Error) -> String {
    let why = e
        .to_string()
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    format!(
        "`{expr}` is not a cron expression ({why}); the format has a seconds field first, e.g. `0 */5 * * * *`"
    )
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Maps key paths and byte offsets of the source to lines and columns.
struct Locator<'a> {
    source: &'a str,
    doc: Option<toml_edit::ImDocument<&'a str>>,
}

impl<'a> Locator<'a> {
    fn new(source: &'a str) -> Self {
        Locator {
            source,
            doc: toml_edit::ImDocument::parse(source).ok(),
        }
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.source[..offset.min(self.source.len())];
        let line = before.matches('\n').count() + 1;
        let col = before
            .rfind('\n')
            .map(|i| before.len() - i)
            .unwrap_or(before.len() + 1);
        (line, col)
    }

    /// The span of the deepest part of `path` that exists in the file.
    fn span(&self, path: &str) -> Option<Range<usize>> {
        let doc = self.doc.as_ref()?;
        let mut table: &dyn toml_edit::TableLike = doc.as_table();
        let mut best = None;
        let parts: Vec<&str> = path.split('.').filter(|s| !s.is_empty()).collect();
        for (i, part) in parts.iter().enumerate() {
            // A list item (`app_secrets[1]`) is located at its list.
            let part = part.split('[').next().unwrap_or(part);
            let Some((key, item)) = table.get_key_value(part) else {
                break;
            };
            best = item.span().or(key.span()).or(best);
            if i + 1 < parts.len() {
                match item.as_table_like() {
                    Some(t) => table = t,
                    None => break,
                }
            } else {
                best = item.span().or(key.span()).or(best);
            }
        }
        best
    }

    fn problem(&self, key: &str, message: String) -> Problem {
        let (line, column) = self
            .span(key)
            .map(|s| self.line_col(s.start))
            .unwrap_or((1, 1));
        Problem {
            key: key.to_string(),
            line,
            column,
            message,
        }
    }
}

/// `daemon.dedup_retention` and `daemon.quarantine_retention`.
fn check_retention(d: &DaemonConfig, found: &mut Found) {
    // Meta retries a webhook for up to 7 days; forgetting a message id sooner would apply a
    // late redelivery twice (a second confirmation reply, an old opt-out replayed).
    if d.dedup_retention < Duration::from_secs(8 * DAY) {
        found.add(
            "daemon.dedup_retention",
            "at least 8d: Meta redelivers a webhook for up to 7 days",
        );
    }
    if d.quarantine_retention < Duration::from_secs(DAY) {
        found.add(
            "daemon.quarantine_retention",
            "at least 1d: quarantined bodies are kept for an operator to look at",
        );
    }
}

#[cfg(test)]
mod tests;
