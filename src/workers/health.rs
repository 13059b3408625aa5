//! The health worker: runs the connector's own health check (credentials, reachability)
//! at start and every few minutes, for `status`. A failed check is logged and shown; it
//! raises no alarm by itself (the poll and push workers do when their calls fail).

use std::sync::Arc;
use std::time::Duration;

use optout_core::Connector;

use super::StatusCell;
use super::runner::{Failure, Next, Step, StepCx, Worker};

/// How often each connector's own health check runs.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(300);

/// The health worker of one connector instance.
pub struct HealthCheck<C: Connector + ?Sized> {
    name: String,
    connector: Arc<C>,
    status: StatusCell,
}

impl<C: Connector + ?Sized> HealthCheck<C> {
    pub fn new(name: String, connector: Arc<C>, status: StatusCell) -> Self {
        HealthCheck {
            name,
            connector,
            status,
        }
    }
}

impl<C: Connector + ?Sized> Worker for HealthCheck<C> {
    fn name(&self) -> &str {
        &self.name
    }

    fn what(&self) -> &'static str {
        "health"
    }

    /// Runs the check and records its result.
    async fn step(&mut self, cx: &mut StepCx) -> Result<Step, Failure> {
        let Some(h) = cx.unless_cancelled(self.connector.health()).await else {
            return Ok(Step::from(Next::Stop));
        };
        if !h.ok {
            tracing::warn!(connector = %self.name, detail = %h.detail, "health check failed");
        }
        self.status.lock().unwrap_or_else(|p| p.into_inner()).health = Some(h);
        Ok(Step::from(Next::After(HEALTH_INTERVAL)))
    }

    /// Never idle: each step says when the next runs.
    async fn wait(&mut self) -> Next {
        Next::Now
    }
}
