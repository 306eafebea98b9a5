//! Builds the storage stacks that the configuration asks for.

use std::path::Path;
use std::sync::Arc;

use paddock_config::{ReadVerification, StorageBackend, StorageConfig};

use crate::{
    ActionCache, BlobIndex, BlobStore, Collection, CompletenessChecking, DiskActionCache,
    DiskStore, FastSlow, Indexed, MemoryActionCache, MemoryStore, SizeBounded, StoreError,
    Verifying, WithEmptyBlob,
};

/// A store several servers share (the object store), with the index that says what
/// it holds.
pub struct Remote {
    pub store: Arc<dyn BlobStore>,
    pub index: Arc<dyn BlobIndex>,
}

/// The server's CAS: `WithEmptyBlob(Verifying(inner))`, where `inner` is
/// `SizeBounded(backend)` for the disk and memory backends, and for `s3`
/// `FastSlow(SizeBounded(disk), Indexed(remote))`, whose collector this starts.
///
/// Reads are re-hashed only where a disk is involved, whose files can be damaged
/// behind the server's back; memory holds only what was verified on the way in, and
/// what comes from the object store is hashed as it is copied to the fast tier.
pub async fn open_cas(
    config: &StorageConfig,
    data_dir: &Path,
    remote: Option<Remote>,
) -> Result<Arc<dyn BlobStore>, StoreError> {
    let disk = || DiskStore::open(&data_dir.join("cas"), config.fsync);
    let inner: Arc<dyn BlobStore> = match (config.backend, remote) {
        (StorageBackend::Disk, _) => {
            Arc::new(SizeBounded::new(Arc::new(disk()?), config.max_size.bytes(), "cas").await?)
        }
        (StorageBackend::Memory, _) => Arc::new(
            SizeBounded::new(Arc::new(MemoryStore::new()), config.max_size.bytes(), "cas").await?,
        ),
        (StorageBackend::S3, Some(remote)) => {
            let fast = SizeBounded::new(
                Arc::new(disk()?),
                config.fast_tier_size.bytes(),
                "fast-tier",
            )
            .await?;
            let indexed = Arc::new(Indexed::new(
                remote.index,
                remote.store,
                Collection {
                    capacity: config.max_size.bytes(),
                    lease: config.blob_lease.get(),
                    interval: config.collect_interval.get(),
                },
            ));
            indexed.spawn_maintenance();
            Arc::new(FastSlow::new(Arc::new(fast), indexed))
        }
        (StorageBackend::S3, None) => {
            return Err(StoreError::Unavailable(
                "storage.backend = \"s3\" needs the object store and its index".into(),
            ))
        }
    };
    let verify_reads = match config.backend {
        StorageBackend::Memory => ReadVerification::Never,
        StorageBackend::Disk | StorageBackend::S3 => config.verify_reads,
    };
    let verifying = Verifying::new(inner, verify_reads);
    Ok(Arc::new(WithEmptyBlob::new(Arc::new(verifying))))
}

/// The server's ActionCache: `CompletenessChecking(backend)` over `cas`, where the
/// backend is `shared` (one that several servers share) or the storage's own.
pub fn open_action_cache(
    config: &StorageConfig,
    data_dir: &Path,
    cas: Arc<dyn BlobStore>,
    shared: Option<Arc<dyn ActionCache>>,
) -> Result<Arc<dyn ActionCache>, StoreError> {
    let backend: Arc<dyn ActionCache> = match (shared, config.backend) {
        (Some(shared), _) => shared,
        (None, StorageBackend::Disk | StorageBackend::S3) => Arc::new(DiskActionCache::open(
            &data_dir.join("action-cache"),
            config.fsync,
        )?),
        (None, StorageBackend::Memory) => {
            Arc::new(MemoryActionCache::new(config.action_cache_max_entries))
        }
    };
    Ok(Arc::new(CompletenessChecking::new(
        backend,
        cas,
        config.max_tree_directories,
    )))
}
