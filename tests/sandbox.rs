//! The container runner: actions that try to escape, hog or harm, and fail; resource
//! usage in results; nothing left behind after hundreds of actions; a restarted worker
//! cleaning up after its previous life.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config_file, Farm, Worker};
use paddock_client::exec::{execute, ExecSpec};
use paddock_client::Remote;
use paddock_proto::execution::v1::{ResourceUsage, RESOURCE_USAGE};
use paddock_reapi::proto::re::{ActionResult, ExecuteResponse};
use paddock_reapi::status::unpack;
use paddock_reapi::Digest;
use tonic::Code;

fn shell(script: &str) -> ExecSpec {
    ExecSpec {
        arguments: vec!["sh".into(), "-c".into(), script.into()],
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        ..Default::default()
    }
}

fn with_platform(mut spec: ExecSpec, properties: &[(&str, &str)]) -> ExecSpec {
    spec.platform = properties
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    spec
}

async fn text(remote: &Remote, digest: Option<&paddock_reapi::proto::re::Digest>) -> String {
    let digest = Digest::from_proto(digest).unwrap();
    String::from_utf8_lossy(&remote.read_blob(&digest).await.unwrap()).into_owned()
}

/// Runs a script in the sandbox and returns (exit code, stdout, stderr, response).
async fn run(remote: &Remote, spec: ExecSpec) -> (i32, String, String, ExecuteResponse) {
    let response = execute(remote, &spec).await.unwrap();
    let result = response.result.clone().unwrap_or_default();
    let stdout = text(remote, result.stdout_digest.as_ref()).await;
    let stderr = text(remote, result.stderr_digest.as_ref()).await;
    (result.exit_code, stdout, stderr, response)
}

fn usage_of(result: &ActionResult) -> ResourceUsage {
    let metadata = result.execution_metadata.as_ref().unwrap();
    metadata
        .auxiliary_metadata
        .iter()
        .find_map(|any| unpack::<ResourceUsage>(RESOURCE_USAGE, any))
        .expect("the result carries a ResourceUsage")
}

fn host_processes_matching(needle: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            String::from_utf8_lossy(c)
                .replace('\0', " ")
                .contains(needle)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn actions_cannot_see_or_change_the_host() {
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    let secret_dir = farm.data_dir.display().to_string();
    let script = format!(
        "id -u; hostname; \
         test -e {secret_dir} && echo SAW-DATA-DIR; \
         test -e /root && echo SAW-ROOT; test -e /home && echo SAW-HOME; \
         ls /tmp | grep -q . && echo SAW-HOST-TMP; \
         touch /usr/paddock-test 2>/dev/null && echo WROTE-USR; \
         touch /etc/paddock-test 2>/dev/null && echo WROTE-ETC; \
         touch /paddock-test 2>/dev/null && echo WROTE-ROOT; \
         echo ok > /tmp/private && echo WROTE-TMP; \
         echo ok > /work/out.txt && echo WROTE-WORK; \
         echo x >> /work/input.txt 2>/dev/null && echo CHANGED-INPUT; \
         ls /proc | grep -c '^[0-9][0-9]*$'; \
         cat /proc/1/cmdline | tr '\\0' ' '; echo; \
         grep -c . /proc/net/dev"
    );
    let input = tempfile::tempdir().unwrap();
    std::fs::write(input.path().join("input.txt"), "input").unwrap();
    let spec = ExecSpec {
        input: Some(input.path().to_owned()),
        output_paths: vec!["out.txt".into()],
        ..shell(&script)
    };
    let (code, stdout, stderr, _) = run(&remote, spec).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0], "70000",
        "an unprivileged uid, the first of the worker's"
    );
    assert_eq!(lines[1], "paddock", "its own UTS namespace");
    for forbidden in [
        "SAW-",
        "WROTE-USR",
        "WROTE-ETC",
        "WROTE-ROOT",
        "CHANGED-INPUT",
    ] {
        assert!(
            !lines.iter().any(|l| l.starts_with(forbidden)),
            "{forbidden} in:\n{stdout}"
        );
    }
    assert!(
        lines.contains(&"WROTE-TMP") && lines.contains(&"WROTE-WORK"),
        "{stdout}"
    );
    // Its own PID namespace: a handful of processes, the action's shell as PID 1.
    let visible: usize = lines[lines.len() - 3].parse().unwrap();
    assert!(visible <= 4, "{visible} processes visible:\n{stdout}");
    assert!(lines[lines.len() - 2].starts_with("sh -c"), "{stdout}");
    // Its own network namespace: /proc/net/dev has two header lines and `lo`.
    assert_eq!(lines[lines.len() - 1], "3", "{stdout}");
    assert!(!std::path::Path::new("/usr/paddock-test").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn actions_cannot_reach_servers_on_the_host_but_have_their_own_loopback() {
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let grpc_port = farm.url.rsplit(':').next().unwrap().to_owned();
    let probe = format!(
        "import socket\n\
         for port in ({port}, {grpc_port}):\n\
         \x20   try:\n\
         \x20       socket.create_connection(('127.0.0.1', port), timeout=2)\n\
         \x20       print('REACHED', port)\n\
         \x20   except OSError as e:\n\
         \x20       print('refused', port, e.errno)\n\
         server = socket.socket(); server.bind(('127.0.0.1', 0)); server.listen(1)\n\
         client = socket.create_connection(server.getsockname(), timeout=2)\n\
         print('loopback works')\n\
         try:\n\
         \x20   socket.create_connection(('192.0.2.1', 80), timeout=2)\n\
         \x20   print('REACHED outside')\n\
         except OSError as e:\n\
         \x20   print('no route', e.errno)\n"
    );
    let spec = ExecSpec {
        arguments: vec!["python3".into(), "-c".into(), probe],
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        ..Default::default()
    };
    let (code, stdout, stderr, _) = run(&remote, spec).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(!stdout.contains("REACHED"), "{stdout}");
    assert!(stdout.contains("loopback works"), "{stdout}");
    assert!(stdout.contains("no route"), "{stdout}");
    assert!(
        listener.accept().is_err(),
        "the host's server saw a connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn denied_syscalls_fail_with_eperm_and_the_action_carries_on() {
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    // Each probe prints the errno of a call that, without the filter, an
    // unprivileged process may make (or that only the filter answers this way).
    let probe = "import ctypes, os\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        def report(name, result):\n\
        \x20   print(name, 0 if result >= 0 else ctypes.get_errno())\n\
        report('unshare-user', libc.unshare(0x10000000))\n\
        report('unshare-net', libc.unshare(0x40000000))\n\
        report('mount', libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))\n\
        report('ptrace', libc.ptrace(0, 0, None, None))\n\
        params = ctypes.create_string_buffer(120)\n\
        report('io_uring', libc.syscall(425, 8, params))\n\
        report('userfaultfd', libc.syscall(323, 0))\n\
        report('x32-getpid', libc.syscall(0x40000000 + 39))\n\
        report('bpf', libc.syscall(321, 0, None, 0))\n\
        report('keyctl', libc.syscall(250, 0, 0, 0, 0, 0))\n\
        pid = os.fork()\n\
        if pid == 0: os._exit(0)\n\
        os.waitpid(pid, 0)\n\
        print('fork works')\n";
    let spec = ExecSpec {
        arguments: vec!["python3".into(), "-c".into(), probe.into()],
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        ..Default::default()
    };
    let (code, stdout, stderr, _) = run(&remote, spec).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for name in [
        "unshare-user",
        "unshare-net",
        "mount",
        "ptrace",
        "io_uring",
        "userfaultfd",
        "x32-getpid",
        "bpf",
        "keyctl",
    ] {
        assert!(
            stdout.contains(&format!("{name} 1\n")),
            "{name} is not EPERM:\n{stdout}"
        );
    }
    assert!(stdout.contains("fork works"), "{stdout}");
    // util-linux's unshare, as a build script might call it.
    let (code, _, stderr, _) = run(&remote, shell("unshare -U true")).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_hog_is_killed_and_reported_as_out_of_memory() {
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    let hog = with_platform(
        ExecSpec {
            arguments: vec![
                "python3".into(),
                "-c".into(),
                "data = b'x' * (512 << 20)\nprint(len(data))".into(),
            ],
            environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
            ..Default::default()
        },
        &[("memory", "64MiB")],
    );
    let (code, stdout, _, response) = run(&remote, hog).await;
    assert_eq!(
        Code::from_i32(response.status.as_ref().unwrap().code),
        Code::Ok
    );
    assert_eq!(code, 128 + 9, "killed by SIGKILL: {stdout}");
    assert!(
        response.message.contains("out of memory"),
        "{}",
        response.message
    );
    let usage = usage_of(response.result.as_ref().unwrap());
    assert!(usage.out_of_memory);
    assert_eq!(usage.memory_limit_bytes, 64 << 20);
    assert!(!response.cached_result);

    // The worker is unharmed, and resource usage shows up in ordinary results.
    let (code, stdout, _, response) = run(
        &remote,
        with_platform(
            shell("head -c 50000000 /dev/urandom | sha256sum"),
            &[("memory", "1GiB"), ("cores", "1")],
        ),
    )
    .await;
    assert_eq!(code, 0, "{stdout}");
    let usage = usage_of(response.result.as_ref().unwrap());
    assert!(!usage.out_of_memory);
    assert!(usage.peak_memory_bytes > 0);
    assert!(
        usage.cpu_user_micros + usage.cpu_system_micros > 10_000,
        "{usage:?}"
    );
    assert_eq!(usage.memory_limit_bytes, 1 << 30);

    // Malformed limits are the client's mistake, refused at once.
    let err = execute(
        &remote,
        &with_platform(shell("true"), &[("memory", "lots")]),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fork_bomb_is_contained_by_the_pids_limit() {
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    let marker = format!("bomb-{}", rand::random::<u64>());
    // Forks until the kernel refuses, then keeps trying; every child waits.
    let script = format!(
        "# {marker}\nimport os, time\nwhile True:\n    try:\n        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n    except OSError:\n        time.sleep(0.01)\n"
    );
    let bomb = with_platform(
        ExecSpec {
            arguments: vec!["python3".into(), "-c".into(), script],
            environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
            timeout: Some(Duration::from_secs(3)),
            ..Default::default()
        },
        &[("pids", "64")],
    );
    let started = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn({
        let (marker, done) = (marker.clone(), done.clone());
        async move {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(host_processes_matching(&marker));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            most
        }
    });
    let response = execute(&remote, &bomb).await.unwrap();
    done.store(true, Ordering::Relaxed);
    assert_eq!(
        Code::from_i32(response.status.as_ref().unwrap().code),
        Code::DeadlineExceeded
    );
    let most = watcher.await.unwrap();
    assert!(most > 10 && most <= 64, "{most} bomb processes at once");
    assert!(started.elapsed() < Duration::from_secs(20));
    // Nothing of the bomb survives, and the next action runs normally.
    for _ in 0..100 {
        if host_processes_matching(&marker) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(host_processes_matching(&marker), 0);
    let (code, stdout, _, _) = run(&remote, shell("echo fine")).await;
    assert_eq!((code, stdout.as_str()), (0, "fine\n"));
}

/// Counts entries in a directory (0 if it does not exist).
fn entries(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// The worker's action cgroups (under `/paddock/{name}-{place}`), on whatever cgroup
/// layout this machine has.
fn action_cgroups(worker: &str) -> usize {
    let dirs = |root: &str| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(root)
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("{worker}-"))
                    })
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let count = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .count()
            })
            .unwrap_or(0)
    };
    dirs("/sys/fs/cgroup/memory/paddock")
        .iter()
        .chain(&dirs("/sys/fs/cgroup/paddock"))
        .map(|d| count(d))
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_actions_leave_nothing_behind() {
    let server = Farm::server("127.0.0.1:0", &[]);
    let name = format!("leak-{}", rand::random::<u32>());
    let worker = Worker::start(&server.worker_url, &name, &["--capacity", "4"]);
    let remote = server.remote("").await;
    let marker = format!(
        "{}.{:04}",
        90 + rand::random::<u32>() % 9,
        rand::random::<u32>() % 10000
    );
    let mut tasks = Vec::new();
    for i in 0..500 {
        let remote = remote.clone();
        let spec = if i % 25 == 0 {
            // Killed at its timeout, with a child in the background.
            ExecSpec {
                timeout: Some(Duration::from_millis(300)),
                ..shell(&format!("sleep {marker} & sleep {marker}; echo {i}"))
            }
        } else {
            shell(&format!("echo {i} > /tmp/x; cat /tmp/x"))
        };
        tasks.push(tokio::spawn(async move {
            execute(&remote, &spec).await.unwrap()
        }));
        if tasks.len() >= 16 {
            let response = tasks.remove(0).await.unwrap();
            assert!(response
                .status
                .as_ref()
                .is_some_and(|s| s.code == 0 || s.code == Code::DeadlineExceeded as i32));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    // A helper answers before it tears its container down: give teardown its moment.
    let leftovers = || {
        let mut left = Vec::new();
        if host_processes_matching(&format!("sleep {marker}")) > 0 {
            left.push("processes".to_owned());
        }
        // The worker's one child is its zygote, which has no helpers left.
        let zygote = common::children_of(worker.pid());
        if zygote.len() != 1 {
            left.push(format!("the worker's children: {zygote:?}"));
        } else if !common::children_of(zygote[0]).is_empty() {
            left.push("helpers".to_owned());
        }
        if action_cgroups(&name) > 0 {
            left.push("cgroups".to_owned());
        }
        if entries(&worker.work_dir().join("sandbox/state")) > 0 {
            left.push("container state".to_owned());
        }
        if entries(&worker.work_dir().join("actions")) > 0 {
            left.push("action directories".to_owned());
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        if mounts.contains(&worker.work_dir().display().to_string()) {
            left.push("mounts".to_owned());
        }
        left
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !leftovers().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(leftovers(), Vec::<String>::new(), "left behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_worker_kills_its_actions_and_removes_their_cgroups() {
    let server = Farm::server("127.0.0.1:0", &[]);
    let name = format!("stopped-{}", rand::random::<u32>());
    let mut worker = Worker::start(&server.worker_url, &name, &["--capacity", "2"]);
    let remote = server.remote("").await;
    let marker = format!(
        "{}.{:04}",
        110 + rand::random::<u32>() % 9,
        rand::random::<u32>() % 10000
    );
    let needle = format!("sleep {marker}");
    let mut clients = Vec::new();
    for i in 0..2 {
        let remote = remote.clone();
        // A child in the background too: the whole container must go. (The `echo`
        // never runs; it keeps the two actions from being merged into one.)
        let spec = shell(&format!("sleep {marker} & sleep {marker}; echo {i}"));
        clients.push(tokio::spawn(async move { execute(&remote, &spec).await }));
    }
    // Per action: the shell (its command line names the sleeps too) and two sleeps.
    for _ in 0..400 {
        if host_processes_matching(&needle) == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(host_processes_matching(&needle), 6, "{}", worker.log());
    assert_eq!(action_cgroups(&name), 2);
    let status = worker.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "the worker did not stop cleanly ({status:?}):\n{}",
        worker.log()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while (host_processes_matching(&needle) > 0 || action_cgroups(&name) > 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(host_processes_matching(&needle), 0, "actions survived");
    assert_eq!(action_cgroups(&name), 0, "cgroups left");
    assert_eq!(entries(&worker.work_dir().join("sandbox/state")), 0);
    for client in clients {
        client.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_worker_cleans_up_what_its_previous_life_left() {
    // One attempt only: the lost action must not come back to the restarted worker.
    let server = Farm::server(
        "127.0.0.1:0",
        &["--config", &config_file("[scheduler]\nmax_attempts = 1\n")],
    );
    let name = format!("phoenix-{}", rand::random::<u32>());
    let mut worker = Worker::start(&server.worker_url, &name, &["--capacity", "1"]);
    let remote = server.remote("").await;
    let marker = format!(
        "{}.{:04}",
        100 + rand::random::<u32>() % 9,
        rand::random::<u32>() % 10000
    );
    let stuck = {
        let remote = remote.clone();
        let spec = shell(&format!("exec sleep {marker}"));
        tokio::spawn(async move { execute(&remote, &spec).await })
    };
    let needle = format!("sleep {marker}");
    for _ in 0..600 {
        if host_processes_matching(&needle) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(host_processes_matching(&needle), 1);
    // Kill the worker and its helper at once, as a power cut of the process tree
    // would: the container is orphaned.
    worker.kill_tree();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        host_processes_matching(&needle),
        1,
        "the orphan is still running"
    );
    assert!(action_cgroups(&name) > 0);
    worker.restart();
    for _ in 0..600 {
        if host_processes_matching(&needle) == 0 && action_cgroups(&name) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        host_processes_matching(&needle),
        0,
        "the orphaned container was not killed:\n{}",
        worker.log()
    );
    assert_eq!(
        action_cgroups(&name),
        0,
        "the orphaned cgroup was not removed"
    );
    assert_eq!(entries(&worker.work_dir().join("sandbox/state")), 0);
    stuck.abort();
    let (code, stdout, _, _) = run(&remote, shell("echo back")).await;
    assert_eq!((code, stdout.as_str()), (0, "back\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_host_runner_remains_an_explicit_choice() {
    let farm = Farm::start(&["--runner", "host"]);
    let remote = farm.remote("").await;
    let (code, stdout, _, response) = run(&remote, shell("hostname; id -u")).await;
    assert_eq!(code, 0);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(stdout.lines().next().unwrap(), host.trim());
    let metadata = response.result.unwrap().execution_metadata.unwrap();
    assert!(
        metadata.auxiliary_metadata.is_empty(),
        "no cgroup, no usage figures"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_beyond_the_workers_maximum_are_capped() {
    let farm = Farm::start(&[
        "--config",
        &config_file("[worker.sandbox]\nmax_memory = \"256MiB\"\ndefault_memory = \"128MiB\"\n"),
    ]);
    let remote = farm.remote("").await;
    let (_, _, _, response) =
        run(&remote, with_platform(shell("true"), &[("memory", "2GiB")])).await;
    assert_eq!(
        usage_of(response.result.as_ref().unwrap()).memory_limit_bytes,
        256 << 20
    );
    let (_, _, _, response) = run(&remote, shell("true")).await;
    assert_eq!(
        usage_of(response.result.as_ref().unwrap()).memory_limit_bytes,
        128 << 20
    );
}
