//! The systemd notify protocol (`Type=notify`): `READY=1` once the store is open, partitions are
//! assigned and a model is loaded (or the first training is pending with data present),
//! `WATCHDOG=1` at a third of `WatchdogSec`, `STATUS=` lines with the model version and event
//! rate, `STOPPING=1` at shutdown. Without `NOTIFY_SOCKET` every call is a no-op.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::debug;

use crate::daemon::Shared;

/// Whether systemd may be told the service is ready.
pub fn systemd_ready(shared: &Shared) -> bool {
    shared.health.partitions.load(Ordering::Acquire) > 0
        && (shared.registry.current().is_some() || shared.store.counts().interactions > 0)
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "cannot notify systemd");
    }
}

/// Runs until shutdown, then sends `STOPPING=1`.
pub async fn run(shared: Arc<Shared>) {
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog
        .map(|w| w / 3)
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1));
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
    let mut shutdown = shared.shutdown.subscribe();
    let mut ready = false;
    let mut last_status: Option<(Instant, u64)> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        if !ready && systemd_ready(&shared) {
            ready = true;
            send(&[NotifyState::Ready]);
        }
        if watchdog.is_some() {
            send(&[NotifyState::Watchdog]);
        }
        let consumed = shared.metrics.events_consumed.get();
        let due = last_status.is_none_or(|(t, _)| t.elapsed() >= Duration::from_secs(5));
        if due {
            let rate = last_status
                .map(|(t, n)| {
                    consumed.saturating_sub(n) as f64 / t.elapsed().as_secs_f64().max(1e-3)
                })
                .unwrap_or(0.0);
            let version = shared.registry.current().map(|m| format!("v{}", m.version));
            let status = format!(
                "model {}, {:.0} events/s, {} users, {} items",
                version.as_deref().unwrap_or("none yet"),
                rate,
                shared.store.counts().users,
                shared.store.counts().items
            );
            send(&[NotifyState::Status(&status)]);
            last_status = Some((Instant::now(), consumed));
        }
    }
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}
