//! The `paddock` command: the farm (`up`, `server`), small REAPI clients (`cas`) and
//! the benchmarks (`bench`).

mod farm;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use paddock_client::bench::{self, CasBenchOptions};
use paddock_client::Remote;
use paddock_config::{Config, StorageBackend};
use paddock_reapi::Digest;

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
    /// Run the server's services without local workers.
    Server(ServerArgs),
    /// Put blobs into a CAS and get them out again.
    Cas {
        #[command(subcommand)]
        command: CasCommand,
    },
    /// Measure a REAPI server (Paddock's own, or any other with --remote).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// How many local workers to start (execution arrives with the scheduler).
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

#[derive(Args, Clone)]
struct ServerArgs {
    /// A TOML configuration file; flags override what it says.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The gRPC address to serve every REAPI service on; port 0 picks a free port.
    #[arg(long)]
    listen: Option<SocketAddr>,
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
    /// The REAPI server to talk to.
    #[arg(long, default_value = "grpc://127.0.0.1:8980")]
    remote: String,
    /// The instance name to use on it.
    #[arg(long, default_value = "")]
    instance: String,
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
enum BenchCommand {
    /// ByteStream throughput, BatchUpdateBlobs and FindMissingBlobs rates, and
    /// GetActionResult latency.
    Cas {
        /// Measure this server instead of a fresh embedded Paddock.
        #[arg(long)]
        remote: Option<String>,
        #[arg(long, default_value = "")]
        instance: String,
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
}

fn parse_digest(text: &str) -> Result<Digest> {
    let (hash, size) = text
        .split_once('/')
        .context("a digest is written hash/size")?;
    Ok(Digest::parse_parts(hash, size)?)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    paddock_telemetry::init_logging(cli.log_json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Up(args) => {
            if args.workers > 0 {
                tracing::info!(
                    workers = args.workers,
                    "local workers arrive with the execution service; serving storage only"
                );
            }
            farm::run(args.server.config()?).await
        }
        Command::Server(args) => farm::run(args.config()?).await,
        Command::Cas { command } => cas(command).await,
        Command::Bench { command } => match command {
            BenchCommand::Cas {
                remote,
                instance,
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
                let (url, _embedded) = match remote {
                    Some(url) => (url, None),
                    None => {
                        let embedded = farm::Embedded::start().await?;
                        (embedded.url(), Some(embedded))
                    }
                };
                let remote = Remote::connect(&url, &instance).await?;
                let mut report = bench::cas(&remote, options).await?;
                report.target = url;
                println!("{report}");
                Ok(())
            }
        },
    }
}

async fn cas(command: CasCommand) -> Result<()> {
    match command {
        CasCommand::Put { remote, files } => {
            let client = Remote::connect(&remote.remote, &remote.instance).await?;
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
            let digest = parse_digest(&digest)?;
            let client = Remote::connect(&remote.remote, &remote.instance).await?;
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
