//! Action caches: ActionResults keyed by instance name and action digest.
//!
//! Backends keep entries in memory (bounded, least recently used out first) or on disk
//! (one checksummed file per entry, written atomically). [`CompletenessChecking`] wraps
//! either and hides entries whose blobs are no longer all in the CAS.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use hashlink::LinkedHashMap;
use paddock_reapi::proto::re::{ActionResult, Directory, Tree};
use paddock_reapi::Digest;
use parking_lot::Mutex;
use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::blob::{read_all, BlobStore, StoreError};

/// The key of an action cache entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActionKey {
    pub instance: String,
    pub action: Digest,
}

#[async_trait]
pub trait ActionCache: Send + Sync + 'static {
    async fn get(&self, key: &ActionKey) -> Result<Option<ActionResult>, StoreError>;
    async fn put(&self, key: &ActionKey, result: &ActionResult) -> Result<(), StoreError>;
    /// Removes an entry; says whether there was one.
    async fn delete(&self, key: &ActionKey) -> Result<bool, StoreError>;
    /// Removes every entry whose result `doomed` picks, and says how many went. It
    /// reads every entry: for operators' invalidations, not for the request path.
    async fn remove_where(&self, doomed: &ResultFilter) -> Result<u64, StoreError>;
}

/// Picks ActionResults, e.g. those one worker produced in a time window.
pub type ResultFilter = dyn Fn(&ActionResult) -> bool + Send + Sync;

/// An in-memory action cache holding at most `max_entries`.
pub struct MemoryActionCache {
    entries: Mutex<LinkedHashMap<ActionKey, Bytes>>,
    max_entries: usize,
}

impl MemoryActionCache {
    pub fn new(max_entries: usize) -> Self {
        MemoryActionCache {
            entries: Mutex::new(LinkedHashMap::new()),
            max_entries: max_entries.max(1),
        }
    }
}

#[async_trait]
impl ActionCache for MemoryActionCache {
    async fn get(&self, key: &ActionKey) -> Result<Option<ActionResult>, StoreError> {
        let encoded = {
            let mut entries = self.entries.lock();
            let found = entries.get(key).cloned();
            if found.is_some() {
                entries.to_back(key);
            }
            found
        };
        Ok(encoded.and_then(|b| ActionResult::decode(b).ok()))
    }

    async fn put(&self, key: &ActionKey, result: &ActionResult) -> Result<(), StoreError> {
        let mut entries = self.entries.lock();
        entries.replace(key.clone(), Bytes::from(result.encode_to_vec()));
        while entries.len() > self.max_entries {
            entries.pop_front();
        }
        Ok(())
    }

    async fn delete(&self, key: &ActionKey) -> Result<bool, StoreError> {
        Ok(self.entries.lock().remove(key).is_some())
    }

    async fn remove_where(&self, doomed: &ResultFilter) -> Result<u64, StoreError> {
        let mut entries = self.entries.lock();
        let keys: Vec<ActionKey> = entries
            .iter()
            .filter(|(_, bytes)| {
                ActionResult::decode((*bytes).clone()).is_ok_and(|result| doomed(&result))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in &keys {
            entries.remove(key);
        }
        Ok(keys.len() as u64)
    }
}

/// An action cache of files: `{root}/{instance}/{hash}-{size}`, where `{instance}` is a
/// hash of the instance name (names may hold any characters). Each file starts with
/// the SHA-256 of the encoded ActionResult that follows, so damage is detected.
pub struct DiskActionCache {
    root: PathBuf,
    tmp: PathBuf,
    fsync: bool,
}

const CHECKSUM_LEN: usize = 32;

impl DiskActionCache {
    pub fn open(root: &Path, fsync: bool) -> io::Result<Self> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        Ok(DiskActionCache {
            root: root.to_owned(),
            tmp,
            fsync,
        })
    }

    fn path(&self, key: &ActionKey) -> PathBuf {
        let instance = hex::encode(&Sha256::digest(key.instance.as_bytes())[..16]);
        self.root
            .join(instance)
            .join(format!("{}-{}", key.action.hash_hex(), key.action.size()))
    }
}

#[async_trait]
impl ActionCache for DiskActionCache {
    async fn get(&self, key: &ActionKey) -> Result<Option<ActionResult>, StoreError> {
        let path = self.path(key);
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let intact = bytes.len() >= CHECKSUM_LEN
            && Sha256::digest(&bytes[CHECKSUM_LEN..])[..] == bytes[..CHECKSUM_LEN];
        match intact
            .then(|| ActionResult::decode(&bytes[CHECKSUM_LEN..]).ok())
            .flatten()
        {
            Some(result) => Ok(Some(result)),
            None => {
                tracing::error!(path = %path.display(), "action cache entry is corrupt; removing it");
                let _ = tokio::fs::remove_file(&path).await;
                Ok(None)
            }
        }
    }

    async fn put(&self, key: &ActionKey, result: &ActionResult) -> Result<(), StoreError> {
        let encoded = result.encode_to_vec();
        let mut contents = Sha256::digest(&encoded).to_vec();
        contents.extend_from_slice(&encoded);
        let path = self.path(key);
        let tmp = self.tmp.join(uuid::Uuid::new_v4().to_string());
        let fsync = self.fsync;
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            fs::create_dir_all(path.parent().expect("entry paths have a parent"))?;
            let written = (|| {
                let mut file = fs::File::create(&tmp)?;
                io::Write::write_all(&mut file, &contents)?;
                if fsync {
                    file.sync_all()?;
                }
                fs::rename(&tmp, &path)
            })();
            if written.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            written
        })
        .await
        .map_err(io::Error::other)??;
        Ok(())
    }

    async fn delete(&self, key: &ActionKey) -> Result<bool, StoreError> {
        match tokio::fs::remove_file(self.path(key)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn remove_where(&self, doomed: &ResultFilter) -> Result<u64, StoreError> {
        let mut removed = 0;
        for instance in fs::read_dir(&self.root)?.flatten() {
            if instance.path() == self.tmp || !instance.path().is_dir() {
                continue;
            }
            for entry in fs::read_dir(instance.path())?.flatten() {
                let Ok(bytes) = fs::read(entry.path()) else {
                    continue;
                };
                let picked = bytes.len() >= CHECKSUM_LEN
                    && ActionResult::decode(&bytes[CHECKSUM_LEN..]).is_ok_and(|r| doomed(&r));
                if picked && fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// Hides entries that reference blobs the CAS no longer holds: a client must never be
/// handed a result it cannot download.
pub struct CompletenessChecking {
    inner: Arc<dyn ActionCache>,
    cas: Arc<dyn BlobStore>,
    /// The most distinct directories an output tree may have.
    max_directories: usize,
}

impl CompletenessChecking {
    pub fn new(
        inner: Arc<dyn ActionCache>,
        cas: Arc<dyn BlobStore>,
        max_directories: usize,
    ) -> Self {
        CompletenessChecking {
            inner,
            cas,
            max_directories,
        }
    }
}

#[async_trait]
impl ActionCache for CompletenessChecking {
    async fn get(&self, key: &ActionKey) -> Result<Option<ActionResult>, StoreError> {
        let Some(result) = self.inner.get(key).await? else {
            return Ok(None);
        };
        let complete =
            match referenced_blobs(&result, self.cas.as_ref(), self.max_directories).await? {
                Some(blobs) => self.cas.find_missing(&blobs).await?.is_empty(),
                None => false,
            };
        if !complete {
            tracing::debug!(action = %key.action, "action cache entry references missing blobs");
            metrics::counter!("paddock_action_cache_incomplete_total").increment(1);
            return Ok(None);
        }
        Ok(Some(result))
    }

    async fn put(&self, key: &ActionKey, result: &ActionResult) -> Result<(), StoreError> {
        self.inner.put(key, result).await
    }

    async fn delete(&self, key: &ActionKey) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }

    async fn remove_where(&self, doomed: &ResultFilter) -> Result<u64, StoreError> {
        self.inner.remove_where(doomed).await
    }
}

/// Every blob an ActionResult references: output files, stdout and stderr, and for
/// output directories the Tree (or Directory) blobs and every file in them, each
/// distinct directory visited once. `None` if the result holds a malformed digest, a
/// tree that cannot be read from `cas`, or a tree of more than `max_directories`
/// distinct directories.
pub async fn referenced_blobs(
    result: &ActionResult,
    cas: &dyn BlobStore,
    max_directories: usize,
) -> Result<Option<Vec<Digest>>, StoreError> {
    let mut blobs = Vec::new();
    let mut add = |d: Option<&paddock_reapi::proto::re::Digest>| -> bool {
        match d.map(|d| Digest::from_proto(Some(d))) {
            None => true,
            Some(Ok(d)) => {
                blobs.push(d);
                true
            }
            Some(Err(_)) => false,
        }
    };
    let mut well_formed = result.output_files.iter().all(|f| add(f.digest.as_ref()))
        && add(result.stdout_digest.as_ref())
        && add(result.stderr_digest.as_ref());
    let mut trees = Vec::new();
    let mut roots = Vec::new();
    for dir in &result.output_directories {
        let tree = dir
            .tree_digest
            .as_ref()
            .map(|d| Digest::from_proto(Some(d)));
        let root = dir
            .root_directory_digest
            .as_ref()
            .map(|d| Digest::from_proto(Some(d)));
        match (tree, root) {
            (Some(Ok(t)), _) => trees.push(t),
            (None, Some(Ok(r))) => roots.push(r),
            _ => well_formed = false,
        }
    }
    if !well_formed {
        return Ok(None);
    }
    for tree_digest in trees {
        let Some(bytes) = read_or_none(cas, &tree_digest).await? else {
            return Ok(None);
        };
        let Ok(tree) = Tree::decode(bytes) else {
            return Ok(None);
        };
        blobs.push(tree_digest);
        if tree.children.len() >= max_directories {
            return Ok(None);
        }
        for dir in tree.root.iter().chain(tree.children.iter()) {
            if !add_files(dir, &mut blobs) {
                return Ok(None);
            }
        }
    }
    let mut seen: std::collections::HashSet<Digest> = roots.iter().copied().collect();
    let mut pending = roots;
    while let Some(dir_digest) = pending.pop() {
        let Some(bytes) = read_or_none(cas, &dir_digest).await? else {
            return Ok(None);
        };
        let Ok(dir) = Directory::decode(bytes) else {
            return Ok(None);
        };
        blobs.push(dir_digest);
        if !add_files(&dir, &mut blobs) {
            return Ok(None);
        }
        for child in &dir.directories {
            match Digest::from_proto(child.digest.as_ref()) {
                Ok(d) if seen.insert(d) => {
                    if seen.len() > max_directories {
                        return Ok(None);
                    }
                    pending.push(d);
                }
                Ok(_) => {}
                Err(_) => return Ok(None),
            }
        }
    }
    Ok(Some(blobs))
}

fn add_files(dir: &Directory, blobs: &mut Vec<Digest>) -> bool {
    for file in &dir.files {
        match Digest::from_proto(file.digest.as_ref()) {
            Ok(d) => blobs.push(d),
            Err(_) => return false,
        }
    }
    true
}

/// Reads a blob, treating "corrupt" like "missing": both mean the tree is gone.
async fn read_or_none(cas: &dyn BlobStore, digest: &Digest) -> Result<Option<Bytes>, StoreError> {
    match read_all(cas, digest).await {
        Err(StoreError::Corrupt(_)) => Ok(None),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use paddock_reapi::proto::re::{FileNode, OutputDirectory, OutputFile};

    fn key() -> ActionKey {
        ActionKey {
            instance: "main".into(),
            action: Digest::of(b"action"),
        }
    }

    #[tokio::test]
    async fn disk_entries_persist_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let result = ActionResult {
            exit_code: 3,
            ..Default::default()
        };
        {
            let cache = DiskActionCache::open(dir.path(), true).unwrap();
            cache.put(&key(), &result).await.unwrap();
        }
        let cache = DiskActionCache::open(dir.path(), true).unwrap();
        assert_eq!(cache.get(&key()).await.unwrap(), Some(result));
        let other_instance = ActionKey {
            instance: "other".into(),
            ..key()
        };
        assert_eq!(cache.get(&other_instance).await.unwrap(), None);

        let path = cache.path(&key());
        let mut bytes = fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 0xff;
        fs::write(&path, bytes).unwrap();
        assert_eq!(cache.get(&key()).await.unwrap(), None);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn results_with_missing_blobs_are_hidden() {
        let cas = Arc::new(MemoryStore::new());
        let file = Bytes::from_static(b"file in a tree");
        let file_digest = Digest::of(&file);
        let tree = Tree {
            root: Some(Directory {
                files: vec![FileNode {
                    name: "f".into(),
                    digest: Some(file_digest.to_proto()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            children: vec![],
        };
        let (tree_digest, tree_bytes) = Digest::of_message(&tree);
        let out = Bytes::from_static(b"output");
        let out_digest = Digest::of(&out);
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: "out".into(),
                digest: Some(out_digest.to_proto()),
                ..Default::default()
            }],
            output_directories: vec![OutputDirectory {
                path: "dir".into(),
                tree_digest: Some(tree_digest.to_proto()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let cache =
            CompletenessChecking::new(Arc::new(MemoryActionCache::new(10)), cas.clone(), 1000);
        cache.put(&key(), &result).await.unwrap();
        assert_eq!(cache.get(&key()).await.unwrap(), None);
        cas.put(&out_digest, out).await.unwrap();
        cas.put(&tree_digest, tree_bytes.into()).await.unwrap();
        assert_eq!(
            cache.get(&key()).await.unwrap(),
            None,
            "file inside the tree is missing"
        );
        cas.put(&file_digest, file).await.unwrap();
        assert_eq!(cache.get(&key()).await.unwrap(), Some(result));
    }
}
