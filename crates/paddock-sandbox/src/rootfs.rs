//! Root filesystems for actions, chosen by platform properties.
//!
//! A [`RootfsResolver`] looks at an action's platform and either declines (it is not
//! its kind of platform) or returns a [`Rootfs`]: a directory to use as the container
//! root and read-only bind mounts to place in it. The container runner asks its
//! resolvers in order; [`HostResolver`], which always answers, comes last.

use std::any::Any;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use paddock_runner::{Identities, Identity};

/// A read-only bind mount into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    /// The absolute path inside the container.
    pub destination: PathBuf,
}

/// What a resolver provides for one action.
pub struct Rootfs {
    /// The container's root directory; it must already hold the mount points for
    /// `mounts`, `work_dir`, `/tmp`, `/proc` and `/dev`.
    pub root: PathBuf,
    /// Whether the action may write to its root: only a root made for this action
    /// alone (an image's per-action overlay) is writable; shared templates are not.
    pub writable: bool,
    /// Where the input root appears inside the container, normally [`WORK_DIR`].
    ///
    /// [`WORK_DIR`]: crate::spec::WORK_DIR
    pub work_dir: PathBuf,
    pub mounts: Vec<BindMount>,
    /// Variables that apply beneath the Command's own (an image's `Env`, say).
    pub environment: Vec<(String, String)>,
    /// Keeps whatever the root depends on (a GC root, an image lease) alive until the
    /// action is over.
    pub lease: Option<Box<dyn Any + Send + Sync>>,
}

/// The values of one platform property, in order (a property may repeat).
pub fn property_values<'a>(platform: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    platform
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Why a platform's root filesystem could not be provided, and whose fault that is.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The action's: what it names cannot exist or be had (a malformed reference, an
    /// image or store path that no registry or cache holds). FAILED_PRECONDITION,
    /// final: retrying elsewhere would not help.
    #[error("{0}")]
    Precondition(String),
    /// The action's: what it names is larger than the worker's limits allow (an image
    /// that unpacks to more than its bound). RESOURCE_EXHAUSTED, final.
    #[error("{0}")]
    Limit(String),
    /// This worker's: its disk, its mounts, its own access to a registry or cache.
    /// Another worker may succeed; it counts in this worker's health.
    #[error("{0}")]
    Worker(String),
    /// A shared service's (a registry or binary cache that fails for everyone):
    /// retried, not held against the worker.
    #[error("{0}")]
    Infrastructure(String),
}

impl ResolveError {
    /// A failure of the worker's own file system work (I/O), said with what it was
    /// doing.
    pub fn io(doing: impl std::fmt::Display, error: std::io::Error) -> ResolveError {
        ResolveError::Worker(format!("{doing}: {error}"))
    }

    /// The same failure, its message preceded by `context`.
    pub fn context(self, context: impl std::fmt::Display) -> ResolveError {
        let with = |message: String| format!("{context}: {message}");
        match self {
            ResolveError::Precondition(m) => ResolveError::Precondition(with(m)),
            ResolveError::Limit(m) => ResolveError::Limit(with(m)),
            ResolveError::Worker(m) => ResolveError::Worker(with(m)),
            ResolveError::Infrastructure(m) => ResolveError::Infrastructure(with(m)),
        }
    }
}

impl From<ResolveError> for paddock_runner::RunError {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::Precondition(m) => paddock_runner::RunError::Precondition(m),
            ResolveError::Limit(m) => paddock_runner::RunError::Limit(m),
            ResolveError::Worker(m) => paddock_runner::RunError::Worker(m),
            ResolveError::Infrastructure(m) => paddock_runner::RunError::Infrastructure(m),
        }
    }
}

#[async_trait]
pub trait RootfsResolver: Send + Sync + 'static {
    /// A short name for logs and messages (`host`, `nix`, `oci`).
    fn name(&self) -> &'static str;

    /// The root for an action with `platform`, or `None` if this resolver does not
    /// handle it.
    async fn resolve(&self, platform: &[(String, String)]) -> Result<Option<Rootfs>, ResolveError>;
}

/// Host directories an action may see, read-only: the toolchain, not the machine.
const HOST_DIRS: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "opt",
];

/// Host files and directories under `/etc` that toolchains need.
const HOST_ETC: &[&str] = &[
    "alternatives",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "protocols",
    "services",
    "ssl",
];

/// The worker's own toolchain, read-only: `/usr`, `/bin`, `/lib*` and a minimal
/// `/etc` (users, hosts, the dynamic linker's cache, Debian's alternatives). On
/// merged-/usr systems, `/bin` and friends are the same symlinks as on the host; on
/// NixOS, where the toolchain is in the store, `/nix/store` and
/// `/run/current-system` are there too.
pub struct HostResolver {
    root: PathBuf,
    mounts: Vec<BindMount>,
}

impl HostResolver {
    /// Prepares the root template under `dir` (once per worker). `identities` are
    /// those actions run as, which get entries in `/etc/passwd` and `/etc/group`.
    pub fn prepare(dir: &Path, identities: Identities) -> std::io::Result<HostResolver> {
        let root = dir.join("host-root");
        let etc = dir.join("host-etc");
        for d in [&root, &etc] {
            if d.exists() {
                std::fs::remove_dir_all(d)?;
            }
            std::fs::create_dir_all(d)?;
        }
        let mut mounts = Vec::new();
        for name in HOST_DIRS {
            let host = Path::new("/").join(name);
            let Ok(meta) = std::fs::symlink_metadata(&host) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&host)?, root.join(name))?;
            } else if meta.is_dir() {
                std::fs::create_dir(root.join(name))?;
                mounts.push(BindMount {
                    source: host.clone(),
                    destination: host,
                });
            }
        }
        if Path::new("/etc/NIXOS").exists() {
            // On NixOS the toolchain lives in the store, reached through
            // /run/current-system: mount the store, and point to the system.
            std::fs::create_dir_all(root.join("nix/store"))?;
            mounts.push(BindMount {
                source: "/nix/store".into(),
                destination: "/nix/store".into(),
            });
            if let Ok(system) = std::fs::read_link("/run/current-system") {
                std::fs::create_dir_all(root.join("run"))?;
                std::os::unix::fs::symlink(system, root.join("run/current-system"))?;
            }
        }
        prepare_mount_points(&root)?;
        write_etc(&etc, identities)?;
        mounts.push(BindMount {
            source: etc.clone(),
            destination: "/etc".into(),
        });
        for name in HOST_ETC {
            let host = Path::new("/etc").join(name);
            let Ok(meta) = std::fs::metadata(&host) else {
                continue;
            };
            // The mount point must exist in the (read-only) /etc before the bind.
            if meta.is_dir() {
                std::fs::create_dir_all(etc.join(name))?;
            } else {
                std::fs::write(etc.join(name), b"")?;
            }
            mounts.push(BindMount {
                source: host.clone(),
                destination: host,
            });
        }
        Ok(HostResolver { root, mounts })
    }
}

/// The mount points every container root needs, beside those of its bind mounts.
pub fn prepare_mount_points(root: &Path) -> std::io::Result<()> {
    for d in ["etc", "proc", "dev", "tmp", "work"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    Ok(())
}

/// `/etc/hosts` for a container whose only network is loopback.
pub const LOOPBACK_HOSTS: &str =
    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// A minimal `/etc`: who actions run as (every identity is a user and group named
/// `build`, so that `id -un` and `getpwuid` work whichever an action gets), and that
/// `localhost` is loopback.
pub fn write_etc(etc: &Path, identities: Identities) -> std::io::Result<()> {
    let mut passwd = String::from("root:x:0:0:root:/root:/bin/sh\n");
    let mut group = String::from("root:x:0:\n");
    for Identity { uid, gid } in identities.iter() {
        if uid != 0 {
            passwd.push_str(&format!(
                "build:x:{uid}:{gid}:Paddock action:/tmp:/bin/sh\n"
            ));
        }
        if gid != 0 {
            group.push_str(&format!("build:x:{gid}:\n"));
        }
    }
    std::fs::write(etc.join("passwd"), passwd)?;
    std::fs::write(etc.join("group"), group)?;
    std::fs::write(etc.join("hosts"), LOOPBACK_HOSTS)?;
    std::fs::write(
        etc.join("nsswitch.conf"),
        "passwd: files\ngroup: files\nhosts: files\n",
    )?;
    std::fs::write(etc.join("hostname"), "paddock\n")?;
    Ok(())
}

#[async_trait]
impl RootfsResolver for HostResolver {
    fn name(&self) -> &'static str {
        "host"
    }

    async fn resolve(
        &self,
        _platform: &[(String, String)],
    ) -> Result<Option<Rootfs>, ResolveError> {
        Ok(Some(Rootfs {
            root: self.root.clone(),
            writable: false,
            work_dir: crate::spec::WORK_DIR.into(),
            mounts: self.mounts.clone(),
            environment: Vec::new(),
            lease: None,
        }))
    }
}
