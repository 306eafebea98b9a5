//! Starting the farm: storage, the gRPC services and the metrics endpoint, wired
//! together from one configuration.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use paddock_auth::{Authenticator, Principal};
use paddock_cas::{ActionCache, BlobIndex, Remote};
use paddock_client::LocalServer;
use paddock_config::{
    Config, RunnerKind, SandboxConfig, StateBackend, StorageBackend, WorkerConfig,
};
use paddock_history::{History, HistoryFile, HistoryStore};
use paddock_objstore::ObjectStoreBlobs;
use paddock_postgres::{
    Database, PgActionCache, PgBlobIndex, PgHistory, PgQueue, PgRecords, QueueSettings,
};
use paddock_sandbox::Zygote;
use paddock_scheduler::{
    Bounds, ExecutionJournal, Lasting, RecordStore, Scheduler, SharedQueue, StateFile,
};
use paddock_server::{Access, Audience, Callers, Limits, Storage};
use paddock_tls::ServerTls;
use paddock_web::Web;
use paddock_worker::{SchedulerAddress, WorkerOptions};
use tokio::io::DuplexStream;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// Where the lasting state is: the workers' records, and the ActionCache when
/// servers share it.
struct State {
    records: Arc<dyn RecordStore>,
    action_cache: Option<Arc<dyn ActionCache>>,
    /// The queue servers share; without one, executions are journaled here.
    shared: Option<Arc<dyn SharedQueue>>,
    /// The index of the object store's blobs, in the database servers share.
    blob_index: Option<Arc<dyn BlobIndex>>,
    /// Where the history of recent builds is kept.
    history: Arc<dyn HistoryStore>,
}

impl State {
    async fn open(config: &Config, data_dir: &std::path::Path) -> Result<State> {
        match config.state.backend {
            StateBackend::Memory => Ok(State {
                records: Arc::new(StateFile::in_directory(data_dir)),
                action_cache: None,
                shared: None,
                blob_index: None,
                history: Arc::new(HistoryFile::in_directory(data_dir)),
            }),
            StateBackend::Postgres => {
                let database = Database::connect(&config.state)
                    .await
                    .context("[state] backend = \"postgres\"")?;
                let action_cache =
                    PgActionCache::new(database.clone(), config.storage.action_cache_max_entries);
                tokio::spawn(paddock_postgres::maintain(
                    database.clone(),
                    action_cache.clone(),
                ));
                let queue = PgQueue::new(
                    database.clone(),
                    QueueSettings {
                        lease: config.state.lease.get(),
                        max_attempts: config.scheduler.max_attempts,
                        retention: config.scheduler.operation_retention.get(),
                    },
                );
                Ok(State {
                    blob_index: Some(Arc::new(PgBlobIndex::new(
                        database.clone(),
                        config.storage.blob_lease.get(),
                    ))),
                    history: Arc::new(PgHistory::new(database.clone())),
                    records: Arc::new(PgRecords::new(database)),
                    action_cache: Some(Arc::new(action_cache)),
                    shared: Some(Arc::new(queue)),
                })
            }
        }
    }
}

/// The services, bound and ready to serve.
struct Farm {
    listener: TcpListener,
    worker_listener: TcpListener,
    metrics_listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    tls_reload: Duration,
    callers: Callers,
    client_routes: Routes,
    worker_routes: Routes,
    scheduler: Scheduler,
    /// The pages on the metrics port.
    web: Arc<Web>,
    /// Where the history the pages show is kept.
    history_store: Arc<dyn HistoryStore>,
    /// Connections of workers in this process, when there are any.
    local: Option<mpsc::Receiver<DuplexStream>>,
}

impl Farm {
    async fn build(config: &Config, data_dir: PathBuf) -> Result<Farm> {
        config.check_exposure().map_err(anyhow::Error::msg)?;
        let authenticator =
            Authenticator::new(&config.auth).map_err(|e| anyhow::anyhow!("[auth]: {e}"))?;
        let tls = match &config.server.tls {
            Some(tls) => Some(
                ServerTls::load(paddock_tls::Files {
                    cert: tls.cert_file.clone(),
                    key: tls.key_file.clone(),
                    client_ca: tls.client_ca_file.clone(),
                })
                .map_err(|e| anyhow::anyhow!("[server.tls]: {e}"))?,
            ),
            None => None,
        };
        if tls.is_none() && !authenticator.is_open() {
            tracing::warn!(
                "[auth] is configured without [server.tls]: tokens cross the network in plain text"
            );
        }
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        let state = State::open(config, &data_dir).await?;
        let remote = match (&config.storage.s3, &state.blob_index) {
            (Some(s3), Some(index)) if config.storage.backend == StorageBackend::S3 => {
                let store = ObjectStoreBlobs::connect(s3)?;
                store
                    .check()
                    .await
                    .with_context(|| format!("reaching the object store {}", store.describe()))?;
                tracing::info!(store = %store.describe(), "blobs are kept in the object store");
                Some(Remote {
                    store: Arc::new(store),
                    index: index.clone(),
                })
            }
            _ => None,
        };
        let cas = paddock_cas::open_cas(&config.storage, &data_dir, remote)
            .await
            .context("opening the CAS")?;
        let action_cache = paddock_cas::open_action_cache(
            &config.storage,
            &data_dir,
            cas.clone(),
            state.action_cache.clone(),
        )
        .context("opening the ActionCache")?;
        let quotas = &config.quotas();
        let scheduler = Scheduler::new(
            config.scheduler.clone(),
            cas.clone(),
            action_cache.clone(),
            Bounds {
                max_tree_directories: config.storage.max_tree_directories,
                max_executions: quotas.max_executions,
                max_finished_operations: quotas.max_finished_operations,
                max_worker_names: quotas.max_worker_names,
            },
            Lasting {
                records: Some(state.records),
                executions: match state.shared {
                    Some(_) => None,
                    None => Some(ExecutionJournal::in_directory(&data_dir)),
                },
                shared: state.shared,
            },
        )
        .await?;
        let history = Arc::new(History::journaled(config.history.clone()));
        history.restore(
            state
                .history
                .load()
                .await
                .with_context(|| format!("reading the history in {}", state.history.describe()))?,
        );
        if let Err(error) = state.history.trim(&history).await {
            tracing::warn!(%error, "the history's store could not drop what its bounds no longer keep");
        }
        let storage = Storage {
            cas,
            action_cache,
            history: history.clone(),
        };
        let limits = Limits {
            max_batch_size: config.storage.max_batch_size.bytes(),
            max_batch_blobs: config.storage.max_batch_blobs,
            max_tree_directories: config.storage.max_tree_directories,
        };
        let bind = |address: std::net::SocketAddr| async move {
            TcpListener::bind(address)
                .await
                .with_context(|| format!("binding {address}"))
        };
        let listener = bind(config.server.listen).await?;
        let worker_listener = bind(config.server.worker_address()).await?;
        let metrics_listener = bind(config.server.metrics_listen).await?;
        let cache = paddock_server::cache_routes(&storage, limits, quotas, true);
        let authenticator = Arc::new(authenticator);
        let secure = if tls.is_some() { "s" } else { "" };
        let web = Arc::new(Web::new(
            history,
            scheduler.clone(),
            storage.cas.clone(),
            authenticator.clone(),
            config.auth.allow_anonymous,
            format!("grpc{secure}://{}", listener.local_addr()?),
        ));
        Ok(Farm {
            listener,
            worker_listener,
            metrics_listener,
            tls,
            tls_reload: config
                .server
                .tls
                .as_ref()
                .map_or(Duration::from_secs(5), |t| t.reload_interval.get()),
            callers: Callers::Authenticated(authenticator),
            web,
            history_store: state.history,
            client_routes: paddock_server::client_routes(cache.clone(), &storage, &scheduler),
            worker_routes: paddock_server::worker_routes(cache, &scheduler),
            scheduler,
            local: None,
        })
    }

    fn address(&self, listener: &TcpListener, scheme: &str) -> String {
        let secure = if self.tls.is_some() { "s" } else { "" };
        format!(
            "{scheme}{secure}://{}",
            listener
                .local_addr()
                .expect("a bound listener has an address")
        )
    }

    fn url(&self) -> String {
        self.address(&self.listener, "grpc")
    }

    fn worker_url(&self) -> String {
        self.address(&self.worker_listener, "grpc")
    }

    fn metrics_url(&self) -> String {
        format!("{}/metrics", self.address(&self.metrics_listener, "http"))
    }

    /// Where workers in this process reach the scheduler: through connections that
    /// never leave it, as [`Principal::local_workers`].
    fn local_scheduler(&mut self) -> SchedulerAddress {
        let (server, connections) = LocalServer::new();
        self.local = Some(connections);
        SchedulerAddress::Local(server)
    }

    /// Serves until `shutdown`, then stops `local_workers` and ends the scheduler's
    /// long-lived streams so that the graceful drain has only short calls to wait for.
    async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        local_workers: CancellationToken,
    ) -> Result<()> {
        let stop = CancellationToken::new();
        let tls_watch = self.tls.as_ref().map(|tls| tls.watch(self.tls_reload));
        let pages = tokio::spawn(paddock_web::serve(
            self.metrics_listener,
            self.tls.clone(),
            self.web.clone(),
            stop.clone().cancelled_owned(),
        ));
        let watching = tokio::spawn(paddock_web::watch(
            self.web.history(),
            self.scheduler.clone(),
            stop.clone().cancelled_owned(),
        ));
        // The history is handed over last, once nothing more can change it.
        let served_all = CancellationToken::new();
        let keeping = tokio::spawn(paddock_history::keep(
            self.web.history(),
            self.history_store,
            served_all.clone().cancelled_owned(),
        ));
        let timers = tokio::spawn(self.scheduler.clone().run());
        let scheduler = self.scheduler;
        let stopping = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            // Long-lived streams (workers, clients waiting on actions) would hold up a
            // graceful shutdown: end them first, and keep local workers from reconnecting.
            local_workers.cancel();
            scheduler.shutdown().await;
            stopping.cancel();
        });
        let workers = tokio::spawn(paddock_server::serve(
            self.worker_listener,
            self.tls.clone(),
            self.worker_routes.clone(),
            Access {
                callers: self.callers.clone(),
                audience: Audience::Workers,
            },
            stop.clone().cancelled_owned(),
        ));
        let local = self.local.map(|connections| {
            tokio::spawn(paddock_server::serve_local(
                connections,
                self.worker_routes,
                Arc::new(Principal::local_workers()),
                stop.clone().cancelled_owned(),
            ))
        });
        let served = paddock_server::serve(
            self.listener,
            self.tls,
            self.client_routes,
            Access {
                callers: self.callers,
                audience: Audience::Clients,
            },
            stop.clone().cancelled_owned(),
        )
        .await;
        // If one listener failed, the others stop too.
        stop.cancel();
        let workers_served = workers.await?;
        if let Some(local) = local {
            local.await?.context("serving local workers")?;
        }
        timers.abort();
        if let Some(watch) = tls_watch {
            watch.abort();
        }
        let _ = pages.await;
        let _ = watching.await;
        served_all.cancel();
        let _ = keeping.await;
        served.context("serving gRPC to clients")?;
        workers_served.context("serving gRPC to workers")
    }
}

/// The options of a worker as the configuration describes it; `data_dir` holds its
/// files unless `work_dir` is set. Prepares the container runner (its root templates
/// and cgroups) unless the configuration asks for the host runner.
pub async fn worker_options(
    config: &WorkerConfig,
    scheduler: SchedulerAddress,
    name: String,
    data_dir: PathBuf,
    zygote: Option<&Zygote>,
) -> Result<WorkerOptions> {
    let capacity = config.capacity.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let work_dir = worker_dir(config, data_dir);
    let mut properties: Vec<(String, String)> = config
        .properties
        .iter()
        .flat_map(|(k, v)| v.values().into_iter().map(move |v| (k.clone(), v)))
        .collect();
    let runner: Arc<dyn paddock_runner::Runner> = match config.runner {
        RunnerKind::Host => Arc::new(paddock_runner::ProcessRunner),
        RunnerKind::Container => {
            let zygote = zygote.context("the container runner needs the sandbox zygote")?;
            properties.push(("sandbox".into(), "container".into()));
            let mut resolvers: Vec<Arc<dyn paddock_sandbox::RootfsResolver>> = Vec::new();
            if let Some((resolver, version)) = nix_resolver(config, &work_dir).await? {
                resolvers.push(Arc::new(resolver));
                properties.push(("nix".into(), version));
            }
            if let Some(resolver) = oci_resolver(config, &work_dir)? {
                resolvers.push(Arc::new(resolver));
                properties.push(("oci".into(), "overlay".into()));
            }
            Arc::new(container_runner(
                &config.sandbox,
                &name,
                &work_dir,
                zygote.clone(),
                resolvers,
            )?)
        }
    };
    Ok(WorkerOptions {
        name,
        scheduler,
        work_dir,
        capacity,
        cache_size: config.cache_size.bytes(),
        properties,
        identities: (config.runner == RunnerKind::Container).then(|| identities(&config.sandbox)),
        limits: config.limits.clone(),
        runner,
        faults: Default::default(),
    })
}

/// The Nix resolver, if this worker offers Nix platforms, with the `nix` property's value.
async fn nix_resolver(
    config: &WorkerConfig,
    work_dir: &std::path::Path,
) -> Result<Option<(paddock_nix::NixResolver, String)>> {
    let options = paddock_nix::NixOptions {
        dir: work_dir.join("nix"),
        substituters: config.nix.substituters.clone(),
        trusted_public_keys: config.nix.trusted_public_keys.clone(),
        allow_builds: config.nix.allow_builds,
        max_closures: config.nix.max_closures,
        identities: identities(&config.sandbox),
    };
    paddock_nix::offer(config.nix.enabled, options)
        .await
        .map_err(|e| {
            anyhow::anyhow!("[worker.nix] enabled = true, but this worker's Nix cannot serve: {e}")
        })
}

/// The image resolver, if this worker offers image platforms.
fn oci_resolver(
    config: &WorkerConfig,
    work_dir: &std::path::Path,
) -> Result<Option<paddock_oci::OciResolver>> {
    match (config.oci.enabled, paddock_oci::detect()) {
        (Some(false), _) | (None, false) => return Ok(None),
        (Some(true), false) => {
            anyhow::bail!("[worker.oci] enabled = true, but this kernel has no overlayfs")
        }
        _ => {}
    }
    let mut credentials = std::collections::HashMap::new();
    for (registry, login) in &config.oci.credentials {
        let password = match (&login.password, &login.password_file) {
            (Some(password), _) => password.clone(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .with_context(|| format!("reading the password of {registry}"))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            (None, None) => anyhow::bail!("[worker.oci.credentials.{registry:?}] has no password"),
        };
        credentials.insert(registry.clone(), (login.username.clone(), password));
    }
    let resolver = paddock_oci::OciResolver::new(paddock_oci::OciOptions {
        dir: work_dir.join("oci"),
        cache_size: config.oci.cache_size.bytes(),
        registries: paddock_oci::RegistryOptions {
            allowed: config.oci.registries.clone(),
            insecure: config.oci.insecure_registries.clone(),
            credentials,
        },
        layouts: config.oci.layouts.clone(),
        limits: paddock_oci::ImageLimits {
            max_layer_size: config.oci.max_layer_size.bytes(),
            max_image_size: config.oci.max_image_size.bytes(),
            max_unpacked_size: config.oci.max_unpacked_size.bytes(),
            max_entries: config.oci.max_entries,
        },
    })
    .context("preparing the image resolver")?;
    Ok(Some(resolver))
}

/// The identities a worker's actions run as.
pub fn identities(config: &SandboxConfig) -> paddock_runner::Identities {
    paddock_runner::Identities {
        uid: config.uid,
        gid: config.gid,
        count: config.identities,
    }
}

/// Where a worker keeps its files: its configured `work_dir`, else `default`.
pub fn worker_dir(config: &WorkerConfig, default: PathBuf) -> PathBuf {
    config.work_dir.clone().unwrap_or(default)
}

/// Where the farm keeps its state.
pub fn data_dir(config: &Config) -> PathBuf {
    config
        .server
        .data_dir
        .clone()
        .unwrap_or_else(paddock_config::default_data_dir)
}

/// The machine's memory in bytes, from /proc/meminfo.
/// A container runner for `worker`, whose containers `zygote` forks, asking
/// `resolvers` (then the host) for root filesystems.
pub fn container_runner(
    config: &SandboxConfig,
    worker: &str,
    work_dir: &std::path::Path,
    zygote: Zygote,
    resolvers: Vec<Arc<dyn paddock_sandbox::RootfsResolver>>,
) -> Result<paddock_sandbox::ContainerRunner> {
    std::fs::create_dir_all(work_dir)?;
    // Named after the worker and its directory: two workers on one host never share
    // a cgroup (each cleans its own up at start), and a restarted worker finds its old one.
    let work_dir = work_dir.canonicalize()?;
    let place = paddock_reapi::Digest::of(work_dir.as_os_str().as_encoded_bytes()).hash_hex();
    let cgroup_name: String = worker
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .chain(std::iter::once('-'))
        .chain(place[..8].chars())
        .collect();
    let machine = paddock_worker::machine_memory();
    let options = paddock_sandbox::SandboxOptions {
        zygote,
        dir: work_dir.join("sandbox"),
        cgroup_parent: PathBuf::from(&config.cgroup_parent).join(cgroup_name),
        identities: identities(config),
        defaults: paddock_sandbox::Limits {
            memory_bytes: Some(config.default_memory.bytes()),
            pids: Some(config.default_pids),
            cores: config.default_cores,
        },
        maxima: paddock_sandbox::Limits {
            memory_bytes: config.max_memory.map(|m| m.bytes()).or(machine),
            pids: Some(config.max_pids),
            cores: config.max_cores,
        },
        total_memory: config
            .total_memory
            .map(|m| m.bytes())
            .or(machine.map(|m| m / 10 * 9)),
        total_pids: Some(config.total_pids),
        tmp_size: config.tmp_size.bytes(),
        resolvers,
    };
    paddock_sandbox::ContainerRunner::new(options).map_err(|e| {
        anyhow::anyhow!(
            "setting up the container runner: {e} (use --runner host where containers cannot run)"
        )
    })
}

/// Runs the farm in the foreground until SIGINT or SIGTERM, with
/// `config.server.local_workers` workers in this process (their containers forked by
/// `zygote`).
pub async fn run(config: Config, zygote: Option<Zygote>) -> Result<()> {
    // Listening before anything is announced: a signal sent as soon as the farm says
    // it serves must stop it gracefully, not kill it.
    let stop = ShutdownSignal::install()?;
    let data_dir = data_dir(&config);
    paddock_telemetry::metrics();
    let mut farm = Farm::build(&config, data_dir.clone()).await?;
    // These lines are the interface for scripts and tests: keep their form.
    println!("paddock: serving REAPI on {}", farm.url());
    println!("paddock: serving workers on {}", farm.worker_url());
    println!("paddock: metrics on {}", farm.metrics_url());
    tracing::info!(data_dir = %data_dir.display(), backend = ?config.storage.backend, "paddock is up");
    let stop_workers = CancellationToken::new();
    let mut workers = Vec::new();
    let host = paddock_worker::host_name();
    if config.server.local_workers > 0 {
        let scheduler = farm.local_scheduler();
        for i in 0..config.server.local_workers {
            let mut worker_config = config.worker.clone();
            worker_config.work_dir = None;
            let options = worker_options(
                &worker_config,
                scheduler.clone(),
                format!("{host}-local-{i}"),
                data_dir.join("workers").join(i.to_string()),
                zygote.as_ref(),
            )
            .await?;
            workers.push(tokio::spawn(paddock_worker::run(
                options,
                stop_workers.clone(),
            )));
        }
    }
    farm.serve(stop.received(), stop_workers).await?;
    for worker in workers {
        let _ = worker.await;
    }
    tracing::info!("paddock stopped");
    Ok(())
}

/// Runs one worker until SIGINT or SIGTERM.
pub async fn run_worker(options: WorkerOptions) -> Result<()> {
    let signal = ShutdownSignal::install()?;
    let stop = CancellationToken::new();
    let worker = tokio::spawn(paddock_worker::run(options, stop.clone()));
    signal.received().await;
    stop.cancel();
    worker.await??;
    Ok(())
}

/// SIGINT and SIGTERM, caught from the moment of `install` on.
struct ShutdownSignal {
    interrupt: Signal,
    terminate: Signal,
}

impl ShutdownSignal {
    fn install() -> Result<ShutdownSignal> {
        Ok(ShutdownSignal {
            interrupt: signal(SignalKind::interrupt()).context("catching SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("catching SIGTERM")?,
        })
    }

    async fn received(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => tracing::info!("SIGINT: shutting down"),
            _ = self.terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    }
}

/// A farm on a free loopback port with a throw-away data directory and `workers`
/// local workers, for benchmarks.
pub struct Embedded {
    url: String,
    /// The web pages (`http://host:port`).
    pages_url: String,
    /// Where workers in this process reach its scheduler.
    scheduler: SchedulerAddress,
    stop: Option<oneshot::Sender<()>>,
    stop_workers: CancellationToken,
    _data_dir: tempfile::TempDir,
}

impl Embedded {
    pub async fn start(
        workers: usize,
        worker_config: &WorkerConfig,
        zygote: Option<&Zygote>,
    ) -> Result<Embedded> {
        let faults = vec![paddock_worker::Faults::default(); workers];
        Embedded::start_with(Config::default(), worker_config, faults, zygote).await
    }

    /// A farm with this configuration (its listeners moved to free loopback ports)
    /// and one worker per entry of `faults` (which a benchmark may give faults, e.g.
    /// a delay).
    pub async fn start_with(
        mut config: Config,
        worker_config: &WorkerConfig,
        faults: Vec<paddock_worker::Faults>,
        zygote: Option<&Zygote>,
    ) -> Result<Embedded> {
        let data_dir = tempfile::tempdir()?;
        config.server.listen = "127.0.0.1:0".parse()?;
        config.server.worker_listen = Some("127.0.0.1:0".parse()?);
        config.server.metrics_listen = "127.0.0.1:0".parse()?;
        let mut farm = Farm::build(&config, data_dir.path().to_owned()).await?;
        let url = farm.url();
        let pages_url = farm.address(&farm.metrics_listener, "http");
        let scheduler = farm.local_scheduler();
        let (stop, stopped) = oneshot::channel::<()>();
        let stop_workers = CancellationToken::new();
        tokio::spawn(farm.serve(
            async move {
                let _ = stopped.await;
            },
            stop_workers.clone(),
        ));
        for (i, faults) in faults.into_iter().enumerate() {
            let mut options = worker_options(
                worker_config,
                scheduler.clone(),
                format!("bench-{i}"),
                data_dir.path().join("workers").join(i.to_string()),
                zygote,
            )
            .await?;
            options.faults = faults;
            tokio::spawn(paddock_worker::run(options, stop_workers.clone()));
        }
        Ok(Embedded {
            url,
            pages_url,
            scheduler,
            stop: Some(stop),
            stop_workers,
            _data_dir: data_dir,
        })
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn scheduler(&self) -> SchedulerAddress {
        self.scheduler.clone()
    }

    pub fn pages_url(&self) -> String {
        self.pages_url.clone()
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop_workers.cancel();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
