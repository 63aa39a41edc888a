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

use crate::config::ModelsConfig;

/// The file holding a copy of a version's announcement (the last one uploaded).
pub const ANNOUNCEMENT_FILE: &str = "announcement.json";

/// A version's folder in the store.
pub fn folder(version: u64, epoch: u64) -> String {
    format!("v{version:010}-e{epoch}")
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

    /// Reads a file whole.
    pub async fn get(&self, folder: &str, name: &str) -> Result<Vec<u8>> {
        let path = self.path(folder, name);
        let got = self
            .store
            .get(&path)
            .await
            .with_context(|| format!("cannot read {}{name}", self.uri(folder)))?;
        Ok(got
            .bytes()
            .await
            .with_context(|| format!("cannot read {}{name}", self.uri(folder)))?
            .to_vec())
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

    /// Every version folder in the store, with when it was last written.
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
            if name.starts_with('v') && parts.next().is_some() {
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
        o.put("v0000000001-e1", "a.bin", vec![1, 2, 3])
            .await
            .unwrap();
        o.put("v0000000002-e1", "a.bin", vec![4]).await.unwrap();
        assert_eq!(
            o.get("v0000000001-e1", "a.bin").await.unwrap(),
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
        o.delete_folder("v0000000001-e1").await.unwrap();
        assert!(o.get("v0000000001-e1", "a.bin").await.is_err());
        assert!(o.uri("x").starts_with("file://"));
        // a URL to the same directory reads the same files
        let url = ModelsConfig {
            store: format!("file://{}", dir.path().join("m").display()),
            ..ModelsConfig::default()
        };
        let again = Objects::open(&url).unwrap();
        assert_eq!(again.get("v0000000002-e1", "a.bin").await.unwrap(), vec![4]);
        let bad = ModelsConfig {
            store: "s3://bucket/p".into(),
            options: [("no_such_option".to_string(), "1".to_string())].into(),
            ..ModelsConfig::default()
        };
        assert!(format!("{:#}", Objects::open(&bad).err().unwrap()).contains("no_such_option"));
    }
}
