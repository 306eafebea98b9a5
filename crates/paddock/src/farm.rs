//! Starting the farm: storage, the gRPC services and the metrics endpoint, wired
//! together from one configuration.

use std::future::Future;
use std::path::PathBuf;

use std::sync::Arc;

use anyhow::{Context, Result};
use paddock_config::{Config, RunnerKind, SandboxConfig, WorkerConfig};
use paddock_sandbox::Zygote;
use paddock_scheduler::Scheduler;
use paddock_server::{Limits, Storage};
use paddock_worker::WorkerOptions;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// The services, bound and ready to serve.
struct Farm {
    listener: TcpListener,
    metrics_listener: TcpListener,
    routes: tonic::service::Routes,
    scheduler: Scheduler,
}

impl Farm {
    async fn build(config: &Config, data_dir: PathBuf) -> Result<Farm> {
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        let cas = paddock_cas::open_cas(&config.storage, &data_dir)
            .await
            .context("opening the CAS")?;
        let action_cache = paddock_cas::open_action_cache(&config.storage, &data_dir, cas.clone())
            .context("opening the ActionCache")?;
        let scheduler = Scheduler::new(
            config.scheduler.clone(),
            cas.clone(),
            action_cache.clone(),
            config.storage.max_tree_directories,
        );
        let storage = Storage { cas, action_cache };
        let limits = Limits {
            max_batch_size: config.storage.max_batch_size.bytes(),
            max_batch_blobs: config.storage.max_batch_blobs,
            max_tree_directories: config.storage.max_tree_directories,
        };
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("binding {}", config.server.listen))?;
        let metrics_listener = TcpListener::bind(config.server.metrics_listen)
            .await
            .with_context(|| format!("binding {}", config.server.metrics_listen))?;
        let routes = paddock_server::execution_routes(
            paddock_server::cache_routes(&storage, limits, true),
            &storage,
            &scheduler,
        );
        Ok(Farm {
            listener,
            metrics_listener,
            routes,
            scheduler,
        })
    }

    fn url(&self) -> String {
        format!(
            "grpc://{}",
            self.listener
                .local_addr()
                .expect("a bound listener has an address")
        )
    }

    /// Serves until `shutdown`, then stops `local_workers` and ends the scheduler's
    /// long-lived streams so that the graceful drain has only short calls to wait for.
    async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        local_workers: CancellationToken,
    ) -> Result<()> {
        let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
        let metrics = tokio::spawn(paddock_telemetry::serve_metrics(
            self.metrics_listener,
            async move {
                let _ = metrics_stopped.await;
            },
        ));
        let timers = tokio::spawn(self.scheduler.clone().run());
        let scheduler = self.scheduler;
        let shutdown = async move {
            shutdown.await;
            // Long-lived streams (workers, clients waiting on actions) would hold up a
            // graceful shutdown: end them first, and keep local workers from reconnecting.
            local_workers.cancel();
            scheduler.shutdown();
        };
        let served = paddock_server::serve(self.listener, self.routes, shutdown).await;
        timers.abort();
        let _ = stop_metrics.send(());
        let _ = metrics.await;
        served.context("serving gRPC")
    }
}

/// The options of a worker as the configuration describes it; `data_dir` holds its
/// files unless `work_dir` is set. Prepares the container runner (its root templates
/// and cgroups) unless the configuration asks for the host runner.
pub async fn worker_options(
    config: &WorkerConfig,
    scheduler: String,
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
    let farm = Farm::build(&config, data_dir.clone()).await?;
    // These two lines are the interface for scripts and tests: keep their form.
    println!("paddock: serving REAPI on {}", farm.url());
    println!(
        "paddock: metrics on http://{}/metrics",
        farm.metrics_listener.local_addr()?
    );
    tracing::info!(data_dir = %data_dir.display(), backend = ?config.storage.backend, "paddock is up");
    let stop_workers = CancellationToken::new();
    let mut workers = Vec::new();
    let host = paddock_worker::host_name();
    for i in 0..config.server.local_workers {
        let mut worker_config = config.worker.clone();
        worker_config.work_dir = None;
        let options = worker_options(
            &worker_config,
            farm.url(),
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
        Embedded::start_with(Default::default(), worker_config, faults, zygote).await
    }

    /// A farm with this scheduler configuration and one worker per entry of
    /// `faults` (which a benchmark may give faults, e.g. a delay).
    pub async fn start_with(
        scheduler: paddock_config::SchedulerConfig,
        worker_config: &WorkerConfig,
        faults: Vec<paddock_worker::Faults>,
        zygote: Option<&Zygote>,
    ) -> Result<Embedded> {
        let data_dir = tempfile::tempdir()?;
        let mut config = Config {
            scheduler,
            ..Config::default()
        };
        config.server.listen = "127.0.0.1:0".parse()?;
        config.server.metrics_listen = "127.0.0.1:0".parse()?;
        let farm = Farm::build(&config, data_dir.path().to_owned()).await?;
        let url = farm.url();
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
                url.clone(),
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
            stop: Some(stop),
            stop_workers,
            _data_dir: data_dir,
        })
    }

    pub fn url(&self) -> String {
        self.url.clone()
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
