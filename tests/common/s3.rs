//! A real S3-compatible server on loopback: `s3s-fs` (built from crates.io by
//! `tests/run`), keeping objects as files in a throwaway directory, so that it can be
//! killed and started again with its contents. The tests fail, not skip, without it.
//!
//! [`Storage`] starts a farm whose CAS is in such a server, indexed in a throwaway
//! PostgreSQL, or a farm on the plain disk backend, so that one test runs on both.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::postgres::Postgres;
use super::{config_file, free_address, Farm};

/// The bucket every test uses; it exists before the farm starts, as in production.
pub const BUCKET: &str = "paddock-cas";
const ACCESS_KEY: &str = "paddock-test";
const SECRET_KEY: &str = "paddock-test-secret";

/// The credentials a farm process reads from its environment.
pub fn credentials() -> [(&'static str, &'static str); 2] {
    [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
    ]
}

/// Where `tests/run` installs `s3s-fs` (it passes the path on in `PADDOCK_S3S_FS`).
fn binary() -> PathBuf {
    let path = match std::env::var_os("PADDOCK_S3S_FS") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/paddock-tests/s3s-fs-0.14.1/bin/s3s-fs"),
    };
    assert!(
        path.exists(),
        "{} is missing: tests/run builds s3s-fs (cargo install s3s-fs --version 0.14.1 --features binary)",
        path.display()
    );
    path
}

pub struct S3 {
    dir: tempfile::TempDir,
    address: String,
    child: Option<Child>,
}

impl S3 {
    /// Starts a server with an empty bucket and waits until it takes connections.
    pub fn start() -> S3 {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(BUCKET)).unwrap();
        let mut s3 = S3 {
            dir,
            address: free_address(),
            child: None,
        };
        s3.start_again();
        s3
    }

    /// Starts the server (again, after [`S3::kill9`]) on the same port and files.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server runs already");
        let (host, port) = self.address.rsplit_once(':').unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().with_extension("log"))
            .unwrap();
        let child = Command::new(binary())
            .args(["--host", host, "--port", port])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting s3s-fs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.address).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The objects the bucket holds, as files (what a blob's key becomes on disk).
    pub fn objects(&self) -> Vec<PathBuf> {
        fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push(path);
                }
            }
        }
        let mut found = Vec::new();
        walk(&self.dir.path().join(BUCKET).join("cas"), &mut found);
        found
    }

    /// The `[storage]` section of a farm keeping its CAS here.
    pub fn storage_section(&self) -> String {
        format!(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\n\
             region = \"us-east-1\"\npath_style = true\n",
            self.endpoint()
        )
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Where a farm under test keeps its blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Files under the data directory (the embedded default).
    Disk,
    /// An S3 server, indexed in PostgreSQL, with the local fast tier.
    S3,
}

/// A farm with the servers its storage needs, stopped together.
pub struct Storage {
    pub farm: Farm,
    pub s3: Option<S3>,
    pub postgres: Option<Postgres>,
}

impl Storage {
    /// `paddock up` on `backend`, with `extra` configuration (TOML keys of sections
    /// other than `[storage]`, or `[storage]` keys for the disk backend).
    pub fn start(backend: Backend) -> Storage {
        Storage::start_with(backend, "", "")
    }

    /// As [`Storage::start`], with `storage` added to the `[storage]` section and
    /// `extra` after it.
    pub fn start_with(backend: Backend, storage: &str, extra: &str) -> Storage {
        match backend {
            Backend::Disk => {
                let config = config_file(&format!("[storage]\n{storage}\n{extra}"));
                Storage {
                    farm: Farm::start(&["--config", &config]),
                    s3: None,
                    postgres: None,
                }
            }
            Backend::S3 => {
                let (s3, postgres) = (S3::start(), Postgres::start());
                let farm =
                    Farm::start(&["--config", &shared_config(&s3, &postgres, storage, extra)]);
                Storage {
                    farm,
                    s3: Some(s3),
                    postgres: Some(postgres),
                }
            }
        }
    }
}

/// The configuration file of a server whose CAS is in `s3`, indexed in `postgres`.
pub fn shared_config(s3: &S3, postgres: &Postgres, storage: &str, extra: &str) -> String {
    let (section, bucket) = s3
        .storage_section()
        .split_once("[storage.s3]")
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .unwrap();
    config_file(&format!(
        "{section}{storage}\n[storage.s3]{bucket}\n[state]\nbackend = \"postgres\"\nurl = \"{}\"\n{extra}",
        postgres.url
    ))
}

impl std::ops::Deref for Storage {
    type Target = Farm;
    fn deref(&self) -> &Farm {
        &self.farm
    }
}

impl std::ops::DerefMut for Storage {
    fn deref_mut(&mut self) -> &mut Farm {
        &mut self.farm
    }
}
