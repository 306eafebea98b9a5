//! The syscall filter every action runs under: an allow list, modelled on the default
//! profile of runc and Docker.
//!
//! Two filters, installed in the container's init process just before it execs the
//! action (after `no_new_privileges`, so no privilege is needed):
//!
//! 1. the allow list, built with `seccompiler`: the x86-64 syscalls that builds use
//!    ([`ALLOWED`]); anything else (a syscall newer than the list, or one builds never
//!    need) is answered ENOSYS, which tools that probe for a feature take as "not
//!    here" and carry on;
//! 2. a hand-written BPF program for what the allow list cannot say, whose answer
//!    wins over the first's (an errno outranks an allow; between two errnos, the
//!    later filter's counts): known-dangerous syscalls get EPERM rather than ENOSYS
//!    ([`DENIED`]); `socket` and `socketpair` only for the address families builds
//!    use (others EAFNOSUPPORT, as a kernel without them answers); `clone` only
//!    without new namespaces, `personality` only for the harmless personas (EPERM);
//!    `clone3`, whose flags BPF cannot read, ENOSYS (glibc falls back to `clone`);
//!    and x32 syscall numbers (which seccompiler does not see) EPERM.
//!
//! Arguments are compared on their low 32 bits: for `int` arguments that is exactly
//! what the kernel uses, and `clone` takes only the low 32 bits of its flags.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// x86-64 numbers of syscalls the `libc` crate does not name.
mod nr {
    pub const IO_PGETEVENTS: i64 = 333;
    pub const URETPROBE: i64 = 335;
    pub const CACHESTAT: i64 = 451;
    pub const MAP_SHADOW_STACK: i64 = 453;
    pub const FUTEX_WAKE: i64 = 454;
    pub const FUTEX_WAIT: i64 = 455;
    pub const FUTEX_REQUEUE: i64 = 456;
    pub const STATMOUNT: i64 = 457;
    pub const LISTMOUNT: i64 = 458;
    pub const SETXATTRAT: i64 = 463;
    pub const GETXATTRAT: i64 = 464;
    pub const LISTXATTRAT: i64 = 465;
    pub const REMOVEXATTRAT: i64 = 466;
}

/// The syscalls an action may make, grouped by what they are for. `socket`,
/// `socketpair`, `clone` and `personality` are here and restricted by the second
/// filter.
pub const ALLOWED: &[i64] = &[
    // Processes and threads.
    libc::SYS_clone,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
    libc::SYS_tkill,
    libc::SYS_tgkill,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_gettid,
    libc::SYS_getpgid,
    libc::SYS_getpgrp,
    libc::SYS_setpgid,
    libc::SYS_getsid,
    libc::SYS_setsid,
    libc::SYS_set_tid_address,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_arch_prctl,
    libc::SYS_prctl,
    libc::SYS_personality,
    libc::SYS_seccomp,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_process_mrelease,
    libc::SYS_restart_syscall,
    libc::SYS_pause,
    libc::SYS_get_thread_area,
    libc::SYS_set_thread_area,
    libc::SYS_modify_ldt,
    nr::MAP_SHADOW_STACK,
    nr::URETPROBE,
    // Identities, capabilities and limits (an unprivileged process can only narrow them).
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getgroups,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_setgroups,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_getrlimit,
    libc::SYS_setrlimit,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    libc::SYS_ioprio_get,
    libc::SYS_ioprio_set,
    libc::SYS_umask,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_restrict_self,
    // Scheduling.
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_getattr,
    libc::SYS_sched_setattr,
    libc::SYS_sched_getparam,
    libc::SYS_sched_setparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_getcpu,
    // Memory.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mincore,
    libc::SYS_msync,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_munlock,
    libc::SYS_mlockall,
    libc::SYS_munlockall,
    libc::SYS_remap_file_pages,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    libc::SYS_memfd_secret,
    libc::SYS_mseal,
    libc::SYS_pkey_alloc,
    libc::SYS_pkey_free,
    libc::SYS_pkey_mprotect,
    // Signals.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sigaltstack,
    libc::SYS_signalfd,
    libc::SYS_signalfd4,
    // Time and timers (reading clocks only).
    libc::SYS_time,
    libc::SYS_gettimeofday,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_alarm,
    libc::SYS_getitimer,
    libc::SYS_setitimer,
    libc::SYS_times,
    libc::SYS_timer_create,
    libc::SYS_timer_delete,
    libc::SYS_timer_gettime,
    libc::SYS_timer_settime,
    libc::SYS_timer_getoverrun,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    // Synchronisation.
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    nr::FUTEX_WAKE,
    nr::FUTEX_WAIT,
    nr::FUTEX_REQUEUE,
    // Files and directories.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_creat,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_lseek,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_flock,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync,
    libc::SYS_syncfs,
    libc::SYS_sync_file_range,
    libc::SYS_truncate,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fadvise64,
    libc::SYS_readahead,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_splice,
    libc::SYS_tee,
    libc::SYS_vmsplice,
    libc::SYS_stat,
    libc::SYS_fstat,
    libc::SYS_lstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getcwd,
    libc::SYS_chdir,
    libc::SYS_fchdir,
    libc::SYS_getdents,
    libc::SYS_getdents64,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchmodat2,
    libc::SYS_chown,
    libc::SYS_fchown,
    libc::SYS_lchown,
    libc::SYS_fchownat,
    libc::SYS_utime,
    libc::SYS_utimes,
    libc::SYS_utimensat,
    libc::SYS_futimesat,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_flistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    nr::GETXATTRAT,
    nr::SETXATTRAT,
    nr::LISTXATTRAT,
    nr::REMOVEXATTRAT,
    nr::CACHESTAT,
    nr::STATMOUNT,
    nr::LISTMOUNT,
    libc::SYS_inotify_init,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_rm_watch,
    libc::SYS_fanotify_mark,
    // Polling, pipes and events.
    libc::SYS_pipe,
    libc::SYS_pipe2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_epoll_create,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd,
    libc::SYS_eventfd2,
    // Asynchronous I/O (not io_uring).
    libc::SYS_io_setup,
    libc::SYS_io_destroy,
    libc::SYS_io_submit,
    libc::SYS_io_cancel,
    libc::SYS_io_getevents,
    nr::IO_PGETEVENTS,
    // Sockets (families restricted by the second filter).
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    // System V and POSIX IPC (in the container's own IPC namespace).
    libc::SYS_shmget,
    libc::SYS_shmat,
    libc::SYS_shmdt,
    libc::SYS_shmctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_semctl,
    libc::SYS_msgget,
    libc::SYS_msgsnd,
    libc::SYS_msgrcv,
    libc::SYS_msgctl,
    libc::SYS_mq_open,
    libc::SYS_mq_unlink,
    libc::SYS_mq_timedsend,
    libc::SYS_mq_timedreceive,
    libc::SYS_mq_notify,
    libc::SYS_mq_getsetattr,
    // The system, read-only.
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getrandom,
];

/// Syscalls that exist but that no action may make: answered EPERM, as a kernel
/// answers an unprivileged caller, rather than ENOSYS. Mounting, tracing and reading
/// other processes, loading kernel code, BPF, perf, keyrings, userfaultfd, io_uring,
/// new namespaces, clock and host changes, handles that bypass paths.
const DENIED: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_process_madvise,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_quotactl,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_syslog,
    libc::SYS_vhangup,
    libc::SYS_uselib,
    libc::SYS_lookup_dcookie,
    libc::SYS_kcmp,
    libc::SYS_pidfd_getfd,
    libc::SYS_fanotify_init,
];

/// Address families an action may open sockets of: local, IPv4 and IPv6 (loopback
/// only, in its network namespace), and netlink, which glibc asks for the
/// addresses of interfaces.
const SOCKET_FAMILIES: &[u32] = &[
    libc::AF_UNIX as u32,
    libc::AF_INET as u32,
    libc::AF_INET6 as u32,
    libc::AF_NETLINK as u32,
];

/// `clone` flags that make new namespaces (the low 32 bits; `CLONE_NEWTIME` overlaps
/// the exit signal in `clone` and is possible only through `clone3` and `unshare`).
const NEW_NAMESPACES: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

/// Personas an action may take: the normal one, the 32-bit one, the 2.6 uname, and
/// the query (`0xffffffff`). Not, for instance, `ADDR_NO_RANDOMIZE`.
const PERSONAS: &[u32] = &[0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The allow-list filter.
pub fn allow_list() -> Result<BpfProgram, String> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        ALLOWED.iter().map(|nr| (*nr, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::ENOSYS as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| format!("building the seccomp filter: {e}"))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| format!("compiling the seccomp filter: {e}"))
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGE_K: u16 = 0x35;
const BPF_JSET_K: u16 = 0x45;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// Offsets in `struct seccomp_data`: the syscall number, the architecture, and the
/// low 32 bits of the first argument (little-endian).
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const ARG0_LOW_OFFSET: u32 = 16;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// A classic BPF program under construction, whose jumps name labels and are
/// resolved at the end (BPF jumps only forward, by at most 255 instructions).
struct Program {
    code: Vec<(u16, u32, Target, Target)>,
    labels: BTreeMap<&'static str, usize>,
}

#[derive(Clone, Copy)]
enum Target {
    Next,
    Label(&'static str),
}

impl Program {
    fn new() -> Self {
        Program {
            code: Vec::new(),
            labels: BTreeMap::new(),
        }
    }

    fn stmt(&mut self, code: u16, k: u32) {
        self.code.push((code, k, Target::Next, Target::Next));
    }

    fn jump(&mut self, code: u16, k: u32, yes: Target, no: Target) {
        self.code.push((code, k, yes, no));
    }

    fn label(&mut self, name: &'static str) {
        self.labels.insert(name, self.code.len());
    }

    fn ret(&mut self, action: u32) {
        self.stmt(BPF_RET_K, action);
    }

    fn assemble(self) -> BpfProgram {
        let offset = |at: usize, target: Target| -> u8 {
            match target {
                Target::Next => 0,
                Target::Label(name) => {
                    let to = self.labels[name];
                    u8::try_from(to - at - 1).expect("filter jumps stay within 255 instructions")
                }
            }
        };
        self.code
            .iter()
            .enumerate()
            .map(|(at, &(code, k, yes, no))| seccompiler::sock_filter {
                code,
                jt: offset(at, yes),
                jf: offset(at, no),
                k,
            })
            .collect()
    }
}

fn errno(e: i32) -> u32 {
    SECCOMP_RET_ERRNO | e as u32
}

/// The argument filter (see the module's documentation).
pub fn argument_filter() -> BpfProgram {
    use Target::{Label, Next};
    let mut p = Program::new();
    p.stmt(BPF_LD_W_ABS, ARCH_OFFSET);
    // Other architectures are the allow list's business (it kills them).
    p.jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, Next, Label("allow"));
    p.stmt(BPF_LD_W_ABS, NR_OFFSET);
    p.jump(BPF_JGE_K, X32_SYSCALL_BIT, Label("eperm"), Next);
    p.jump(BPF_JEQ_K, libc::SYS_clone3 as u32, Label("enosys"), Next);
    p.jump(BPF_JEQ_K, libc::SYS_socket as u32, Label("family"), Next);
    p.jump(
        BPF_JEQ_K,
        libc::SYS_socketpair as u32,
        Label("family"),
        Next,
    );
    p.jump(BPF_JEQ_K, libc::SYS_clone as u32, Label("clone"), Next);
    p.jump(
        BPF_JEQ_K,
        libc::SYS_personality as u32,
        Label("persona"),
        Next,
    );
    for nr in DENIED {
        p.jump(BPF_JEQ_K, *nr as u32, Label("eperm"), Next);
    }
    p.ret(SECCOMP_RET_ALLOW);

    p.label("family");
    p.stmt(BPF_LD_W_ABS, ARG0_LOW_OFFSET);
    for family in SOCKET_FAMILIES {
        p.jump(BPF_JEQ_K, *family, Label("allow"), Next);
    }
    p.ret(errno(libc::EAFNOSUPPORT));

    p.label("clone");
    p.stmt(BPF_LD_W_ABS, ARG0_LOW_OFFSET);
    p.jump(BPF_JSET_K, NEW_NAMESPACES, Label("eperm"), Label("allow"));

    p.label("persona");
    p.stmt(BPF_LD_W_ABS, ARG0_LOW_OFFSET);
    for persona in PERSONAS {
        p.jump(BPF_JEQ_K, *persona, Label("allow"), Next);
    }
    p.label("eperm");
    p.ret(errno(libc::EPERM));
    p.label("enosys");
    p.ret(errno(libc::ENOSYS));
    p.label("allow");
    p.ret(SECCOMP_RET_ALLOW);
    p.assemble()
}

/// Both filters, compiled once per process: the zygote compiles them before it forks
/// any helper, so no container start pays for it.
pub fn filters() -> Result<&'static (BpfProgram, BpfProgram), String> {
    static FILTERS: std::sync::OnceLock<Result<(BpfProgram, BpfProgram), String>> =
        std::sync::OnceLock::new();
    FILTERS
        .get_or_init(|| Ok((allow_list()?, argument_filter())))
        .as_ref()
        .map_err(Clone::clone)
}

/// Installs both filters on the calling thread (which then execs the action).
pub fn install() -> Result<(), String> {
    let (allowed, arguments) = filters()?;
    seccompiler::apply_filter(allowed)
        .map_err(|e| format!("installing the seccomp allow list: {e}"))?;
    seccompiler::apply_filter(arguments)
        .map_err(|e| format!("installing the seccomp argument filter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_lists_do_not_overlap() {
        assert!(allow_list().unwrap().len() > ALLOWED.len());
        assert!(argument_filter().len() > DENIED.len());
        for nr in DENIED {
            assert!(
                !ALLOWED.contains(nr),
                "syscall {nr} is both allowed and denied"
            );
        }
        let mut sorted = ALLOWED.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ALLOWED.len(), "a syscall is listed twice");
    }
}
