//! Paddock's storage: content-addressed blob stores and action caches.
//!
//! Every blob store implements one trait, [`BlobStore`], and is either a backend
//! ([`MemoryStore`], [`DiskStore`], and the object store in `paddock-objstore`) or a
//! layer that wraps another store and adds one behaviour ([`SizeBounded`] for LRU
//! eviction, [`Verifying`] for hash checks, [`WithEmptyBlob`] for the blob every
//! REAPI server must hold, [`Indexed`] for a shared store's index and leased
//! collection, [`FastSlow`] for a local tier in front of a remote store).
//! [`open_cas`] stacks them as the configuration asks. Action caches follow the same pattern behind
//! [`ActionCache`], with [`CompletenessChecking`] refusing results whose blobs are gone.

mod action_cache;
mod blob;
pub mod compression;
mod disk;
mod empty;
mod fast_slow;
mod indexed;
mod memory;
mod size_bounded;
mod stack;
mod verify;

pub use action_cache::{
    referenced_blobs, ActionCache, ActionKey, CompletenessChecking, DiskActionCache,
    MemoryActionCache, ResultFilter,
};
pub use blob::{
    read_all, skip, BlobSink, BlobStore, BlobStream, StoreError, StoredBlob, READ_CHUNK,
};
pub use disk::DiskStore;
pub use empty::WithEmptyBlob;
pub use fast_slow::FastSlow;
pub use indexed::{lease_renewal, BlobIndex, Collection, Indexed};
pub use memory::MemoryStore;
pub use size_bounded::SizeBounded;
pub use stack::{open_action_cache, open_cas, Remote};
pub use verify::Verifying;
