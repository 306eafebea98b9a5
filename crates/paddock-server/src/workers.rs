//! The scheduler's side of Paddock's worker protocol (`proto/paddock/worker/v1`).
//!
//! A session needs the `worker` permission; the worker's name is bound to the
//! caller's identity, and it is given only actions of the instances that identity
//! may serve.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use paddock_config::Permission;
use paddock_proto::worker::v1::{
    scheduler_server::Scheduler as SchedulerRpc, worker_message, SchedulerMessage, WorkerMessage,
};
use paddock_scheduler::{Scheduler, Serves};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{method, principal, require};

pub struct WorkerService {
    scheduler: Scheduler,
}

impl WorkerService {
    pub fn new(scheduler: Scheduler) -> Self {
        WorkerService { scheduler }
    }
}

#[tonic::async_trait]
impl SchedulerRpc for WorkerService {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<SchedulerMessage, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let caller = principal(&request)?;
        if !caller.may_somewhere(Permission::Worker) {
            require(&caller, method(&request), Permission::Worker, "")?;
        }
        let mut inbound = request.into_inner();
        let register = match inbound.next().await {
            Some(Ok(WorkerMessage {
                message: Some(worker_message::Message::Register(register)),
            })) => register,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "a session must start with Register",
                ))
            }
        };
        let identity = caller.name().to_owned();
        let serves: Serves =
            Arc::new(move |instance: &str| caller.may(Permission::Worker, instance));
        let connection = self
            .scheduler
            .connect_worker(register, &identity, serves)
            .await?;
        let session = connection.session;
        let scheduler = self.scheduler.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = inbound.next().await {
                scheduler.worker_message(session, message).await;
            }
            scheduler.worker_gone(session);
        });
        let outbound = UnboundedReceiverStream::new(connection.outbound).map(Ok);
        Ok(Response::new(Box::pin(outbound)))
    }
}
