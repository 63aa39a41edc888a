//! `multivaed run`: wires the stages together. Kafka → ingest → store → train (own thread) →
//! registry → serve → Kafka, plus HTTP; SIGTERM/SIGINT stop consumption, flush the store, commit
//! offsets, abandon a training round in progress and exit.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{parse_device, Config, DeviceChoice};
use crate::metrics::Metrics;
use crate::registry::ModelRegistry;
use crate::serve::{DirtyUsers, LastRecommendations, LatencySamples};
use crate::store::Store;
use crate::train::RecentlyActive;

/// Liveness facts for `/readyz`.
#[derive(Default)]
pub struct Health {
    pub partitions: AtomicUsize,
    pub broker_up: AtomicBool,
}

/// A shutdown signal that async tasks await and threads poll.
pub struct Shutdown {
    flag: AtomicBool,
    tx: watch::Sender<bool>,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            flag: AtomicBool::new(false),
            tx: watch::channel(false).0,
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }
}

impl Shutdown {
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::Release);
        self.tx.send_replace(true);
        self.cv.notify_all();
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// A receiver whose `changed()` resolves at shutdown.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// Sleeps up to `d`, waking early at shutdown.
    pub fn wait_timeout(&self, d: Duration) {
        if let Ok(g) = self.lock.lock() {
            let _ = self.cv.wait_timeout_while(g, d, |_| !self.is_set());
        }
    }
}

/// State shared by every stage.
pub struct Shared {
    pub config: Config,
    pub store: Arc<Store>,
    pub metrics: Metrics,
    pub registry: ModelRegistry,
    pub dirty: DirtyUsers,
    /// Interactions stored since the last training round started.
    pub new_interactions: AtomicU64,
    /// Users active since the last training round started (trained on first).
    pub recently_active: RecentlyActive,
    pub health: Health,
    pub shutdown: Shutdown,
    pub latencies: LatencySamples,
    /// What each user was last shown (online hit rate).
    pub last_recs: LastRecommendations,
}

/// Chooses the training device; logs it and sets `multivaed_device_info`.
pub fn select_device(setting: &str, metrics: &Metrics) -> Result<Device> {
    let (device, name) = open_device(setting)?;
    metrics.device_info.with_label_values(&[&name]).set(1.0);
    info!(device = %name, "training device");
    Ok(device)
}

/// Opens the device a `device` setting ("auto", "cpu", "cuda:N") names, and its resolved name.
pub fn open_device(setting: &str) -> Result<(Device, String)> {
    let device = match parse_device(setting)? {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(n) => {
            if !candle_core::utils::cuda_is_available() {
                bail!("device: {setting:?} asked for, but this build has no CUDA support (build with --features cuda)");
            }
            Device::new_cuda(n).with_context(|| format!("device: cannot open {setting}"))?
        }
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available() {
                match Device::new_cuda(0) {
                    Ok(d) => d,
                    Err(e) => {
                        warn!(error = %e, "CUDA build but no usable GPU: training on the CPU");
                        Device::Cpu
                    }
                }
            } else {
                Device::Cpu
            }
        }
    };
    let name = if device.is_cuda() {
        setting.replace("auto", "cuda:0")
    } else {
        "cpu".into()
    };
    Ok((device, name))
}

/// Opens the store, builds the shared state.
pub fn open(config: Config) -> Result<Arc<Shared>> {
    let store = Store::open_with_cache(
        &config.data_dir,
        config.store.max_history,
        config.store.cache_mb << 20,
    )?;
    let metrics = Metrics::new().context("cannot register metrics")?;
    metrics.up.set(1);
    let shared = Arc::new(Shared {
        dirty: DirtyUsers::new(config.serve.max_dirty_users),
        store: Arc::new(store),
        metrics,
        registry: ModelRegistry::new(),
        new_interactions: AtomicU64::new(0),
        recently_active: RecentlyActive::new(config.train.max_users_per_round),
        health: Health::default(),
        shutdown: Shutdown::default(),
        latencies: LatencySamples::new(100_000),
        last_recs: LastRecommendations::new(config.serve.online_eval_users),
        config,
    });
    shared.health.broker_up.store(true, Ordering::Release);
    Ok(shared)
}

/// Runs the daemon until `shared.shutdown` is triggered (or a signal arrives).
pub async fn run(shared: Arc<Shared>) -> Result<()> {
    if shared.config.kafka.brokers.trim().is_empty() {
        bail!("kafka.brokers is empty: set it in the config file or MULTIVAED_KAFKA__BROKERS (or try `multivaed demo`)");
    }
    let device = select_device(&shared.config.device, &shared.metrics)?;
    let listener = tokio::net::TcpListener::bind(shared.config.http.listen)
        .await
        .with_context(|| format!("http.listen: cannot bind {}", shared.config.http.listen))?;
    info!(addr = %listener.local_addr()?, "HTTP listening");
    let http = {
        let router = crate::http::router(shared.clone());
        let mut rx = shared.shutdown.subscribe();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = rx.changed().await;
                })
                .await;
        })
    };
    let trainer = crate::train::spawn(shared.clone(), device)?;
    let consumer = crate::ingest::consumer(shared.clone())?;
    let producer = crate::ingest::producer(&shared)?;
    let ingest = {
        let s = shared.clone();
        let run = crate::ingest::run(shared.clone(), consumer, producer.clone());
        tokio::spawn(async move {
            let r = run.await;
            if let Err(e) = &r {
                // without ingestion the daemon is useless: stop (non-zero exit, the supervisor restarts)
                tracing::error!(error = %format!("{e:#}"), "ingest failed; shutting down");
                s.shutdown.trigger();
            }
            r
        })
    };
    let serve = tokio::spawn(crate::serve::run(shared.clone(), producer.clone()));
    tokio::spawn(crate::ingest::probe_brokers(
        shared.clone(),
        producer.clone(),
    ));
    let notify = tokio::spawn(crate::notify::run(shared.clone()));
    {
        let s = shared.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            info!("signal received: shutting down");
            s.shutdown.trigger();
        });
    }
    let mut rx = shared.shutdown.subscribe();
    let _ = rx.changed().await;
    let _ = notify.await;
    let ingest_result = ingest.await;
    let _ = serve.await;
    let _ = http.await;
    let _ = tokio::task::spawn_blocking(move || trainer.join()).await;
    shared.store.flush()?;
    use rdkafka::producer::Producer;
    let _ = producer.flush(Duration::from_secs(5));
    shared.metrics.up.set(0);
    let ms = |q: f64| {
        shared
            .latencies
            .quantile(q)
            .map(|s| s * 1000.0)
            .unwrap_or(f64::NAN)
    };
    info!(
        recommendations = shared.latencies.count(),
        click_to_recommendation_p50_ms = ms(0.5),
        click_to_recommendation_p99_ms = ms(0.99),
        "stopped"
    );
    match ingest_result {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!("ingest task failed: {e}")),
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
