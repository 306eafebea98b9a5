//! Where `paddock cc` sends compiles and how: `PADDOCK_*` environment variables over
//! a client configuration file (`PADDOCK_CC_CONFIG`, or `paddock/cc.toml` in the
//! user's configuration directory).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// How compiles are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Run on the farm (which answers from its cache when it can).
    Remote,
    /// Look the result up; on a miss compile locally and upload the result.
    CacheOnly,
    /// Always compile locally.
    Local,
}

/// The configuration file's keys; every one optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
struct File {
    remote: Option<String>,
    instance: Option<String>,
    mode: Option<Mode>,
    root: Option<PathBuf>,
    token_file: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    verbose: Option<bool>,
    cache_dir: Option<PathBuf>,
    retry_after_seconds: Option<f64>,
    connect_timeout_seconds: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// `grpc://host:port` or `grpcs://...`; unset, everything runs locally.
    pub remote: Option<String>,
    pub instance: String,
    pub mode: Mode,
    /// The project root: sources and headers beneath it are inputs; files outside it
    /// are the toolchain. Unset: found per compile (see `action::prepare`).
    pub root: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub verbose: bool,
    /// Statistics, notices and the hash cache.
    pub cache_dir: PathBuf,
    /// After the farm was found unreachable, how long compiles stay local before it
    /// is tried again.
    pub retry_after: Duration,
    /// How long reaching the farm may take before a compile goes local.
    pub connect_timeout: Duration,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn seconds(value: f64, what: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value).map_err(|_| format!("{what} must be a number of seconds"))
}

impl Config {
    /// The configuration from the environment and the file.
    pub fn load() -> Result<Config, String> {
        let home = env("HOME").map(PathBuf::from);
        let file_path = env("PADDOCK_CC_CONFIG").map(PathBuf::from).or_else(|| {
            env("XDG_CONFIG_HOME")
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".config")))
                .map(|d| d.join("paddock/cc.toml"))
        });
        let file = match &file_path {
            Some(path) => read_file(path)?,
            None => File::default(),
        };
        let mode = match env("PADDOCK_MODE") {
            Some(m) => match m.as_str() {
                "remote" => Mode::Remote,
                "cache-only" => Mode::CacheOnly,
                "local" => Mode::Local,
                other => {
                    return Err(format!(
                        "PADDOCK_MODE={other:?}: expected remote, cache-only or local"
                    ))
                }
            },
            None => file.mode.unwrap_or(Mode::Remote),
        };
        let cache_dir = env("PADDOCK_CC_DIR")
            .map(PathBuf::from)
            .or(file.cache_dir)
            .or_else(|| env("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("paddock-cc")))
            .or_else(|| home.map(|h| h.join(".cache/paddock-cc")))
            .unwrap_or_else(|| std::env::temp_dir().join("paddock-cc"));
        let retry_after = match env("PADDOCK_CC_RETRY_AFTER") {
            Some(v) => seconds(
                v.parse()
                    .map_err(|_| "PADDOCK_CC_RETRY_AFTER must be a number")?,
                "PADDOCK_CC_RETRY_AFTER",
            )?,
            None => seconds(
                file.retry_after_seconds.unwrap_or(60.0),
                "retry_after_seconds",
            )?,
        };
        Ok(Config {
            remote: env("PADDOCK_REMOTE").or(file.remote),
            instance: env("PADDOCK_INSTANCE")
                .or(file.instance)
                .unwrap_or_default(),
            mode,
            root: env("PADDOCK_ROOT").map(PathBuf::from).or(file.root),
            token_file: env("PADDOCK_TOKEN_FILE")
                .map(PathBuf::from)
                .or(file.token_file),
            token: env("PADDOCK_TOKEN"),
            tls_ca: env("PADDOCK_TLS_CA").map(PathBuf::from).or(file.tls_ca),
            tls_cert: env("PADDOCK_TLS_CERT").map(PathBuf::from).or(file.tls_cert),
            tls_key: env("PADDOCK_TLS_KEY").map(PathBuf::from).or(file.tls_key),
            verbose: env("PADDOCK_VERBOSE")
                .map(|v| v != "0")
                .or(file.verbose)
                .unwrap_or(false),
            cache_dir,
            retry_after,
            connect_timeout: seconds(
                file.connect_timeout_seconds.unwrap_or(5.0),
                "connect_timeout_seconds",
            )?,
        })
    }

    /// The configured project root, for a compile in `cwd`.
    pub fn root_for(&self, cwd: &Path) -> Option<PathBuf> {
        self.root
            .as_ref()
            .map(|root| crate::scan::normal(&cwd.join(root)))
    }
}

fn read_file(path: &Path) -> Result<File, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(File::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}
