//! The disk guard: what a running action may add to the worker's disk.
//!
//! The kernels workers run on do not all offer per-user quotas (this one has no
//! quota format for ext4, none for XFS or tmpfs), so the bound is kept by the
//! worker, with what every kernel offers: `RLIMIT_FSIZE` caps any one file (set by
//! the runner), and while the action runs its input root is measured through
//! directory descriptors, counting the blocks and entries that belong to the
//! action's own identity (its inputs are hard links owned by the worker and cost
//! nothing). An action over `max_disk` or `max_disk_entries` is stopped, and so is
//! the action that has written the most when the worker's file system runs below
//! `min_free_disk`. A measurement takes time in proportion to the tree, so the next
//! one waits at least fifty times as long as the last took: the guard costs at most
//! about 2% of a core.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use paddock_config::ActionLimits;
use paddock_fs::Dir;
use parking_lot::Mutex;

/// The shortest pause between two measurements of one action.
const MIN_INTERVAL: Duration = Duration::from_millis(500);
/// How deep a measurement descends; deeper is over the limit in itself.
const MAX_DEPTH: usize = 4096;

/// What an action has added to the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub entries: u64,
}

/// Why an action was stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overrun {
    /// The action went over its own bound: its fault.
    Limit(String),
    /// The worker's disk ran low while this action had written the most, within its
    /// bound: the worker's fault (its disk is too small for its load).
    LowDisk(String),
}

/// The usage of every action running on this worker, for choosing which one to stop
/// when the disk runs low.
#[derive(Default)]
pub struct DiskGuard {
    running: Mutex<HashMap<u64, u64>>,
    next: AtomicU64,
}

/// Measures what `uid` owns beneath `root`, following no symlink.
pub fn measure(root: &Dir, uid: u32) -> std::io::Result<Option<Usage>> {
    let mut usage = Usage::default();
    // Directories still to measure: their parent (kept open while any child waits)
    // and their name; one descriptor per level at a time.
    let mut pending: Vec<(Arc<Dir>, OsString, usize)> = Vec::new();
    let root = Arc::new(root.try_clone()?);
    let mut visit = |dir: &Arc<Dir>,
                     depth: usize,
                     pending: &mut Vec<(Arc<Dir>, OsString, usize)>|
     -> std::io::Result<bool> {
        if depth > MAX_DEPTH {
            return Ok(false);
        }
        for name in dir.names()? {
            let Some(status) = dir.status(&name)? else {
                continue;
            };
            if status.uid == uid {
                usage.entries += 1;
                usage.bytes = usage.bytes.saturating_add(status.disk_bytes);
            }
            if status.is_dir {
                pending.push((dir.clone(), name, depth + 1));
            }
        }
        Ok(true)
    };
    if !visit(&root, 0, &mut pending)? {
        return Ok(None);
    }
    while let Some((parent, name, depth)) = pending.pop() {
        let dir = match parent.open_dir(Path::new(&name)) {
            Ok(dir) => Arc::new(dir),
            // Gone, or swapped for a symlink, since it was listed: nothing to count.
            Err(_) => continue,
        };
        drop(parent);
        if !visit(&dir, depth, &mut pending)? {
            return Ok(None);
        }
    }
    Ok(Some(usage))
}

impl DiskGuard {
    /// Watches the action whose input root is `root` (owned, below it, by `uid`)
    /// until it goes over a limit; never returns otherwise. `work_dir` is the
    /// worker's directory, whose file system's free space is watched.
    pub async fn watch(
        self: &Arc<Self>,
        root: PathBuf,
        work_dir: PathBuf,
        uid: u32,
        limits: ActionLimits,
    ) -> Overrun {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let _registered = Registered { guard: self, id };
        let mut interval = MIN_INTERVAL;
        loop {
            tokio::time::sleep(interval).await;
            let started = Instant::now();
            let checked = {
                let (guard, root, work_dir, limits) =
                    (self.clone(), root.clone(), work_dir.clone(), limits.clone());
                tokio::task::spawn_blocking(move || guard.check(id, &root, &work_dir, uid, &limits))
                    .await
            };
            match checked {
                Ok(Some(overrun)) => return overrun,
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "measuring an action's disk use"),
            }
            interval = (started.elapsed() * 50).max(MIN_INTERVAL);
        }
    }

    /// One measurement of action `id`: whether it must stop.
    fn check(
        &self,
        id: u64,
        root: &Path,
        work_dir: &Path,
        uid: u32,
        limits: &ActionLimits,
    ) -> Option<Overrun> {
        let root = Dir::open(root).ok()?;
        let usage = match over_limit(&root, uid, limits) {
            Ok(usage) => usage,
            Err(overrun) => return Some(overrun),
        };
        self.running.lock().insert(id, usage.bytes);
        let free = Dir::open(work_dir).and_then(|d| d.available()).ok()?;
        if free >= limits.min_free_disk.bytes() {
            return None;
        }
        let largest = self
            .running
            .lock()
            .iter()
            .max_by_key(|(_, bytes)| **bytes)
            .map(|(id, _)| *id);
        (largest == Some(id) && usage.bytes > 0).then(|| {
            Overrun::LowDisk(format!(
                "the worker's disk ran low ({free} bytes free, under worker.limits.min_free_disk of {}) while this action, with {} bytes written, had written the most",
                limits.min_free_disk, usage.bytes
            ))
        })
    }
}

/// What `uid` has added beneath `root`, or why that is over `limits`.
pub fn over_limit(root: &Dir, uid: u32, limits: &ActionLimits) -> Result<Usage, Overrun> {
    let usage = match measure(root, uid) {
        Ok(Some(usage)) => usage,
        Ok(None) => {
            return Err(Overrun::Limit(format!(
                "the action nested directories more than {MAX_DEPTH} deep"
            )))
        }
        // What cannot be measured now is measured next time.
        Err(_) => return Ok(Usage::default()),
    };
    if usage.bytes > limits.max_disk.bytes() {
        return Err(Overrun::Limit(format!(
            "the action wrote {} bytes to its disk, more than this worker's limit of {} (worker.limits.max_disk)",
            usage.bytes, limits.max_disk
        )));
    }
    if usage.entries > limits.max_disk_entries {
        return Err(Overrun::Limit(format!(
            "the action made {} files and directories, more than this worker's limit of {} (worker.limits.max_disk_entries)",
            usage.entries, limits.max_disk_entries
        )));
    }
    Ok(usage)
}

/// Removes an action from the guard's table when its watch ends.
struct Registered<'a> {
    guard: &'a DiskGuard,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.guard.running.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::chown;

    #[test]
    fn only_what_the_action_owns_counts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("input"), vec![1u8; 1 << 20]).unwrap();
        std::fs::write(root.join("a/b/written"), vec![2u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink("/", root.join("a/up")).unwrap();
        let uid = 4242;
        for path in ["a", "a/b", "a/b/written", "a/up"] {
            let p = root.join(path);
            std::os::unix::fs::lchown(&p, Some(uid), Some(uid)).unwrap();
        }
        chown(root, Some(0), Some(0)).unwrap();
        let usage = measure(&Dir::open(root).unwrap(), uid).unwrap().unwrap();
        assert_eq!(usage.entries, 4);
        assert!(usage.bytes >= 1 << 20 && usage.bytes < 2 << 20, "{usage:?}");
        let tight = ActionLimits {
            max_disk: "512KiB".parse().unwrap(),
            ..ActionLimits::default()
        };
        let overrun = over_limit(&Dir::open(root).unwrap(), uid, &tight).unwrap_err();
        assert!(
            matches!(&overrun, Overrun::Limit(m) if m.contains("worker.limits.max_disk")),
            "{overrun:?}"
        );
    }
}
