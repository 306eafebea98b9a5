//! Starting the farm: storage, the gRPC services and the metrics endpoint, wired
//! together from one configuration.

use std::future::Future;
use std::path::PathBuf;

use anyhow::{Context, Result};
use paddock_config::Config;
use paddock_server::{Limits, Storage};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The services, bound and ready to serve.
struct Farm {
    listener: TcpListener,
    metrics_listener: TcpListener,
    routes: tonic::service::Routes,
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
        let storage = Storage { cas, action_cache };
        let limits = Limits {
            max_batch_size: config.storage.max_batch_size.bytes(),
        };
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("binding {}", config.server.listen))?;
        let metrics_listener = TcpListener::bind(config.server.metrics_listen)
            .await
            .with_context(|| format!("binding {}", config.server.metrics_listen))?;
        Ok(Farm {
            listener,
            metrics_listener,
            routes: paddock_server::cache_routes(&storage, limits, false),
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

    async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
        let metrics = tokio::spawn(paddock_telemetry::serve_metrics(
            self.metrics_listener,
            async move {
                let _ = metrics_stopped.await;
            },
        ));
        let served = paddock_server::serve(self.listener, self.routes, shutdown).await;
        let _ = stop_metrics.send(());
        let _ = metrics.await;
        served.context("serving gRPC")
    }
}

/// Runs the farm in the foreground until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<()> {
    let data_dir = config
        .server
        .data_dir
        .clone()
        .unwrap_or_else(paddock_config::default_data_dir);
    paddock_telemetry::metrics();
    let farm = Farm::build(&config, data_dir.clone()).await?;
    // These two lines are the interface for scripts and tests: keep their form.
    println!("paddock: serving REAPI on {}", farm.url());
    println!(
        "paddock: metrics on http://{}/metrics",
        farm.metrics_listener.local_addr()?
    );
    tracing::info!(data_dir = %data_dir.display(), backend = ?config.storage.backend, "paddock is up");
    farm.serve(shutdown_signal()).await?;
    tracing::info!("paddock stopped");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
}

/// A farm on a free loopback port with a throw-away data directory, for benchmarks.
pub struct Embedded {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    _data_dir: tempfile::TempDir,
}

impl Embedded {
    pub async fn start() -> Result<Embedded> {
        let data_dir = tempfile::tempdir()?;
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".parse()?;
        config.server.metrics_listen = "127.0.0.1:0".parse()?;
        let farm = Farm::build(&config, data_dir.path().to_owned()).await?;
        let url = farm.url();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(farm.serve(async move {
            let _ = stopped.await;
        }));
        Ok(Embedded {
            url,
            stop: Some(stop),
            _data_dir: data_dir,
        })
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
