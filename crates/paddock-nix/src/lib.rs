//! Nix-hermetic platforms: actions that name the exact Nix store paths of their
//! toolchain run in a root filesystem that holds that closure and nothing else.
//!
//! The platform property `nix-store-paths` lists store paths. [`NixResolver`] makes
//! each one valid in the worker's store (it may already be there, or Nix substitutes
//! it from the configured binary caches, checking signatures as Nix is configured),
//! registers GC roots for them, computes the closure (`nix-store -qR`) and prepares a
//! root template: one mount point per closure path under `/nix/store`, `/bin/sh` and
//! `/usr/bin/env` pointing into the listed paths when they provide them, and a minimal
//! `/etc`. All of that happens once per set of paths; later actions reuse it. The
//! container mounts each closure path read-only, so `/nix/store` shows the closure and
//! nothing else, and the host's `/usr`, `/bin` and `/lib` are absent.

mod check;
mod store_path;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use hashlink::LinkedHashMap;
use paddock_runner::Identities;
use paddock_sandbox::{
    prepare_mount_points, write_etc, BindMount, ResolveError, Rootfs, RootfsResolver,
};
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use tokio::sync::OnceCell;

pub use check::{check, unreachable_caches, Readiness, Unusable};
pub use store_path::{parse_list, StorePath};

/// The platform property that lists store paths.
pub const PROPERTY: &str = "nix-store-paths";

/// How the resolver uses Nix.
#[derive(Debug, Clone)]
pub struct NixOptions {
    /// Where it keeps GC roots and root templates.
    pub dir: PathBuf,
    /// Binary caches to substitute from; empty means Nix's own configuration.
    pub substituters: Vec<String>,
    /// Keys whose signatures are trusted on substituted paths; empty means Nix's own.
    pub trusted_public_keys: Vec<String>,
    /// Build `.drv` paths on the worker (off by default: workers substitute only).
    pub allow_builds: bool,
    /// How many closures stay prepared (and rooted) when no action uses them.
    pub max_closures: usize,
    /// The identities actions run as, for `/etc/passwd` and `/etc/group`.
    pub identities: Identities,
}

/// A prepared closure: its root template and what to mount.
struct Closure {
    /// Holds `root` and the `/etc` it mounts.
    home: PathBuf,
    root: PathBuf,
    mounts: Vec<BindMount>,
    path_env: Option<String>,
    gc_roots: Vec<PathBuf>,
}

impl Drop for Closure {
    fn drop(&mut self) {
        // The last lease is gone and the cache let it go: release the GC roots.
        for root in &self.gc_roots {
            let _ = std::fs::remove_file(root);
        }
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

type Key = Vec<StorePath>;

pub struct NixResolver {
    options: NixOptions,
    /// Prepared closures, least recently used first.
    cache: Mutex<LinkedHashMap<Key, Arc<Closure>>>,
    /// Closures being prepared: concurrent actions wait for one preparation.
    pending: Mutex<HashMap<Key, Arc<OnceCell<Arc<Closure>>>>>,
}

/// The resolver for a worker, if it offers Nix platforms: `enabled` is the
/// configuration's `[worker.nix] enabled` (unset: when Nix is installed). Nix is
/// checked first ([`check`]); a worker whose Nix cannot do what `options` ask offers
/// no Nix platform and says why, or refuses to start if Nix was explicitly enabled.
/// Returns the resolver and the value of the `nix` property it offers.
pub async fn offer(
    enabled: Option<bool>,
    options: NixOptions,
) -> Result<Option<(NixResolver, String)>, Unusable> {
    if enabled == Some(false) {
        return Ok(None);
    }
    let ready = match check(&options).await {
        Ok(ready) => ready,
        Err(unusable) if enabled == Some(true) => return Err(unusable),
        Err(unusable) => {
            match unusable.installed {
                true => {
                    for problem in &unusable.problems {
                        tracing::error!(problem = %problem, "this worker's Nix is not usable: it offers no Nix platform");
                    }
                }
                false => tracing::debug!(%unusable, "no Nix here: no Nix platform"),
            }
            return Ok(None);
        }
    };
    for warning in &ready.warnings {
        tracing::warn!(warning = %warning, "Nix");
    }
    tracing::info!(version = %ready.version, substituters = ?ready.substituters, "Nix is usable: offering nix-store-paths platforms");
    let resolver = NixResolver::new(options.clone()).map_err(|e| Unusable {
        installed: true,
        problems: vec![format!("preparing {}: {e}", options.dir.display())],
    })?;
    if !ready.substituters.is_empty() {
        // Unreachable caches slow every missing path down; say so, without delaying
        // the start.
        let caches = ready.substituters.clone();
        tokio::spawn(async move {
            for cache in unreachable_caches(&options, &caches).await {
                tracing::warn!(cache = %cache, "a Nix binary cache does not answer: paths it would provide cannot be substituted");
            }
        });
    }
    Ok(Some((resolver, ready.major)))
}

impl NixResolver {
    /// Prepares the resolver's directories; GC roots a previous run left are dropped.
    pub fn new(options: NixOptions) -> std::io::Result<NixResolver> {
        for sub in ["roots", "gcroots"] {
            let dir = options.dir.join(sub);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
            std::fs::create_dir_all(&dir)?;
        }
        Ok(NixResolver {
            options,
            cache: Mutex::new(LinkedHashMap::new()),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// The prepared closure for `paths`, from the cache or made now (once, however
    /// many actions ask at the same time).
    async fn closure(&self, paths: Key) -> Result<Arc<Closure>, ResolveError> {
        if let Some(found) = self.cache.lock().to_back(&paths) {
            return Ok(found.clone());
        }
        let cell = self
            .pending
            .lock()
            .entry(paths.clone())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let made = cell
            .get_or_try_init(|| async {
                let closure = Arc::new(self.prepare(&paths).await?);
                self.admit(paths.clone(), closure.clone());
                Ok::<_, ResolveError>(closure)
            })
            .await
            .cloned();
        // Success or failure, the next action looks again (a path that could not be
        // substituted now may be substitutable later).
        self.pending.lock().remove(&paths);
        made
    }

    /// Caches a closure, letting go of the least recently used unused ones beyond the
    /// bound (a closure in use stays until its actions finish).
    fn admit(&self, key: Key, closure: Arc<Closure>) {
        let mut cache = self.cache.lock();
        cache.insert(key, closure);
        let mut over = cache.len().saturating_sub(self.options.max_closures.max(1));
        let idle: Vec<Key> = cache
            .iter()
            .filter(|(_, c)| Arc::strong_count(c) == 1)
            .map(|(k, _)| k.clone())
            .collect();
        for key in idle {
            if over == 0 {
                break;
            }
            cache.remove(&key);
            over -= 1;
        }
    }

    async fn prepare(&self, paths: &[StorePath]) -> Result<Closure, ResolveError> {
        if let Some(drv) = paths.iter().find(|p| p.is_derivation()) {
            if !self.options.allow_builds {
                return Err(ResolveError::Precondition(format!(
                    "{drv} is a derivation, and this worker does not build (allow_builds is off); name its outputs instead"
                )));
            }
        }
        let key = hex(paths);
        let gc_root = self.options.dir.join("gcroots").join(&key);
        // Realising a valid path is a no-op; an invalid one is substituted (or, for a
        // .drv when allowed, built). --add-root makes a GC root for each path in the
        // same step, so no garbage collection can slip in between.
        let mut realise = vec!["--realise".to_owned()];
        realise.extend(paths.iter().map(|p| p.to_string()));
        realise.extend(["--add-root".to_owned(), gc_root.display().to_string()]);
        let realised = self.nix_store(&realise).await.map_err(|e| {
            whose(
                &e,
                format!("cannot make {} valid on this worker: {e}", describe(paths)),
            )
        })?;
        // With --add-root, nix-store prints the roots it made; they point at the paths.
        let outputs: Vec<String> = realised
            .lines()
            .map(|root| {
                std::fs::read_link(root)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| root.to_owned())
            })
            .collect();
        // nix-store names the roots ROOT, ROOT-2, ROOT-3, ... one per path.
        let gc_roots: Vec<PathBuf> = (0..outputs.len())
            .map(|i| match i {
                0 => gc_root.clone(),
                _ => PathBuf::from(format!("{}-{}", gc_root.display(), i + 1)),
            })
            .collect();
        let mut query = vec!["--query".to_owned(), "--requisites".to_owned()];
        query.extend(outputs.iter().cloned());
        let requisites = self.nix_store(&query).await.map_err(|e| {
            ResolveError::Worker(format!(
                "cannot list the closure of {}: {e}",
                describe(paths)
            ))
        })?;
        let closure: Vec<PathBuf> = requisites.lines().map(PathBuf::from).collect();
        let home = self.options.dir.join("roots").join(&key);
        let root = home.join("root");
        let listed: Vec<PathBuf> = outputs.iter().map(PathBuf::from).collect();
        let identities = self.options.identities;
        let template = home.clone();
        let closure_paths = closure.clone();
        let listed_paths = listed.clone();
        tokio::task::spawn_blocking(move || {
            make_root(&template, &closure_paths, &listed_paths, identities)
        })
        .await
        .map_err(|e| ResolveError::Worker(e.to_string()))?
        .map_err(|e| {
            ResolveError::io(
                format_args!("preparing the root for {}", describe(paths)),
                e,
            )
        })?;
        let mut mounts: Vec<BindMount> = closure
            .iter()
            .map(|p| BindMount {
                source: p.clone(),
                destination: p.clone(),
            })
            .collect();
        mounts.push(BindMount {
            source: home.join("etc"),
            destination: "/etc".into(),
        });
        let bins: Vec<String> = listed
            .iter()
            .filter(|p| p.join("bin").is_dir())
            .map(|p| p.join("bin").display().to_string())
            .collect();
        tracing::info!(paths = %describe(paths), closure = closure.len(), "Nix closure ready");
        Ok(Closure {
            home,
            root,
            mounts,
            path_env: (!bins.is_empty()).then(|| bins.join(":")),
            gc_roots,
        })
    }

    async fn nix_store(&self, args: &[String]) -> Result<String, String> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        check::run(&self.options, "nix-store", &args).await
    }
}

/// Whose fault a failure of `nix-store --realise` is, from what Nix said: the
/// worker's when its own store, disk or network failed (another worker may do
/// better), the action's when the paths cannot be had (no binary cache has them, or
/// none that this farm trusts, or what a cache holds is damaged).
fn whose(nix_said: &str, message: String) -> ResolveError {
    const WORKER: &[&str] = &[
        "No space left on device",
        "Permission denied",
        "Read-only file system",
        "remounting",
        "cannot connect to socket",
        "database is locked",
        "Input/output error",
        "unable to download",
        "Couldn't resolve host",
        "Could not resolve host",
        "Couldn't connect",
        "Could not connect",
        "Timeout was reached",
        "Connection refused",
    ];
    match WORKER.iter().any(|w| nix_said.contains(w)) {
        true => ResolveError::Worker(message),
        false => ResolveError::Precondition(message),
    }
}

/// Names the paths for messages: all of them, or the first few of a long list.
fn describe(paths: &[StorePath]) -> String {
    const SHOWN: usize = 4;
    let named: Vec<&str> = paths.iter().take(SHOWN).map(StorePath::as_str).collect();
    match paths.len() {
        n if n > SHOWN => format!("{} and {} more", named.join(", "), n - SHOWN),
        _ => named.join(", "),
    }
}

/// A short, stable name for a set of paths.
fn hex(paths: &[StorePath]) -> String {
    let mut sha = Sha256::new();
    for p in paths {
        sha.update(p.as_str().as_bytes());
        sha.update(b"\n");
    }
    sha.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The root template in `home/root`: a mount point for every closure path, `/bin/sh`
/// and `/usr/bin/env` when a listed path provides them; and a minimal `/etc` in
/// `home/etc`, mounted over the root's.
fn make_root(
    home: &Path,
    closure: &[PathBuf],
    listed: &[PathBuf],
    identities: Identities,
) -> std::io::Result<()> {
    if home.exists() {
        std::fs::remove_dir_all(home)?;
    }
    let root = home.join("root");
    prepare_mount_points(&root)?;
    for path in closure {
        let point = root.join(path.strip_prefix("/").unwrap_or(path));
        if std::fs::symlink_metadata(path)?.is_dir() {
            std::fs::create_dir_all(&point)?;
        } else {
            std::fs::create_dir_all(point.parent().expect("store paths have a parent"))?;
            std::fs::write(&point, b"")?;
        }
    }
    for (wanted, link) in [("bin/sh", "bin/sh"), ("bin/env", "usr/bin/env")] {
        if let Some(provider) = listed.iter().find(|p| p.join(wanted).exists()) {
            let at = root.join(link);
            std::fs::create_dir_all(at.parent().expect("links have a parent"))?;
            std::os::unix::fs::symlink(provider.join(wanted), at)?;
        }
    }
    let etc = home.join("etc");
    std::fs::create_dir_all(&etc)?;
    write_etc(&etc, identities)
}

#[async_trait]
impl RootfsResolver for NixResolver {
    fn name(&self) -> &'static str {
        "nix"
    }

    async fn resolve(&self, platform: &[(String, String)]) -> Result<Option<Rootfs>, ResolveError> {
        let values = paddock_sandbox::property_values(platform, PROPERTY);
        if values.is_empty() {
            return Ok(None);
        }
        let paths = parse_list(&values.join(" ")).map_err(ResolveError::Precondition)?;
        let closure = self.closure(paths).await?;
        Ok(Some(Rootfs {
            root: closure.root.clone(),
            writable: false,
            work_dir: paddock_sandbox::spec::WORK_DIR.into(),
            mounts: closure.mounts.clone(),
            environment: closure
                .path_env
                .iter()
                .map(|p| ("PATH".to_owned(), p.clone()))
                .collect(),
            // Holding the closure holds its GC roots and template until the action ends.
            lease: Some(Box::new(closure)),
        }))
    }
}
