//! Paddock's configuration: the schema of the TOML file that `paddock up`, `server`
//! and `worker` read with `--config`, with the defaults that apply when a key is left
//! out. Unknown keys are errors. Every part of Paddock takes its settings from the
//! structs here, so the file, the flags and the code cannot drift apart.

mod size;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use size::ByteSize;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
}

/// Where the server listens and keeps its state.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The gRPC address for every REAPI service (and, later, the workers).
    pub listen: SocketAddr,
    /// The HTTP address of the Prometheus `/metrics` endpoint.
    pub metrics_listen: SocketAddr,
    /// Where storage lives; defaults to `$XDG_DATA_HOME/paddock`.
    pub data_dir: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8980".parse().expect("valid address"),
            metrics_listen: "127.0.0.1:8981".parse().expect("valid address"),
            data_dir: None,
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
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Disk,
            max_size: ByteSize::gib(10),
            fsync: true,
            verify_reads: ReadVerification::Once,
            action_cache_max_entries: 1_000_000,
            max_batch_size: ByteSize::mib(4),
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
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Config::parse(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            error,
        })
    }

    /// Parses configuration text; the error names the key and line at fault.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
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
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_keys_are_errors_that_name_key_and_line() {
        let err =
            Config::parse("[storage]\nbackend = \"disk\"\nmax_sise = \"1GiB\"\n").unwrap_err();
        assert!(err.contains("max_sise"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn sizes_read_with_units() {
        let c = Config::parse("[storage]\nmax_size = \"512MiB\"\nbackend = \"memory\"\n").unwrap();
        assert_eq!(c.storage.max_size, ByteSize::mib(512));
        assert_eq!(c.storage.backend, StorageBackend::Memory);
    }
}
