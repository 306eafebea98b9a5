//! A real PostgreSQL (Debian's `postgresql`, installed by `tests/run`) in a throwaway
//! cluster: `initdb` into a fresh directory and `pg_ctl`, listening only on a Unix
//! socket in that directory (no port to race other tests for), as the unprivileged
//! `postgres` user when the tests run as root (PostgreSQL refuses to run as root).
//! Nothing of the machine's own clusters or configuration is touched.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The URL a server's `state.url` takes.
    pub url: String,
    /// With TLS: the loopback address it also listens on, taking only TLS there.
    tcp: Option<String>,
}

/// The newest installed PostgreSQL's programs; the tests fail, not skip, without one.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (tests/run installs Debian's postgresql)")
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort_by_key(|bin| {
        bin.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions
        .pop()
        .expect("no PostgreSQL under /usr/lib/postgresql")
}

/// The cluster's port (its Unix socket is named after it too).
fn port(tcp: &Option<String>) -> &str {
    tcp.as_deref()
        .and_then(|a| a.rsplit_once(':'))
        .map_or("5432", |(_, port)| port)
}

fn root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// The uid (and gid) the cluster's files belong to: `postgres` when the tests run
/// as root.
fn owner() -> Option<u32> {
    if !root() {
        return None;
    }
    let output = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

impl Postgres {
    /// Starts a fresh cluster and waits until it takes connections.
    pub fn start() -> Postgres {
        Postgres::start_with(None)
    }

    /// A cluster that also listens on a loopback port, where it takes only TLS
    /// connections, with the certificate `cert` and its key `key` (PEM files).
    pub fn start_tls(cert: &Path, key: &Path) -> Postgres {
        Postgres::start_with(Some((cert, key)))
    }

    /// `postgresql://` URL of its TLS port (see [`Postgres::start_tls`]).
    pub fn tls_url(&self) -> String {
        let address = self.tcp.as_deref().expect("started with TLS");
        format!("postgresql://paddock@{address}/postgres")
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("paddock-postgres")
            .tempdir_in("/tmp")
            .unwrap();
        if root() {
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown of the cluster's directory failed");
        }
        let tcp = tls.map(|_| super::free_address());
        let postgres = Postgres {
            url: format!(
                "postgresql://paddock@localhost/postgres?host={}&port={}",
                dir.path().display(),
                port(&tcp)
            ),
            bin: bin_dir(),
            dir,
            tcp,
        };
        postgres.run_checked(
            "initdb",
            &[
                "-D",
                &postgres.data().display().to_string(),
                "-U",
                "paddock",
                "--auth=trust",
                "--no-sync",
            ],
        );
        if let Some((cert, key)) = tls {
            // The key must be the server's own and private to it.
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                let to = postgres.data().join(to);
                std::fs::copy(from, &to).unwrap();
                std::os::unix::fs::chown(&to, owner(), owner()).unwrap();
                std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .unwrap();
            }
            std::fs::write(
                postgres.data().join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .unwrap();
        }
        postgres.start_again();
        postgres
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs one of PostgreSQL's programs as the cluster's owner.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let binary = self.bin.join(program);
        let mut command = match root() {
            true => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(&binary);
                c
            }
            false => Command::new(&binary),
        };
        command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", binary.display()))
    }

    fn run_checked(&self, program: &str, args: &[&str]) -> Output {
        let output = self.run(program, args);
        assert!(
            output.status.success(),
            "{program} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Starts the cluster (again, after [`Postgres::stop`]) and waits for it.
    pub fn start_again(&self) {
        let mut options = format!(
            "-k {} -c fsync=off -c max_connections=200",
            self.dir.path().display()
        );
        match &self.tcp {
            Some(address) => {
                let (host, port) = address.rsplit_once(':').unwrap();
                options.push_str(&format!(
                    " -c listen_addresses={host} -p {port} -c ssl=on \
                     -c ssl_cert_file=server.crt -c ssl_key_file=server.key"
                ));
            }
            None => options.push_str(" -c listen_addresses=''"),
        }
        let log = self.dir.path().join("postgres.log").display().to_string();
        let data = self.data().display().to_string();
        self.run_checked(
            "pg_ctl",
            &["-D", &data, "-o", &options, "-l", &log, "-w", "start"],
        );
    }

    /// Stops the cluster at once, as a crash of the database would look to its clients.
    pub fn stop(&self) {
        let data = self.data().display().to_string();
        self.run_checked("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }

    /// Runs SQL and returns what psql printed (unaligned, tuples only).
    pub fn sql(&self, sql: &str) -> String {
        let socket = self.dir.path().display().to_string();
        let output = self.run_checked(
            "psql",
            &[
                "-h",
                &socket,
                "-p",
                port(&self.tcp),
                "-U",
                "paddock",
                "-d",
                "postgres",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data().display().to_string();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}
