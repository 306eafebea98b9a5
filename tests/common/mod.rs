//! The test harness: real `paddock` processes on loopback, and clients for them.
#![allow(dead_code)] // each test binary uses its own share of the harness

pub mod bazel;
pub mod registry;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use paddock_client::Remote;

/// The `paddock` binary that cargo built for these tests.
pub fn paddock_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_paddock"))
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A `paddock up` (or `paddock server`) process with its own data directory, stopped
/// when dropped.
pub struct Farm {
    child: Option<Child>,
    pub url: String,
    pub metrics_url: String,
    pub data_dir: PathBuf,
    command: &'static str,
    listen: String,
    args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

/// A loopback address with a port that was free a moment ago.
pub fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

impl Farm {
    /// Starts `paddock up` on free ports with a fresh data directory and `args`.
    pub fn start(args: &[&str]) -> Farm {
        Farm::launch("up", "127.0.0.1:0", args)
    }

    /// Starts `paddock server` (no workers of its own) on `listen`.
    pub fn server(listen: &str, args: &[&str]) -> Farm {
        Farm::launch("server", listen, args)
    }

    fn launch(command: &'static str, listen: &str, args: &[&str]) -> Farm {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let mut farm = Farm {
            child: None,
            url: String::new(),
            metrics_url: String::new(),
            data_dir,
            command,
            listen: listen.to_owned(),
            args: args.iter().map(|s| s.to_string()).collect(),
            _tmp: Some(tmp),
        };
        farm.spawn();
        farm
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.with_file_name("paddock.log")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut child = Command::new(paddock_bin())
            .arg(self.command)
            .args(["--listen", &self.listen, "--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("starting paddock");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let (mut url, mut metrics) = (None, None);
        while url.is_none() || metrics.is_none() {
            let Some(Ok(line)) = lines.next() else {
                panic!(
                    "paddock exited before it was ready; log:\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            };
            if let Some(u) = line.strip_prefix("paddock: serving REAPI on ") {
                url = Some(u.trim().to_owned());
            }
            if let Some(m) = line.strip_prefix("paddock: metrics on ") {
                metrics = Some(m.trim().to_owned());
            }
        }
        // Keep draining stdout so the process never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.url = url.unwrap();
        self.metrics_url = metrics.unwrap();
        self.child = Some(child);
    }

    pub async fn remote(&self, instance: &str) -> Remote {
        Remote::connect(&self.url, instance).await.unwrap()
    }

    /// Stops the process with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "paddock did not stop within 20 s of SIGTERM; log:\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts the process again on the same data directory (new ports).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts the process again after a crash.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "stop or kill the farm first");
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        // SIGTERM, so that the farm's workers remove their cgroups on the way out.
        if let Some(mut child) = self.child.take() {
            stop_gracefully(&mut child);
        }
    }
}

/// SIGTERM, then SIGKILL if the process is still there after five seconds.
fn stop_gracefully(child: &mut Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A `paddock worker` process (in its own process group, with its sandbox
/// helpers), killed when dropped.
pub struct Worker {
    child: Option<Child>,
    pub name: String,
    url: String,
    args: Vec<String>,
    _tmp: tempfile::TempDir,
}

impl Worker {
    /// Starts a worker named `name` for the scheduler at `url`, with `args`.
    pub fn start(url: &str, name: &str, args: &[&str]) -> Worker {
        let mut worker = Worker {
            child: None,
            name: name.to_owned(),
            url: url.to_owned(),
            args: args.iter().map(|s| s.to_string()).collect(),
            _tmp: tempfile::tempdir().unwrap(),
        };
        worker.spawn();
        worker
    }

    fn spawn(&mut self) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self._tmp.path().join("worker.log"))
            .unwrap();
        let child = Command::new(paddock_bin())
            .args(["worker", "--scheduler", &self.url, "--name", &self.name])
            .arg("--work-dir")
            .arg(self.work_dir())
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("starting a paddock worker");
        self.child = Some(child);
    }

    /// Where the worker keeps its cache, sandbox state and action directories.
    pub fn work_dir(&self) -> PathBuf {
        self._tmp.path().join("work")
    }

    /// Kills the worker and every helper it started, all at once.
    pub fn kill_tree(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }

    /// Starts the worker again, with the same name, arguments and work directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the worker with SIGTERM, as `systemctl stop` would, and returns how it
    /// exited (`None` if it had to be killed after 40 seconds).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Freezes the process (SIGSTOP): it stays connected but sends nothing.
    pub fn freeze(&self) {
        unsafe { libc::kill(self.pid(), libc::SIGSTOP) };
    }

    pub fn thaw(&self) {
        unsafe { libc::kill(self.pid(), libc::SIGCONT) };
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._tmp.path().join("worker.log")).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_gracefully(&mut child);
        }
        // A worker killed with SIGKILL leaves its (empty) cgroup for its next life to
        // remove; a test worker has none, so the test removes it.
        let Ok(work_dir) = self.work_dir().canonicalize() else {
            return;
        };
        let place = paddock_reapi::Digest::of(work_dir.as_os_str().as_encoded_bytes()).hash_hex();
        let group = format!("{}-{}", self.name, &place[..8]);
        let hierarchies = std::fs::read_dir("/sys/fs/cgroup")
            .map(|d| d.flatten().map(|e| e.path().join("paddock")).collect())
            .unwrap_or_else(|_| Vec::new());
        for hierarchy in hierarchies
            .into_iter()
            .chain([PathBuf::from("/sys/fs/cgroup/paddock")])
        {
            remove_cgroup_tree(&hierarchy.join(&group));
        }
    }
}

/// Removes an empty cgroup and its empty descendants, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
}

/// The PID (in the host's namespace) of a process whose command line has `needle`.
pub fn find_process(needle: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(needle).then_some(pid)
        })
}

/// Waits until a process with `needle` in its command line runs; returns its PID.
pub async fn wait_for_process(needle: &str) -> i32 {
    for _ in 0..1200 {
        if let Some(pid) = find_process(needle) {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no process with {needle:?} started");
}

/// The processes whose parent is `pid`.
pub fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // The command name may hold spaces: the fields follow its ')'.
                    let after = stat.rsplit_once(')')?.1.to_owned();
                    after.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Writes a configuration file for a test and returns its path.
pub fn config_file(text: &str) -> String {
    let path = std::env::temp_dir().join(format!("paddock-test-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// Fetches a URL over plain HTTP/1.1 (for the metrics endpoint).
pub fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}
