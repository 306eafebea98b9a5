//! Shared state in a real PostgreSQL (a throwaway cluster): servers sharing the
//! ActionCache and the workers' records, the schema's version check, and a database
//! that goes away and comes back.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::postgres::Postgres;
use common::{config_file, free_address, paddock_bin, Farm, Worker};
use paddock_client::exec::{execute, prepare, ExecSpec};
use paddock_client::Remote;
use paddock_proto::admin::v1::{
    admin_client::AdminClient, command_worker_request::Command as Order, CommandWorkerRequest,
    Worker as Listed,
};
use paddock_reapi::proto::longrunning::{operation, Operation};
use paddock_reapi::proto::re::{
    ActionResult, ExecuteRequest, ExecuteResponse, GetActionResultRequest, OutputFile,
    UpdateActionResultRequest, WaitExecutionRequest,
};
use paddock_reapi::Digest;
use tonic::Code;

/// An action that prints `text` (and a newline).
fn echo(text: &str) -> ExecSpec {
    ExecSpec {
        arguments: vec!["echo".into(), text.into()],
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        ..Default::default()
    }
}

fn shared(postgres: &Postgres) -> String {
    config_file(&format!(
        "[state]\nbackend = \"postgres\"\nurl = \"{}\"\nconnect_timeout = \"5s\"\n",
        postgres.url
    ))
}

fn server(postgres: &Postgres) -> Farm {
    Farm::server(&free_address(), &["--config", &shared(postgres)])
}

async fn listed(url: &str, name: &str) -> Option<Listed> {
    common::workers(url).await.remove(name)
}

async fn wait_listed(url: &str, name: &str, standing: &str) -> Listed {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(w) = listed(url, name)
            .await
            .filter(|w| w.standing == standing && w.connected)
        {
            return w;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not connected and {standing}: {:?}",
            listed(url, name).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An ActionResult whose only output is `blob`.
fn result_with(blob: &Digest) -> ActionResult {
    ActionResult {
        output_files: vec![OutputFile {
            path: "out".into(),
            digest: Some(blob.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Caches, for `action`, a result whose only output is `blob`.
async fn cache_result(remote: &Remote, action: &Digest, blob: &Digest) {
    remote
        .action_cache()
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(action.to_proto()),
            action_result: Some(result_with(blob)),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// The cached result of `action`, or why there is none.
async fn cached(remote: &Remote, action: &Digest) -> Result<ActionResult, tonic::Status> {
    remote
        .action_cache()
        .get_action_result(GetActionResultRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread")]
async fn servers_share_the_action_cache_and_the_workers_records() {
    let postgres = Postgres::start();
    let mut a = server(&postgres);
    let b = server(&postgres);
    let (on_a, on_b) = (a.remote("").await, b.remote("").await);

    // A result written through A is found through B (once B's CAS has its blobs:
    // each server still checks that what it serves is complete).
    let data = Bytes::from_static(b"shared output");
    let blob = Digest::of(&data);
    let action = Digest::of(b"an action digest for the shared cache");
    on_a.upload(vec![(blob, data.clone())]).await.unwrap();
    cache_result(&on_a, &action, &blob).await;
    assert_eq!(
        cached(&on_b, &action).await.unwrap_err().code(),
        Code::NotFound
    );
    on_b.upload(vec![(blob, data)]).await.unwrap();
    let found = cached(&on_b, &action).await.unwrap();
    assert_eq!(found.output_files[0].digest, Some(blob.to_proto()));
    let rows = postgres.sql("SELECT count(*), min(instance_name) FROM action_cache");
    assert_eq!(rows, "1|");

    // An action run through A is a cache hit through B.
    let _w = Worker::start(
        &a.worker_url,
        "roaming",
        &["--runner", "host", "--capacity", "1"],
    );
    let spec = ExecSpec {
        invocation: "inv-shared".into(),
        ..echo("shared")
    };
    let ran = execute(&on_a, &spec).await.unwrap();
    assert_eq!(ran.status.unwrap_or_default().code, 0);
    assert!(!ran.cached_result);
    let stdout = ran.result.as_ref().unwrap().stdout_digest.clone().unwrap();
    let stdout = Digest::from_proto(Some(&stdout)).unwrap();
    on_b.upload(vec![(stdout, Bytes::from_static(b"shared\n"))])
        .await
        .unwrap();
    let response = execute(&on_b, &spec).await.unwrap();
    assert!(response.cached_result, "{response:?}");

    // Each server's pages show the invocation as both served it: run through A,
    // then a cache hit through B.
    for farm in [&a, &b] {
        let page = farm
            .metrics_url
            .replace("/metrics", "/invocation/inv-shared");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let shown = common::http_get(&page);
            if shown.contains("1 executed, 1 cached") {
                break;
            }
            assert!(Instant::now() < deadline, "{page}: {shown}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let rows = postgres.sql("SELECT count(*) FROM history_entries WHERE invocation = 'inv-shared'");
    assert_eq!(rows, "2");

    // A quarantine ordered on A holds when the worker moves to B, and when A restarts.
    let mut admin = AdminClient::new(on_a.channel());
    admin
        .command_worker(CommandWorkerRequest {
            name: "roaming".into(),
            command: Order::Quarantine as i32,
            reason: "bad memory".into(),
        })
        .await
        .unwrap();
    drop(_w);
    let _moved = Worker::start(
        &b.worker_url,
        "roaming",
        &["--runner", "host", "--capacity", "1"],
    );
    let on_b_listed = wait_listed(&b.url, "roaming", "quarantined").await;
    assert!(on_b_listed.reason.contains("bad memory"), "{on_b_listed:?}");

    // An order given to A for the worker now on B reaches B (within seconds).
    let mut admin = AdminClient::new(a.remote("").await.channel());
    admin
        .command_worker(CommandWorkerRequest {
            name: "roaming".into(),
            command: Order::Drain as i32,
            reason: "kernel update".into(),
        })
        .await
        .unwrap();
    let drained = wait_listed(&b.url, "roaming", "draining").await;
    assert!(drained.reason.contains("kernel update"), "{drained:?}");
    admin
        .command_worker(CommandWorkerRequest {
            name: "roaming".into(),
            command: Order::Quarantine as i32,
            reason: "bad memory".into(),
        })
        .await
        .unwrap();
    wait_listed(&b.url, "roaming", "quarantined").await;
    a.restart();
    let after = listed(&a.url, "roaming")
        .await
        .expect("A remembers the worker");
    assert_eq!(after.standing, "quarantined");
    let stored = postgres
        .sql("SELECT record->'standing'->>'standing' FROM worker_records WHERE name = 'roaming'");
    assert_eq!(stored, "quarantined");
}

/// The shared history keeps to its bounds: past `[history] max_invocations`, the
/// least recently heard of goes from the table too (trimmed at start-up, and every
/// ten minutes).
#[tokio::test(flavor = "multi_thread")]
async fn the_shared_history_keeps_to_its_bounds() {
    let postgres = Postgres::start();
    let config = config_file(&format!(
        "[state]\nbackend = \"postgres\"\nurl = \"{}\"\nconnect_timeout = \"5s\"\n\
         [history]\nmax_invocations = 1\n",
        postgres.url
    ));
    let mut farm = Farm::server(&free_address(), &["--config", &config]);
    let remote = farm.remote("").await;
    for invocation in ["inv-first", "inv-second"] {
        let action = Digest::of(invocation.as_bytes());
        common::cache_hit(&remote, &action, invocation).await;
    }
    let invocations = "SELECT string_agg(DISTINCT invocation, ',') FROM history_entries";
    let deadline = Instant::now() + Duration::from_secs(20);
    while postgres.sql(invocations) != "inv-first,inv-second" {
        assert!(Instant::now() < deadline, "{}", postgres.sql(invocations));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    farm.restart();
    assert_eq!(postgres.sql(invocations), "inv-second");
    let listed = common::http_get(&farm.metrics_url.replace("/metrics", "/invocations"));
    assert!(
        listed.contains("inv-second") && !listed.contains("inv-first"),
        "{listed}"
    );
}

/// A worker given both servers' addresses moves to the other when its server dies,
/// and back when that one dies in turn; its standing follows it.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_moves_to_another_server_when_its_own_dies() {
    let postgres = Postgres::start();
    let mut a = server(&postgres);
    let mut b = server(&postgres);
    let both = format!("{},{}", a.worker_url, b.worker_url);
    let worker = Worker::start(&both, "mover", &["--runner", "host", "--capacity", "1"]);
    wait_listed(&a.url, "mover", "active").await;
    let ran = execute(&a.remote("").await, &echo("on-a")).await.unwrap();
    assert_eq!(ran.status.unwrap_or_default().code, 0, "{}", worker.log());

    // A dies: the worker goes to B at once (no back-off before trying B).
    a.kill9();
    let moved = Instant::now();
    wait_listed(&b.url, "mover", "active").await;
    let on_b = b.remote("").await;
    let ran = execute(&on_b, &echo("on-b")).await.unwrap();
    assert_eq!(ran.status.unwrap_or_default().code, 0, "{}", worker.log());
    assert!(
        moved.elapsed() < Duration::from_secs(10),
        "{:?}",
        moved.elapsed()
    );

    // A comes back and B dies: back to A, still drained as ordered through B.
    a.start_again();
    let mut admin = AdminClient::new(on_b.channel());
    admin
        .command_worker(CommandWorkerRequest {
            name: "mover".into(),
            command: Order::Drain as i32,
            reason: "moving racks".into(),
        })
        .await
        .unwrap();
    b.kill9();
    let back = wait_listed(&a.url, "mover", "draining").await;
    assert!(back.reason.contains("moving racks"), "{back:?}");
}

/// What `paddock server` printed when it refused to start with `config`.
fn refused_start(config: &str) -> String {
    let data = tempfile::tempdir().unwrap();
    let output = common::output_within(
        std::process::Command::new(paddock_bin())
            .args(["server", "--listen", "127.0.0.1:0"])
            .args(["--worker-listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0", "--config", config])
            .arg("--data-dir")
            .arg(data.path()),
        Duration::from_secs(60),
    );
    assert!(!output.status.success(), "it started");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The database over TLS: a server checks the database's certificate against
/// `state.tls_ca_file` and works through it; one that would talk in the clear is
/// refused by the database (which takes only TLS on its port), and one that
/// trusts another CA refuses the database's certificate.
#[tokio::test(flavor = "multi_thread")]
async fn the_database_is_reached_over_tls_with_its_certificate_checked() {
    let pki = common::pki::Pki::new();
    let postgres = Postgres::start_tls(&pki.path("server.pem"), &pki.path("server.key"));
    let section = |extra: &str| {
        config_file(&format!(
            "[state]\nbackend = \"postgres\"\nurl = \"{}\"\nconnect_timeout = \"3s\"\n{extra}",
            postgres.tls_url()
        ))
    };
    let trusting = |ca: &std::path::Path| section(&format!("tls_ca_file = \"{}\"\n", ca.display()));
    let server = Farm::server(
        &free_address(),
        &["--config", &trusting(&pki.path("ca.pem"))],
    );
    let remote = server.remote("").await;
    let data = Bytes::from_static(b"over tls");
    let blob = Digest::of(&data);
    let action = Digest::of(b"an action cached over tls");
    remote.upload(vec![(blob, data)]).await.unwrap();
    cache_result(&remote, &action, &blob).await;
    assert!(cached(&remote, &action).await.is_ok());
    assert_eq!(postgres.sql("SELECT count(*) FROM action_cache"), "1");
    let connections = postgres.sql(
        "SELECT count(*) > 0 AND bool_and(ssl) FROM pg_stat_ssl \
         JOIN pg_stat_activity USING (pid) WHERE application_name = 'paddock'",
    );
    assert_eq!(connections, "t", "every connection of the server is TLS");

    let clear = refused_start(&section(""));
    assert!(clear.contains("no encryption"), "{clear}");
    let other = common::pki::Authority::new("Another CA");
    let other_ca = pki.path("other-ca.pem");
    std::fs::write(&other_ca, &other.pem).unwrap();
    let untrusted = refused_start(&trusting(&other_ca));
    assert!(untrusted.contains("certificate"), "{untrusted}");
}

/// The final answer in an operation, if it has one.
fn answer(op: &Operation) -> Option<ExecuteResponse> {
    match op.result.as_ref()? {
        operation::Result::Response(any) => Some(
            paddock_reapi::status::unpack("build.bazel.remote.execution.v2.ExecuteResponse", any)
                .unwrap(),
        ),
        operation::Result::Error(e) => panic!("an operation's error field is set: {e:?}"),
    }
}

/// Follows an operation's stream to its answer; `Err` with what was seen if the
/// stream broke first. More than one final answer fails the test.
async fn follow(
    mut stream: tonic::Streaming<Operation>,
    name: &mut Option<String>,
) -> Option<ExecuteResponse> {
    let mut answered = None;
    while let Ok(Some(op)) = stream.message().await {
        *name = Some(op.name.clone());
        if op.done {
            assert!(answered.is_none(), "{} answered twice", op.name);
            answered = answer(&op);
        }
    }
    answered
}

/// Runs `spec` as a client of two servers that survives either going away: Execute
/// on one and, if the stream breaks, WaitExecution by name on either until the
/// answer comes. Blobs go to both servers (each has its own CAS); an action whose
/// blobs a server lacks (it was down during the upload) is uploaded and executed again.
async fn execute_surviving(
    remotes: &[Remote; 2],
    first: usize,
    spec: &ExecSpec,
) -> ExecuteResponse {
    let prepared = prepare(spec).await.unwrap();
    let mut turn = first;
    loop {
        for remote in remotes {
            let _ = remote.upload_missing(prepared.blobs.clone()).await;
        }
        let request = ExecuteRequest {
            action_digest: Some(prepared.digest.to_proto()),
            ..Default::default()
        };
        turn += 1;
        let mut name = None;
        let mut answered = match remotes[turn % 2].execution().execute(request).await {
            Ok(stream) => follow(stream.into_inner(), &mut name).await,
            Err(_) => None,
        };
        while answered.is_none() {
            let Some(n) = name.clone() else { break };
            turn += 1;
            let waited = remotes[turn % 2]
                .execution()
                .wait_execution(WaitExecutionRequest { name: n })
                .await;
            match waited {
                Ok(stream) => answered = follow(stream.into_inner(), &mut name).await,
                Err(status) if status.code() == Code::NotFound => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        match answered {
            Some(r)
                if r.status
                    .as_ref()
                    .is_some_and(|s| s.code == Code::FailedPrecondition as i32) => {}
            Some(r) => return r,
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Two servers share the queue, each with a worker and clients: every action is
/// answered correctly while one server is killed and started again, and while the
/// database restarts; nothing is left queued or running in the database.
#[tokio::test(flavor = "multi_thread")]
async fn two_servers_share_the_queue_through_a_server_crash_and_a_database_restart() {
    let postgres = Postgres::start();
    let config = config_file(&format!(
        "[state]\nbackend = \"postgres\"\nurl = \"{}\"\nconnect_timeout = \"5s\"\nlease = \"3s\"\n\
         [scheduler]\nmax_attempts = 20\n",
        postgres.url
    ));
    let mut a = Farm::server(&free_address(), &["--config", &config]);
    let b = Farm::server(&free_address(), &["--config", &config]);
    let _workers = [
        Worker::start(
            &format!("{},{}", a.worker_url, b.worker_url),
            "on-a",
            &["--runner", "host", "--capacity", "4"],
        ),
        Worker::start(
            &format!("{},{}", b.worker_url, a.worker_url),
            "on-b",
            &["--runner", "host", "--capacity", "4"],
        ),
    ];
    // A worker quarantined before the chaos; its standing must survive it.
    let _held = Worker::start(
        &format!("{},{}", b.worker_url, a.worker_url),
        "held",
        &["--runner", "host", "--capacity", "1"],
    );
    wait_listed(&b.url, "held", "active").await;
    AdminClient::new(b.remote("").await.channel())
        .command_worker(CommandWorkerRequest {
            name: "held".into(),
            command: Order::Quarantine as i32,
            reason: "faulty disk".into(),
        })
        .await
        .unwrap();
    wait_listed(&b.url, "held", "quarantined").await;
    let (a_url, b_url) = (a.url.clone(), b.url.clone());
    let clients = 50;
    let per_client = 100;
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (a_url, b_url, answered) = (a_url.clone(), b_url.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let remotes = [
                Remote::connect(&a_url, "").await.unwrap(),
                Remote::connect(&b_url, "").await.unwrap(),
            ];
            let mut wrong = Vec::new();
            for i in 0..per_client {
                let value = format!("{c}-{i}");
                let spec = ExecSpec {
                    invocation: format!("client-{c}"),
                    ..echo(&value)
                };
                let response = execute_surviving(&remotes, c + i, &spec).await;
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let code = response.status.as_ref().map_or(0, |s| s.code);
                let stdout = match &response.result {
                    Some(result) if code == 0 => {
                        let digest = Digest::from_proto(result.stdout_digest.as_ref()).unwrap();
                        // From whichever server's CAS has it (its worker's), once
                        // that server is up.
                        let mut text = None;
                        for _ in 0..100 {
                            for remote in &remotes {
                                if let Ok(bytes) = remote.read_blob(&digest).await {
                                    text = Some(String::from_utf8_lossy(&bytes).into_owned());
                                }
                            }
                            if text.is_some() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        text.unwrap_or_default()
                    }
                    _ => String::new(),
                };
                if stdout != format!("{value}\n") {
                    wrong.push(format!("{value}: {:?}, {stdout:?}", response.status));
                }
            }
            wrong
        }));
    }
    let total = clients * per_client;
    let wait_for = |count: usize| {
        let answered = answered.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while answered.load(std::sync::atomic::Ordering::Relaxed) < count {
                assert!(
                    Instant::now() < deadline,
                    "fewer than {count} answered in 2 minutes"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for(total / 3).await;
    a.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.start_again();
    wait_for(2 * total / 3).await;
    postgres.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    postgres.start_again();
    let mut wrong = Vec::new();
    let finished = tokio::time::timeout(Duration::from_secs(240), async {
        for task in tasks {
            wrong.extend(task.await.unwrap());
        }
    })
    .await;
    assert!(
        finished.is_ok(),
        "{} of {total} answered in 4 minutes; A:\n{}\nB:\n{}",
        answered.load(std::sync::atomic::Ordering::Relaxed),
        a.log(),
        b.log()
    );
    assert!(
        wrong.is_empty(),
        "{} wrong answers: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert_eq!(
        postgres.sql("SELECT count(*) FROM executions WHERE state <> 'done'"),
        "0",
        "{}",
        postgres.sql("SELECT state, count(*) FROM executions GROUP BY state")
    );
    let ran = postgres.sql("SELECT count(DISTINCT worker) FROM executions");
    assert_eq!(ran, "2", "both servers' workers ran actions");

    // Quarantines and health intact: the held worker is quarantined, for its
    // reason, on both servers; the others' health records count the actions they
    // ran (outcomes are saved every 5 s, so a crash may lose the last few).
    for url in [&a.url, &b.url] {
        let held = listed(url, "held").await.expect("the held worker is known");
        assert_eq!(held.standing, "quarantined", "{held:?}");
        assert!(held.reason.contains("faulty disk"), "{held:?}");
    }
    let workers = common::workers(&b.url).await;
    let outcomes: u64 = ["on-a", "on-b"]
        .iter()
        .map(|name| workers[*name].totals.unwrap_or_default().outcomes)
        .sum();
    assert!(
        outcomes >= total as u64 * 9 / 10,
        "the workers' health records count {outcomes} outcomes of {total} actions"
    );
    assert_eq!(
        postgres
            .sql("SELECT record->'standing'->>'standing' FROM worker_records WHERE name = 'held'"),
        "quarantined"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_newer_than_the_binary_is_refused() {
    let postgres = Postgres::start();
    drop(server(&postgres)); // migrates
    assert_eq!(postgres.sql("SELECT max(version) FROM paddock_schema"), "6");
    postgres.sql("INSERT INTO paddock_schema (version) VALUES (99)");
    let output = common::output_within(
        std::process::Command::new(paddock_bin())
            .args(["server", "--listen", "127.0.0.1:0"])
            .args([
                "--worker-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(["--config", &shared(&postgres), "--data-dir"])
            .arg(postgres.path().join("refused")),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("version 99") && stderr.contains("newer than this Paddock's 6"),
        "{stderr}"
    );
}

/// The database going away makes calls that need it UNAVAILABLE (never NOT_FOUND,
/// which would send Bazel to rebuild), shows in the metrics, and ends by itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_goes_away_and_comes_back_is_survived() {
    let postgres = Postgres::start();
    let farm = server(&postgres);
    let remote = farm.remote("").await;
    let data = Bytes::from_static(b"kept");
    let blob = Digest::of(&data);
    remote.upload(vec![(blob, data)]).await.unwrap();
    let action = Digest::of(b"an action kept across an outage");
    cache_result(&remote, &action, &blob).await;
    let get = || cached(&remote, &action);
    let up = || {
        common::http_get(&farm.metrics_url).lines().find_map(|l| {
            l.strip_prefix("paddock_database_up ")?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    postgres.stop();
    let refused = get().await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while up() != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "paddock_database_up is {:?}",
            up()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    postgres.start_again();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match get().await {
            Ok(found) => {
                assert_eq!(found.output_files.len(), 1);
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert!(
                    Instant::now() < deadline,
                    "the server did not recover: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while up() != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "paddock_database_up is {:?}",
            up()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        farm.log().contains("the database answers again"),
        "{}",
        farm.log()
    );
}

/// The shared ActionCache keeps to `storage.action_cache_max_entries`, least
/// recently used first.
#[tokio::test(flavor = "multi_thread")]
async fn the_shared_action_cache_keeps_to_its_bound() {
    let postgres = Postgres::start();
    let config = config_file(&format!(
        "[state]\nbackend = \"postgres\"\nurl = \"{}\"\n[storage]\naction_cache_max_entries = 3\n",
        postgres.url
    ));
    let mut farm = Farm::server(&free_address(), &["--config", &config]);
    let remote = farm.remote("").await;
    let data = Bytes::from_static(b"bounded");
    let blob = Digest::of(&data);
    remote.upload(vec![(blob, data)]).await.unwrap();
    let actions: Vec<Digest> = (0..5)
        .map(|i| Digest::of(format!("bounded action {i}").as_bytes()))
        .collect();
    for action in &actions {
        cache_result(&remote, action, &blob).await;
    }
    // The first two were written first and never read: they go.
    farm.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while postgres.sql("SELECT count(*) FROM action_cache") != "3" {
        assert!(
            Instant::now() < deadline,
            "not trimmed: {}",
            postgres.sql("SELECT count(*) FROM action_cache")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let remote = farm.remote("").await;
    for (i, action) in actions.iter().enumerate() {
        let found = cached(&remote, action).await;
        assert_eq!(found.is_ok(), i >= 2, "action {i}: {found:?}");
    }
}
