//! Recovery: the background task that finishes sagas left PENDING by a crash or a billing
//! outage. It sweeps once at start, then every `recovery.interval`, and stops at shutdown (a
//! sweep cut short is harmless: every charge it sends carries the order's own idempotency key).

use tokio::{sync::watch, time::MissedTickBehavior};

use crate::{
    config::RecoveryConfig,
    error::DomainError,
    saga::{Saga, SweepReport},
};

/// A handle on recovery: [`Recovery::sweep`] runs one sweep now (what the background task does
/// on each tick).
#[derive(Clone)]
pub struct Recovery {
    saga: Saga,
    config: RecoveryConfig,
}

impl Recovery {
    pub(crate) fn new(saga: Saga, config: RecoveryConfig) -> Self {
        Self { saga, config }
    }

    /// Charges again every order PENDING for at least `recovery.min_age` and records the
    /// outcome; orders stay PENDING while billing is unreachable.
    pub async fn sweep(&self) -> Result<SweepReport, DomainError> {
        self.saga.sweep(self.config.min_age).await
    }

    /// Sweeps now and on every interval until `stop` turns true (or its sender goes away).
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(self.config.interval);
        // After a long sweep, wait a full interval rather than sweeping back to back.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => return,
                _ = ticks.tick() => {}
            }
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => return,
                result = self.sweep() => match result {
                    Ok(report) if report == SweepReport::default() => {}
                    Ok(report) => tracing::info!(?report, "recovery sweep"),
                    Err(error) => tracing::warn!(%error, "recovery sweep failed; retrying next interval"),
                },
            }
        }
    }
}
