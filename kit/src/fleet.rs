//! A fleet under test: fresh names for every topic a fleet uses (clicks, changelog, members,
//! models, recommendations, dead letters), an object-store directory shared by its processes,
//! and the environment of a serving replica (`--role serve`) or a trainer (`--role train`) as
//! child processes, each with its own data directory and a 6 s Kafka session.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::harness::{brokers, try_create_topics_with, unique, Setup, COMPACTED};

pub struct Fleet {
    pub setup: Setup,
    pub changelog: String,
    pub members: String,
    pub models: String,
    /// The object store every process of the fleet shares (a directory, or a URL).
    pub store: String,
    pub partitions: i32,
}

impl Fleet {
    /// Fresh names; no topic created.
    pub fn named(dir: &Path, partitions: i32) -> Self {
        let setup = Setup::named(dir);
        Self {
            changelog: format!("{}.history", setup.clicks),
            members: format!("{}.members", setup.clicks),
            models: unique("models"),
            store: dir.join("object-store").display().to_string(),
            setup,
            partitions,
        }
    }

    /// Fresh names with every topic created on the test broker.
    pub fn new(dir: &Path, partitions: i32) -> Self {
        let f = Self::named(dir, partitions);
        if let Err(e) = f.create_on(&brokers()) {
            panic!("{e:#}");
        }
        f
    }

    /// Creates every topic of the fleet on the broker at `bootstrap`.
    pub fn create_on(&self, bootstrap: &str) -> Result<()> {
        self.create_with(bootstrap, self.partitions, COMPACTED, COMPACTED)
    }

    /// Creates every topic of the fleet on the broker at `bootstrap`, the changelog with
    /// `changelog_partitions` and the settings `changelog`, the members topic with `members`.
    pub fn create_with(
        &self,
        bootstrap: &str,
        changelog_partitions: i32,
        changelog: &[(&str, &str)],
        members: &[(&str, &str)],
    ) -> Result<()> {
        try_create_topics_with(
            bootstrap,
            &[
                (&self.setup.clicks, self.partitions, &[]),
                (&self.changelog, changelog_partitions, changelog),
                (&self.members, 1, members),
                (&self.models, 1, COMPACTED),
                (&self.setup.recs, 1, &[]),
                (&self.setup.dlq, 1, &[]),
            ],
        )
    }

    /// A process's own data directory, and a config file giving it a 6 s session.
    fn process_env(
        &self,
        bootstrap: &str,
        dir: &Path,
        name: &str,
        role: &str,
    ) -> Vec<(String, String)> {
        let data: PathBuf = dir.join(name);
        let config = dir.join(format!("{name}.toml"));
        let _ = std::fs::write(
            &config,
            "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
        );
        let mut env = self.setup.base_env(bootstrap);
        env.retain(|(k, _)| k != "MULTIVAED_DATA_DIR");
        env.extend(
            [
                ("MULTIVAED_CONFIG", config.display().to_string()),
                ("MULTIVAED_DATA_DIR", data.display().to_string()),
                ("MULTIVAED_ROLE", role.to_string()),
                ("MULTIVAED_KAFKA__INSTANCE_ID", name.to_string()),
                ("MULTIVAED_MODELS__TOPIC", self.models.clone()),
                ("MULTIVAED_MODELS__STORE", self.store.clone()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        env
    }

    /// Serving replica `name`: batches of 100, the production rebalancing (cooperative, a
    /// static member named `name`).
    pub fn replica_env(&self, dir: &Path, name: &str) -> Vec<(String, String)> {
        self.replica_env_on(&brokers(), dir, name)
    }

    /// As [`Fleet::replica_env`], on the broker at `bootstrap`.
    pub fn replica_env_on(&self, bootstrap: &str, dir: &Path, name: &str) -> Vec<(String, String)> {
        let mut env = self.process_env(bootstrap, dir, name, "serve");
        env.push(("MULTIVAED_KAFKA__BATCH_SIZE".into(), "100".into()));
        env
    }

    /// Trainer `name`: a small, fast model, a round every 3 s (or 1,000 new interactions) of 3
    /// epochs, validated on up to 100 users (at least 10).
    pub fn trainer_env(&self, dir: &Path, name: &str) -> Vec<(String, String)> {
        self.trainer_env_on(&brokers(), dir, name)
    }

    /// As [`Fleet::trainer_env`], on the broker at `bootstrap`.
    pub fn trainer_env_on(&self, bootstrap: &str, dir: &Path, name: &str) -> Vec<(String, String)> {
        let mut env = self.process_env(bootstrap, dir, name, "train");
        env.extend(
            [
                ("MULTIVAED_TRAIN__INTERVAL", "3s"),
                ("MULTIVAED_TRAIN__MIN_NEW_EVENTS", "1000"),
                ("MULTIVAED_TRAIN__MIN_USERS", "100"),
                ("MULTIVAED_TRAIN__MAX_EPOCHS_PER_ROUND", "3"),
                ("MULTIVAED_TRAIN__CATCH_UP", "false"),
                ("MULTIVAED_TRAIN__MIN_NEW_FRACTION", "1000"),
                ("MULTIVAED_TRAIN__VALIDATION_USERS", "100"),
                ("MULTIVAED_TRAIN__MIN_VALIDATION_USERS", "10"),
                ("MULTIVAED_TRAIN__MAX_NDCG_DROP", "1.0"),
                ("MULTIVAED_MODEL__MLP_HIDDEN_SIZE", "[64]"),
                ("MULTIVAED_MODEL__LATENT_DIMENSION", "16"),
                ("MULTIVAED_MODEL__BATCH_SIZE", "100"),
                ("MULTIVAED_MODEL__TOTAL_ANNEAL_STEPS", "200"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        env
    }
}
