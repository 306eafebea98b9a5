//! The worker's local blob cache: read-only files that input roots hard-link to.
//!
//! Layout: `{dir}/{hash}-{size}` (mode 0444) and `{dir}/{hash}-{size}-x` (mode 0555),
//! every one owned by the worker: an action's uid can read them through its links but
//! neither change nor chmod them, so no action can alter what a later one is given.
//! Executability belongs to the inode, and every hard link shares it, so a blob that
//! an action needs executable gets its own entry; it is made from the plain entry by a
//! local copy when that exists, never downloaded twice. Entries are written to `tmp/`
//! and renamed into place, so a present entry is always complete. The cache is
//! bounded; least recently used entries are unlinked first (links already made in
//! action directories stay valid).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::ffi::OsStr;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use hashlink::LinkedHashMap;
use paddock_client::{ClientError, Remote};
use paddock_fs::Dir;
use paddock_reapi::Digest;
use parking_lot::Mutex;

/// How many batch reads one fetch keeps in flight.
const FETCHES_IN_FLIGHT: usize = 4;

/// One cache entry: a blob, and whether its file is executable.
pub type Entry = (Digest, bool);

pub struct FileCache {
    dir: PathBuf,
    /// The cache directory, through which entries are linked into input roots.
    handle: Dir,
    tmp: PathBuf,
    capacity: u64,
    index: Mutex<Index>,
}

#[derive(Default)]
struct Index {
    entries: LinkedHashMap<Entry, ()>,
    total: u64,
}

/// Why blobs could not be made present.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("blobs are missing from the CAS")]
    Missing(Vec<Digest>),
    /// This worker's disk or cache failed.
    #[error("{0}")]
    Worker(String),
    /// The CAS could not be reached, or refused.
    #[error("{0}")]
    Infrastructure(String),
}

fn fetch_failed(digest: &Digest, e: ClientError) -> FetchError {
    match e {
        ClientError::Io(io) => FetchError::Worker(format!("fetching {digest}: {io}")),
        other => FetchError::Infrastructure(format!("fetching {digest}: {other}")),
    }
}

impl From<io::Error> for FetchError {
    fn from(e: io::Error) -> Self {
        FetchError::Worker(format!("local cache: {e}"))
    }
}

fn entry_name((digest, executable): &Entry) -> String {
    let x = if *executable { "-x" } else { "" };
    format!("{}-{}{x}", digest.hash_hex(), digest.size())
}

fn parse_entry(name: &str) -> Option<Entry> {
    let (name, executable) = match name.strip_suffix("-x") {
        Some(n) => (n, true),
        None => (name, false),
    };
    let (hash, size) = name.split_once('-')?;
    Some((Digest::parse_parts(hash, size).ok()?, executable))
}

impl FileCache {
    /// Opens the cache in `dir`, indexing what a previous run left (oldest first).
    pub fn open(dir: &Path, capacity: u64) -> io::Result<FileCache> {
        let tmp = dir.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        let mut found = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let Some(parsed) = entry.file_name().to_str().and_then(parse_entry) else {
                continue;
            };
            let meta = entry.metadata()?;
            if meta.len() != parsed.0.size() {
                fs::remove_file(entry.path())?;
                continue;
            }
            found.push((meta.modified()?, parsed));
        }
        found.sort_by_key(|(t, _)| *t);
        let mut index = Index::default();
        for (_, entry) in found {
            index.total += entry.0.size();
            index.entries.insert(entry, ());
        }
        let cache = FileCache {
            dir: dir.to_owned(),
            handle: Dir::open(dir)?,
            tmp,
            capacity,
            index: Mutex::new(index),
        };
        cache.evict();
        Ok(cache)
    }

    pub fn path(&self, entry: &Entry) -> PathBuf {
        self.dir.join(entry_name(entry))
    }

    fn contains(&self, entry: &Entry) -> bool {
        self.index.lock().entries.to_back(entry).is_some()
    }

    fn admit(&self, entry: Entry) {
        {
            let mut index = self.index.lock();
            if index.entries.insert(entry, ()).is_none() {
                index.total += entry.0.size();
            }
        }
        self.evict();
    }

    fn forget(&self, entry: &Entry) {
        let mut index = self.index.lock();
        if index.entries.remove(entry).is_some() {
            index.total -= entry.0.size();
        }
    }

    fn evict(&self) {
        let evicted: Vec<Entry> = {
            let mut index = self.index.lock();
            let mut out = Vec::new();
            while index.total > self.capacity {
                let Some((entry, ())) = index.entries.pop_front() else {
                    break;
                };
                index.total -= entry.0.size();
                out.push(entry);
            }
            out
        };
        if !evicted.is_empty() {
            metrics::counter!("paddock_store_evictions_total", "store" => "worker")
                .increment(evicted.len() as u64);
        }
        for entry in evicted {
            let _ = fs::remove_file(self.path(&entry));
        }
    }

    /// Writes `data`, already known to match its digest, as an entry and admits it.
    fn write(&self, entry: Entry, data: &[u8]) -> io::Result<()> {
        let tmp = self.tmp.join(uuid::Uuid::new_v4().to_string());
        let mode = if entry.1 { 0o555 } else { 0o444 };
        let written = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            file.write_all(data)?;
            fs::rename(&tmp, self.path(&entry))
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written?;
        self.admit(entry);
        Ok(())
    }

    /// Makes the executable variant of a blob from its plain entry, or the reverse.
    fn derive(&self, entry: Entry) -> io::Result<bool> {
        let other = (entry.0, !entry.1);
        if !self.contains(&other) {
            return Ok(false);
        }
        let tmp = self.tmp.join(uuid::Uuid::new_v4().to_string());
        match fs::copy(self.path(&other), &tmp) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(&other);
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        let mode = if entry.1 { 0o555 } else { 0o444 };
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, self.path(&entry))?;
        self.admit(entry);
        Ok(true)
    }

    /// What of `wanted` the cache cannot provide from what it holds (an entry, the
    /// other variant of a blob, the empty blob), by digest.
    fn local(&self, wanted: &[Entry]) -> io::Result<HashMap<Digest, Vec<Entry>>> {
        let mut to_fetch: HashMap<Digest, Vec<Entry>> = HashMap::new();
        for entry in wanted {
            if self.contains(entry) {
                continue;
            }
            if entry.0.is_empty_blob() {
                self.write(*entry, &[])?;
                continue;
            }
            if self.derive(*entry)? {
                continue;
            }
            to_fetch.entry(entry.0).or_default().push(*entry);
        }
        Ok(to_fetch)
    }

    /// Makes every entry present, downloading what no variant already holds. Blobs
    /// the CAS does not have are reported together. Small blobs come a batch at a
    /// time (a few batches in flight), and each batch is written to disk off the
    /// async threads before the next is read, so memory holds a few batches at most.
    pub async fn ensure(
        self: &Arc<Self>,
        wanted: &[Entry],
        remote: &Remote,
    ) -> Result<(), FetchError> {
        let to_fetch = {
            let (cache, wanted) = (self.clone(), wanted.to_vec());
            tokio::task::spawn_blocking(move || cache.local(&wanted))
                .await
                .map_err(|e| FetchError::Worker(e.to_string()))??
        };
        if to_fetch.is_empty() {
            return Ok(());
        }
        let digests: Vec<Digest> = to_fetch.keys().copied().collect();
        // What locality saves: bytes a worker had to fetch (asked for, found or not).
        let asked: u64 = digests.iter().map(Digest::size).sum();
        metrics::counter!("paddock_worker_fetched_bytes_total").increment(asked);
        let (small, large): (Vec<Digest>, Vec<Digest>) = digests
            .into_iter()
            .partition(|d| d.size() <= remote.batch_budget());
        let to_fetch = &to_fetch;
        let batches = remote.batches(&small).into_iter().map(|batch| async move {
            let blobs: Vec<(Vec<Entry>, Result<Bytes, ClientError>)> = remote
                .read_blobs(&batch)
                .await
                .into_iter()
                .map(|(digest, data)| (to_fetch[&digest].clone(), data))
                .collect();
            let cache = self.clone();
            tokio::task::spawn_blocking(move || cache.write_batch(blobs))
                .await
                .map_err(|e| FetchError::Worker(e.to_string()))?
        });
        let mut missing = Vec::new();
        let mut written = futures::stream::iter(batches).buffer_unordered(FETCHES_IN_FLIGHT);
        while let Some(outcome) = written.next().await {
            missing.extend(outcome?);
        }
        for digest in large {
            let entries = to_fetch[&digest].clone();
            let tmp = self.tmp.join(uuid::Uuid::new_v4().to_string());
            match remote.read_to_file(&digest, &tmp).await {
                Ok(()) => {}
                Err(ClientError::NotFound(d)) => {
                    missing.push(d);
                    continue;
                }
                Err(e) => return Err(fetch_failed(&digest, e)),
            }
            let cache = self.clone();
            tokio::task::spawn_blocking(move || cache.install(tmp, &entries))
                .await
                .map_err(|e| FetchError::Worker(e.to_string()))??;
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(FetchError::Missing(missing))
        }
    }

    /// Writes one batch of fetched blobs (their digests already checked by the
    /// client); returns those the CAS did not have.
    fn write_batch(
        &self,
        blobs: Vec<(Vec<Entry>, Result<Bytes, ClientError>)>,
    ) -> Result<Vec<Digest>, FetchError> {
        let mut missing = Vec::new();
        for (entries, data) in blobs {
            match data {
                Ok(data) => {
                    for entry in &entries {
                        self.write(*entry, &data)?;
                    }
                }
                Err(ClientError::NotFound(d)) => missing.push(d),
                Err(e) => return Err(fetch_failed(&entries[0].0, e)),
            }
        }
        Ok(missing)
    }

    /// Makes the downloaded file `tmp` the first of `entries`, and derives the rest.
    fn install(&self, tmp: PathBuf, entries: &[Entry]) -> io::Result<()> {
        let first = entries[0];
        let mode = if first.1 { 0o555 } else { 0o444 };
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, self.path(&first))?;
        self.admit(first);
        for other in &entries[1..] {
            self.derive(*other)?;
        }
        Ok(())
    }

    /// Reads a cached blob (a Directory, say) into memory.
    pub fn read(&self, entry: &Entry) -> io::Result<Vec<u8>> {
        fs::read(self.path(entry))
    }

    /// Hard-links an entry as `name` in `dir` (an input root being laid out).
    /// `NotFound` means the entry was evicted since it was ensured.
    pub fn link(&self, entry: &Entry, dir: &Dir, name: &OsStr) -> io::Result<()> {
        let from = entry_name(entry);
        match dir.hard_link(&self.handle, OsStr::new(&from), name) {
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                // Another file system: a copy, still the worker's and read-only.
                let mut source = fs::File::open(self.dir.join(&from))?;
                let copy = dir.create_file(name, if entry.1 { 0o555 } else { 0o444 })?;
                io::copy(&mut source, &mut &copy)?;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(entry);
                Err(e)
            }
            other => other,
        }
    }

    /// Keeps an output, staged by the worker as `name` in `staging` (already
    /// re-owned by the worker and read-only, so no action can reach the inode), as
    /// the entry for `digest`: the next action on this worker that needs it links it
    /// instead of downloading it.
    pub fn adopt(
        &self,
        digest: Digest,
        executable: bool,
        staging: &Dir,
        name: &OsStr,
    ) -> io::Result<()> {
        let entry = (digest, executable);
        if self.contains(&entry) {
            return Ok(());
        }
        match staging.rename(name, &self.handle, OsStr::new(&entry_name(&entry))) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => return Ok(()),
            Err(e) => return Err(e),
        }
        self.admit(entry);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_names() {
        let e = (Digest::of(b"x"), true);
        assert_eq!(parse_entry(&entry_name(&e)), Some(e));
        let e = (Digest::of(b"x"), false);
        assert_eq!(parse_entry(&entry_name(&e)), Some(e));
        assert_eq!(parse_entry("junk"), None);
    }

    #[test]
    fn variants_and_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::open(dir.path(), 10).unwrap();
        let d = Digest::of(b"12345");
        cache.write((d, false), b"12345").unwrap();
        assert!(cache.derive((d, true)).unwrap());
        let exec = fs::metadata(cache.path(&(d, true))).unwrap();
        assert_eq!(exec.permissions().mode() & 0o777, 0o555);
        let e = Digest::of(b"abcde");
        cache.write((e, false), b"abcde").unwrap();
        // 15 bytes > 10: the oldest entry (d, plain) went.
        assert!(!cache.path(&(d, false)).exists());
        assert!(cache.path(&(e, false)).exists());
        let out = tempfile::tempdir().unwrap();
        let to = Dir::open(out.path()).unwrap();
        cache.link(&(e, false), &to, OsStr::new("linked")).unwrap();
        assert_eq!(fs::read(out.path().join("linked")).unwrap(), b"abcde");
        // Reopening keeps what is there.
        drop(cache);
        let cache = FileCache::open(dir.path(), 10).unwrap();
        assert!(cache.contains(&(e, false)));
    }
}
