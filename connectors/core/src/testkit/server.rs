//! The one start-up of every fake vendor server: bind 127.0.0.1 on a free port, serve an
//! axum router on a task, and shut down gracefully when told or when dropped.

use std::net::SocketAddr;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A router served on 127.0.0.1 and an ephemeral port. Dropping it stops the server.
pub struct FakeServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl FakeServer {
    /// Serves `router` on 127.0.0.1, port 0.
    pub async fn start(router: axum::Router) -> FakeServer {
        FakeServer::start_with(|_| router).await
    }

    /// Binds first and builds the router from the bound address, for fakes whose answers
    /// name their own URL (instance URLs, next-page links).
    ///
    /// Panics when binding fails: a test cannot go on without its fake.
    pub async fn start_with(router: impl FnOnce(SocketAddr) -> axum::Router) -> FakeServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let app = router(addr);
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            // A dropped sender ends the wait too, so the server never outlives its handle.
            let signal = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
            {
                tracing::warn!(%addr, error = %e, "fake server failed");
            }
        });
        FakeServer {
            addr,
            stop,
            task: Some(task),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting connections; open ones finish their requests. Does not wait.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Stops the server and waits until every open connection is closed.
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    #[tokio::test]
    async fn serves_until_shut_down() {
        let server =
            FakeServer::start(axum::Router::new().route("/", get(|| async { "hi" }))).await;
        let url = server.url();
        assert_eq!(server.addr().ip().to_string(), "127.0.0.1");
        let body = reqwest::get(&url).await.unwrap().text().await.unwrap();
        assert_eq!(body, "hi");
        server.shutdown().await;
        let fresh = reqwest::Client::new();
        let err = fresh.get(&url).send().await.unwrap_err();
        assert!(err.is_connect(), "{err:?}");
    }

    #[tokio::test]
    async fn dropping_stops_the_server() {
        let mut server =
            FakeServer::start(axum::Router::new().route("/", get(|| async { "hi" }))).await;
        let url = server.url();
        let task = server.task.take().expect("a serving task");
        drop(server);
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the server stops once its handle is dropped")
            .unwrap();
        let err = reqwest::Client::new().get(&url).send().await.unwrap_err();
        assert!(err.is_connect(), "{err:?}");
    }
}
