//! The operators' protocol (`proto/paddock/admin/v1`): the fleet's workers and
//! their health, orders for them, and ActionCache invalidation.

use paddock_cas::ActionKey;
use paddock_proto::admin::v1::{
    self as wire, admin_server::Admin, command_worker_request::Command,
    invalidate_action_results_request::Target,
};
use paddock_reapi::time::unix_micros;
use paddock_reapi::Digest;
use paddock_scheduler::health::Counts;
use paddock_scheduler::{PoolLoad, Scheduler, WorkerCommand, WorkerReport};
use tonic::{Request, Response, Status};

use paddock_config::Permission;

use crate::auth::authorize;
use crate::{invalid, Storage};

/// The instance an admin grant must cover for calls about the whole farm: only a
/// grant for every instance (`*`) matches it.
const EVERY_INSTANCE: &str = "*";

pub struct AdminService {
    scheduler: Scheduler,
    storage: Storage,
}

impl AdminService {
    pub fn new(scheduler: Scheduler, storage: Storage) -> Self {
        AdminService { scheduler, storage }
    }
}

fn counts(c: Counts) -> wire::Counts {
    wire::Counts {
        outcomes: c.outcomes as u64,
        infra_failures: c.infra_failures as u64,
        nonzero_exits: c.nonzero_exits as u64,
        disagreements: c.disagreements as u64,
    }
}

fn worker(report: WorkerReport) -> wire::Worker {
    wire::Worker {
        name: report.name,
        identity: report.identity,
        pool: report.pool,
        standing: report.standing,
        reason: report.reason,
        since_unix_micros: unix_micros(report.since),
        connected: report.connected,
        capacity: report.capacity as u32,
        running: report.running as u32,
        recent: Some(counts(report.recent)),
        totals: Some(counts(report.totals)),
    }
}

fn pool(load: PoolLoad) -> wire::Pool {
    wire::Pool {
        name: load.pool,
        queued: load.queued as u64,
        workers: load.workers as u32,
        slots: load.slots as u32,
        running: load.running as u32,
        idle_workers: load.idle_workers as u32,
        desired_workers: load.desired_workers as u32,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_workers(
        &self,
        request: Request<wire::ListWorkersRequest>,
    ) -> Result<Response<wire::ListWorkersResponse>, Status> {
        authorize(&request, Permission::Admin, EVERY_INSTANCE)?;
        let workers = self.scheduler.workers().into_iter().map(worker).collect();
        let pools = self.scheduler.pools().into_iter().map(pool).collect();
        Ok(Response::new(wire::ListWorkersResponse { workers, pools }))
    }

    async fn command_worker(
        &self,
        request: Request<wire::CommandWorkerRequest>,
    ) -> Result<Response<wire::Worker>, Status> {
        authorize(&request, Permission::Admin, EVERY_INSTANCE)?;
        let request = request.into_inner();
        let command = match Command::try_from(request.command) {
            Ok(Command::Drain) => WorkerCommand::Drain,
            Ok(Command::Quarantine) => WorkerCommand::Quarantine,
            Ok(Command::Release) => WorkerCommand::Release,
            _ => return Err(invalid("command must be DRAIN, QUARANTINE or RELEASE")),
        };
        let report = self
            .scheduler
            .command_worker(&request.name, command, &request.reason)
            .await?;
        Ok(Response::new(worker(report)))
    }

    async fn invalidate_action_results(
        &self,
        request: Request<wire::InvalidateActionResultsRequest>,
    ) -> Result<Response<wire::InvalidateActionResultsResponse>, Status> {
        let cache = &self.storage.action_cache;
        let instance = match &request.get_ref().target {
            Some(Target::Action(by)) => by.instance_name.as_str(),
            _ => EVERY_INSTANCE,
        };
        authorize(&request, Permission::Admin, instance)?;
        let removed = match request.into_inner().target {
            Some(Target::Action(by)) => {
                let action: Digest = by
                    .action_digest
                    .parse()
                    .map_err(|e| invalid(format!("action_digest: {e}")))?;
                let key = ActionKey {
                    instance: by.instance_name,
                    action,
                };
                cache
                    .delete(&key)
                    .await
                    .map_err(|e| Status::new(e.code(), e.to_string()))? as u64
            }
            Some(Target::Worker(by)) => {
                if by.worker.is_empty() {
                    return Err(invalid("worker must name a worker"));
                }
                let (from, until) = (by.from_unix_micros, by.until_unix_micros);
                if from < 0 || until < 0 || (until != 0 && until <= from) {
                    return Err(invalid(
                        "the window must have from < until (0 leaves an end open)",
                    ));
                }
                let name = by.worker.clone();
                let picked = move |result: &paddock_reapi::proto::re::ActionResult| {
                    let Some(metadata) = &result.execution_metadata else {
                        return false;
                    };
                    let at = metadata
                        .worker_completed_timestamp
                        .as_ref()
                        .and_then(paddock_reapi::time::system_time)
                        .map(unix_micros);
                    metadata.worker == name
                        && at.is_some_and(|at| at >= from && (until == 0 || at < until))
                };
                let removed = cache
                    .remove_where(&picked)
                    .await
                    .map_err(|e| Status::new(e.code(), e.to_string()))?;
                tracing::warn!(worker = %by.worker, from, until, removed, "invalidated a worker's ActionCache entries");
                removed
            }
            None => return Err(invalid("say what to invalidate: an action or a worker")),
        };
        Ok(Response::new(wire::InvalidateActionResultsResponse {
            removed,
        }))
    }
}
