//! Where images come from: a registry (the OCI distribution API) or an OCI layout
//! directory on the worker. Both hand out manifests, configs and layer blobs, and
//! both check every byte against its digest before it is used.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use oci_client::client::{current_platform_resolver, ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::reference::{check_digest, ImageRef};

/// Manifests and configs are small; anything bigger is refused unread.
const MAX_METADATA: i64 = 16 << 20;

/// How the worker reaches registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Registries reached over plain HTTP (loopback ones always are).
    pub insecure: Vec<String>,
    /// `(username, password)` per registry host.
    pub credentials: HashMap<String, (String, String)>,
}

/// One client per registry host (each knows whether it speaks HTTP or HTTPS).
pub struct Registries {
    options: RegistryOptions,
    clients: Mutex<HashMap<String, Client>>,
}

impl Registries {
    pub fn new(options: RegistryOptions) -> Registries {
        Registries {
            options,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self, registry: &str) -> Client {
        self.clients
            .lock()
            .entry(registry.to_owned())
            .or_insert_with(|| {
                let plain =
                    is_loopback(registry) || self.options.insecure.iter().any(|r| r == registry);
                Client::new(ClientConfig {
                    protocol: if plain {
                        ClientProtocol::Http
                    } else {
                        ClientProtocol::Https
                    },
                    platform_resolver: Some(Box::new(current_platform_resolver)),
                    connect_timeout: Some(std::time::Duration::from_secs(10)),
                    read_timeout: Some(std::time::Duration::from_secs(60)),
                    ..ClientConfig::default()
                })
            })
            .clone()
    }

    fn auth(&self, registry: &str) -> RegistryAuth {
        match self.options.credentials.get(registry) {
            Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    /// The source of one image.
    pub fn source(&self, image: &ImageRef) -> Source {
        match image {
            ImageRef::Registry { name, .. } => {
                let registry = name.resolve_registry().to_owned();
                Source::Registry {
                    client: self.client(&registry),
                    auth: self.auth(&registry),
                    name: name.clone(),
                }
            }
            ImageRef::Layout { dir, .. } => Source::Layout { dir: dir.clone() },
        }
    }
}

/// `localhost`, `127.0.0.0/8` and `::1`, with or without a port: plain HTTP, as
/// Docker allows.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

pub enum Source {
    Registry {
        client: Client,
        auth: RegistryAuth,
        name: Reference,
    },
    Layout {
        dir: PathBuf,
    },
}

impl Source {
    /// The image manifest for this worker's platform, and its digest: the pinned
    /// `digest` if given (an index is resolved to the entry for this platform), else
    /// whatever the tag points at now.
    pub async fn manifest(
        &self,
        digest: Option<&str>,
    ) -> Result<(OciImageManifest, String), String> {
        match self {
            Source::Registry { client, auth, name } => {
                let reference = match digest {
                    Some(d) => name.clone_with_digest(d.to_owned()),
                    None => name.clone(),
                };
                let (manifest, digest) = client
                    .pull_image_manifest(&reference, auth)
                    .await
                    .map_err(|e| format!("cannot get the manifest: {e}"))?;
                check_digest(&reference.whole(), &digest)?;
                Ok((manifest, digest))
            }
            Source::Layout { dir } => {
                let digest = digest.ok_or("an OCI layout image needs a digest")?;
                let bytes = read_layout_blob(dir, digest).await?;
                match serde_json::from_slice::<OciManifest>(&bytes)
                    .map_err(|e| format!("{digest} in {} is not a manifest: {e}", dir.display()))?
                {
                    OciManifest::Image(manifest) => Ok((manifest, digest.to_owned())),
                    OciManifest::ImageIndex(index) => {
                        let chosen =
                            current_platform_resolver(&index.manifests).ok_or_else(|| {
                                format!(
                                    "the index {digest} has no image for this worker's platform"
                                )
                            })?;
                        let chosen = check_digest(digest, &chosen)?;
                        let bytes = read_layout_blob(dir, &chosen).await?;
                        match serde_json::from_slice::<OciManifest>(&bytes) {
                            Ok(OciManifest::Image(manifest)) => Ok((manifest, chosen)),
                            _ => Err(format!(
                                "{chosen} in {} is not an image manifest",
                                dir.display()
                            )),
                        }
                    }
                }
            }
        }
    }

    /// A small blob (the image config), verified.
    pub async fn small_blob(&self, descriptor: &OciDescriptor) -> Result<Vec<u8>, String> {
        check_digest(&descriptor.digest, &descriptor.digest)?;
        if !(0..=MAX_METADATA).contains(&descriptor.size) {
            return Err(format!(
                "{} is {} bytes; configs over {MAX_METADATA} bytes are refused",
                descriptor.digest, descriptor.size
            ));
        }
        let bytes = match self {
            Source::Registry { client, name, .. } => {
                let mut out = Vec::with_capacity(descriptor.size as usize);
                client
                    .pull_blob(name, descriptor, &mut out)
                    .await
                    .map_err(|e| format!("cannot get {}: {e}", descriptor.digest))?;
                out
            }
            Source::Layout { dir } => read_layout_blob(dir, &descriptor.digest).await?,
        };
        if bytes.len() as i64 != descriptor.size {
            return Err(format!(
                "{} has {} bytes, not the {} its descriptor says",
                descriptor.digest,
                bytes.len(),
                descriptor.size
            ));
        }
        Ok(bytes)
    }

    /// Streams a layer blob into `path`, verifying its digest and size; on any
    /// failure `path` is removed.
    pub async fn blob_to_file(
        &self,
        descriptor: &OciDescriptor,
        path: &Path,
    ) -> Result<u64, String> {
        let result = self.write_blob(descriptor, path).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(path).await;
        }
        result
    }

    async fn write_blob(&self, descriptor: &OciDescriptor, path: &Path) -> Result<u64, String> {
        let digest = check_digest(&descriptor.digest, &descriptor.digest)?;
        let file = tokio::fs::File::create(path)
            .await
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        match self {
            // pull_blob streams to `out` and checks the digest at the end.
            Source::Registry { client, name, .. } => client
                .pull_blob(name, descriptor, &mut out)
                .await
                .map_err(|e| format!("cannot get the layer {digest}: {e}"))?,
            Source::Layout { dir } => {
                let from = layout_blob_path(dir, &digest);
                let mut input = tokio::fs::File::open(&from)
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", from.display()))?;
                let mut sha = Sha256::new();
                let mut buffer = vec![0u8; 1 << 20];
                loop {
                    let n = tokio::io::AsyncReadExt::read(&mut input, &mut buffer)
                        .await
                        .map_err(|e| format!("reading {}: {e}", from.display()))?;
                    if n == 0 {
                        break;
                    }
                    sha.update(&buffer[..n]);
                    out.write_all(&buffer[..n])
                        .await
                        .map_err(|e| format!("writing {}: {e}", path.display()))?;
                }
                let actual = format!("sha256:{}", hex::encode(sha.finalize()));
                if actual != digest {
                    return Err(format!(
                        "the layer {digest} in {} has the digest {actual}",
                        dir.display()
                    ));
                }
            }
        }
        out.flush()
            .await
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|e| format!("reading {}: {e}", path.display()))?
            .len();
        if size as i64 != descriptor.size {
            return Err(format!(
                "the layer {digest} has {size} bytes, not the {} its descriptor says",
                descriptor.size
            ));
        }
        Ok(size)
    }
}

fn layout_blob_path(dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    dir.join("blobs/sha256").join(hex)
}

/// A manifest or config from a layout, bounded and verified.
async fn read_layout_blob(dir: &Path, digest: &str) -> Result<Vec<u8>, String> {
    let path = layout_blob_path(dir, digest);
    let meta = tokio::fs::metadata(&path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.len() > MAX_METADATA as u64 {
        return Err(format!(
            "{} is too large for a manifest or config",
            path.display()
        ));
    }
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    if actual != digest {
        return Err(format!(
            "{} has the digest {actual}, not {digest}",
            path.display()
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_plain_http() {
        for plain in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.3.2.1",
            "[::1]:5000",
        ] {
            assert!(is_loopback(plain), "{plain}");
        }
        for tls in [
            "ghcr.io",
            "10.0.0.1:5000",
            "localhost.example:5000",
            "[2001:db8::1]:443",
        ] {
            assert!(!is_loopback(tls), "{tls}");
        }
    }
}
