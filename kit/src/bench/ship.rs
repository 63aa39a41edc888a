//! `multivaed bench ship`: what shipping one model version costs at real catalogue sizes (the
//! paper's 600-200-600 model, no broker). The trainer's side: encoding the bundle (weights,
//! Adam moments, item table, SHA-256 of each) and writing it to the object store; a serving
//! replica's side: downloading the weights and item table, verifying them, decoding and mapping
//! the columns onto a fresh store — `load_for_serving`, the loader's own path.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use serde::Serialize;

use multivaed::config::ModelsConfig;
use multivaed::model::bundle::{self, FileDigest, TrainingState};
use multivaed::model::{ItemTable, ModelConfig, Trainer};
use multivaed::shipping::log::Announcement;
use multivaed::shipping::{load_for_serving, Objects};
use multivaed::store::Store;

#[derive(Debug, Clone)]
pub struct ShipBenchOptions {
    pub items: Vec<usize>,
    /// The object store (a directory by default).
    pub store: String,
    pub work_dir: PathBuf,
    pub config: ModelConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShipBenchRow {
    pub items: usize,
    pub model_bytes: u64,
    pub optimizer_bytes: u64,
    pub items_bytes: u64,
    /// Encoding the three files and their digests (the trainer's side).
    pub encode_seconds: f64,
    /// Writing them to the object store.
    pub upload_seconds: f64,
    /// A replica's download + verification + decoding + column mapping.
    pub load_seconds: f64,
}

pub fn run_ship_bench(opts: &ShipBenchOptions) -> Result<Vec<ShipBenchRow>> {
    std::fs::create_dir_all(&opts.work_dir)?;
    let rt = tokio::runtime::Runtime::new()?;
    let objects = Objects::open(&ModelsConfig {
        store: opts.store.clone(),
        ..ModelsConfig::default()
    })?;
    let mut rows = Vec::new();
    for &n in &opts.items {
        let trainer = Trainer::new(&opts.config, n, 1, &Device::Cpu)?;
        let mut items = ItemTable::from_ids((0..n).map(|i| format!("item-{i}")));
        items.set_counts((0..n as u32).map(|i| n as u32 - i).collect());
        let started = Instant::now();
        let encoded = bundle::encode(&trainer, &items).map_err(anyhow::Error::msg)?;
        let digests = [
            FileDigest::of(bundle::MODEL_FILE, &encoded.model),
            FileDigest::of(bundle::OPTIMIZER_FILE, &encoded.optimizer),
            FileDigest::of(bundle::ITEMS_FILE, &encoded.items),
        ];
        let encode_seconds = started.elapsed().as_secs_f64();
        let path = format!("bench-{n}-{}", std::process::id());
        let started = Instant::now();
        rt.block_on(async {
            for (name, bytes) in encoded.files() {
                objects.put(&path, name, bytes.to_vec()).await?;
            }
            anyhow::Ok(())
        })?;
        let upload_seconds = started.elapsed().as_secs_f64();
        let [model, optimizer, items_digest] = digests;
        let a = Announcement {
            version: 1,
            epoch: 1,
            trainer: "bench".into(),
            path: path.clone(),
            uri: objects.uri(&path),
            model,
            optimizer,
            items: items_digest,
            n_items: n,
            config: opts.config.clone(),
            state: TrainingState::of(&trainer),
            validation_ndcg: None,
            validated: false,
            base_version: None,
            created_at: String::new(),
            announced_unix_ms: 0,
            rollback: false,
            canary: None,
        };
        drop(trainer);
        drop(encoded);
        let dir = opts
            .work_dir
            .join(format!("ship-store-{n}-{}", std::process::id()));
        let store = Arc::new(Store::open(&dir, 500)?);
        let started = Instant::now();
        let live = rt
            .block_on(load_for_serving(
                &objects,
                &a,
                &store,
                u64::MAX,
                &opts.work_dir,
            ))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let load_seconds = started.elapsed().as_secs_f64();
        drop(live);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        let row = ShipBenchRow {
            items: n,
            model_bytes: a.model.bytes,
            optimizer_bytes: a.optimizer.bytes,
            items_bytes: a.items.bytes,
            encode_seconds,
            upload_seconds,
            load_seconds,
        };
        eprintln!(
            "ship: {n} items: model {:.0} MB, optimizer {:.0} MB; encode {encode_seconds:.2} s, upload {upload_seconds:.2} s, download+verify+load {load_seconds:.2} s",
            row.model_bytes as f64 / 1e6,
            row.optimizer_bytes as f64 / 1e6
        );
        rows.push(row);
    }
    Ok(rows)
}

/// The rows as a markdown table.
pub fn ship_table(rows: &[ShipBenchRow]) -> String {
    let mut out = String::from("| items | weights (MB) | Adam moments (MB) | item table (KB) | encode + digests (s) | upload (s) | download + verify + load (s) |\n|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.0} | {:.2} | {:.2} | {:.2} |\n",
            r.items,
            r.model_bytes as f64 / 1e6,
            r.optimizer_bytes as f64 / 1e6,
            r.items_bytes as f64 / 1e3,
            r.encode_seconds,
            r.upload_seconds,
            r.load_seconds
        ));
    }
    out
}
