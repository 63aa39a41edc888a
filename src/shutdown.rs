//! `Shutdown`: the one stop signal every stage watches — async tasks await it, threads poll it or
//! sleep on it — triggered by SIGTERM/SIGINT or by a stage that fails.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub struct Shutdown {
    flag: AtomicBool,
    /// When it was first triggered: waits at shutdown share one deadline from it.
    at: OnceLock<Instant>,
    tx: watch::Sender<bool>,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            flag: AtomicBool::new(false),
            at: OnceLock::new(),
            tx: watch::channel(false).0,
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }
}

impl Shutdown {
    pub fn trigger(&self) {
        self.at.get_or_init(Instant::now);
        self.flag.store(true, Ordering::Release);
        self.tx.send_replace(true);
        // taken so that a thread between its check and its wait cannot miss the wake-up
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.cv.notify_all();
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// When shutdown was first triggered (`None`: not yet).
    pub fn triggered_at(&self) -> Option<Instant> {
        self.at.get().copied()
    }

    /// A receiver whose `changed()` resolves at shutdown.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// Resolves once shutdown is triggered (at once if it already was).
    pub async fn wait(&self) {
        let mut rx = self.subscribe();
        let _ = rx.wait_for(|&set| set).await;
    }

    /// Sleeps up to `d`, waking early at shutdown.
    pub fn wait_timeout(&self, d: Duration) {
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.cv.wait_timeout_while(guard, d, |_| !self.is_set());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_sleeping_thread_wakes_at_shutdown() {
        let s = Arc::new(Shutdown::default());
        let t = {
            let s = s.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                s.wait_timeout(Duration::from_secs(30));
                start.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        s.trigger();
        assert!(t.join().unwrap() < Duration::from_secs(30));
        assert!(s.is_set());
    }

    #[tokio::test]
    async fn waiting_after_the_trigger_returns_at_once() {
        let s = Shutdown::default();
        s.trigger();
        tokio::time::timeout(Duration::from_secs(5), s.wait())
            .await
            .expect("wait() returns once triggered");
        // a second trigger (a failing stage after the signal) keeps the first time
        let first = s.triggered_at().expect("triggered");
        s.trigger();
        assert_eq!(s.triggered_at(), Some(first));
    }
}
