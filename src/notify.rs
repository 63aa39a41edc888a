//! The systemd notify protocol (`Type=notify`): `READY=1` once started (the rules of
//! `health::Readiness::started`), `WATCHDOG=1` at a third of `WatchdogSec`, `STATUS=` lines with
//! the model version and event rate, `STOPPING=1` at shutdown. Without `NOTIFY_SOCKET` every
//! call is a no-op.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::debug;

use crate::health::{Health, Readiness};
use crate::live::LiveModelSlot;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// What the notifier reads: readiness inputs, the event count and the live version.
pub struct Notifier {
    pub store: Arc<Store>,
    pub live: Arc<LiveModelSlot>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub shutdown: Arc<Shutdown>,
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "cannot notify systemd");
    }
}

impl Notifier {
    /// Runs until shutdown, then sends `STOPPING=1`.
    pub async fn run(self) -> anyhow::Result<()> {
        let watchdog = sd_notify::watchdog_enabled();
        let period = watchdog
            .map(|w| w / 3)
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
        let mut shutdown = self.shutdown.subscribe();
        let mut ready = false;
        let mut last_status: Option<(Instant, u64)> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            if !ready && Readiness::read(&self.health).started() {
                ready = true;
                send(&[NotifyState::Ready]);
            }
            if watchdog.is_some() {
                send(&[NotifyState::Watchdog]);
            }
            let consumed = self.metrics.events_consumed.get();
            let due = last_status.is_none_or(|(t, _)| t.elapsed() >= Duration::from_secs(5));
            if due {
                let rate = last_status
                    .map(|(t, n)| {
                        consumed.saturating_sub(n) as f64 / t.elapsed().as_secs_f64().max(1e-3)
                    })
                    .unwrap_or(0.0);
                let version = self.live.current().map(|m| format!("v{}", m.version));
                let status = format!(
                    "model {}, {:.0} events/s, {} users, {} items",
                    version.as_deref().unwrap_or("none yet"),
                    rate,
                    self.store.counts().users,
                    self.store.counts().items
                );
                send(&[NotifyState::Status(&status)]);
                last_status = Some((Instant::now(), consumed));
            }
        }
        send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
        Ok(())
    }
}
