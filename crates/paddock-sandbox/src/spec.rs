//! The OCI runtime spec of one action's container.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxDeviceType, LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, ProcessBuilder, RootBuilder,
    Spec, SpecBuilder, UserBuilder,
};

use crate::rootfs::Rootfs;
use paddock_runner::Identity;

/// Where the input root appears inside a container, unless its root says otherwise
/// (an image's `WorkingDir`).
pub const WORK_DIR: &str = "/work";

/// The CPU accounting period for `cores` limits, in microseconds.
const CPU_PERIOD: u64 = 100_000;

/// Resource limits of one action.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    /// CPU time per wall-clock time: 2.0 allows two cores' worth.
    pub cores: Option<f64>,
}

/// What a container for one action is made of.
pub struct ContainerSpec<'a> {
    pub arguments: &'a [String],
    /// `NAME=VALUE`, in order; later entries win.
    pub environment: Vec<String>,
    /// The working directory relative to the input root.
    pub working_directory: &'a str,
    pub rootfs: &'a Rootfs,
    pub input_root: &'a Path,
    pub identity: Identity,
    pub limits: Limits,
    /// `RLIMIT_FSIZE`: the largest file the action may write.
    pub max_file_size: Option<u64>,
    /// Absolute: relative paths would make libcontainer pick systemd's cgroup driver.
    pub cgroups_path: PathBuf,
    pub tmp_size: u64,
}

fn mount(destination: &str, typ: &str, source: &str, options: &[&str]) -> Mount {
    MountBuilder::default()
        .destination(destination)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .expect("mounts built from constants are valid")
}

fn bind(source: &Path, destination: &Path, writable: bool) -> Mount {
    let options: &[&str] = if writable {
        &["rbind", "rw", "nosuid", "nodev"]
    } else {
        &["rbind", "ro", "nosuid", "nodev"]
    };
    MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .expect("bind mounts of absolute paths are valid")
}

/// Builds the spec: namespaces for mounts, PIDs, IPC, UTS and cgroups (the network
/// namespace is made, with only loopback, by the helper that starts the container);
/// no capabilities; `no_new_privileges`; a read-only root (unless it was made for this
/// action alone); and only these mounts: the resolver's, the writable input root (at
/// [`WORK_DIR`] unless the root says otherwise), a private `/tmp`, `/proc` and a
/// minimal `/dev`.
pub fn build(spec: &ContainerSpec) -> Result<Spec, String> {
    fn e(what: &'static str) -> impl Fn(oci_spec::OciSpecError) -> String {
        move |err| format!("building the container's {what}: {err}")
    }
    let work_dir = &spec.rootfs.work_dir;
    let cwd = if spec.working_directory.is_empty() {
        work_dir.clone()
    } else {
        work_dir.join(spec.working_directory)
    };
    let no_capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(HashSet::new())
        .effective(HashSet::new())
        .inheritable(HashSet::new())
        .permitted(HashSet::new())
        .ambient(HashSet::new())
        .build()
        .map_err(e("capabilities"))?;
    let process = ProcessBuilder::default()
        .args(spec.arguments.to_vec())
        .env(spec.environment.clone())
        .cwd(cwd)
        .user(
            UserBuilder::default()
                .uid(spec.identity.uid)
                .gid(spec.identity.gid)
                .build()
                .map_err(e("user"))?,
        )
        .rlimits(rlimits(spec.max_file_size).map_err(e("resource limits"))?)
        .capabilities(no_capabilities)
        .no_new_privileges(true)
        .build()
        .map_err(e("process"))?;

    let tmp_size = format!("size={}", spec.tmp_size);
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/tmp",
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=1777", &tmp_size],
        ),
    ];
    mounts.extend(
        spec.rootfs
            .mounts
            .iter()
            .map(|m| bind(&m.source, &m.destination, false)),
    );
    mounts.push(bind(spec.input_root, work_dir, true));

    let mut resources = LinuxResourcesBuilder::default().devices(device_rules()?);
    if let Some(bytes) = spec.limits.memory_bytes {
        // Equal limits for memory and memory+swap: an action never swaps.
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(bytes as i64)
                .swap(bytes as i64)
                .build()
                .map_err(e("memory limit"))?,
        );
    }
    if let Some(pids) = spec.limits.pids {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(pids as i64)
                .build()
                .map_err(e("pids limit"))?,
        );
    }
    if let Some(cores) = spec.limits.cores {
        let quota = ((cores * CPU_PERIOD as f64) as i64).max(1000);
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(CPU_PERIOD)
                .build()
                .map_err(e("cpu limit"))?,
        );
    }
    let namespaces = [
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Cgroup,
    ]
    .into_iter()
    .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
    .collect::<Result<Vec<_>, _>>()
    .map_err(e("namespaces"))?;
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(spec.cgroups_path.clone())
        .resources(resources.build().map_err(e("resources"))?)
        .masked_paths(
            [
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/sys/firmware",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
        )
        .readonly_paths(
            [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
        )
        .build()
        .map_err(e("linux section"))?;
    SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(spec.rootfs.root.clone())
                .readonly(!spec.rootfs.writable)
                .build()
                .map_err(e("root"))?,
        )
        .hostname("paddock")
        .process(process)
        .mounts(mounts)
        .linux(linux)
        .build()
        .map_err(e("spec"))
}

/// The action's resource limits: no core dumps (a crashing tool must not fill the
/// disk with them), and at most `max_file_size` bytes in any one file.
fn rlimits(
    max_file_size: Option<u64>,
) -> Result<Vec<oci_spec::runtime::PosixRlimit>, oci_spec::OciSpecError> {
    use oci_spec::runtime::{PosixRlimitBuilder, PosixRlimitType};
    let mut limits = vec![PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitCore)
        .hard(0u64)
        .soft(0u64)
        .build()?];
    if let Some(bytes) = max_file_size {
        limits.push(
            PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitFsize)
                .hard(bytes)
                .soft(bytes)
                .build()?,
        );
    }
    Ok(limits)
}

/// Device access: nothing but the standard character devices.
fn device_rules() -> Result<Vec<oci_spec::runtime::LinuxDeviceCgroup>, String> {
    let mut rules = vec![LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()
        .map_err(|e| e.to_string())?];
    for (major, minor) in [
        (1, Some(3)),
        (1, Some(5)),
        (1, Some(7)),
        (1, Some(8)),
        (1, Some(9)),
        (5, Some(0)),
        (5, Some(2)),
        (136, None),
    ] {
        let mut rule = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(major)
            .access("rwm");
        if let Some(minor) = minor {
            rule = rule.minor(minor);
        }
        rules.push(rule.build().map_err(|e| e.to_string())?);
    }
    Ok(rules)
}
