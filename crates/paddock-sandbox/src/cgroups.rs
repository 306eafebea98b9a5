//! Cgroups, through libcontainer's own `libcgroups` (one stack for limits and
//! statistics, on cgroup v1, hybrid and unified layouts alike).
//!
//! Every action's cgroup is `{parent}/{action}`; the parent, one per worker, carries
//! the fleet's total limits, so the sum of all actions cannot exceed them.

use std::path::{Path, PathBuf};

use libcgroups::common::{
    create_cgroup_manager, get_cgroup_setup, AnyCgroupManager, CgroupConfig, CgroupManager,
    CgroupSetup, ControllerOpt, DEFAULT_CGROUP_ROOT,
};
use oci_spec::runtime::{LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder};

/// What an action used, read from its cgroup before it is deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub peak_memory_bytes: u64,
    pub memory_limit_bytes: u64,
    /// How often usage hit the limit (v1 `failcnt`, v2 `oom` events).
    pub memory_limit_hits: u64,
    pub cpu_user_micros: u64,
    pub cpu_system_micros: u64,
}

fn manager(path: &Path, name: &str) -> Option<AnyCgroupManager> {
    create_cgroup_manager(CgroupConfig {
        cgroup_path: path.to_owned(),
        systemd_cgroup: false,
        container_name: name.to_owned(),
    })
    .ok()
}

/// Reads an action's usage; `None` if the cgroup cannot be read.
pub fn usage(cgroup: &Path, name: &str) -> Option<Usage> {
    let stats = match manager(cgroup, name)?.stats() {
        Ok(stats) => stats,
        Err(e) => {
            tracing::error!(cgroup = %cgroup.display(), error = %e, "reading cgroup statistics");
            return None;
        }
    };
    // cgroup v2 reports user and system time in microseconds; v1's cpuacct.stat in
    // clock ticks (USER_HZ).
    let micros_per_unit = match get_cgroup_setup().ok()? {
        CgroupSetup::Unified => 1,
        CgroupSetup::Legacy | CgroupSetup::Hybrid => {
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
            1_000_000 / hz
        }
    };
    Some(Usage {
        peak_memory_bytes: stats.memory.memory.max_usage,
        memory_limit_bytes: stats.memory.memory.limit,
        memory_limit_hits: stats
            .memory
            .memory
            .fail_count
            .max(stats.memory.memswap.fail_count)
            .max(oom_kills(cgroup)),
        cpu_user_micros: stats.cpu.usage.usage_user * micros_per_unit,
        cpu_system_micros: stats.cpu.usage.usage_kernel * micros_per_unit,
    })
}

/// How many processes the kernel's OOM killer took in a cgroup. libcgroups does not
/// expose the counter, and v1's `failcnt` stays at zero when the kill comes from the
/// memory+swap limit, so it is read from the kernel's own file.
fn oom_kills(cgroup: &Path) -> u64 {
    let relative = cgroup.strip_prefix("/").unwrap_or(cgroup);
    let root = Path::new(DEFAULT_CGROUP_ROOT);
    let file = match get_cgroup_setup() {
        Ok(CgroupSetup::Unified) => root.join(relative).join("memory.events"),
        _ => root
            .join("memory")
            .join(relative)
            .join("memory.oom_control"),
    };
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The cgroup v1 hierarchies mounted under the cgroup root (every controller that
/// libcgroups may write to, such as `devices`, needs the parent to exist in it).
fn v1_hierarchies() -> Vec<PathBuf> {
    let root = Path::new(DEFAULT_CGROUP_ROOT);
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !matches!(e.file_name().to_str(), Some("unified" | "systemd")))
        .map(|e| e.path())
        .collect()
}

/// The directories of `path` in every hierarchy.
fn directories(path: &Path) -> Vec<PathBuf> {
    let relative = path.strip_prefix("/").unwrap_or(path);
    match get_cgroup_setup() {
        Ok(CgroupSetup::Unified) => vec![Path::new(DEFAULT_CGROUP_ROOT).join(relative)],
        _ => v1_hierarchies()
            .into_iter()
            .map(|h| h.join(relative))
            .collect(),
    }
}

/// Creates `path` level by level in a v1 hierarchy; in `cpuset`, each new level
/// inherits its parent's CPUs and memory nodes, without which no task could join.
fn create_v1(hierarchy: &Path, path: &Path) -> Result<(), String> {
    let cpuset = hierarchy.file_name().is_some_and(|n| n == "cpuset");
    let mut dir = hierarchy.to_owned();
    for part in path.strip_prefix("/").unwrap_or(path).components() {
        let parent = dir.clone();
        dir = dir.join(part);
        if dir.is_dir() {
            continue;
        }
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        if cpuset {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let value = std::fs::read_to_string(parent.join(file)).unwrap_or_default();
                std::fs::write(dir.join(file), value.trim())
                    .map_err(|e| format!("initialising {}: {e}", dir.join(file).display()))?;
            }
        }
    }
    Ok(())
}

/// Creates the parent cgroup with the fleet's total limits. On cgroup v2 the
/// controllers are delegated down the path first.
pub fn create_parent(
    path: &Path,
    total_memory: Option<u64>,
    total_pids: Option<u64>,
) -> Result<(), String> {
    if matches!(get_cgroup_setup(), Ok(CgroupSetup::Unified)) {
        enable_v2_controllers(path)?;
    } else {
        for hierarchy in v1_hierarchies() {
            create_v1(&hierarchy, path)?;
        }
    }
    let mut resources = LinuxResourcesBuilder::default();
    if let Some(bytes) = total_memory {
        let memory = LinuxMemoryBuilder::default()
            .limit(bytes as i64)
            .build()
            .map_err(|e| e.to_string())?;
        resources = resources.memory(memory);
    }
    if let Some(pids) = total_pids {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(pids as i64)
                .build()
                .map_err(|e| e.to_string())?,
        );
    }
    let resources = resources.build().map_err(|e| e.to_string())?;
    let manager = manager(path, "paddock").ok_or("no usable cgroup hierarchy")?;
    manager
        .apply(&ControllerOpt {
            resources: &resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        })
        .map_err(|e| format!("limiting {}: {e}", path.display()))
}

/// On cgroup v2, a cgroup's controllers must be enabled in every ancestor.
fn enable_v2_controllers(path: &Path) -> Result<(), String> {
    let root = Path::new(DEFAULT_CGROUP_ROOT);
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<String> = ["memory", "pids", "cpu"]
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect();
    let mut dir = root.to_owned();
    for part in path.strip_prefix("/").unwrap_or(path).components() {
        std::fs::write(dir.join("cgroup.subtree_control"), wanted.join(" "))
            .map_err(|e| format!("delegating controllers in {}: {e}", dir.display()))?;
        dir = dir.join(part);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Removes every action cgroup under `parent` (killing what is left in them): what a
/// previous life of this worker may have left behind.
pub fn remove_children(parent: &Path) -> Vec<String> {
    let mut children: Vec<String> = directories(parent)
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    children.sort();
    children.dedup();
    for child in &children {
        if let Some(manager) = manager(&parent.join(child), child) {
            if let Err(e) = manager.remove() {
                tracing::warn!(cgroup = %parent.join(child).display(), error = %e, "could not remove a leftover cgroup");
            }
        }
    }
    children
}

/// Removes a worker's parent cgroup when it stops (it must be empty by then).
pub fn remove_parent(parent: &Path) {
    for dir in directories(parent) {
        if dir.is_dir() {
            if let Err(e) = std::fs::remove_dir(&dir) {
                tracing::debug!(cgroup = %dir.display(), error = %e, "could not remove the worker's cgroup");
            }
        }
    }
}
