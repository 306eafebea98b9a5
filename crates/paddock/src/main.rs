//! The `paddock` command: the farm (`up`, `server`), small REAPI clients (`cas`) and
//! the benchmarks (`bench`).

mod bench_scheduler;
mod bench_web;
mod farm;
mod operate;
mod stragglers;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use paddock_client::bench::{self, CasBenchOptions};
use paddock_client::exec::ExecSpec;
use paddock_client::{Credentials, Remote};
use paddock_config::{Config, RunnerKind, StorageBackend, WorkerConfig};
use paddock_reapi::Digest;
use paddock_sandbox::Zygote;

#[derive(Parser)]
#[command(
    name = "paddock",
    version,
    about = "A remote build execution farm that speaks REAPI v2"
)]
struct Cli {
    /// Log JSON lines instead of text (the level comes from RUST_LOG; default info).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the all-in-one farm in the foreground, with embedded storage.
    Up(UpArgs),
    /// Run the server's services (storage and the scheduler) without local workers.
    Server(ServerArgs),
    /// Run a worker that takes actions from a scheduler.
    Worker(WorkerArgs),
    /// Run one command on the farm: upload its inputs, wait, fetch its outputs, and
    /// exit with its exit code.
    Exec(ExecArgs),
    /// Put blobs into a CAS and get them out again.
    Cas {
        #[command(subcommand)]
        command: CasCommand,
    },
    /// Check configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The fleet's workers: their standing and health; drain, quarantine, release.
    Workers {
        #[command(subcommand)]
        command: operate::WorkersCommand,
    },
    /// Operate on the ActionCache: invalidate entries.
    Cache {
        #[command(subcommand)]
        command: operate::CacheCommand,
    },
    /// Helpers for Nix-hermetic platforms.
    Nix {
        #[command(subcommand)]
        command: NixCommand,
    },
    /// Measure a REAPI server (Paddock's own, or any other with --remote).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

impl UpArgs {
    fn config(&self) -> Result<Config> {
        let mut config = self.server.config()?;
        if let Some(workers) = self.workers {
            config.server.local_workers = workers;
        }
        if let Some(runner) = self.runner {
            config.worker.runner = runner;
        }
        Ok(config)
    }
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// How many workers to run in this process (default 1).
    #[arg(long)]
    workers: Option<usize>,
    /// How local workers run actions: `container` (default) or `host`.
    #[arg(long)]
    runner: Option<RunnerKind>,
}

#[derive(Args)]
struct WorkerArgs {
    /// A TOML configuration file (its [worker] section); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The scheduler to take work from: its worker address (`grpc://HOST:PORT`, or
    /// `grpcs://HOST:PORT` with TLS), which the server prints at start-up; several,
    /// separated by commas, for servers that share a database (the worker moves to
    /// the next when its server is gone).
    #[arg(long)]
    scheduler: Option<String>,
    #[command(flatten)]
    credentials: CredentialArgs,
    /// The worker's name in the fleet (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Where the worker keeps its cache and action directories.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// How many actions to run at once (default: the number of CPUs).
    #[arg(long)]
    capacity: Option<usize>,
    /// A platform property to offer, `NAME=VALUE`; repeat for more.
    #[arg(long = "property", value_parser = parse_pair)]
    properties: Vec<(String, String)>,
    /// How to run actions: `container` (default) or `host` (no isolation).
    #[arg(long)]
    runner: Option<RunnerKind>,
    /// FOR TESTING THE FARM ONLY: make this worker misbehave on purpose, e.g.
    /// `corrupt-outputs=1` (see RELIABILITY.md). Never on a production fleet.
    #[arg(long, hide = true, value_name = "SPEC")]
    dangerous_fault_injection: Option<paddock_worker::Faults>,
}

#[derive(Args)]
struct ExecArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// A platform property the action requires, `NAME=VALUE`; repeat for more.
    #[arg(long = "platform", value_parser = parse_pair)]
    platform: Vec<(String, String)>,
    /// An environment variable, `NAME=VALUE`; the command gets nothing else.
    #[arg(long = "env", value_parser = parse_pair)]
    environment: Vec<(String, String)>,
    /// The directory uploaded as the input root.
    #[arg(long)]
    input: Option<PathBuf>,
    /// The working directory, relative to the input root.
    #[arg(long, default_value = "")]
    working_directory: String,
    /// An output to fetch (file or directory, relative to the working directory).
    #[arg(long = "output")]
    outputs: Vec<String>,
    /// Where fetched outputs go.
    #[arg(long, default_value = ".")]
    output_dir: PathBuf,
    /// The action's timeout in seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Run even if the ActionCache has a result.
    #[arg(long)]
    skip_cache: bool,
    /// Never cache the result.
    #[arg(long)]
    no_cache: bool,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

impl WorkerArgs {
    /// The configuration file's [worker] section (or the defaults) with the flags applied.
    fn config(&self) -> Result<WorkerConfig> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?.worker,
            None => WorkerConfig::default(),
        };
        if let Some(url) = &self.scheduler {
            config.scheduler = url.clone();
        }
        self.credentials.apply(&mut config.credentials);
        if let Some(dir) = &self.work_dir {
            config.work_dir = Some(dir.clone());
        }
        if let Some(capacity) = self.capacity {
            config.capacity = Some(capacity);
        }
        if let Some(runner) = self.runner {
            config.runner = runner;
        }
        for (name, value) in &self.properties {
            let mut values = config
                .properties
                .remove(name)
                .map(|v| v.values())
                .unwrap_or_default();
            values.push(value.clone());
            config
                .properties
                .insert(name.clone(), paddock_config::PropertyValues::Many(values));
        }
        Ok(config)
    }
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    if name.is_empty() {
        return Err(format!("{text:?} has an empty name"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

#[derive(Args, Clone)]
struct ServerArgs {
    /// A TOML configuration file; flags override what it says.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The gRPC address to serve every REAPI service on; port 0 picks a free port.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The gRPC address workers connect to (default: --listen's port plus two).
    #[arg(long)]
    worker_listen: Option<SocketAddr>,
    /// Serve callers without credentials even on an address that is not loopback:
    /// anyone who reaches it may do anything. Only on a network that is itself trusted.
    #[arg(long)]
    insecure_allow_anonymous: bool,
    /// The HTTP address of the Prometheus /metrics endpoint; port 0 picks a free port.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Where storage lives (default: $XDG_DATA_HOME/paddock).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep everything in memory instead of on disk.
    #[arg(long)]
    in_memory: bool,
}

impl ServerArgs {
    /// The configuration file (or the defaults) with these flags applied on top.
    fn config(&self) -> Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(listen) = self.listen {
            config.server.listen = listen;
        }
        if let Some(listen) = self.worker_listen {
            config.server.worker_listen = Some(listen);
        }
        if self.insecure_allow_anonymous {
            config.auth.allow_anonymous = true;
        }
        if let Some(listen) = self.metrics_listen {
            config.server.metrics_listen = listen;
        }
        if let Some(dir) = &self.data_dir {
            config.server.data_dir = Some(dir.clone());
        }
        if self.in_memory {
            config.storage.backend = StorageBackend::Memory;
        }
        Ok(config)
    }
}

#[derive(Args)]
struct RemoteArgs {
    /// The REAPI server to talk to (`grpcs://` for TLS).
    #[arg(long, default_value = "grpc://127.0.0.1:8980")]
    remote: String,
    /// The instance name to use on it.
    #[arg(long, default_value = "")]
    instance: String,
    #[command(flatten)]
    credentials: CredentialArgs,
}

impl RemoteArgs {
    async fn connect(&self) -> Result<Remote> {
        let credentials = self.credentials.load()?;
        Ok(Remote::connect_with(&self.remote, &self.instance, &credentials).await?)
    }
}

/// How a client checks the server and proves who it is.
#[derive(Args, Clone, Default)]
pub struct CredentialArgs {
    /// The CA that signed the server's certificate (for grpcs://; default: the
    /// system's roots).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// A client certificate (PEM), for servers that identify clients by certificate.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A file holding a bearer token (or set PADDOCK_TOKEN).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl CredentialArgs {
    /// The credentials these flags (or PADDOCK_TOKEN) give.
    pub fn load(&self) -> Result<Credentials> {
        Ok(Credentials::from_files(
            self.tls_ca.clone(),
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.token_file.as_deref(),
            std::env::var("PADDOCK_TOKEN").ok(),
        )?)
    }

    /// Puts these flags over a worker's configured credentials.
    fn apply(&self, config: &mut paddock_config::ClientCredentials) {
        let replace = |field: &mut Option<PathBuf>, flag: &Option<PathBuf>| {
            if flag.is_some() {
                field.clone_from(flag);
            }
        };
        replace(&mut config.tls_ca_file, &self.tls_ca);
        replace(&mut config.tls_cert_file, &self.tls_cert);
        replace(&mut config.tls_key_file, &self.tls_key);
        replace(&mut config.token_file, &self.token_file);
    }
}

#[derive(Subcommand)]
enum CasCommand {
    /// Upload files and print their digests (`hash/size`).
    Put {
        #[command(flatten)]
        remote: RemoteArgs,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Download a blob by digest (`hash/size`) to a file or standard output.
    Get {
        #[command(flatten)]
        remote: RemoteArgs,
        digest: String,
        /// Write here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate configuration files (TOML, or JSON for *.json): unknown keys, wrong
    /// types and values that make no sense are errors naming the key (and line).
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum NixCommand {
    /// Print the Bazel exec_properties and flags that run actions in exactly these
    /// store paths (and their closure).
    ExecProperties {
        #[arg(required = true)]
        paths: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// ByteStream throughput, BatchUpdateBlobs and FindMissingBlobs rates, and
    /// GetActionResult latency.
    Cas {
        /// Measure this server instead of a fresh embedded Paddock.
        #[arg(long)]
        remote: Option<String>,
        /// With --remote: read, look up and get results through this server
        /// instead (another replica sharing the storage), to measure one that did
        /// not see the writes.
        #[arg(long, requires = "remote")]
        reader: Option<String>,
        #[arg(long, default_value = "")]
        instance: String,
        #[command(flatten)]
        credentials: CredentialArgs,
        /// Size of the streamed blob, in MiB.
        #[arg(long, default_value_t = 100)]
        blob_mib: usize,
        /// How many times the streamed blob is written and read.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// How many small blobs to upload in batches and look up.
        #[arg(long, default_value_t = 10_000)]
        small_blobs: usize,
    },
    /// The cost of a container per action: against fork/exec, the process runner and
    /// `runc run`, with the time broken down by phase. Needs root.
    Sandbox {
        /// Runs of each kind.
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// Also time actions in a warm Nix closure of this many store paths (made
        /// here with nix-store --add; needs Nix and /bin/busybox), against the host root.
        #[arg(long, default_value_t = 0)]
        nix_paths: usize,
        /// Also time actions in this image (`container-image` value, e.g.
        /// docker://127.0.0.1:5000/busybox@sha256:...): pull plus unpack from cold,
        /// and the warm overhead against the host root. The image must have /bin/true.
        #[arg(long)]
        image: Option<String>,
        /// Cold starts of the image to time, each with an empty cache.
        #[arg(long, default_value_t = 3)]
        cold_runs: usize,
        /// The command to run.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Input materialisation: how long a worker takes to lay out trees of many small
    /// files, from an empty cache and from a warm one (a tenth, a half and all of
    /// --files, to show the growth).
    Inputs {
        /// Files in the largest tree.
        #[arg(long, default_value_t = 100_000)]
        files: usize,
        /// Files per directory.
        #[arg(long, default_value_t = 100)]
        per_directory: usize,
        /// How the embedded worker runs actions: `container` (default) or `host`.
        #[arg(long, default_value = "container")]
        runner: RunnerKind,
    },
    /// Dispatch: a deep queue of no-op actions drained by many simulated workers
    /// (in this process, over the real worker protocol); dispatches per second and
    /// the time from a worker's result to its next assignment.
    Scheduler {
        /// Simulated workers.
        #[arg(long, default_value_t = 1_000)]
        workers: usize,
        /// Slots per simulated worker.
        #[arg(long, default_value_t = 1)]
        capacity: usize,
        /// Actions queued before the workers connect.
        #[arg(long, default_value_t = 100_000)]
        actions: usize,
        /// Keep `[state]` in this PostgreSQL database instead of in memory.
        #[arg(long)]
        postgres: Option<String>,
        /// With `--postgres`: servers sharing the database, with the workers and
        /// clients spread over them.
        #[arg(long, default_value_t = 1)]
        replicas: usize,
    },
    /// The web pages of an invocation of many actions: they are recorded through the
    /// public protocol (results uploaded, then looked up with the invocation's
    /// RequestMetadata), then each page is fetched again and again.
    Web {
        /// Actions in the invocation.
        #[arg(long, default_value_t = 10_000)]
        actions: usize,
        /// Fetches of each page.
        #[arg(long, default_value_t = 30)]
        fetches: usize,
    },
    /// A build with one slow worker, with and without speculative execution.
    Stragglers {
        /// Actions in the build, all submitted at once.
        #[arg(long, default_value_t = 60)]
        actions: usize,
        /// Workers of the embedded farm (host runner, 2 slots each).
        #[arg(long, default_value_t = 3)]
        workers: usize,
        /// The extra time the slow worker takes per action.
        #[arg(long, default_value = "10s")]
        delay: paddock_config::Span,
        /// What each action takes on a healthy worker.
        #[arg(long, default_value = "300ms")]
        action_time: paddock_config::Span,
    },
    /// No-op actions end to end: cache-miss and cache-hit latency, throughput with
    /// concurrent clients, and a burst that fills the queue.
    Exec {
        /// Measure this server (it needs workers) instead of a fresh embedded Paddock.
        #[arg(long)]
        remote: Option<String>,
        #[arg(long, default_value = "")]
        instance: String,
        #[command(flatten)]
        credentials: CredentialArgs,
        /// Workers of the embedded farm.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Actions each embedded worker runs at once (default: the number of CPUs).
        #[arg(long)]
        capacity: Option<usize>,
        /// How the embedded workers run actions: `container` (default) or `host`.
        #[arg(long, default_value = "container")]
        runner: RunnerKind,
        /// Sequential cache misses to time.
        #[arg(long, default_value_t = 200)]
        misses: usize,
        /// Actions in the queue-filling burst.
        #[arg(long, default_value_t = 2000)]
        burst: usize,
    },
}

fn main() -> Result<()> {
    // One TLS provider for the whole process: servers, clients and the registry client.
    paddock_tls::install_provider();
    // `paddock cc ...`, `paddock-cc ...` and the compiler masquerade take their
    // arguments raw (they are a compiler's), before anything else starts.
    let arguments: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(invocation) = paddock_cc::invocation(&arguments) {
        std::process::exit(paddock_cc::main(invocation));
    }
    let cli = Cli::parse();
    // Logs go to a copy of stderr: in the containers that this process's zygote
    // forks, fd 2 becomes the action's stderr, and libcontainer logs from inside them.
    // libcgroups warns about every controller this kernel lacks; that is not news.
    let log = std::io::stderr().as_fd().try_clone_to_owned()?;
    paddock_telemetry::init_logging_to(
        cli.log_json,
        "info,libcgroups=error,libcontainer=error",
        std::sync::Mutex::new(std::fs::File::from(log)),
    );
    let zygote = match zygote_socket(&cli.command)? {
        // SAFETY: no runtime or thread has started yet: this process is single-threaded.
        Some(socket) => Some(
            unsafe { Zygote::start(&socket) }
                .with_context(|| format!("starting the sandbox zygote at {}", socket.display()))?,
        ),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli.command, zygote))
}

/// Where the zygote listens, if this command runs containers (it must be forked
/// before the runtime starts, so this is decided up front).
fn zygote_socket(command: &Command) -> Result<Option<PathBuf>> {
    let scratch =
        || std::env::temp_dir().join(format!("paddock-{}/zygote.sock", std::process::id()));
    Ok(match command {
        Command::Up(args) => {
            let config = args.config()?;
            let containers =
                config.worker.runner == RunnerKind::Container && config.server.local_workers > 0;
            containers.then(|| farm::data_dir(&config).join("sandbox/zygote.sock"))
        }
        Command::Worker(args) => {
            let config = args.config()?;
            (config.runner == RunnerKind::Container).then(|| {
                farm::worker_dir(&config, paddock_config::default_data_dir().join("worker"))
                    .join("sandbox/zygote.sock")
            })
        }
        Command::Bench {
            command: BenchCommand::Sandbox { .. },
        } => Some(scratch()),
        Command::Bench {
            command:
                BenchCommand::Exec {
                    remote: None,
                    runner: RunnerKind::Container,
                    ..
                }
                | BenchCommand::Inputs {
                    runner: RunnerKind::Container,
                    ..
                },
        } => Some(scratch()),
        _ => None,
    })
}

async fn run(command: Command, zygote: Option<Zygote>) -> Result<()> {
    match command {
        Command::Up(args) => farm::run(args.config()?, zygote).await,
        Command::Server(args) => {
            let mut config = args.config()?;
            config.server.local_workers = 0;
            farm::run(config, None).await
        }
        Command::Worker(args) => {
            let config = args.config()?;
            let name = args
                .name
                .or_else(|| config.name.clone())
                .unwrap_or_else(paddock_worker::host_name);
            let scheduler = paddock_worker::SchedulerAddress::Urls {
                urls: paddock_config::scheduler_addresses(&config.scheduler),
                credentials: Credentials::from_files(
                    config.credentials.tls_ca_file.clone(),
                    config.credentials.tls_cert_file.clone(),
                    config.credentials.tls_key_file.clone(),
                    config.credentials.token_file.as_deref(),
                    std::env::var("PADDOCK_TOKEN").ok(),
                )?,
            };
            let mut options = farm::worker_options(
                &config,
                scheduler,
                name,
                paddock_config::default_data_dir().join("worker"),
                zygote.as_ref(),
            )
            .await?;
            if let Some(faults) = args.dangerous_fault_injection.filter(|f| f.any()) {
                tracing::error!(worker = %options.name, ?faults, "THIS WORKER INJECTS FAULTS ON PURPOSE: for testing the farm only");
                options.faults = faults;
            }
            farm::run_worker(options).await
        }
        Command::Exec(args) => exec(args).await,
        Command::Cas { command } => cas(command).await,
        Command::Workers { command } => operate::workers(command).await,
        Command::Cache { command } => operate::cache(command).await,
        Command::Config {
            command: ConfigCommand::Check { files },
        } => {
            let mut failed = false;
            for file in &files {
                match Config::load(file) {
                    Ok(_) => println!("{}: ok", file.display()),
                    Err(e) => {
                        eprintln!("{e}");
                        failed = true;
                    }
                }
            }
            if failed {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Nix {
            command: NixCommand::ExecProperties { paths },
        } => {
            print!("{}", nix_exec_properties(&paths)?);
            Ok(())
        }
        Command::Bench { command } => match command {
            BenchCommand::Cas {
                remote,
                reader,
                instance,
                credentials,
                blob_mib,
                rounds,
                small_blobs,
            } => {
                let options = CasBenchOptions {
                    large_blob: blob_mib << 20,
                    rounds,
                    small_blobs,
                    ..CasBenchOptions::default()
                };
                match remote {
                    Some(url) => {
                        let credentials = credentials.load()?;
                        let remote = Remote::connect_with(&url, &instance, &credentials).await?;
                        let reading = match &reader {
                            Some(reader) => {
                                Remote::connect_with(reader, &instance, &credentials).await?
                            }
                            None => remote.clone(),
                        };
                        let mut report = bench::cas(&remote, &reading, options).await?;
                        report.target = match reader {
                            Some(reader) => format!("{url}, read through {reader}"),
                            None => url,
                        };
                        println!("{report}");
                    }
                    None => bench_cas_embedded(options).await?,
                }
                Ok(())
            }
            BenchCommand::Sandbox {
                iterations,
                nix_paths,
                image,
                cold_runs,
                command,
            } => {
                let command = if command.is_empty() {
                    vec!["/bin/true".to_owned()]
                } else {
                    command
                };
                let dir = tempfile::tempdir()?;
                let runner = farm::container_runner(
                    &Default::default(),
                    &format!("bench-{}", std::process::id()),
                    &dir.path().join("worker"),
                    zygote.clone().context("the sandbox zygote did not start")?,
                    Vec::new(),
                )?;
                let scratch = dir.path().join("actions");
                std::fs::create_dir_all(&scratch)?;
                let report = paddock_sandbox::bench::run(&runner, &scratch, iterations, command)
                    .await
                    .map_err(|e| anyhow::anyhow!(e))?;
                println!("{report}");
                if nix_paths > 0 {
                    let zygote = zygote.clone().context("the sandbox zygote did not start")?;
                    bench_nix(
                        &dir.path().join("nix"),
                        nix_paths,
                        iterations,
                        &runner,
                        zygote,
                    )
                    .await?;
                }
                if let Some(image) = image {
                    let zygote = zygote.clone().context("the sandbox zygote did not start")?;
                    bench_image(
                        &dir.path().join("image"),
                        &image,
                        iterations,
                        cold_runs,
                        &runner,
                        zygote,
                    )
                    .await?;
                }
                Ok(())
            }
            BenchCommand::Inputs {
                files,
                per_directory,
                runner,
            } => {
                let worker_config = WorkerConfig {
                    capacity: Some(1),
                    runner,
                    ..Default::default()
                };
                // Each size gets a farm of its own, so that its first run finds an
                // empty worker cache.
                let farms = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
                let options = bench::InputsBenchOptions {
                    files,
                    per_directory,
                };
                let mut report = bench::inputs(options, || {
                    let started = farm::Embedded::start(1, &worker_config, zygote.as_ref());
                    let farms = farms.clone();
                    async move {
                        let embedded = started
                            .await
                            .map_err(|e| paddock_client::ClientError::Protocol(e.to_string()))?;
                        let remote = Remote::connect(&embedded.url(), "").await?;
                        farms.lock().expect("not poisoned").push(embedded);
                        Ok(remote)
                    }
                })
                .await?;
                report.target = format!("an embedded farm, one worker, {runner:?} runner");
                println!("{report}");
                Ok(())
            }
            BenchCommand::Scheduler {
                workers,
                capacity,
                actions,
                postgres,
                replicas,
            } => {
                bench_scheduler::run(bench_scheduler::Options {
                    workers,
                    capacity,
                    actions,
                    postgres,
                    replicas,
                })
                .await
            }
            BenchCommand::Web { actions, fetches } => bench_web::run(actions, fetches).await,
            BenchCommand::Stragglers {
                actions,
                workers,
                delay,
                action_time,
            } => {
                stragglers::run(stragglers::Options {
                    actions,
                    workers,
                    delay: delay.get(),
                    action_time: action_time.get(),
                })
                .await
            }
            BenchCommand::Exec {
                remote,
                instance,
                credentials,
                workers,
                capacity,
                runner,
                misses,
                burst,
            } => {
                let options = bench::ExecBenchOptions {
                    misses,
                    burst,
                    ..Default::default()
                };
                let worker_config = WorkerConfig {
                    capacity,
                    runner,
                    ..Default::default()
                };
                let (url, _embedded) = match remote {
                    Some(url) => (url, None),
                    None => {
                        let embedded =
                            farm::Embedded::start(workers, &worker_config, zygote.as_ref()).await?;
                        (embedded.url(), Some(embedded))
                    }
                };
                let remote = Remote::connect_with(&url, &instance, &credentials.load()?).await?;
                let mut report = bench::exec(&remote, options).await?;
                report.target = match &_embedded {
                    Some(_) => format!("{url} (embedded, {workers} workers, {runner:?} runner)"),
                    None => url,
                };
                println!("{report}");
                Ok(())
            }
        },
    }
}

/// `paddock bench cas` without `--remote`: an embedded farm over plain text, then
/// one over TLS with a bearer token (a self-signed certificate made here), and what
/// TLS with a token costs.
async fn bench_cas_embedded(options: CasBenchOptions) -> Result<()> {
    let plain = farm::Embedded::start(0, &WorkerConfig::default(), None).await?;
    let remote = Remote::connect(&plain.url(), "").await?;
    let mut plain_report = bench::cas(&remote, &remote, options.clone()).await?;
    plain_report.target = format!("{} (embedded, plain text)", plain.url());
    drop((remote, plain));
    println!("{plain_report}");

    let dir = tempfile::tempdir()?;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?
        .self_signed(&key)?;
    let (cert_file, key_file) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::write(&cert_file, cert.pem())?;
    std::fs::write(&key_file, key.serialize_pem())?;
    let token = format!("bench-{:032x}", rand::random::<u128>());
    let token_file = dir.path().join("bench.token");
    std::fs::write(&token_file, &token)?;
    let mut config = Config::default();
    config.server.tls = Some(paddock_config::ServerTlsConfig {
        cert_file: cert_file.clone(),
        key_file,
        client_ca_file: None,
        reload_interval: "5s".parse().map_err(anyhow::Error::msg)?,
    });
    config.auth.tokens = vec![paddock_config::TokenConfig {
        name: "bench".into(),
        token_file: Some(token_file),
        sha256: None,
        permissions: paddock_config::Permission::ALL.to_vec(),
        instances: vec!["*".into()],
    }];
    let secure =
        farm::Embedded::start_with(config, &WorkerConfig::default(), Vec::new(), None).await?;
    let credentials = Credentials {
        tls_ca: Some(cert_file),
        token: Some(token),
        ..Default::default()
    };
    let remote = Remote::connect_with(&secure.url(), "", &credentials).await?;
    let mut tls_report = bench::cas(&remote, &remote, options).await?;
    tls_report.target = format!("{} (embedded, TLS and a bearer token)", secure.url());
    println!("{tls_report}");
    println!("{}", bench::CasComparison::of(&plain_report, &tls_report));
    Ok(())
}

async fn exec(args: ExecArgs) -> Result<()> {
    let remote = args.remote.connect().await?;
    let spec = ExecSpec {
        arguments: args.command,
        environment: args.environment,
        platform: args.platform,
        input: args.input,
        working_directory: args.working_directory,
        output_paths: args.outputs,
        timeout: args.timeout.map(std::time::Duration::from_secs_f64),
        skip_cache_lookup: args.skip_cache,
        do_not_cache: args.no_cache,
        priority: 0,
        invocation: String::new(),
    };
    let response = paddock_client::exec::execute(&remote, &spec).await?;
    let status = response.status.clone().unwrap_or_default();
    if let Some(result) = &response.result {
        use std::io::Write;
        for (raw, digest, mut sink) in [
            (
                &result.stdout_raw,
                &result.stdout_digest,
                Box::new(std::io::stdout()) as Box<dyn Write>,
            ),
            (
                &result.stderr_raw,
                &result.stderr_digest,
                Box::new(std::io::stderr()),
            ),
        ] {
            let data = match (raw.is_empty(), digest) {
                (false, _) => raw.clone(),
                (true, Some(d)) => remote
                    .read_blob(&Digest::from_proto(Some(d))?)
                    .await?
                    .to_vec(),
                (true, None) => Vec::new(),
            };
            sink.write_all(&data)?;
            sink.flush()?;
        }
        paddock_client::tree::download_outputs(&remote, result, &args.output_dir).await?;
    }
    if !response.message.is_empty() {
        eprintln!("paddock: {}", response.message);
    }
    if status.code != 0 {
        eprintln!(
            "paddock: the action failed: {:?}: {}",
            tonic::Code::from_i32(status.code),
            status.message
        );
        std::process::exit(if status.code == tonic::Code::DeadlineExceeded as i32 {
            124
        } else {
            125
        });
    }
    let exit_code = response.result.map(|r| r.exit_code).unwrap_or(0);
    std::process::exit(exit_code);
}

/// Times a no-op in a warm Nix closure of `count` store paths against the same no-op
/// in the host root.
async fn bench_nix(
    dir: &std::path::Path,
    count: usize,
    iterations: usize,
    host: &paddock_sandbox::ContainerRunner,
    zygote: Zygote,
) -> Result<()> {
    use paddock_sandbox::bench::{ms, time_container};
    let add = |path: &std::path::Path| -> Result<String> {
        let out = std::process::Command::new("nix-store")
            .arg("--add")
            .arg(path)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "nix-store --add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    };
    let nonce = std::process::id();
    let busybox_dir = dir.join(format!("bench-busybox-{nonce}"));
    std::fs::create_dir_all(busybox_dir.join("bin"))?;
    std::fs::copy("/bin/busybox", busybox_dir.join("bin/busybox"))
        .context("a static busybox (apt-get install busybox-static)")?;
    std::os::unix::fs::symlink("busybox", busybox_dir.join("bin/true"))?;
    let mut paths = vec![add(&busybox_dir)?];
    for i in 1..count {
        let path = dir.join(format!("bench-path-{nonce}-{i}"));
        std::fs::create_dir_all(&path)?;
        std::fs::write(path.join("data"), format!("{nonce}-{i}"))?;
        paths.push(add(&path)?);
    }
    let mut config = WorkerConfig::default();
    config.nix.substituters = Vec::new();
    let resolver = paddock_nix::NixResolver::new(paddock_nix::NixOptions {
        dir: dir.join("resolver"),
        substituters: Vec::new(),
        trusted_public_keys: Vec::new(),
        allow_builds: false,
        max_closures: 4,
        identities: farm::identities(&config.sandbox),
    })?;
    let runner = farm::container_runner(
        &config.sandbox,
        &format!("bench-nix-{nonce}"),
        &dir.join("worker"),
        zygote,
        vec![std::sync::Arc::new(resolver)],
    )?;
    let scratch = dir.join("actions");
    std::fs::create_dir_all(&scratch)?;
    let platform = vec![("nix-store-paths".to_owned(), paths.join(" "))];
    let in_nix = vec![format!("{}/bin/true", paths[0])];
    // Warm up: the closure is realised and its root prepared once.
    time_container(&runner, &scratch, 1, &in_nix, &platform)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let (nix, phases) = time_container(&runner, &scratch, iterations, &in_nix, &platform)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let (plain, _) = time_container(host, &scratch, iterations, &["/bin/true".to_owned()], &[])
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    println!("Nix platform: a warm closure of {count} store paths, {iterations} runs each");
    println!(
        "  host root            p50 {:>9}  p99 {:>9}",
        ms(plain.p50),
        ms(plain.p99)
    );
    println!(
        "  Nix closure root     p50 {:>9}  p99 {:>9}",
        ms(nix.p50),
        ms(nix.p99)
    );
    println!(
        "  extra per action at p50: {}",
        ms(nix.p50.saturating_sub(plain.p50))
    );
    println!("  where a Nix action's time goes (medians):");
    for (name, micros) in phases {
        println!("    {name:<32} {:>8.2} ms", micros as f64 / 1000.0);
    }
    Ok(())
}

/// `paddock bench sandbox --image`: the first action in an image from an empty
/// cache (pull, verify, unpack, then run), and actions in the warm image against
/// the host root.
async fn bench_image(
    dir: &std::path::Path,
    image: &str,
    iterations: usize,
    cold_runs: usize,
    host: &paddock_sandbox::ContainerRunner,
    zygote: Zygote,
) -> Result<()> {
    use paddock_sandbox::bench::{ms, time_container};
    use std::sync::Arc;
    let config = WorkerConfig::default();
    let platform = vec![("container-image".to_owned(), image.to_owned())];
    let command = vec!["/bin/true".to_owned()];
    let scratch = dir.join("actions");
    std::fs::create_dir_all(&scratch)?;
    let make_runner = |name: &str| -> Result<_> {
        // The benchmark pulls from wherever the operator points it.
        let (registries, layouts) = match image.strip_prefix("docker://") {
            Some(rest) => (
                vec![rest.split('/').next().unwrap_or_default().to_owned()],
                Vec::new(),
            ),
            None => {
                let path = image.trim_start_matches("oci-layout:");
                let dir = path.split('@').next().unwrap_or_default();
                (Vec::new(), vec![std::path::PathBuf::from(dir)])
            }
        };
        let resolver = Arc::new(paddock_oci::OciResolver::new(paddock_oci::OciOptions {
            dir: dir.join(name).join("oci"),
            cache_size: u64::MAX,
            registries: paddock_oci::RegistryOptions {
                allowed: registries.clone(),
                ..Default::default()
            },
            layouts: layouts.clone(),
            limits: Default::default(),
        })?);
        let runner = farm::container_runner(
            &config.sandbox,
            &format!("bench-{name}-{}", std::process::id()),
            &dir.join(name),
            zygote.clone(),
            vec![resolver.clone()],
        )?;
        Ok((resolver, runner))
    };
    let mut cold = Vec::new();
    let mut sizes = (0, 0);
    for i in 0..cold_runs.max(1) {
        let (resolver, runner) = make_runner(&format!("cold-{i}"))?;
        let (figures, _) = time_container(&runner, &scratch, 1, &command, &platform)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        cold.push(figures.p50);
        sizes = resolver.usage();
        drop(runner);
        drop(resolver);
        std::fs::remove_dir_all(dir.join(format!("cold-{i}")))?;
    }
    cold.sort();
    let (resolver, runner) = make_runner("warm")?;
    time_container(&runner, &scratch, 1, &command, &platform)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let (warm, phases) = time_container(&runner, &scratch, iterations, &command, &platform)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let (plain, _) = time_container(host, &scratch, iterations, &command, &[])
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    drop(resolver);
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let first = cold[cold.len() / 2];
    let setup = first.saturating_sub(plain.p50).as_secs_f64() * 1000.0;
    println!("Image platform: {image}");
    println!(
        "  layers: {:.1} MiB pulled, {:.1} MiB unpacked",
        mib(sizes.0),
        mib(sizes.1)
    );
    println!(
        "  first action, empty cache (median of {}): {}; pull and unpack {setup:.1} ms: \
         {:.1} ms per pulled MiB, {:.1} ms per unpacked MiB",
        cold.len(),
        ms(first),
        setup / mib(sizes.0).max(f64::MIN_POSITIVE),
        setup / mib(sizes.1).max(f64::MIN_POSITIVE),
    );
    println!(
        "  host root            p50 {:>9}  p99 {:>9}",
        ms(plain.p50),
        ms(plain.p99)
    );
    println!(
        "  warm image root      p50 {:>9}  p99 {:>9}",
        ms(warm.p50),
        ms(warm.p99)
    );
    println!(
        "  extra per action at p50: {}",
        ms(warm.p50.saturating_sub(plain.p50))
    );
    println!("  where an image action's time goes (medians):");
    for (name, micros) in phases {
        println!("    {name:<32} {:>8.2} ms", micros as f64 / 1000.0);
    }
    Ok(())
}

/// The Bazel configuration for actions that run in exactly `paths`.
fn nix_exec_properties(paths: &[String]) -> Result<String> {
    let listed = paddock_nix::parse_list(&paths.join(" ")).map_err(|e| anyhow::anyhow!(e))?;
    let spaced: Vec<&str> = listed.iter().map(|p| p.as_str()).collect();
    let bins: Vec<String> = spaced.iter().map(|p| format!("{p}/bin")).collect();
    let shell = spaced
        .iter()
        .map(|p| std::path::Path::new(p).join("bin/sh"))
        .find(|sh| sh.exists());
    let mut out = String::new();
    out.push_str(
        "# In a BUILD file: a platform whose actions run in these store paths' closure.\n",
    );
    out.push_str("platform(\n    name = \"nix\",\n    exec_properties = {\n");
    out.push_str("        \"OSFamily\": \"Linux\",\n");
    out.push_str(&format!(
        "        \"nix-store-paths\": \"{}\",\n",
        spaced.join(" ")
    ));
    out.push_str("    },\n)\n\n");
    out.push_str("# Or on the command line (or in .bazelrc):\n");
    out.push_str(&format!(
        "--remote_default_exec_properties=nix-store-paths={}\n",
        spaced.join(",")
    ));
    out.push_str(&format!("--action_env=PATH={}\n", bins.join(":")));
    match shell {
        Some(sh) => out.push_str(&format!("--shell_executable={}\n", sh.display())),
        None => out.push_str(
            "# None of these paths is in the local store with a bin/sh; add one to\n\
             # --shell_executable if genrules should run in this closure.\n",
        ),
    }
    Ok(out)
}

async fn cas(command: CasCommand) -> Result<()> {
    match command {
        CasCommand::Put { remote, files } => {
            let client = remote.connect().await?;
            for file in files {
                let digest = client
                    .upload_file(&file)
                    .await
                    .with_context(|| format!("uploading {}", file.display()))?;
                println!("{digest}  {}", file.display());
            }
            Ok(())
        }
        CasCommand::Get {
            remote,
            digest,
            output,
        } => {
            let digest: Digest = digest.parse()?;
            let client = remote.connect().await?;
            match output {
                Some(path) => client.read_to_file(&digest, &path).await?,
                None => {
                    let data = client.read_blob(&digest).await?;
                    use std::io::Write;
                    std::io::stdout().write_all(&data)?;
                }
            }
            Ok(())
        }
    }
}
