//! Paddock's configuration: the schema of the TOML file that `paddock up`, `server`
//! and `worker` read with `--config`, with the defaults that apply when a key is left
//! out. Unknown keys are errors. Every part of Paddock takes its settings from the
//! structs here, so the file, the flags and the code cannot drift apart.

mod duration;
mod size;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use duration::Span;
pub use size::ByteSize;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub scheduler: SchedulerConfig,
    pub worker: WorkerConfig,
    pub auth: AuthConfig,
    pub state: StateConfig,
    pub history: HistoryConfig,
}

/// What the server remembers of recent builds for its web pages: invocations, the
/// actions each served, and the build events Bazel sent. Kept where `[state]` says
/// (the data directory, or the database); the oldest go first when a bound is reached.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Invocations kept at most.
    pub max_invocations: usize,
    /// Actions recorded per invocation at most; later ones are counted, not kept.
    pub max_actions_per_invocation: usize,
    /// Targets and tests recorded per invocation at most, from build events.
    pub max_targets_per_invocation: usize,
    /// An invocation not heard of for this long is forgotten.
    pub max_age: Span,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_invocations: 500,
            max_actions_per_invocation: 100_000,
            max_targets_per_invocation: 20_000,
            max_age: Span::secs(7 * 24 * 3600),
        }
    }
}

/// Where the scheduler's lasting state (the workers' records) and the ActionCache
/// live: in this process (saved under the data directory), or in a PostgreSQL
/// database that several servers share.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub backend: StateBackend,
    /// The database, as a `postgresql://user@host:port/database` URL (or key=value
    /// pairs); needed for `postgres`. Put the password in `password_file`, not here.
    pub url: Option<String>,
    /// A file holding the database user's password.
    pub password_file: Option<PathBuf>,
    /// The CA certificates (PEM) that signed the database's certificate. With it the
    /// connection must use TLS, and the certificate and host name are checked
    /// against it; without it TLS follows the URL's `sslmode` (`require`: checked
    /// against the system's trusted roots; the default, `prefer`: none).
    pub tls_ca_file: Option<PathBuf>,
    /// Connections each server keeps open at most.
    pub pool_size: usize,
    /// How long start-up keeps trying to reach the database before it gives up.
    pub connect_timeout: Span,
    /// How long one statement may take before it fails (and the call with it).
    pub statement_timeout: Span,
    /// How long a server's claim on an execution holds without being renewed (it
    /// renews every 2 s): when a server dies, what it ran goes back to the queue
    /// this long after.
    pub lease: Span,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: StateBackend::Memory,
            url: None,
            password_file: None,
            tls_ca_file: None,
            pool_size: 16,
            connect_timeout: Span::secs(60),
            statement_timeout: Span::secs(10),
            lease: Span::secs(15),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StateBackend {
    /// This process, with the workers' records saved under the data directory and
    /// the ActionCache in `[storage]`.
    Memory,
    /// A PostgreSQL database shared by every server.
    Postgres,
}

/// Where the server listens and keeps its state.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The gRPC address for every REAPI service.
    pub listen: SocketAddr,
    /// The gRPC address for workers (the worker protocol, and the CAS they read and
    /// write). Unset: the address of `listen` with its port plus two (8982 beside
    /// 8980), or any free port when `listen`'s is 0.
    pub worker_listen: Option<SocketAddr>,
    /// The HTTP address of the Prometheus `/metrics` endpoint.
    pub metrics_listen: SocketAddr,
    /// Where storage (and local workers' files) live; defaults to `$XDG_DATA_HOME/paddock`.
    pub data_dir: Option<PathBuf>,
    /// How many workers `paddock up` starts in its own process.
    pub local_workers: usize,
    /// TLS on every listener; unset, they speak plain text.
    pub tls: Option<ServerTlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8980".parse().expect("valid address"),
            worker_listen: None,
            metrics_listen: "127.0.0.1:8981".parse().expect("valid address"),
            data_dir: None,
            local_workers: 1,
            tls: None,
        }
    }
}

impl ServerConfig {
    /// Where workers connect: `worker_listen`, or derived from `listen`.
    pub fn worker_address(&self) -> SocketAddr {
        self.worker_listen.unwrap_or_else(|| {
            let port = match self.listen.port() {
                0 => 0,
                port => port.saturating_add(2),
            };
            SocketAddr::new(self.listen.ip(), port)
        })
    }
}

/// The server's certificate and key (PEM files, re-read when they change), and the
/// CA whose client certificates identify their holders.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Client certificates signed by this CA identify their holders (mutual TLS);
    /// clients with a token need none.
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for a change.
    #[serde(default = "default_reload_interval")]
    pub reload_interval: Span,
}

fn default_reload_interval() -> Span {
    "5s".parse().expect("a valid duration")
}

/// Who may use the farm, and for what.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Serve callers without credentials, with every permission, on an address that is
    /// not loopback. Off: such a server refuses to start without `tokens`,
    /// `certificates` or `jwt` (a loopback one serves anonymously when none is set).
    pub allow_anonymous: bool,
    pub tokens: Vec<TokenConfig>,
    pub certificates: Vec<CertificateConfig>,
    pub jwt: Option<JwtConfig>,
    pub quotas: QuotaConfig,
}

impl AuthConfig {
    /// Whether any way of telling callers apart is configured.
    pub fn configured(&self) -> bool {
        !self.tokens.is_empty() || !self.certificates.is_empty() || self.jwt.is_some()
    }
}

/// A bearer token (`authorization: Bearer TOKEN`) and what its holder may do.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The identity's name, in logs, quotas and worker names.
    pub name: String,
    /// A file holding the token itself (trailing newline ignored)...
    pub token_file: Option<PathBuf>,
    /// ...or the SHA-256 of the token, in hex, so the file need not hold the secret.
    pub sha256: Option<String>,
    pub permissions: Vec<Permission>,
    /// Instance-name patterns the permissions apply to (`*` matches any text).
    #[serde(default = "every_instance")]
    pub instances: Vec<String>,
}

/// Client certificates (signed by `server.tls.client_ca_file`) and what their holders
/// may do.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// Attributes the certificate's subject must have, e.g. `CN=builder-1` or
    /// `CN=ci,O=Example` (each listed attribute must match; others may be present).
    pub subject: Option<String>,
    /// A subjectAltName the certificate must carry: `DNS:name`, `URI:...` or
    /// `email:...`.
    pub san: Option<String>,
    /// The identity's name; default: the subject's common name.
    pub name: Option<String>,
    pub permissions: Vec<Permission>,
    #[serde(default = "every_instance")]
    pub instances: Vec<String>,
}

/// JSON Web Tokens presented as bearer tokens.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// HS256: the shared secret, in a file.
    pub secret_file: Option<PathBuf>,
    /// RS256, ES256, EdDSA: the issuer's public keys, a JWKS document in a file
    /// (re-read when it changes).
    pub jwks_file: Option<PathBuf>,
    /// The `iss` a token must carry.
    pub issuer: String,
    /// An `aud` a token must carry.
    pub audience: String,
    /// The claim listing the holder's permissions: each `PERMISSION` (on the
    /// instances of `instances_claim`) or `PERMISSION:INSTANCE-PATTERN`.
    #[serde(default = "default_permissions_claim")]
    pub permissions_claim: String,
    /// The claim listing instance-name patterns; absent from a token: every instance.
    #[serde(default = "default_instances_claim")]
    pub instances_claim: String,
    /// The claim naming the holder.
    #[serde(default = "default_name_claim")]
    pub name_claim: String,
}

fn every_instance() -> Vec<String> {
    vec!["*".into()]
}

fn default_permissions_claim() -> String {
    "paddock_permissions".into()
}

fn default_instances_claim() -> String {
    "paddock_instances".into()
}

fn default_name_claim() -> String {
    "sub".into()
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// Read blobs: FindMissingBlobs, BatchReadBlobs, GetTree, ByteStream Read.
    #[serde(rename = "cas.read")]
    CasRead,
    /// Write blobs: BatchUpdateBlobs, ByteStream Write, QueryWriteStatus.
    #[serde(rename = "cas.write")]
    CasWrite,
    /// GetActionResult.
    #[serde(rename = "ac.read")]
    AcRead,
    /// UpdateActionResult (the usual policy: CI writes, developers read).
    #[serde(rename = "ac.write")]
    AcWrite,
    /// Execute, WaitExecution and the Operations API.
    #[serde(rename = "execute")]
    Execute,
    /// The operators' admin API.
    #[serde(rename = "admin")]
    Admin,
    /// Serving as a worker (which reads and writes the CAS for its actions).
    #[serde(rename = "worker")]
    Worker,
}

impl Permission {
    pub const ALL: [Permission; 7] = [
        Permission::CasRead,
        Permission::CasWrite,
        Permission::AcRead,
        Permission::AcWrite,
        Permission::Execute,
        Permission::Admin,
        Permission::Worker,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Permission::CasRead => "cas.read",
            Permission::CasWrite => "cas.write",
            Permission::AcRead => "ac.read",
            Permission::AcWrite => "ac.write",
            Permission::Execute => "execute",
            Permission::Admin => "admin",
            Permission::Worker => "worker",
        }
    }
}

impl std::str::FromStr for Permission {
    type Err = String;

    fn from_str(s: &str) -> Result<Permission, String> {
        Permission::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!("unknown permission {s:?}: use cas.read, cas.write, ac.read, ac.write, execute, admin or worker")
            })
    }
}

/// What one identity may hold at once. Generous by default: they are there so that
/// no one caller can hold the server hostage, not to ration honest builds.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// Executions queued or running (one per Execute call).
    pub max_executions: usize,
    /// Broken uploads kept for resumption, and their bytes.
    pub max_parked_uploads: usize,
    pub max_parked_bytes: ByteSize,
    /// How long a broken upload waits to be resumed.
    pub parked_upload_lifetime: Span,
    /// Bytes of uploads under way (open and parked), which count against the CAS's
    /// bound while they last; never more than half of `storage.max_size`, so that
    /// no one identity's unfinished uploads can evict everything
    /// ([`Config::quotas`]).
    pub max_upload_bytes: ByteSize,
    /// An upload whose client sends nothing for this long is ended (and kept for
    /// resumption): a stalled stream holds no bytes of the store for long.
    pub upload_idle_timeout: Span,
    /// Finished operations kept for WaitExecution and GetOperation.
    pub max_finished_operations: usize,
    /// Worker names bound to the identity at once (a name stays bound while the
    /// scheduler remembers its worker: an hour after it leaves).
    pub max_worker_names: usize,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            max_executions: 100_000,
            max_parked_uploads: 256,
            max_parked_bytes: ByteSize::gib(2),
            parked_upload_lifetime: "1h".parse().expect("a valid duration"),
            max_upload_bytes: ByteSize::gib(4),
            upload_idle_timeout: "1m".parse().expect("a valid duration"),
            max_finished_operations: 100_000,
            max_worker_names: 10_000,
        }
    }
}

/// Which backend holds blobs and action results.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StorageBackend {
    /// Files under the data directory; survives restarts.
    Disk,
    /// Process memory; lost on exit.
    Memory,
    /// An S3-compatible object store (`[storage.s3]`), indexed in the shared state's
    /// PostgreSQL, with a bounded local disk tier in front.
    S3,
}

/// Where the `s3` backend keeps blobs. Credentials never come from here or from
/// clients: they are the process's own, from the first of `AWS_ACCESS_KEY_ID` and
/// `AWS_SECRET_ACCESS_KEY` (with `AWS_SESSION_TOKEN`) in the environment,
/// `credentials_file` (or `AWS_SHARED_CREDENTIALS_FILE`, or `~/.aws/credentials`),
/// a web identity token file, or the instance's metadata service.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// The service's URL; empty for AWS itself. `http://` is allowed (a store on
    /// loopback or a private network), and warned about beyond loopback.
    pub endpoint: Option<String>,
    /// The bucket, which must exist.
    pub bucket: String,
    pub region: String,
    /// A key prefix, so that several farms (or other data) can share a bucket.
    pub prefix: String,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`; what
    /// most self-hosted stores need.
    pub path_style: bool,
    /// Blobs larger than this are uploaded in parts of this size, streamed, never
    /// held whole in memory. S3 takes parts of 5 MiB to 5 GiB.
    pub part_size: ByteSize,
    /// The longest one request to the store may take.
    pub request_timeout: Span,
    /// An AWS shared credentials file (`[profile]` sections of
    /// `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`); the
    /// profile is `AWS_PROFILE`, or `default`.
    pub credentials_file: Option<PathBuf>,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            bucket: String::new(),
            region: "us-east-1".into(),
            prefix: String::new(),
            path_style: false,
            part_size: ByteSize::mib(16),
            request_timeout: Span::secs(300),
            credentials_file: None,
        }
    }
}

/// When the disk CAS re-hashes a blob as it is read. Writes are always hashed.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReadVerification {
    /// Never: trust the disk.
    Never,
    /// On a blob's first read after start-up (and after every restart), which catches
    /// damage done while the server was down at no cost to later reads.
    Once,
    /// On every read.
    Always,
}

/// The CAS and ActionCache.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// The CAS's size bound; least recently used blobs are evicted beyond it.
    pub max_size: ByteSize,
    /// `fsync` each blob and action result before it becomes visible.
    pub fsync: bool,
    /// When reads re-hash blobs, so that on-disk corruption is never served.
    pub verify_reads: ReadVerification,
    /// The in-memory ActionCache's bound, in entries.
    pub action_cache_max_entries: usize,
    /// The most a BatchUpdateBlobs or BatchReadBlobs request may carry in total.
    pub max_batch_size: ByteSize,
    /// The most blobs one batch request may name, whatever their size.
    pub max_batch_blobs: usize,
    /// The most distinct directories a tree may have, wherever the server walks one
    /// (GetTree, the ActionCache's check that a result's outputs are all there, the
    /// check of a worker's result).
    pub max_tree_directories: usize,
    /// The object store, for `backend = "s3"`.
    pub s3: Option<S3Config>,
    /// With `s3`: the bound of each server's local disk tier, which serves hot blobs
    /// and workers' input fetches without a round trip to the object store.
    pub fast_tier_size: ByteSize,
    /// With `s3`: a blob written, read, found by FindMissingBlobs or referenced by a
    /// result read from the ActionCache within this time is never collected, even
    /// past `max_size`. Clients that keep digests without the bytes (Bazel's
    /// `--remote_download_minimal`) rely on it: set their TTL
    /// (`--experimental_remote_cache_ttl`) no longer than this.
    pub blob_lease: Span,
    /// With `s3`: how often one server checks the store against `max_size` and
    /// collects least recently used, unleased blobs.
    pub collect_interval: Span,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Disk,
            max_size: ByteSize::gib(10),
            fsync: true,
            verify_reads: ReadVerification::Once,
            action_cache_max_entries: 1_000_000,
            // 1 MiB under the 4 MiB that gRPC clients accept by default, for framing.
            max_batch_size: ByteSize::mib(3),
            max_batch_blobs: 100_000,
            max_tree_directories: 1_000_000,
            s3: None,
            fast_tier_size: ByteSize::gib(10),
            blob_lease: Span::secs(3 * 3600),
            collect_interval: Span::secs(60),
        }
    }
}

/// How an action's platform property is matched against a worker's.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MatchPolicy {
    /// The worker offers the same value (it may offer several for one key).
    Exact,
    /// The worker offers a number at least as large (sizes may carry units: `8GiB`).
    Minimum,
    /// The key does not constrain where the action runs.
    Ignore,
}

/// Queueing, matching, retries and the life of operations.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// The timeout of actions that set none.
    pub default_timeout: Span,
    /// The longest timeout an action may ask for; longer ones are refused.
    pub max_timeout: Span,
    /// How many workers may lose an action (crash, disconnect) before it fails.
    pub max_attempts: u32,
    /// How often workers send heartbeats.
    pub heartbeat_interval: Span,
    /// A worker silent this long is lost, and its actions run elsewhere.
    pub heartbeat_timeout: Span,
    /// How long an action that no connected worker could ever run waits for one to join.
    pub unsatisfiable_grace: Span,
    /// How long an execution with no client waiting survives, for WaitExecution.
    pub orphan_grace: Span,
    /// How long a finished operation can still be fetched by name.
    pub operation_retention: Span,
    /// Matching policy per platform property name, over the built-in ones
    /// (`cores`, `memory`: minimum; `pids`: ignore; anything else: exact).
    pub property_policies: BTreeMap<String, MatchPolicy>,
    /// Prefer, among the free workers that can run an action, one that has laid out
    /// its inputs lately (workers summarize what they hold in their heartbeats).
    pub locality: bool,
    pub quarantine: QuarantineConfig,
    pub speculation: SpeculationConfig,
    pub autoscaling: AutoscalingConfig,
}

/// The autoscaling signal: how many workers each pool (by the quarantine's
/// `pool_property`) should have, for an autoscaler to follow.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AutoscalingConfig {
    /// A pool is short of workers when more actions wait than this many per slot
    /// (a slot is one unit of a worker's capacity, normally a core).
    pub queued_per_slot: f64,
    /// A worker that has run nothing for this long is idle...
    pub idle_after: Span,
    /// ...and a pool with more than this fraction of its workers idle has too many.
    pub idle_fraction: f64,
    /// Pools reported even with no worker connected, so that an autoscaler can start
    /// one from zero (other pools are those of the workers the scheduler knows).
    pub pools: Vec<String>,
}

impl Default for AutoscalingConfig {
    fn default() -> Self {
        AutoscalingConfig {
            queued_per_slot: 2.0,
            idle_after: Span::secs(300),
            idle_fraction: 0.2,
            pools: Vec::new(),
        }
    }
}

/// Worker health: outcome statistics, quarantine of anomalous workers, probes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineConfig {
    /// Quarantine workers whose failure rate is anomalous against their pool.
    pub enabled: bool,
    /// Workers are compared with the others that share this property's value (those
    /// without it form one pool).
    pub pool_property: String,
    /// The outcomes per worker that the statistics cover (the most recent ones).
    pub window: usize,
    /// Outcomes a worker (and, together, the rest of its pool) needs before it can
    /// be judged.
    pub min_samples: usize,
    /// How unlikely (binomial tail probability) a worker's failure count must be,
    /// given its pool's rate, to count as anomalous.
    pub significance: f64,
    /// How long a quarantined worker waits before it is probed; doubled after each
    /// failed probe, up to 16 times this.
    pub cooldown: Span,
    /// Canary actions, with results known from other workers, a quarantined worker
    /// must all pass to be released.
    pub canaries: usize,
    /// The fraction of successful cacheable results that are run again on a second
    /// worker and compared; a disagreement is settled by a third.
    pub verify_sample_rate: f64,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            enabled: true,
            pool_property: "Pool".into(),
            window: 100,
            min_samples: 8,
            significance: 0.001,
            cooldown: Span::secs(300),
            canaries: 3,
            verify_sample_rate: 0.0,
        }
    }
}

/// Speculative copies of stragglers.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpeculationConfig {
    /// Start a copy of an action that runs far longer than similar ones did.
    pub enabled: bool,
    /// "Far longer": this many times the median time of similar actions...
    pub multiple: f64,
    /// ...and at least this long.
    pub min_runtime: Span,
    /// Similar actions (same mnemonic, program and platform) that must have finished
    /// before their median counts.
    pub min_samples: usize,
    /// At most this fraction of the fleet's capacity (and at least one slot) runs
    /// copies at any time.
    pub max_fraction: f64,
}

impl Default for SpeculationConfig {
    fn default() -> Self {
        SpeculationConfig {
            enabled: false,
            multiple: 3.0,
            min_runtime: Span::secs(10),
            min_samples: 5,
            max_fraction: 0.1,
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            default_timeout: Span::secs(3600),
            max_timeout: Span::secs(4 * 3600),
            max_attempts: 3,
            heartbeat_interval: Span::secs(2),
            heartbeat_timeout: Span::secs(10),
            unsatisfiable_grace: Span::secs(30),
            orphan_grace: Span::secs(10),
            operation_retention: Span::secs(600),
            property_policies: BTreeMap::new(),
            locality: true,
            quarantine: QuarantineConfig::default(),
            speculation: SpeculationConfig::default(),
            autoscaling: AutoscalingConfig::default(),
        }
    }
}

/// One or several values of a worker property.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PropertyValues {
    One(String),
    Many(Vec<String>),
}

impl PropertyValues {
    pub fn values(&self) -> Vec<String> {
        match self {
            PropertyValues::One(v) => vec![v.clone()],
            PropertyValues::Many(v) => v.clone(),
        }
    }
}

/// How a worker runs an action's command.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunnerKind {
    /// Each action in its own container (namespaces, cgroup limits, seccomp).
    Container,
    /// A plain child process of the worker, in its own process group: for machines
    /// where containers cannot run. It isolates nothing.
    Host,
}

impl std::str::FromStr for RunnerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "container" => Ok(RunnerKind::Container),
            "host" => Ok(RunnerKind::Host),
            other => Err(format!(
                "unknown runner {other:?}: use \"container\" or \"host\""
            )),
        }
    }
}

/// How the container runner confines actions.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// The first uid and gid actions run as: each running action has its own pair,
    /// `uid + i` and `gid + i` with `i < identities`.
    pub uid: u32,
    pub gid: u32,
    /// How many uid and gid pairs actions may use: at least the worker's capacity.
    pub identities: u32,
    /// Limits of actions whose platform sets none (`memory`, `pids`, `cores`).
    pub default_memory: ByteSize,
    pub default_pids: u64,
    /// CPU cores' worth of time; unset means no CPU limit.
    pub default_cores: Option<f64>,
    /// The most any action gets, whatever its platform asks.
    pub max_memory: Option<ByteSize>,
    pub max_pids: u64,
    pub max_cores: Option<f64>,
    /// Totals for all of the worker's actions together; memory defaults to 90% of
    /// the machine's.
    pub total_memory: Option<ByteSize>,
    pub total_pids: u64,
    /// Each action's private `/tmp` (a tmpfs, counted against its memory).
    pub tmp_size: ByteSize,
    /// The cgroup under which each worker makes its own.
    pub cgroup_parent: String,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            // Between the ids systems give users and services (below 65536) and
            // those they delegate to containers (100000 and up), and within six
            // digits, which `ar` needs to record an owner.
            uid: 70_000,
            gid: 70_000,
            identities: 1024,
            default_memory: ByteSize::gib(4),
            default_pids: 4096,
            default_cores: None,
            max_memory: None,
            max_pids: 32768,
            max_cores: None,
            total_memory: None,
            total_pids: 65536,
            tmp_size: ByteSize::gib(1),
            cgroup_parent: "/paddock".into(),
        }
    }
}

/// Nix-hermetic platforms (`nix-store-paths`), for container workers.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NixConfig {
    /// Offer Nix platforms: unset means "if `nix-store` is installed".
    pub enabled: Option<bool>,
    /// Binary caches to substitute from; empty keeps Nix's own configuration.
    pub substituters: Vec<String>,
    /// Keys trusted to sign substituted paths; empty keeps Nix's own configuration.
    pub trusted_public_keys: Vec<String>,
    /// Let workers build `.drv` paths instead of only substituting.
    pub allow_builds: bool,
    /// Closures kept prepared (with GC roots) when no action uses them.
    pub max_closures: usize,
}

impl Default for NixConfig {
    fn default() -> Self {
        NixConfig {
            enabled: None,
            substituters: Vec::new(),
            trusted_public_keys: Vec::new(),
            allow_builds: false,
            max_closures: 64,
        }
    }
}

/// Image platforms (`container-image`), for container workers.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OciConfig {
    /// Offer image platforms: unset means "if overlayfs is available".
    pub enabled: Option<bool>,
    /// The bound of the unpacked layer cache; images no action uses go first.
    pub cache_size: ByteSize,
    /// Registries (`HOST[:PORT]`) reached over plain HTTP. Loopback registries
    /// always are, as Docker does.
    pub insecure_registries: Vec<String>,
    /// Registries (`HOST[:PORT]`) workers may pull from. Empty: any registry at a
    /// public address. Registries at loopback, link-local or private addresses are
    /// refused unless listed here.
    pub registries: Vec<String>,
    /// Directories holding OCI layouts that `oci-layout:` images may name; none by
    /// default (a client's path must not reach anything else on the worker).
    pub layouts: Vec<PathBuf>,
    /// Credentials per repository prefix (`HOST[:PORT]/REPOSITORY...`, or
    /// `HOST[:PORT]` for every repository there); anonymous elsewhere. The longest
    /// matching prefix applies.
    pub credentials: BTreeMap<String, RegistryCredentials>,
    /// The most an image's compressed layers may take, each and together.
    pub max_layer_size: ByteSize,
    pub max_image_size: ByteSize,
    /// The most an image may unpack to, and how many entries its layers may hold.
    pub max_unpacked_size: ByteSize,
    pub max_entries: u64,
}

impl Default for OciConfig {
    fn default() -> Self {
        OciConfig {
            enabled: None,
            cache_size: ByteSize::gib(20),
            insecure_registries: Vec::new(),
            registries: Vec::new(),
            layouts: Vec::new(),
            credentials: BTreeMap::new(),
            max_layer_size: ByteSize::gib(8),
            max_image_size: ByteSize::gib(16),
            max_unpacked_size: ByteSize::gib(32),
            max_entries: 1_000_000,
        }
    }
}

/// How a worker signs in to one registry (basic auth, or the registry's token flow
/// started with these credentials). Never taken from an action.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    pub username: String,
    /// The password or token itself; prefer `password_file`, which keeps it out of
    /// configuration files (and out of the Nix store).
    pub password: Option<String>,
    /// A file holding the password or token (trailing newline ignored).
    pub password_file: Option<PathBuf>,
}

/// A worker: what it offers and where it keeps its files.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// The scheduler (and CAS) a `paddock worker` connects to; several, separated by
    /// commas, for servers sharing a database: a worker whose server is gone
    /// connects to the next.
    pub scheduler: String,
    /// The worker's name in the fleet; defaults to the host name.
    pub name: Option<String>,
    /// Where the worker keeps its cache and action directories; defaults to
    /// `{data_dir}/worker`.
    pub work_dir: Option<PathBuf>,
    /// How many actions run at once; defaults to the number of CPUs.
    pub capacity: Option<usize>,
    /// The bound of the worker's local blob cache.
    pub cache_size: ByteSize,
    /// Platform properties offered on top of the detected ones (OSFamily, ISA, cores,
    /// memory).
    pub properties: BTreeMap<String, PropertyValues>,
    pub runner: RunnerKind,
    pub sandbox: SandboxConfig,
    pub nix: NixConfig,
    pub oci: OciConfig,
    pub limits: ActionLimits,
    /// How the worker checks the scheduler and proves who it is.
    pub credentials: ClientCredentials,
}

/// How a client (a worker, `paddock exec`, ...) checks the server and proves who it
/// is: the CA that signed the server's certificate (for `grpcs://`), a client
/// certificate and its key, or a bearer token.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientCredentials {
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// A file holding the bearer token (trailing newline ignored).
    pub token_file: Option<PathBuf>,
}

/// What one action may take on a worker. An action beyond a limit fails with
/// RESOURCE_EXHAUSTED and a message naming it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ActionLimits {
    /// Files, directories and symlinks of an input tree, counted at every place they
    /// appear (a subtree shared by several directories counts in each), checked
    /// before anything is laid out.
    pub max_input_entries: u64,
    /// The sum of the sizes of an input tree's files, counted the same way.
    pub max_input_bytes: ByteSize,
    /// How deeply the directories of an input tree, or of an output directory, nest.
    pub max_tree_depth: u32,
    /// The outputs of one action together: bytes of files, and entries.
    pub max_output_bytes: ByteSize,
    pub max_output_entries: u64,
    /// Each of standard output and standard error.
    pub max_stdout: ByteSize,
    /// Any one file an action writes (`RLIMIT_FSIZE`; container runner).
    pub max_file_size: ByteSize,
    /// What an action may add to the worker's disk, and how many files and
    /// directories it may make there (see ARCHITECTURE.md for how it is kept).
    pub max_disk: ByteSize,
    pub max_disk_entries: u64,
    /// The free space the worker keeps on its file system: below it, the running
    /// action that has written the most is stopped (and tried elsewhere).
    pub min_free_disk: ByteSize,
}

impl Default for ActionLimits {
    fn default() -> Self {
        ActionLimits {
            max_input_entries: 1_000_000,
            max_input_bytes: ByteSize::gib(64),
            max_tree_depth: 256,
            max_output_bytes: ByteSize::gib(32),
            max_output_entries: 1_000_000,
            max_stdout: ByteSize::gib(1),
            max_file_size: ByteSize::gib(16),
            max_disk: ByteSize::gib(64),
            max_disk_entries: 2_000_000,
            min_free_disk: ByteSize::gib(1),
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            scheduler: "grpc://127.0.0.1:8982".into(),
            name: None,
            work_dir: None,
            capacity: None,
            cache_size: ByteSize::gib(10),
            properties: BTreeMap::new(),
            runner: RunnerKind::Container,
            sandbox: SandboxConfig::default(),
            nix: NixConfig::default(),
            oci: OciConfig::default(),
            limits: ActionLimits::default(),
            credentials: ClientCredentials::default(),
        }
    }
}

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Parse { path: PathBuf, error: String },
}

impl Config {
    /// The quotas as they apply: `max_upload_bytes` (and `max_parked_bytes` with it)
    /// at most half the store.
    pub fn quotas(&self) -> QuotaConfig {
        let mut quotas = self.auth.quotas.clone();
        let half = ByteSize(self.storage.max_size.bytes() / 2);
        if quotas.max_upload_bytes.bytes() > half.bytes() {
            quotas.max_upload_bytes = half;
        }
        if quotas.max_parked_bytes.bytes() > quotas.max_upload_bytes.bytes() {
            quotas.max_parked_bytes = quotas.max_upload_bytes;
        }
        quotas
    }

    /// Refuses a server that would listen beyond loopback with no way of telling its
    /// callers apart, unless `auth.allow_anonymous` says that is meant: whoever
    /// reached it could write the ActionCache, run actions and pose as a worker.
    pub fn check_exposure(&self) -> Result<(), String> {
        if self.auth.configured() || self.auth.allow_anonymous {
            return Ok(());
        }
        let mut exposed: Vec<String> = [self.server.listen, self.server.worker_address()]
            .iter()
            .filter(|a| !a.ip().is_loopback())
            .map(|a| a.to_string())
            .collect();
        exposed.dedup();
        if exposed.is_empty() {
            return Ok(());
        }
        Err(format!(
            "refusing to serve {} without authentication: anyone who can reach it could \
             write the ActionCache, run actions and pose as a worker. Configure [auth] \
             (auth.tokens, auth.certificates or auth.jwt; see SECURITY.md), listen on a \
             loopback address, or, if the network itself is trusted, pass \
             --insecure-allow-anonymous (auth.allow_anonymous = true)",
            exposed.join(" and ")
        ))
    }

    /// Reads and validates a configuration file: TOML, or JSON if it ends in `.json`
    /// (the same schema; what tools such as Nix produce most easily).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let parsed = if path.extension().is_some_and(|e| e == "json") {
            Config::parse_json(&text)
        } else {
            Config::parse(&text)
        };
        parsed.map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            error,
        })
    }

    /// Parses configuration JSON; the error names the line and column at fault, or
    /// the key whose value makes no sense.
    pub fn parse_json(text: &str) -> Result<Config, String> {
        let config: Config = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let problems = config.problems();
        if problems.is_empty() {
            return Ok(config);
        }
        let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
        Err(report(lines))
    }

    /// Parses configuration text; the error names the key and line at fault.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        let problems = config.problems();
        if problems.is_empty() {
            return Ok(config);
        }
        let lines: Vec<String> = problems
            .iter()
            .map(|problem| match line_of_key(text, problem.key) {
                Some(line) => format!("line {line}: {problem}"),
                None => problem.to_string(),
            })
            .collect();
        Err(report(lines))
    }

    /// Values that parse but make no sense alone or together.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |failed: bool, key: &'static str, message: &str| {
            if failed {
                problems.push(Problem {
                    key,
                    message: message.to_owned(),
                });
            }
        };
        problem(
            self.state.backend == StateBackend::Postgres && self.state.url.is_none(),
            "state.url",
            "is needed with state.backend = \"postgres\"",
        );
        problem(
            self.history.max_invocations == 0,
            "history.max_invocations",
            "must be at least 1",
        );
        let scaling = &self.scheduler.autoscaling;
        problem(
            !(scaling.queued_per_slot.is_finite() && scaling.queued_per_slot > 0.0),
            "scheduler.autoscaling.queued_per_slot",
            "must be a number above 0",
        );
        problem(
            !(0.0..=1.0).contains(&scaling.idle_fraction),
            "scheduler.autoscaling.idle_fraction",
            "must be between 0 and 1",
        );
        let s3 = self.storage.backend == StorageBackend::S3;
        problem(
            s3 && self.state.backend != StateBackend::Postgres,
            "storage.backend",
            "\"s3\" keeps its index in the shared state: it needs state.backend = \"postgres\"",
        );
        problem(
            s3 && self.storage.s3.as_ref().is_none_or(|s| s.bucket.is_empty()),
            "storage.s3.bucket",
            "is needed with storage.backend = \"s3\"",
        );
        problem(
            self.storage
                .s3
                .as_ref()
                .is_some_and(|s| s.part_size.bytes() < 5 << 20),
            "storage.s3.part_size",
            "must be at least 5 MiB, the smallest part S3 takes",
        );
        problem(
            self.storage.fast_tier_size.bytes() == 0,
            "storage.fast_tier_size",
            "must be more than 0",
        );
        problem(
            self.state.pool_size == 0,
            "state.pool_size",
            "must be at least 1",
        );
        problem(
            self.storage.max_batch_size.bytes() == 0,
            "storage.max_batch_size",
            "must be more than 0",
        );
        problem(
            self.storage.max_size.bytes() == 0,
            "storage.max_size",
            "must be more than 0",
        );
        problem(
            self.scheduler.default_timeout > self.scheduler.max_timeout,
            "scheduler.default_timeout",
            "is longer than scheduler.max_timeout",
        );
        problem(
            self.scheduler.max_attempts == 0,
            "scheduler.max_attempts",
            "must be at least 1",
        );
        problem(
            self.scheduler.heartbeat_interval >= self.scheduler.heartbeat_timeout,
            "scheduler.heartbeat_interval",
            "must be shorter than scheduler.heartbeat_timeout",
        );
        let quarantine = &self.scheduler.quarantine;
        problem(
            quarantine.window == 0 || quarantine.min_samples > quarantine.window,
            "scheduler.quarantine.min_samples",
            "must be at most scheduler.quarantine.window (and the window more than 0)",
        );
        problem(
            !(quarantine.significance > 0.0 && quarantine.significance < 1.0),
            "scheduler.quarantine.significance",
            "must be between 0 and 1",
        );
        problem(
            !(0.0..=1.0).contains(&quarantine.verify_sample_rate),
            "scheduler.quarantine.verify_sample_rate",
            "must be between 0 and 1",
        );
        let speculation = &self.scheduler.speculation;
        problem(
            speculation.multiple.is_nan() || speculation.multiple < 1.0,
            "scheduler.speculation.multiple",
            "must be at least 1",
        );
        problem(
            !(speculation.max_fraction > 0.0 && speculation.max_fraction <= 1.0),
            "scheduler.speculation.max_fraction",
            "must be more than 0 and at most 1",
        );
        if let Err(message) = check_scheduler_address(&self.worker.scheduler) {
            problem(true, "worker.scheduler", &message);
        }
        problem(
            self.worker.capacity == Some(0),
            "worker.capacity",
            "must be at least 1",
        );
        let sandbox = &self.worker.sandbox;
        problem(
            sandbox.identities == 0
                || self
                    .worker
                    .capacity
                    .is_some_and(|c| c > sandbox.identities as usize),
            "worker.sandbox.identities",
            "must be at least 1 and at least worker.capacity (each running action has its own)",
        );
        problem(
            sandbox.uid.checked_add(sandbox.identities).is_none()
                || sandbox.gid.checked_add(sandbox.identities).is_none()
                || sandbox.uid == 0
                || sandbox.gid == 0,
            "worker.sandbox.uid",
            "and gid must be more than 0, with room for worker.sandbox.identities ids after them",
        );
        problem(
            !self.worker.sandbox.cgroup_parent.starts_with('/'),
            "worker.sandbox.cgroup_parent",
            "must be an absolute cgroup path",
        );
        problem(
            self.worker.oci.cache_size.bytes() == 0,
            "worker.oci.cache_size",
            "must be more than 0",
        );
        let credentials = &self.worker.credentials;
        problem(
            credentials.tls_cert_file.is_some() != credentials.tls_key_file.is_some(),
            "worker.credentials.tls_cert_file",
            "and worker.credentials.tls_key_file go together",
        );
        for token in &self.auth.tokens {
            problem(
                token.token_file.is_some() == token.sha256.is_some(),
                "auth.tokens",
                &format!(
                    "{:?} needs exactly one of token_file and sha256",
                    token.name
                ),
            );
            problem(
                token
                    .sha256
                    .as_ref()
                    .is_some_and(|h| h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit())),
                "auth.tokens",
                &format!("{:?}: sha256 must be 64 hexadecimal digits", token.name),
            );
            problem(
                token.name.trim().is_empty(),
                "auth.tokens",
                "every token needs a name",
            );
        }
        for certificate in &self.auth.certificates {
            problem(
                certificate.subject.is_none() && certificate.san.is_none(),
                "auth.certificates",
                "each needs a subject or a san to match",
            );
        }
        problem(
            !self.auth.certificates.is_empty()
                && self
                    .server
                    .tls
                    .as_ref()
                    .is_none_or(|t| t.client_ca_file.is_none()),
            "auth.certificates",
            "need server.tls.client_ca_file, the CA that signs client certificates",
        );
        if let Some(jwt) = &self.auth.jwt {
            problem(
                jwt.secret_file.is_none() && jwt.jwks_file.is_none(),
                "auth.jwt",
                "needs secret_file (HS256) or jwks_file (RS256, ES256, EdDSA)",
            );
        }
        let quotas = &self.auth.quotas;
        problem(
            quotas.max_parked_bytes.bytes() > quotas.max_upload_bytes.bytes(),
            "auth.quotas.max_parked_bytes",
            "must not exceed auth.quotas.max_upload_bytes, which counts parked uploads too",
        );
        problem(
            quotas.upload_idle_timeout.get().is_zero(),
            "auth.quotas.upload_idle_timeout",
            "must be more than 0",
        );
        problem(
            self.server
                .worker_listen
                .is_some_and(|w| w == self.server.listen && w.port() != 0),
            "server.worker_listen",
            "must differ from server.listen",
        );
        for credentials in self.worker.oci.credentials.values() {
            problem(
                credentials.password.is_some() == credentials.password_file.is_some(),
                "worker.oci.credentials",
                "need exactly one of password and password_file per registry",
            );
        }
        problems
    }
}

/// A value that parses but cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted key at fault, e.g. `scheduler.max_attempts`.
    pub key: &'static str,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.key, self.message)
    }
}

/// One problem on one line; several as an indented list.
fn report(mut lines: Vec<String>) -> String {
    match lines.len() {
        1 => lines.remove(0),
        n => format!("{n} problems:\n  {}", lines.join("\n  ")),
    }
}

/// The line on which the dotted `key` is set in the TOML `text`, if it is.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let document = toml::de::DeTable::parse(text).ok()?;
    let mut table = document.get_ref();
    let mut segments = key.split('.').peekable();
    while let Some(segment) = segments.next() {
        let (name, value) = table.get_key_value(segment)?;
        if segments.peek().is_none() {
            let start = name.span().start;
            return Some(text[..start].matches('\n').count() + 1);
        }
        table = match value.get_ref() {
            toml::de::DeValue::Table(inner) => inner,
            _ => return None,
        };
    }
    None
}

/// Workers accept `grpc://HOST:PORT` (or `grpcs://` for TLS, `http://`, `https://`)
/// or a bare `HOST:PORT`.
fn check_scheduler_address(addresses: &str) -> Result<(), String> {
    scheduler_addresses(addresses)
        .iter()
        .try_for_each(|address| check_one_scheduler_address(address))
}

/// The addresses in `worker.scheduler` (one, or several separated by commas).
pub fn scheduler_addresses(addresses: &str) -> Vec<String> {
    addresses
        .split(',')
        .map(str::trim)
        .map(str::to_owned)
        .collect()
}

fn check_one_scheduler_address(address: &str) -> Result<(), String> {
    let rest = ["grpc://", "grpcs://", "http://", "https://"]
        .iter()
        .find_map(|scheme| address.strip_prefix(scheme))
        .unwrap_or(address);
    let valid = rest.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok()
    });
    match valid {
        true => Ok(()),
        false => Err(format!(
            "{address:?} is not grpc://HOST:PORT or grpcs://HOST:PORT"
        )),
    }
}

/// The default data directory: `$XDG_DATA_HOME/paddock`, else `~/.local/share/paddock`.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("paddock");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/var/lib".into());
    PathBuf::from(home).join(".local/share/paddock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_beyond_loopback_needs_auth_or_an_explicit_choice() {
        let mut config = Config::default();
        assert_eq!(config.check_exposure(), Ok(()));
        config.server.listen = "0.0.0.0:8980".parse().unwrap();
        let refusal = config.check_exposure().unwrap_err();
        assert!(
            refusal.contains("0.0.0.0:8980") && refusal.contains("--insecure-allow-anonymous"),
            "{refusal}"
        );
        // Workers' listener counts too.
        config.server.listen = "127.0.0.1:8980".parse().unwrap();
        config.server.worker_listen = Some("10.1.2.3:8982".parse().unwrap());
        assert!(config
            .check_exposure()
            .unwrap_err()
            .contains("10.1.2.3:8982"));
        config.auth.allow_anonymous = true;
        assert_eq!(config.check_exposure(), Ok(()));
        config.auth.allow_anonymous = false;
        config.auth.tokens.push(TokenConfig {
            name: "ci".into(),
            token_file: None,
            sha256: Some("0".repeat(64)),
            permissions: vec![Permission::CasRead],
            instances: vec!["*".into()],
        });
        assert_eq!(config.check_exposure(), Ok(()));
    }

    #[test]
    fn auth_configuration_reads_as_the_documentation_says() {
        let config = Config::parse(
            r#"
[server]
worker_listen = "127.0.0.1:8982"
[server.tls]
cert_file = "server.pem"
key_file = "server.key"
client_ca_file = "ca.pem"
[[auth.tokens]]
name = "ci"
token_file = "ci.token"
permissions = ["cas.read", "cas.write", "ac.read", "ac.write", "execute"]
instances = ["*"]
[[auth.certificates]]
subject = "CN=builder-1"
permissions = ["worker"]
"#,
        )
        .unwrap();
        assert_eq!(config.server.worker_address().port(), 8982);
        assert_eq!(config.auth.tokens[0].permissions.len(), 5);
        assert_eq!(config.auth.certificates[0].instances, vec!["*".to_owned()]);
        let bad = Config::parse(
            "[[auth.tokens]]\nname = \"x\"\npermissions = [\"cas.raed\"]\nsha256 = \"00\"\n",
        )
        .unwrap_err();
        assert!(bad.contains("cas.raed"), "{bad}");
        let no_ca = Config::parse(
            "[[auth.certificates]]\nsubject = \"CN=a\"\npermissions = [\"worker\"]\n",
        )
        .unwrap_err();
        assert!(no_ca.contains("client_ca_file"), "{no_ca}");
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn nonsense_values_name_key_and_line() {
        let err = Config::parse(
            "[scheduler]\nmax_attempts = 3\n\ndefault_timeout = \"5h\"\n[worker]\nscheduler = \"farm\"\n",
        )
        .unwrap_err();
        assert!(
            err.contains("line 4: scheduler.default_timeout is longer"),
            "{err}"
        );
        assert!(err.contains("line 6: worker.scheduler \"farm\""), "{err}");
        // A problem with a default value has no line to point at.
        let err = Config::parse("[scheduler]\nmax_timeout = \"1s\"\n").unwrap_err();
        assert_eq!(
            err,
            "scheduler.default_timeout is longer than scheduler.max_timeout"
        );
        for good in [
            "grpc://farm:8980",
            "grpcs://farm:443",
            "http://[::1]:8980",
            "10.0.0.1:8980",
        ] {
            assert_eq!(check_scheduler_address(good), Ok(()), "{good}");
        }
        for bad in ["grpc://farm", "grpcs://farm", "farm:http", "grpc://:1"] {
            assert!(check_scheduler_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_are_errors_that_name_key_and_line() {
        let err =
            Config::parse("[storage]\nbackend = \"disk\"\nmax_sise = \"1GiB\"\n").unwrap_err();
        assert!(err.contains("max_sise"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn scheduler_and_worker_sections() {
        let c = Config::parse(
            "[scheduler]\ndefault_timeout = \"5m\"\n[scheduler.property_policies]\ngpu = \"minimum\"\n\
             [worker]\ncapacity = 4\n[worker.properties]\nPool = \"fast\"\nzone = [\"a\", \"b\"]\n",
        )
        .unwrap();
        assert_eq!(c.scheduler.default_timeout, Span::secs(300));
        assert_eq!(c.scheduler.property_policies["gpu"], MatchPolicy::Minimum);
        assert_eq!(c.worker.capacity, Some(4));
        assert_eq!(c.worker.properties["zone"].values(), vec!["a", "b"]);
        assert!(Config::parse("[scheduler]\nmax_timeout = \"forever\"\n").is_err());
    }

    #[test]
    fn sizes_read_with_units() {
        let c = Config::parse("[storage]\nmax_size = \"512MiB\"\nbackend = \"memory\"\n").unwrap();
        assert_eq!(c.storage.max_size, ByteSize::mib(512));
        assert_eq!(c.storage.backend, StorageBackend::Memory);
    }
}
