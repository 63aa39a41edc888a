//! The object store holding model versions' files (`models.store`): a directory — a volume
//! every pod mounts — by default, or S3, GCS or Azure Blob Storage by URL, through the
//! `object_store` crate; credentials from the usual environment variables, `models.options`
//! on top. One folder per version and epoch (`v0000000042-e3/`), its files written first and
//! its announcement last.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreScheme, PutPayload};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::loader::LoadError;
use crate::config::ModelsConfig;
use crate::model::bundle::FileDigest;

/// The file holding a copy of a version's announcement (the last one uploaded).
pub const ANNOUNCEMENT_FILE: &str = "announcement.json";

/// A version's folder in the store.
pub fn folder(version: u64, epoch: u64) -> String {
    format!("v{version:010}-e{epoch}")
}

/// The version and epoch a folder name is for, if it is exactly a name [`folder`] makes: the
/// only names pruning ever touches, whatever else shares the store.
pub fn parse_folder(name: &str) -> Option<(u64, u64)> {
    let (v, e) = name.strip_prefix('v')?.split_once("-e")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(v) || !digits(e) {
        return None;
    }
    let (version, epoch) = (v.parse().ok()?, e.parse().ok()?);
    (folder(version, epoch) == name).then_some((version, epoch))
}

/// The object store and the root under which versions live.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    root: Path,
    /// The root as a URL, for announcements and logs.
    url: String,
}

/// A folder in the store.
#[derive(Debug, Clone)]
pub struct Folder {
    pub name: String,
    /// When its newest file was written (Unix ms).
    pub modified_unix_ms: i64,
}

impl Objects {
    /// Opens `models.store` (a directory path, or a URL) with `models.options`.
    pub fn open(config: &ModelsConfig) -> Result<Self> {
        let spec = config.store.trim();
        if !spec.contains("://") {
            let dir = std::path::Path::new(spec);
            std::fs::create_dir_all(dir)
                .with_context(|| format!("models.store: cannot create {}", dir.display()))?;
            let dir = dir
                .canonicalize()
                .with_context(|| format!("models.store: {}", dir.display()))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .with_context(|| format!("models.store: {}", dir.display()))?;
            return Ok(Self {
                store: Arc::new(store),
                root: Path::default(),
                url: format!("file://{}", dir.display()),
            });
        }
        let url: url::Url = spec
            .parse()
            .with_context(|| format!("models.store: {spec:?} is not a URL"))?;
        let (scheme, root) = ObjectStoreScheme::parse(&url)
            .with_context(|| format!("models.store: {spec:?}: unknown kind of store"))?;
        let store: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::Local => {
                let dir = url
                    .to_file_path()
                    .map_err(|_| anyhow::anyhow!("models.store: {spec:?} is not a local path"))?;
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("models.store: cannot create {}", dir.display()))?;
                return Self::open(&ModelsConfig {
                    store: dir.display().to_string(),
                    ..config.clone()
                });
            }
            ObjectStoreScheme::Memory => Arc::new(object_store::memory::InMemory::new()),
            ObjectStoreScheme::AmazonS3 => {
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(spec);
                for (k, v) in &config.options {
                    b = b.with_config(option(k)?, v);
                }
                Arc::new(b.build().context("models.store: S3")?)
            }
            ObjectStoreScheme::GoogleCloudStorage => {
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(spec);
                for (k, v) in &config.options {
                    b = b.with_config(option(k)?, v);
                }
                Arc::new(b.build().context("models.store: GCS")?)
            }
            ObjectStoreScheme::MicrosoftAzure => {
                let mut b = object_store::azure::MicrosoftAzureBuilder::from_env().with_url(spec);
                for (k, v) in &config.options {
                    b = b.with_config(option(k)?, v);
                }
                Arc::new(b.build().context("models.store: Azure")?)
            }
            other => bail!("models.store: {spec:?}: {other:?} stores are not supported"),
        };
        Ok(Self {
            store,
            root,
            url: spec.trim_end_matches('/').to_string(),
        })
    }

    fn path(&self, folder: &str, name: &str) -> Path {
        self.root.child(folder).child(name)
    }

    /// A folder's URL.
    pub fn uri(&self, folder: &str) -> String {
        format!("{}/{folder}/", self.url)
    }

    /// Writes a file.
    pub async fn put(&self, folder: &str, name: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.path(folder, name);
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .with_context(|| format!("cannot write {}{name}", self.uri(folder)))?;
        Ok(())
    }

    /// Downloads an announced file into an unnamed file in `dir`, hashing it on the way, and
    /// maps it: refused before any byte is read when the announcement says it is larger than
    /// `max_bytes`, cut off as soon as more than announced arrives, refused when its size or
    /// SHA-256 differs from the announcement's. Nothing of it is held whole on the heap.
    pub async fn download(
        &self,
        folder: &str,
        d: &FileDigest,
        max_bytes: u64,
        dir: &std::path::Path,
    ) -> Result<memmap2::Mmap, LoadError> {
        if d.bytes > max_bytes {
            return Err(LoadError::Refused(anyhow::anyhow!(
                "{}: announced as {} bytes, more than models.max_file_bytes ({max_bytes})",
                d.name,
                d.bytes
            )));
        }
        let failed = |e: anyhow::Error| LoadError::Failed(e);
        let uri = format!("{}{}", self.uri(folder), d.name);
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create {}", dir.display()))
            .map_err(failed)?;
        let file = tempfile::tempfile_in(dir)
            .with_context(|| format!("cannot create a download file in {}", dir.display()))
            .map_err(failed)?;
        let mut file = tokio::fs::File::from_std(file);
        let mut stream = self
            .store
            .get(&self.path(folder, &d.name))
            .await
            .with_context(|| format!("cannot read {uri}"))
            .map_err(failed)?
            .into_stream();
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        while let Some(chunk) = stream
            .try_next()
            .await
            .with_context(|| format!("cannot read {uri}"))
            .map_err(failed)?
        {
            got = got.saturating_add(chunk.len() as u64);
            if got > d.bytes {
                return Err(LoadError::Refused(anyhow::anyhow!(
                    "{}: longer than the {} bytes announced",
                    d.name,
                    d.bytes
                )));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .with_context(|| format!("cannot write the download of {uri}"))
                .map_err(failed)?;
        }
        file.flush().await.map_err(|e| failed(e.into()))?;
        let digest: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        d.matches(got, &digest)
            .map_err(|e| LoadError::Refused(anyhow::anyhow!(e)))?;
        let file = file.into_std().await;
        // SAFETY: the file is this process's own unnamed file (gone from the file system), so
        // nothing else can change it while it is mapped.
        unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map the download of {uri}"))
            .map_err(failed)
    }

    /// A file's size, if it is there.
    pub async fn size(&self, folder: &str, name: &str) -> Result<Option<u64>> {
        match self.store.head(&self.path(folder, name)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => {
                Err(anyhow::Error::new(e)
                    .context(format!("cannot read {}{name}", self.uri(folder))))
            }
        }
    }

    /// Every version folder in the store (named as [`folder`] names them, directly under the
    /// root), with when it was last written.
    pub async fn folders(&self) -> Result<Vec<Folder>> {
        let prefix = (!self.root.as_ref().is_empty()).then_some(&self.root);
        let files: Vec<object_store::ObjectMeta> = self
            .store
            .list(prefix)
            .try_collect()
            .await
            .with_context(|| format!("cannot list {}", self.url))?;
        let mut out: std::collections::BTreeMap<String, i64> = Default::default();
        for f in files {
            let mut parts = f.location.prefix_match(&self.root).into_iter().flatten();
            let Some(first) = parts.next() else { continue };
            let name = first.as_ref().to_string();
            if parse_folder(&name).is_some() && parts.next().is_some() {
                let t = f.last_modified.timestamp_millis();
                let e = out.entry(name).or_insert(t);
                *e = (*e).max(t);
            }
        }
        Ok(out
            .into_iter()
            .map(|(name, modified_unix_ms)| Folder {
                name,
                modified_unix_ms,
            })
            .collect())
    }

    /// Deletes a version folder's files.
    pub async fn delete_folder(&self, folder: &str) -> Result<()> {
        let prefix = self.root.child(folder);
        let files: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .with_context(|| format!("cannot list {}", self.uri(folder)))?;
        for f in files {
            self.store
                .delete(&f.location)
                .await
                .with_context(|| format!("cannot delete {}", f.location))?;
        }
        Ok(())
    }
}

/// An option key of a store's builder, or a named error.
fn option<K: std::str::FromStr>(key: &str) -> Result<K> {
    key.parse().map_err(|_| {
        anyhow::anyhow!("models.options: unknown option {key:?} for this kind of store")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_store_keeps_folders_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let config = ModelsConfig {
            store: dir.path().join("m").display().to_string(),
            ..ModelsConfig::default()
        };
        let o = Objects::open(&config).unwrap();
        let downloads = dir.path().join("downloads");
        let read = |o: &Objects, folder: &'static str, bytes: &'static [u8]| {
            let (o, downloads) = (o.clone(), downloads.clone());
            async move {
                let d = FileDigest::of("a.bin", bytes);
                o.download(folder, &d, u64::MAX, &downloads)
                    .await
                    .map(|m| m.to_vec())
            }
        };
        o.put("v0000000001-e1", "a.bin", vec![1, 2, 3])
            .await
            .unwrap();
        o.put("v0000000002-e1", "a.bin", vec![4]).await.unwrap();
        assert_eq!(
            read(&o, "v0000000001-e1", &[1, 2, 3]).await.unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(o.size("v0000000002-e1", "a.bin").await.unwrap(), Some(1));
        assert_eq!(o.size("v0000000002-e1", "b.bin").await.unwrap(), None);
        let names: Vec<String> = o
            .folders()
            .await
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(names, ["v0000000001-e1", "v0000000002-e1"]);
        // only the names the trainer writes are version folders: nothing else is pruned
        for other in [
            "v-notes",
            "vault",
            "v0000000003-e1x",
            "v1-e1",
            "v0000000004-e01",
        ] {
            o.put(other, "keep.txt", vec![1]).await.unwrap();
        }
        let names: Vec<String> = o
            .folders()
            .await
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(names, ["v0000000001-e1", "v0000000002-e1"]);
        assert_eq!(parse_folder("v0000000042-e3"), Some((42, 3)));
        o.delete_folder("v0000000001-e1").await.unwrap();
        assert!(read(&o, "v0000000001-e1", &[1, 2, 3]).await.is_err());
        assert!(o.uri("x").starts_with("file://"));
        // a URL to the same directory reads the same files
        let url = ModelsConfig {
            store: format!("file://{}", dir.path().join("m").display()),
            ..ModelsConfig::default()
        };
        let again = Objects::open(&url).unwrap();
        assert_eq!(read(&again, "v0000000002-e1", &[4]).await.unwrap(), vec![4]);
        let bad = ModelsConfig {
            store: "s3://bucket/p".into(),
            options: [("no_such_option".to_string(), "1".to_string())].into(),
            ..ModelsConfig::default()
        };
        assert!(format!("{:#}", Objects::open(&bad).err().unwrap()).contains("no_such_option"));
    }

    #[tokio::test]
    async fn pruning_sees_only_its_own_prefix_and_names() {
        let shared: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let o = Objects {
            store: shared.clone(),
            root: Path::from("fleet-a"),
            url: "memory:///fleet-a".into(),
        };
        for path in [
            "fleet-a/v0000000001-e1/model.safetensors",
            "fleet-a/v-notes/readme.txt",
            "fleet-a-old/v0000000001-e1/model.safetensors",
            "fleet-b/v0000000002-e1/model.safetensors",
            "v0000000003-e1/model.safetensors",
        ] {
            shared
                .put(&Path::from(path), PutPayload::from(vec![1u8]))
                .await
                .unwrap();
        }
        let names: Vec<String> = o
            .folders()
            .await
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(names, ["v0000000001-e1"]);
        o.delete_folder("v0000000001-e1").await.unwrap();
        let left: Vec<String> = shared
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        let mut left = left;
        left.sort();
        assert_eq!(
            left,
            [
                "fleet-a-old/v0000000001-e1/model.safetensors",
                "fleet-a/v-notes/readme.txt",
                "fleet-b/v0000000002-e1/model.safetensors",
                "v0000000003-e1/model.safetensors",
            ]
        );
    }

    #[tokio::test]
    async fn a_file_announced_too_large_is_refused_unread_and_a_longer_one_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let o = Objects::open(&ModelsConfig {
            store: dir.path().join("m").display().to_string(),
            ..ModelsConfig::default()
        })
        .unwrap();
        let downloads = dir.path().join("downloads");
        let bytes = vec![7u8; 1000];
        o.put("v0000000001-e1", "w", bytes.clone()).await.unwrap();
        let mut d = FileDigest::of("w", &bytes);
        let got = o
            .download("v0000000001-e1", &d, 1000, &downloads)
            .await
            .unwrap();
        assert_eq!(&got[..], &bytes[..]);
        // announced as 10 GB: refused before anything is read (the file is not even there)
        let huge = FileDigest {
            name: "absent".into(),
            bytes: 10_000_000_000,
            sha256: String::new(),
        };
        let Err(LoadError::Refused(e)) = o
            .download("v0000000001-e1", &huge, 8 << 30, &downloads)
            .await
        else {
            panic!("not refused")
        };
        assert!(format!("{e:#}").contains("max_file_bytes"), "{e:#}");
        // more bytes than announced: cut off
        d.bytes = 10;
        let Err(LoadError::Refused(e)) = o.download("v0000000001-e1", &d, 1000, &downloads).await
        else {
            panic!("not refused")
        };
        assert!(format!("{e:#}").contains("longer than"), "{e:#}");
        // nothing of the downloads is left on disk
        assert_eq!(std::fs::read_dir(&downloads).unwrap().count(), 0);
    }
}
