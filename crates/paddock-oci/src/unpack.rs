//! Applying an image layer to a directory, and copying a tree with hard links.
//!
//! A layer is a tar archive (plain, gzip or zstd, told apart by their magic numbers),
//! applied on top of its parent's files: entries replace what is there, `.wh.NAME`
//! deletes `NAME` from the layers below, and `.wh..wh..opq` empties its directory of
//! what the layers below put there. Every path is resolved beneath the root: `..` is
//! refused, and symlinks met on the way (the layer's own or a lower layer's) are
//! followed as if the root were `/`, so no entry can reach outside. The uncompressed
//! stream is hashed on the way through, for the image config's `diff_id`.
//!
//! A layer is the registry's (and so, indirectly, the client's) choice: what it may
//! write is bounded while it is read ([`Budget`]: the decompressed stream, the bytes
//! of its files, its entries), set-user-ID and set-group-ID bits are dropped, and
//! device nodes are skipped.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// How many symlinks one path may pass through, as Linux allows.
const MAX_SYMLINKS: usize = 40;
/// The permission bits a layer may set: no set-user-ID or set-group-ID.
const ALLOWED_MODE: u32 = 0o1777;

/// Why a layer could not be applied.
#[derive(Debug)]
pub enum UnpackError {
    /// It is not a valid layer (a broken archive, an entry outside its root).
    Invalid(String),
    /// It holds more than the worker allows.
    Limit(String),
    /// The worker's disk failed under it.
    Io(String),
}

impl fmt::Display for UnpackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnpackError::Invalid(m) | UnpackError::Limit(m) | UnpackError::Io(m) => f.write_str(m),
        }
    }
}

fn invalid(message: impl Into<String>) -> UnpackError {
    UnpackError::Invalid(message.into())
}

fn io(doing: impl fmt::Display, e: std::io::Error) -> UnpackError {
    UnpackError::Io(format!("{doing}: {e}"))
}

/// What one layer may add to the worker's disk, and read to get there.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Bytes of file contents.
    pub bytes: u64,
    /// Files, directories, symlinks and links.
    pub entries: u64,
    /// Bytes of the decompressed archive (a compressed layer can expand a thousandfold).
    pub stream: u64,
}

impl Budget {
    pub const UNLIMITED: Budget = Budget {
        bytes: u64::MAX,
        entries: u64::MAX,
        stream: u64::MAX,
    };
}

/// What applying a layer did.
#[derive(Debug)]
pub struct Applied {
    /// `sha256:HEX` of the uncompressed archive.
    pub diff_id: String,
    /// Bytes of file contents the layer wrote.
    pub bytes: u64,
}

/// Reads a layer blob and applies it to `root`, within `budget`.
pub fn apply_layer(blob: &Path, root: &Path, budget: Budget) -> Result<Applied, UnpackError> {
    let file = std::fs::File::open(blob).map_err(|e| io("opening the layer", e))?;
    let mut input = BufReader::with_capacity(1 << 20, file);
    let magic = input
        .fill_buf()
        .map_err(|e| io("reading the layer", e))?
        .to_vec();
    let decompressed: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(input))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(
            ruzstd::decoding::StreamingDecoder::new(input)
                .map_err(|e| invalid(format!("the layer is not valid zstd: {e}")))?,
        )
    } else {
        Box::new(input)
    };
    let mut hashing = Hashing {
        inner: decompressed,
        sha: Sha256::new(),
        read: 0,
        limit: budget.stream,
    };
    let over = |hashing: &Hashing<_>| {
        UnpackError::Limit(format!(
            "the layer decompresses to more than {} bytes ([worker.oci] max_unpacked_size)",
            hashing.limit
        ))
    };
    let applied = apply_archive(&mut tar::Archive::new(&mut hashing), root, budget);
    let bytes = match applied {
        Err(_) if hashing.read > hashing.limit => return Err(over(&hashing)),
        other => other?,
    };
    // Whatever follows the end-of-archive marker is part of the diff_id too.
    if let Err(e) = std::io::copy(&mut hashing, &mut std::io::sink()) {
        return Err(match hashing.read > hashing.limit {
            true => over(&hashing),
            false => invalid(format!("reading the layer: {e}")),
        });
    }
    Ok(Applied {
        diff_id: format!("sha256:{}", hex::encode(hashing.sha.finalize())),
        bytes,
    })
}

struct Hashing<R> {
    inner: R,
    sha: Sha256,
    read: u64,
    limit: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(std::io::Error::other(
                "the layer's stream is over its bound",
            ));
        }
        self.sha.update(&buf[..n]);
        Ok(n)
    }
}

fn apply_archive<R: Read>(
    archive: &mut tar::Archive<R>,
    root: &Path,
    budget: Budget,
) -> Result<u64, UnpackError> {
    let reading = |e: std::io::Error| invalid(format!("reading the layer: {e}"));
    let mut written = 0u64;
    let mut entries_seen = 0u64;
    // What this layer made, which an opaque whiteout in it must not remove.
    let mut made: HashSet<PathBuf> = HashSet::new();
    let entries = archive.entries().map_err(reading)?;
    for entry in entries {
        let mut entry = entry.map_err(reading)?;
        entries_seen += 1;
        if entries_seen > budget.entries {
            return Err(UnpackError::Limit(format!(
                "the layer has more than {} entries ([worker.oci] max_entries)",
                budget.entries
            )));
        }
        let raw = entry.path().map_err(reading)?.into_owned();
        let Some(relative) = normalise(&raw)? else {
            continue; // the root itself
        };
        let name = relative
            .file_name()
            .expect("normalised paths end in a name");
        let parent = resolve_parent(root, &relative)?;
        let name_text = name.to_string_lossy();
        if name_text == OPAQUE {
            clear_lower(&parent, &made)?;
            continue;
        }
        if let Some(hidden) = name_text.strip_prefix(WHITEOUT) {
            if !hidden.starts_with(WHITEOUT) {
                remove_any(&parent.join(hidden))?;
            }
            // `.wh..wh.*` entries other than the opaque marker are aufs bookkeeping.
            continue;
        }
        let target = parent.join(name);
        let header = entry.header().clone();
        let mode = header.mode().unwrap_or(0o644) & ALLOWED_MODE;
        let uid = header.uid().unwrap_or(0) as u32;
        let gid = header.gid().unwrap_or(0) as u32;
        let kind = header.entry_type();
        let existing = std::fs::symlink_metadata(&target).ok();
        let keep_directory = kind.is_dir() && existing.as_ref().is_some_and(|m| m.is_dir());
        if existing.is_some() && !keep_directory {
            remove_any(&target)?;
        }
        let what = || format!("{}", raw.display());
        match kind {
            tar::EntryType::Directory => {
                if !keep_directory {
                    std::fs::create_dir(&target)
                        .map_err(|e| io(format!("creating {}", what()), e))?;
                }
                set_owner_and_mode(&target, uid, gid, mode).map_err(|e| io(what(), e))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(|e| io(format!("creating {}", what()), e))?;
                let room = budget.bytes.saturating_sub(written);
                let copied =
                    std::io::copy(&mut (&mut entry).take(room.saturating_add(1)), &mut file)
                        .map_err(|e| io(format!("writing {}", what()), e))?;
                written += copied;
                if copied > room {
                    return Err(UnpackError::Limit(format!(
                        "the layer's files add up to more than {} bytes ([worker.oci] max_unpacked_size)",
                        budget.bytes
                    )));
                }
                if let Ok(mtime) = header.mtime() {
                    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                    let _ = file.set_modified(time);
                }
                drop(file);
                set_owner_and_mode(&target, uid, gid, mode).map_err(|e| io(what(), e))?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(reading)?
                    .ok_or_else(|| invalid(format!("the symlink {} has no target", what())))?;
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(|e| io(format!("creating {}", what()), e))?;
                std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                    .map_err(|e| io(what(), e))?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(reading)?
                    .ok_or_else(|| invalid(format!("the hard link {} has no target", what())))?;
                let source = normalise(&link)?.ok_or_else(|| {
                    invalid(format!("the hard link {} points at the root", what()))
                })?;
                let source = resolve_parent(root, &source)?
                    .join(source.file_name().expect("normalised paths end in a name"));
                let meta = std::fs::symlink_metadata(&source).map_err(|e| {
                    invalid(format!(
                        "the hard link {} points at {}: {e}",
                        what(),
                        link.display()
                    ))
                })?;
                if meta.is_dir() {
                    return Err(invalid(format!(
                        "the hard link {} points at a directory",
                        what()
                    )));
                }
                std::fs::hard_link(&source, &target)
                    .map_err(|e| io(format!("creating {}", what()), e))?;
            }
            tar::EntryType::Fifo => {
                nix::unistd::mkfifo(&target, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|e| io(format!("creating {}", what()), e.into()))?;
                set_owner_and_mode(&target, uid, gid, mode).map_err(|e| io(what(), e))?;
            }
            // Device nodes have no place in a root: the container's /dev is its own.
            _ => continue,
        }
        made.insert(target);
    }
    Ok(written)
}

/// A layer path as a relative path of normal components, or `None` for the root.
/// `..` is refused outright: no legitimate layer needs it.
fn normalise(path: &Path) -> Result<Option<PathBuf>, UnpackError> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(invalid(format!(
                    "the layer has an entry outside its root: {}",
                    path.display()
                )))
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// The real directory, beneath `root`, that holds the last component of `relative`:
/// missing directories are made, and symlinks are followed with `root` as `/`.
fn resolve_parent(root: &Path, relative: &Path) -> Result<PathBuf, UnpackError> {
    let parent = relative.parent().unwrap_or(Path::new(""));
    let mut pending: Vec<PathBuf> = parent
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut at = root.to_path_buf();
    let mut followed = 0;
    while let Some(part) = pending.pop() {
        if part.as_os_str() == OsStr::new("..") {
            if at != root {
                at.pop();
            }
            continue;
        }
        if part.as_os_str() == OsStr::new(".") || part.as_os_str().is_empty() {
            continue;
        }
        let next = at.join(&part);
        match std::fs::symlink_metadata(&next) {
            Ok(meta) if meta.file_type().is_symlink() => {
                followed += 1;
                if followed > MAX_SYMLINKS {
                    return Err(invalid(format!(
                        "too many symlinks under {}",
                        relative.display()
                    )));
                }
                let target = std::fs::read_link(&next)
                    .map_err(|e| io(format!("reading {}", next.display()), e))?;
                if target.is_absolute() {
                    at = root.to_path_buf();
                }
                // Resolve the link's own components next, in order.
                for component in target.components().rev() {
                    match component {
                        Component::Normal(p) => pending.push(PathBuf::from(p)),
                        Component::ParentDir => pending.push(PathBuf::from("..")),
                        _ => {}
                    }
                }
            }
            Ok(meta) if meta.is_dir() => at = next,
            Ok(_) => {
                // A file where the layer needs a directory: the layer's entry wins.
                remove_any(&next)?;
                make_directory(&next)?;
                at = next;
            }
            Err(_) => {
                make_directory(&next)?;
                at = next;
            }
        }
    }
    debug_assert!(at.starts_with(root));
    Ok(at)
}

fn make_directory(path: &Path) -> Result<(), UnpackError> {
    std::fs::create_dir(path).map_err(|e| io(format!("creating {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| io(format!("creating {}", path.display()), e))
}

/// Removes a file, symlink or whole directory, if there is one.
fn remove_any(path: &Path) -> Result<(), UnpackError> {
    let result = match std::fs::symlink_metadata(path) {
        Err(_) => return Ok(()),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    result.map_err(|e| io(format!("removing {}", path.display()), e))
}

/// An opaque whiteout: everything in `dir` that lower layers put there goes.
fn clear_lower(dir: &Path, made: &HashSet<PathBuf>) -> Result<(), UnpackError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(_) => return Ok(()),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !made.contains(&path) {
            remove_any(&path)?;
        }
    }
    Ok(())
}

fn set_owner_and_mode(path: &Path, uid: u32, gid: u32, mode: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Copies the tree at `from` to `to` (which must not exist): directories are made
/// anew with the same owner and mode, everything else is hard-linked, so the copy
/// costs directory entries, not data. A layer applied to the copy replaces files
/// (it never writes into one), so the original never changes.
pub fn link_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut stack = vec![(from.to_path_buf(), to.to_path_buf())];
    while let Some((source, target)) = stack.pop() {
        let meta = std::fs::symlink_metadata(&source)?;
        std::fs::create_dir(&target)?;
        set_owner_and_mode(&target, meta.uid(), meta.gid(), meta.mode() & 0o7777)?;
        for entry in std::fs::read_dir(&source)? {
            let entry = entry?;
            let path = entry.path();
            let into = target.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                stack.push((path, into));
            } else if let Err(e) = std::fs::hard_link(&path, &into) {
                // Too many links to one inode (ext4 allows 65,000): copy this one.
                if e.raw_os_error() != Some(nix::errno::Errno::EMLINK as i32) {
                    return Err(e);
                }
                copy_one(&path, &into)?;
            }
        }
    }
    Ok(())
}

fn copy_one(from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)?;
        return std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()));
    }
    std::fs::copy(from, to)?;
    set_owner_and_mode(to, meta.uid(), meta.gid(), meta.mode() & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refuses(name: &str) -> bool {
        normalise(Path::new(name)).is_err()
    }

    fn layer(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, content) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1_700_000_000);
            match kind {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    header.set_size(0);
                    builder.append_link(&mut header, path, content).unwrap();
                }
                _ => {
                    header.set_size(content.len() as u64);
                    // Raw names: the builder itself refuses `..`, a layer need not.
                    let bytes = path.as_bytes();
                    header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
                    header.set_cksum();
                    builder.append(&header, content.as_bytes()).unwrap();
                }
            }
        }
        builder.into_inner().unwrap()
    }

    fn apply(
        root: &Path,
        entries: &[(&str, tar::EntryType, &str)],
    ) -> Result<Applied, UnpackError> {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("layer.tar");
        std::fs::write(&blob, layer(entries)).unwrap();
        apply_layer(&blob, root, Budget::UNLIMITED)
    }

    use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as S};

    #[test]
    fn whiteouts_and_opaque_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        apply(
            &root,
            &[
                ("etc/", D, ""),
                ("etc/keep", F, "keep"),
                ("etc/gone", F, "gone"),
                ("cache/", D, ""),
                ("cache/old", F, "old"),
                ("cache/sub/", D, ""),
            ],
        )
        .unwrap();
        let upper = root.parent().unwrap().join("upper");
        link_tree(&root, &upper).unwrap();
        apply(
            &upper,
            &[
                ("etc/.wh.gone", F, ""),
                ("cache/new", F, "new"),
                ("cache/.wh..wh..opq", F, ""),
            ],
        )
        .unwrap();
        assert!(upper.join("etc/keep").exists());
        assert!(!upper.join("etc/gone").exists());
        assert!(upper.join("cache/new").exists(), "same-layer entries stay");
        assert!(!upper.join("cache/old").exists());
        assert!(!upper.join("cache/sub").exists());
        // The lower tree is untouched.
        assert!(root.join("etc/gone").exists() && root.join("cache/old").exists());
    }

    #[test]
    fn replacing_a_file_never_writes_through_a_hard_link() {
        let dir = tempfile::tempdir().unwrap();
        let lower = dir.path().join("lower");
        std::fs::create_dir(&lower).unwrap();
        apply(&lower, &[("bin/", D, ""), ("bin/tool", F, "v1")]).unwrap();
        let upper = dir.path().join("upper");
        link_tree(&lower, &upper).unwrap();
        apply(&upper, &[("bin/tool", F, "v2")]).unwrap();
        assert_eq!(
            std::fs::read_to_string(lower.join("bin/tool")).unwrap(),
            "v1"
        );
        assert_eq!(
            std::fs::read_to_string(upper.join("bin/tool")).unwrap(),
            "v2"
        );
    }

    #[test]
    fn nothing_escapes_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // A symlink to an absolute path and one climbing out, then entries through them.
        apply(
            &root,
            &[
                ("abs", S, outside.to_str().unwrap()),
                ("up", S, "../../../../outside"),
                ("abs/planted", F, "x"),
                ("up/planted2", F, "x"),
            ],
        )
        .unwrap();
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "wrote outside"
        );
        // Followed with the root as `/`, both land inside it.
        assert!(root
            .join(outside.strip_prefix("/").unwrap())
            .join("planted")
            .exists());
        assert!(root.join("outside/planted2").exists());
        assert!(refuses("../evil"));
        assert!(refuses("a/../../evil"));
        let err = apply(&root, &[("../evil", F, "x")]).unwrap_err();
        assert!(matches!(err, UnpackError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("outside its root"), "{err}");
        // A hard link to a file outside is resolved inside, where there is none.
        let err = apply(&root, &[("h", H, "../../etc/passwd")]).unwrap_err();
        assert!(err.to_string().contains("outside its root"), "{err}");
    }

    #[test]
    fn compressed_layers_and_their_diff_ids() {
        let tar = layer(&[("hello", F, "world")]);
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let gz = gz.finish().unwrap();
        for blob in [tar.clone(), gz] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("root");
            std::fs::create_dir(&root).unwrap();
            std::fs::write(dir.path().join("blob"), &blob).unwrap();
            let applied = apply_layer(&dir.path().join("blob"), &root, Budget::UNLIMITED).unwrap();
            assert_eq!(applied.diff_id, diff_id);
            assert_eq!(applied.bytes, 5);
            assert_eq!(
                std::fs::read_to_string(root.join("hello")).unwrap(),
                "world"
            );
        }
    }

    #[test]
    fn set_id_bits_are_dropped() {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, mode) in [("suid", 0o4755), ("sgid", 0o2755), ("sticky/", 0o1777)] {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(if path.ends_with('/') { D } else { F });
            header.set_mode(mode);
            header.set_size(0);
            builder.append_data(&mut header, path, &[][..]).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(dir.path().join("blob"), builder.into_inner().unwrap()).unwrap();
        apply_layer(&dir.path().join("blob"), &root, Budget::UNLIMITED).unwrap();
        let mode = |p: &str| std::fs::metadata(root.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("suid"), 0o755);
        assert_eq!(mode("sgid"), 0o755);
        assert_eq!(mode("sticky"), 0o1777);
    }

    #[test]
    fn a_layer_is_held_to_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let big = "x".repeat(1000);
        let blob = dir.path().join("layer.tar");
        std::fs::write(
            &blob,
            layer(&[("a", F, big.as_str()), ("b", F, big.as_str()), ("c", F, "")]),
        )
        .unwrap();
        let within = |bytes: u64, entries: u64, stream: u64| {
            let root = dir.path().join(format!("root-{bytes}-{entries}-{stream}"));
            std::fs::create_dir(&root).unwrap();
            apply_layer(
                &blob,
                &root,
                Budget {
                    bytes,
                    entries,
                    stream,
                },
            )
        };
        assert!(within(10_000, 10, u64::MAX).is_ok());
        assert!(matches!(
            within(1500, 10, u64::MAX),
            Err(UnpackError::Limit(_))
        ));
        assert!(matches!(
            within(10_000, 2, u64::MAX),
            Err(UnpackError::Limit(_))
        ));
        assert!(matches!(
            within(10_000, 10, 2048),
            Err(UnpackError::Limit(_))
        ));
    }
}
