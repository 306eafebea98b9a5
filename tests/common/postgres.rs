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

fn root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

impl Postgres {
    /// Starts a fresh cluster and waits until it takes connections.
    pub fn start() -> Postgres {
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
        let postgres = Postgres {
            url: format!(
                "postgresql://paddock@localhost/postgres?host={}",
                dir.path().display()
            ),
            bin: bin_dir(),
            dir,
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
        let options = format!(
            "-k {} -c listen_addresses='' -c fsync=off -c max_connections=200",
            self.dir.path().display()
        );
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
