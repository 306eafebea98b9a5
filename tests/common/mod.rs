//! The test harness: real `paddock` processes on loopback, and clients for them.
#![allow(dead_code)] // each test binary uses its own share of the harness

pub mod bazel;
pub mod pki;
pub mod postgres;
pub mod registry;
pub mod s3;

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

/// The Nix configuration of every Nix command the tests run, and of every `paddock`
/// process they start: nothing of the machine's own (`/etc/nix` may be absent, or
/// configured for something else), and nothing from the network.
///
/// Debian's `nix-bin` ships no `nix.conf` and no `nixbld` group, so Nix's defaults
/// would fail every build as root (`build-users-group = nixbld`) and try
/// `cache.nixos.org` for seconds before each command. The tests build as root with
/// Nix's sandbox on (their builders come from the store, so the sandbox needs no
/// `/bin/sh`), and substitute only from the binary caches a test makes itself.
pub fn nix_env() -> Vec<(&'static str, String)> {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        // One directory for every test process (the same text each time), replaced
        // atomically so that a concurrent reader never sees half of it.
        let dir = std::env::temp_dir().join("paddock-test-nix");
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(format!("nix.conf.{}", std::process::id()));
        std::fs::write(
            &tmp,
            "build-users-group =\nsandbox = true\nsubstituters =\nexperimental-features = nix-command\n",
        )
        .unwrap();
        std::fs::rename(&tmp, dir.join("nix.conf")).unwrap();
        dir
    });
    let conf = dir.join("nix.conf").display().to_string();
    vec![
        ("NIX_CONF_DIR", dir.display().to_string()),
        // The user's own nix.conf (~/.config/nix) would apply on top: not in tests.
        ("NIX_USER_CONF_FILES", conf),
    ]
}

/// A command for a Nix program (`nix-store`, `nix-build`, ...) with the tests' Nix
/// configuration.
pub fn nix_command(program: &str) -> Command {
    let mut command = Command::new(program);
    command.envs(nix_env());
    command
}

/// A `paddock up` (or `paddock server`) process with its own data directory, stopped
/// when dropped.
pub struct Farm {
    child: Option<Child>,
    pub url: String,
    /// Where workers connect.
    pub worker_url: String,
    pub metrics_url: String,
    pub data_dir: PathBuf,
    command: &'static str,
    listen: String,
    worker_listen: String,
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

    /// Starts `paddock server` (no workers of its own) on `listen`, with workers
    /// served on another free port (kept across restarts).
    pub fn server(listen: &str, args: &[&str]) -> Farm {
        Farm::launch("server", listen, args)
    }

    fn launch(command: &'static str, listen: &str, args: &[&str]) -> Farm {
        let worker_listen = match listen.ends_with(":0") {
            true => listen.to_owned(),
            false => free_address(),
        };
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let mut farm = Farm {
            child: None,
            url: String::new(),
            worker_url: String::new(),
            metrics_url: String::new(),
            data_dir,
            command,
            listen: listen.to_owned(),
            worker_listen,
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
            .args(["--worker-listen", &self.worker_listen])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .envs(nix_env())
            .envs(s3::credentials())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("starting paddock");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let (mut url, mut worker_url, mut metrics) = (None, None, None);
        while url.is_none() || worker_url.is_none() || metrics.is_none() {
            let Some(Ok(line)) = lines.next() else {
                panic!(
                    "paddock exited before it was ready; log:\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            };
            if let Some(u) = line.strip_prefix("paddock: serving REAPI on ") {
                url = Some(u.trim().to_owned());
            }
            if let Some(u) = line.strip_prefix("paddock: serving workers on ") {
                worker_url = Some(u.trim().to_owned());
            }
            if let Some(m) = line.strip_prefix("paddock: metrics on ") {
                metrics = Some(m.trim().to_owned());
            }
        }
        // Keep draining stdout so the process never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.url = url.unwrap();
        self.worker_url = worker_url.unwrap();
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

    /// The process's id, while it runs.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("the farm runs").id() as i32
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
    env: Vec<(String, String)>,
    read_only: Vec<PathBuf>,
    work_dir_size: Option<u64>,
    work_dir_name: String,
    _tmp: tempfile::TempDir,
}

/// How a test changes a worker's surroundings.
#[derive(Default)]
pub struct WorkerSetup {
    /// Environment variables on top of the harness's.
    pub env: Vec<(String, String)>,
    /// Directories the worker sees read-only: it runs in its own mount namespace in
    /// which they are remounted so (nothing changes for the rest of the machine).
    pub read_only: Vec<PathBuf>,
    /// The worker's directory is a tmpfs of this many bytes of its own (in its own
    /// mount namespace): a disk that fills up.
    pub work_dir_size: Option<u64>,
    /// The name of the worker's directory, instead of `work`.
    pub work_dir_name: Option<String>,
}

impl Worker {
    /// Starts a worker named `name` for the scheduler at `url`, with `args`.
    pub fn start(url: &str, name: &str, args: &[&str]) -> Worker {
        Worker::start_with(url, name, args, WorkerSetup::default())
    }

    /// Starts a worker as [`Worker::start`] does, in the surroundings `setup` describes.
    pub fn start_with(url: &str, name: &str, args: &[&str], setup: WorkerSetup) -> Worker {
        let mut worker = Worker {
            child: None,
            name: name.to_owned(),
            url: url.to_owned(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: setup.env,
            read_only: setup.read_only,
            work_dir_size: setup.work_dir_size,
            work_dir_name: setup.work_dir_name.unwrap_or_else(|| "work".into()),
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
        let mut command = Command::new(paddock_bin());
        if !self.read_only.is_empty() || self.work_dir_size.is_some() {
            let c_path =
                |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            let read_only: Vec<std::ffi::CString> =
                self.read_only.iter().map(|p| c_path(p)).collect();
            std::fs::create_dir_all(self.work_dir()).unwrap();
            let tmpfs = self.work_dir_size.map(|size| {
                (
                    c_path(&self.work_dir()),
                    std::ffi::CString::new(format!("size={size},mode=0755")).unwrap(),
                )
            });
            // SAFETY: between fork and exec the closure makes raw syscalls only.
            unsafe {
                command.pre_exec(move || isolate(&read_only, tmpfs.as_ref()));
            }
        }
        let child = command
            .args(["worker", "--scheduler", &self.url, "--name", &self.name])
            .arg("--work-dir")
            .arg(self.work_dir())
            .args(&self.args)
            .env("RUST_LOG", "info")
            .envs(nix_env())
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("starting a paddock worker");
        self.child = Some(child);
    }

    /// Where the worker keeps its cache, sandbox state and action directories.
    pub fn work_dir(&self) -> PathBuf {
        self._tmp.path().join(&self.work_dir_name)
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

/// In a child about to exec: a private mount namespace in which each of `paths` is
/// bind-mounted onto itself read-only, and `tmpfs` (a directory and the mount's
/// options) is a fresh tmpfs.
fn isolate(
    paths: &[std::ffi::CString],
    tmpfs: Option<&(std::ffi::CString, std::ffi::CString)>,
) -> std::io::Result<()> {
    let check = |r: libc::c_int| match r {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    };
    // SAFETY: unshare and mount with valid NUL-terminated strings or nulls.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        if let Some((dir, options)) = tmpfs {
            check(libc::mount(
                c"tmpfs".as_ptr(),
                dir.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            ))?;
        }
        for path in paths {
            check(libc::mount(
                path.as_ptr(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                std::ptr::null(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            ))?;
        }
    }
    Ok(())
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

/// Runs a command that is expected to end by itself, and what it printed; one still
/// running after `limit` is killed and fails the test instead of hanging it.
pub fn output_within(command: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the command");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "{command:?} still ran after {limit:?}:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Every worker the farm at `url` knows, by name (the admin API, anonymous).
pub async fn workers(
    url: &str,
) -> std::collections::HashMap<String, paddock_proto::admin::v1::Worker> {
    use paddock_proto::admin::v1::{admin_client::AdminClient, ListWorkersRequest};
    let remote = Remote::connect(url, "").await.unwrap();
    AdminClient::new(remote.channel())
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers
        .into_iter()
        .map(|w| (w.name.clone(), w))
        .collect()
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

/// A blob of `len` random bytes, with its digest.
pub fn random_blob(len: usize) -> (paddock_reapi::Digest, bytes::Bytes) {
    let mut data = vec![0u8; len];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut data);
    let data = bytes::Bytes::from(data);
    (paddock_reapi::Digest::of(&data), data)
}

/// A metric's value on a Prometheus text page (0 if absent).
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Serves `action` from the ActionCache within `invocation`: caches an empty result
/// for it, then asks for it with the RequestMetadata a tool sends, so that the
/// history notes a cache hit.
pub async fn cache_hit(remote: &Remote, action: &paddock_reapi::Digest, invocation: &str) {
    use paddock_reapi::proto::re::{
        ActionResult, GetActionResultRequest, RequestMetadata, UpdateActionResultRequest,
    };
    use prost::Message;
    remote
        .action_cache()
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(action.to_proto()),
            action_result: Some(ActionResult::default()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut asked = tonic::Request::new(GetActionResultRequest {
        action_digest: Some(action.to_proto()),
        ..Default::default()
    });
    let metadata = RequestMetadata {
        tool_invocation_id: invocation.into(),
        action_mnemonic: "Genrule".into(),
        ..Default::default()
    };
    asked.metadata_mut().insert_bin(
        "build.bazel.remote.execution.v2.requestmetadata-bin",
        tonic::metadata::MetadataValue::from_bytes(&metadata.encode_to_vec()),
    );
    remote
        .action_cache()
        .get_action_result(asked)
        .await
        .unwrap();
}
