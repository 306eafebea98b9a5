//! A Paddock worker: it connects to the scheduler, takes assignments up to its
//! capacity, and for each one materialises the input root from its local cache, runs
//! the command through a [`Runner`], collects and uploads the outputs, and reports the
//! ActionResult. If its connection breaks it stops what it was running (the scheduler
//! has requeued it) and connects again.

mod cache;
mod disk;
mod execute;
mod faults;
mod identities;
mod inputs;
mod locality;
mod outputs;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use paddock_client::{Credentials, LocalServer, Remote};
use paddock_config::ActionLimits;
use paddock_proto::worker::v1 as wire;
use paddock_proto::worker::v1::scheduler_client::SchedulerClient;
use paddock_runner::{Identities, Runner};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a stopping session waits for its cancelled actions to be torn down.
const CANCEL_GRACE: Duration = Duration::from_secs(30);

pub use cache::FileCache;
pub use faults::Faults;

/// Where a worker finds its scheduler (and the CAS).
#[derive(Clone, Debug)]
pub enum SchedulerAddress {
    /// `grpc://HOST:PORT`, or `grpcs://HOST:PORT` for TLS, with what the worker
    /// checks the scheduler's certificate against and proves itself with. Several
    /// for servers that share their state: the worker connects to one, and to the
    /// next when it is gone.
    Urls {
        urls: Vec<String>,
        credentials: Credentials,
    },
    /// The scheduler in this process (`paddock up`'s own workers).
    Local(LocalServer),
}

impl std::fmt::Display for SchedulerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SchedulerAddress::Urls { urls, .. } => f.write_str(&urls.join(", ")),
            SchedulerAddress::Local(_) => f.write_str("the scheduler in this process"),
        }
    }
}

impl SchedulerAddress {
    /// How many servers it names.
    fn servers(&self) -> usize {
        match self {
            SchedulerAddress::Urls { urls, .. } => urls.len().max(1),
            SchedulerAddress::Local(_) => 1,
        }
    }

    /// Connects to its `turn`-th server (counting round).
    async fn connect(&self, turn: usize) -> Result<(Remote, String), paddock_client::ClientError> {
        match self {
            SchedulerAddress::Urls { urls, credentials } => {
                let url = &urls[turn % urls.len()];
                Ok((
                    Remote::connect_with(url, "", credentials).await?,
                    url.clone(),
                ))
            }
            SchedulerAddress::Local(server) => Ok((
                Remote::over(server.channel().await?, "", None).await?,
                self.to_string(),
            )),
        }
    }
}

/// How a worker is set up.
pub struct WorkerOptions {
    pub name: String,
    pub scheduler: SchedulerAddress,
    pub work_dir: PathBuf,
    pub capacity: usize,
    pub cache_size: u64,
    /// Offered on top of the detected properties.
    pub properties: Vec<(String, String)>,
    pub runner: Arc<dyn Runner>,
    /// Who actions run as, for runners that isolate them (the container runner):
    /// each running action has its own.
    pub identities: Option<Identities>,
    /// What one action may take.
    pub limits: ActionLimits,
    /// For testing the farm only: see [`Faults`].
    pub faults: Faults,
}

/// This machine's memory in bytes, as `/proc/meminfo` gives it.
pub fn machine_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// The properties every worker offers: OS, ISA, CPU count and memory.
pub fn detected_properties() -> Vec<(String, String)> {
    let isa = match std::env::consts::ARCH {
        "x86_64" => "x86-64",
        other => other,
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut properties = vec![
        ("OSFamily".to_owned(), "Linux".to_owned()),
        ("ISA".to_owned(), isa.to_owned()),
        ("cores".to_owned(), cores.to_string()),
    ];
    if let Some(bytes) = machine_memory() {
        properties.push(("memory".to_owned(), bytes.to_string()));
    }
    properties
}

/// The host's name, the default worker name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".to_owned())
}

/// Runs a worker until `shutdown`, reconnecting whenever the connection breaks.
pub async fn run(options: WorkerOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cache_dir = options.work_dir.join("cache");
    let actions_dir = options.work_dir.join("actions");
    std::fs::create_dir_all(&cache_dir)?;
    if actions_dir.exists() {
        // A previous life of this worker may have left action directories behind.
        execute::remove_tree(actions_dir.clone()).await;
    }
    std::fs::create_dir_all(&actions_dir)?;
    let cache = Arc::new(FileCache::open(&cache_dir, options.cache_size)?);
    let identities = options
        .identities
        .map(|i| Arc::new(identities::IdentityPool::new(i)));
    let next_action = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let disk = Arc::new(disk::DiskGuard::default());
    let recent = Arc::new(locality::RecentTrees::default());
    let mut properties = detected_properties();
    properties.retain(|(k, _)| !options.properties.iter().any(|(o, _)| o == k));
    properties.extend(options.properties.iter().cloned());

    let mut backoff = Duration::from_millis(100);
    // Which server to try, and how many failed in a row: a worker whose server is
    // gone tries the next at once, and backs off only once it has tried them all.
    let (mut turn, mut failed) = (0usize, 0usize);
    while !shutdown.is_cancelled() {
        let mut server = options.scheduler.to_string();
        let outcome = async {
            let (remote, url) = options.scheduler.connect(turn).await?;
            server = url;
            let ctx = Arc::new(execute::Context {
                name: options.name.clone(),
                remote,
                cache: cache.clone(),
                runner: options.runner.clone(),
                actions_dir: actions_dir.clone(),
                faults: options.faults.clone(),
                limits: options.limits.clone(),
                identities: identities.clone(),
                next_action: next_action.clone(),
                disk: disk.clone(),
                recent: recent.clone(),
            });
            session(ctx, &options, &properties, &shutdown).await
        }
        .await;
        match outcome {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                failed = 0;
            }
            Err(e) => {
                failed += 1;
                tracing::warn!(worker = %options.name, scheduler = %server, error = format!("{e:#}"), "scheduler connection failed")
            }
        }
        // The next server, unless the session ended on purpose (a shutdown).
        turn += 1;
        if failed % options.scheduler.servers() != 0 {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    Ok(())
}

/// One connection to the scheduler, until it breaks or `shutdown`.
async fn session(
    ctx: Arc<execute::Context>,
    options: &WorkerOptions,
    properties: &[(String, String)],
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    use wire::scheduler_message::Message as S;
    use wire::worker_message::Message as W;
    let (tx, rx) = mpsc::channel::<wire::WorkerMessage>(256);
    tx.send(wire::WorkerMessage {
        message: Some(W::Register(wire::Register {
            name: options.name.clone(),
            properties: properties
                .iter()
                .map(|(name, value)| wire::Property {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            capacity: options.capacity.max(1) as u32,
        })),
    })
    .await?;
    let mut inbound = SchedulerClient::new(ctx.remote.channel())
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(worker = %options.name, capacity = options.capacity, "connected to the scheduler");
    let running: Arc<Mutex<HashMap<String, CancellationToken>>> = Arc::default();
    let assignments = TaskTracker::new();
    let mut heartbeat = tokio::time::interval(Duration::from_secs(2));
    // What this session's scheduler has of the cache summary (nothing yet).
    let mut summary_sent = 0;
    let ended = loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(wire::SchedulerMessage { message: Some(message) })) => match message {
                    S::Registered(r) => {
                        let every = Duration::from_millis(r.heartbeat_interval_ms.max(100) as u64);
                        heartbeat = tokio::time::interval(every);
                    }
                    S::Assignment(assignment) => {
                        spawn_assignment(
                            &assignments,
                            ctx.clone(),
                            assignment,
                            running.clone(),
                            tx.clone(),
                        );
                    }
                    S::Cancel(cancel) => {
                        if let Some(token) = running.lock().get(&cancel.assignment_id) {
                            tracing::info!(assignment = %cancel.assignment_id, "cancelled by the scheduler");
                            token.cancel();
                        }
                    }
                },
                Ok(Some(_)) => {}
                Ok(None) => break Ok(()),
                Err(status) => break Err(anyhow::anyhow!("scheduler stream: {status}")),
            },
            _ = heartbeat.tick() => {
                let ids: Vec<String> = running.lock().keys().cloned().collect();
                let cache = ctx.recent.summary_since(&mut summary_sent);
                let beat = wire::WorkerMessage {
                    message: Some(W::Heartbeat(wire::Heartbeat { running: ids, cache })),
                };
                if tx.send(beat).await.is_err() {
                    break Ok(());
                }
            }
            _ = shutdown.cancelled() => break Ok(()),
        }
    };
    // Whatever still runs belongs to a session the scheduler has given up on.
    for token in running.lock().values() {
        token.cancel();
    }
    // Wait for them to be killed and cleaned up: a worker that stops (say, `systemctl
    // stop`) must not leave actions running in cgroups outside its own.
    assignments.close();
    if tokio::time::timeout(CANCEL_GRACE, assignments.wait())
        .await
        .is_err()
    {
        tracing::warn!(worker = %options.name, "cancelled actions did not stop in time");
    }
    tracing::info!(worker = %options.name, "disconnected from the scheduler");
    ended
}

fn spawn_assignment(
    assignments: &TaskTracker,
    ctx: Arc<execute::Context>,
    assignment: wire::Assignment,
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
    tx: mpsc::Sender<wire::WorkerMessage>,
) {
    use wire::worker_message::Message as W;
    let id = assignment.assignment_id.clone();
    let token = CancellationToken::new();
    running.lock().insert(id.clone(), token.clone());
    assignments.spawn(async move {
        let started_tx = tx.clone();
        let started_id = id.clone();
        let started = move || {
            let _ = started_tx.try_send(wire::WorkerMessage {
                message: Some(W::Started(wire::Started {
                    assignment_id: started_id,
                })),
            });
        };
        // In a task of its own, so that a panic in it becomes a failed attempt the
        // scheduler hears of, not an assignment that never ends.
        let work =
            tokio::spawn(async move { execute::execute(&ctx, assignment, token, started).await });
        let finished = match work.await {
            Ok(finished) => finished,
            Err(error) => {
                tracing::error!(assignment = %id, %error, "the task running an assignment died");
                execute::broken(id.clone())
            }
        };
        let _ = tx
            .send(wire::WorkerMessage {
                message: Some(W::Finished(finished)),
            })
            .await;
        // Only now: a heartbeat that no longer lists it must come after its result.
        running.lock().remove(&id);
    });
}
