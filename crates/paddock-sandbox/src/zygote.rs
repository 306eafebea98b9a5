//! The zygote: a single-threaded process, forked from the worker before its async
//! runtime starts, that forks one helper per container.
//!
//! libcontainer must not run in a multi-threaded process (it forks and runs Rust code
//! in the children), and starting a fresh helper binary per action costs milliseconds
//! of loading and linking. The zygote avoids both: it is forked while the process is
//! still single-threaded, listens on a Unix socket in a root-only directory, and for
//! each connection forks a child that serves one container request on it (see
//! [`crate::helper::serve`]). The zygote dies with its parent; a helper that is
//! serving finishes on its own, and kills its container if its connection closes.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::sys::signal::{signal, SigHandler, Signal};
use nix::unistd::{fork, ForkResult};

/// A running zygote, as the runners that use it see it.
#[derive(Debug, Clone)]
pub struct Zygote {
    socket: PathBuf,
}

impl Zygote {
    /// Forks the zygote, listening on `socket`.
    ///
    /// # Safety
    ///
    /// The calling process must have exactly one thread: call this from `main` before
    /// any runtime or thread starts.
    pub unsafe fn start(socket: &Path) -> io::Result<Zygote> {
        let dir = socket.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir)?;
        // Only root may talk to the zygote: a connection can start containers.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        match std::fs::remove_file(socket) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(socket)?;
        // Compiled here, once: every helper inherits the filters.
        crate::seccomp::filters().map_err(io::Error::other)?;
        // SAFETY: the caller guarantees that this process is single-threaded.
        match unsafe { fork() }.map_err(io::Error::from)? {
            ForkResult::Child => {
                // SAFETY: prctl with PR_SET_PDEATHSIG and PR_SET_NAME take plain values.
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    libc::prctl(libc::PR_SET_NAME, c"paddock-zygote".as_ptr());
                }
                // Finished helpers are reaped by the kernel.
                // SAFETY: ignoring SIGCHLD installs no handler code.
                let _ = unsafe { signal(Signal::SIGCHLD, SigHandler::SigIgn) };
                serve(listener)
            }
            ForkResult::Parent { .. } => Ok(Zygote {
                socket: socket.to_owned(),
            }),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

/// The zygote's life: accept a connection, fork a helper for it, repeat.
fn serve(listener: UnixListener) -> ! {
    loop {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => std::process::exit(1),
        };
        // SAFETY: the zygote is single-threaded, so the child may do anything.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                // SAFETY: closing the listener's descriptor in the child and restoring
                // SIGCHLD (the helper waits for its container) are plain syscalls.
                unsafe {
                    libc::close(listener.as_raw_fd());
                    let _ = signal(Signal::SIGCHLD, SigHandler::SigDfl);
                    libc::prctl(libc::PR_SET_NAME, c"paddock-sandbox".as_ptr());
                }
                crate::helper::serve(conn);
                std::process::exit(0);
            }
            Ok(ForkResult::Parent { .. }) => drop(conn),
            Err(_) => drop(conn), // the runner sees the connection close and reports it
        }
    }
}
