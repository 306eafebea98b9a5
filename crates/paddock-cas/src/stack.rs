//! Builds the storage stacks that the configuration asks for.

use std::path::Path;
use std::sync::Arc;

use paddock_config::{ReadVerification, StorageBackend, StorageConfig};

use crate::{
    ActionCache, BlobStore, CompletenessChecking, DiskActionCache, DiskStore, MemoryActionCache,
    MemoryStore, SizeBounded, StoreError, Verifying, WithEmptyBlob,
};

/// The server's CAS: `WithEmptyBlob(Verifying(SizeBounded(backend)))`.
///
/// Reads are re-hashed only for the disk backend, whose files can be damaged behind
/// the server's back; memory holds only what was verified on the way in.
pub async fn open_cas(
    config: &StorageConfig,
    data_dir: &Path,
) -> Result<Arc<dyn BlobStore>, StoreError> {
    let backend: Arc<dyn BlobStore> = match config.backend {
        StorageBackend::Disk => Arc::new(DiskStore::open(&data_dir.join("cas"), config.fsync)?),
        StorageBackend::Memory => Arc::new(MemoryStore::new()),
    };
    let bounded = SizeBounded::new(backend, config.max_size.bytes(), "cas").await?;
    let verify_reads = match config.backend {
        StorageBackend::Disk => config.verify_reads,
        StorageBackend::Memory => ReadVerification::Never,
    };
    let verifying = Verifying::new(Arc::new(bounded), verify_reads);
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
        (None, StorageBackend::Disk) => Arc::new(DiskActionCache::open(
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
