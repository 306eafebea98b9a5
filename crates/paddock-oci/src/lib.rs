//! Image platforms: an action whose platform names a container image
//! (`container-image`) runs inside that image.
//!
//! [`OciResolver`] turns the property into a root filesystem. It parses the reference
//! ([`reference`]), gets the manifest for this worker's platform and the image config
//! from a registry or an OCI layout directory ([`source`]), and makes sure each of the
//! image's layer chains is unpacked ([`store`], [`unpack`]): a missing layer is
//! streamed to disk, digest-verified, applied on a hard-linked copy of its parent
//! chain and checked against the config's `diff_id` before the chain is stored.
//! Concurrent requests for one image or chain wait for one pull. Each action then gets
//! its own overlay over the image's top chain ([`overlay`]), with the image's `Env`
//! beneath the Command's variables and the input root at the image's `WorkingDir`.
//! A tag without a digest is resolved once per worker (and logged, since it weakens
//! the cache key); a pinned image needs no network once it is unpacked, even after a
//! restart.

pub mod overlay;
pub mod reference;
pub mod registry;
pub mod source;
pub mod store;
pub mod unpack;

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use oci_client::manifest::OciDescriptor;
use paddock_sandbox::{ResolveError, Rootfs, RootfsResolver};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use overlay::ActionRoot;
use reference::{check_digest, ImageRef};
use registry::Registries;
pub use registry::RegistryOptions;
use source::Source;
use store::{chain_ids, ChainLease, ChainStore};
use unpack::{Budget, UnpackError};

/// The platform property that names an image.
pub const PROPERTY: &str = "container-image";

/// Whether this kernel offers overlayfs, which image roots are made of.
pub fn detect() -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| {
        f.lines()
            .any(|line| line.split_whitespace().last() == Some("overlay"))
    })
}

/// How the resolver keeps and fetches images.
#[derive(Debug, Clone)]
pub struct OciOptions {
    /// Where unpacked chains, image records and per-action roots live.
    pub dir: PathBuf,
    /// The bound of the unpacked chains.
    pub cache_size: u64,
    pub registries: RegistryOptions,
    /// Directories whose OCI layouts `oci-layout:` images may name; none by default.
    pub layouts: Vec<PathBuf>,
    pub limits: ImageLimits,
}

/// What one image may take.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    /// Compressed bytes of one layer, and of all of an image's layers.
    pub max_layer_size: u64,
    pub max_image_size: u64,
    /// Bytes an image's layers may unpack to, together.
    pub max_unpacked_size: u64,
    /// Entries in one layer.
    pub max_entries: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_layer_size: u64::MAX,
            max_image_size: u64::MAX,
            max_unpacked_size: u64::MAX,
            max_entries: u64::MAX,
        }
    }
}

impl From<UnpackError> for ResolveError {
    fn from(e: UnpackError) -> Self {
        match e {
            UnpackError::Invalid(m) => ResolveError::Precondition(m),
            UnpackError::Limit(m) => ResolveError::Limit(m),
            UnpackError::Io(m) => ResolveError::Worker(m),
        }
    }
}

/// What the resolver needs to know of an image once it has seen it: small enough
/// to keep in memory and on disk, so a pinned image needs no network again.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Image {
    /// The image manifest's digest (for an index, the entry for this platform).
    manifest: String,
    layers: Vec<Layer>,
    /// The image config's `Env`, as `NAME=VALUE`.
    env: Vec<String>,
    /// Where the input root goes: the image's `WorkingDir` if it is usable.
    work_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Layer {
    digest: String,
    size: i64,
    media_type: String,
    diff_id: String,
    chain: String,
}

pub struct OciResolver {
    options: OciOptions,
    store: Arc<ChainStore>,
    registries: Arc<Registries>,
    /// Images by their pinned reference (`LOCATION@DIGEST`).
    images: Mutex<HashMap<String, Arc<Image>>>,
    /// Tags resolved to digests, once per worker.
    tags: Mutex<HashMap<String, String>>,
    /// Images being looked up: concurrent actions wait for one lookup.
    pending: Mutex<HashMap<String, Arc<OnceCell<Arc<Image>>>>>,
    runs: AtomicU64,
    /// Layer bytes pulled since start, as stored (compressed).
    pulled: AtomicU64,
}

impl OciResolver {
    /// Opens the resolver's directories: unfinished pulls and per-action roots that
    /// a previous run left are removed (unmounted first).
    pub fn new(options: OciOptions) -> std::io::Result<OciResolver> {
        overlay::clean_up(&options.dir.join("run"))?;
        std::fs::create_dir_all(options.dir.join("images"))?;
        let store = ChainStore::open(&options.dir, options.cache_size)?;
        let registries =
            Registries::new(options.registries.clone()).map_err(std::io::Error::other)?;
        Ok(OciResolver {
            registries: Arc::new(registries),
            options,
            store,
            images: Mutex::new(HashMap::new()),
            tags: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            runs: AtomicU64::new(0),
            pulled: AtomicU64::new(0),
        })
    }

    /// Layer bytes pulled since start (compressed), and the unpacked bytes held now.
    pub fn usage(&self) -> (u64, u64) {
        (self.pulled.load(Ordering::Relaxed), self.store.total())
    }

    /// The digest an image reference pins, resolving a tag once per worker.
    async fn pinned_digest(
        &self,
        image: &ImageRef,
        source: &Source,
    ) -> Result<String, ResolveError> {
        if let Some(digest) = image.digest() {
            return Ok(digest.to_owned());
        }
        let key = image.to_string();
        if let Some(digest) = self.tags.lock().get(&key) {
            return Ok(digest.clone());
        }
        let (_, digest) = source.manifest(None).await?;
        tracing::warn!(
            image = %key,
            %digest,
            "container-image names a tag, not a digest: resolved once for this worker; pin it with @{digest} for a sound cache key"
        );
        self.tags.lock().insert(key, digest.clone());
        Ok(digest)
    }

    /// The image, from memory, from its record on disk, or from its source.
    async fn image(
        &self,
        key: &str,
        digest: &str,
        source: &Source,
    ) -> Result<Arc<Image>, ResolveError> {
        if let Some(found) = self.images.lock().get(key) {
            return Ok(found.clone());
        }
        let cell = self
            .pending
            .lock()
            .entry(key.to_owned())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let image = cell
            .get_or_try_init(|| async {
                let record = self.record_path(key);
                let image = match std::fs::read(&record)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<Image>(&bytes).ok())
                {
                    Some(image) => image,
                    None => {
                        let image = fetch_image(source, digest, &self.options.limits).await?;
                        tracing::info!(image = %key, manifest = %image.manifest, layers = image.layers.len(), "image found");
                        let bytes = serde_json::to_vec(&image).expect("images serialise");
                        let tmp = self.store.scratch();
                        std::fs::write(&tmp, bytes)
                            .and_then(|_| std::fs::rename(&tmp, &record))
                            .map_err(|e| ResolveError::io("recording the image", e))?;
                        image
                    }
                };
                let image = Arc::new(image);
                self.images.lock().insert(key.to_owned(), image.clone());
                Ok::<_, ResolveError>(image)
            })
            .await
            .cloned();
        self.pending.lock().remove(key);
        image
    }

    fn record_path(&self, key: &str) -> PathBuf {
        use sha2::Digest as _;
        let name = hex::encode(sha2::Sha256::digest(key.as_bytes()));
        self.options.dir.join("images").join(format!("{name}.json"))
    }

    /// Holds the image's top chain, unpacking whatever layers are missing.
    async fn top_chain(&self, image: &Image, source: &Source) -> Result<ChainLease, ResolveError> {
        // The highest chain already here; everything above it is built in order,
        // each from a hard-linked copy of the one below.
        let mut start = image.layers.len();
        let mut below: Option<ChainLease> = None;
        while start > 0 {
            if let Some(lease) = self.store.lease(&image.layers[start - 1].chain) {
                below = Some(lease);
                break;
            }
            start -= 1;
        }
        // What the layers below have unpacked to, against the image's bound.
        let mut unpacked: u64 = image.layers[..start]
            .iter()
            .map(|l| self.store.bytes(&l.chain).unwrap_or(0))
            .sum();
        let limits = self.options.limits;
        for layer in &image.layers[start..] {
            let parent = below.take();
            let budget = Budget {
                bytes: limits.max_unpacked_size.saturating_sub(unpacked),
                entries: limits.max_entries,
                stream: limits.max_unpacked_size.saturating_sub(unpacked),
            };
            let lease = self
                .store
                .lease_or_build(&layer.chain, async |root: PathBuf| {
                    self.build_chain(layer, parent.as_ref(), root, source, budget)
                        .await
                })
                .await?;
            unpacked = unpacked.saturating_add(self.store.bytes(&layer.chain).unwrap_or(0));
            below = Some(lease);
        }
        below.ok_or_else(|| ResolveError::Precondition("the image has no layers".to_owned()))
    }

    async fn build_chain(
        &self,
        layer: &Layer,
        parent: Option<&ChainLease>,
        root: PathBuf,
        source: &Source,
        budget: Budget,
    ) -> Result<u64, ResolveError> {
        let blob = self.store.scratch();
        let descriptor = OciDescriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size,
            ..OciDescriptor::default()
        };
        let started = std::time::Instant::now();
        let pulled = source.blob_to_file(&descriptor, &blob).await?;
        metrics::counter!("paddock_oci_pulled_bytes_total").increment(pulled);
        self.pulled.fetch_add(pulled, Ordering::Relaxed);
        let pull_time = started.elapsed();
        let parent_root = parent.map(ChainLease::root);
        let applied = tokio::task::spawn_blocking({
            let blob = blob.clone();
            move || {
                match parent_root {
                    Some(parent) => unpack::link_tree(&parent, &root),
                    None => std::fs::create_dir(&root),
                }
                .map_err(|e| UnpackError::Io(format!("preparing the layer's directory: {e}")))?;
                unpack::apply_layer(&blob, &root, budget)
            }
        })
        .await
        .map_err(|e| ResolveError::Worker(format!("unpacking: {e}")));
        let _ = std::fs::remove_file(&blob);
        let applied = applied?.map_err(|e| {
            ResolveError::from(e).context(format_args!("the layer {}", layer.digest))
        })?;
        if applied.diff_id != layer.diff_id {
            return Err(ResolveError::Precondition(format!(
                "the layer {} unpacks to {}, not the {} that the image config names",
                layer.digest, applied.diff_id, layer.diff_id
            )));
        }
        metrics::counter!("paddock_oci_layers_unpacked_total").increment(1);
        tracing::info!(
            layer = %layer.digest,
            compressed = pulled,
            unpacked = applied.bytes,
            pull_ms = pull_time.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "layer ready"
        );
        Ok(applied.bytes)
    }

    async fn prepare(&self, value: &str) -> Result<Rootfs, ResolveError> {
        let image_ref = ImageRef::parse(value).map_err(ResolveError::Precondition)?;
        let source = Source::of(&image_ref, &self.registries, &self.options.layouts)
            .map_err(|e| e.context(&image_ref))?;
        let digest = self
            .pinned_digest(&image_ref, &source)
            .await
            .map_err(|e| e.context(&image_ref))?;
        let location = match &image_ref {
            ImageRef::Registry { name, .. } => {
                format!("docker://{}/{}", name.resolve_registry(), name.repository())
            }
            ImageRef::Layout { dir, .. } => format!("oci-layout:{}", dir.display()),
        };
        let key = format!("{location}@{digest}");
        let image = self
            .image(&key, &digest, &source)
            .await
            .map_err(|e| e.context(&image_ref))?;
        let chain = self
            .top_chain(&image, &source)
            .await
            .map_err(|e| e.context(&image_ref))?;
        let work_dir = image
            .work_dir
            .clone()
            .unwrap_or_else(|| paddock_sandbox::spec::WORK_DIR.into());
        let run = self
            .options
            .dir
            .join("run")
            .join(self.runs.fetch_add(1, Ordering::Relaxed).to_string());
        let mounted = ActionRoot::mount(run, chain, &work_dir).map_err(ResolveError::Worker)?;
        Ok(Rootfs {
            root: mounted.root().to_path_buf(),
            writable: true,
            work_dir,
            mounts: Vec::new(),
            environment: image
                .env
                .iter()
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            lease: Some(Box::new(mounted)),
        })
    }
}

/// Reads an image's manifest and config and checks that they describe an image
/// Paddock can unpack.
async fn fetch_image(
    source: &Source,
    digest: &str,
    limits: &ImageLimits,
) -> Result<Image, ResolveError> {
    let invalid = |m: String| ResolveError::Precondition(m);
    let (manifest, manifest_digest) = source.manifest(Some(digest)).await?;
    let config_bytes = source.small_blob(&manifest.config).await?;
    let config: oci_client::config::ConfigFile = serde_json::from_slice(&config_bytes)
        .map_err(|e| invalid(format!("the image config is not valid: {e}")))?;
    let diff_ids = config.rootfs.diff_ids;
    if diff_ids.len() != manifest.layers.len() {
        return Err(invalid(format!(
            "the manifest has {} layers but the config {} diff_ids",
            manifest.layers.len(),
            diff_ids.len()
        )));
    }
    if manifest.layers.is_empty() {
        return Err(invalid("the image has no layers".into()));
    }
    for diff_id in &diff_ids {
        check_digest(diff_id, diff_id).map_err(invalid)?;
    }
    let mut total = 0u64;
    for layer in &manifest.layers {
        let size = u64::try_from(layer.size).unwrap_or(u64::MAX);
        if size > limits.max_layer_size {
            return Err(ResolveError::Limit(format!(
                "the layer {} is {size} bytes, more than this worker's limit of {} ([worker.oci] max_layer_size)",
                layer.digest, limits.max_layer_size
            )));
        }
        total = total.saturating_add(size);
    }
    if total > limits.max_image_size {
        return Err(ResolveError::Limit(format!(
            "the image's layers are {total} bytes, more than this worker's limit of {} ([worker.oci] max_image_size)",
            limits.max_image_size
        )));
    }
    let chains = chain_ids(&diff_ids);
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for ((descriptor, diff_id), chain) in manifest.layers.iter().zip(diff_ids).zip(chains) {
        if descriptor.media_type.contains("encrypted") {
            return Err(invalid(format!(
                "the layer {} is encrypted",
                descriptor.digest
            )));
        }
        check_digest(&descriptor.digest, &descriptor.digest).map_err(invalid)?;
        layers.push(Layer {
            digest: descriptor.digest.clone(),
            size: descriptor.size,
            media_type: descriptor.media_type.clone(),
            diff_id,
            chain,
        });
    }
    let settings = config.config.unwrap_or_default();
    Ok(Image {
        manifest: manifest_digest,
        layers,
        env: settings.env.unwrap_or_default(),
        work_dir: settings.working_dir.as_deref().and_then(usable_work_dir),
    })
}

/// An image's `WorkingDir`, if the input root can go there: absolute, normal, and
/// not the root or one of the container's own mounts.
fn usable_work_dir(dir: &str) -> Option<PathBuf> {
    let path = Path::new(dir);
    let normal = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    let reserved = ["/proc", "/dev", "/tmp", "/sys"]
        .iter()
        .any(|r| path.starts_with(r));
    (normal && !reserved && path != Path::new("/")).then(|| path.to_path_buf())
}

#[async_trait]
impl RootfsResolver for OciResolver {
    fn name(&self) -> &'static str {
        "oci"
    }

    async fn resolve(&self, platform: &[(String, String)]) -> Result<Option<Rootfs>, ResolveError> {
        let values = paddock_sandbox::property_values(platform, PROPERTY);
        match values.as_slice() {
            [] => Ok(None),
            [value] => self.prepare(value).await.map(Some),
            _ => Err(ResolveError::Precondition(format!(
                "the platform names {} container images; an action runs in one",
                values.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_directories() {
        assert_eq!(usable_work_dir("/src/app"), Some(PathBuf::from("/src/app")));
        for unusable in [
            "",
            "/",
            "relative",
            "/src/../etc",
            "/proc/self",
            "/tmp",
            "/dev/x",
        ] {
            assert_eq!(usable_work_dir(unusable), None, "{unusable}");
        }
    }
}
