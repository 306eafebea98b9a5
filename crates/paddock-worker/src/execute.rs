//! One assignment, start to finish: inputs, command, outputs, upload, result.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use paddock_client::{Remote, Source};
use paddock_proto::execution::v1::{ResourceUsage, RESOURCE_USAGE};
use paddock_proto::worker::v1 as wire;
use paddock_reapi::proto::re::{Action, ActionResult, Command, ExecutedActionMetadata};
use paddock_reapi::status::pack;
use paddock_reapi::time::{from_unix_micros, proto_duration, timestamp};
use paddock_reapi::{validate, Digest};
use paddock_runner::{RunError, RunSpec, Runner};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::cache::FileCache;
use crate::faults::Faults;
use crate::inputs::{materialize, InputError};
use crate::outputs::{self, OutputError};

/// What every assignment on this worker shares.
pub struct Context {
    pub name: String,
    pub remote: Remote,
    pub cache: Arc<FileCache>,
    pub runner: Arc<dyn Runner>,
    pub actions_dir: PathBuf,
    pub faults: Faults,
}

type Outcome = wire::finished::Outcome;

fn failed(code: Code, message: impl Into<String>, retryable: bool) -> Outcome {
    Outcome::Failed(wire::Failed {
        code: code as i32,
        message: message.into(),
        retryable,
    })
}

/// Runs an assignment and says how it ended. `started` is called once the command
/// is about to run. Nothing of the action is left on disk afterwards.
pub async fn execute(
    ctx: &Context,
    assignment: wire::Assignment,
    cancel: CancellationToken,
    started: impl FnOnce(),
) -> wire::Finished {
    let dir = ctx.actions_dir.join(&assignment.assignment_id);
    let assignment_id = assignment.assignment_id.clone();
    let outcome = run_assignment(ctx, assignment, &dir, cancel, started).await;
    remove_tree(dir).await;
    wire::Finished {
        assignment_id,
        outcome: Some(outcome),
    }
}

async fn run_assignment(
    ctx: &Context,
    assignment: wire::Assignment,
    dir: &Path,
    cancel: CancellationToken,
    started: impl FnOnce(),
) -> Outcome {
    let mut metadata = ExecutedActionMetadata {
        worker: ctx.name.clone(),
        queued_timestamp: Some(timestamp(from_unix_micros(assignment.queued_at_micros))),
        worker_start_timestamp: Some(timestamp(SystemTime::now())),
        ..Default::default()
    };
    let (action, command) = match (
        Action::decode(assignment.action.as_slice()),
        Command::decode(assignment.command.as_slice()),
    ) {
        (Ok(a), Ok(c)) => (a, c),
        _ => {
            return failed(
                Code::InvalidArgument,
                "the Action or Command does not decode",
                false,
            )
        }
    };
    if let Err(e) = validate::command(&command) {
        return failed(Code::InvalidArgument, e, false);
    }
    let Ok(input_root) = Digest::from_proto(action.input_root_digest.as_ref()) else {
        return failed(
            Code::InvalidArgument,
            "Action.input_root_digest is malformed",
            false,
        );
    };
    let remote = ctx.remote.with_instance(&assignment.instance_name);
    let root = dir.join("root");
    if let Err(e) = tokio::fs::create_dir_all(dir).await {
        return failed(
            Code::Internal,
            format!("creating the action directory: {e}"),
            true,
        );
    }

    metadata.input_fetch_start_timestamp = Some(timestamp(SystemTime::now()));
    match materialize(&remote, &ctx.cache, input_root, &root).await {
        Ok(_) => {}
        Err(InputError::Missing(digests)) => {
            return Outcome::MissingInputs(wire::MissingInputs {
                digests: digests
                    .iter()
                    .map(|d| wire::Digest {
                        hash: d.hash_hex(),
                        size_bytes: d.size() as i64,
                    })
                    .collect(),
            })
        }
        Err(InputError::Invalid(e)) => return failed(Code::InvalidArgument, e, false),
        Err(InputError::Worker(e)) => return failed(Code::Internal, e, true),
    }
    metadata.input_fetch_completed_timestamp = Some(timestamp(SystemTime::now()));
    let working_dir = root.join(&command.working_directory);
    if let Err(e) = outputs::create_parents(&working_dir, &command) {
        return failed(
            Code::Internal,
            format!("creating output directories: {e}"),
            true,
        );
    }
    if cancel.is_cancelled() {
        return failed(Code::Cancelled, "cancelled", true);
    }

    if Faults::strikes(ctx.faults.fail_setup) {
        return failed(
            Code::Internal,
            "injected fault: the sandbox failed to set up",
            true,
        );
    }
    if !ctx.faults.delay.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(ctx.faults.delay) => {}
            _ = cancel.cancelled() => return failed(Code::Cancelled, "cancelled", true),
        }
    }

    started();
    metadata.execution_start_timestamp = Some(timestamp(SystemTime::now()));
    let spec = RunSpec {
        arguments: command.arguments.clone(),
        environment: command
            .environment_variables
            .iter()
            .map(|v| (v.name.clone(), v.value.clone()))
            .collect(),
        input_root: root.clone(),
        working_directory: command.working_directory.clone(),
        stdout: dir.join("stdout"),
        stderr: dir.join("stderr"),
        timeout: Duration::from_millis(assignment.timeout_ms),
        platform: paddock_reapi::platform(&action, &command),
    };
    let (stdout, stderr) = (spec.stdout.clone(), spec.stderr.clone());
    let outcome = match ctx.runner.run(spec, cancel).await {
        Ok(o) => o,
        Err(RunError::Action(e)) => return failed(Code::InvalidArgument, e, false),
        Err(RunError::Precondition(e)) => return failed(Code::FailedPrecondition, e, false),
        Err(RunError::Worker(e)) => return failed(Code::Internal, e, true),
        Err(RunError::Cancelled) => return failed(Code::Cancelled, "cancelled", true),
    };
    metadata.execution_completed_timestamp = Some(timestamp(SystemTime::now()));
    metadata.virtual_execution_duration = Some(proto_duration(outcome.duration));
    if let Some(usage) = outcome.usage {
        let usage = ResourceUsage {
            peak_memory_bytes: usage.peak_memory_bytes,
            memory_limit_bytes: usage.memory_limit_bytes,
            cpu_user_micros: usage.cpu_user_micros,
            cpu_system_micros: usage.cpu_system_micros,
            out_of_memory: usage.out_of_memory,
        };
        metadata
            .auxiliary_metadata
            .push(pack(RESOURCE_USAGE, &usage));
    }

    if Faults::strikes(ctx.faults.alter_outputs) {
        Faults::alter(&working_dir, &declared_outputs(&command));
    }
    metadata.output_upload_start_timestamp = Some(timestamp(SystemTime::now()));
    let collected = {
        let (working_dir, command) = (working_dir.clone(), command.clone());
        tokio::task::spawn_blocking(move || -> Result<_, OutputError> {
            let collected = outputs::collect(&working_dir, &command)?;
            let stdout = outputs::hash_file(&stdout)?;
            let stderr = outputs::hash_file(&stderr)?;
            Ok((collected, stdout, stderr))
        })
        .await
    };
    let (collected, stdout_digest, stderr_digest) = match collected {
        Ok(Ok(c)) => c,
        Ok(Err(OutputError::Invalid(e))) => return failed(Code::FailedPrecondition, e, false),
        Ok(Err(OutputError::Worker(e))) => return failed(Code::Internal, e, true),
        Err(e) => return failed(Code::Internal, e.to_string(), true),
    };
    let corrupt = Faults::strikes(ctx.faults.corrupt_outputs);
    let mut blobs: Vec<(Digest, Source)> = match corrupt {
        false => collected.blobs,
        true => collected
            .blobs
            .into_iter()
            .map(|(digest, source)| {
                let bytes = match source {
                    Source::Memory(bytes) => bytes.to_vec(),
                    Source::File(path) => std::fs::read(path).unwrap_or_default(),
                };
                (digest, Source::Memory(Faults::corrupt(&bytes).into()))
            })
            .collect(),
    };
    blobs.push((stdout_digest, Source::File(dir.join("stdout"))));
    blobs.push((stderr_digest, Source::File(dir.join("stderr"))));
    match remote.upload_missing(blobs).await {
        // A corrupting worker does not notice that the CAS refused its bytes.
        Err(e) if !corrupt => {
            return failed(Code::Unavailable, format!("uploading outputs: {e}"), true)
        }
        _ => {}
    }
    metadata.output_upload_completed_timestamp = Some(timestamp(SystemTime::now()));
    adopt_outputs(&ctx.cache, collected.files).await;

    metadata.worker_completed_timestamp = Some(timestamp(SystemTime::now()));
    let result = ActionResult {
        exit_code: outcome.exit_code,
        stdout_digest: Some(stdout_digest.to_proto()),
        stderr_digest: Some(stderr_digest.to_proto()),
        execution_metadata: Some(metadata),
        ..collected.result
    };
    Outcome::Completed(wire::Completed {
        action_result: result.encode_to_vec(),
        timed_out: outcome.timed_out,
        message: outcome.message,
    })
}

/// The paths the command declares as outputs, in either REAPI version's fields.
#[allow(deprecated)] // REAPI 2.0's output_files and output_directories
fn declared_outputs(command: &Command) -> Vec<String> {
    command
        .output_paths
        .iter()
        .chain(&command.output_files)
        .chain(&command.output_directories)
        .cloned()
        .collect()
}

/// Keeps freshly uploaded outputs in the local cache: the next action on this worker
/// that consumes them links them instead of downloading them.
async fn adopt_outputs(cache: &Arc<FileCache>, files: Vec<(Digest, bool, PathBuf)>) {
    let cache = cache.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for (digest, executable, path) in files {
            if let Err(e) = cache.adopt(digest, executable, &path) {
                tracing::debug!(%digest, error = %e, "could not keep an output in the cache");
            }
        }
    })
    .await;
}

/// Removes an action directory, even one whose command made parts of it read-only.
pub async fn remove_tree(dir: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || {
        if std::fs::remove_dir_all(&dir).is_ok() || !dir.exists() {
            return;
        }
        make_writable(&dir);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove an action directory");
        }
    })
    .await;
}

fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            make_writable(&entry.path());
        }
    }
}
