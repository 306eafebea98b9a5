//! The sandbox: every action in its own container.
//!
//! For each action the [`ContainerRunner`] builds an OCI runtime spec (see [`spec`])
//! whose root comes from a [`RootfsResolver`] (the worker's own toolchain by
//! default, [`HostResolver`]), and a single-threaded helper ([`helper`]), forked by
//! the worker's [`Zygote`], runs it with youki's `libcontainer`: its own mount, PID, IPC, UTS, cgroup and
//! network namespaces (loopback only), no capabilities, `no_new_privileges`, an
//! unprivileged uid, cgroup limits for memory, PIDs and CPU under the worker's parent
//! cgroup ([`cgroups`]), and a seccomp filter ([`seccomp`]). Timeouts and
//! cancellation kill the whole container; afterwards its cgroup statistics are read
//! and everything it had is removed.

pub mod bench;
pub mod cgroups;
pub mod helper;
mod rootfs;
mod runner;
pub mod seccomp;
pub mod spec;
pub mod toolchain;
mod zygote;

pub use rootfs::{
    prepare_mount_points, property_values, write_etc, BindMount, HostResolver, ResolveError,
    Rootfs, RootfsResolver, LOOPBACK_HOSTS,
};
pub use runner::{ContainerRunner, SandboxOptions, INPUT_ROOT_PATH};
pub use spec::Limits;
pub use zygote::Zygote;
