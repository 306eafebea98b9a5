//! Execution (Execute, WaitExecution) and google.longrunning.Operations: the
//! scheduler's operations rendered as `Operation` messages.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use paddock_reapi::proto::longrunning::{
    operation, operations_server::Operations, CancelOperationRequest, DeleteOperationRequest,
    GetOperationRequest, ListOperationsRequest, ListOperationsResponse, Operation,
    WaitOperationRequest,
};
use paddock_reapi::proto::protobuf::Empty;
use paddock_reapi::proto::re::{
    execution_server::Execution, execution_stage, ExecuteOperationMetadata, ExecuteRequest,
    ExecuteResponse, ExecutedActionMetadata, RequestMetadata, WaitExecutionRequest,
};
use paddock_reapi::status::pack;
use paddock_scheduler::{OperationWatch, Requester, Scheduler, Snapshot, Stage};

use paddock_config::Permission;

use crate::action_cache::inline_outputs;
use crate::auth::{authorize, method, principal, require};
use crate::history::{asker, request_metadata};
use crate::Storage;
use paddock_history::{Asker, History, Outcome};
use tonic::{Request, Response, Status};

pub struct ExecutionService {
    scheduler: Scheduler,
    storage: Storage,
}

impl ExecutionService {
    pub fn new(scheduler: Scheduler, storage: Storage) -> Self {
        ExecutionService { scheduler, storage }
    }
}

/// What an Execute call asked to have inlined in its final response.
#[derive(Clone, Default)]
struct Inline {
    stdout: bool,
    stderr: bool,
    files: Vec<String>,
}

/// Renders a snapshot as a `google.longrunning.Operation`.
pub fn operation(snapshot: &Snapshot) -> Operation {
    let stage = match snapshot.stage {
        Stage::Queued => execution_stage::Value::Queued,
        Stage::Executing => execution_stage::Value::Executing,
        Stage::Completed => execution_stage::Value::Completed,
    };
    let metadata = ExecuteOperationMetadata {
        stage: stage as i32,
        action_digest: Some(snapshot.action_digest.to_proto()),
        partial_execution_metadata: snapshot.worker.as_ref().map(|w| ExecutedActionMetadata {
            worker: w.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    Operation {
        name: snapshot.name.clone(),
        metadata: Some(pack(
            "build.bazel.remote.execution.v2.ExecuteOperationMetadata",
            &metadata,
        )),
        done: snapshot.stage == Stage::Completed,
        result: snapshot.response.as_ref().map(|response| {
            operation::Result::Response(pack(
                "build.bazel.remote.execution.v2.ExecuteResponse",
                response.as_ref(),
            ))
        }),
    }
}

type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// Where an Execute call's outcome is noted once it completes.
struct Noted {
    history: Arc<History>,
    asker: Asker,
}

impl Noted {
    fn completed(&self, snapshot: &Snapshot) {
        let Some(response) = &snapshot.response else {
            return;
        };
        let status = response.status.clone().unwrap_or_default();
        let outcome = if status.code != 0 {
            Outcome::Failed {
                code: tonic::Code::from_i32(status.code).description().to_owned(),
                message: status.message,
            }
        } else if response.cached_result {
            Outcome::Cached
        } else {
            Outcome::Executed {
                exit_code: response.result.as_ref().map_or(0, |r| r.exit_code),
            }
        };
        let result = response.result.clone().map(Arc::new);
        self.history
            .action(&self.asker, snapshot.action_digest, outcome, result);
    }
}

/// Streams an operation: where it stands now, then every change, ending with the
/// completed operation. The watch (and so the client's claim on the execution) lives
/// as long as the stream. If the server shuts down first, the stream ends with
/// UNAVAILABLE, which tells clients to retry.
fn operation_stream(
    watch: OperationWatch,
    storage: Storage,
    inline: Inline,
    noted: Option<Noted>,
) -> OperationStream {
    let noted = noted.map(Arc::new);
    let stream = futures::stream::unfold(Some((watch, true)), move |state| {
        let (storage, inline, noted) = (storage.clone(), inline.clone(), noted.clone());
        async move {
            let (mut watch, first) = state?;
            if *watch.closing.borrow() {
                return Some((
                    Err(Status::unavailable("the server is shutting down")),
                    None,
                ));
            }
            if !first {
                let changed = tokio::select! {
                    changed = watch.updates.changed() => changed,
                    _ = watch.closing.changed() => {
                        return Some((Err(Status::unavailable("the server is shutting down")), None));
                    }
                };
                if changed.is_err() {
                    // The operation was dropped (expired): say so rather than end silently.
                    let status = Status::not_found("the operation no longer exists");
                    return Some((Err(status), None));
                }
            }
            let mut snapshot = watch.updates.borrow_and_update().clone();
            let done = snapshot.stage == Stage::Completed;
            if let Some(noted) = noted.as_ref().filter(|_| done) {
                noted.completed(&snapshot);
            }
            let inlining = inline.stdout || inline.stderr || !inline.files.is_empty();
            if let Some(shared) = snapshot.response.as_mut().filter(|_| inlining) {
                // This caller's own copy: what it asked to have inlined is its alone.
                let mut response = ExecuteResponse::clone(shared);
                if let Some(result) = response.result.as_mut() {
                    inline_outputs(
                        &storage,
                        result,
                        inline.stdout,
                        inline.stderr,
                        &inline.files,
                    )
                    .await;
                }
                *shared = Arc::new(response);
            }
            let next = (!done).then_some((watch, false));
            Some((Ok(operation(&snapshot)), next))
        }
    });
    Box::pin(stream)
}

/// Who is asking: `identity`, and from the client's RequestMetadata its tool
/// invocation (for fair queueing) and the action's mnemonic (for spotting
/// stragglers); empty when unsent.
fn requester(identity: &str, sent: &RequestMetadata) -> Requester {
    Requester {
        identity: identity.to_owned(),
        invocation: sent.tool_invocation_id.clone(),
        mnemonic: sent.action_mnemonic.clone(),
    }
}

/// Checks that the caller of `request` may follow, cancel or delete the operation
/// `name`: it needs
/// `execute` on the operation's instance, and to be the identity that started it
/// (or an admin of that instance). Anything else is NOT_FOUND for an operation
/// that is not its own, so names are not probed; PERMISSION_DENIED for a caller
/// without `execute` at all.
async fn check_operation<T>(
    scheduler: &Scheduler,
    request: &Request<T>,
    name: &str,
) -> Result<(), Status> {
    let caller = principal(request)?;
    let method = method(request);
    let not_found = || Status::not_found(format!("no operation named {name:?}"));
    let Some(owner) = scheduler.owner(name).await else {
        if !caller.may_somewhere(Permission::Execute) {
            require(&caller, method, Permission::Execute, "")?;
        }
        return Err(not_found());
    };
    require(&caller, method, Permission::Execute, &owner.instance)?;
    if owner.identity != caller.name() && !caller.may(Permission::Admin, &owner.instance) {
        return Err(not_found());
    }
    Ok(())
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let caller = authorize(
            &request,
            Permission::Execute,
            &request.get_ref().instance_name,
        )?;
        let sent = request_metadata(request.metadata()).unwrap_or_default();
        let requester = requester(caller.name(), &sent);
        let mut request = request.into_inner();
        let noted = Noted {
            history: self.storage.history.clone(),
            asker: asker(caller.name(), &request.instance_name, sent),
        };
        // A cached result is the ActionCache's to give: without `ac.read` the action
        // runs (and its result is still cached for those who may read it).
        if !caller.may(Permission::AcRead, &request.instance_name) {
            request.skip_cache_lookup = true;
        }
        let inline = Inline {
            stdout: request.inline_stdout,
            stderr: request.inline_stderr,
            files: request.inline_output_files.clone(),
        };
        let watch = self.scheduler.execute(request, requester).await?;
        Ok(Response::new(operation_stream(
            watch,
            self.storage.clone(),
            inline,
            Some(noted),
        )))
    }

    type WaitExecutionStream = OperationStream;

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<Self::WaitExecutionStream>, Status> {
        check_operation(&self.scheduler, &request, &request.get_ref().name).await?;
        let name = request.into_inner().name;
        let watch = self.scheduler.watch(&name).await.ok_or_else(|| {
            Status::not_found(format!("no operation named {name:?}; call Execute again"))
        })?;
        Ok(Response::new(operation_stream(
            watch,
            self.storage.clone(),
            Inline::default(),
            None,
        )))
    }
}

pub struct OperationsService {
    scheduler: Scheduler,
}

impl OperationsService {
    pub fn new(scheduler: Scheduler) -> Self {
        OperationsService { scheduler }
    }

    async fn snapshot(&self, name: &str) -> Result<Snapshot, Status> {
        self.scheduler
            .get(name)
            .await
            .ok_or_else(|| Status::not_found(format!("no operation named {name:?}")))
    }
}

/// The longest a WaitOperation call waits.
const MAX_WAIT: Duration = Duration::from_secs(60);

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        _request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        Err(Status::unimplemented("operations are looked up by name"))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        check_operation(&self.scheduler, &request, &request.get_ref().name).await?;
        let snapshot = self.snapshot(&request.into_inner().name).await?;
        Ok(Response::new(operation(&snapshot)))
    }

    async fn delete_operation(
        &self,
        request: Request<DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        check_operation(&self.scheduler, &request, &request.get_ref().name).await?;
        let name = request.into_inner().name;
        if !self.scheduler.delete(&name).await? {
            return Err(Status::not_found(format!("no operation named {name:?}")));
        }
        Ok(Response::new(Empty {}))
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        check_operation(&self.scheduler, &request, &request.get_ref().name).await?;
        let name = request.into_inner().name;
        if !self.scheduler.cancel(&name).await? {
            return Err(Status::not_found(format!("no operation named {name:?}")));
        }
        Ok(Response::new(Empty {}))
    }

    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        check_operation(&self.scheduler, &request, &request.get_ref().name).await?;
        let request = request.into_inner();
        let timeout = request
            .timeout
            .as_ref()
            .and_then(paddock_reapi::time::duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(MAX_WAIT)
            .min(MAX_WAIT);
        let mut watch =
            self.scheduler.watch(&request.name).await.ok_or_else(|| {
                Status::not_found(format!("no operation named {:?}", request.name))
            })?;
        let done = async {
            loop {
                if watch.updates.borrow_and_update().stage == Stage::Completed {
                    return;
                }
                if watch.updates.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, done).await;
        let snapshot = self.snapshot(&request.name).await?;
        Ok(Response::new(operation(&snapshot)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::REQUEST_METADATA;
    use prost::Message;

    #[test]
    fn reads_the_requester_from_request_metadata() {
        let mut map = tonic::metadata::MetadataMap::new();
        let metadata = RequestMetadata {
            tool_invocation_id: "inv-1".into(),
            action_mnemonic: "CppCompile".into(),
            ..Default::default()
        };
        map.insert_bin(
            REQUEST_METADATA,
            tonic::metadata::MetadataValue::from_bytes(&metadata.encode_to_vec()),
        );
        let found = requester("someone", &request_metadata(&map).unwrap_or_default());
        assert_eq!(
            (found.invocation.as_str(), found.mnemonic.as_str()),
            ("inv-1", "CppCompile")
        );
        let empty = tonic::metadata::MetadataMap::new();
        let none = requester("someone", &request_metadata(&empty).unwrap_or_default());
        assert_eq!((none.invocation.as_str(), none.mnemonic.as_str()), ("", ""));
    }
}
