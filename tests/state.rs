//! Shared state in a real PostgreSQL (a throwaway cluster): servers sharing the
//! ActionCache and the workers' records, the schema's version check, and a database
//! that goes away and comes back.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::postgres::Postgres;
use common::{config_file, free_address, paddock_bin, Farm, Worker};
use paddock_client::exec::{execute, ExecSpec};
use paddock_client::Remote;
use paddock_proto::admin::v1::{
    admin_client::AdminClient, command_worker_request::Command as Order, CommandWorkerRequest,
    Worker as Listed,
};
use paddock_reapi::proto::re::{
    ActionResult, GetActionResultRequest, OutputFile, UpdateActionResultRequest,
};
use paddock_reapi::Digest;
use tonic::Code;

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
        arguments: vec!["sh".into(), "-c".into(), "echo shared".into()],
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        ..Default::default()
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

/// A worker given both servers' addresses moves to the other when its server dies,
/// and back when that one dies in turn; its standing follows it.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_moves_to_another_server_when_its_own_dies() {
    let postgres = Postgres::start();
    let mut a = server(&postgres);
    let mut b = server(&postgres);
    let both = format!("{},{}", a.worker_url, b.worker_url);
    let worker = Worker::start(&both, "mover", &["--runner", "host", "--capacity", "1"]);
    let spec = |text: &str| ExecSpec {
        arguments: vec!["sh".into(), "-c".into(), format!("echo {text}")],
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        ..Default::default()
    };
    wait_listed(&a.url, "mover", "active").await;
    let ran = execute(&a.remote("").await, &spec("on-a")).await.unwrap();
    assert_eq!(ran.status.unwrap_or_default().code, 0, "{}", worker.log());

    // A dies: the worker goes to B at once (no back-off before trying B).
    a.kill9();
    let moved = Instant::now();
    wait_listed(&b.url, "mover", "active").await;
    let on_b = b.remote("").await;
    let ran = execute(&on_b, &spec("on-b")).await.unwrap();
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

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_newer_than_the_binary_is_refused() {
    let postgres = Postgres::start();
    drop(server(&postgres)); // migrates
    assert_eq!(postgres.sql("SELECT max(version) FROM paddock_schema"), "1");
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
        stderr.contains("version 99") && stderr.contains("newer than this Paddock's 1"),
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
