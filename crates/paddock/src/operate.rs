//! Operators' commands over the admin protocol: `paddock workers ...` and
//! `paddock cache invalidate ...`.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Subcommand;
use paddock_client::{Remote, Transport};
use paddock_config::Span;
use paddock_proto::admin::v1::{
    self as wire,
    admin_client::AdminClient,
    command_worker_request::Command,
    invalidate_action_results_request::{ByAction, ByWorker, Target},
};
use paddock_reapi::time::{from_unix_micros, unix_micros};

#[derive(Subcommand)]
pub enum WorkersCommand {
    /// Every worker the scheduler knows: standing, pool, load and failure statistics.
    List {
        #[command(flatten)]
        server: Server,
    },
    /// Give the worker no new work; what it runs finishes.
    Drain(Order),
    /// Give the worker no work until it is released (no automatic probes).
    Quarantine(Order),
    /// Put the worker back to work, its statistics cleared.
    Release(Order),
}

#[derive(clap::Args)]
pub struct Order {
    name: String,
    /// Why, for the log and `workers list`.
    #[arg(long, default_value = "")]
    reason: String,
    #[command(flatten)]
    server: Server,
}

/// The server, and what the operator proves itself with (the `admin` permission).
#[derive(clap::Args)]
pub struct Server {
    /// The server's REAPI address (`grpcs://` for TLS).
    #[arg(long, default_value = "grpc://127.0.0.1:8980")]
    remote: String,
    #[command(flatten)]
    credentials: crate::CredentialArgs,
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Remove ActionCache entries: one action's (`--action HASH/SIZE`), or all that
    /// one worker produced in a time window (`--worker NAME --since 2h [--until 30m]`,
    /// times before now).
    Invalidate {
        #[command(flatten)]
        server: Server,
        #[arg(long, default_value = "")]
        instance: String,
        #[arg(long, conflicts_with = "worker", required_unless_present = "worker")]
        action: Option<String>,
        #[arg(long, requires = "since")]
        worker: Option<String>,
        /// How long before now the window starts, e.g. `2h`.
        #[arg(long)]
        since: Option<Span>,
        /// How long before now the window ends (default: now).
        #[arg(long)]
        until: Option<Span>,
    },
}

/// The server's answer, as an error a person can read.
fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

async fn client(server: &Server) -> Result<AdminClient<Transport>> {
    let credentials = server.credentials.load()?;
    let remote = Remote::connect_with(&server.remote, "", &credentials).await?;
    Ok(AdminClient::new(remote.channel()))
}

fn ago(micros: i64) -> String {
    let secs = SystemTime::now()
        .duration_since(from_unix_micros(micros))
        .unwrap_or_default()
        .as_secs();
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s => format!("{}h ago", s / 3600),
    }
}

fn print_workers(workers: &[wire::Worker]) {
    println!(
        "{:<24} {:<12} {:<10} {:>5} {:>9} {:>22} {:>9}  REASON",
        "WORKER", "STANDING", "POOL", "LOAD", "CONNECTED", "RECENT (INFRA/EXIT/DIS)", "TOTAL"
    );
    for w in workers {
        let recent = w.recent.unwrap_or_default();
        let totals = w.totals.unwrap_or_default();
        println!(
            "{:<24} {:<12} {:<10} {:>5} {:>9} {:>22} {:>9}  {} ({})",
            w.name,
            w.standing,
            if w.pool.is_empty() { "-" } else { &w.pool },
            format!("{}/{}", w.running, w.capacity),
            if w.connected { "yes" } else { "no" },
            format!(
                "{}: {}/{}/{}",
                recent.outcomes, recent.infra_failures, recent.nonzero_exits, recent.disagreements
            ),
            totals.outcomes,
            w.reason,
            ago(w.since_unix_micros),
        );
    }
}

/// The autoscaling signal, a line per pool.
fn print_pools(pools: &[wire::Pool]) {
    println!(
        "{:<16} {:>8} {:>8} {:>6} {:>8} {:>5} {:>8}",
        "POOL", "QUEUED", "WORKERS", "SLOTS", "RUNNING", "IDLE", "DESIRED"
    );
    for p in pools {
        println!(
            "{:<16} {:>8} {:>8} {:>6} {:>8} {:>5} {:>8}",
            if p.name.is_empty() { "-" } else { &p.name },
            p.queued,
            p.workers,
            p.slots,
            p.running,
            p.idle_workers,
            p.desired_workers
        );
    }
}

pub async fn workers(command: WorkersCommand) -> Result<()> {
    let (order, which) = match command {
        WorkersCommand::List { server } => {
            let listed = client(&server)
                .await?
                .list_workers(wire::ListWorkersRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            print_workers(&listed.workers);
            println!();
            print_pools(&listed.pools);
            return Ok(());
        }
        WorkersCommand::Drain(order) => (order, Command::Drain),
        WorkersCommand::Quarantine(order) => (order, Command::Quarantine),
        WorkersCommand::Release(order) => (order, Command::Release),
    };
    let worker = client(&order.server)
        .await?
        .command_worker(wire::CommandWorkerRequest {
            name: order.name.clone(),
            command: which as i32,
            reason: order.reason,
        })
        .await
        .map_err(refused)
        .with_context(|| format!("ordering {}", order.name))?
        .into_inner();
    print_workers(&[worker]);
    Ok(())
}

pub async fn cache(command: CacheCommand) -> Result<()> {
    let CacheCommand::Invalidate {
        server,
        instance,
        action,
        worker,
        since,
        until,
    } = command;
    let now = SystemTime::now();
    let before = |span: Span| unix_micros(now.checked_sub(span.get()).unwrap_or(UNIX_EPOCH));
    let target = match (action, worker) {
        (Some(action_digest), _) => Target::Action(ByAction {
            instance_name: instance,
            action_digest,
        }),
        (None, Some(worker)) => Target::Worker(ByWorker {
            worker,
            from_unix_micros: since.map(before).unwrap_or(0),
            until_unix_micros: until.map(before).unwrap_or(0),
        }),
        (None, None) => anyhow::bail!("say --action or --worker"),
    };
    let removed = client(&server)
        .await?
        .invalidate_action_results(wire::InvalidateActionResultsRequest {
            target: Some(target),
        })
        .await
        .map_err(refused)?
        .into_inner()
        .removed;
    println!("removed {removed} ActionCache entries");
    Ok(())
}
