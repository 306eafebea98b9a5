//! Per-action roots: an overlay with an image's chain as its read-only lower
//! directory and a fresh upper directory, so an action may write anywhere in its
//! root without touching the image or any other action.

use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use paddock_sandbox::LOOPBACK_HOSTS;

use crate::store::ChainLease;

/// A mounted per-action root; dropping it unmounts and removes it.
pub struct ActionRoot {
    dir: PathBuf,
    root: PathBuf,
    chain: Option<ChainLease>,
}

impl ActionRoot {
    /// Mounts an overlay of `chain` in `dir` (which must not exist) and makes the
    /// mount points a container needs, `work_dir` among them.
    pub fn mount(dir: PathBuf, chain: ChainLease, work_dir: &Path) -> Result<ActionRoot, String> {
        let (upper, work, root) = (dir.join("upper"), dir.join("work"), dir.join("root"));
        for d in [&upper, &work, &root] {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        let lower = chain.root();
        let paths = [&lower, &upper, &work];
        if let Some(bad) = paths.iter().find(|p| {
            let text = p.to_string_lossy();
            text.contains(',') || text.contains(':')
        }) {
            return Err(format!(
                "{} has a `,` or `:`, which overlayfs options cannot carry",
                bad.display()
            ));
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &root,
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(|e| format!("mounting the image's overlay: {e}"))?;
        let mounted = ActionRoot {
            dir,
            root,
            chain: Some(chain),
        };
        mounted.prepare(work_dir)?;
        Ok(mounted)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn prepare(&self, work_dir: &Path) -> Result<(), String> {
        for point in ["proc", "dev", "tmp"] {
            ensure_dir(&self.root, Path::new(point))?;
        }
        ensure_dir(&self.root, work_dir)?;
        // As Docker does: `localhost` must resolve, whatever the image ships.
        write_file(&self.root, Path::new("etc/hosts"), LOOPBACK_HOSTS)?;
        write_file(&self.root, Path::new("etc/hostname"), "paddock\n")
    }
}

impl Drop for ActionRoot {
    fn drop(&mut self) {
        // Off the action's critical path: its result is already on its way. A worker
        // that stops first leaves the mount to `clean_up` at its next start.
        let (dir, root) = (
            std::mem::take(&mut self.dir),
            std::mem::take(&mut self.root),
        );
        let chain = self.chain.take();
        let tear_down = move || {
            if let Err(e) = nix::mount::umount2(&root, MntFlags::MNT_DETACH) {
                tracing::warn!(root = %root.display(), error = %e, "unmounting an action's root");
            }
            let _ = std::fs::remove_dir_all(&dir);
            // Only now may the chain under it be evicted.
            drop(chain);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(tear_down);
            }
            Err(_) => tear_down(),
        }
    }
}

/// Makes `relative` a real directory beneath `root`: whatever is in the way (a file,
/// or a symlink, which could lead anywhere) is replaced in this action's upper layer.
fn ensure_dir(root: &Path, relative: &Path) -> Result<(), String> {
    let mut at = root.to_path_buf();
    for component in relative.components() {
        let Component::Normal(part) = component else {
            continue;
        };
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => continue,
            Ok(_) => std::fs::remove_file(&at)
                .map_err(|e| format!("replacing {} in the image: {e}", at.display()))?,
            Err(_) => {}
        }
        std::fs::create_dir(&at).map_err(|e| format!("creating {}: {e}", at.display()))?;
    }
    Ok(())
}

/// Writes a file beneath `root`, replacing whatever was at its path.
fn write_file(root: &Path, relative: &Path, contents: &str) -> Result<(), String> {
    if let Some(parent) = relative.parent() {
        ensure_dir(root, parent)?;
    }
    let path = root.join(relative);
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        let removed = match meta.is_dir() {
            true => std::fs::remove_dir_all(&path),
            false => std::fs::remove_file(&path),
        };
        removed.map_err(|e| format!("replacing {}: {e}", path.display()))?;
    }
    std::fs::write(&path, contents).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Unmounts whatever a previous run left mounted under `dir`, then removes it.
pub fn clean_up(dir: &Path) -> std::io::Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut stale: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape(point)))
        .filter(|point| point.starts_with(dir))
        .collect();
    // Deepest first.
    stale.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in stale {
        tracing::warn!(mount = %point.display(), "unmounting an image root left by an earlier run");
        let _ = nix::mount::umount2(&point, MntFlags::MNT_DETACH);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = |b: &u8| (b'0'..=b'7').contains(b);
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(octal) {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn mount_points_replace_symlinks_instead_of_following_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("src")).unwrap();
        write_file(&root, Path::new("etc/hosts"), LOOPBACK_HOSTS).unwrap();
        ensure_dir(&root, Path::new("src/app")).unwrap();
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert!(root.join("etc").is_dir() && !root.join("etc").is_symlink());
        assert!(root.join("src/app").is_dir());
    }
}
