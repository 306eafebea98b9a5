//! Where images come from: a registry (the OCI distribution API, through
//! [`Registries`]) or an OCI layout directory among those the worker's operator
//! named. Both hand out manifests, configs and layer blobs, and both check every
//! byte against its digest before it is used.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_client::client::current_platform_resolver;
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use paddock_fs::Dir;
use paddock_sandbox::ResolveError;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::reference::{check_digest, ImageRef};
use crate::registry::{Registries, Repository, MAX_METADATA};

pub enum Source {
    Registry {
        registries: Arc<Registries>,
        repository: Repository,
        /// The tag, for an image whose digest is not pinned.
        tag: Option<String>,
    },
    Layout {
        /// The directory the operator named, and the layout's place beneath it.
        base: PathBuf,
        dir: PathBuf,
    },
}

fn precondition(message: impl Into<String>) -> ResolveError {
    ResolveError::Precondition(message.into())
}

impl Source {
    /// The source of `image`: layouts only inside the directories in `layouts`.
    pub fn of(
        image: &ImageRef,
        registries: &Arc<Registries>,
        layouts: &[PathBuf],
    ) -> Result<Source, ResolveError> {
        match image {
            ImageRef::Registry { name, .. } => {
                let registry = name.resolve_registry().to_owned();
                registries.check(&registry)?;
                Ok(Source::Registry {
                    registries: registries.clone(),
                    repository: Repository {
                        registry,
                        name: name.repository().to_owned(),
                    },
                    tag: name.tag().map(str::to_owned),
                })
            }
            ImageRef::Layout { dir, .. } => {
                let base = layouts.iter().find(|base| dir.starts_with(base)).ok_or_else(|| {
                    precondition(format!(
                        "{} is not in a directory this worker takes OCI layouts from ([worker.oci] layouts)",
                        dir.display()
                    ))
                })?;
                Ok(Source::Layout {
                    base: base.clone(),
                    dir: dir.clone(),
                })
            }
        }
    }

    /// The image manifest for this worker's platform, and its digest: the pinned
    /// `digest` if given (an index is resolved to the entry for this platform), else
    /// whatever the tag points at now.
    pub async fn manifest(
        &self,
        digest: Option<&str>,
    ) -> Result<(OciImageManifest, String), ResolveError> {
        let (bytes, digest) = match (self, digest) {
            (Source::Registry { .. }, Some(d)) => self.manifest_bytes(d).await?,
            (Source::Registry { tag, .. }, None) => {
                self.manifest_bytes(tag.as_deref().unwrap_or("latest"))
                    .await?
            }
            (Source::Layout { .. }, Some(d)) => self.manifest_bytes(d).await?,
            (Source::Layout { .. }, None) => {
                return Err(precondition("an OCI layout image needs a digest"))
            }
        };
        let parsed = serde_json::from_slice::<OciManifest>(&bytes)
            .map_err(|_| precondition(format!("{digest} is not an image manifest or index")))?;
        match parsed {
            OciManifest::Image(manifest) => Ok((manifest, digest)),
            OciManifest::ImageIndex(index) => {
                let chosen = current_platform_resolver(&index.manifests).ok_or_else(|| {
                    precondition(format!(
                        "the index {digest} has no image for this worker's platform"
                    ))
                })?;
                let chosen = check_digest(&digest, &chosen).map_err(precondition)?;
                let (bytes, chosen) = self.manifest_bytes(&chosen).await?;
                match serde_json::from_slice::<OciManifest>(&bytes) {
                    Ok(OciManifest::Image(manifest)) => Ok((manifest, chosen)),
                    _ => Err(precondition(format!("{chosen} is not an image manifest"))),
                }
            }
        }
    }

    async fn manifest_bytes(&self, reference: &str) -> Result<(Vec<u8>, String), ResolveError> {
        match self {
            Source::Registry {
                registries,
                repository,
                ..
            } => {
                let (bytes, digest) = registries.manifest(repository, reference).await?;
                Ok((bytes.to_vec(), digest))
            }
            Source::Layout { base, dir } => {
                let bytes = read_layout_blob(base, dir, reference).await?;
                Ok((bytes, reference.to_owned()))
            }
        }
    }

    /// A small blob (the image config), verified.
    pub async fn small_blob(&self, descriptor: &OciDescriptor) -> Result<Vec<u8>, ResolveError> {
        check_digest(&descriptor.digest, &descriptor.digest).map_err(precondition)?;
        let size = u64::try_from(descriptor.size).unwrap_or(u64::MAX);
        if size > MAX_METADATA {
            return Err(precondition(format!(
                "{} is {} bytes; configs over {MAX_METADATA} bytes are refused",
                descriptor.digest, descriptor.size
            )));
        }
        match self {
            Source::Registry {
                registries,
                repository,
                ..
            } => {
                let mut out = Vec::with_capacity(size as usize);
                registries
                    .blob(repository, &descriptor.digest, size, &mut out)
                    .await?;
                Ok(out)
            }
            Source::Layout { base, dir } => {
                let bytes = read_layout_blob(base, dir, &descriptor.digest).await?;
                if bytes.len() as u64 != size {
                    return Err(precondition(format!(
                        "{} has {} bytes, not the {size} its descriptor says",
                        descriptor.digest,
                        bytes.len()
                    )));
                }
                Ok(bytes)
            }
        }
    }

    /// Streams a layer blob into `path`, verifying its digest and size; on any
    /// failure `path` is removed.
    pub async fn blob_to_file(
        &self,
        descriptor: &OciDescriptor,
        path: &Path,
    ) -> Result<u64, ResolveError> {
        let result = self.write_blob(descriptor, path).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(path).await;
        }
        result
    }

    async fn write_blob(
        &self,
        descriptor: &OciDescriptor,
        path: &Path,
    ) -> Result<u64, ResolveError> {
        let digest = check_digest(&descriptor.digest, &descriptor.digest).map_err(precondition)?;
        let size = u64::try_from(descriptor.size)
            .map_err(|_| precondition(format!("the layer {digest} has a negative size")))?;
        let file = tokio::fs::File::create(path)
            .await
            .map_err(|e| ResolveError::io(format_args!("creating {}", path.display()), e))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let written = match self {
            Source::Registry {
                registries,
                repository,
                ..
            } => registries.blob(repository, &digest, size, &mut out).await?,
            Source::Layout { base, dir } => {
                copy_layout_blob(base, dir, &digest, size, &mut out).await?
            }
        };
        out.flush()
            .await
            .map_err(|e| ResolveError::io(format_args!("writing {}", path.display()), e))?;
        Ok(written)
    }
}

fn layout_blob_name(digest: &str) -> Result<PathBuf, ResolveError> {
    let hex = check_digest(digest, digest).map_err(precondition)?;
    Ok(Path::new("blobs/sha256").join(hex.trim_start_matches("sha256:")))
}

/// Opens a blob of the layout `dir`, beneath the operator's `base` and following no
/// symlink: the path came from a client.
fn open_layout_blob(
    base: &Path,
    dir: &Path,
    digest: &str,
) -> Result<(std::fs::File, u64), ResolveError> {
    let name = layout_blob_name(digest)?;
    let below = dir.strip_prefix(base).unwrap_or(Path::new(""));
    let layout = Dir::open(base)
        .and_then(|base| base.open_dir(below))
        .map_err(|e| precondition(format!("cannot open the layout {}: {e}", dir.display())))?;
    match layout.lookup(&name) {
        Ok(Some(paddock_fs::Found::File(file, stat))) => Ok((file, stat.size)),
        Ok(_) => Err(precondition(format!(
            "the layout {} has no blob {digest}",
            dir.display()
        ))),
        Err(e) => Err(ResolveError::io(
            format_args!("reading the layout {}", dir.display()),
            e,
        )),
    }
}

/// A manifest or config from a layout, bounded and verified.
async fn read_layout_blob(base: &Path, dir: &Path, digest: &str) -> Result<Vec<u8>, ResolveError> {
    let (base, dir, digest) = (base.to_owned(), dir.to_owned(), digest.to_owned());
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let (file, size) = open_layout_blob(&base, &dir, &digest)?;
        if size > MAX_METADATA {
            return Err(precondition(format!(
                "{digest} in {} is too large for a manifest or config",
                dir.display()
            )));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        file.take(MAX_METADATA)
            .read_to_end(&mut bytes)
            .map_err(|e| ResolveError::io(format_args!("reading {digest}"), e))?;
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if actual != digest {
            return Err(precondition(format!(
                "{digest} in {} has the digest {actual}",
                dir.display()
            )));
        }
        Ok(bytes)
    })
    .await
    .map_err(|e| ResolveError::Worker(e.to_string()))?
}

/// Copies a layer blob of `size` bytes from a layout into `out`, verifying it.
async fn copy_layout_blob(
    base: &Path,
    dir: &Path,
    digest: &str,
    size: u64,
    out: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> Result<u64, ResolveError> {
    let (file, actual_size) = open_layout_blob(base, dir, digest)?;
    if actual_size != size {
        return Err(precondition(format!(
            "the layer {digest} in {} has {actual_size} bytes, not the {size} its descriptor says",
            dir.display()
        )));
    }
    let mut input = tokio::fs::File::from_std(file);
    let mut sha = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    loop {
        let n = tokio::io::AsyncReadExt::read(&mut input, &mut buffer)
            .await
            .map_err(|e| ResolveError::io(format_args!("reading {digest}"), e))?;
        if n == 0 {
            break;
        }
        copied += n as u64;
        sha.update(&buffer[..n]);
        out.write_all(&buffer[..n])
            .await
            .map_err(|e| ResolveError::io(format_args!("writing {digest}"), e))?;
    }
    let actual = format!("sha256:{}", hex::encode(sha.finalize()));
    if actual != digest || copied != size {
        return Err(precondition(format!(
            "the layer {digest} in {} has the digest {actual}",
            dir.display()
        )));
    }
    Ok(copied)
}
