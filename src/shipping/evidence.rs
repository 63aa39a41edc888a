//! A serving replica's evidence reports: every `promotion.report_interval`, the counts its
//! scorer made for the running canary (trials and hits of the canary's slice and of the live
//! model on everyone else) go to the models topic, cumulative, under a key of its own
//! (`evidence-<version>-<instance>-<start>`), where the trainer that decides the canary reads
//! them. Compaction keeps each reporter's latest; a restarted replica reports under a new key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tracing::warn;

use super::log::{evidence_key, Record, Report};
use super::topic::{write, Follower};
use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::promotion::{Evidence, Tally};
use crate::shutdown::Shutdown;

/// What the reporter uses.
pub struct Reporter {
    pub kafka: KafkaConfig,
    pub topic: String,
    /// This process: its instance id and start time.
    pub reporter: String,
    pub tally: Arc<Tally>,
    pub follower: Arc<Follower>,
    pub interval: Duration,
    pub metrics: Arc<Metrics>,
    pub shutdown: Arc<Shutdown>,
}

impl Reporter {
    /// Reports until shutdown, and once more then.
    pub async fn run(self) -> Result<()> {
        let producer = crate::kafka::producer(&self.kafka)?;
        let mut stop = self.shutdown.subscribe();
        let mut sent: BTreeMap<u64, Evidence> = BTreeMap::new();
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(self.interval) => false,
                _ = stop.changed() => true,
            };
            self.report(&producer, &mut sent).await;
            if stopping {
                return Ok(());
            }
        }
    }

    /// Writes the running canary's counts when they changed since the last report.
    async fn report(
        &self,
        producer: &rdkafka::producer::FutureProducer,
        sent: &mut BTreeMap<u64, Evidence>,
    ) {
        let Some(version) = self.follower.with(|l| l.canary().map(|c| c.version)) else {
            return;
        };
        let evidence = self.tally.get(version);
        evidence.show_in(&self.metrics);
        if evidence == Evidence::default() || sent.get(&version) == Some(&evidence) {
            return;
        }
        let key = evidence_key(version, &self.reporter);
        let record = Record::Evidence(Report {
            reporter: self.reporter.clone(),
            version,
            evidence,
            at_unix_ms: crate::wire::now_ms(),
        });
        match write(
            producer,
            &self.topic,
            &key,
            Some(&record),
            self.follower.signer(),
        )
        .await
        {
            Ok(_) => {
                sent.insert(version, evidence);
                while sent.len() > 16 {
                    sent.pop_first();
                }
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), model_version = version, "cannot report the canary's evidence; trying again at the next report")
            }
        }
    }
}
