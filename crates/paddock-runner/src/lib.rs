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

/// Why a command did not run to an outcome.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The action cannot run anywhere (its program does not exist, say).
    #[error("{0}")]
    Action(String),
    /// What the action's platform names cannot be provided (a missing image or store
    /// path): FAILED_PRECONDITION, and no retry elsewhere.
    #[error("{0}")]
    Precondition(String),
    /// This worker could not run it; another may.
    #[error("{0}")]
    Worker(String),
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
