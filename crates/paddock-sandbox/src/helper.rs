//! The helper that runs one container, in a single-threaded process forked by the
//! [zygote](crate::zygote).
//!
//! It reads a [`Request`] (one JSON line) from its connection, gives itself a private
//! network namespace with only loopback up, builds and starts the container with
//! libcontainer, and waits for it, its timeout, or the connection closing (the worker
//! cancelled, or died), whichever comes first. Then it reads the cgroup's statistics,
//! writes a [`Response`] line and closes its side, and only then deletes the container
//! (processes, cgroup, state), so that teardown is off the action's critical path.

use std::ffi::CString;
use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use crate::cgroups;

/// What the worker asks of the helper.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub container_id: String,
    /// The bundle directory holding `config.json`.
    pub bundle: PathBuf,
    /// libcontainer's state directory.
    pub state_root: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub timeout_ms: u64,
    /// The container's cgroup, for statistics.
    pub cgroup: PathBuf,
}

/// How the container ended.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub exit_code: i32,
    /// The signal that ended the action, if one did.
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub cancelled: bool,
    pub peak_memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub memory_limit_hits: u64,
    pub cpu_user_micros: u64,
    pub cpu_system_micros: u64,
    pub run_micros: u64,
    /// Where the helper's time went, phase by phase in microseconds, for the
    /// benchmark.
    pub phases: Vec<(String, u64)>,
    /// Set when the container could not be run at all.
    pub error: Option<String>,
}

/// How the container's init process starts the line it writes on the action's
/// stderr, before exiting 127, when the program cannot be run: the runner turns it
/// into an error for the client.
pub const NOT_FOUND_MARKER: &str = "paddock: cannot run ";

/// Serves one request on `conn`: the request line in, the response line out.
pub fn serve(conn: UnixStream) {
    let mut line = String::new();
    let read = std::io::BufReader::new(&conn).read_line(&mut line);
    let (response, container) = match read
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_str::<Request>(&line).map_err(|e| e.to_string()))
    {
        Ok(request) => run(&request, conn.as_raw_fd()),
        Err(e) => (fail(format!("bad sandbox request: {e}")), None),
    };
    let mut out = &conn;
    let _ = serde_json::to_writer(&mut out, &response);
    let _ = out.write_all(b"\n");
    let _ = conn.shutdown(std::net::Shutdown::Write);
    if let Some(mut container) = container {
        if let Err(e) = container.delete(true) {
            tracing::error!(container = container.id(), error = %e, "could not delete a container");
        }
    }
}

fn fail(message: impl Into<String>) -> Response {
    Response {
        error: Some(message.into()),
        ..Default::default()
    }
}

/// Records how long each phase took.
struct Stopwatch {
    last: Instant,
    phases: Vec<(String, u64)>,
}

impl Stopwatch {
    fn new() -> Self {
        Stopwatch {
            last: Instant::now(),
            phases: Vec::new(),
        }
    }

    fn lap(&mut self, phase: &str) -> u64 {
        let now = Instant::now();
        let micros = now.duration_since(self.last).as_micros() as u64;
        self.phases.push((phase.to_owned(), micros));
        self.last = now;
        micros
    }
}

/// Runs the container; returns the response and the container still to delete.
fn run(request: &Request, cancel_fd: RawFd) -> (Response, Option<Container>) {
    let mut watch = Stopwatch::new();
    if let Err(e) = private_network() {
        return (fail(format!("creating the network namespace: {e}")), None);
    }
    watch.lap("network namespace");
    let open = |path: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(OwnedFd::from)
    };
    let (stdout, stderr, stdin) = match (
        open(&request.stdout),
        open(&request.stderr),
        std::fs::File::open("/dev/null").map(OwnedFd::from),
    ) {
        (Ok(o), Ok(e), Ok(i)) => (o, e, i),
        _ => return (fail("opening the action's standard streams"), None),
    };
    let built = ContainerBuilder::new(request.container_id.clone(), SyscallType::default())
        .with_root_path(&request.state_root)
        .map(|b| {
            b.with_stdin(stdin)
                .with_stdout(stdout)
                .with_stderr(stderr)
                .with_executor(SandboxExecutor)
                .as_init(&request.bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
        });
    let mut container = match built {
        Ok(Ok(c)) => c,
        Ok(Err(e)) | Err(e) => {
            let _ = remove_leftover(&request.state_root.join(&request.container_id));
            return (fail(format!("creating the container: {e}")), None);
        }
    };
    watch.lap("create container");
    let mut response = Response::default();
    let Some(pid) = container.pid() else {
        return (fail("the container has no init process"), Some(container));
    };
    if let Err(e) = container.start() {
        return (
            fail(format!("starting the container: {e}")),
            Some(container),
        );
    }
    watch.lap("start");

    let ended = wait(
        pid.as_raw(),
        Duration::from_millis(request.timeout_ms),
        cancel_fd,
    );
    match ended {
        Ended::Exited => {}
        Ended::TimedOut => response.timed_out = true,
        Ended::Cancelled => response.cancelled = true,
    }
    if !matches!(ended, Ended::Exited) {
        let _ = container.kill(nix::sys::signal::Signal::SIGKILL, true);
    }
    match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::__WALL)) {
        Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => response.exit_code = code,
        Ok(nix::sys::wait::WaitStatus::Signaled(_, signal, _)) => {
            response.signal = Some(signal as i32);
            response.exit_code = 128 + signal as i32;
        }
        other => response.error = Some(format!("waiting for the action: {other:?}")),
    }
    response.run_micros = watch.lap("run");

    if let Some(usage) = cgroups::usage(&request.cgroup, &request.container_id) {
        response.peak_memory_bytes = usage.peak_memory_bytes;
        response.memory_limit_bytes = usage.memory_limit_bytes;
        response.memory_limit_hits = usage.memory_limit_hits;
        response.cpu_user_micros = usage.cpu_user_micros;
        response.cpu_system_micros = usage.cpu_system_micros;
    }
    watch.lap("statistics");
    response.phases = watch.phases;
    (response, Some(container))
}

/// Removes a container's state after a failed build, killing what it started.
fn remove_leftover(state: &Path) -> Result<(), String> {
    if state.exists() {
        let mut container = Container::load(state.to_owned()).map_err(|e| e.to_string())?;
        container.delete(true).map_err(|e| e.to_string())?;
    }
    Ok(())
}

enum Ended {
    Exited,
    TimedOut,
    Cancelled,
}

/// Waits for the process `pid`, the timeout, or `cancel_fd` turning readable (the
/// worker closed its side).
fn wait(pid: i32, timeout: Duration, cancel_fd: RawFd) -> Ended {
    // SAFETY: pidfd_open has no memory-safety preconditions; the result is checked.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if raw < 0 {
        // Without a pidfd (very old kernels) fall back to a blocking wait.
        return Ended::Exited;
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Ended::TimedOut;
        }
        let mut fds = [
            libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: cancel_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = remaining.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of two pollfd structures.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms.max(1)) };
        if n < 0 {
            continue; // EINTR
        }
        if fds[0].revents != 0 {
            return Ended::Exited;
        }
        if fds[1].revents != 0 {
            return Ended::Cancelled;
        }
    }
}

/// Moves the helper (and so the container it starts) into a new network namespace
/// whose only interface, loopback, is up: no route out, but `localhost` works.
fn private_network() -> Result<(), String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
    // SAFETY: plain socket and ioctl calls on a zeroed `ifreq` naming "lo".
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let sock = OwnedFd::from_raw_fd(sock);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
    }
    Ok(())
}

/// Runs the action inside the container: finds the program the way REAPI says (the
/// Command's PATH, or a default), installs the seccomp filters, and execs it with
/// exactly the spec's environment (libcontainer would add `HOME`).
#[derive(Clone)]
struct SandboxExecutor;

impl Executor for SandboxExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let process = spec.process().as_ref().ok_or(ExecutorError::InvalidArg)?;
        let args = process.args().as_ref().ok_or(ExecutorError::InvalidArg)?;
        let environment: Vec<String> = process.env().clone().unwrap_or_default();
        let env: Vec<(String, String)> = environment
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let program =
            match paddock_runner::resolve_program(&args[0], process.cwd(), &env, Path::new("/")) {
                Ok(p) => p,
                Err(message) => {
                    // `message` reads "cannot run ...".
                    let _ = writeln!(std::io::stderr(), "paddock: {message}");
                    std::process::exit(127);
                }
            };
        crate::seccomp::install().map_err(ExecutorError::Other)?;
        let program = CString::new(program.as_os_str().as_encoded_bytes())
            .map_err(|_| ExecutorError::InvalidArg)?;
        let to_c = |s: &String| CString::new(s.as_bytes()).unwrap_or_default();
        let argv: Vec<CString> = args.iter().map(to_c).collect();
        let envp: Vec<CString> = environment.iter().map(to_c).collect();
        let error = nix::unistd::execve(&program, &argv, &envp).unwrap_err();
        let _ = writeln!(
            std::io::stderr(),
            "{NOT_FOUND_MARKER}{:?}: {error}",
            args[0]
        );
        std::process::exit(127);
    }

    fn validate(&self, _spec: &Spec) -> Result<(), ExecutorValidationError> {
        Ok(())
    }
}
