//! The toolchain a compile uses (the compiler, its helpers, the headers outside the
//! project) and how an action names it so that no worker with another one can serve
//! or poison the result:
//!
//! - a compiler in `/nix/store`: the action names its closure (`nix-store-paths`);
//! - otherwise a manifest (absolute paths: files with their digests, symlinks with
//!   their targets), placed in the input root and named by `toolchain-manifest`. It
//!   is part of the action's digest, and a worker whose files differ declines.
//!
//! Hashes are kept in a cache on disk, keyed by each file's path and version (device,
//! inode, size, change times), so a warm build hashes nothing.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// Where the manifest goes in the input root.
pub const MANIFEST_NAME: &str = ".paddock-cc-toolchain";

/// One thing the manifest demands.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Entry {
    File {
        path: PathBuf,
        sha256: String,
        size: u64,
    },
    Link {
        path: PathBuf,
        target: PathBuf,
    },
}

/// Why a toolchain could not be described.
#[derive(Debug, thiserror::Error)]
pub enum ToolchainError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} cannot be named in a manifest")]
    Unnameable(String),
    #[error("asking Nix for the closure of {0} failed")]
    Nix(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ToolchainError + '_ {
    move |e| ToolchainError::Io(path.display().to_string(), e)
}

/// File digests by path and version, in `dir`.
pub struct HashCache {
    dir: PathBuf,
}

impl HashCache {
    pub fn new(dir: PathBuf) -> HashCache {
        HashCache { dir }
    }

    /// Where it keeps what it knows (other per-version facts may sit beside).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sha256 (hex) and size of the file at `path`.
    pub fn sha256(&self, path: &Path) -> Result<(String, u64), ToolchainError> {
        let mut file = std::fs::File::open(path).map_err(io(path))?;
        let meta = file.metadata().map_err(io(path))?;
        let key = {
            let mut h = Sha256::new();
            h.update(path.as_os_str().as_encoded_bytes());
            for n in [
                meta.dev(),
                meta.ino(),
                meta.size(),
                meta.mtime() as u64,
                meta.mtime_nsec() as u64,
                meta.ctime() as u64,
                meta.ctime_nsec() as u64,
            ] {
                h.update(n.to_le_bytes());
            }
            hex::encode(h.finalize())
        };
        let entry = self.dir.join(&key);
        if let Ok(known) = std::fs::read_to_string(&entry) {
            if known.len() == 64 {
                return Ok((known, meta.size()));
            }
        }
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 16];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buffer).map_err(io(path))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            hasher.update(&buffer[..n]);
        }
        let digest = hex::encode(hasher.finalize());
        // Best effort: a cache that cannot be written only costs time.
        if std::fs::create_dir_all(&self.dir).is_ok() {
            let partial = self.dir.join(format!("{key}.{}", std::process::id()));
            if std::fs::write(&partial, &digest).is_ok() {
                let _ = std::fs::rename(&partial, &entry);
            }
        }
        Ok((digest, size))
    }
}

/// The entries that pin `path` (absolute): each symlink on the way to the file, and
/// the file. Directories on the way are resolved first, so each entry's path names
/// no symlink but its last component.
pub fn entries_for(path: &Path, hashes: &HashCache) -> Result<Vec<Entry>, ToolchainError> {
    let mut entries = Vec::new();
    let mut at = path.to_owned();
    for _ in 0..40 {
        let (Some(parent), Some(name)) = (at.parent(), at.file_name()) else {
            return Err(ToolchainError::Unnameable(at.display().to_string()));
        };
        let here = std::fs::canonicalize(parent)
            .map_err(io(parent))?
            .join(name);
        let meta = std::fs::symlink_metadata(&here).map_err(io(&here))?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&here).map_err(io(&here))?;
            let next = here.parent().expect("has a parent").join(&target);
            entries.push(Entry::Link { path: here, target });
            at = crate::scan::normal(&next);
            continue;
        }
        let (sha256, size) = hashes.sha256(&here)?;
        entries.push(Entry::File {
            path: here,
            sha256,
            size,
        });
        return Ok(entries);
    }
    Err(ToolchainError::Unnameable(format!(
        "{} (too many symlinks)",
        path.display()
    )))
}

/// The manifest's text: sorted, one entry per line, fields separated by tabs.
pub fn manifest(entries: &BTreeSet<Entry>) -> Result<String, ToolchainError> {
    let mut text = String::from("# paddock cc toolchain manifest\n");
    let field = |p: &Path| -> Result<String, ToolchainError> {
        let s = p
            .to_str()
            .filter(|s| !s.contains(['\t', '\n', '\r']))
            .ok_or_else(|| ToolchainError::Unnameable(p.display().to_string()))?;
        Ok(s.to_owned())
    };
    for entry in entries {
        match entry {
            Entry::File { path, sha256, size } => {
                text.push_str(&format!("file\t{sha256}\t{size}\t{}\n", field(path)?))
            }
            Entry::Link { path, target } => {
                text.push_str(&format!("link\t{}\t{}\n", field(path)?, field(target)?))
            }
        }
    }
    Ok(text)
}

/// The helper programs a gcc-style driver runs for a compile (`cc1`, `cc1plus`,
/// `as`; a driver that names none, as clang runs itself, adds none) and the shared
/// libraries the driver and they load (as `ldd` lists them), as absolute paths.
/// Asked once per version of the driver, then remembered in `cache_dir`.
pub fn helpers(compiler: &Path, search_path: &str, cache_dir: &Path) -> Vec<PathBuf> {
    let key = std::fs::metadata(compiler).ok().map(|meta| {
        let mut h = Sha256::new();
        h.update(compiler.as_os_str().as_encoded_bytes());
        h.update(search_path.as_bytes());
        for n in [
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime() as u64,
            meta.ctime_nsec() as u64,
        ] {
            h.update(n.to_le_bytes());
        }
        cache_dir.join(format!("helpers-{}", hex::encode(h.finalize())))
    });
    if let Some(known) = key.as_ref().and_then(|k| std::fs::read_to_string(k).ok()) {
        return known.lines().map(PathBuf::from).collect();
    }
    let found = ask_helpers(compiler, search_path);
    if let Some(key) = key {
        let text: String = found.iter().map(|p| format!("{}\n", p.display())).collect();
        if std::fs::create_dir_all(cache_dir).is_ok() {
            let partial = key.with_extension(std::process::id().to_string());
            if std::fs::write(&partial, text).is_ok() {
                let _ = std::fs::rename(&partial, &key);
            }
        }
    }
    found
}

fn ask_helpers(compiler: &Path, search_path: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for program in ["cc1", "cc1plus", "as"] {
        let Ok(out) = std::process::Command::new(compiler)
            .arg(format!("-print-prog-name={program}"))
            .stderr(std::process::Stdio::null())
            .output()
        else {
            continue;
        };
        let named = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let path = Path::new(&named);
        if path.is_absolute() {
            if path.is_file() {
                found.push(path.to_owned());
            }
        } else if program == "as" {
            if let Some(p) = find_in_path(&named, search_path, None) {
                found.push(p);
            }
        }
    }
    let programs: Vec<PathBuf> = std::iter::once(compiler.to_owned())
        .chain(found.iter().cloned())
        .collect();
    for program in programs {
        found.extend(shared_libraries(&program));
    }
    found.sort();
    found.dedup();
    found
}

/// The shared libraries (and the dynamic loader) `program` loads, from `ldd`; none
/// for a static program or where `ldd` is missing.
fn shared_libraries(program: &Path) -> Vec<PathBuf> {
    let Ok(out) = std::process::Command::new("ldd")
        .arg(program)
        .stderr(std::process::Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)`, or the loader
            // on its own: `/lib64/ld-linux-x86-64.so.2 (0x...)`.
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            let path = Path::new(path);
            (path.is_absolute() && path.is_file()).then(|| path.to_owned())
        })
        .collect()
}

/// The first executable `name` in `search_path`, skipping `skip` (this program, when
/// it stands in for the compiler).
pub fn find_in_path(name: &str, search_path: &str, skip: Option<&Path>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    for dir in search_path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        let Ok(meta) = std::fs::metadata(&candidate) else {
            continue;
        };
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            continue;
        }
        if let Some(skip) = skip {
            if std::fs::canonicalize(&candidate).ok().as_deref() == Some(skip) {
                continue;
            }
        }
        let absolute = if candidate.is_absolute() {
            candidate
        } else {
            std::env::current_dir().ok()?.join(candidate)
        };
        return Some(absolute);
    }
    None
}

/// The store path holding `file`, when it is in the Nix store.
pub fn store_path_of(file: &Path) -> Option<PathBuf> {
    let rest = file.strip_prefix("/nix/store").ok()?;
    let first = rest.components().next()?;
    Some(Path::new("/nix/store").join(first))
}

/// The closure of a store path, as `nix-store --query --requisites` gives it.
pub fn nix_closure(store_path: &Path) -> Result<Vec<String>, ToolchainError> {
    let out = std::process::Command::new("nix-store")
        .args(["--query", "--requisites"])
        .arg(store_path)
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|_| ToolchainError::Nix(store_path.display().to_string()))?;
    if !out.status.success() {
        return Err(ToolchainError::Nix(store_path.display().to_string()));
    }
    let mut paths: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    paths.sort();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_chains_are_pinned_link_by_link() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/real-cc"), b"compiler").unwrap();
        std::os::unix::fs::symlink("real-cc", root.join("bin/cc")).unwrap();
        std::os::unix::fs::symlink(root.join("bin/cc"), root.join("alt")).unwrap();
        let hashes = HashCache::new(root.join("hashes"));
        let entries = entries_for(&root.join("alt"), &hashes).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(
            entries[0],
            Entry::Link {
                path: root.join("alt"),
                target: root.join("bin/cc")
            }
        );
        assert!(
            matches!(&entries[2], Entry::File { size: 8, path, .. } if *path == root.join("bin/real-cc"))
        );
        // Cached the second time, and the same.
        assert_eq!(entries_for(&root.join("alt"), &hashes).unwrap(), entries);
        let text = manifest(&entries.into_iter().collect()).unwrap();
        assert!(text.contains("link\t"), "{text}");
    }
}
