//! Running one command on a REAPI server, as `paddock exec` and the tests do.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use paddock_reapi::proto::longrunning::operation;
use paddock_reapi::proto::re::{
    command::EnvironmentVariable, platform::Property, Action, Command, ExecuteRequest,
    ExecuteResponse, ExecutionPolicy, Platform, RequestMetadata,
};
use paddock_reapi::status::{missing_blobs_of, unpack};
use paddock_reapi::{time::proto_duration, Digest};
use prost::Message;

use crate::tree::merkle_tree;
use crate::{ClientError, Remote, Source};

/// A command to run remotely.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    pub arguments: Vec<String>,
    pub environment: Vec<(String, String)>,
    pub platform: Vec<(String, String)>,
    /// Uploaded as the input root; an empty root if none.
    pub input: Option<PathBuf>,
    pub working_directory: String,
    pub output_paths: Vec<String>,
    pub timeout: Option<Duration>,
    pub skip_cache_lookup: bool,
    pub do_not_cache: bool,
    pub priority: i32,
    /// Sent as RequestMetadata.tool_invocation_id.
    pub invocation: String,
}

/// The Action and Command for a spec, with every blob they need.
pub struct PreparedAction {
    pub digest: Digest,
    pub blobs: Vec<(Digest, Source)>,
}

/// Builds (but does not upload) the Action for `spec`.
pub async fn prepare(spec: &ExecSpec) -> Result<PreparedAction, ClientError> {
    let mut blobs = Vec::new();
    let input_root = match &spec.input {
        Some(dir) => {
            let tree = merkle_tree(dir).await?;
            blobs.extend(tree.blobs);
            tree.root
        }
        None => {
            let (digest, bytes) =
                Digest::of_message(&paddock_reapi::proto::re::Directory::default());
            blobs.push((digest, Source::Memory(Bytes::from(bytes))));
            digest
        }
    };
    let mut environment = spec.environment.clone();
    environment.sort();
    let mut outputs = spec.output_paths.clone();
    outputs.sort();
    outputs.dedup();
    let mut properties = spec.platform.clone();
    properties.sort();
    let platform = (!properties.is_empty()).then(|| Platform {
        properties: properties
            .into_iter()
            .map(|(name, value)| Property { name, value })
            .collect(),
    });
    #[allow(deprecated)] // Command.platform, for REAPI 2.0 servers.
    let command = Command {
        arguments: spec.arguments.clone(),
        environment_variables: environment
            .into_iter()
            .map(|(name, value)| EnvironmentVariable { name, value })
            .collect(),
        output_paths: outputs,
        working_directory: spec.working_directory.clone(),
        platform: platform.clone(),
        ..Default::default()
    };
    let (command_digest, command_bytes) = Digest::of_message(&command);
    blobs.push((command_digest, Source::Memory(Bytes::from(command_bytes))));
    let action = Action {
        command_digest: Some(command_digest.to_proto()),
        input_root_digest: Some(input_root.to_proto()),
        timeout: spec.timeout.map(proto_duration),
        do_not_cache: spec.do_not_cache,
        platform,
        ..Default::default()
    };
    let (digest, action_bytes) = Digest::of_message(&action);
    blobs.push((digest, Source::Memory(Bytes::from(action_bytes))));
    Ok(PreparedAction { digest, blobs })
}

/// Uploads what is missing and runs the action, once more if the server reports
/// missing blobs (they may have been evicted in between). Returns the final response.
pub async fn execute(remote: &Remote, spec: &ExecSpec) -> Result<ExecuteResponse, ClientError> {
    let prepared = prepare(spec).await?;
    let mut attempts = 0;
    loop {
        attempts += 1;
        remote.upload_missing(prepared.blobs.clone()).await?;
        let response = execute_digest(remote, &prepared.digest, spec).await?;
        let status = response.status.clone().unwrap_or_default();
        let missing = missing_blobs_of(&status);
        if attempts < 2
            && status.code == tonic::Code::FailedPrecondition as i32
            && !missing.is_empty()
        {
            continue;
        }
        return Ok(response);
    }
}

/// Calls Execute for an action already in the CAS and follows it to the end.
pub async fn execute_digest(
    remote: &Remote,
    action: &Digest,
    spec: &ExecSpec,
) -> Result<ExecuteResponse, ClientError> {
    let mut request = tonic::Request::new(ExecuteRequest {
        instance_name: remote.instance().to_owned(),
        skip_cache_lookup: spec.skip_cache_lookup,
        action_digest: Some(action.to_proto()),
        execution_policy: Some(ExecutionPolicy {
            priority: spec.priority,
        }),
        ..Default::default()
    });
    if !spec.invocation.is_empty() {
        let metadata = RequestMetadata {
            tool_invocation_id: spec.invocation.clone(),
            ..Default::default()
        };
        request.metadata_mut().insert_bin(
            "build.bazel.remote.execution.v2.requestmetadata-bin",
            tonic::metadata::MetadataValue::from_bytes(&metadata.encode_to_vec()),
        );
    }
    let mut stream = remote.execution().execute(request).await?.into_inner();
    while let Some(op) = stream.next().await {
        let op = op?;
        if !op.done {
            continue;
        }
        return match op.result {
            Some(operation::Result::Response(any)) => {
                unpack("build.bazel.remote.execution.v2.ExecuteResponse", &any).ok_or_else(|| {
                    ClientError::Protocol(
                        "the operation's response is not an ExecuteResponse".into(),
                    )
                })
            }
            Some(operation::Result::Error(status)) => {
                Err(tonic::Status::new(tonic::Code::from_i32(status.code), status.message).into())
            }
            None => Err(ClientError::Protocol(
                "a done operation without a result".into(),
            )),
        };
    }
    Err(ClientError::Protocol(
        "the Execute stream ended before the operation was done".into(),
    ))
}
