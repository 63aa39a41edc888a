//! `multivaed run`: builds each stage's context from the one set of shared parts, starts the
//! stages of the role and supervises them. Role `all`: Kafka → ingest → store → train (own
//! thread) → live model → serve → Kafka; role `serve`: the same without training, the live model
//! loaded from the fleet's shipped versions (`shipping`); role `train`: the changelog → store →
//! train → shipped versions. http and systemd notify run beside them. SIGTERM/SIGINT stop consumption,
//! flush the store, commit offsets, abandon a training round in progress and exit 0; a stage
//! that fails or stops by itself stops the daemon with an error naming it (non-zero exit).
//! No stage imports this module: each gets only what it uses.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use futures::FutureExt;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::activity::Activity;
use crate::config::{Config, DeviceChoice, Role};
use crate::health::Health;
use crate::live::LiveModelSlot;
use crate::metrics::{LatencySamples, Metrics};
use crate::online::OnlineEval;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// The parts one daemon process shares among its stages (each part has one owner that changes
/// it; see the stage contexts built in [`Daemon::run`]).
#[derive(Clone)]
pub struct Daemon {
    pub config: Config,
    pub(crate) store: Arc<Store>,
    /// Which users this process owns (all of them in role `all`).
    pub(crate) ownership: Arc<crate::ownership::Ownership>,
    /// Role `serve`: the other replicas and their partitions (pull routing).
    pub(crate) directory: Arc<crate::members::Directory>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) live: Arc<LiveModelSlot>,
    pub(crate) activity: Arc<Activity>,
    /// Which items may be recommended (the items topic, the operator's lists).
    pub(crate) items: Arc<crate::items::ItemRules>,
    pub(crate) online: Arc<OnlineEval>,
    pub(crate) health: Arc<Health>,
    pub(crate) shutdown: Arc<Shutdown>,
    pub(crate) latencies: Arc<LatencySamples>,
    /// Roles `serve` and `train`: the fleet's control-plane key (`models.signing_key_file`).
    pub(crate) control: Option<Arc<crate::control::ControlKey>>,
}

/// Opens the training device a `device` setting names, and its resolved name.
pub fn open_device(choice: DeviceChoice) -> Result<(Device, String)> {
    let device = match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(n) => {
            if !candle_core::utils::cuda_is_available() {
                bail!("device: \"cuda:{n}\" asked for, but this build has no CUDA support (build with --features cuda)");
            }
            Device::new_cuda(n).with_context(|| format!("device: cannot open cuda:{n}"))?
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
    let name = match (&device, choice) {
        (Device::Cpu, _) => "cpu".to_string(),
        (_, DeviceChoice::Cuda(n)) => format!("cuda:{n}"),
        _ => "cuda:0".to_string(),
    };
    Ok((device, name))
}

impl Daemon {
    /// Opens the store and builds the shared parts.
    pub fn open(config: Config) -> Result<Self> {
        let store = Store::open_with_cache(
            &config.data_dir,
            config.store.max_history,
            config.store.cache_mb << 20,
        )?;
        let metrics = Metrics::new().context("cannot register metrics")?;
        metrics.up.set(1);
        metrics
            .role_info
            .with_label_values(&[config.role.name()])
            .set(1);
        let ownership = match config.role {
            Role::All => crate::ownership::Ownership::everything(),
            // a trainer owns no user: it answers no pull
            Role::Serve | Role::Train => {
                crate::ownership::Ownership::by_partition(config.kafka.partitioner, 1)
            }
        };
        let activity = Activity::new(
            config.serve.max_dirty_users,
            config.train.max_users_per_round,
        );
        // forgotten users whose recommendation a crash left unwithdrawn
        activity.forgotten(&store.withdrawals_pending()?);
        let control = match config.role {
            Role::All => None,
            Role::Serve | Role::Train => Some(Arc::new(crate::control::ControlKey::read(
                &config.models.signing_key_file,
            )?)),
        };
        Ok(Self {
            control,
            store: Arc::new(store),
            ownership: Arc::new(ownership),
            directory: Arc::new(crate::members::Directory::default()),
            metrics: Arc::new(metrics),
            live: Arc::new(LiveModelSlot::new()),
            activity: Arc::new(activity),
            items: Arc::new(crate::items::ItemRules::new(&config.items)),
            online: Arc::new(OnlineEval::new(config.serve.online_eval_users)),
            health: Arc::new(Health::default()),
            shutdown: Arc::new(Shutdown::default()),
            latencies: Arc::new(LatencySamples::new(100_000)),
            config,
        })
    }

    /// Runs every stage until shutdown (a signal, `shutdown.trigger()`, or a stage's failure).
    pub async fn run(self) -> Result<()> {
        if self.config.kafka.brokers.trim().is_empty() {
            bail!("kafka.brokers is empty: set it in the config file or MULTIVAED_KAFKA__BROKERS (or try `multivaed demo`)");
        }
        let (device, name) = open_device(self.config.device)?;
        self.metrics
            .device_info
            .with_label_values(&[&name])
            .set(1.0);
        info!(device = %name, "training device");
        crate::model::set_scoring(self.config.serve.scoring);
        info!(
            scoring = ?self.config.serve.scoring,
            int8_kernel = crate::model::int8_kernel().map_or("none", |k| k.name()),
            min_items_for_int8 = crate::model::INT8_MIN_ITEMS,
            "scoring"
        );
        let listener = tokio::net::TcpListener::bind(self.config.http.listen)
            .await
            .with_context(|| format!("http.listen: cannot bind {}", self.config.http.listen))?;
        info!(addr = %listener.local_addr()?, "HTTP listening");
        let producers = Arc::new(crate::kafka::Producers::new(&self.config.kafka)?);
        let auth = crate::http::Auth::prepare(&self.config.http, &self.config.data_dir)?;
        let mut stages = JoinSet::new();
        stage(&mut stages, "http", self.http(auth).serve(listener));
        // HTTP answers while the topics are checked (up to 10 s with the brokers away)
        let horizon = self.check_topics().await?;
        match self.config.role {
            Role::All => {
                let worker = crate::train::Worker::start(self.training(device, None))?;
                self.start_serving(&mut stages, &producers, horizon)?;
                stage(&mut stages, "train", worker.run_on_thread());
            }
            Role::Serve => {
                self.start_serving(&mut stages, &producers, horizon)?;
                self.start_fleet_serving(&mut stages)?;
            }
            Role::Train => self.start_fleet_training(&mut stages, device, horizon)?,
        }
        stage(
            &mut stages,
            "broker probe",
            self.probe().run(producers.clone()),
        );
        stage(&mut stages, "notify", self.notifier().run());
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = wait_for_signal() => info!("signal received: shutting down"),
                _ = shutdown.wait() => {}
            }
            shutdown.trigger();
        });
        let outcome = supervise(&self.shutdown, stages).await;
        self.store.flush()?;
        use rdkafka::producer::Producer;
        let _ = producers.get().flush(Duration::from_secs(5));
        self.metrics.up.set(0);
        self.log_summary();
        outcome
    }

    /// Checks that the role's topics exist (and, for a fleet role, are as it needs them);
    /// returns how long a local copy of a changelog partition may be away (a fleet role).
    async fn check_topics(&self) -> Result<crate::fleet::Horizon> {
        let checker = crate::kafka::checker(&self.config.kafka)?;
        let wanted: Vec<(&'static str, String)> = crate::topics::topics(&self.config)
            .into_iter()
            .filter(|t| !t.optional)
            .map(|t| (t.key, t.name))
            .collect();
        let clicks = self.config.kafka.clicks_topic.clone();
        let partitions = tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::Consumer;
            let watch = checker.client().context();
            // the client's errors reach its context when it is polled: polled before asking
            let refused = || {
                let _ = checker.poll(Duration::from_millis(200));
                watch.refused()
            };
            crate::kafka::check_topics(checker.client(), &wanted, &clicks, refused)
        })
        .await
        .context("cannot check the topics")??;
        debug!(?partitions, "topics checked");
        if self.config.role != Role::All {
            let n = partitions.with_context(|| format!("role {}: the cluster did not say how many partitions the clicks topic has; retry when it answers", self.config.role.name()))?;
            self.ownership.set_partitions(n);
            let retention = check_fleet_topics(&self.config).await?;
            return Ok(crate::fleet::Horizon::of(retention));
        }
        Ok(crate::fleet::Horizon::default())
    }

    /// Ingest, scoring and publishing (roles `all` and `serve`).
    fn start_serving(
        &self,
        stages: &mut JoinSet<(&'static str, Result<()>)>,
        producers: &Arc<crate::kafka::Producers>,
        horizon: crate::fleet::Horizon,
    ) -> Result<()> {
        let ingest = self.ingest(producers, horizon)?;
        let consumer = ingest.consumer()?;
        stage(stages, "ingest", ingest.run(consumer, producers.clone()));
        let items = crate::ingest::ItemsReader {
            kafka: self.config.kafka.clone(),
            topic: self.config.items.topic(&self.config.kafka),
            rules: self.items.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
        };
        stage(stages, "items", items.run());
        stage(stages, "serve", self.scorer().run(producers.clone()));
        Ok(())
    }

    /// Role `serve`: the other replicas' addresses, and the fleet's model versions (followed,
    /// downloaded, verified, swapped in).
    fn start_fleet_serving(&self, stages: &mut JoinSet<(&'static str, Result<()>)>) -> Result<()> {
        stage(
            stages,
            "members",
            crate::members::follow(
                self.config.kafka.clone(),
                self.config.kafka.members(),
                self.directory.clone(),
                crate::members::MemberCheck {
                    key: self.control_key()?,
                    pattern: self.advertise_pattern(),
                    refused: self.metrics.control_records_refused.clone(),
                },
                self.shutdown.clone(),
            ),
        );
        let follower = self.follow_models(stages)?;
        let reporter = crate::shipping::Reporter {
            kafka: self.config.kafka.clone(),
            topic: self.config.models.topic.clone(),
            reporter: format!("{}-{}", self.instance_id(), crate::wire::now_ms()),
            tally: self.online.tally(),
            follower: follower.clone(),
            interval: self.config.promotion.report_interval,
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
        };
        stage(stages, "canary evidence", reporter.run());
        let loader = crate::shipping::Loader {
            objects: crate::shipping::Objects::open(&self.config.models)?,
            downloads: self.downloads(),
            max_file_bytes: self.config.models.max_file_bytes,
            follower,
            store: self.store.clone(),
            live: self.live.clone(),
            metrics: self.metrics.clone(),
            retry: self.config.models.retry_interval,
            shutdown: self.shutdown.clone(),
        };
        stage(stages, "model loader", loader.run());
        Ok(())
    }

    /// Follows the models topic (roles `serve` and `train`).
    fn follow_models(
        &self,
        stages: &mut JoinSet<(&'static str, Result<()>)>,
    ) -> Result<Arc<crate::shipping::Follower>> {
        let follower = Arc::new(crate::shipping::Follower::new(
            self.control_key()?,
            self.metrics.control_records_refused.clone(),
        ));
        stage(
            stages,
            "models topic",
            crate::shipping::follow(
                self.config.kafka.clone(),
                self.config.models.topic.clone(),
                follower.clone(),
                self.shutdown.clone(),
            ),
        );
        Ok(follower)
    }

    /// The fleet's control-plane key (roles `serve` and `train`).
    fn control_key(&self) -> Result<Arc<crate::control::ControlKey>> {
        self.control
            .clone()
            .context("models.signing_key_file: no control-plane key was read")
    }

    /// `http.advertise_pattern`, or the one derived from this replica's own address.
    fn advertise_pattern(&self) -> String {
        let http = &self.config.http;
        if http.advertise_pattern.is_empty() {
            crate::members::default_pattern(&http.advertised())
        } else {
            http.advertise_pattern.clone()
        }
    }

    /// Where model versions are downloaded to (and verified) before they are loaded.
    fn downloads(&self) -> std::path::PathBuf {
        self.config.data_dir.join("downloads")
    }

    /// Role `train`: the changelog read into the store, the election, and the training worker
    /// shipping what it accepts.
    fn start_fleet_training(
        &self,
        stages: &mut JoinSet<(&'static str, Result<()>)>,
        device: Device,
        horizon: crate::fleet::Horizon,
    ) -> Result<()> {
        let reader = crate::fleet::ChangelogReader {
            kafka: self.config.kafka.clone(),
            horizon,
            store: self.store.clone(),
            activity: self.activity.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            shutdown: self.shutdown.clone(),
        };
        stage(stages, "changelog", reader.run());
        let follower = self.follow_models(stages)?;
        let election = Arc::new(crate::shipping::Election::default());
        let trainer_group = self.config.models.trainer_group(&self.config.kafka);
        let publisher = Arc::new(crate::shipping::Publisher::new(
            &self.config.kafka,
            &trainer_group,
        ));
        let elector = crate::shipping::Elector {
            kafka: self.config.kafka.clone(),
            group: trainer_group,
            topic: self.config.models.topic.clone(),
            id: self.instance_id(),
            election: election.clone(),
            follower: follower.clone(),
            publisher: publisher.clone(),
            health: self.health.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
        };
        stage(stages, "election", elector.run());
        let fleet = crate::shipping::FleetTrainer {
            id: self.instance_id(),
            topic: self.config.models.topic.clone(),
            objects: crate::shipping::Objects::open(&self.config.models)?,
            downloads: self.downloads(),
            max_file_bytes: self.config.models.max_file_bytes,
            follower,
            election,
            publisher,
            keep_announced_for: self.config.models.keep_announced_for,
            runtime: tokio::runtime::Handle::current(),
        };
        let worker = crate::train::Worker::start(self.training(device, Some(Box::new(fleet))))?;
        stage(stages, "train", worker.run_on_thread());
        Ok(())
    }

    fn log_summary(&self) {
        let ms = |q: f64| {
            self.latencies
                .quantile(q)
                .map(|s| s * 1000.0)
                .unwrap_or(f64::NAN)
        };
        info!(
            recommendations = self.latencies.count(),
            click_to_recommendation_p50_ms = ms(0.5),
            click_to_recommendation_p99_ms = ms(0.99),
            "stopped"
        );
    }

    fn ingest(
        &self,
        producers: &Arc<crate::kafka::Producers>,
        horizon: crate::fleet::Horizon,
    ) -> Result<crate::ingest::Ingest> {
        let key = self
            .control
            .clone()
            .filter(|_| self.config.role == Role::Serve);
        let partitions: Arc<dyn crate::ingest::Partitions> = match key {
            Some(key) => {
                let announcer = crate::members::Announcer {
                    topic: self.config.kafka.members(),
                    id: self.instance_id(),
                    http: self.config.http.advertised(),
                    producers: producers.clone(),
                    key,
                };
                let serve = &self.config.serve;
                crate::fleet::Replica::start(crate::fleet::ReplicaContext {
                    kafka: self.config.kafka.clone(),
                    announcer,
                    ownership: self.ownership.clone(),
                    store: self.store.clone(),
                    activity: self.activity.clone(),
                    shutdown: self.shutdown.clone(),
                    rescore_window: serve.rescore_window,
                    cleanup_delay: serve.state_cleanup_delay,
                    restore_timeout: serve.restore_timeout,
                    commit_interval: serve.changelog_commit_interval,
                    horizon,
                    transactions: self.metrics.changelog_transactions.clone(),
                    restore_records: self.metrics.restore_records.clone(),
                    changelog_seconds: self.metrics.click_stage.with_label_values(&["changelog"]),
                })?
            }
            None => Arc::new(crate::ingest::Standalone {
                kafka: self.config.kafka.clone(),
                store: self.store.clone(),
            }),
        };
        if self.config.kafka.positive_event_types.is_some() {
            warn!("kafka.positive_event_types is replaced by [events] types (with weights) and negative: its types count with weight 1, others are skipped");
        }
        Ok(crate::ingest::Ingest {
            kafka: self.config.kafka.clone(),
            event_types: self.config.event_types(),
            partitions,
            store: self.store.clone(),
            activity: self.activity.clone(),
            online: self.online.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            shutdown: self.shutdown.clone(),
        })
    }

    /// This replica's name in the group and on what it writes.
    fn instance_id(&self) -> String {
        self.config
            .kafka
            .group_instance_id(self.config.role)
            .unwrap_or_else(|| "multivaed".to_string())
    }

    fn probe(&self) -> crate::ingest::BrokerProbe {
        let group_id = match self.config.role {
            Role::Train => self.config.models.trainer_group(&self.config.kafka),
            _ => self.config.kafka.group_id.clone(),
        };
        crate::ingest::BrokerProbe {
            group_id,
            health: self.health.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    fn training(
        &self,
        device: Device,
        fleet: Option<Box<dyn crate::train::Fleet>>,
    ) -> crate::train::Training {
        crate::train::Training {
            train: self.config.train.clone(),
            model: self.config.model.clone(),
            models_dir: self.config.data_dir.join("models"),
            device,
            store: self.store.clone(),
            activity: self.activity.clone(),
            live: self.live.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            fleet,
            promotion: self.config.promotion.clone(),
            tally: self.online.tally(),
        }
    }

    fn scorer(&self) -> crate::serve::Scorer {
        crate::serve::Scorer {
            serve: self.config.serve.clone(),
            topic: self.config.kafka.recommendations_topic.clone(),
            store: self.store.clone(),
            ownership: self.ownership.clone(),
            owner_id: self.instance_id(),
            clicks_topic: self.config.kafka.clicks_topic.clone(),
            activity: self.activity.clone(),
            items: self.items.clone(),
            live: self.live.clone(),
            online: self.online.clone(),
            metrics: self.metrics.clone(),
            latencies: self.latencies.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    fn http(&self, auth: crate::http::Auth) -> crate::http::Http {
        crate::http::Http {
            auth: Arc::new(auth),
            default_k: self.config.serve.k,
            pulls: Arc::new(tokio::sync::Semaphore::new(
                self.config.http.max_concurrent_pulls,
            )),
            store: self.store.clone(),
            ownership: self.ownership.clone(),
            directory: self.directory.clone(),
            instance_id: self.instance_id(),
            live: self.live.clone(),
            activity: self.activity.clone(),
            items: self.items.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    fn notifier(&self) -> crate::notify::Notifier {
        crate::notify::Notifier {
            store: self.store.clone(),
            live: self.live.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

/// Roles `serve` and `train`: the changelog, members and models topics are compacted (a broker
/// that does not describe topic configs is not refused), the changelog has the clicks topic's
/// partitions and the others one.
async fn check_fleet_topics(config: &Config) -> Result<Option<Duration>> {
    let found = crate::topics::check(config).await?;
    if let Some(f) = found.iter().find(|f| f.problem.is_some()) {
        bail!(
            "{}: topic {:?}: {} (multivaed topics check lists them all)",
            f.topic.key,
            f.topic.name,
            f.problem.as_deref().unwrap_or_default()
        );
    }
    for f in found
        .iter()
        .filter(|f| f.topic.compact && f.policy.is_none())
    {
        warn!(topic = %f.topic.name, "the broker did not say the topic's cleanup.policy: it must be compact");
    }
    let absence = config.kafka.expected_absence;
    for f in found.iter().filter(|f| f.topic.compact) {
        if let Some(retention) = f.delete_retention.filter(|r| *r < absence) {
            warn!(
                topic = %f.topic.name,
                delete_retention = %humantime::format_duration(retention),
                expected_absence = %humantime::format_duration(absence),
                "the topic keeps a tombstone for less than kafka.expected_absence: a replica or trainer stopped longer restores such a partition from the beginning (raise delete.retention.ms)"
            );
        }
    }
    Ok(found
        .iter()
        .find(|f| f.topic.key == "kafka.changelog_topic")
        .and_then(|f| f.delete_retention))
}

/// Starts a stage as a task that reports its name with its end (a panic becomes an error).
fn stage(
    stages: &mut JoinSet<(&'static str, Result<()>)>,
    name: &'static str,
    run: impl Future<Output = Result<()>> + Send + 'static,
) {
    stages.spawn(async move {
        let result = match AssertUnwindSafe(run).catch_unwind().await {
            Ok(r) => r,
            Err(panic) => Err(anyhow!(
                "panicked: {}",
                crate::fault::panic_message(&*panic)
            )),
        };
        (name, result)
    });
}

/// Waits for every stage to end. A stage that fails, or ends before shutdown was asked for,
/// triggers shutdown; the first such failure is the daemon's result, naming the stage.
async fn supervise(
    shutdown: &Shutdown,
    mut stages: JoinSet<(&'static str, Result<()>)>,
) -> Result<()> {
    let mut failure: Option<anyhow::Error> = None;
    while let Some(joined) = stages.join_next().await {
        let (name, result) = match joined {
            Ok(ended) => ended,
            Err(e) => ("(unknown)", Err(anyhow!("task failed: {e}"))),
        };
        let err = match result {
            Ok(()) if shutdown.is_set() => {
                // one line per stage: a stop that hangs shows which stage it waits for
                info!(stage = name, "stage stopped");
                continue;
            }
            Ok(()) => anyhow!("stopped by itself"),
            Err(e) => e,
        };
        error!(stage = name, error = %format!("{err:#}"), "stage failed; shutting down");
        shutdown.trigger();
        failure.get_or_insert(err.context(format!("stage {name} failed")));
    }
    failure.map_or(Ok(()), Err)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_stage_stops_the_others_and_is_named() {
        let shutdown = Arc::new(Shutdown::default());
        let mut stages = JoinSet::new();
        let s = shutdown.clone();
        stage(&mut stages, "steady", async move {
            s.wait().await;
            Ok(())
        });
        stage(&mut stages, "flaky", async { Err(anyhow!("disk on fire")) });
        let err = tokio::time::timeout(Duration::from_secs(5), supervise(&shutdown, stages))
            .await
            .expect("supervision ends")
            .unwrap_err();
        assert!(shutdown.is_set());
        let msg = format!("{err:#}");
        assert!(
            msg.contains("stage flaky failed") && msg.contains("disk on fire"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn a_panicking_or_vanishing_stage_is_a_failure_too() {
        for (body, expect) in [(0, "panicked: boom"), (1, "stopped by itself")] {
            let shutdown = Arc::new(Shutdown::default());
            let mut stages = JoinSet::new();
            stage(&mut stages, "odd", async move {
                if body == 0 {
                    panic!("boom");
                }
                Ok(())
            });
            let err = supervise(&shutdown, stages).await.unwrap_err();
            assert!(format!("{err:#}").contains(expect), "{err:#}");
        }
    }

    #[tokio::test]
    async fn stages_that_end_after_shutdown_are_a_clean_stop() {
        let shutdown = Arc::new(Shutdown::default());
        let mut stages = JoinSet::new();
        for name in ["a", "b"] {
            let s = shutdown.clone();
            stage(&mut stages, name, async move {
                s.wait().await;
                Ok(())
            });
        }
        shutdown.trigger();
        supervise(&shutdown, stages).await.unwrap();
    }
}
