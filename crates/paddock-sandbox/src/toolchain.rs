//! Toolchain manifests: an action that names one (`toolchain-manifest`, the path of
//! a manifest file in its input root) runs only where every file the manifest lists
//! is, as the action's container would see it, the file the client hashed.
//!
//! A host toolchain (a compiler in `/usr`, its headers) is not part of an action's
//! inputs, so two workers with different compilers would answer the same action
//! differently. The manifest is in the input root, so it is part of the action's
//! digest (the cache key covers the toolchain); this check makes a worker whose files
//! differ decline the action, without blame, so it runs where the files match.
//!
//! The manifest is text, one entry per line, fields separated by tabs:
//! `file <sha256> <size> <absolute path>` or `link <absolute path> <target>`. Every
//! path names no symlink on its way (the client resolves directories); a `link`
//! entry checks a symlink itself, so the path a compiler is invoked by leads to the
//! same file. Paths are looked up beneath the container's root or the bind mount
//! that holds them, through directory descriptors, never followed as strings.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use paddock_fs::{Dir, Found};
use paddock_runner::RunError;
use sha2::{Digest as _, Sha256};

use crate::rootfs::BindMount;

/// The platform property naming the manifest's path in the input root.
pub const PROPERTY: &str = "toolchain-manifest";

/// The largest manifest read, and the most entries it may have.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
const MAX_ENTRIES: usize = 20_000;

/// What a manifest demands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    File {
        path: PathBuf,
        sha256: [u8; 32],
        size: u64,
    },
    Link {
        path: PathBuf,
        target: PathBuf,
    },
}

/// Digests of files already hashed, by what identifies a file's version: device,
/// inode, size, and change times. Bounded: cleared when full.
#[derive(Default)]
pub struct HashCache {
    known: parking_lot::Mutex<HashMap<FileVersion, [u8; 32]>>,
}

/// Device, inode, size, modification time (seconds, nanoseconds), change time
/// (nanoseconds).
type FileVersion = (u64, u64, u64, i64, i64, i64);

const MAX_CACHED: usize = 200_000;

impl HashCache {
    fn sha256(&self, mut file: std::fs::File) -> std::io::Result<[u8; 32]> {
        let meta = file.metadata()?;
        let key = (
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime_nsec(),
        );
        if let Some(known) = self.known.lock().get(&key) {
            return Ok(*known);
        }
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        let digest: [u8; 32] = hasher.finalize().into();
        let mut known = self.known.lock();
        if known.len() >= MAX_CACHED {
            known.clear();
        }
        known.insert(key, digest);
        Ok(digest)
    }
}

/// A container's view of files: its root and the bind mounts placed in it.
pub struct View<'a> {
    pub root: &'a Path,
    pub mounts: &'a [BindMount],
}

/// Checks the manifest an action's platform names, if any, against what its
/// container would see.
pub fn check(
    platform: &[(String, String)],
    input_root: &Path,
    view: &View,
    cache: &HashCache,
) -> Result<(), RunError> {
    let named = crate::rootfs::property_values(platform, PROPERTY);
    let manifest = match named.as_slice() {
        [] => return Ok(()),
        [one] => *one,
        _ => {
            return Err(RunError::Action(format!(
                "the platform names {PROPERTY} more than once"
            )))
        }
    };
    let entries = read(input_root, manifest)?;
    for entry in &entries {
        verify(entry, view, cache)?;
    }
    Ok(())
}

fn read(input_root: &Path, manifest: &str) -> Result<Vec<Entry>, RunError> {
    let bad = |why: String| RunError::Action(format!("{PROPERTY} {manifest:?}: {why}"));
    let rel = Path::new(manifest);
    if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(bad("must be a relative path in the input root".into()));
    }
    let root = Dir::open(input_root)
        .map_err(|e| RunError::Worker(format!("opening the input root: {e}")))?;
    let file = match root.lookup(rel) {
        Ok(Some(Found::File(file, stat))) if stat.size <= MAX_MANIFEST_BYTES => file,
        Ok(Some(Found::File(..))) => {
            return Err(bad(format!("larger than {MAX_MANIFEST_BYTES} bytes")))
        }
        Ok(_) => return Err(bad("is not a regular file in the input root".into())),
        Err(e) => return Err(RunError::Worker(format!("reading {manifest:?}: {e}"))),
    };
    let mut text = String::new();
    file.take(MAX_MANIFEST_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| bad(format!("unreadable as UTF-8 text: {e}")))?;
    parse(&text).map_err(bad)
}

fn parse(text: &str) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if entries.len() == MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} entries"));
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let at = |why: &str| format!("line {}: {why}", number + 1);
        let absolute = |p: &str| -> Result<PathBuf, String> {
            let path = PathBuf::from(p);
            let normal = path.is_absolute()
                && path
                    .components()
                    .skip(1)
                    .all(|c| matches!(c, Component::Normal(_)));
            if normal && path.components().count() > 1 {
                Ok(path)
            } else {
                Err(at("paths must be absolute and normal"))
            }
        };
        let entry = match fields.as_slice() {
            ["file", hash, size, path] => {
                let mut sha256 = [0u8; 32];
                hex::decode_to_slice(hash, &mut sha256).map_err(|_| at("a malformed sha256"))?;
                Entry::File {
                    sha256,
                    size: size.parse().map_err(|_| at("a malformed size"))?,
                    path: absolute(path)?,
                }
            }
            ["link", path, target] if !target.is_empty() => Entry::Link {
                path: absolute(path)?,
                target: PathBuf::from(target),
            },
            _ => {
                return Err(at(
                    "expected `file` or `link` and its fields, separated by tabs",
                ))
            }
        };
        entries.push(entry);
    }
    Ok(entries)
}

/// Where `path` (absolute, inside the container) lies on the worker: the directory
/// it is beneath (a bind mount's source, or the container's root) and the rest.
fn locate(path: &Path, view: &View) -> std::io::Result<(Dir, PathBuf)> {
    let mount = view
        .mounts
        .iter()
        .filter(|m| path.starts_with(&m.destination))
        .max_by_key(|m| m.destination.components().count());
    match mount {
        Some(m) if m.destination == path => {
            // A file mounted on its own: look it up in its source's directory.
            let parent = m.source.parent().unwrap_or(Path::new("/"));
            let name = m.source.file_name().unwrap_or_default();
            Ok((Dir::open(parent)?, PathBuf::from(name)))
        }
        Some(m) => Ok((
            Dir::open(&m.source)?,
            path.strip_prefix(&m.destination)
                .expect("a prefix")
                .to_owned(),
        )),
        None => Ok((
            Dir::open(view.root)?,
            path.strip_prefix("/").expect("absolute").to_owned(),
        )),
    }
}

fn verify(entry: &Entry, view: &View, cache: &HashCache) -> Result<(), RunError> {
    let (path, what) = match entry {
        Entry::File { path, .. } => (path, "file"),
        Entry::Link { path, .. } => (path, "symlink"),
    };
    let differs = |why: String| {
        RunError::Mismatch(format!(
            "toolchain {what} {} differs on this worker: {why}",
            path.display()
        ))
    };
    let (base, rel) = locate(path, view).map_err(|e| differs(format!("not reachable ({e})")))?;
    let found = base
        .lookup(&rel)
        .map_err(|e| differs(format!("not readable ({e})")))?;
    match (entry, found) {
        (Entry::File { sha256, size, .. }, Some(Found::File(file, stat))) => {
            if stat.size != *size {
                return Err(differs(format!("{} bytes, not {size}", stat.size)));
            }
            let have = cache
                .sha256(file)
                .map_err(|e| differs(format!("not readable ({e})")))?;
            if have != *sha256 {
                return Err(differs(format!(
                    "sha256 {}, not {}",
                    hex::encode(have),
                    hex::encode(sha256)
                )));
            }
            Ok(())
        }
        (Entry::Link { target, .. }, Some(Found::Symlink(have))) => {
            if OsStr::new(&have) != target.as_os_str() {
                return Err(differs(format!(
                    "it points to {:?}, not {:?}",
                    String::from_utf8_lossy(have.as_bytes()),
                    target.display()
                )));
            }
            Ok(())
        }
        (_, None) => Err(differs("it is missing".into())),
        (_, Some(_)) => Err(differs("it is of another kind".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_parse_and_refuse_what_is_malformed() {
        let hash = "ab".repeat(32);
        let text =
            format!("# a comment\nfile\t{hash}\t12\t/usr/bin/gcc-12\nlink\t/usr/bin/gcc\tgcc-12\n");
        let entries = parse(&text).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[1],
            Entry::Link {
                path: "/usr/bin/gcc".into(),
                target: "gcc-12".into()
            }
        );
        for bad in [
            format!("file\t{hash}\t12\tusr/bin/gcc"),
            format!("file\t{hash}\t12\t/usr/../etc/shadow"),
            format!("file\t{hash}\tx\t/usr/bin/gcc"),
            "file\tzz\t12\t/usr/bin/gcc".to_owned(),
            "link\t/usr/bin/gcc\t".to_owned(),
            "copy /a /b".to_owned(),
            format!("file\t{hash}\t12\t/"),
        ] {
            assert!(parse(&bad).is_err(), "{bad:?} was accepted");
        }
    }
}
