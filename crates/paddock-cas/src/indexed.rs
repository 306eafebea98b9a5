//! A layer that keeps a remote store's contents in an index, and collects its garbage.
//!
//! An object store answers "do you have X" one blob and one round trip at a time, and
//! several servers write it at once, so the layer keeps a [`BlobIndex`] (a database
//! table) of what the store below holds, and answers `find_missing` from it in one
//! query. The index follows the store, never leads it: a blob is listed only after
//! the store has committed it, and a blob listed but missing from the store is
//! dropped from the index when a read finds it gone, and reads as missing.
//!
//! Every use of a blob (written, read, found by `find_missing`, which is also how
//! the ActionCache checks a result's outputs) renews its lease. Collection removes
//! least recently used blobs while the store is over its bound, but never one
//! used within the lease: clients that were told a blob exists may count on it for
//! that long. Collection unlists a batch of blobs and marks them as being deleted
//! before it deletes them from the store; a writer of one of those blobs waits
//! until the deletion is over and uploads it again, so a deletion cannot remove an
//! upload that the index goes on to list.
//!
//! Leases are renewed only once they are a renewal interval old
//! ([`lease_renewal`]), which buys two things. Renewals are batched: uses are
//! noted in memory and written once a second (sooner for leases under 20 s). And
//! the layer remembers, for one renewal interval, the blobs it has seen listed
//! (or listed itself): within that time no collection anywhere can take them, so
//! `find_missing` answers for them without probing the index, only checking that
//! no server unlisted them meanwhile ([`BlobIndex::unlisted_lately`]), and notes
//! their use (those whose trust ran out while the index was asked are looked up
//! after all, so the trust holds when the answer is made). A lease answered for
//! that way is at most two intervals old, so collection leaves two and a half
//! intervals past the lease (the half for the statements of a lookup that found a
//! lease fresh when it began): a lease holds in full even if the server stops
//! before writing the renewals it noted.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use hashlink::LinkedHashMap;
use paddock_reapi::Digest;
use parking_lot::Mutex;

use crate::blob::{BlobSink, BlobStore, BlobStream, StoreError, StoredBlob};

/// Blobs a store holds durably, with when each was last used.
#[async_trait]
pub trait BlobIndex: Send + Sync + 'static {
    /// The digests among `digests` the index does not list. Of those it lists, it
    /// renews the leases that are stale (over a renewal interval old).
    async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError>;

    /// Renews the leases of those of `digests` that are listed.
    async fn touch(&self, digests: &[Digest]) -> Result<(), StoreError>;

    /// Before an upload: whether the blob is listed already (its lease renewed);
    /// if it is being collected, waits until the store no longer holds it.
    async fn prepare_write(&self, digest: &Digest) -> Result<bool, StoreError>;

    /// Lists a blob that the store now holds durably.
    async fn admit(&self, digest: &Digest) -> Result<(), StoreError>;

    /// Unlists a blob the store turned out not to hold.
    async fn forget(&self, digest: &Digest) -> Result<(), StoreError>;

    /// Those of `digests` that any server unlisted with [`BlobIndex::forget`]
    /// within a renewal interval and a margin (or all, if the index cannot tell):
    /// blobs trusted from memory are looked up again.
    async fn unlisted_lately(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError>;

    /// Unlists the next batch of at most `batch` blobs to collect, least recently
    /// used first, none used within `lease`, only as many as bring the listed total
    /// under `capacity`, and marks them as being deleted; also hands back the
    /// deletions a collector that died left unfinished. `None` when another server
    /// is collecting.
    async fn select_garbage(
        &self,
        capacity: u64,
        lease: Duration,
        batch: usize,
    ) -> Result<Option<Vec<Digest>>, StoreError>;

    /// The store no longer holds `digests`, which [`BlobIndex::select_garbage`]
    /// handed out.
    async fn collected(&self, digests: &[Digest]) -> Result<(), StoreError>;
}

/// How stale a lease may grow before a use renews it: a tenth of the lease, at most
/// a minute. Collection allows for two and a half times that (see the module's
/// documentation).
pub fn lease_renewal(lease: Duration) -> Duration {
    (lease / 10).min(Duration::from_secs(60))
}

/// When blobs are collected.
#[derive(Debug, Clone, Copy)]
pub struct Collection {
    /// The store's bound in bytes.
    pub capacity: u64,
    /// Blobs used within this time are kept whatever the bound.
    pub lease: Duration,
    /// How often a collection runs.
    pub interval: Duration,
}

/// Blobs unlisted and deleted at a time.
const COLLECT_BATCH: usize = 1_000;
/// Deletions sent to the store at once.
const DELETE_CONCURRENCY: usize = 16;
/// How many listed blobs the layer remembers.
const KNOWN_CAPACITY: usize = 1 << 20;
/// Uses noted before they are written; beyond it, further ones are not (the leases
/// answered for hold in full anyway, as collection allows for them; the blobs'
/// next lookups renew them).
const RENEWALS_CAPACITY: usize = 1 << 20;
/// Leases renewed by one statement.
const RENEWAL_BATCH: usize = 10_000;

pub struct Indexed {
    index: Arc<dyn BlobIndex>,
    store: Arc<dyn BlobStore>,
    collection: Collection,
    known: Arc<Known>,
    /// Uses whose leases are still to be renewed.
    renewals: Mutex<HashSet<Digest>>,
}

/// Blobs seen listed, and when; trusted for one renewal interval, within which no
/// collection can take them.
struct Known {
    seen: Mutex<LinkedHashMap<Digest, Instant>>,
    trust: Duration,
}

impl Known {
    /// Notes `digests` seen listed, with leases renewed within the renewal
    /// interval, as of `at`.
    fn remember(&self, at: Instant, digests: impl IntoIterator<Item = Digest>) {
        let mut seen = self.seen.lock();
        for digest in digests {
            seen.replace(digest, at);
        }
        while seen.len() > KNOWN_CAPACITY {
            seen.pop_front();
        }
    }

    fn forget(&self, digests: &[Digest]) {
        let mut seen = self.seen.lock();
        for digest in digests {
            seen.remove(digest);
        }
    }

    /// Splits `digests` into those seen listed within the trust interval and the
    /// rest.
    fn split(&self, digests: impl Iterator<Item = Digest>) -> (Vec<Digest>, Vec<Digest>) {
        let seen = self.seen.lock();
        digests.partition(|d| seen.get(d).is_some_and(|at| at.elapsed() < self.trust))
    }
}

impl Indexed {
    pub fn new(
        index: Arc<dyn BlobIndex>,
        store: Arc<dyn BlobStore>,
        collection: Collection,
    ) -> Indexed {
        Indexed {
            index,
            store,
            collection,
            known: Arc::new(Known {
                seen: Mutex::new(LinkedHashMap::new()),
                trust: lease_renewal(collection.lease),
            }),
            renewals: Mutex::new(HashSet::new()),
        }
    }

    /// While the process runs: writes noted uses every second (or half a renewal
    /// interval, if that is shorter), and collects garbage every
    /// `collection.interval`.
    pub fn spawn_maintenance(self: &Arc<Self>) {
        let layer = Arc::downgrade(self);
        let interval = self.collection.interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(layer) = layer.upgrade() else {
                    return;
                };
                if let Err(e) = layer.collect().await {
                    tracing::warn!(error = %e, "collecting the CAS's garbage failed; trying again at the next interval");
                }
            }
        });
        // Noted uses are written within half a renewal interval.
        let period = (lease_renewal(self.collection.lease) / 2)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let layer = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(layer) = layer.upgrade() else {
                    return;
                };
                layer.write_renewals().await;
            }
        });
    }

    /// Renews the leases of the uses noted since the last time; those it could not
    /// are tried again next time.
    async fn write_renewals(&self) {
        let due: Vec<Digest> = std::mem::take(&mut *self.renewals.lock())
            .into_iter()
            .collect();
        for (at, batch) in due.chunks(RENEWAL_BATCH).enumerate() {
            if let Err(e) = self.index.touch(batch).await {
                tracing::warn!(blobs = due.len() - at * RENEWAL_BATCH, error = %e, "could not renew blobs' leases; trying again shortly");
                self.note_uses(&due[at * RENEWAL_BATCH..]);
                return;
            }
        }
    }

    /// Notes uses whose leases are to be renewed (up to [`RENEWALS_CAPACITY`]).
    fn note_uses<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) {
        let mut renewals = self.renewals.lock();
        for digest in digests {
            if renewals.len() >= RENEWALS_CAPACITY {
                return;
            }
            renewals.insert(*digest);
        }
    }

    /// One collection: batches of blobs unlisted and deleted until the store fits
    /// its bound or only leased blobs are left; the number of blobs deleted.
    pub async fn collect(&self) -> Result<u64, StoreError> {
        let started = Instant::now();
        // This server's own noted uses first: a blob it was just asked for stays.
        self.write_renewals().await;
        let (mut blobs, mut bytes) = (0u64, 0u64);
        loop {
            let Some(batch) = self
                .index
                .select_garbage(
                    self.collection.capacity,
                    self.collection.lease,
                    COLLECT_BATCH,
                )
                .await?
            else {
                return Ok(0);
            };
            if batch.is_empty() {
                break;
            }
            self.known.forget(&batch);
            let deleted: Vec<Result<Digest, StoreError>> = futures::stream::iter(batch)
                .map(|digest| async move { self.store.delete(&digest).await.map(|()| digest) })
                .buffer_unordered(DELETE_CONCURRENCY)
                .collect()
                .await;
            let mut done = Vec::with_capacity(deleted.len());
            for result in deleted {
                match result {
                    Ok(digest) => done.push(digest),
                    // Left marked: a later collection finishes it.
                    Err(e) => tracing::warn!(error = %e, "could not delete a collected blob"),
                }
            }
            self.index.collected(&done).await?;
            blobs += done.len() as u64;
            bytes += done.iter().map(|d| d.size()).sum::<u64>();
            if done.is_empty() {
                break;
            }
        }
        metrics::counter!("paddock_cas_collected_blobs_total").increment(blobs);
        metrics::counter!("paddock_cas_collected_bytes_total").increment(bytes);
        metrics::histogram!("paddock_cas_collection_seconds")
            .record(started.elapsed().as_secs_f64());
        if blobs > 0 {
            tracing::info!(
                blobs,
                bytes,
                seconds = started.elapsed().as_secs_f64(),
                "collected the CAS's least recently used blobs"
            );
        }
        Ok(blobs)
    }
}

#[async_trait]
impl BlobStore for Indexed {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        // Taken before the index is asked: a lease the index finds fresh was at
        // least as fresh then, and is trusted for one renewal interval from then.
        let asked = Instant::now();
        let (known, unknown) = self.known.split(digests.iter().copied());
        // Blobs remembered are checked against other servers' unlistings; the
        // index renews the leases of those it lists.
        let unlisted = async {
            match known.is_empty() {
                true => Ok(Vec::new()),
                false => self.index.unlisted_lately(&known).await,
            }
        };
        let lookup = async {
            match unknown.is_empty() {
                true => Ok(Vec::new()),
                false => self.index.missing(&unknown).await,
            }
        };
        let (unlisted, mut missing) = futures::try_join!(unlisted, lookup)?;
        self.known.forget(&unlisted);
        let gone: HashSet<&Digest> = unlisted.iter().collect();
        let mut trusted: Vec<Digest> = known.into_iter().filter(|d| !gone.contains(d)).collect();
        // Those unlisted, and those whose trust ran out while the index was asked,
        // are looked up after all, until the trust of the rest is checked with no
        // wait before the answer.
        let mut again = unlisted;
        let mut looked_up = unknown;
        loop {
            let (still, expired) = self.known.split(trusted.into_iter());
            trusted = still;
            again.extend(expired);
            if again.is_empty() {
                break;
            }
            missing.extend(self.index.missing(&again).await?);
            looked_up.append(&mut again);
        }
        self.note_uses(&trusted);
        let absent: HashSet<&Digest> = missing.iter().collect();
        self.known
            .remember(asked, looked_up.into_iter().filter(|d| !absent.contains(d)));
        Ok(missing)
    }

    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobStream>, StoreError> {
        match self.store.read(digest, offset).await? {
            Some(stream) => {
                self.note_uses([digest]);
                Ok(Some(stream))
            }
            None => {
                self.known.forget(&[*digest]);
                self.index.forget(digest).await?;
                Ok(None)
            }
        }
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>, StoreError> {
        let asked = Instant::now();
        if self.index.prepare_write(digest).await? {
            if self.store.find_missing(&[*digest]).await?.is_empty() {
                self.known.remember(asked, [*digest]);
                return Ok(Box::new(AlreadyStored { written: 0 }));
            }
            tracing::warn!(%digest, "the CAS index listed a blob its store did not hold; storing it again");
            self.known.forget(&[*digest]);
            self.index.forget(digest).await?;
        }
        Ok(Box::new(Admitting {
            digest: *digest,
            inner: self.store.write(digest).await?,
            index: self.index.clone(),
            known: self.known.clone(),
        }))
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        self.known.forget(&[*digest]);
        self.index.forget(digest).await?;
        self.store.delete(digest).await
    }

    async fn list(&self) -> Result<Vec<StoredBlob>, StoreError> {
        self.store.list().await
    }

    async fn renew(&self, digest: &Digest) -> Result<(), StoreError> {
        self.note_uses([digest]);
        Ok(())
    }
}

/// A write to the store, listed in the index once committed.
struct Admitting {
    digest: Digest,
    inner: Box<dyn BlobSink>,
    index: Arc<dyn BlobIndex>,
    known: Arc<Known>,
}

#[async_trait]
impl BlobSink for Admitting {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.inner.write(chunk).await
    }

    fn written(&self) -> u64 {
        self.inner.written()
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.inner.commit().await?;
        let asked = Instant::now();
        self.index.admit(&self.digest).await?;
        self.known.remember(asked, [self.digest]);
        Ok(())
    }
}

/// A write of a blob the store holds already: the bytes are counted (a layer above
/// still hashes them) and dropped.
struct AlreadyStored {
    written: u64,
}

#[async_trait]
impl BlobSink for AlreadyStored {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.written += chunk.len() as u64;
        Ok(())
    }

    fn written(&self) -> u64 {
        self.written
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        Ok(())
    }
}
