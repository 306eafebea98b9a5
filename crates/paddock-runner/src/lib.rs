//! How a worker runs an action's command once its inputs are in place.
//!
//! A [`Runner`] takes a [`RunSpec`] (arguments, environment, the materialised input
//! root, where to put stdout and stderr, the timeout) and reports how the command
//! ended. The worker does not care how: [`ProcessRunner`] starts a plain child
//! process; the container runner isolates it.

mod process;
mod resolve;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

pub use process::ProcessRunner;
pub use resolve::resolve_program;

/// Everything a runner needs to run one command.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The command line; the first argument names the program.
    pub arguments: Vec<String>,
    /// The complete environment: nothing else is inherited.
    pub environment: Vec<(String, String)>,
    /// The materialised input root (absolute).
    pub input_root: PathBuf,
    /// The working directory, relative to the input root (empty for the root).
    pub working_directory: String,
    /// Files that receive the command's standard output and error.
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub timeout: Duration,
    /// The action's platform properties, for runners that honour some (limits, images).
    pub platform: Vec<(String, String)>,
    /// Who the command runs as, for runners that isolate it (the container runner):
    /// no other action running on the worker at the same time has the same identity.
    pub identity: Option<Identity>,
    /// The largest file the command may write (`RLIMIT_FSIZE`), where the runner can
    /// bound it.
    pub max_file_size: Option<u64>,
}

/// A uid and gid an action runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// The identities a worker gives its actions: `count` consecutive uids from `uid`, and
/// as many gids from `gid`, one pair per running action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identities {
    pub uid: u32,
    pub gid: u32,
    pub count: u32,
}

impl Identities {
    /// The `index`th identity (`index < count`).
    pub fn get(&self, index: u32) -> Identity {
        debug_assert!(index < self.count);
        Identity {
            uid: self.uid + index,
            gid: self.gid + index,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Identity> + '_ {
        (0..self.count).map(|i| self.get(i))
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// The exit code; 128 + N if a signal N ended it.
    pub exit_code: i32,
    /// The runner killed the command at its timeout.
    pub timed_out: bool,
    /// How long the command ran.
    pub duration: Duration,
    /// Something the client should read, e.g. which signal ended the command.
    pub message: String,
    /// What the command used, where the runner can measure it.
    pub usage: Option<ResourceUsage>,
}

/// Resources an action used, as its cgroup counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceUsage {
    pub peak_memory_bytes: u64,
    /// Zero when unlimited.
    pub memory_limit_bytes: u64,
    pub cpu_user_micros: u64,
    pub cpu_system_micros: u64,
    /// The kernel killed the command for exceeding its memory limit.
    pub out_of_memory: bool,
}

/// Why a command did not run to an outcome, and so whose fault that is.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The action's fault: it cannot run anywhere (its program does not exist, its
    /// platform property is malformed). INVALID_ARGUMENT, final.
    #[error("{0}")]
    Action(String),
    /// The action's fault: what its platform names cannot be provided (an image or a
    /// store path that does not exist). FAILED_PRECONDITION, final.
    #[error("{0}")]
    Precondition(String),
    /// The action's fault: it needs more than a configured limit allows (its input
    /// tree, its outputs, its disk). RESOURCE_EXHAUSTED, final; the message names the
    /// limit.
    #[error("{0}")]
    Limit(String),
    /// This worker's fault (its disk, its mounts, its access to a registry): another
    /// worker may succeed, and the failure counts in this worker's health.
    #[error("{0}")]
    Worker(String),
    /// A shared service failed (the CAS, a registry, a binary cache): retried, but not
    /// held against the worker.
    #[error("{0}")]
    Infrastructure(String),
    /// Nobody's: this worker lacks what the action demands of it (a toolchain file
    /// that differs from the action's manifest). Tried elsewhere, not held against the
    /// worker; the message names what differs.
    #[error("{0}")]
    Mismatch(String),
    /// It was cancelled and has been stopped.
    #[error("cancelled")]
    Cancelled,
}

#[async_trait]
pub trait Runner: Send + Sync + 'static {
    /// Runs the command to its end, its timeout, or `cancel`, whichever comes first;
    /// in every case nothing it started is left running.
    async fn run(&self, spec: RunSpec, cancel: CancellationToken) -> Result<RunOutcome, RunError>;
}
