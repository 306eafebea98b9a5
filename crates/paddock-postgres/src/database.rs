//! The connection pool, the schema's migrations, and the watch on the database.

use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use paddock_config::StateConfig;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::NoTls;

use crate::PgActionCache;

/// The schema's migrations, in order; the schema's version is how many have run.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_action_cache_and_workers.sql"),
    include_str!("migrations/0002_shared_queue.sql"),
    include_str!("migrations/0003_cas_index.sql"),
    include_str!("migrations/0004_history.sql"),
    include_str!("migrations/0005_cas_admitted.sql"),
    include_str!("migrations/0006_cas_unlisted.sql"),
];

/// Taken while migrating, so that servers starting together migrate once.
const MIGRATION_LOCK: i64 = 0x7061_6464_6f63_6b31; // "paddock1"

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("state.url: {0}")]
    Url(String),
    #[error("state.password_file {path}: {error}")]
    Password {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("state.tls_ca_file: {0}")]
    Tls(String),
    #[error("could not reach the database within state.connect_timeout ({waited:?}): {error}")]
    Unreachable { waited: Duration, error: String },
    #[error(
        "the database's schema is at version {found}, newer than this Paddock's {supported}: \
         upgrade this server to the version the others run"
    )]
    NewerSchema { found: i32, supported: usize },
    #[error("the database: {0}")]
    Query(String),
}

/// A pool of connections to the database, its schema brought up to date.
#[derive(Clone)]
pub struct Database {
    pool: Pool,
    /// For connections of their own (listening for notifications).
    pg: tokio_postgres::Config,
    tls: Option<std::sync::Arc<tokio_rustls::rustls::ClientConfig>>,
    describe: String,
    /// How long this side waits for any one statement: the server's
    /// `statement_timeout` and a margin, for a database that does not answer at all.
    deadline: Duration,
}

impl Database {
    /// Connects (retrying with back-off for `connect_timeout`) and migrates.
    pub async fn connect(config: &StateConfig) -> Result<Database, DatabaseError> {
        let url = config
            .url
            .as_deref()
            .ok_or_else(|| DatabaseError::Url("missing".into()))?;
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| DatabaseError::Url(e.to_string()))?;
        if let Some(path) = &config.password_file {
            let password =
                std::fs::read_to_string(path).map_err(|error| DatabaseError::Password {
                    path: path.clone(),
                    error,
                })?;
            pg.password(password.trim_end_matches(['\n', '\r']));
        }
        let statement_timeout = config.statement_timeout.get();
        // A database that vanishes from the network without a word is noticed within
        // seconds rather than TCP's quarter of an hour.
        pg.application_name("paddock")
            .connect_timeout(Duration::from_secs(5))
            .keepalives_idle(Duration::from_secs(10))
            .tcp_user_timeout(statement_timeout + Duration::from_secs(5))
            .options(format!(
                "-c statement_timeout={}",
                statement_timeout.as_millis()
            ));
        let describe = describe(&pg);
        let recycling = || ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let tls = match (&config.tls_ca_file, pg.get_ssl_mode()) {
            (Some(ca), _) => Some(Some(ca.as_path())),
            (None, SslMode::Require) => Some(None),
            (None, _) => None,
        };
        let tls = match tls {
            Some(ca) => {
                pg.ssl_mode(SslMode::Require);
                Some(paddock_tls::client_config(ca).map_err(DatabaseError::Tls)?)
            }
            None => {
                if !local(&pg) {
                    tracing::warn!(database = %describe, "the database's traffic crosses the network unencrypted: set state.tls_ca_file, or sslmode=require in state.url");
                }
                None
            }
        };
        let manager = match &tls {
            Some(roots) => Manager::from_config(
                pg.clone(),
                crate::tls::Rustls::new(roots.clone()),
                recycling(),
            ),
            None => Manager::from_config(pg.clone(), NoTls, recycling()),
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(statement_timeout))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| DatabaseError::Url(e.to_string()))?;
        let database = Database {
            pool,
            pg,
            tls,
            describe,
            deadline: statement_timeout + Duration::from_secs(2),
        };
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match database.migrate().await {
                Ok(version) => {
                    tracing::info!(database = %database.describe, version, "the database's schema is up to date");
                    return Ok(database);
                }
                Err(DatabaseError::Query(error)) => {
                    let waited = started.elapsed();
                    if waited >= config.connect_timeout.get() {
                        return Err(DatabaseError::Unreachable { waited, error });
                    }
                    tracing::warn!(database = %database.describe, %error, "waiting for the database");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(other) => return Err(other),
            }
        }
    }

    /// Applies the migrations this database lacks; returns the schema's version.
    async fn migrate(&self) -> Result<usize, DatabaseError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(query)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(query)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS paddock_schema (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(query)?;
        let found: i32 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM paddock_schema", &[])
            .await
            .map_err(query)?
            .get(0);
        if found as usize > MIGRATIONS.len() {
            return Err(DatabaseError::NewerSchema {
                found,
                supported: MIGRATIONS.len(),
            });
        }
        for (done, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            tx.batch_execute(migration).await.map_err(query)?;
            tx.execute(
                "INSERT INTO paddock_schema (version) VALUES ($1)",
                &[&(done as i32 + 1)],
            )
            .await
            .map_err(query)?;
        }
        tx.commit().await.map_err(query)?;
        Ok(MIGRATIONS.len())
    }

    /// A connection from the pool.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, DatabaseError> {
        self.pool
            .get()
            .await
            .map_err(|e| DatabaseError::Query(with_causes(&e)))
    }

    /// Waits for a statement at most the deadline.
    pub(crate) async fn timed<T>(
        &self,
        statement: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, DatabaseError> {
        match tokio::time::timeout(self.deadline, statement).await {
            Ok(done) => done.map_err(query),
            Err(_) => Err(DatabaseError::Query(format!(
                "no answer within {:?}",
                self.deadline
            ))),
        }
    }

    /// Runs `sql`, prepared once per connection (and cached there), with `params`.
    pub(crate) async fn query(
        &self,
        client: &deadpool_postgres::Object,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, DatabaseError> {
        let statement = self.timed(client.prepare_cached(sql)).await?;
        self.timed(client.query(&statement, params)).await
    }

    /// As [`Database::query`], on a connection from the pool.
    pub(crate) async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, DatabaseError> {
        let client = self.client().await?;
        self.query(&client, sql, params).await
    }

    /// As [`Database::query`], for a statement whose rows are not wanted: how
    /// many it changed.
    pub(crate) async fn execute(
        &self,
        client: &deadpool_postgres::Object,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, DatabaseError> {
        let statement = self.timed(client.prepare_cached(sql)).await?;
        self.timed(client.execute(&statement, params)).await
    }

    /// Listens on `channels` over a connection of its own, made again (after a
    /// pause) whenever it breaks, until `sink` is closed. Each notification goes to
    /// `sink` as its channel and payload; `None` after each new connection, since
    /// notifications sent while none was listening are lost.
    pub(crate) async fn listen(
        &self,
        channels: &[&str],
        sink: tokio::sync::mpsc::UnboundedSender<Option<(String, String)>>,
    ) {
        let mut pause = Duration::from_millis(100);
        while !sink.is_closed() {
            let ended = match &self.tls {
                Some(roots) => match self
                    .pg
                    .connect(crate::tls::Rustls::new(roots.clone()))
                    .await
                {
                    Ok((client, connection)) => forward(client, connection, channels, &sink).await,
                    Err(e) => Err(e),
                },
                None => match self.pg.connect(NoTls).await {
                    Ok((client, connection)) => forward(client, connection, channels, &sink).await,
                    Err(e) => Err(e),
                },
            };
            match ended {
                Ok(()) => pause = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(database = %self.describe, error = %with_causes(&e), "listening for the database's notifications failed; listening again shortly");
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Where the database is (no password), for logs.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    async fn answers(&self) -> bool {
        match self.client().await {
            Ok(client) => self.timed(client.simple_query("SELECT 1")).await.is_ok(),
            Err(_) => false,
        }
    }
}

/// Passes one connection's notifications on until it ends.
async fn forward<S, T>(
    client: tokio_postgres::Client,
    mut connection: tokio_postgres::Connection<S, T>,
    channels: &[&str],
    sink: &tokio::sync::mpsc::UnboundedSender<Option<(String, String)>>,
) -> Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (messages, mut received) = tokio::sync::mpsc::unbounded_channel();
    // The connection does its work (the LISTEN statements too) only while polled.
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if messages
                        .send((n.channel().to_owned(), n.payload().to_owned()))
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    });
    for channel in channels {
        client.batch_execute(&format!("LISTEN {channel}")).await?;
    }
    let _ = sink.send(None);
    while let Some(notification) = received.recv().await {
        if sink.send(Some(notification)).is_err() {
            break;
        }
    }
    drop(client);
    driver.await.unwrap_or(Ok(()))
}

pub(crate) fn query(e: tokio_postgres::Error) -> DatabaseError {
    DatabaseError::Query(with_causes(&e))
}

/// An error and what caused it: tokio-postgres says only "db error" and keeps the
/// database's own message (or the TLS failure) as the cause.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = e.source();
    }
    text
}

/// Whether every host the configuration names is this machine (a Unix socket or
/// loopback), where traffic in the clear stays on the machine.
fn local(pg: &tokio_postgres::Config) -> bool {
    pg.get_hosts().iter().all(|host| match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    })
}

fn describe(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgresql://{}@{host}:{port}/{}",
        pg.get_user().unwrap_or(""),
        pg.get_dbname().unwrap_or("")
    )
}

/// Watches the database (every second: `paddock_database_up`, and a log line when it
/// goes away or comes back) and keeps the ActionCache within its bound (at start-up,
/// then every minute), until the process ends.
pub async fn maintain(database: Database, action_cache: PgActionCache) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut up = true;
    let mut trimmed: Option<Instant> = None;
    loop {
        tick.tick().await;
        let answers = database.answers().await;
        metrics::gauge!("paddock_database_up").set(f64::from(u8::from(answers)));
        if answers != up {
            match answers {
                true => tracing::warn!(database = %database.describe, "the database answers again"),
                false => {
                    tracing::error!(database = %database.describe, "the database does not answer: calls that need it fail with UNAVAILABLE until it does")
                }
            }
            up = answers;
        }
        if answers && trimmed.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            trimmed = Some(Instant::now());
            if let Err(e) = action_cache.trim().await {
                tracing::warn!(error = %e, "could not trim the ActionCache");
            }
        }
    }
}
