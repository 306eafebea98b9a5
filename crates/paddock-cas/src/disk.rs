//! A blob store of plain files, one per blob, that survives restarts and crashes.
//!
//! Layout: `{root}/blobs/{first two hex digits}/{hash}-{size}`, plus `{root}/tmp` for
//! blobs being written. A blob is written to `tmp`, flushed with `fsync`, and renamed
//! into place, so a file under `blobs/` is always complete: a crash at any moment
//! leaves at worst an orphan in `tmp`, which [`DiskStore::open`] clears. Contents are
//! not re-hashed at start-up (that is what [`crate::Verifying`] does on reads), but a
//! file whose length differs from its name's size is removed on sight.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use paddock_reapi::Digest;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::blob::{BlobSink, BlobStore, BlobStream, StoreError, StoredBlob, READ_CHUNK};

/// Blob files are read-only: nothing may change a blob in place.
const BLOB_MODE: u32 = 0o444;

pub struct DiskStore {
    blobs: PathBuf,
    tmp: PathBuf,
    fsync: bool,
}

impl DiskStore {
    /// Opens (creating if needed) a store under `root`, discarding unfinished writes.
    /// `fsync` makes every committed blob durable before it becomes visible.
    pub fn open(root: &Path, fsync: bool) -> io::Result<Self> {
        let blobs = root.join("blobs");
        let tmp = root.join("tmp");
        for shard in 0..=255u8 {
            fs::create_dir_all(blobs.join(format!("{shard:02x}")))?;
        }
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        Ok(DiskStore { blobs, tmp, fsync })
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        let hash = digest.hash_hex();
        self.blobs
            .join(&hash[..2])
            .join(format!("{hash}-{}", digest.size()))
    }
}

/// Parses a blob file name, `{hash}-{size}`.
fn parse_name(name: &str) -> Option<Digest> {
    let (hash, size) = name.split_once('-')?;
    Digest::parse_parts(hash, size).ok()
}

fn scan(blobs: &Path) -> io::Result<Vec<StoredBlob>> {
    let mut found = Vec::new();
    for shard in fs::read_dir(blobs)? {
        let shard = shard?;
        if !shard.file_type()?.is_dir() {
            continue;
        }
        for entry in fs::read_dir(shard.path())? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(digest) = name.to_str().and_then(parse_name) else {
                tracing::warn!(path = %entry.path().display(), "ignoring a stray file in the blob store");
                continue;
            };
            let meta = entry.metadata()?;
            if meta.len() != digest.size() {
                tracing::warn!(%digest, len = meta.len(), "removing a blob file of the wrong length");
                fs::remove_file(entry.path())?;
                continue;
            }
            let last_used = meta.modified()?;
            found.push(StoredBlob { digest, last_used });
        }
    }
    Ok(found)
}

#[async_trait]
impl BlobStore for DiskStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let paths: Vec<(Digest, PathBuf)> = digests.iter().map(|d| (*d, self.path(d))).collect();
        let missing = tokio::task::spawn_blocking(move || {
            paths
                .into_iter()
                .filter(|(_, p)| !p.exists())
                .map(|(d, _)| d)
                .collect()
        })
        .await
        .map_err(io::Error::other)?;
        Ok(missing)
    }

    async fn read(&self, digest: &Digest, offset: u64) -> Result<Option<BlobStream>, StoreError> {
        let path = self.path(digest);
        let digest = *digest;
        let opened = tokio::task::spawn_blocking(move || -> io::Result<Option<fs::File>> {
            let mut file = match fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            if file.metadata()?.len() != digest.size() {
                tracing::warn!(%digest, "removing a blob file of the wrong length");
                fs::remove_file(&path)?;
                return Ok(None);
            }
            file.seek(SeekFrom::Start(offset.min(digest.size())))?;
            Ok(Some(file))
        })
        .await
        .map_err(io::Error::other)??;
        let Some(file) = opened else {
            return Ok(None);
        };
        let remaining = digest.size().saturating_sub(offset);
        Ok(Some(stream_file(file, remaining)))
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>, StoreError> {
        let tmp_path = self.tmp.join(uuid::Uuid::new_v4().to_string());
        // Created read-only: the open descriptor can still write, nothing else can.
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(BLOB_MODE)
            .open(&tmp_path)
            .await?;
        Ok(Box::new(DiskSink {
            file: Some(file),
            tmp_path,
            final_path: self.path(digest),
            fsync: self.fsync,
            written: 0,
        }))
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        // Small blobs arrive whole: one trip to a blocking thread instead of one per step.
        let tmp_path = self.tmp.join(uuid::Uuid::new_v4().to_string());
        let final_path = self.path(digest);
        let fsync = self.fsync;
        tokio::task::spawn_blocking(move || {
            let written = (|| {
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(BLOB_MODE)
                    .open(&tmp_path)?;
                file.write_all(&data)?;
                if fsync {
                    file.sync_all()?;
                }
                fs::rename(&tmp_path, &final_path)
            })();
            if written.is_err() {
                let _ = fs::remove_file(&tmp_path);
            }
            written
        })
        .await
        .map_err(io::Error::other)??;
        Ok(())
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        match tokio::fs::remove_file(self.path(digest)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn list(&self) -> Result<Vec<StoredBlob>, StoreError> {
        let blobs = self.blobs.clone();
        Ok(tokio::task::spawn_blocking(move || scan(&blobs))
            .await
            .map_err(io::Error::other)??)
    }
}

/// Streams `remaining` bytes of an open file from a blocking thread, a chunk at a time.
fn stream_file(mut file: fs::File, mut remaining: u64) -> BlobStream {
    let (tx, rx) = mpsc::channel::<Result<Bytes, StoreError>>(4);
    tokio::task::spawn_blocking(move || {
        while remaining > 0 {
            let want = remaining.min(READ_CHUNK as u64) as usize;
            let mut buf = BytesMut::zeroed(want);
            let chunk = match file.read_exact(&mut buf) {
                Ok(()) => Ok(buf.freeze()),
                Err(e) => Err(StoreError::Io(e)),
            };
            let failed = chunk.is_err();
            if tx.blocking_send(chunk).is_err() || failed {
                return;
            }
            remaining -= want as u64;
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

struct DiskSink {
    file: Option<tokio::fs::File>,
    tmp_path: PathBuf,
    final_path: PathBuf,
    fsync: bool,
    written: u64,
}

#[async_trait]
impl BlobSink for DiskSink {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let file = self.file.as_mut().expect("sink used after commit");
        file.write_all(&chunk).await?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    fn written(&self) -> u64 {
        self.written
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        let mut file = self.file.take().expect("sink committed twice");
        file.flush().await?;
        if self.fsync {
            file.sync_all().await?;
        }
        drop(file);
        tokio::fs::rename(&self.tmp_path, &self.final_path).await?;
        self.tmp_path = PathBuf::new();
        Ok(())
    }
}

impl Drop for DiskSink {
    fn drop(&mut self) {
        if !self.tmp_path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::read_all;

    #[tokio::test]
    async fn blobs_survive_reopen_and_truncated_files_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let data = Bytes::from_static(b"persistent bytes");
        let digest = Digest::of(&data);
        {
            let store = DiskStore::open(dir.path(), true).unwrap();
            store.put(&digest, data.clone()).await.unwrap();
            // An unfinished write leaves nothing behind once the store reopens.
            let mut sink = store.write(&Digest::of(b"never")).await.unwrap();
            sink.write(Bytes::from_static(b"nev")).await.unwrap();
            std::mem::forget(sink);
        }
        let store = DiskStore::open(dir.path(), true).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let listed = store.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].digest, digest);
        assert_eq!(read_all(&store, &digest).await.unwrap().unwrap(), data);

        // Truncate the file behind the store's back: it is no longer served.
        let path = store.path(&digest);
        let mut perms = fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
        fs::set_permissions(&path, perms).unwrap();
        fs::write(&path, b"short").unwrap();
        assert!(store.read(&digest, 0).await.unwrap().is_none());
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn reads_start_at_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), false).unwrap();
        let data: Bytes = (0..3 * READ_CHUNK + 7)
            .map(|i| i as u8)
            .collect::<Vec<u8>>()
            .into();
        let digest = Digest::of(&data);
        store.put(&digest, data.clone()).await.unwrap();
        let mut stream = store.read(&digest, 5).await.unwrap().unwrap();
        let mut got = Vec::new();
        while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
            let chunk = chunk.unwrap();
            assert!(chunk.len() <= READ_CHUNK);
            got.extend_from_slice(&chunk);
        }
        assert_eq!(&got[..], &data[5..]);
        assert!(store.find_missing(&[digest]).await.unwrap().is_empty());
        store.delete(&digest).await.unwrap();
        assert_eq!(store.find_missing(&[digest]).await.unwrap(), vec![digest]);
    }
}
