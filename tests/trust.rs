//! Trust under faults, with real processes: workers that corrupt or alter outputs,
//! fail their set-up, crawl, or come and go; a server killed mid-burst; operators'
//! orders; and a load test. The figures these tests print are recorded in
//! RELIABILITY.md.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config_file, free_address, paddock_bin, workers, Farm, Worker};
use futures::StreamExt;
use paddock_client::exec::{execute, prepare, ExecSpec};
use paddock_client::Remote;
use paddock_proto::admin::v1::{admin_client::AdminClient, Worker as Listed};
use paddock_reapi::proto::longrunning::operation;
use paddock_reapi::proto::re::{ExecuteRequest, ExecuteResponse, GetActionResultRequest};
use paddock_reapi::status::unpack;
use paddock_reapi::Digest;
use tonic::Code;

/// An action that writes `value` to `out.txt` (and something else on stdout, so
/// that no other blob of the result has the file's digest).
fn writes(value: &str) -> ExecSpec {
    ExecSpec {
        arguments: vec![
            "sh".into(),
            "-c".into(),
            format!("echo {value} > out.txt; echo wrote {value}"),
        ],
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        output_paths: vec!["out.txt".into()],
        ..Default::default()
    }
}

/// Workers here run plain processes: these tests are about the scheduler's trust,
/// and the host runner keeps thousands of actions quick.
fn host_worker(url: &str, name: &str, extra: &[&str]) -> Worker {
    let mut args = vec!["--runner", "host", "--capacity", "2"];
    args.extend_from_slice(extra);
    Worker::start(url, name, &args)
}

/// Two healthy workers and one that corrupts every output, connected.
async fn corrupting_fleet(server: &Farm) -> [Worker; 3] {
    let fleet = [
        host_worker(&server.worker_url, "good-1", &[]),
        host_worker(&server.worker_url, "good-2", &[]),
        host_worker(
            &server.worker_url,
            "corrupter",
            &["--dangerous-fault-injection", "corrupt-outputs=1"],
        ),
    ];
    wait_connected(&server.url, &["good-1", "good-2", "corrupter"]).await;
    fleet
}

async fn text(remote: &Remote, digest: Option<&paddock_reapi::proto::re::Digest>) -> String {
    let digest = Digest::from_proto(digest).expect("a digest");
    String::from_utf8(remote.read_blob(&digest).await.unwrap().to_vec()).unwrap()
}

/// The content of `out.txt` in a result, downloaded.
async fn output(remote: &Remote, response: &ExecuteResponse) -> String {
    let result = response.result.as_ref().expect("a result");
    let file = result
        .output_files
        .iter()
        .find(|f| f.path == "out.txt")
        .expect("out.txt");
    text(remote, file.digest.as_ref()).await
}

async fn wait_for_standing(url: &str, worker: &str, standing: &str, within: Duration) -> Listed {
    let deadline = Instant::now() + within;
    loop {
        let found = workers(url).await.remove(worker);
        if let Some(w) = found.filter(|w| w.standing == standing) {
            return w;
        }
        assert!(
            Instant::now() < deadline,
            "{worker} did not become {standing}: {:?}",
            workers(url).await.get(worker)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `count` actions writing `{tag}-{i}`, `parallel` at a time; checks every
/// answer and returns the workers that produced them.
async fn run_checked(remote: &Remote, tag: &str, count: usize, parallel: usize) -> Vec<String> {
    let mut producers = Vec::new();
    let mut pending = Vec::new();
    for i in 0..count {
        let client = remote.clone();
        let value = format!("{tag}-{i}");
        pending.push(tokio::spawn(async move {
            let response = execute(&client, &writes(&value)).await.unwrap();
            (value, response)
        }));
        if pending.len() >= parallel || i + 1 == count {
            for task in pending.drain(..) {
                let (value, response) = task.await.unwrap();
                let status = response.status.clone().unwrap_or_default();
                assert_eq!(status.code, 0, "{value}: {}", status.message);
                assert_eq!(output(remote, &response).await, format!("{value}\n"));
                let result = response.result.as_ref().unwrap();
                producers.push(result.execution_metadata.as_ref().unwrap().worker.clone());
            }
        }
    }
    producers
}

/// Every cached result of `count` actions tagged `tag` downloads and is right.
async fn check_cache(remote: &Remote, tag: &str, count: usize) -> usize {
    let mut cached = 0;
    for i in 0..count {
        let value = format!("{tag}-{i}");
        let action = prepare(&writes(&value)).await.unwrap().digest;
        let found = remote
            .action_cache()
            .get_action_result(GetActionResultRequest {
                action_digest: Some(action.to_proto()),
                ..Default::default()
            })
            .await;
        match found {
            Ok(result) => {
                let response = ExecuteResponse {
                    result: Some(result.into_inner()),
                    ..Default::default()
                };
                assert_eq!(output(remote, &response).await, format!("{value}\n"));
                cached += 1;
            }
            Err(status) => assert_eq!(status.code(), Code::NotFound, "{value}"),
        }
    }
    cached
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupting_worker_never_reaches_clients_or_the_cache_and_is_quarantined() {
    let server = Farm::server("127.0.0.1:0", &[]);
    let _fleet = corrupting_fleet(&server).await;
    let remote = server.remote("").await;
    let started = Instant::now();
    let producers = run_checked(&remote, "corrupt", 80, 8).await;
    assert!(
        !producers.iter().any(|w| w == "corrupter"),
        "a corrupted result was returned"
    );
    assert_eq!(check_cache(&remote, "corrupt", 80).await, 80);
    let fleet = workers(&server.url).await;
    let bad = &fleet["corrupter"];
    assert_eq!(bad.standing, "quarantined", "{bad:?}");
    let handled = bad.totals.as_ref().unwrap().outcomes;
    // Judged at min_samples (8) outcomes, plus what was in flight on its 2 slots.
    assert!(
        handled <= 10,
        "quarantined only after {handled} actions: {bad:?}"
    );
    for good in ["good-1", "good-2"] {
        assert_eq!(fleet[good].standing, "active", "{:?}", fleet[good]);
    }
    println!(
        "RELIABILITY corrupting worker: 80 actions, 3 workers, every result of one corrupted; \
         quarantined after {handled} of its actions ({}); 0 corrupt results returned or cached; {:.1}s",
        bad.reason,
        started.elapsed().as_secs_f64()
    );
}

/// What the scheduler knows of its workers outlives it: saved at a graceful stop,
/// and a quarantine is saved as it happens, so a crash right after does not lift it.
#[tokio::test(flavor = "multi_thread")]
async fn quarantines_and_health_windows_survive_a_restart_and_a_crash() {
    let mut server = Farm::server(&free_address(), &[]);
    let _fleet = corrupting_fleet(&server).await;
    run_checked(&server.remote("").await, "saved", 40, 8).await;
    let before = workers(&server.url).await;
    assert_eq!(before["corrupter"].standing, "quarantined");

    // A crash straight after: the quarantine was saved when it happened.
    server.kill9();
    server.start_again();
    wait_connected(&server.url, &["good-1", "good-2", "corrupter"]).await;
    let after = workers(&server.url).await;
    let bad = &after["corrupter"];
    // Outcomes after the quarantine (its other slot's action) may be lost with the
    // crash; the quarantine itself is not.
    assert_eq!(bad.standing, "quarantined", "{bad:?}");
    assert_eq!(bad.reason, before["corrupter"].reason);
    let producers = run_checked(&server.remote("").await, "after-crash", 20, 4).await;
    assert!(
        !producers.iter().any(|w| w == "corrupter"),
        "a quarantined worker got work after a restart"
    );

    // A graceful restart saves the health windows as they are at the stop.
    let before = workers(&server.url).await;
    server.restart();
    wait_connected(&server.url, &["good-1", "good-2", "corrupter"]).await;
    let after = workers(&server.url).await;
    for name in ["good-1", "good-2", "corrupter"] {
        assert_eq!(after[name].standing, before[name].standing, "{name}");
        assert_eq!(after[name].totals, before[name].totals, "{name}");
        assert_eq!(after[name].recent, before[name].recent, "{name}");
    }
    assert_eq!(after["corrupter"].standing, "quarantined");

    // A saved state it cannot read stops the start-up rather than being forgotten.
    server.stop();
    let file = server.data_dir.join("scheduler.json");
    std::fs::write(&file, "{\"version\": 1, \"workers\": [").unwrap();
    let output = common::output_within(
        std::process::Command::new(paddock_bin())
            .args(["server", "--listen", "127.0.0.1:0"])
            .args([
                "--worker-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(&server.data_dir),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("scheduler.json") && stderr.contains("malformed"),
        "{stderr}"
    );
}

/// A gauge for one pool in the farm's metrics.
fn pool_gauge(server: &Farm, name: &str, pool: &str) -> Option<f64> {
    let prefix = format!("{name}{{pool=\"{pool}\"}} ");
    common::http_get(&server.metrics_url)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

async fn wait_for_gauge(server: &Farm, name: &str, pool: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool_gauge(server, name, pool) != Some(value) {
        assert!(
            Instant::now() < deadline,
            "{name} of pool {pool:?} is {:?}, not {value}",
            pool_gauge(server, name, pool)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The autoscaling signal follows the queue up and the idle workers down, per pool,
/// in `/metrics` and in `paddock workers list`.
#[tokio::test(flavor = "multi_thread")]
async fn each_pool_reports_the_workers_it_should_have() {
    let server = Farm::server(
        "127.0.0.1:0",
        &[
            "--config",
            &config_file("[scheduler.autoscaling]\nidle_after = \"2s\"\npools = [\"gpu\"]\n"),
        ],
    );
    let _w = host_worker(&server.worker_url, "small", &["--property", "Pool=cpp"]);
    wait_connected(&server.url, &["small"]).await;
    wait_for_gauge(&server, "paddock_pool_slots", "cpp", 2.0).await;
    // Nothing waits, nothing runs: the pool's one worker becomes idle, and the
    // configured pool with no workers wants none.
    wait_for_gauge(&server, "paddock_pool_desired_workers", "cpp", 0.0).await;
    assert_eq!(
        pool_gauge(&server, "paddock_pool_desired_workers", "gpu"),
        Some(0.0)
    );

    // 2 running and 12 waiting on 2 slots: 4 per slot, twice the threshold, so
    // twice the workers (of 2 slots each: 12 / (2 × 2) = 3).
    let remote = server.remote("").await;
    let sleep = |i: usize| ExecSpec {
        // Long enough that none finishes while the test looks (they are aborted).
        arguments: vec!["sh".into(), "-c".into(), format!("sleep 300; echo {i}")],
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        platform: vec![("Pool".into(), "cpp".into())],
        ..Default::default()
    };
    let mut running = Vec::new();
    for i in 0..14 {
        let remote = remote.clone();
        let spec = sleep(i);
        running.push(tokio::spawn(async move {
            execute(&remote, &spec).await.unwrap()
        }));
    }
    wait_for_gauge(&server, "paddock_pool_queued", "cpp", 12.0).await;
    wait_for_gauge(&server, "paddock_pool_desired_workers", "cpp", 3.0).await;
    assert_eq!(
        pool_gauge(&server, "paddock_pool_running", "cpp"),
        Some(2.0)
    );
    let output = std::process::Command::new(paddock_bin())
        .args(["workers", "list", "--remote", &server.url])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&output.stdout);
    let line = listed
        .lines()
        .find(|l| l.starts_with("cpp "))
        .unwrap_or_else(|| panic!("{listed}"));
    let columns: Vec<&str> = line.split_whitespace().collect();
    // POOL QUEUED WORKERS SLOTS RUNNING IDLE DESIRED
    assert_eq!(columns, ["cpp", "12", "1", "2", "2", "0", "3"], "{listed}");
    for task in running {
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_sandbox_fails_half_the_time_loses_nothing() {
    let server = Farm::server(
        "127.0.0.1:0",
        &["--config", &config_file("[scheduler]\nmax_attempts = 6\n")],
    );
    let _good = host_worker(&server.worker_url, "steady", &[]);
    let _flaky = host_worker(
        &server.worker_url,
        "flaky",
        &["--dangerous-fault-injection", "fail-setup=0.5"],
    );
    wait_connected(&server.url, &["steady", "flaky"]).await;
    let remote = server.remote("").await;
    run_checked(&remote, "flaky", 60, 6).await;
    let fleet = workers(&server.url).await;
    let flaky = &fleet["flaky"];
    let totals = flaky.totals.as_ref().unwrap();
    println!(
        "RELIABILITY flaky sandbox: 60 actions, 2 workers, one failing set-up half the time: \
         {} of its {} attempts failed; it ended {} ({}); 0 actions lost",
        totals.infra_failures, totals.outcomes, flaky.standing, flaky.reason
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn disagreeing_results_are_settled_by_a_third_worker() {
    let config = config_file("[scheduler.quarantine]\nverify_sample_rate = 1.0\n");
    let server = Farm::server("127.0.0.1:0", &["--config", &config]);
    let _good1 = host_worker(&server.worker_url, "honest-1", &[]);
    let _good2 = host_worker(&server.worker_url, "honest-2", &[]);
    let _liar = host_worker(
        &server.worker_url,
        "liar",
        &["--dangerous-fault-injection", "alter-outputs=1"],
    );
    wait_connected(&server.url, &["honest-1", "honest-2", "liar"]).await;
    let remote = server.remote("").await;
    // Its answers are consistent, so they pass validation: a client may get one.
    // Verification catches them afterwards.
    let count = 40;
    let mut pending = Vec::new();
    for i in 0..count {
        let remote = remote.clone();
        pending.push(tokio::spawn(async move {
            execute(&remote, &writes(&format!("dispute-{i}")))
                .await
                .unwrap()
        }));
    }
    for task in pending {
        assert_eq!(task.await.unwrap().status.unwrap_or_default().code, 0);
    }
    let liar = wait_for_standing(&server.url, "liar", "quarantined", Duration::from_secs(60)).await;
    let disagreements = liar.totals.as_ref().unwrap().disagreements;
    assert!(disagreements >= 1, "{liar:?}");
    // Once the verifications settle, every cached result is the honest one.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let idle = workers(&server.url).await.values().all(|w| w.running == 0);
        if idle && check_cache_quietly(&remote, "dispute", count).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "altered results stayed in the cache"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "RELIABILITY altering worker: {count} actions, every one verified on a second worker; \
         {disagreements} disagreements settled against it by a third; quarantined ({}); \
         every cached result honest afterwards",
        liar.reason
    );
}

/// Whether every cached result of the tagged actions is the honest one.
async fn check_cache_quietly(remote: &Remote, tag: &str, count: usize) -> bool {
    for i in 0..count {
        let value = format!("{tag}-{i}");
        let action = prepare(&writes(&value)).await.unwrap().digest;
        let Ok(result) = remote
            .action_cache()
            .get_action_result(GetActionResultRequest {
                action_digest: Some(action.to_proto()),
                ..Default::default()
            })
            .await
        else {
            continue;
        };
        let response = ExecuteResponse {
            result: Some(result.into_inner()),
            ..Default::default()
        };
        if output(remote, &response).await != format!("{value}\n") {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quarantined_worker_is_probed_with_canaries_and_released_when_healthy() {
    let config = config_file("[scheduler.quarantine]\ncooldown = \"1s\"\ncanaries = 2\n");
    let server = Farm::server("127.0.0.1:0", &["--config", &config]);
    let _good1 = host_worker(&server.worker_url, "steady-1", &[]);
    let _good2 = host_worker(&server.worker_url, "steady-2", &[]);
    let mut phoenix = host_worker(
        &server.worker_url,
        "phoenix",
        &["--dangerous-fault-injection", "corrupt-outputs=1"],
    );
    wait_connected(&server.url, &["steady-1", "steady-2", "phoenix"]).await;
    let remote = server.remote("").await;
    let started = Instant::now();
    run_checked(&remote, "probe", 40, 6).await;
    let quarantined = wait_for_standing(
        &server.url,
        "phoenix",
        "quarantined",
        Duration::from_secs(10),
    )
    .await;
    let handled = quarantined.totals.unwrap_or_default().outcomes;
    // Still corrupting, it fails its canaries and goes back for longer.
    tokio::time::timeout(Duration::from_secs(15), async {
        while failed_probe(&server.url).await.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a failed probe");
    let failed_at = started.elapsed();
    // Repaired (restarted without the fault, same name), it passes and is released.
    phoenix.kill9();
    let _phoenix = host_worker(&server.worker_url, "phoenix", &[]);
    let repaired_at = started.elapsed();
    let released =
        wait_for_standing(&server.url, "phoenix", "active", Duration::from_secs(30)).await;
    println!(
        "RELIABILITY probes: quarantined after {handled} actions; still corrupting, it failed its \
         canaries {:.1} s in (cool-down 1 s); repaired at {:.1} s, it passed 2 canaries and was \
         released at {:.1} s",
        failed_at.as_secs_f64(),
        repaired_at.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        released.reason.contains("passed 2 canaries"),
        "{released:?}"
    );
    // And it takes work again.
    let producers = run_checked(&remote, "after", 20, 6).await;
    assert!(producers.iter().any(|w| w == "phoenix"), "{producers:?}");
}

async fn failed_probe(url: &str) -> Option<Listed> {
    workers(url)
        .await
        .remove("phoenix")
        .filter(|w| w.standing == "quarantined" && w.reason.contains("failed a canary"))
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_drain_quarantine_release_and_invalidate() {
    let server = Farm::server("127.0.0.1:0", &[]);
    let _w = host_worker(&server.worker_url, "solo", &[]);
    let remote = server.remote("").await;
    run_checked(&remote, "ops", 3, 3).await;
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(paddock_bin())
            .args(args)
            .args(["--remote", &server.url])
            .output()
            .unwrap();
        (
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    };
    let (ok, listed) = cli(&["workers", "list"]);
    assert!(
        ok && listed.contains("solo") && listed.contains("active"),
        "{listed}"
    );

    // Drained, it takes nothing new; released, it runs what waited.
    let (ok, out) = cli(&["workers", "drain", "solo", "--reason", "kernel update"]);
    assert!(
        ok && out.contains("draining") && out.contains("kernel update"),
        "{out}"
    );
    let waiting = {
        let remote = remote.clone();
        tokio::spawn(async move { execute(&remote, &writes("ops-late")).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!waiting.is_finished(), "a draining worker took new work");
    let (ok, out) = cli(&["workers", "quarantine", "solo"]);
    assert!(ok && out.contains("quarantined"), "{out}");
    let (ok, out) = cli(&["workers", "release", "solo"]);
    assert!(ok && out.contains("active"), "{out}");
    let late = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output(&remote, &late).await, "ops-late\n");
    let (ok, out) = cli(&["workers", "drain", "nobody"]);
    assert!(!ok && out.contains("nobody"), "{out}");

    // One entry by action, then everything the worker made in the last hour.
    let action = prepare(&writes("ops-0")).await.unwrap().digest;
    let (ok, out) = cli(&["cache", "invalidate", "--action", &action.to_string()]);
    assert!(ok && out.contains("removed 1"), "{out}");
    assert_eq!(check_cache(&remote, "ops", 3).await, 2);
    let (ok, out) = cli(&["cache", "invalidate", "--worker", "solo", "--since", "1h"]);
    assert!(ok && out.contains("removed 3"), "{out}"); // ops-1, ops-2, ops-late
    assert_eq!(check_cache(&remote, "ops", 3).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_killed_mid_burst_serves_nothing_partial_and_clients_finish() {
    let mut farm = Farm::start(&["--runner", "host"]);
    let url = Arc::new(parking_lot::RwLock::new(farm.url.clone()));
    let done = Arc::new(AtomicUsize::new(0));
    let clients = 8;
    let per_client = 30;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (url, done) = (url.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..per_client {
                // A unique input of 64 KiB to 2 MiB, and an action that copies it.
                let size = 64 * 1024 + rand::random::<u32>() as usize % (2 << 20);
                let mut data = vec![0u8; size];
                rand::fill(&mut data[..]);
                let dir = tempfile::tempdir().unwrap();
                std::fs::write(dir.path().join("in.bin"), &data).unwrap();
                let spec = ExecSpec {
                    arguments: vec!["cp".into(), "in.bin".into(), "out.bin".into()],
                    environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
                    input: Some(dir.path().to_owned()),
                    output_paths: vec!["out.bin".into()],
                    ..Default::default()
                };
                let action = prepare(&spec).await.unwrap().digest;
                // Retry until it works, reconnecting wherever the server now is.
                let response = loop {
                    let current = url.read().clone();
                    let attempt = async {
                        let remote = Remote::connect(&current, "").await?;
                        execute(&remote, &spec).await
                    };
                    match tokio::time::timeout(Duration::from_secs(30), attempt).await {
                        Ok(Ok(r)) if r.status.as_ref().is_none_or(|s| s.code == 0) => break r,
                        _ => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                };
                done.fetch_add(1, Ordering::Relaxed);
                results.push((action, Digest::of(&data), response));
            }
            results
        }));
    }
    // Kill the server (and its worker) with SIGKILL in the middle of the burst.
    while done.load(Ordering::Relaxed) < clients * per_client / 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    farm.kill9();
    let finished_before = done.load(Ordering::Relaxed);
    farm.start_again();
    *url.write() = farm.url.clone();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(
            tokio::time::timeout(Duration::from_secs(300), task)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(all.len(), clients * per_client);
    // Every answer downloads whole and right, and so does every ActionCache entry:
    // an entry is either absent or complete.
    let remote = farm.remote("").await;
    let mut cached = 0;
    for (action, input, response) in &all {
        let result = response.result.as_ref().unwrap();
        let out = Digest::from_proto(result.output_files[0].digest.as_ref()).unwrap();
        assert_eq!(out, *input, "the output is not the input");
        let bytes = remote.read_blob(&out).await.unwrap();
        assert_eq!(
            Digest::of(&bytes),
            *input,
            "a blob was served partial or corrupt"
        );
        let entry = remote
            .action_cache()
            .get_action_result(GetActionResultRequest {
                action_digest: Some(action.to_proto()),
                ..Default::default()
            })
            .await;
        match entry {
            Ok(entry) => {
                let entry = entry.into_inner();
                let out = Digest::from_proto(entry.output_files[0].digest.as_ref()).unwrap();
                assert_eq!(Digest::of(&remote.read_blob(&out).await.unwrap()), *input);
                cached += 1;
            }
            Err(status) => assert_eq!(status.code(), Code::NotFound),
        }
    }
    println!(
        "RELIABILITY server kill -9: {clients} clients x {per_client} uploads and actions, SIGKILL after {finished_before} \
         had finished; all {} finished after retries against the restarted server; every output and \
         {cached} cache entries downloaded whole and right; 0 partial or corrupt blobs served",
        all.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_straggler_gets_a_speculative_copy_that_wins() {
    let config = config_file(
        "[scheduler.speculation]\nenabled = true\nmultiple = 2.0\nmin_runtime = \"1s\"\nmin_samples = 3\n",
    );
    let server = Farm::server("127.0.0.1:0", &["--config", &config]);
    let _fast = host_worker(&server.worker_url, "fast", &[]);
    let remote = server.remote("").await;
    // History: similar actions take a fraction of a second.
    for i in 0..4 {
        let spec = ExecSpec {
            arguments: vec!["sh".into(), "-c".into(), format!("sleep 0.2; echo {i}")],
            ..Default::default()
        };
        assert_eq!(
            execute(&remote, &spec)
                .await
                .unwrap()
                .status
                .unwrap_or_default()
                .code,
            0
        );
    }
    // A slow machine joins; with the fast one drained, the next action lands there.
    let _slow = host_worker(
        &server.worker_url,
        "slow",
        &["--dangerous-fault-injection", "delay=60s"],
    );
    let admin =
        || async { AdminClient::new(Remote::connect(&server.url, "").await.unwrap().channel()) };
    use paddock_proto::admin::v1::{
        command_worker_request::Command as Order, CommandWorkerRequest,
    };
    let order = |name: &str, command: Order| CommandWorkerRequest {
        name: name.into(),
        command: command as i32,
        reason: String::new(),
    };
    admin()
        .await
        .command_worker(order("fast", Order::Drain))
        .await
        .unwrap();
    wait_connected(&server.url, &["slow"]).await;
    let started = Instant::now();
    let straggler = {
        let remote = remote.clone();
        tokio::spawn(async move {
            let spec = ExecSpec {
                arguments: vec!["sh".into(), "-c".into(), "sleep 0.2; echo straggler".into()],
                ..Default::default()
            };
            execute(&remote, &spec).await.unwrap()
        })
    };
    // Only once the slow worker has it may the fast one come back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while workers(&server.url).await["slow"].running == 0 {
        assert!(
            Instant::now() < deadline,
            "the slow worker never took the action"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin()
        .await
        .command_worker(order("fast", Order::Release))
        .await
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), straggler)
        .await
        .expect("the straggler waited for the slow worker")
        .unwrap();
    let result = response.result.unwrap();
    assert_eq!(result.execution_metadata.unwrap().worker, "fast");
    let metrics = common::http_get(&server.metrics_url);
    assert!(
        metrics.contains("paddock_speculative_executions_total{event=\"won\"} 1"),
        "{metrics}"
    );
    println!(
        "RELIABILITY straggler: a 0.2 s action stuck behind a 60 s delay finished in {:.1} s through its speculative copy",
        started.elapsed().as_secs_f64()
    );
}

/// Waits until every one of `names` has a session with the scheduler: load sent
/// earlier would find only part of the fleet.
async fn wait_connected(url: &str, names: &[&str]) {
    for _ in 0..600 {
        let fleet = workers(url).await;
        if names
            .iter()
            .all(|name| fleet.get(*name).is_some_and(|w| w.connected))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not all of {names:?} connected");
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_thousand_actions_from_fifty_clients_with_workers_coming_and_going() {
    let config = config_file("[scheduler]\nmax_attempts = 20\n");
    let server = Farm::server("127.0.0.1:0", &["--config", &config]);
    let mut fleet: Vec<Worker> = (0..3)
        .map(|i| {
            Worker::start(
                &server.worker_url,
                &format!("load-{i}"),
                &["--runner", "host", "--capacity", "4"],
            )
        })
        .collect();
    let clients = 50;
    let per_client = 400;
    let answers = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let url = server.url.clone();
        let answers = answers.clone();
        tasks.push(tokio::spawn(async move {
            let remote = Remote::connect(&url, "").await.unwrap();
            let mut wrong = Vec::new();
            for i in 0..per_client {
                let value = format!("{c}-{i}");
                let spec = ExecSpec {
                    arguments: vec!["echo".into(), value.clone()],
                    environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
                    invocation: format!("client-{c}"),
                    ..Default::default()
                };
                let (finals, response) = execute_counting(&remote, &spec).await;
                answers.fetch_add(1, Ordering::Relaxed);
                let status = response.status.clone().unwrap_or_default();
                let stdout = match (&status.code, &response.result) {
                    (0, Some(result)) => text(&remote, result.stdout_digest.as_ref()).await,
                    _ => String::new(),
                };
                if finals != 1 || stdout != format!("{value}\n") {
                    wrong.push(format!(
                        "{value}: {finals} answers, {:?}, {stdout:?}",
                        status
                    ));
                }
            }
            wrong
        }));
    }
    // Workers leave (alternately killed and stopped) and new ones join while it runs.
    let mut next = 3;
    let mut churn = 0;
    while answers.load(Ordering::Relaxed) < clients * per_client * 9 / 10 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut leaving = fleet.remove(0);
        if churn % 2 == 0 {
            leaving.kill9();
        } else {
            leaving.stop();
        }
        churn += 1;
        fleet.push(Worker::start(
            &server.worker_url,
            &format!("load-{next}"),
            &["--runner", "host", "--capacity", "4"],
        ));
        next += 1;
    }
    let mut wrong = Vec::new();
    for task in tasks {
        wrong.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    assert!(
        wrong.is_empty(),
        "{} wrong answers, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(answers.load(Ordering::Relaxed), clients * per_client);
    println!(
        "RELIABILITY load: {} actions from {clients} clients in {:.0}s ({:.0}/s), {churn} workers left \
         (half killed with SIGKILL) and as many joined; every action answered exactly once, correctly",
        clients * per_client,
        elapsed.as_secs_f64(),
        (clients * per_client) as f64 / elapsed.as_secs_f64()
    );
}

/// Runs an action and reads its Execute stream to the end: how many final answers
/// it carried, and the (last) response.
async fn execute_counting(remote: &Remote, spec: &ExecSpec) -> (usize, ExecuteResponse) {
    let prepared = prepare(spec).await.unwrap();
    remote.upload_missing(prepared.blobs).await.unwrap();
    let mut request = tonic::Request::new(ExecuteRequest {
        action_digest: Some(prepared.digest.to_proto()),
        skip_cache_lookup: true,
        ..Default::default()
    });
    let metadata = paddock_reapi::proto::re::RequestMetadata {
        tool_invocation_id: spec.invocation.clone(),
        ..Default::default()
    };
    request.metadata_mut().insert_bin(
        "build.bazel.remote.execution.v2.requestmetadata-bin",
        tonic::metadata::MetadataValue::from_bytes(&prost::Message::encode_to_vec(&metadata)),
    );
    let mut stream = remote
        .execution()
        .execute(request)
        .await
        .unwrap()
        .into_inner();
    let mut finals = 0;
    let mut last = ExecuteResponse::default();
    while let Some(op) = stream.next().await {
        let op = op.unwrap();
        if op.done {
            finals += 1;
            if let Some(operation::Result::Response(any)) = op.result {
                last = unpack("build.bazel.remote.execution.v2.ExecuteResponse", &any).unwrap();
            }
        }
    }
    (finals, last)
}
