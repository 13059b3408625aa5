//! Serving the HTTP listener's connections ourselves, for what `axum::serve` does not offer:
//! a connection limit, a header-read timeout (which also closes idle keep-alive
//! connections), a deadline for each request body, back-off when `accept` fails, and a
//! graceful stop on the daemon's cancellation token.
//!
//! The limit is taken *before* `accept`: at the limit, new connections wait in the kernel's
//! backlog and cost the daemon no descriptor, so the store can still open its files.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, PollSemaphore};
use tower_service::Service;

/// The connections' limits (`[daemon]` `max_connections`, `header_timeout`); the body's
/// deadline is applied per request, by the guard.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Descriptors kept for everything but HTTP connections: the store's files, connectors'
/// outbound connections, the control socket, the journal.
pub const DESCRIPTOR_RESERVE: u64 = 128;

/// `configured`, lowered to what the soft descriptor limit leaves after
/// [`DESCRIPTOR_RESERVE`] (with a warning), so that idle clients alone can never take the
/// descriptors the store needs.
pub fn connection_budget(configured: usize, nofile: Option<u64>) -> usize {
    let Some(limit) = nofile else {
        return configured;
    };
    let room =
        usize::try_from(limit.saturating_sub(DESCRIPTOR_RESERVE).max(1)).unwrap_or(usize::MAX);
    if room < configured {
        tracing::warn!(
            configured,
            serving = room,
            descriptor_limit = limit,
            "daemon.max_connections lowered to what the descriptor limit (LimitNOFILE) leaves for HTTP"
        );
        room
    } else {
        configured
    }
}

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits` (`None` if unknown or
/// unlimited).
pub fn descriptor_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Accepts and serves connections until `cancel`, then lets requests in flight finish
/// (the daemon's shutdown deadline bounds the wait).
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, cancel: CancellationToken) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut backoff = AcceptBackoff::new("HTTP listener");
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                backoff.failed(&e, &cancel).await;
                continue;
            }
        };
        backoff.succeeded();
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().call(req)
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Back-off for an accept loop. `accept` fails when descriptors run out (EMFILE, ENFILE)
/// and keeps failing at once while they stay out: retrying without a pause spins a core
/// and writes a log line per try. Instead the loop sleeps 10 ms, doubling to 1 s, and logs
/// once per episode: the first failure at WARN, and how many failed once accepting has
/// worked for [`EPISODE_QUIET`] without a failure. Descriptors freed one at a time (idle
/// connections timing out) let single accepts through; those do not end the episode, so
/// they cannot turn it into a line per connection.
pub struct AcceptBackoff {
    what: &'static str,
    /// Failures in the current episode (0: none running).
    failures: u64,
    last_failure: Option<Instant>,
    delay: Duration,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Accepting without a failure for this long ends an episode.
pub const EPISODE_QUIET: Duration = Duration::from_secs(5);

impl AcceptBackoff {
    pub fn new(what: &'static str) -> Self {
        AcceptBackoff {
            what,
            failures: 0,
            last_failure: None,
            delay: BACKOFF_FIRST,
        }
    }

    /// After a failed accept: logs it if it starts an episode, then waits (or until
    /// `cancel`).
    pub async fn failed(&mut self, e: &std::io::Error, cancel: &CancellationToken) {
        let pause = self.note_failure(Instant::now());
        if self.failures == 1 {
            tracing::warn!(listener = self.what, error = %e, "accept failed (descriptors exhausted?); backing off until it succeeds");
        }
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }

    /// After a successful accept: ends the episode if the last failure is long enough ago.
    pub fn succeeded(&mut self) {
        if let Some(failed) = self.note_success(Instant::now()) {
            tracing::warn!(listener = self.what, failed, "accepting connections again");
        }
    }

    /// Counts a failure; returns the pause before the next try.
    fn note_failure(&mut self, now: Instant) -> Duration {
        self.failures += 1;
        self.last_failure = Some(now);
        let pause = self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        pause
    }

    /// Records a success; returns the episode's failure count when this ends it.
    fn note_success(&mut self, now: Instant) -> Option<u64> {
        // Descriptors came back: the next failure, if any, starts short again.
        self.delay = BACKOFF_FIRST;
        let quiet = self
            .last_failure
            .is_some_and(|t| now.duration_since(t) >= EPISODE_QUIET);
        if self.failures == 0 || !quiet {
            return None;
        }
        Some(std::mem::take(&mut self.failures))
    }
}

/// Request bodies read at once, across all connections. A body being read is buffered
/// (up to `max_body_bytes`, 1 MiB for a webhook): without this bound, connections that
/// trickle their uploads could pin `max_connections` × that much memory until their
/// deadline. A body waits for its turn before its first byte is read (so no
/// `100 Continue` is sent meanwhile), and its deadline runs while it waits.
pub const MAX_BODIES_READ: usize = 64;

/// A request body that waits for a read permit (see [`MAX_BODIES_READ`]) and fails once its
/// deadline has passed while it still waits for data: a client that uploads too slowly (or
/// stops) is cut off instead of holding a connection and a buffer. `expired` tells the
/// guard to answer 408. The permit is released when the body is dropped.
pub struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
    turn: PollSemaphore,
    permit: Option<OwnedSemaphorePermit>,
}

/// The error a [`DeadlineBody`] ends with.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within the body timeout")]
pub struct BodyTimeout;

impl DeadlineBody {
    pub fn new(
        inner: Body,
        within: Duration,
        expired: Arc<AtomicBool>,
        readers: Arc<Semaphore>,
    ) -> Self {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(within)),
            expired,
            turn: PollSemaphore::new(readers),
            permit: None,
        }
    }

    /// Ready once this body may be read: at once for an empty body, else with a permit.
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.permit.is_some() || self.inner.is_end_stream() {
            return Poll::Ready(());
        }
        match self.turn.poll_acquire(cx) {
            Poll::Ready(permit) => {
                // `None` only if the semaphore were closed, which it never is.
                self.permit = permit;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if self.poll_turn(cx).is_ready() {
            if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
                return Poll::Ready(frame);
            }
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimeout))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The peer address the accept loop attached to a request, if any.
pub fn peer(req: &axum::extract::Request) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_keeps_descriptors_for_the_store() {
        assert_eq!(connection_budget(1024, None), 1024);
        assert_eq!(connection_budget(1024, Some(65_536)), 1024);
        assert_eq!(connection_budget(1024, Some(1024)), 1024 - 128);
        assert_eq!(connection_budget(1024, Some(100)), 1);
    }

    #[test]
    fn reads_the_descriptor_limit() {
        // Linux always has the line; the value is whatever the test runs with.
        assert!(descriptor_limit().is_some_and(|n| n > 0));
    }

    /// A body that never sends anything, like a stalled upload.
    struct Silent;

    impl http_body::Body for Silent {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    /// Polls `body` once; `None` if it is still waiting.
    async fn poll_once(body: &mut DeadlineBody) -> Option<bool> {
        std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(r) => Some(matches!(r, Some(Err(_)))),
                Poll::Pending => None,
            })
        })
        .await
    }

    /// A stalled body holds its read permit until its deadline; the next one waits for the
    /// permit, and gets it once the first is dropped.
    #[tokio::test(start_paused = true)]
    async fn bodies_take_turns_and_expire() {
        let readers = Arc::new(Semaphore::new(1));
        let body = |secs| {
            let expired = Arc::new(AtomicBool::new(false));
            let b = DeadlineBody::new(
                Body::new(Silent),
                Duration::from_secs(secs),
                expired.clone(),
                readers.clone(),
            );
            (b, expired)
        };
        let (mut first, first_expired) = body(10);
        let (mut second, _) = body(60);
        assert_eq!(poll_once(&mut first).await, None);
        assert!(first.permit.is_some());
        assert_eq!(poll_once(&mut second).await, None);
        assert!(second.permit.is_none());
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            poll_once(&mut first).await,
            Some(true),
            "cut at its deadline"
        );
        assert!(first_expired.load(Ordering::Acquire));
        drop(first);
        assert_eq!(poll_once(&mut second).await, None);
        assert!(second.permit.is_some());
    }

    /// The pauses double from 10 ms to 1 s, and a success starts over.
    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_and_resets() {
        let cancel = CancellationToken::new();
        let mut b = AcceptBackoff::new("test");
        let e = std::io::Error::from_raw_os_error(24);
        let t0 = Instant::now();
        for _ in 0..10 {
            b.failed(&e, &cancel).await;
        }
        // 10+20+40+80+160+320+640 ms, then 1 s three times.
        assert_eq!(t0.elapsed(), Duration::from_millis(1270 + 3000));
        b.succeeded();
        let t1 = Instant::now();
        b.failed(&e, &cancel).await;
        assert_eq!(t1.elapsed(), BACKOFF_FIRST);
    }

    /// Single accepts between failures do not end an episode; a quiet spell does, once.
    #[test]
    fn one_episode_until_quiet() {
        let mut b = AcceptBackoff::new("test");
        let t = Instant::now();
        assert_eq!(b.note_success(t), None);
        for i in 0..100 {
            b.note_failure(t + Duration::from_millis(i * 100));
            assert_eq!(
                b.note_success(t + Duration::from_millis(i * 100 + 50)),
                None
            );
        }
        let last = t + Duration::from_millis(9_900);
        assert_eq!(b.note_success(last + EPISODE_QUIET), Some(100));
        assert_eq!(b.note_success(last + EPISODE_QUIET * 2), None);
    }
}
