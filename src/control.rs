//! The local control interface: a Unix socket (mode 0600, path in the configuration)
//! speaking one JSON request per line. `optout-sync status`, `resync` and, while the
//! daemon holds the store, `lookup` go through it. Nothing listens on a network port.
//!
//! Requests: `{"command":"status"}`, `{"command":"resync","connector":null,"full":false}`,
//! `{"command":"lookup","id":"+1…"}`, `{"command":"dry_run","connector":null}`,
//! `{"command":"holds","selection":{"source":null,"ids":[]},"resolve":"release"}`,
//! `{"command":"erase","id":"+1…"}`. The daemon answers with zero or more
//! `{"progress":"…"}` lines and one final `{"ok":true,"result":…}` or
//! `{"ok":false,"error":"…"}` line.
//!
//! Streaming requests ([`Request::streams`]) move data line by line, in constant memory on
//! both sides: `audit_export` answers one `{"entry":…}` line per audit entry before its
//! final line; after an `import` request line the client sends the CSV itself, to the end
//! of its half of the connection, and gets a `{"bad_row":{"line":…,"why":…}}` line per bad
//! row. A slow reader slows the writer down (bounded buffers), nothing piles up.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Resync {
        #[serde(default)]
        connector: Option<String>,
        #[serde(default)]
        full: bool,
    },
    Lookup {
        id: String,
    },
    /// CRM phone values that are not numbers (all connectors, or one).
    Numbers {
        #[serde(default)]
        connector: Option<String>,
    },
    /// The audit log, streamed (see the module doc), filtered as `audit export` is.
    AuditExport {
        #[serde(default)]
        since: Option<optout_core::Timestamp>,
        #[serde(default)]
        until: Option<optout_core::Timestamp>,
        #[serde(default)]
        subject: Option<String>,
    },
    /// A suppression list (CSV) follows the request line (see the module doc).
    Import,
    /// Erase one person's personal data, keeping their suppression (see `Engine::erase`).
    Erase {
        id: String,
    },
    /// What `resync --full` would change (all connectors, or one), changing nothing.
    DryRun {
        #[serde(default)]
        connector: Option<String>,
    },
    /// Opt-ins held by the mass re-opt-in guard; with `resolve`, released or discarded.
    Holds {
        #[serde(default)]
        selection: crate::holds::HoldSelection,
        #[serde(default)]
        resolve: Option<Resolve>,
    },
}

/// What an operator does with held opt-ins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolve {
    Release,
    Discard,
}

impl Request {
    /// Whether the request moves data in lines ([`Handler::stream`]) rather than one answer.
    pub fn streams(&self) -> bool {
        matches!(self, Request::AuditExport { .. } | Request::Import)
    }
}

/// What a streaming request reads after its request line (an import's CSV).
pub type Input = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// What the daemon does with a request. Progress lines go to `progress`; the returned
/// value (or error) is the final answer.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        request: Request,
        progress: mpsc::Sender<String>,
    ) -> impl std::future::Future<Output = Result<Value, String>> + Send;

    /// A streaming request: `lines` takes whole JSON lines (data, or `{"progress":…}`),
    /// written as they come; the returned value (or error) is the final answer.
    fn stream(
        &self,
        request: Request,
        input: Input,
        lines: mpsc::Sender<String>,
    ) -> impl std::future::Future<Output = Result<Value, String>> + Send {
        let _ = (request, input, lines);
        async { Err("this request does not stream".to_string()) }
    }
}

/// Binds the socket: removes a stale socket file, refuses to steal a live one or to remove
/// anything that is not a socket, and restricts it to the daemon's user.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // Only a stale socket is ours to remove: a path pointing at anything else (the
        // store, a configuration file) is a mistake that must not cost that file.
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it (check daemon.control_socket)",
                    path.display()
                ),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running daemon", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves connections until cancelled, then removes the socket file. A failing `accept`
/// (descriptors exhausted) backs off and is logged once per episode, never in a spin.
pub async fn serve<H: Handler>(
    listener: UnixListener,
    path: PathBuf,
    handler: std::sync::Arc<H>,
    cancel: CancellationToken,
) {
    let mut backoff = crate::http::AcceptBackoff::new("control socket");
    loop {
        let conn = tokio::select! {
            _ = cancel.cancelled() => break,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                backoff.succeeded();
                let h = handler.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(stream, h).await {
                        tracing::debug!(error = %e, "control connection ended with an error");
                    }
                });
            }
            Err(e) => backoff.failed(&e, &cancel).await,
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// How long a client has to send its request line: a connection that says nothing does
/// not hold a descriptor for ever.
const REQUEST_LINE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn session<H: Handler>(
    stream: UnixStream,
    handler: std::sync::Arc<H>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(64 * 1024)).lines();
    let line = tokio::time::timeout(REQUEST_LINE_TIMEOUT, lines.next_line())
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request line"))?;
    let Some(line) = line? else {
        return Ok(());
    };
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let msg = json!({"ok": false, "error": format!("bad request: {e}")});
            write.write_all(format!("{msg}\n").as_bytes()).await?;
            return Ok(());
        }
    };
    if request.streams() {
        let mut rest = lines.into_inner();
        // The request line had its limit; what follows it (a CSV) has none.
        rest.get_mut().set_limit(u64::MAX);
        return stream_session(request, Box::new(rest), write, handler).await;
    }
    let (tx, mut rx) = mpsc::channel::<String>(64);
    let work = handler.handle(request, tx);
    tokio::pin!(work);
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            Some(p) = rx.recv() => {
                write.write_all(format!("{}\n", json!({"progress": p})).as_bytes()).await?;
            }
        }
    };
    while let Ok(p) = rx.try_recv() {
        write
            .write_all(format!("{}\n", json!({"progress": p})).as_bytes())
            .await?;
    }
    let last = match result {
        Ok(v) => json!({"ok": true, "result": v}),
        Err(e) => json!({"ok": false, "error": e}),
    };
    write.write_all(format!("{last}\n").as_bytes()).await?;
    write.shutdown().await
}

use tokio::io::AsyncReadExt as _;

/// Lines a streaming session buffers between the daemon's work and the socket.
const STREAM_LINES: usize = 256;

/// Writes a streaming request's lines as they come (flushing whenever the work has none
/// ready), then its final line.
async fn stream_session<H: Handler>(
    request: Request,
    input: Input,
    write: tokio::net::unix::OwnedWriteHalf,
    handler: std::sync::Arc<H>,
) -> std::io::Result<()> {
    let mut out = tokio::io::BufWriter::new(write);
    let (tx, mut rx) = mpsc::channel::<String>(STREAM_LINES);
    let work = handler.stream(request, input, tx);
    tokio::pin!(work);
    let result = loop {
        tokio::select! {
            biased;
            Some(line) = rx.recv() => {
                out.write_all(line.as_bytes()).await?;
                out.write_all(b"\n").await?;
                if rx.is_empty() {
                    out.flush().await?;
                }
            }
            r = &mut work => break r,
        }
    };
    while let Ok(line) = rx.try_recv() {
        out.write_all(line.as_bytes()).await?;
        out.write_all(b"\n").await?;
    }
    let last = match result {
        Ok(v) => json!({"ok": true, "result": v}),
        Err(e) => json!({"ok": false, "error": e}),
    };
    out.write_all(format!("{last}\n").as_bytes()).await?;
    out.flush().await?;
    out.into_inner().shutdown().await
}

#[cfg(test)]
mod tests {
    #[test]
    fn binding_never_removes_what_is_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, "the store").unwrap();
        let e = super::bind(&path).unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "the store");
        // A stale socket left by a killed daemon is replaced.
        let sock = dir.path().join("control.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { super::bind(&sock).unwrap() });
    }
}

/// Why the CLI could not talk to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the daemon is not running (no control socket at {0}); start it with `systemctl start optout-sync` or `optout-sync run`"
    )]
    NotRunning(String),
    #[error("cannot use the control socket at {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{0}")]
    Daemon(String),
}

/// Asks the running daemon for its [`StatusReport`](crate::report::StatusReport).
pub async fn status(path: &Path) -> Result<crate::report::StatusReport, ClientError> {
    let v = request(path, &Request::Status, |_| {}).await?;
    serde_json::from_value(v)
        .map_err(|e| ClientError::Daemon(format!("bad status from the daemon: {e}")))
}

/// Sends one request; calls `on_progress` for each progress line; returns the result.
pub async fn request(
    path: &Path,
    req: &Request,
    mut on_progress: impl FnMut(&str),
) -> Result<Value, ClientError> {
    let shown = path.display().to_string();
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(shown.clone())
            }
            _ => ClientError::Io {
                path: shown.clone(),
                reason: e.to_string(),
            },
        })?;
    let io = |e: std::io::Error| ClientError::Io {
        path: shown.clone(),
        reason: e.to_string(),
    };
    let (read, mut write) = stream.into_split();
    let line = serde_json::to_string(req).expect("requests serialise");
    write
        .write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(io)?;
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await.map_err(io)? {
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| ClientError::Daemon(format!("bad answer from the daemon: {e}")))?;
        if let Some(p) = v.get("progress").and_then(Value::as_str) {
            on_progress(p);
            continue;
        }
        return match v.get("ok").and_then(Value::as_bool) {
            Some(true) => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
            _ => Err(ClientError::Daemon(
                v.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_string(),
            )),
        };
    }
    Err(ClientError::Daemon(
        "the daemon closed the connection without an answer".into(),
    ))
}

/// Sends a streaming request; `input` (an import's CSV) is sent after the request line,
/// while the answer is read, so neither side waits on the other. Calls `on_progress` for
/// each progress line and `on_line` for each data line; returns the final result.
pub async fn stream(
    path: &Path,
    req: &Request,
    input: Option<Box<dyn std::io::Read + Send>>,
    mut on_progress: impl FnMut(&str),
    mut on_line: impl FnMut(Value) -> std::io::Result<()>,
) -> Result<Value, ClientError> {
    let shown = path.display().to_string();
    let io = |e: std::io::Error| ClientError::Io {
        path: shown.clone(),
        reason: e.to_string(),
    };
    let stream = connect(path).await?;
    let (read, mut write) = stream.into_split();
    let line = serde_json::to_string(req).expect("requests serialise");
    write
        .write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(io)?;
    let sender = tokio::spawn(send_input(input, write));
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await.map_err(io)? {
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| ClientError::Daemon(format!("bad answer from the daemon: {e}")))?;
        if let Some(p) = v.get("progress").and_then(Value::as_str) {
            on_progress(p);
        } else if let Some(ok) = v.get("ok").and_then(Value::as_bool) {
            sender.abort();
            return final_answer(ok, v);
        } else {
            on_line(v).map_err(io)?;
        }
    }
    Err(ClientError::Daemon(
        "the daemon closed the connection without an answer".into(),
    ))
}

fn final_answer(ok: bool, v: Value) -> Result<Value, ClientError> {
    if ok {
        return Ok(v.get("result").cloned().unwrap_or(Value::Null));
    }
    let why = v
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("unknown error");
    Err(ClientError::Daemon(why.to_string()))
}

/// Copies `input` to the socket in chunks (read on a blocking thread: standard input or a
/// file), then ends the client's half so the daemon sees the end of the CSV.
async fn send_input(
    input: Option<Box<dyn std::io::Read + Send>>,
    mut write: tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    if let Some(mut input) = input {
        let (tx, mut rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(4);
        tokio::task::spawn_blocking(move || {
            loop {
                let mut buf = vec![0; 64 * 1024];
                match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.blocking_send(Ok(buf)).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return drop(tx.blocking_send(Err(e))),
                }
            }
        });
        while let Some(chunk) = rx.recv().await {
            write.write_all(&chunk?).await?;
        }
    }
    write.shutdown().await
}

async fn connect(path: &Path) -> Result<UnixStream, ClientError> {
    let shown = path.display().to_string();
    UnixStream::connect(path).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(shown)
        }
        _ => ClientError::Io {
            path: shown,
            reason: e.to_string(),
        },
    })
}
