//! The worker's unpacked images: one directory per layer chain.
//!
//! A chain is an image's first N layers applied in order, named by its ChainID (the
//! digest of its layers' digests, as the OCI image spec defines it), so images that
//! share base layers share their chains. Each chain directory is complete on its
//! own: it starts as a hard-linked copy of its parent chain, and its layer is applied
//! on top, whiteouts included. An action's root is then a single read-only lower
//! directory under a per-action overlay, however many layers the image has.
//!
//! Chains are built in `tmp/` and renamed into `chains/` only when complete and
//! verified, so nothing partial or corrupt is ever used, even after a crash. The
//! store is bounded: when its total (the unpacked size of each chain's layer) passes
//! the bound, the least recently used chains that no action holds are removed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hashlink::LinkedHashMap;
use paddock_sandbox::ResolveError;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use tokio::sync::OnceCell;

/// The ChainIDs of an image with these layer diff_ids, bottom first.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chains: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chains.last() {
            None => diff_id.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent} {diff_id}").as_bytes()))
            ),
        };
        chains.push(next);
    }
    chains
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

struct Entry {
    bytes: u64,
    /// Actions (and chain builds) using the chain now.
    users: usize,
}

struct Index {
    /// Least recently used first.
    chains: LinkedHashMap<String, Entry>,
    total: u64,
}

/// The chain store under `dir`.
pub struct ChainStore {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    /// Chains being built: concurrent requests wait for one build.
    building: Mutex<HashMap<String, Arc<OnceCell<()>>>>,
}

/// A chain held for use: it is not evicted while this lives.
pub struct ChainLease {
    store: Arc<ChainStore>,
    chain: String,
}

impl ChainLease {
    /// The chain's root directory.
    pub fn root(&self) -> PathBuf {
        self.store.root_of(&self.chain)
    }
}

impl Drop for ChainLease {
    fn drop(&mut self) {
        let mut index = self.store.index.lock();
        if let Some(entry) = index.chains.get_mut(&self.chain) {
            entry.users = entry.users.saturating_sub(1);
        }
        drop(index);
        self.store.evict();
    }
}

impl ChainStore {
    /// Opens the store: unfinished builds are removed, finished chains are indexed
    /// (oldest first) without reading their files.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Arc<ChainStore>> {
        let tmp = dir.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let chains_dir = dir.join("chains");
        std::fs::create_dir_all(&chains_dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&chains_dir)?.flatten() {
            let path = entry.path();
            let bytes = std::fs::read_to_string(path.join("bytes"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            let name = entry.file_name().to_string_lossy().into_owned();
            match bytes {
                Some(bytes) if path.join("root").is_dir() => {
                    let used = entry.metadata().and_then(|m| m.modified()).ok();
                    found.push((used, format!("sha256:{name}"), bytes));
                }
                _ => std::fs::remove_dir_all(&path)?,
            }
        }
        found.sort();
        let mut index = Index {
            chains: LinkedHashMap::new(),
            total: 0,
        };
        for (_, chain, bytes) in found {
            index.total += bytes;
            index.chains.insert(chain, Entry { bytes, users: 0 });
        }
        let store = Arc::new(ChainStore {
            dir: dir.to_path_buf(),
            max_bytes,
            index: Mutex::new(index),
            building: Mutex::new(HashMap::new()),
        });
        store.evict();
        Ok(store)
    }

    fn path_of(&self, chain: &str) -> PathBuf {
        self.dir.join("chains").join(hex_of(chain))
    }

    fn root_of(&self, chain: &str) -> PathBuf {
        self.path_of(chain).join("root")
    }

    /// The unpacked bytes of a stored chain's own layer.
    pub fn bytes(&self, chain: &str) -> Option<u64> {
        self.index.lock().chains.get(chain).map(|e| e.bytes)
    }

    /// A scratch directory for one build.
    pub fn scratch(&self) -> PathBuf {
        self.dir
            .join("tmp")
            .join(format!("{:016x}", rand::random::<u64>()))
    }

    /// Holds `chain` if it is in the store, marking it used now.
    pub fn lease(self: &Arc<Self>, chain: &str) -> Option<ChainLease> {
        let mut index = self.index.lock();
        let entry = index.chains.to_back(chain)?;
        entry.users += 1;
        Some(ChainLease {
            store: self.clone(),
            chain: chain.to_owned(),
        })
    }

    /// Holds `chain`, building it with `build` if it is not there (once, however many
    /// ask at the same time). `build` gets a directory to fill and returns the bytes
    /// it wrote; the chain is stored only if it succeeds.
    pub async fn lease_or_build<F>(
        self: &Arc<Self>,
        chain: &str,
        build: F,
    ) -> Result<ChainLease, ResolveError>
    where
        F: AsyncFnOnce(PathBuf) -> Result<u64, ResolveError>,
    {
        if let Some(lease) = self.lease(chain) {
            return Ok(lease);
        }
        let cell = self
            .building
            .lock()
            .entry(chain.to_owned())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let built = cell
            .get_or_try_init(|| async {
                if self.index.lock().chains.contains_key(chain) {
                    return Ok(());
                }
                let scratch = self.scratch();
                let root = scratch.join("root");
                std::fs::create_dir_all(&scratch).map_err(|e| {
                    ResolveError::io(format_args!("creating {}", scratch.display()), e)
                })?;
                let result = build(root).await;
                let finished = result.and_then(|bytes| {
                    std::fs::write(scratch.join("bytes"), bytes.to_string())
                        .and_then(|_| std::fs::rename(&scratch, self.path_of(chain)))
                        .map_err(|e| {
                            ResolveError::io(format_args!("storing the chain {chain}"), e)
                        })?;
                    Ok(bytes)
                });
                match finished {
                    Ok(bytes) => {
                        let mut index = self.index.lock();
                        index.total += bytes;
                        index
                            .chains
                            .insert(chain.to_owned(), Entry { bytes, users: 0 });
                        metrics::gauge!("paddock_oci_cache_bytes").set(index.total as f64);
                        Ok(())
                    }
                    Err(e) => {
                        remove_in_background(scratch);
                        Err(e)
                    }
                }
            })
            .await
            .map(|_| ());
        self.building.lock().remove(chain);
        built?;
        let lease = self.lease(chain).ok_or_else(|| {
            ResolveError::Worker(format!("the chain {chain} went away as it was built"))
        })?;
        self.evict();
        Ok(lease)
    }

    /// Removes least recently used chains that nobody holds until the total is
    /// within the bound.
    fn evict(&self) {
        let mut index = self.index.lock();
        if index.total <= self.max_bytes {
            return;
        }
        let idle: Vec<String> = index
            .chains
            .iter()
            .filter(|(_, e)| e.users == 0)
            .map(|(k, _)| k.clone())
            .collect();
        for chain in idle {
            if index.total <= self.max_bytes {
                break;
            }
            if let Some(entry) = index.chains.remove(&chain) {
                index.total -= entry.bytes;
                // Out of the way at once (a rename), deleted in the background.
                let doomed = self.scratch();
                if std::fs::rename(self.path_of(&chain), &doomed).is_ok() {
                    remove_in_background(doomed);
                }
                metrics::counter!("paddock_oci_evictions_total").increment(1);
                tracing::info!(%chain, bytes = entry.bytes, "evicted an unpacked layer chain");
            }
        }
        metrics::gauge!("paddock_oci_cache_bytes").set(index.total as f64);
    }

    /// Bytes held now, as counted for the bound.
    pub fn total(&self) -> u64 {
        self.index.lock().total
    }
}

fn remove_in_background(path: PathBuf) {
    let remove = move || {
        let _ = std::fs::remove_dir_all(&path);
    };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn_blocking(remove);
        }
        Err(_) => remove(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let chains = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chains[0], a);
        let expected = hex::encode(Sha256::digest(format!("{a} {b}").as_bytes()));
        assert_eq!(chains[1], format!("sha256:{expected}"));
    }

    #[tokio::test]
    async fn idle_chains_are_evicted_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChainStore::open(dir.path(), 250).unwrap();
        let build = |bytes: u64| {
            async move |root: PathBuf| {
                std::fs::create_dir_all(&root).unwrap();
                Ok::<u64, ResolveError>(bytes)
            }
        };
        let held = store.lease_or_build("sha256:1", build(100)).await.unwrap();
        drop(store.lease_or_build("sha256:2", build(100)).await.unwrap());
        assert_eq!(store.total(), 200);
        // A third pushes the total over: the idle "2" goes, the held "1" stays.
        drop(store.lease_or_build("sha256:3", build(100)).await.unwrap());
        assert!(store.lease("sha256:2").is_none());
        assert!(held.root().is_dir());
        assert!(store.lease("sha256:1").is_some());
        assert_eq!(store.total(), 200);
        // Reopened, the store finds what it had.
        drop(held);
        let again = ChainStore::open(dir.path(), 1000).unwrap();
        assert_eq!(again.total(), 200);
    }
}
