//! `Config`: one TOML file (`configs/multivaed.toml` documents every key and its default), with
//! `MULTIVAED_*` environment overrides (`__` separates sections: `MULTIVAED_KAFKA__BROKERS`;
//! `MULTIVAED_KAFKA__PROPERTIES__SASL_PASSWORD` sets the librdkafka property `sasl.password`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::model::ModelConfig;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// What this process does: `all` (everything, one process), `serve` (one of N replicas
    /// of a consumer group, owning the users of its partitions, serving the fleet's model) or
    /// `train` (the fleet's trainer: one active, a standby may wait).
    pub role: Role,
    /// Where the store and model versions live.
    pub data_dir: PathBuf,
    /// Training device: "auto", "cpu" or "cuda:N".
    pub device: DeviceChoice,
    pub kafka: KafkaConfig,
    pub store: StoreConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub serve: ServeConfig,
    pub http: HttpConfig,
    pub models: ModelsConfig,
    pub items: ItemsConfig,
    pub events: EventsConfig,
    pub promotion: PromotionConfig,
}

/// Live-gated promotion: a validated version first scores a canary slice of the users; the
/// trainer promotes it when its live hit rate holds up against the live model's and rolls it
/// back when it does not (docs/promotion.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromotionConfig {
    /// Off: every accepted version goes live at once.
    pub enabled: bool,
    /// The share of the users a canary scores (a hash of the user's id and the version).
    pub canary_fraction: f64,
    /// Error rate of each decision (promoting a canary worse by more than the margin, rolling
    /// back one that is not).
    pub alpha: f64,
    /// The relative drop of the hit rate at 10 still taken as "no worse" (0.05: 5 %).
    pub margin: f64,
    /// Clicks each side (canary slice, everyone else) needs before any decision.
    pub min_trials: u64,
    /// Hits both sides together need before any decision.
    pub min_hits: u64,
    /// A canary undecided this long is rolled back.
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
    /// How often a serving replica reports its counts to the models topic.
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
}

impl Default for PromotionConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            canary_fraction: 0.1,
            alpha: 0.05,
            margin: 0.05,
            min_trials: 200,
            min_hits: 20,
            max_duration: Duration::from_secs(3600),
            report_interval: Duration::from_secs(5),
        }
    }
}

/// What a process does (`multivaed run --role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Ingest, store, train, score, publish: the whole daemon in one process.
    #[default]
    All,
    /// A serving replica: owns the users of its partitions (their state restored from the
    /// changelog topic), scores and publishes for them, answers pulls for them; trains nothing:
    /// it serves the model versions the trainer announces (popularity until the first).
    Serve,
    /// The fleet's trainer: reads every user's history from the changelog topic, trains while
    /// it is the active trainer (elected through a consumer group) and ships each accepted
    /// version through the object store and the models topic.
    Train,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Serve => "serve",
            Role::Train => "train",
        }
    }
}

/// A serving replica's rebalance protocol (`kafka.rebalance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rebalance {
    #[default]
    Cooperative,
    Eager,
}

impl Rebalance {
    /// The librdkafka assignors.
    pub fn strategy(self) -> &'static str {
        match self {
            Rebalance::Cooperative => "cooperative-sticky",
            Rebalance::Eager => "range,roundrobin",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    pub group_id: String,
    pub clicks_topic: String,
    pub recommendations_topic: String,
    pub dead_letter_topic: String,
    /// The compacted changelog of user histories (role `serve`); empty: `<clicks_topic>.history`.
    pub changelog_topic: String,
    /// The compacted, one-partition topic where serving replicas announce their HTTP address
    /// and partitions (pull routing); empty: `<clicks_topic>.members`.
    pub members_topic: String,
    /// The partitioner the producers of clicks use (`consistent_random`: librdkafka's default;
    /// `murmur2_random`: the Java client's): a user's owner is found through it.
    pub partitioner: crate::partition::Partitioner,
    /// This replica's stable name in the consumer group (`group.instance.id`, static
    /// membership: a replica restarted within the session timeout keeps its partitions); empty:
    /// the `HOSTNAME` variable (the pod name on Kubernetes) for role `serve`, none for `all`.
    pub instance_id: String,
    /// How a serving replica's group rebalances: `cooperative` (incremental: only the
    /// partitions that move stop) or `eager` (every member gives up everything, then restores
    /// from its local changelog position).
    pub rebalance: Rebalance,
    /// Role `serve`: join the group as a static member under the instance id, so a replica
    /// restarted within the session timeout gets its partitions back without a rebalance.
    pub static_membership: bool,
    /// Replaced by `[events] types`: when given, these types count with weight 1 and other
    /// types are skipped, as before (a warning says so).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub positive_event_types: Option<Vec<String>>,
    /// Messages larger than this are dead-lettered unparsed.
    pub max_message_bytes: usize,
    /// Messages per ingest batch (one store write, one offset commit).
    pub batch_size: usize,
    /// Longest wait to fill a batch.
    #[serde(with = "humantime_serde")]
    pub batch_timeout: Duration,
    /// Roles `serve` and `train`: the longest a replica or trainer is expected to be stopped. A
    /// compacted topic's `delete.retention.ms` below it is warned about at start (a process away
    /// longer may never read a forgotten user's tombstone); `topics create` sets it to this.
    #[serde(with = "humantime_serde")]
    pub expected_absence: Duration,
    /// Extra librdkafka properties for every client (SASL/SSL, timeouts, …).
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Items kept per user (the most recent).
    pub max_history: usize,
    /// sled's page cache, in MiB (sled's own default is 1 GiB).
    pub cache_mb: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Start a fine-tuning round at least this often (when there is new data).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// … or as soon as this many new interactions arrived …
    pub min_new_events: u64,
    /// … or as soon as the new interactions reach this share of those the last round read (a
    /// growing site is retrained while it grows).
    #[serde(deserialize_with = "crate::model::number")]
    pub min_new_fraction: f64,
    /// A round trains until its validation NDCG@100 (or, with too few validation users, its
    /// training loss) has not improved for `patience` epochs, keeping the best epoch, and for
    /// at most this many epochs (`epochs_per_round` is its older name).
    #[serde(alias = "epochs_per_round")]
    pub max_epochs_per_round: usize,
    pub patience: usize,
    /// A round that stopped at `max_epochs_per_round` while still improving is followed at
    /// once by another (at the training threads' low priority), new data or not.
    pub catch_up: bool,
    /// Users needed before the first model is trained.
    pub min_users: usize,
    /// Validation users evaluated, at most: a share of the users chosen by hash for life (sized
    /// from the users stored), each with a fifth of their items held out of training for life.
    pub validation_users: usize,
    /// Validation users needed before NDCG decides anything (beating popularity, not falling
    /// below the live model); with fewer, only the loss floor (better than a uniform guess) is
    /// checked.
    pub min_validation_users: usize,
    /// Users trained on per round, at most: those active since the last round first, then a
    /// uniform sample of the rest (new each round). Bounds a round's memory and duration.
    pub max_users_per_round: usize,
    /// A new model is rejected when its validation NDCG@100 is lower than the live one's by more.
    #[serde(deserialize_with = "crate::model::number")]
    pub max_ndcg_drop: f64,
    /// Model versions kept on disk.
    pub keep_versions: usize,
    /// A round running longer is abandoned.
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
    /// Seed of initialisation, shuffling, dropout and ε.
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Shortest time between the starts of two scoring batches (the scorer wakes as soon as a
    /// user is waiting; users arriving meanwhile share the next batch).
    pub interval_ms: u64,
    /// Users scored per batch, at most.
    pub batch_size: usize,
    /// Items per recommendation.
    pub k: usize,
    /// After a model swap, users active this recently are re-scored.
    #[serde(with = "humantime_serde")]
    pub rescore_window: Duration,
    /// Re-scorings after a swap, at most this many users a second (clicks are never held to
    /// it), so they take a bounded share of the cores from consuming and scoring fresh clicks.
    pub max_rescores_per_second: u32,
    /// Users waiting to be scored, at most (the oldest are dropped past it).
    pub max_dirty_users: usize,
    /// Users whose last recommendation is kept for the online hit rate, at most (the least
    /// recently recommended are forgotten): ~0.5 KB each.
    pub online_eval_users: usize,
    /// Role `serve`: a partition revoked this long ago and not assigned back has its local copy
    /// deleted (Kafka Streams' `state.cleanup.delay.ms`): a quick bounce keeps a warm copy,
    /// nothing stale lives on.
    #[serde(with = "humantime_serde")]
    pub state_cleanup_delay: Duration,
    /// Role `serve`: the longest one partition's restore from the changelog may take; past it
    /// the restore fails with an error (the replica stops, to be restarted).
    #[serde(with = "humantime_serde")]
    pub restore_timeout: Duration,
    /// Role `serve`: the shortest time between two changelog transactions (Kafka Streams'
    /// `commit.interval.ms` under exactly-once). Each costs the broker a transaction log write
    /// and a marker per partition whatever it carries, so batches stored meanwhile share one; a
    /// click's recommendation never waits for it. A crash re-consumes at most this much.
    #[serde(with = "humantime_serde")]
    pub changelog_commit_interval: Duration,
    /// How the catalogue is scored: `int8` (a reduced-precision candidate pass where the CPU has
    /// AVX-512 VNNI or AVX2 and the catalogue is large enough to gain from it, then the
    /// candidates re-ranked exactly) or `exact` (every item in fp32).
    pub scoring: crate::model::Scoring,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Role `serve`: the address other replicas redirect pulls for this replica's users to;
    /// empty: `http://<listen>`, with `HOSTNAME` for an unspecified listen address (0.0.0.0).
    pub advertise: String,
    /// Pull requests scored at once, at most; past it a pull gets 429 with `Retry-After`, so
    /// pulls never take more than this many cores from push scoring.
    pub max_concurrent_pulls: usize,
    /// Who may use the `/v1/` API: `token` (a bearer token of `token_file`) or `none` (anyone
    /// who reaches `listen`; a warning at start). `/metrics`, `/healthz`, `/readyz` stay open.
    pub auth: HttpAuth,
    /// The API's bearer tokens, one per line (at least 16 characters each; `#` comments), read
    /// again when the file changes; empty: `<data_dir>/api-token`, generated at first start.
    pub token_file: PathBuf,
    /// Role `serve`: the addresses other replicas may advertise (`*` stands for any run of
    /// characters but `/`, `@`, `?`, `#`); a members record advertising another is ignored and
    /// counted. Empty: this replica's own advertised address with its host's first label
    /// (a DNS name: `http://*.multivaed-serve.ns.svc.cluster.local:9464`) or its port (an IP
    /// address: `http://127.0.0.1:*`) as the wildcard.
    pub advertise_pattern: String,
}

/// `http.auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpAuth {
    #[default]
    Token,
    None,
}

/// What each `event_type` of the clicks topic means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Positive types and their weights (> 0), e.g. `view = 0.5, click = 1, purchase = 3`. An
    /// event without a type is a `click`. A user's weight for an item is the largest of its
    /// events' (a repeat changes nothing); the model reads it only with `model.input =
    /// "weighted"`.
    pub types: BTreeMap<String, f64>,
    /// Types that take the item out of the user's history and never recommend it to them again,
    /// until a later positive event for it.
    pub negative: Vec<String>,
    /// A type in neither list: `dead_letter` (the default) or `ignore` (skipped and counted).
    pub unknown: UnknownTypes,
}

/// What becomes of an event whose type is not configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownTypes {
    #[default]
    DeadLetter,
    Ignore,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            types: BTreeMap::from([("click".into(), 1.0)]),
            negative: ["dislike", "hide", "not_interested"]
                .map(String::from)
                .to_vec(),
            unknown: UnknownTypes::DeadLetter,
        }
    }
}

impl EventsConfig {
    fn validate(&self) -> Result<()> {
        for (t, &w) in &self.types {
            if !(w > 0.0 && w.is_finite() && w <= 1e6) {
                bail!("invalid configuration: events.types.{t}: a weight must be in (0, 1e6], got {w}");
            }
        }
        for t in self.types.keys().chain(&self.negative) {
            if t == crate::wire::FORGET_TYPE {
                bail!("invalid configuration: events: \"forget\" always forgets the user; it cannot be a positive or negative type");
            }
        }
        if let Some(t) = self.negative.iter().find(|t| self.types.contains_key(*t)) {
            bail!("invalid configuration: events: {t:?} is both positive (events.types) and negative (events.negative)");
        }
        Ok(())
    }
}

/// Which items may be recommended (roles `all` and `serve`): the items topic, and the
/// operator's lists.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ItemsConfig {
    /// The compacted topic of item availability and categories, keyed by item id; empty:
    /// `<kafka.clicks_topic>.items`. Optional: without it every item may be recommended (it is
    /// followed once it exists).
    pub topic: String,
    /// Item ids never recommended.
    pub deny: Vec<String>,
    /// When not empty, only these item ids are recommended.
    pub allow: Vec<String>,
}

impl ItemsConfig {
    /// The items topic's name.
    pub fn topic(&self, kafka: &KafkaConfig) -> String {
        kafka.named_or_derived(&self.topic, "items")
    }
}

/// How a fleet's model versions travel (roles `serve` and `train`): the files through an object
/// store, a small announcement of each through a compacted, one-partition Kafka topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// The models topic (compacted, one partition).
    pub topic: String,
    /// Where versions' files live: a directory (a volume every pod mounts) or a URL:
    /// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`, `file:///dir`.
    /// Credentials come from the usual environment variables (`AWS_ACCESS_KEY_ID`, …).
    pub store: String,
    /// Options of the object store (the `object_store` crate's keys, e.g. `aws_endpoint`,
    /// `aws_region`, `aws_allow_http`); they win over the environment.
    pub options: BTreeMap<String, String>,
    /// The consumer group that elects the active trainer; empty: `<kafka.group_id>.trainer`.
    pub trainer_group: String,
    /// A serving replica that could not load an announced version tries it again after this.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// A version announced more recently than this is never pruned (besides the
    /// `train.keep_versions` newest and the current one).
    #[serde(with = "humantime_serde")]
    pub keep_announced_for: Duration,
    /// The fleet's control-plane key (a file of at least 32 bytes): every models- and
    /// members-topic record is signed with it, and one without a valid signature is ignored.
    pub signing_key_file: PathBuf,
    /// A version whose announced file is larger is refused before any byte is read.
    pub max_file_bytes: u64,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            topic: "multivaed.models".into(),
            store: "multivaed-models".into(),
            options: BTreeMap::new(),
            trainer_group: String::new(),
            retry_interval: Duration::from_secs(30),
            keep_announced_for: Duration::from_secs(3600),
            signing_key_file: PathBuf::new(),
            max_file_bytes: 8 << 30,
        }
    }
}

impl ModelsConfig {
    /// The trainer election's consumer group.
    pub fn trainer_group(&self, kafka: &KafkaConfig) -> String {
        if self.trainer_group.is_empty() {
            format!("{}.trainer", kafka.group_id)
        } else {
            self.trainer_group.clone()
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            role: Role::All,
            data_dir: PathBuf::from("multivaed-data"),
            device: DeviceChoice::Auto,
            kafka: KafkaConfig::default(),
            store: StoreConfig::default(),
            model: ModelConfig::default(),
            train: TrainConfig::default(),
            serve: ServeConfig::default(),
            http: HttpConfig::default(),
            models: ModelsConfig::default(),
            items: ItemsConfig::default(),
            events: EventsConfig::default(),
            promotion: PromotionConfig::default(),
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            group_id: "multivaed".into(),
            clicks_topic: "clicks".into(),
            recommendations_topic: "recommendations".into(),
            dead_letter_topic: "clicks-dead-letter".into(),
            changelog_topic: String::new(),
            members_topic: String::new(),
            partitioner: Default::default(),
            instance_id: String::new(),
            rebalance: Rebalance::Cooperative,
            static_membership: true,
            positive_event_types: None,
            max_message_bytes: 64 * 1024,
            batch_size: 2000,
            batch_timeout: Duration::from_millis(5),
            expected_absence: Duration::from_secs(7 * 24 * 3600),
            properties: BTreeMap::new(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_history: 500,
            cache_mb: 128,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(300),
            min_new_events: 50_000,
            min_new_fraction: 0.1,
            max_epochs_per_round: 200,
            patience: 10,
            catch_up: true,
            min_users: 50,
            validation_users: 500,
            min_validation_users: 50,
            max_users_per_round: 100_000,
            max_ndcg_drop: 0.02,
            keep_versions: 5,
            max_duration: Duration::from_secs(1800),
            seed: 1,
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            interval_ms: 5,
            batch_size: 1000,
            k: 20,
            rescore_window: Duration::from_secs(3600),
            max_rescores_per_second: 500,
            max_dirty_users: 1_000_000,
            online_eval_users: 100_000,
            state_cleanup_delay: Duration::from_secs(600),
            restore_timeout: Duration::from_secs(1800),
            changelog_commit_interval: Duration::from_millis(100),
            scoring: crate::model::Scoring::Int8,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            advertise: String::new(),
            max_concurrent_pulls: 2,
            auth: HttpAuth::Token,
            token_file: PathBuf::new(),
            advertise_pattern: String::new(),
        }
    }
}

/// `MULTIVAED_KAFKA__PROPERTIES__SASL_PASSWORD=…` sets the librdkafka property `sasl.password`.
const PROPERTY_ENV: &str = "kafka__properties__";

/// What follows `KAFKA__PROPERTIES__` (in any case) in a variable name without `MULTIVAED_`.
fn property_suffix(name: &str) -> Option<&str> {
    name.get(..PROPERTY_ENV.len())
        .filter(|p| p.eq_ignore_ascii_case(PROPERTY_ENV))
        .map(|_| &name[PROPERTY_ENV.len()..])
}

/// librdkafka properties from the environment: after `MULTIVAED_KAFKA__PROPERTIES__`, the name
/// in any case with `_` for `.` (`FETCH_WAIT_MAX_MS` → `fetch.wait.max.ms`).
fn kafka_properties_from_env(
    vars: impl Iterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    vars.filter_map(|(k, v)| {
        let name = property_suffix(k.strip_prefix("MULTIVAED_")?)?;
        (!name.is_empty()).then(|| (name.to_ascii_lowercase().replace('_', "."), v))
    })
    .collect()
}

impl HttpConfig {
    /// The address announced to the other replicas.
    pub fn advertised(&self) -> String {
        if !self.advertise.is_empty() {
            return self.advertise.trim_end_matches('/').to_string();
        }
        let host = if self.listen.ip().is_unspecified() {
            std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into())
        } else {
            self.listen.ip().to_string()
        };
        format!("http://{host}:{}", self.listen.port())
    }
}

impl KafkaConfig {
    /// The changelog topic's name.
    pub fn changelog(&self) -> String {
        self.named_or_derived(&self.changelog_topic, "history")
    }

    /// The members topic's name.
    pub fn members(&self) -> String {
        self.named_or_derived(&self.members_topic, "members")
    }

    /// A topic's configured `name`, or when it is empty `<clicks_topic>.<suffix>`.
    fn named_or_derived(&self, name: &str, suffix: &str) -> String {
        if name.is_empty() {
            format!("{}.{suffix}", self.clicks_topic)
        } else {
            name.to_string()
        }
    }

    /// The consumer group's instance id for `role`, if any (static membership).
    pub fn group_instance_id(&self, role: Role) -> Option<String> {
        if !self.instance_id.is_empty() {
            return Some(self.instance_id.clone());
        }
        match role {
            Role::All => None,
            Role::Serve | Role::Train => std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()),
        }
    }
}

/// librdkafka properties multivaed sets itself, and the setting to use instead.
const OWN_PROPERTIES: [(&str, &str); 3] = [
    (
        "partition.assignment.strategy",
        "none (multivaed chooses the assignor its rebalance handling is written for)",
    ),
    ("group.instance.id", "kafka.instance_id"),
    ("partitioner", "kafka.partitioner"),
];

impl Config {
    /// The parser's reading of `event_type`, from `[events]` (or the older
    /// `kafka.positive_event_types`: those types with weight 1, others skipped).
    pub fn event_types(&self) -> crate::wire::EventTypes {
        if let Some(old) = &self.kafka.positive_event_types {
            return crate::wire::EventTypes {
                weights: old.iter().map(|t| (t.clone(), 1.0)).collect(),
                negative: Vec::new(),
                ignore_unknown: true,
            };
        }
        crate::wire::EventTypes {
            weights: self
                .events
                .types
                .iter()
                .map(|(t, &w)| (t.clone(), w as f32))
                .collect(),
            negative: self.events.negative.clone(),
            ignore_unknown: self.events.unknown == UnknownTypes::Ignore,
        }
    }

    /// Defaults, then the TOML file (when given), then `MULTIVAED_*` variables.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(p) = path {
            if !p.exists() {
                bail!("config file {} does not exist", p.display());
            }
            fig = fig.merge(Toml::file(p));
        }
        // not configuration: MULTIVAED_CONFIG names the file (clap), MULTIVAED_CRASH_AT,
        // MULTIVAED_PANIC_AT, MULTIVAED_STOP_AT, MULTIVAED_DELAY_AT and MULTIVAED_SCRAMBLE_AT are
        // the fault-injection hooks, MULTIVAED_TOOLS is where the project's scripts install the
        // test tools
        fig = fig.merge(
            Env::prefixed("MULTIVAED_")
                .ignore(&[
                    "config",
                    "crash_at",
                    "panic_at",
                    "stop_at",
                    "delay_at",
                    "scramble_at",
                    "tools",
                ])
                .filter(|k| property_suffix(k.as_str()).is_none())
                .split("__"),
        );
        // librdkafka property names have dots, which figment would take as nesting
        let properties = kafka_properties_from_env(std::env::vars());
        if !properties.is_empty() {
            fig = fig.merge(Serialized::default("kafka.properties", properties));
        }
        let config: Config = fig.extract().map_err(|e| {
            let mut msg = String::from("invalid configuration");
            for err in e {
                msg.push_str(&format!("\n  {err}"));
            }
            anyhow::anyhow!(msg)
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values serde cannot, naming the key.
    pub fn validate(&self) -> Result<()> {
        self.model
            .validate()
            .map_err(|e| anyhow::anyhow!("model.{e}"))?;
        self.events.validate()?;
        let checks: [(bool, &str); 22] = [
            (
                self.kafka.batch_size > 0,
                "kafka.batch_size: must be at least 1",
            ),
            (
                self.kafka.max_message_bytes > 0,
                "kafka.max_message_bytes: must be at least 1",
            ),
            (
                !self.kafka.clicks_topic.is_empty(),
                "kafka.clicks_topic: must not be empty",
            ),
            (
                self.store.max_history > 0,
                "store.max_history: must be at least 1",
            ),
            (
                self.train.max_users_per_round > 0,
                "train.max_users_per_round: must be at least 1",
            ),
            (
                self.train.keep_versions > 0,
                "train.keep_versions: must be at least 1",
            ),
            (self.serve.k > 0, "serve.k: must be at least 1"),
            (
                self.serve.changelog_commit_interval <= Duration::from_secs(10),
                "serve.changelog_commit_interval: must be at most 10s (a crash re-consumes what it held back)",
            ),
            (
                self.serve.batch_size > 0,
                "serve.batch_size: must be at least 1",
            ),
            (
                self.serve.max_rescores_per_second > 0,
                "serve.max_rescores_per_second: must be at least 1 (rescore_window = \"0s\" turns re-scoring off)",
            ),
            (
                self.train.max_ndcg_drop >= 0.0,
                "train.max_ndcg_drop: must be >= 0",
            ),
            (
                self.train.validation_users > 0,
                "train.validation_users: must be at least 1 (without validation users no model can be judged)",
            ),
            (
                (1..=self.train.validation_users).contains(&self.train.min_validation_users),
                "train.min_validation_users: must be between 1 and train.validation_users",
            ),
            (
                self.http.max_concurrent_pulls > 0,
                "http.max_concurrent_pulls: must be at least 1",
            ),
            (
                self.train.min_new_events > 0,
                "train.min_new_events: must be at least 1",
            ),
            (
                self.train.min_new_fraction > 0.0 && self.train.min_new_fraction.is_finite(),
                "train.min_new_fraction: must be a number above 0",
            ),
            (
                self.train.max_epochs_per_round > 0,
                "train.max_epochs_per_round: must be at least 1",
            ),
            (self.train.patience > 0, "train.patience: must be at least 1"),
            (
                self.promotion.canary_fraction > 0.0 && self.promotion.canary_fraction <= 0.5,
                "promotion.canary_fraction: must be in (0, 0.5]",
            ),
            (
                self.promotion.alpha > 0.0 && self.promotion.alpha < 0.5,
                "promotion.alpha: must be in (0, 0.5)",
            ),
            (
                (0.0..1.0).contains(&self.promotion.margin),
                "promotion.margin: must be in [0, 1)",
            ),
            (
                !self.promotion.report_interval.is_zero() && !self.promotion.max_duration.is_zero(),
                "promotion.report_interval and promotion.max_duration: must be above 0",
            ),
        ];
        for (ok, msg) in checks {
            if !ok {
                bail!("invalid configuration: {msg}");
            }
        }
        for (name, instead) in OWN_PROPERTIES {
            if self.kafka.properties.contains_key(name) {
                bail!(
                    "invalid configuration: kafka.properties.{name} cannot be set; use {instead}"
                );
            }
        }
        if self.role != Role::All && self.kafka.group_instance_id(self.role).is_none() {
            bail!("invalid configuration: role {} needs kafka.instance_id (or HOSTNAME): a stable name per replica", self.role.name());
        }
        if self.role != Role::All && self.models.signing_key_file.as_os_str().is_empty() {
            bail!(
                "invalid configuration: models.signing_key_file: role {} needs the fleet's control-plane key (a file of at least 32 random bytes every process of the fleet reads, e.g. a Kubernetes Secret)",
                self.role.name()
            );
        }
        if self.role != Role::All && (self.models.topic.is_empty() || self.models.store.is_empty())
        {
            bail!(
                "invalid configuration: models.topic and models.store: role {} needs both",
                self.role.name()
            );
        }
        Ok(())
    }
}

/// The training device a `device` setting asks for: "auto", "cpu" or "cuda:N" (parsed once,
/// where the configuration is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "expected \"auto\", \"cpu\" or \"cuda:N\", got {s:?}"
                )),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_without_validation_users_or_a_round_on_no_news_is_refused() {
        type Tweak = fn(&mut Config);
        let cases: [(Tweak, &str); 6] = [
            (
                |c: &mut Config| c.train.validation_users = 0,
                "train.validation_users",
            ),
            (
                |c: &mut Config| c.train.min_validation_users = 0,
                "train.min_validation_users",
            ),
            (
                |c: &mut Config| c.train.min_validation_users = c.train.validation_users + 1,
                "train.min_validation_users",
            ),
            (
                |c: &mut Config| c.train.min_new_events = 0,
                "train.min_new_events",
            ),
            (
                |c: &mut Config| c.http.max_concurrent_pulls = 0,
                "http.max_concurrent_pulls",
            ),
            (
                |c: &mut Config| c.serve.changelog_commit_interval = Duration::from_secs(11),
                "serve.changelog_commit_interval",
            ),
        ];
        for (tweak, key) in cases {
            let mut c = Config::default();
            tweak(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail returns its own error type
    fn the_scripts_and_fault_hook_variables_are_not_configuration() {
        figment::Jail::expect_with(|jail| {
            for k in [
                "MULTIVAED_TOOLS",
                "MULTIVAED_CRASH_AT",
                "MULTIVAED_PANIC_AT",
                "MULTIVAED_STOP_AT",
                "MULTIVAED_DELAY_AT",
                "MULTIVAED_SCRAMBLE_AT",
            ] {
                jail.set_env(k, "x");
            }
            Config::load(None).map_err(|e| format!("{e:#}"))?;
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail returns its own error type
    fn kafka_properties_come_from_the_environment_with_dots() {
        figment::Jail::expect_with(|jail| {
            let p = jail.directory().join("c.toml");
            std::fs::write(
                &p,
                "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n",
            )
            .map_err(|e| e.to_string())?;
            jail.set_env("MULTIVAED_KAFKA__PROPERTIES__FETCH_WAIT_MAX_MS", "250");
            jail.set_env("MULTIVAED_KAFKA__PROPERTIES__sasl_password", "s3cret");
            jail.set_env("MULTIVAED_KAFKA__BROKERS", "b1:9092");
            let c = Config::load(Some(&p)).map_err(|e| format!("{e:#}"))?;
            assert_eq!(c.kafka.brokers, "b1:9092");
            let props: Vec<(&str, &str)> = c
                .kafka
                .properties
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(
                props,
                vec![
                    ("fetch.wait.max.ms", "250"),
                    ("sasl.password", "s3cret"),
                    ("security.protocol", "SASL_SSL"),
                ]
            );
            Ok(())
        });
    }

    #[test]
    fn the_shipped_file_is_the_defaults() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/multivaed.toml");
        let text = std::fs::read_to_string(&shipped).unwrap();
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn bad_values_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[serve]\nk = \"many\"\n").unwrap();
        let e = format!("{:#}", Config::load(Some(&p)).unwrap_err());
        assert!(e.contains("serve.k"), "{e}");
        std::fs::write(&p, "[train]\nkeep_versions = 0\n").unwrap();
        let e = format!("{:#}", Config::load(Some(&p)).unwrap_err());
        assert!(e.contains("train.keep_versions"), "{e}");
        std::fs::write(&p, "[kafka]\nbrokerz = \"x\"\n").unwrap();
        let e = format!("{:#}", Config::load(Some(&p)).unwrap_err());
        assert!(e.contains("brokerz"), "{e}");
        std::fs::write(&p, "device = \"tpu\"\n").unwrap();
        assert!(format!("{:#}", Config::load(Some(&p)).unwrap_err()).contains("device"));
        std::fs::write(&p, "[train]\ninterval = \"10s\"\n[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n").unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.train.interval, Duration::from_secs(10));
        assert_eq!(c.kafka.properties["security.protocol"], "SASL_SSL");
        // floats in exponent form arrive from the environment as strings
        std::fs::write(
            &p,
            "[model]\nlearning_rate = \"1e-4\"\n[train]\nmax_ndcg_drop = \"5e-2\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.model.learning_rate, 1e-4);
        assert_eq!(c.train.max_ndcg_drop, 5e-2);
        std::fs::write(&p, "[model]\nlearning_rate = \"fast\"\n").unwrap();
        let e = format!("{:#}", Config::load(Some(&p)).unwrap_err());
        assert!(e.contains("learning_rate") && e.contains("fast"), "{e}");
    }
}
