//! One assignment, start to finish: inputs, command, outputs, upload, result.
//!
//! Every path here is the worker's own: the action's directory is named by the
//! worker (a counter), never after anything the scheduler sent, and what lies inside
//! the input root is reached only through directory descriptors.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use paddock_client::{ClientError, Remote, Source};
use paddock_config::ActionLimits;
use paddock_fs::Dir;
use paddock_proto::execution::v1::{ResourceUsage, RESOURCE_USAGE};
use paddock_proto::worker::v1 as wire;
use paddock_reapi::proto::re::{Action, ActionResult, Command, ExecutedActionMetadata};
use paddock_reapi::status::pack;
use paddock_reapi::time::{from_unix_micros, proto_duration, timestamp};
use paddock_reapi::{validate, Digest};
use paddock_runner::{Identity, RunError, RunSpec, Runner};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::cache::FileCache;
use crate::disk::{DiskGuard, Overrun};
use crate::faults::Faults;
use crate::identities::IdentityPool;
use crate::inputs::{materialize, InputError};
use crate::locality::RecentTrees;
use crate::outputs::{self, OutputError, Staging};

/// What every assignment on this worker shares.
pub struct Context {
    pub name: String,
    pub remote: Remote,
    pub cache: Arc<FileCache>,
    pub runner: Arc<dyn Runner>,
    pub actions_dir: PathBuf,
    pub faults: Faults,
    pub limits: ActionLimits,
    /// Who actions run as, for runners that isolate them; `None` for the host runner.
    pub identities: Option<Arc<IdentityPool>>,
    /// Names the next action's directory.
    pub next_action: Arc<AtomicU64>,
    /// What running actions add to the disk.
    pub disk: Arc<DiskGuard>,
    /// The input directories laid out lately, for the scheduler's locality.
    pub recent: Arc<RecentTrees>,
}

type Outcome = wire::finished::Outcome;
use wire::Fault;

fn failed(code: Code, message: impl Into<String>, fault: Fault) -> Outcome {
    Outcome::Failed(wire::Failed {
        code: code as i32,
        message: message.into(),
        retryable: fault != Fault::Action,
        fault: fault as i32,
    })
}

/// The action's fault, final.
fn action_fault(code: Code, message: impl Into<String>) -> Outcome {
    failed(code, message, Fault::Action)
}

/// This worker's fault: another worker may do better.
fn worker_fault(message: impl Into<String>) -> Outcome {
    failed(Code::Internal, message, Fault::Worker)
}

fn cancelled() -> Outcome {
    failed(Code::Cancelled, "cancelled", Fault::Worker)
}

/// How an assignment ended whose task died (a panic in this worker's code): the
/// worker's fault, so that it runs elsewhere rather than hang.
pub fn broken(assignment_id: String) -> wire::Finished {
    wire::Finished {
        assignment_id,
        outcome: Some(worker_fault(
            "the worker's task for it failed (a bug in the worker); it will run elsewhere",
        )),
    }
}

/// Runs an assignment and says how it ended. `started` is called once the command
/// is about to run. Nothing of the action is left on disk afterwards, and its
/// identity is free again only once its files are gone.
pub async fn execute(
    ctx: &Context,
    assignment: wire::Assignment,
    cancel: CancellationToken,
    started: impl FnOnce(),
) -> wire::Finished {
    if Faults::strikes(ctx.faults.panic) {
        panic!("fault injection: the worker's task panics");
    }
    let assignment_id = assignment.assignment_id.clone();
    let dir = ctx
        .actions_dir
        .join(ctx.next_action.fetch_add(1, Ordering::Relaxed).to_string());
    let identity = match &ctx.identities {
        None => Ok(None),
        Some(pool) => pool.take().map(Some),
    };
    let outcome = match &identity {
        Ok(identity) => {
            let identity = identity.as_ref().map(|i| i.identity());
            run_assignment(ctx, assignment, &dir, identity, cancel, started).await
        }
        Err(e) => worker_fault(e.clone()),
    };
    remove_tree(dir).await;
    drop(identity);
    wire::Finished {
        assignment_id,
        outcome: Some(outcome),
    }
}

async fn run_assignment(
    ctx: &Context,
    assignment: wire::Assignment,
    dir: &Path,
    identity: Option<Identity>,
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
            return action_fault(
                Code::InvalidArgument,
                "the Action or Command does not decode",
            )
        }
    };
    if let Err(e) = validate::command(&command) {
        return action_fault(Code::InvalidArgument, e);
    }
    let Ok(input_root) = Digest::from_proto(action.input_root_digest.as_ref()) else {
        return action_fault(
            Code::InvalidArgument,
            "Action.input_root_digest is malformed",
        );
    };
    let remote = ctx.remote.with_instance(&assignment.instance_name);
    let root = dir.join("root");
    let staging_path = dir.join("outputs");
    for made in [dir, &staging_path] {
        if let Err(e) = tokio::fs::create_dir_all(made).await {
            return worker_fault(format!("creating the action directory: {e}"));
        }
    }
    let timeout = Duration::from_millis(assignment.timeout_ms);

    // Laying out the inputs stops at the action's timeout, or when it is cancelled.
    metadata.input_fetch_start_timestamp = Some(timestamp(SystemTime::now()));
    let stop = cancel.child_token();
    let deadline = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            stop.cancel();
        })
    };
    let laid_out = materialize(
        &remote,
        &ctx.cache,
        input_root,
        &root,
        identity,
        &ctx.limits,
        &stop,
    )
    .await;
    deadline.abort();
    match laid_out {
        Ok(directories) => ctx.recent.note(directories),
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
        Err(InputError::Invalid(e)) => return action_fault(Code::InvalidArgument, e),
        Err(InputError::Limit(e)) => return action_fault(Code::ResourceExhausted, e),
        Err(InputError::Worker(e)) => return worker_fault(e),
        Err(InputError::Infrastructure(e)) => {
            return failed(Code::Unavailable, e, Fault::Infrastructure)
        }
        Err(InputError::Stopped) if cancel.is_cancelled() => return cancelled(),
        Err(InputError::Stopped) => {
            return action_fault(
                Code::DeadlineExceeded,
                format!(
                    "the input root could not be laid out within the action's timeout of {}s",
                    timeout.as_secs_f64()
                ),
            )
        }
    }
    metadata.input_fetch_completed_timestamp = Some(timestamp(SystemTime::now()));
    let prepared = {
        let (root, command) = (root.clone(), command.clone());
        let owner = identity.map(|i| (i.uid, i.gid));
        tokio::task::spawn_blocking(move || prepare_outputs(&root, &command, owner)).await
    };
    match prepared {
        Ok(Ok(())) => {}
        Ok(Err(OutputError::Invalid(e))) => return action_fault(Code::InvalidArgument, e),
        Ok(Err(OutputError::Limit(e))) => return action_fault(Code::ResourceExhausted, e),
        Ok(Err(OutputError::Worker(e))) => return worker_fault(e),
        Err(e) => return worker_fault(e.to_string()),
    }
    if cancel.is_cancelled() {
        return cancelled();
    }

    if Faults::strikes(ctx.faults.fail_setup) {
        return worker_fault("injected fault: the sandbox failed to set up");
    }
    if !ctx.faults.delay.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(ctx.faults.delay) => {}
            _ = cancel.cancelled() => return cancelled(),
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
        timeout,
        platform: paddock_reapi::platform(&action, &command),
        identity,
        max_file_size: Some(ctx.limits.max_file_size.bytes()),
    };
    let (stdout, stderr) = (spec.stdout.clone(), spec.stderr.clone());
    // The action runs while the disk guard watches what it writes (when it has an
    // identity of its own to tell its files by).
    let halt = cancel.child_token();
    let run = ctx.runner.run(spec, halt.clone());
    let watch = async {
        match identity {
            Some(identity) => {
                ctx.disk
                    .watch(
                        root.clone(),
                        ctx.actions_dir.clone(),
                        identity.uid,
                        ctx.limits.clone(),
                    )
                    .await
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(run);
    let (ran, overrun) = tokio::select! {
        ran = &mut run => (ran, None),
        overrun = watch => {
            halt.cancel();
            (run.await, Some(overrun))
        }
    };
    let overrun = match (overrun, identity) {
        (Some(overrun), _) => Some(overrun),
        // A last look, for an action that wrote and ended between two measurements.
        (None, Some(identity)) if ran.is_ok() => {
            let (root, limits) = (root.clone(), ctx.limits.clone());
            tokio::task::spawn_blocking(move || {
                let root = Dir::open(&root).ok()?;
                crate::disk::over_limit(&root, identity.uid, &limits).err()
            })
            .await
            .ok()
            .flatten()
        }
        (None, _) => None,
    };
    match overrun {
        Some(Overrun::Limit(e)) => return action_fault(Code::ResourceExhausted, e),
        Some(Overrun::LowDisk(e)) => return worker_fault(e),
        None => {}
    }
    let outcome = match ran {
        Ok(o) => o,
        Err(RunError::Action(e)) => return action_fault(Code::InvalidArgument, e),
        Err(RunError::Precondition(e)) => return action_fault(Code::FailedPrecondition, e),
        Err(RunError::Limit(e)) => return action_fault(Code::ResourceExhausted, e),
        Err(RunError::Worker(e)) => return worker_fault(e),
        Err(RunError::Infrastructure(e)) => {
            return failed(Code::Unavailable, e, Fault::Infrastructure)
        }
        Err(RunError::Mismatch(e)) => return failed(Code::FailedPrecondition, e, Fault::Mismatch),
        Err(RunError::Cancelled) => return cancelled(),
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

    metadata.output_upload_start_timestamp = Some(timestamp(SystemTime::now()));
    let collected = {
        let (root, command, limits) = (root.clone(), command.clone(), ctx.limits.clone());
        let (staging_path, alter) = (
            staging_path.clone(),
            Faults::strikes(ctx.faults.alter_outputs),
        );
        tokio::task::spawn_blocking(move || {
            collect(
                &root,
                &command,
                &staging_path,
                &limits,
                alter,
                &stdout,
                &stderr,
            )
        })
        .await
    };
    let (collected, stdout_digest, stderr_digest) = match collected {
        Ok(Ok(c)) => c,
        Ok(Err(OutputError::Invalid(e))) => return action_fault(Code::FailedPrecondition, e),
        Ok(Err(OutputError::Limit(e))) => return action_fault(Code::ResourceExhausted, e),
        Ok(Err(OutputError::Worker(e))) => return worker_fault(e),
        Err(e) => return worker_fault(e.to_string()),
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
        Err(_) if corrupt => {}
        Err(ClientError::Io(e)) => return worker_fault(format!("uploading outputs: {e}")),
        Err(e) => {
            return failed(
                Code::Unavailable,
                format!("uploading outputs: {e}"),
                Fault::Infrastructure,
            )
        }
        Ok(_) => {}
    }
    metadata.output_upload_completed_timestamp = Some(timestamp(SystemTime::now()));
    adopt_outputs(&ctx.cache, staging_path, collected.files).await;

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

/// Checks the working directory and creates the declared outputs' parents beneath
/// it, as the action's identity.
fn prepare_outputs(
    root: &Path,
    command: &Command,
    owner: Option<(u32, u32)>,
) -> Result<(), OutputError> {
    let root =
        Dir::open(root).map_err(|e| OutputError::Worker(format!("opening the input root: {e}")))?;
    let working_dir = root
        .open_dir(Path::new(&command.working_directory))
        .map_err(|_| {
            OutputError::Invalid(format!(
                "the working directory {:?} is not a directory in the input root",
                command.working_directory
            ))
        })?;
    outputs::create_parents(&working_dir, command, owner)
}

type Gathered = (outputs::Collected, Digest, Digest);

/// Collects the outputs from the action's root and hashes its standard streams,
/// each of which must be within the limit.
fn collect(
    root: &Path,
    command: &Command,
    staging_path: &Path,
    limits: &ActionLimits,
    alter: bool,
    stdout: &Path,
    stderr: &Path,
) -> Result<Gathered, OutputError> {
    let io = |what: &str, e: std::io::Error| OutputError::Worker(format!("{what}: {e}"));
    let root = Dir::open(root).map_err(|e| io("opening the input root", e))?;
    if alter {
        Faults::alter(
            &root,
            &command.working_directory,
            &outputs::declared(command),
        );
    }
    for (name, path) in [("standard output", stdout), ("standard error", stderr)] {
        let size = std::fs::metadata(path).map_or(0, |m| m.len());
        if size > limits.max_stdout.bytes() {
            return Err(OutputError::Limit(format!(
                "the action wrote {size} bytes to its {name}, more than this worker's limit of {} (worker.limits.max_stdout)",
                limits.max_stdout
            )));
        }
    }
    let staging = Staging {
        dir: Dir::open(staging_path).map_err(|e| io("opening the staging directory", e))?,
        path: staging_path.to_owned(),
        // SAFETY: geteuid and getegid have no preconditions and cannot fail.
        owner: unsafe { (libc::geteuid(), libc::getegid()) },
    };
    let collected = outputs::collect(&root, command, &staging, limits)?;
    Ok((
        collected,
        outputs::hash_file(stdout)?,
        outputs::hash_file(stderr)?,
    ))
}

/// Keeps freshly uploaded outputs in the local cache: the next action on this worker
/// that consumes them links them instead of downloading them.
async fn adopt_outputs(
    cache: &Arc<FileCache>,
    staging: PathBuf,
    files: Vec<(Digest, bool, OsString)>,
) {
    let cache = cache.clone();
    let _ = tokio::task::spawn_blocking(move || {
        let Ok(staging) = Dir::open(&staging) else {
            return;
        };
        for (digest, executable, name) in files {
            if let Err(e) = cache.adopt(digest, executable, &staging, &name) {
                tracing::debug!(%digest, error = %e, "could not keep an output in the cache");
            }
        }
    })
    .await;
}

/// Removes an action directory, even one whose command made parts of it read-only.
pub async fn remove_tree(dir: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = paddock_fs::remove_tree(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove an action directory");
        }
    })
    .await;
}
