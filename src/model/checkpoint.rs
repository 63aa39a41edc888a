//! `Checkpoints`: model versions on disk, one directory each (`v00000042/`) holding
//! `weights.safetensors` (weights and Adam moments) and `manifest.json` (format, counters, β,
//! hyper-parameters, training figures, checksum). A version is written in a temporary directory,
//! fsynced, renamed into place and the parent fsynced, so it is all there or not at all; loading
//! a truncated, corrupted or foreign checkpoint fails with an error naming the problem.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::adam::Adam;
use super::{ItemTable, ModelConfig, MultiVae, Trainer};

/// The `format` field every manifest carries.
pub(crate) const CHECKPOINT_FORMAT: &str = "multivaed-checkpoint";
/// The newest manifest layout this build reads and the one it writes.
pub(crate) const CHECKPOINT_FORMAT_VERSION: u32 = 1;

const WEIGHTS: &str = "weights.safetensors";
const MANIFEST: &str = "manifest.json";
const ITEMS: &str = "items.tsv";

/// What `manifest.json` says about a model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// Monotonic model version number (the directory name).
    pub model_version: u64,
    /// Mini-batches over the model's life (drives β).
    pub update_count: u64,
    /// Adam's step count (its bias correction).
    pub adam_step: u64,
    /// Epochs over the model's life (drives the shuffling stream).
    pub epochs_done: u64,
    /// β of the next update.
    pub beta: f64,
    pub n_items: usize,
    pub seed: u64,
    pub config: ModelConfig,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub created_unix_ms: u64,
    /// Free-form figures of the training that produced it (loss, validation NDCG, …).
    #[serde(default)]
    pub training: serde_json::Value,
    pub weights_file: String,
    pub weights_bytes: u64,
    pub weights_crc32: u32,
    /// A fingerprint of the item ids of columns 0..n_items, as the store held them: a model
    /// is never used with a store whose items are others (absent in older checkpoints).
    #[serde(default)]
    pub catalogue_fingerprint: Option<String>,
    /// A fleet trainer's item table (the id of each column), when the columns are not the
    /// store's own indices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items_file: Option<ItemsFile>,
}

/// The item table file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemsFile {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a multivaed checkpoint: {reason}")]
    Foreign { path: PathBuf, reason: String },
    #[error("{path}: checkpoint format version {found} is newer than this build reads ({CHECKPOINT_FORMAT_VERSION})")]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{path}: corrupt checkpoint: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: model version {version} already exists")]
    Exists { path: PathBuf, version: u64 },
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(path: &Path) -> Result<(), CheckpointError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io(path))
}

/// The directory of model versions.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    dir: PathBuf,
}

/// Records the highest version number given, once directories that held it may be pruned.
const HIGHEST_VERSION_FILE: &str = ".highest-version";

impl Checkpoints {
    /// Versions live under `dir` (created on first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory of model versions.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Directory of a version.
    pub fn path_of(&self, version: u64) -> PathBuf {
        self.dir.join(format!("v{version:08}"))
    }

    /// Writes `trainer` as `version`, atomically. `training` is stored in the manifest. With
    /// `items` (a fleet trainer's columns), the item table is written beside the weights and
    /// the catalogue fingerprint is the table's.
    pub(crate) fn save(
        &self,
        trainer: &Trainer,
        version: u64,
        training: serde_json::Value,
        catalogue_fingerprint: Option<String>,
        items: Option<&ItemTable>,
    ) -> Result<Manifest, CheckpointError> {
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let final_path = self.path_of(version);
        if final_path.exists() {
            return Err(CheckpointError::Exists {
                path: final_path,
                version,
            });
        }
        let tmp = self
            .dir
            .join(format!(".tmp-v{version:08}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io(&tmp))?;

        let bytes = serialize(&host_tensors(trainer, true)?).map_err(|reason| {
            CheckpointError::Corrupt {
                path: tmp.clone(),
                reason,
            }
        })?;
        crate::fault::crash_point("checkpoint.before_weights");
        write_synced(&tmp.join(WEIGHTS), &bytes)?;
        crate::fault::crash_point("checkpoint.weights_written");
        let items_file = match items {
            Some(table) => {
                let encoded = table.encode();
                write_synced(&tmp.join(ITEMS), &encoded)?;
                Some(ItemsFile {
                    name: ITEMS.into(),
                    bytes: encoded.len() as u64,
                    crc32: crc32fast::hash(&encoded),
                })
            }
            None => None,
        };
        let catalogue_fingerprint = items.map(ItemTable::fingerprint).or(catalogue_fingerprint);

        let now = SystemTime::now();
        let model = trainer.model();
        let manifest = Manifest {
            format: CHECKPOINT_FORMAT.into(),
            format_version: CHECKPOINT_FORMAT_VERSION,
            model_version: version,
            update_count: trainer.update_count(),
            adam_step: trainer.adam().steps(),
            epochs_done: trainer.epochs_done(),
            beta: trainer.beta(),
            n_items: model.n_items(),
            seed: trainer.seed(),
            config: model.config().clone(),
            created_at: humantime::format_rfc3339_millis(now).to_string(),
            created_unix_ms: now
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            training,
            weights_file: WEIGHTS.into(),
            weights_bytes: bytes.len() as u64,
            weights_crc32: crc32fast::hash(&bytes),
            catalogue_fingerprint,
            items_file,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Corrupt {
            path: tmp.clone(),
            reason: e.to_string(),
        })?;
        write_synced(&tmp.join(MANIFEST), &json)?;
        sync_dir(&tmp)?;
        fs::rename(&tmp, &final_path).map_err(io(&final_path))?;
        crate::fault::crash_point("checkpoint.renamed");
        sync_dir(&self.dir)?;
        Ok(manifest)
    }

    /// The item table a version was trained with, when it has one (a fleet trainer's), checked
    /// against the manifest's size and checksum.
    pub fn items(path: &Path, manifest: &Manifest) -> Result<Option<ItemTable>, CheckpointError> {
        let Some(f) = &manifest.items_file else {
            return Ok(None);
        };
        let ipath = path.join(&f.name);
        let corrupt = |reason: String| CheckpointError::Corrupt {
            path: ipath.clone(),
            reason,
        };
        let bytes = fs::read(&ipath).map_err(io(&ipath))?;
        if bytes.len() as u64 != f.bytes || crc32fast::hash(&bytes) != f.crc32 {
            return Err(corrupt(format!(
                "{} bytes or checksum differ from the manifest's",
                bytes.len()
            )));
        }
        let table = ItemTable::decode(&bytes).map_err(corrupt)?;
        if table.len() != manifest.n_items {
            return Err(corrupt(format!(
                "{} items, the model has {} columns",
                table.len(),
                manifest.n_items
            )));
        }
        Ok(Some(table))
    }

    /// Reads only the manifest of a version directory, checking its format.
    pub(crate) fn read_manifest(path: &Path) -> Result<Manifest, CheckpointError> {
        let mpath = path.join(MANIFEST);
        let bytes = fs::read(&mpath).map_err(io(&mpath))?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Corrupt {
                path: mpath.clone(),
                reason: format!("manifest is not valid JSON: {e}"),
            })?;
        match value.get("format").and_then(|f| f.as_str()) {
            Some(CHECKPOINT_FORMAT) => {}
            other => {
                return Err(CheckpointError::Foreign {
                    path: mpath,
                    reason: format!("format is {other:?}, expected {CHECKPOINT_FORMAT:?}"),
                })
            }
        }
        let found = value
            .get("format_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as u32;
        if found > CHECKPOINT_FORMAT_VERSION || found == 0 {
            return Err(CheckpointError::UnsupportedVersion { path: mpath, found });
        }
        serde_json::from_value(value).map_err(|e| CheckpointError::Corrupt {
            path: mpath,
            reason: format!("manifest: {e}"),
        })
    }

    /// Loads a version directory into a trainer on `device`, verifying size, checksum and every
    /// tensor's shape.
    pub fn load(path: &Path, device: &Device) -> Result<(Trainer, Manifest), CheckpointError> {
        let manifest = Self::read_manifest(path)?;
        let wpath = path.join(&manifest.weights_file);
        let corrupt = |reason: String| CheckpointError::Corrupt {
            path: wpath.clone(),
            reason,
        };
        let bytes = fs::read(&wpath).map_err(io(&wpath))?;
        if bytes.len() as u64 != manifest.weights_bytes {
            return Err(corrupt(format!(
                "{} bytes, the manifest says {} (truncated?)",
                bytes.len(),
                manifest.weights_bytes
            )));
        }
        let crc = crc32fast::hash(&bytes);
        if crc != manifest.weights_crc32 {
            return Err(corrupt(format!(
                "checksum {crc:08x}, the manifest says {:08x}",
                manifest.weights_crc32
            )));
        }
        let mut tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load_buffer(&bytes, device)
                .map_err(|e| corrupt(format!("unreadable safetensors: {e}")))?;
        let model = MultiVae::from_named(&manifest.config, manifest.n_items, |n| {
            tensors.get(n).cloned()
        })
        .map_err(corrupt)?;
        let adam = adam_from(
            &mut tensors,
            &model,
            manifest.config.learning_rate,
            manifest.adam_step,
        )
        .map_err(corrupt)?;
        let trainer = Trainer::from_parts(
            model,
            Some(adam),
            manifest.update_count,
            manifest.epochs_done,
            manifest.seed,
        )?;
        Ok((trainer, manifest))
    }

    /// Version numbers present on disk (complete or not), ascending.
    pub fn versions(&self) -> Result<Vec<u64>, CheckpointError> {
        let mut out: Vec<u64> = self
            .entry_names()?
            .iter()
            .filter_map(|name| name.strip_prefix('v')?.parse::<u64>().ok())
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// The directory's entry names (none when it does not exist yet).
    fn entry_names(&self) -> Result<Vec<String>, CheckpointError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        Ok(entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect())
    }

    /// Directories a rollback moved aside, as (version, name), oldest move first.
    fn rolled_back(&self) -> Result<Vec<(u64, String)>, CheckpointError> {
        let mut out: Vec<(u64, u64, String)> = self
            .entry_names()?
            .into_iter()
            .filter_map(|name| {
                let rest = name.strip_prefix(".rolled-back-v")?;
                let (v, stamp) = rest.split_once('-')?;
                Some((stamp.parse().ok()?, v.parse().ok()?, name))
            })
            .collect();
        out.sort_unstable();
        Ok(out.into_iter().map(|(_, v, name)| (v, name)).collect())
    }

    /// The highest version number ever given in this directory: present, moved aside by a
    /// rollback, or recorded before a moved-aside one was pruned. A new version is numbered
    /// above it, so a number never names two models.
    pub fn highest_version_ever(&self) -> Result<u64, CheckpointError> {
        let present = self.versions()?.last().copied().unwrap_or(0);
        let aside = self
            .rolled_back()?
            .iter()
            .map(|(v, _)| *v)
            .max()
            .unwrap_or(0);
        let recorded = fs::read_to_string(self.dir.join(HIGHEST_VERSION_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Ok(present.max(aside).max(recorded))
    }

    /// The newest version that loads; versions that fail are reported to `on_skip` and skipped.
    pub fn load_latest(
        &self,
        device: &Device,
        mut on_skip: impl FnMut(u64, &CheckpointError),
    ) -> Result<Option<(Trainer, Manifest)>, CheckpointError> {
        for v in self.versions()?.into_iter().rev() {
            match Self::load(&self.path_of(v), device) {
                Ok(loaded) => return Ok(Some(loaded)),
                Err(e) => on_skip(v, &e),
            }
        }
        Ok(None)
    }

    /// Makes `version` the newest again: every newer version is moved aside (renamed
    /// `.rolled-back-vNNNNNNNN-<unix seconds>`, not deleted). `version` must load. Returns the
    /// versions moved aside. Run it with the daemon stopped.
    pub fn rollback(&self, version: u64) -> Result<Vec<u64>, CheckpointError> {
        let path = self.path_of(version);
        Self::load(&path, &Device::Cpu)?;
        self.set_aside_from(version + 1)
    }

    /// Moves every version numbered `from` or above aside (renamed
    /// `.rolled-back-vNNNNNNNN-<unix seconds>`, as a rollback does). Returns them.
    pub(crate) fn set_aside_from(&self, from: u64) -> Result<Vec<u64>, CheckpointError> {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut moved = Vec::new();
        for v in self.versions()?.into_iter().filter(|&v| v >= from) {
            let from = self.path_of(v);
            let to = self.dir.join(format!(".rolled-back-v{v:08}-{stamp}"));
            if to.exists() {
                fs::remove_dir_all(&to).map_err(io(&to))?;
            }
            fs::rename(&from, &to).map_err(io(&from))?;
            moved.push(v);
        }
        if !moved.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(moved)
    }

    /// Removes all but the newest `keep` versions, all but the `keep` most recent directories
    /// moved aside by rollbacks (recording the highest number first), and any leftover
    /// temporary directories.
    pub(crate) fn prune(&self, keep: usize) -> Result<Vec<u64>, CheckpointError> {
        let aside = self.rolled_back()?;
        if aside.len() > keep {
            let highest = self.highest_version_ever()?;
            let file = self.dir.join(HIGHEST_VERSION_FILE);
            fs::write(&file, format!("{highest}\n")).map_err(io(&file))?;
            for (_, name) in &aside[..aside.len() - keep] {
                let p = self.dir.join(name);
                fs::remove_dir_all(&p).map_err(io(&p))?;
            }
        }
        let versions = self.versions()?;
        let mut removed = Vec::new();
        if versions.len() > keep {
            for &v in &versions[..versions.len() - keep] {
                let p = self.path_of(v);
                fs::remove_dir_all(&p).map_err(io(&p))?;
                removed.push(v);
            }
        }
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.filter_map(|e| e.ok()) {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(removed)
    }
}

/// A trainer's tensors on the host, by checkpoint name: the weights, then (with `adam`) the
/// optimiser's moments as `adam.m.NAME` and `adam.v.NAME`.
pub(crate) fn host_tensors(
    trainer: &Trainer,
    adam: bool,
) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let cpu = Device::Cpu;
    let model = trainer.model();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in model.named_tensors() {
        tensors.push((name, t.to_device(&cpu)?));
    }
    if adam {
        let names: Vec<String> = model.named_tensors().into_iter().map(|(n, _)| n).collect();
        let moments = trainer.adam();
        for (i, name) in names.iter().enumerate() {
            tensors.push((format!("adam.m.{name}"), moments.m[i].to_device(&cpu)?));
            tensors.push((format!("adam.v.{name}"), moments.v[i].to_device(&cpu)?));
        }
    }
    Ok(tensors)
}

/// Named tensors as safetensors bytes.
pub(crate) fn serialize(tensors: &[(String, Tensor)]) -> Result<Vec<u8>, String> {
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| format!("cannot serialise weights: {e}"))
}

/// The optimiser's moments for `model`, taken from `tensors` (`adam.m.NAME`, `adam.v.NAME`),
/// every shape checked.
pub(crate) fn adam_from(
    tensors: &mut HashMap<String, Tensor>,
    model: &MultiVae,
    learning_rate: f64,
    step: u64,
) -> Result<Adam, String> {
    let mut m = Vec::new();
    let mut v = Vec::new();
    for (name, t) in model.named_tensors() {
        for (kind, out) in [("m", &mut m), ("v", &mut v)] {
            let key = format!("adam.{kind}.{name}");
            let moment = tensors
                .remove(&key)
                .ok_or_else(|| format!("tensor {key} is missing"))?;
            if moment.dims() != t.dims() {
                return Err(format!("tensor {key} has shape {:?}", moment.dims()));
            }
            out.push(moment);
        }
    }
    Ok(Adam {
        learning_rate,
        step,
        m,
        v,
    })
}
