//! systemd integration: the `sd_notify` protocol and the service watchdog.
//!
//! The unit runs with `Type=notify` and `WatchdogSec=`: systemd considers the service started
//! only once we send `READY=1`, shows our `STATUS=` line in `systemctl status`, and restarts
//! the daemon when it stops sending `WATCHDOG=1` within the watchdog interval.
//!
//! The protocol is tiny, so it is implemented here rather than pulled in as a dependency: each
//! message is one datagram of `KEY=VALUE` lines sent to the `AF_UNIX` socket named by
//! `$NOTIFY_SOCKET` (a filesystem path, or an abstract name written with a leading `@`).
//! systemd learns who sent it from the kernel-attached credentials, so nothing else is needed.
//!
//! It also tells whether standard error is the journal (`$JOURNAL_STREAM`, for the choice of
//! log format) and words the `STATUS=` line from the connectors' alarms.
//!
//! Notifying is best effort by design: when the daemon is not run by systemd (a terminal, a
//! container, tests) every call is a no-op, and a failed send is logged once and never stops
//! the daemon, since a missing notification is systemd's concern to time out on, not ours.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// systemd reads at most a pipe buffer's worth per datagram; a `STATUS=` line is for humans,
/// so cap it well below that rather than risk the whole message being discarded.
const MAX_STATUS_BYTES: usize = 1024;

/// A blocked send means PID 1 is not reading its notify socket; waiting longer would only
/// stall the caller, and the watchdog retries at its next tick anyway.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends state notifications to systemd. Cheap to clone: clones share the socket address and
/// the "already warned" flag, so a broken socket is reported once per process, not per task.
#[derive(Clone, Debug)]
pub struct Notifier {
    /// `None` when not started by systemd (or the address is unusable): every call is a no-op.
    target: Option<Target>,
    /// The full watchdog interval systemd expects pings within; `None` when the watchdog is off.
    watchdog: Option<Duration>,
    /// Set after the first failed send so a persistent failure does not flood the log.
    warned: Arc<AtomicBool>,
}

/// Where notifications go, parsed once from `$NOTIFY_SOCKET`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// A socket file, e.g. `/run/systemd/notify`.
    Path(PathBuf),
    /// A Linux abstract socket name (the bytes after the `@`).
    Abstract(Vec<u8>),
}

impl Notifier {
    /// The notifier for this process as systemd started it: `$NOTIFY_SOCKET`, `$WATCHDOG_USEC`
    /// and `$WATCHDOG_PID`. The variables are only read, never unset: removing them would be a
    /// process-wide side effect (unsafe in a multi-threaded program, and racy in tests), and the
    /// daemon spawns no children that could mistake them for their own.
    pub fn from_env() -> Self {
        let mut notifier = match std::env::var_os("NOTIFY_SOCKET") {
            Some(socket) => Self::with_socket(socket),
            None => Self::disabled(),
        };
        notifier.watchdog = parse_watchdog(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        notifier
    }

    /// A notifier that sends to the given socket address (a path, or `@name` for an abstract
    /// socket), with the watchdog off. For tests and embedding, without touching the process
    /// environment.
    pub fn with_socket(socket: impl AsRef<OsStr>) -> Self {
        let socket = socket.as_ref();
        let target = parse_target(socket);
        if target.is_none() && !socket.is_empty() {
            // systemd ≥ 253 may also hand out `vsock:` addresses (for VMs); we do not run there.
            tracing::warn!(
                socket = %socket.to_string_lossy(),
                "unsupported NOTIFY_SOCKET address; systemd notifications disabled"
            );
        }
        Self {
            target,
            watchdog: None,
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A notifier that does nothing: for runs outside systemd.
    pub fn disabled() -> Self {
        Self {
            target: None,
            watchdog: None,
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Sets the watchdog interval explicitly (tests).
    #[cfg(test)]
    pub fn with_watchdog(mut self, interval: Option<Duration>) -> Self {
        self.watchdog = interval;
        self
    }

    /// Whether notifications go anywhere (i.e. we run under systemd with `Type=notify`).
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Start-up is complete: systemd marks the unit active and starts units ordered after it.
    pub fn ready(&self) {
        self.notify("READY=1");
    }

    /// Shutdown has begun, so systemd shows "deactivating" rather than a hung service.
    pub fn stopping(&self) {
        self.notify("STOPPING=1");
    }

    /// A one-line human-readable state for `systemctl status`. Control characters (newlines
    /// included) become spaces, because a newline would start a new protocol field.
    pub fn status(&self, text: &str) {
        if self.is_enabled() {
            self.notify(&format!("STATUS={}", status_line(text)));
        }
    }

    /// Start-up takes longer than usual (compacting the store): asks systemd for `by` more
    /// before `TimeoutStartSec=` runs out, and resets the watchdog.
    pub fn extend_start(&self, by: Duration) {
        self.notify(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()));
        self.watchdog();
    }

    /// "Still alive": resets systemd's watchdog timer.
    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }

    /// The interval systemd expects watchdog pings within (`WatchdogSec=`), if the watchdog is
    /// on for this process. Ping at half of it so one late tick does not cost a restart.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one message, logging (once) instead of failing: see the module doc for why.
    fn notify(&self, message: &str) {
        let Err(error) = self.try_notify(message) else {
            return;
        };
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                %error,
                socket = ?self.target,
                "cannot send notification to systemd (further failures are not logged)"
            );
        }
    }

    fn try_notify(&self, message: &str) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        // An unbound socket per message, like libsystemd: notifications are rare (start, stop,
        // a watchdog tick every few seconds), and nothing is left open between them.
        let socket = UnixDatagram::unbound()?;
        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
        let sent = match target {
            Target::Path(path) => socket.send_to(message.as_bytes(), path)?,
            Target::Abstract(name) => send_abstract(&socket, name, message.as_bytes())?,
        };
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "notification datagram truncated",
            ));
        }
        Ok(())
    }
}

/// Pings the watchdog at half its interval for as long as `healthy()` holds, until `cancel`
/// fires. When the daemon is wedged (`healthy()` false, e.g. workers stopped making progress)
/// the pings stop on purpose: systemd then kills and restarts the service, which is safe
/// because every effect is durable before it is acknowledged. Returns at once when the
/// watchdog is off.
pub async fn watchdog_loop(
    notifier: Notifier,
    healthy: impl Fn() -> bool,
    cancel: CancellationToken,
) {
    let Some(interval) = notifier.watchdog_interval() else {
        return;
    };
    let mut ticks = tokio::time::interval(interval / 2);
    // After a stall, ping once and keep the cadence rather than bursting to catch up.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_healthy = true;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let is_healthy = healthy();
        if is_healthy {
            notifier.watchdog();
        }
        // Log transitions only: one line when pings stop, one when they resume.
        match (was_healthy, is_healthy) {
            (true, false) => tracing::warn!(
                ?interval,
                "daemon unhealthy: withholding watchdog pings, systemd will restart it"
            ),
            (false, true) => tracing::info!("daemon healthy again: watchdog pings resumed"),
            _ => {}
        }
        was_healthy = is_healthy;
    }
}

/// `$NOTIFY_SOCKET` → where to send. Only absolute paths and `@abstract` names are valid
/// (as in libsystemd); anything else disables notifications.
fn parse_target(socket: &OsStr) -> Option<Target> {
    let bytes = socket.as_bytes();
    match bytes.first()? {
        b'/' => Some(Target::Path(PathBuf::from(OsString::from(socket)))),
        b'@' if bytes.len() > 1 => Some(Target::Abstract(bytes[1..].to_vec())),
        _ => None,
    }
}

#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &[u8], message: &[u8]) -> io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(message, &address)
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket names exist only on Linux",
    ))
}

/// The watchdog interval from the values of `$WATCHDOG_USEC` and `$WATCHDOG_PID`, following
/// `sd_watchdog_enabled(3)`: off when the interval is missing, zero or malformed, and off when
/// `WATCHDOG_PID` names another process (the variables were inherited from a parent that
/// systemd is watching, not us).
pub fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid {
        let pid: u32 = pid.trim().parse().ok()?;
        if pid != our_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// Whether standard error is connected to the journal: systemd sets `$JOURNAL_STREAM` to
/// the `device:inode` of the stream it connects a service's output to, and it names our
/// standard error only if that is still the same file (not redirected by a wrapper, nor
/// inherited by a child whose output goes elsewhere). See systemd.exec(5).
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some(expected) = stream.to_str().and_then(parse_journal_stream) else {
        return false;
    };
    let stderr = std::io::stderr();
    let Ok(fd) = stderr.as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| (m.dev(), m.ino()) == expected)
}

/// `$JOURNAL_STREAM` (`"device:inode"`, both decimal) → `(device, inode)`.
pub fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The `STATUS=` text for a running daemon: where it listens, preceded by every connector
/// that needs attention and why (`attention` holds `(connector, problem)` pairs, e.g. from
/// [`connector_attention`]), so `systemctl status` shows an alarm rather than "running".
///
/// `2 connectors need attention: hubspot: property whatsapp_consent missing; salesforce:
/// invalid_grant — listening on 127.0.0.1:8088`, or `running; listening on 127.0.0.1:8088`.
pub fn status_text<C, P>(listen: &str, attention: &[(C, P)]) -> String
where
    C: AsRef<str>,
    P: AsRef<str>,
{
    if attention.is_empty() {
        return format!("running; listening on {listen}");
    }
    let n = attention.len();
    let problems: Vec<String> = attention
        .iter()
        .map(|(c, p)| format!("{}: {}", c.as_ref(), p.as_ref()))
        .collect();
    format!(
        "{n} connector{} need{} attention: {} — listening on {listen}",
        if n == 1 { "" } else { "s" },
        if n == 1 { "s" } else { "" },
        problems.join("; ")
    )
}

/// What a connector's status says needs attention: its alarm (an operator must act), else
/// the last error while it is failing; `None` when it is healthy.
pub fn connector_attention(status: &crate::workers::ConnectorStatus) -> Option<String> {
    if let Some(alarm) = &status.alarm {
        return Some(alarm.clone());
    }
    if status.healthy {
        return None;
    }
    Some(
        (status.last_error.clone()).unwrap_or_else(|| "failing (no error recorded yet)".to_owned()),
    )
}

/// One protocol-safe line: control characters become spaces, trailing blanks go, and the
/// result is cut (on a character boundary) to [`MAX_STATUS_BYTES`].
fn status_line(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > MAX_STATUS_BYTES {
        let mut end = MAX_STATUS_BYTES;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A bound receiving socket standing in for systemd's notify socket.
    struct Listener {
        _dir: tempfile::TempDir,
        path: PathBuf,
        socket: UnixDatagram,
    }

    impl Listener {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify.sock");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket.set_nonblocking(true).unwrap();
            Self {
                _dir: dir,
                path,
                socket,
            }
        }

        /// Every datagram queued so far. Sends are synchronous, so by the time a notifier call
        /// returns its datagram is already here: no waiting needed.
        fn drain(&self) -> Vec<String> {
            drain(&self.socket)
        }
    }

    fn drain(socket: &UnixDatagram) -> Vec<String> {
        let mut messages = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match socket.recv(&mut buf) {
                Ok(n) => messages.push(String::from_utf8(buf[..n].to_vec()).unwrap()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return messages,
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    #[test]
    fn sends_exact_datagrams_to_a_socket_path() {
        let listener = Listener::new();
        let notifier = Notifier::with_socket(&listener.path);
        assert!(notifier.is_enabled());

        notifier.ready();
        notifier.status("polling hubspot");
        notifier.watchdog();
        notifier.stopping();

        assert_eq!(
            listener.drain(),
            [
                "READY=1",
                "STATUS=polling hubspot",
                "WATCHDOG=1",
                "STOPPING=1"
            ]
        );
        assert!(!notifier.warned.load(Ordering::Relaxed));
    }

    #[test]
    fn status_is_one_line_without_control_characters() {
        let listener = Listener::new();
        let notifier = Notifier::with_socket(&listener.path);

        notifier.status("2 connectors\nhubspot: \x1b[31mdown\x1b[0m\tretrying\r\n");
        notifier.status(&"é".repeat(MAX_STATUS_BYTES));

        let messages = listener.drain();
        assert_eq!(
            messages[0],
            "STATUS=2 connectors hubspot:  [31mdown [0m retrying"
        );
        // Cut to the byte budget without splitting the two-byte 'é'.
        assert_eq!(
            messages[1],
            format!("STATUS={}", "é".repeat(MAX_STATUS_BYTES / 2))
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("optout-sync-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let receiver = UnixDatagram::bind_addr(&address).unwrap();
        receiver.set_nonblocking(true).unwrap();

        let notifier = Notifier::with_socket(format!("@{name}"));
        notifier.ready();

        assert_eq!(drain(&receiver), ["READY=1"]);
    }

    #[test]
    fn unusable_addresses_disable_notifications() {
        for socket in ["", "relative/notify.sock", "@", "vsock:2:1234"] {
            let notifier = Notifier::with_socket(socket);
            assert!(!notifier.is_enabled(), "{socket:?}");
            // A no-op, not an error.
            assert!(notifier.try_notify("READY=1").is_ok());
        }
        assert!(!Notifier::disabled().is_enabled());
    }

    #[test]
    fn a_failed_send_is_reported_once_and_never_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let notifier = Notifier::with_socket(dir.path().join("nobody-listens.sock"));

        assert!(notifier.try_notify("READY=1").is_err());
        notifier.ready();
        assert!(notifier.warned.load(Ordering::Relaxed));
        // Clones share the flag, so other tasks do not log the same failure again.
        assert!(notifier.clone().warned.load(Ordering::Relaxed));
        notifier.stopping();
    }

    #[test]
    fn watchdog_settings_follow_sd_watchdog_enabled() {
        let me = 4242;
        let thirty_s = Some(Duration::from_secs(30));
        assert_eq!(parse_watchdog(Some("30000000"), None, me), thirty_s);
        assert_eq!(parse_watchdog(Some("30000000"), Some("4242"), me), thirty_s);
        assert_eq!(
            parse_watchdog(Some("1500"), None, me),
            Some(Duration::from_micros(1500))
        );
        // Meant for another process (inherited from a watched parent).
        assert_eq!(parse_watchdog(Some("30000000"), Some("4243"), me), None);
        assert_eq!(parse_watchdog(Some("30000000"), Some("x"), me), None);
        // Off, zero or malformed.
        assert_eq!(parse_watchdog(None, None, me), None);
        assert_eq!(parse_watchdog(None, Some("4242"), me), None);
        assert_eq!(parse_watchdog(Some("0"), None, me), None);
        assert_eq!(parse_watchdog(Some("-5"), None, me), None);
        assert_eq!(parse_watchdog(Some("30s"), None, me), None);
        assert_eq!(parse_watchdog(Some(""), None, me), None);
    }

    #[test]
    fn status_text_names_every_connector_that_needs_attention() {
        let none: [(&str, &str); 0] = [];
        assert_eq!(
            status_text("127.0.0.1:8088", &none),
            "running; listening on 127.0.0.1:8088"
        );
        assert_eq!(
            status_text(
                "127.0.0.1:8088",
                &[("hubspot", "property whatsapp_consent missing")]
            ),
            "1 connector needs attention: hubspot: property whatsapp_consent missing \
             — listening on 127.0.0.1:8088"
        );
        assert_eq!(
            status_text(
                "[::1]:9000",
                &[
                    ("hubspot", "property whatsapp_consent missing"),
                    ("salesforce", "invalid_grant")
                ]
            ),
            "2 connectors need attention: hubspot: property whatsapp_consent missing; \
             salesforce: invalid_grant — listening on [::1]:9000"
        );
    }

    #[test]
    fn attention_is_the_alarm_else_the_failure_else_nothing() {
        let mut s = crate::workers::ConnectorStatus {
            healthy: true,
            ..Default::default()
        };
        assert_eq!(connector_attention(&s), None);
        s.healthy = false;
        assert_eq!(
            connector_attention(&s).as_deref(),
            Some("failing (no error recorded yet)")
        );
        s.last_error = Some("poll: HTTP 503".into());
        assert_eq!(connector_attention(&s).as_deref(), Some("poll: HTTP 503"));
        s.alarm = Some("token rejected".into());
        assert_eq!(connector_attention(&s).as_deref(), Some("token rejected"));
        // An alarm counts even while polls succeed.
        s.healthy = true;
        assert_eq!(connector_attention(&s).as_deref(), Some("token rejected"));
    }

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert_eq!(parse_journal_stream("8:123456"), Some((8, 123456)));
        assert_eq!(parse_journal_stream(" 0:1\n"), Some((0, 1)));
        for bad in ["", "8", "8:", ":1", "a:1", "8:1:2", "-1:2"] {
            assert_eq!(parse_journal_stream(bad), None, "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_loop_pings_at_half_the_interval_only_while_healthy() {
        let listener = Listener::new();
        let notifier =
            Notifier::with_socket(&listener.path).with_watchdog(Some(Duration::from_secs(30)));
        let healthy = Arc::new(AtomicBool::new(true));
        let checks = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(watchdog_loop(
            notifier,
            {
                let (healthy, checks) = (healthy.clone(), checks.clone());
                move || {
                    checks.fetch_add(1, Ordering::Relaxed);
                    healthy.load(Ordering::Relaxed)
                }
            },
            cancel.clone(),
        ));

        // Paused time: each sleep jumps the clock, running the loop's ticks due on the way.
        // Ticks at 0, 15, 30 and 45 s.
        tokio::time::sleep(Duration::from_secs(50)).await;
        assert_eq!(listener.drain(), ["WATCHDOG=1"; 4]);

        // Wedged: ticks at 60 and 75 s check health but send nothing.
        healthy.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(listener.drain(), Vec::<String>::new());
        assert_eq!(checks.load(Ordering::Relaxed), 6);

        // Recovered: the tick at 90 s pings again.
        healthy.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert_eq!(listener.drain(), ["WATCHDOG=1"]);

        cancel.cancel();
        task.await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(listener.drain(), Vec::<String>::new());
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_loop_returns_at_once_when_the_watchdog_is_off() {
        let listener = Listener::new();
        let notifier = Notifier::with_socket(&listener.path);
        // Never cancelled: it must return on its own.
        watchdog_loop(notifier, || true, CancellationToken::new()).await;
        assert_eq!(listener.drain(), Vec::<String>::new());
    }
}
