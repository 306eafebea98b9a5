//! Talking to the farm for one compile: remote execution (the farm answers from its
//! cache when it can) or cache-only (look up; on a miss compile here and upload).

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use bytes::Bytes;
use paddock_client::{exec, ClientError, Credentials, Remote, Source};
use paddock_reapi::proto::re::{
    ActionResult, ExecuteResponse, GetActionResultRequest, OutputFile, UpdateActionResultRequest,
};
use paddock_reapi::Digest;
use tonic::Code;

use crate::action::Prepared;
use crate::config::{Config, Mode};
use crate::stats::Stats;

/// The fallback kind for a farm that cannot be reached.
pub const UNREACHABLE: &str = "the farm is unreachable";

/// Why the farm did not serve a compile.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("the farm at {0} is unreachable ({1})")]
    Unreachable(String, String),
    #[error("the farm refused the compile: {0}")]
    Refused(String),
    #[error("the farm's result is unusable: {0}")]
    Result(String),
}

impl Failure {
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Unreachable(..) => UNREACHABLE,
            Failure::Refused(_) => "the farm refused",
            Failure::Result(_) => "an unusable result",
        }
    }
}

fn failure(url: &str, e: ClientError) -> Failure {
    match &e {
        ClientError::Transport(_) => Failure::Unreachable(url.to_owned(), e.to_string()),
        ClientError::Rpc(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => {
            Failure::Unreachable(url.to_owned(), e.to_string())
        }
        _ => Failure::Refused(e.to_string()),
    }
}

/// What happened to the last compile, for `--verbose`.
pub fn describe(delta: &Stats) -> &'static str {
    if delta.hits > 0 {
        "served from the farm's cache"
    } else if delta.remote > 0 {
        "compiled on the farm"
    } else if delta.uploads > 0 {
        "compiled locally and uploaded"
    } else {
        "compiled locally"
    }
}

async fn connect(config: &Config) -> Result<Remote, Failure> {
    let url = config.remote.clone().unwrap_or_default();
    let credentials = Credentials::from_files(
        config.tls_ca.clone(),
        config.tls_cert.clone(),
        config.tls_key.clone(),
        config.token_file.as_deref(),
        config.token.clone(),
    )
    .map_err(|e| Failure::Refused(e.to_string()))?;
    match tokio::time::timeout(
        config.connect_timeout,
        Remote::connect_with(&url, &config.instance, &credentials),
    )
    .await
    {
        Ok(Ok(remote)) => Ok(remote),
        Ok(Err(e)) => Err(failure(&url, e)),
        Err(_) => Err(Failure::Unreachable(url, "timed out".into())),
    }
}

/// Serves one compile through the farm; returns the compile's exit code.
pub async fn serve(
    config: &Config,
    prepared: &Prepared,
    cwd: &Path,
    compiler: &Path,
    args: &[OsString],
    delta: &mut Stats,
) -> Result<i32, Failure> {
    let url = config.remote.clone().unwrap_or_default();
    let remote = connect(config).await?;
    // Either mode starts by asking the cache: a hit needs neither uploads, an
    // operation nor a compile.
    if let Some(result) = look_up(&remote, &url, prepared).await? {
        delta.hits += 1;
        return deliver(&remote, &url, &result, prepared, cwd, delta).await;
    }
    match config.mode {
        Mode::CacheOnly => cache_only(config, &remote, prepared, cwd, compiler, args, delta).await,
        _ => execute(&remote, &url, prepared, cwd, delta).await,
    }
}

async fn upload(
    remote: &Remote,
    url: &str,
    blobs: &[(Digest, Source)],
    delta: &mut Stats,
) -> Result<(), Failure> {
    let sent = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        remote.upload_missing(blobs.to_vec()),
    )
    .await
    .map_err(|_| Failure::Unreachable(url.to_owned(), "uploading the inputs timed out".into()))?
    .map_err(|e| failure(url, e))?;
    delta.bytes_uploaded += sent;
    Ok(())
}

/// The ActionCache's result for the compile, with its outputs and streams inline
/// (objects are small: one round trip serves a hit), if it has one.
async fn look_up(
    remote: &Remote,
    url: &str,
    prepared: &Prepared,
) -> Result<Option<ActionResult>, Failure> {
    let looked_up = remote
        .action_cache()
        .get_action_result(GetActionResultRequest {
            instance_name: remote.instance().to_owned(),
            action_digest: Some(prepared.action.to_proto()),
            inline_stdout: true,
            inline_stderr: true,
            inline_output_files: prepared.outputs.clone(),
            ..Default::default()
        })
        .await;
    match looked_up {
        Ok(result) => Ok(Some(result.into_inner())),
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(failure(url, s.into())),
    }
}

async fn execute(
    remote: &Remote,
    url: &str,
    prepared: &Prepared,
    cwd: &Path,
    delta: &mut Stats,
) -> Result<i32, Failure> {
    let spec = exec::ExecSpec {
        invocation: invocation_id(),
        ..Default::default()
    };
    let mut response = ExecuteResponse::default();
    for attempt in 0..2 {
        upload(remote, url, &prepared.blobs, delta).await?;
        response = exec::execute_digest(remote, &prepared.action, &spec)
            .await
            .map_err(|e| failure(url, e))?;
        let status = response.status.clone().unwrap_or_default();
        let missing = paddock_reapi::status::missing_blobs_of(&status);
        if attempt == 0 && status.code == Code::FailedPrecondition as i32 && !missing.is_empty() {
            continue; // evicted between the upload and the run: once more
        }
        break;
    }
    let status = response.status.clone().unwrap_or_default();
    if status.code != 0 {
        return Err(Failure::Refused(status.message));
    }
    let result = response
        .result
        .ok_or_else(|| Failure::Result("no ActionResult".into()))?;
    if response.cached_result {
        delta.hits += 1;
    } else {
        delta.misses += 1;
        delta.remote += 1;
    }
    deliver(remote, url, &result, prepared, cwd, delta).await
}

/// Writes a result's outputs, prints its output and error, and returns its exit code.
async fn deliver(
    remote: &Remote,
    url: &str,
    result: &ActionResult,
    prepared: &Prepared,
    cwd: &Path,
    delta: &mut Stats,
) -> Result<i32, Failure> {
    let stdout = stream(
        remote,
        url,
        &result.stdout_raw,
        result.stdout_digest.as_ref(),
    )
    .await?;
    let stderr = stream(
        remote,
        url,
        &result.stderr_raw,
        result.stderr_digest.as_ref(),
    )
    .await?;
    if result.exit_code == 0 {
        for output in &result.output_files {
            if !prepared.outputs.contains(&output.path) {
                return Err(Failure::Result(format!(
                    "an output not asked for: {:?}",
                    output.path
                )));
            }
        }
        for wanted in &prepared.outputs {
            // A dependency file is written only when the compile asks for it; every
            // output this compile names must come back.
            let Some(file) = result.output_files.iter().find(|f| &f.path == wanted) else {
                return Err(Failure::Result(format!("{wanted} did not come back")));
            };
            let digest = Digest::from_proto(file.digest.as_ref())
                .map_err(|e| Failure::Result(format!("{wanted}: {e}")))?;
            let path = cwd.join(wanted);
            if let Some(parent) = path.parent() {
                let _ = tokio::fs::create_dir_all(parent).await;
            }
            if !file.contents.is_empty() || digest.size() == 0 {
                write_inline(&path, &digest, &file.contents)
                    .map_err(|e| Failure::Result(format!("{wanted}: {e}")))?;
            } else {
                remote
                    .read_to_file(&digest, &path)
                    .await
                    .map_err(|e| failure(url, e))?;
            }
            set_mode(&path);
            delta.bytes_downloaded += digest.size();
        }
    } else {
        // As the compiler does when it fails: no object is left behind.
        for wanted in &prepared.outputs {
            let _ = std::fs::remove_file(cwd.join(wanted));
        }
    }
    let _ = std::io::stdout().write_all(&stdout);
    let _ = std::io::stderr().write_all(&stderr);
    Ok(result.exit_code)
}

/// Writes an output the server sent inline, once it is checked against its digest,
/// through a temporary file renamed into place.
fn write_inline(path: &Path, digest: &Digest, contents: &[u8]) -> std::io::Result<()> {
    if Digest::of(contents) != *digest {
        return Err(std::io::Error::other(
            "the inline contents do not match the digest",
        ));
    }
    let mut partial = path.as_os_str().to_owned();
    partial.push(format!(".paddock-partial-{}", std::process::id()));
    let written = std::fs::write(&partial, contents).and_then(|()| std::fs::rename(&partial, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// An output's permissions as the compiler would create it: 0666 less the umask.
fn set_mode(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: umask only swaps the process's mask; it is put back at once.
    let mask = unsafe {
        let mask = libc::umask(0o022);
        libc::umask(mask);
        mask
    };
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !mask));
}

async fn stream(
    remote: &Remote,
    url: &str,
    raw: &[u8],
    digest: Option<&paddock_reapi::proto::re::Digest>,
) -> Result<Bytes, Failure> {
    if !raw.is_empty() {
        return Ok(Bytes::copy_from_slice(raw));
    }
    match digest {
        Some(d) => {
            let digest = Digest::from_proto(Some(d)).map_err(|e| Failure::Result(e.to_string()))?;
            if digest.size() == 0 {
                return Ok(Bytes::new());
            }
            remote.read_blob(&digest).await.map_err(|e| failure(url, e))
        }
        None => Ok(Bytes::new()),
    }
}

async fn cache_only(
    config: &Config,
    remote: &Remote,
    prepared: &Prepared,
    cwd: &Path,
    compiler: &Path,
    args: &[OsString],
    delta: &mut Stats,
) -> Result<i32, Failure> {
    let url = config.remote.as_deref().unwrap_or_default();
    delta.misses += 1;
    // A miss: compile here, show what the compiler said, and share the result.
    let output = std::process::Command::new(compiler)
        .args(args)
        .stdin(Stdio::inherit())
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            eprintln!("paddock cc: running {}: {e}", compiler.display());
            return Ok(127);
        }
    };
    let _ = std::io::stdout().write_all(&output.stdout);
    let _ = std::io::stderr().write_all(&output.stderr);
    let code = crate::exit_code(output.status);
    delta.local += 1;
    *delta
        .local_reasons
        .entry("cache-only miss".into())
        .or_default() += 1;
    if code != 0 {
        return Ok(code);
    }
    let mut blobs = prepared.blobs.clone();
    let mut result = ActionResult {
        exit_code: 0,
        ..Default::default()
    };
    for (bytes, slot) in [
        (output.stdout, &mut result.stdout_digest),
        (output.stderr, &mut result.stderr_digest),
    ] {
        let digest = Digest::of(&bytes);
        blobs.push((digest, Source::Memory(Bytes::from(bytes))));
        *slot = Some(digest.to_proto());
    }
    for path in &prepared.outputs {
        let file = cwd.join(path);
        let Ok(digest) = paddock_client::hash_file(&file).await else {
            return Ok(code); // not every output appeared: nothing to share
        };
        blobs.push((digest, Source::File(file)));
        result.output_files.push(OutputFile {
            path: path.clone(),
            digest: Some(digest.to_proto()),
            ..Default::default()
        });
    }
    let shared = async {
        upload(remote, url, &blobs, delta).await?;
        remote
            .action_cache()
            .update_action_result(UpdateActionResultRequest {
                instance_name: remote.instance().to_owned(),
                action_digest: Some(prepared.action.to_proto()),
                action_result: Some(result),
                ..Default::default()
            })
            .await
            .map_err(|s| failure(url, s.into()))
    }
    .await;
    match shared {
        Ok(_) => delta.uploads += 1,
        Err(e) => {
            if crate::stats::notice_due(&config.cache_dir, "upload-failed", config.retry_after) {
                eprintln!("paddock cc: sharing a result failed: {e} (said once per build)");
            }
        }
    }
    Ok(code)
}

/// One id per build for the farm's records: the make or ninja process's session.
fn invocation_id() -> String {
    // SAFETY: getsid(0) only reads this process's session id.
    let session = unsafe { libc::getsid(0) };
    format!("paddock-cc-{session}")
}
