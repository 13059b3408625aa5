//! `audit export` and `import` while the daemon runs: the control socket's streaming
//! requests ([`control::Request::streams`](crate::control::Request::streams)). Both run on
//! a blocking thread against the daemon's own store, with bounded channels on either side,
//! so memory stays flat however long the log or the list.

use std::io::Read;
use std::sync::Arc;

use optout_core::Timestamp;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::audit::Filter;
use crate::control::Input;
use crate::workers::WorkerContext;

/// Streams the entries `filter` selects, one `{"entry":…}` line each; the answer counts them.
pub async fn export(
    ctx: Arc<WorkerContext>,
    filter: Filter,
    lines: mpsc::Sender<String>,
) -> Result<Value, String> {
    let engine = ctx.engine.clone();
    let work = move || {
        let mut n: u64 = 0;
        for entry in crate::audit::select(&engine, &filter)? {
            let entry = entry.map_err(|e| e.to_string())?;
            let text = serde_json::to_string(&entry).map_err(|e| e.to_string())?;
            if lines
                .blocking_send(format!("{{\"entry\":{text}}}"))
                .is_err()
            {
                return Err("the client went away".to_string());
            }
            n += 1;
        }
        Ok(json!({ "entries": n }))
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| e.to_string())?
}

/// Applies the CSV that follows the request like `optout-sync import` does offline, page
/// by page (each page wakes the push workers, so its corrections go out at once), with a
/// `{"bad_row":…}` line per bad row.
pub async fn import(
    ctx: Arc<WorkerContext>,
    input: Input,
    lines: mpsc::Sender<String>,
) -> Result<Value, String> {
    let (chunks_tx, chunks) = mpsc::channel(4);
    let reader = tokio::spawn(read_chunks(input, chunks_tx));
    let work = move || {
        let csv = ChannelReader {
            chunks,
            current: Vec::new(),
            pos: 0,
        };
        let on_bad = |line: u64, why: String| {
            let _ = lines.blocking_send(json!({"bad_row": {"line": line, "why": why}}).to_string());
        };
        let on_page = |r: &crate::reconcile::ApplyReport| ctx.after_apply(crate::import::SOURCE, r);
        let engine = &ctx.engine;
        let report =
            crate::import::import_streaming(engine, csv, Timestamp::now(), on_bad, on_page)
                .map_err(|e| e.to_string())?;
        // As the offline import does: the audit log's new reach is recorded at once.
        engine
            .store()
            .save_high_water()
            .map_err(|e| e.to_string())?;
        Ok(json!({
            "applied": report.applied,
            "duplicates": report.duplicates,
            "bad_rows": report.bad_rows,
        }))
    };
    let result = tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| e.to_string())?;
    reader.abort();
    result
}

/// Reads the client's CSV in chunks into a bounded channel.
async fn read_chunks(mut input: Input, tx: mpsc::Sender<std::io::Result<Vec<u8>>>) {
    loop {
        let mut buf = vec![0; 64 * 1024];
        match input.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                if tx.send(Ok(buf)).await.is_err() {
                    return;
                }
            }
            Err(e) => return drop(tx.send(Err(e)).await),
        }
    }
}

/// The channel's chunks as a blocking [`Read`], for the CSV reader.
struct ChannelReader {
    chunks: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.current.len() {
            match self.chunks.blocking_recv() {
                Some(chunk) => (self.current, self.pos) = (chunk?, 0),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
