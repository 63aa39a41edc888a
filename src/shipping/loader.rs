//! A serving replica's side: whenever the models topic's current version changes, download its
//! weights and item table, check each against the announcement's size and SHA-256, load, map its
//! columns onto the store's items and swap it into the live slot (scoring never waits: it reads
//! whatever the slot holds). A file that is missing, truncated or not what was announced is
//! refused: the replica keeps serving what it has, counts the failure, and tries again after
//! `models.retry_interval`. A canary version is loaded beside the live one (it scores its
//! slice); once promoted it becomes the live model without a second download.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tracing::{info, warn};

use super::log::Announcement;
use super::objects::Objects;
use super::topic::Follower;
use crate::live::{ColumnMap, LiveModel, LiveModelSlot};
use crate::metrics::Metrics;
use crate::model::bundle::decode_model;
use crate::model::ItemTable;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// What the loader uses.
pub struct Loader {
    pub objects: Objects,
    /// Where files are downloaded to and verified.
    pub downloads: std::path::PathBuf,
    /// `models.max_file_bytes`.
    pub max_file_bytes: u64,
    pub follower: Arc<Follower>,
    pub store: Arc<Store>,
    pub live: Arc<LiveModelSlot>,
    pub metrics: Arc<Metrics>,
    pub retry: Duration,
    pub shutdown: Arc<Shutdown>,
}

/// Why a version was not loaded.
#[derive(Debug)]
pub enum LoadError {
    /// A file is not what the announcement says (or does not decode): not retried soon.
    Refused(anyhow::Error),
    /// The store did not answer.
    Failed(anyhow::Error),
}

/// What one slot (the live model, the canary) holds, and a version held back after a failure.
#[derive(Default)]
struct Held {
    loaded: Option<String>,
    not_before: Option<(String, Instant)>,
}

impl Held {
    /// Whether `a` is to be loaded into the slot now.
    fn wants(&self, a: &Announcement) -> bool {
        let held_back = self
            .not_before
            .as_ref()
            .is_some_and(|(key, t)| *key == a.path && Instant::now() < *t);
        self.loaded.as_deref() != Some(a.path.as_str()) && !held_back
    }

    fn loaded(&mut self, a: &Announcement) {
        self.loaded = Some(a.path.clone());
        self.not_before = None;
    }

    /// How long until a held-back version is tried again.
    fn wait(&self) -> Option<Duration> {
        self.not_before
            .as_ref()
            .map(|(_, t)| t.saturating_duration_since(Instant::now()))
    }
}

impl Loader {
    pub async fn run(self) -> Result<()> {
        let mut read = self.follower.subscribe();
        let mut stop = self.shutdown.subscribe();
        let (mut live, mut canary) = (Held::default(), Held::default());
        loop {
            let (current, running) = self
                .follower
                .with(|l| (l.current().cloned(), l.canary().cloned()));
            if let Some(a) = current {
                self.metrics.model_announced_version.set(a.version as i64);
                if live.wants(&a) {
                    self.swap_live(&a, &mut live, &mut canary).await;
                }
            }
            match running {
                Some(c) if canary.wants(&c) => self.start_canary(&c, &mut canary).await,
                Some(_) => {}
                None => {
                    if canary.loaded.take().is_some() && self.live.clear_canary() {
                        self.metrics.canary_version.set(0);
                        info!("the canary ended: its slice is served by the live version");
                    }
                    canary = Held::default();
                }
            }
            let wait = [live.wait(), canary.wait()]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = read.changed() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return Ok(()),
            }
        }
    }

    /// Makes `a` the live model: the running canary itself when it is that version (promoted),
    /// or downloaded and loaded.
    async fn swap_live(&self, a: &Announcement, live: &mut Held, canary: &mut Held) {
        if canary.loaded.as_deref() == Some(a.path.as_str()) && self.live.promote_canary(a.version)
        {
            live.loaded(a);
            *canary = Held::default();
            self.swapped(a, 0.0);
            info!(
                model_version = a.version,
                "the canary was promoted: it serves everyone"
            );
            return;
        }
        let started = Instant::now();
        match self.load(a).await {
            Ok(model) => {
                self.live.publish(model);
                live.loaded(a);
                self.swapped(a, started.elapsed().as_secs_f64());
            }
            Err(e) => self.failed(a, e, live),
        }
    }

    /// Loads a canary version into the slot's canary.
    async fn start_canary(&self, a: &Announcement, canary: &mut Held) {
        let fraction = a.canary.unwrap_or(0.0);
        match self.load(a).await {
            Ok(model) => {
                self.live.publish_canary(model, fraction);
                canary.loaded(a);
                self.metrics.model_loads.with_label_values(&["ok"]).inc();
                self.metrics.canary_version.set(a.version as i64);
                info!(model_version = a.version, path = %a.path, fraction, "canary version loaded: it scores its slice of the users");
            }
            Err(e) => self.failed(a, e, canary),
        }
    }

    fn failed(&self, a: &Announcement, e: LoadError, held: &mut Held) {
        let (result, e) = match e {
            LoadError::Refused(e) => ("refused", e),
            LoadError::Failed(e) => ("failed", e),
        };
        self.metrics.model_loads.with_label_values(&[result]).inc();
        warn!(model_version = a.version, path = %a.path, result, error = %format!("{e:#}"),
            retry = %humantime::format_duration(self.retry),
            "cannot load the announced model version; the current one keeps serving");
        held.not_before = Some((a.path.clone(), Instant::now() + self.retry));
    }

    /// Downloads, verifies and loads one announced version.
    async fn load(&self, a: &Announcement) -> Result<LiveModel, LoadError> {
        load_for_serving(
            &self.objects,
            a,
            &self.store,
            self.max_file_bytes,
            &self.downloads,
        )
        .await
    }

    /// The metrics and log line of a version swapped in as the live model.
    fn swapped(&self, a: &Announcement, seconds: f64) {
        let m = &self.metrics;
        m.model_load_seconds.observe(seconds);
        m.model_loads.with_label_values(&["ok"]).inc();
        m.model_version.set(a.version as i64);
        m.model_items.set(a.n_items as i64);
        m.model_validated.set(i64::from(a.validated));
        m.kl_beta.set(a.state.beta);
        m.update_count.set(a.state.update_count as i64);
        m.model_swap_time.set(crate::wire::now_ms() as f64 / 1000.0);
        info!(model_version = a.version, path = %a.path, items = a.n_items, seconds, "announced model version swapped in");
    }
}

/// An announced version ready to serve on this store: its weights and item table downloaded
/// into `downloads` (refused unread when announced larger than `max_file_bytes`), each checked
/// against the announcement's size and SHA-256 on the way, decoded, and its columns mapped onto
/// the store's items (interned where the store has not met them).
pub async fn load_for_serving(
    objects: &Objects,
    a: &Announcement,
    store: &Arc<Store>,
    max_file_bytes: u64,
    downloads: &std::path::Path,
) -> Result<LiveModel, LoadError> {
    let model = objects
        .download(&a.path, &a.model, max_file_bytes, downloads)
        .await?;
    let items = objects
        .download(&a.path, &a.items, max_file_bytes, downloads)
        .await?;
    let (config, n_items, version) = (a.config.clone(), a.n_items, a.version);
    let store = store.clone();
    tokio::task::spawn_blocking(move || -> Result<LiveModel> {
        let table = ItemTable::decode(&items).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            table.len() == n_items,
            "the item table has {} items, the model {n_items} columns",
            table.len()
        );
        let model = decode_model(&config, n_items, &model)
            .map_err(anyhow::Error::msg)?
            .for_serving()?;
        let columns = ColumnMap::new(&store, &table)?;
        Ok(LiveModel {
            version,
            model,
            columns: Some(columns),
        })
    })
    .await
    .context("the loading task failed")
    .map_err(LoadError::Failed)?
    .map_err(LoadError::Refused)
}
