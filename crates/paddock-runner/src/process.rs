//! The plain-process runner: the command runs as a child of the worker, in its own
//! process group, in the action's directory, with exactly the Command's environment.
//!
//! It isolates nothing: the command sees the worker's file system and network. It
//! exists for machines where containers cannot run, and as the baseline the
//! container runner is measured against.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Stdio;
use std::time::Instant;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::{resolve_program, RunError, RunOutcome, RunSpec, Runner};

#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessRunner;

/// Kills every process in a group.
fn kill_group(pgid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(-(pgid as i32), libc::SIGKILL);
    }
}

#[async_trait]
impl Runner for ProcessRunner {
    async fn run(&self, spec: RunSpec, cancel: CancellationToken) -> Result<RunOutcome, RunError> {
        let working_dir = spec.input_root.join(&spec.working_directory);
        if !working_dir.is_dir() {
            return Err(RunError::Action(format!(
                "the working directory {:?} is not a directory in the input root",
                spec.working_directory
            )));
        }
        let program = resolve_program(
            &spec.arguments[0],
            &working_dir,
            &spec.environment,
            std::path::Path::new("/"),
        )
        .map_err(RunError::Action)?;
        let stdout = std::fs::File::create(&spec.stdout)
            .map_err(|e| RunError::Worker(format!("creating the stdout file: {e}")))?;
        let stderr = std::fs::File::create(&spec.stderr)
            .map_err(|e| RunError::Worker(format!("creating the stderr file: {e}")))?;
        let mut command = std::process::Command::new(&program);
        command
            .arg0(&spec.arguments[0])
            .args(&spec.arguments[1..])
            .env_clear()
            .envs(spec.environment.iter().map(|(k, v)| (k, v)))
            .current_dir(&working_dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        let started = Instant::now();
        let mut child = tokio::process::Command::from(command)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                    RunError::Action(format!("cannot run {:?}: {e}", spec.arguments[0]))
                }
                _ if e.raw_os_error() == Some(libc::ENOEXEC) => {
                    RunError::Action(format!("cannot run {:?}: {e}", spec.arguments[0]))
                }
                _ => RunError::Worker(format!("starting {:?}: {e}", spec.arguments[0])),
            })?;
        let pgid = child.id().expect("a just-spawned child has a pid");
        let ended = tokio::select! {
            status = child.wait() => Some(status),
            _ = tokio::time::sleep(spec.timeout) => None,
            _ = cancel.cancelled() => {
                kill_group(pgid);
                let _ = child.wait().await;
                return Err(RunError::Cancelled);
            }
        };
        // Whatever the command left behind in its group goes with it.
        kill_group(pgid);
        let (status, timed_out) = match ended {
            Some(status) => (status, false),
            None => (child.wait().await, true),
        };
        let status =
            status.map_err(|e| RunError::Worker(format!("waiting for the command: {e}")))?;
        let duration = started.elapsed();
        let (exit_code, message) = match (status.code(), status.signal()) {
            (Some(code), _) => (code, String::new()),
            (None, Some(signal)) if timed_out => (
                128 + signal,
                format!("killed at its timeout of {}s", spec.timeout.as_secs_f64()),
            ),
            (None, Some(signal)) => (128 + signal, format!("killed by signal {signal}")),
            (None, None) => (-1, "ended without an exit code".to_owned()),
        };
        Ok(RunOutcome {
            exit_code,
            timed_out,
            duration,
            message,
            usage: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(dir: &std::path::Path, args: &[&str], timeout: Duration) -> RunSpec {
        RunSpec {
            arguments: args.iter().map(|s| s.to_string()).collect(),
            environment: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("GREETING".into(), "hi".into()),
            ],
            input_root: dir.to_owned(),
            working_directory: String::new(),
            stdout: dir.join("stdout"),
            stderr: dir.join("stderr"),
            timeout,
            platform: vec![],
            identity: None,
            max_file_size: None,
        }
    }

    #[tokio::test]
    async fn runs_with_exactly_the_given_environment() {
        let dir = tempfile::tempdir().unwrap();
        let outcome = ProcessRunner
            .run(
                spec(
                    dir.path(),
                    &["sh", "-c", "env | sort; exit 3"],
                    Duration::from_secs(10),
                ),
                CancellationToken::new(),
            )
            .await
            .unwrap();
        assert_eq!(outcome.exit_code, 3);
        let out = std::fs::read_to_string(dir.path().join("stdout")).unwrap();
        assert!(out.contains("GREETING=hi"));
        assert!(!out.contains("HOME="), "nothing is inherited: {out}");
    }

    #[tokio::test]
    async fn timeouts_kill_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survivor");
        let script = format!("(sleep 2; touch {}) & sleep 60", marker.display());
        let outcome = ProcessRunner
            .run(
                spec(
                    dir.path(),
                    &["sh", "-c", &script],
                    Duration::from_millis(300),
                ),
                CancellationToken::new(),
            )
            .await
            .unwrap();
        assert!(outcome.timed_out);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!marker.exists(), "the background child was killed too");
    }

    #[tokio::test]
    async fn missing_programs_are_the_actions_fault() {
        let dir = tempfile::tempdir().unwrap();
        let err = ProcessRunner
            .run(
                spec(dir.path(), &["no-such-program"], Duration::from_secs(1)),
                CancellationToken::new(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::Action(_)), "{err}");
    }
}
