//! The scheduler's side of Paddock's worker protocol (`proto/paddock/worker/v1`).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use paddock_proto::worker::v1::{
    scheduler_server::Scheduler as SchedulerRpc, worker_message, SchedulerMessage, WorkerMessage,
};
use paddock_scheduler::Scheduler;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

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
        let connection = self.scheduler.connect_worker(register)?;
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
