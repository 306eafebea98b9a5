//! Remote execution over real gRPC against real `paddock` processes: every Execute
//! path, operations, merging, cancellation, timeouts, platforms, and workers that are
//! killed, frozen or reconnect.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{config_file, free_address, wait_for_process, Farm, Worker};
use futures::StreamExt;
use paddock_client::exec::{execute, execute_digest, prepare, ExecSpec};
use paddock_client::{Remote, Source};
use paddock_reapi::proto::longrunning::operations_client::OperationsClient;
use paddock_reapi::proto::longrunning::{
    operation, CancelOperationRequest, GetOperationRequest, Operation,
};
use paddock_reapi::proto::re::{
    Action, Command, Directory, ExecuteOperationMetadata, ExecuteRequest, ExecuteResponse,
    FileNode, Tree, WaitExecutionRequest,
};
use paddock_reapi::status::{missing_blobs_of, unpack};
use paddock_reapi::Digest;
use prost::Message;
use tonic::Code;

fn shell(script: &str) -> ExecSpec {
    ExecSpec {
        arguments: vec!["sh".into(), "-c".into(), script.into()],
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        ..Default::default()
    }
}

fn status_code(response: &ExecuteResponse) -> Code {
    Code::from_i32(response.status.as_ref().map(|s| s.code).unwrap_or(0))
}

async fn blob_text(remote: &Remote, digest: Option<&paddock_reapi::proto::re::Digest>) -> String {
    let digest = Digest::from_proto(digest).unwrap();
    String::from_utf8(remote.read_blob(&digest).await.unwrap().to_vec()).unwrap()
}

fn stage(op: &Operation) -> i32 {
    let metadata: ExecuteOperationMetadata = unpack(
        "build.bazel.remote.execution.v2.ExecuteOperationMetadata",
        op.metadata.as_ref().unwrap(),
    )
    .unwrap();
    metadata.stage
}

/// The answer at the end of an operation's stream.
async fn last_response(stream: &mut tonic::Streaming<Operation>) -> ExecuteResponse {
    let mut last = None;
    while let Some(op) = stream.next().await {
        last = Some(op.unwrap());
    }
    response_of(&last.expect("the stream ended without an operation"))
}

fn response_of(op: &Operation) -> ExecuteResponse {
    match op.result.as_ref().unwrap() {
        operation::Result::Response(any) => {
            unpack("build.bazel.remote.execution.v2.ExecuteResponse", any).unwrap()
        }
        operation::Result::Error(e) => panic!("the operation's error field must not be set: {e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_actions_and_caches_only_successes() {
    let farm = Farm::start(&[]);
    let remote = farm.remote("exec").await;
    let input = tempfile::tempdir().unwrap();
    std::fs::write(input.path().join("in.txt"), "hello\n").unwrap();
    std::fs::create_dir(input.path().join("tools")).unwrap();
    std::fs::write(
        input.path().join("tools/run.sh"),
        "#!/bin/sh\necho tool ran\n",
    )
    .unwrap();
    std::fs::set_permissions(
        input.path().join("tools/run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut spec = shell(
        "tools/run.sh; tr a-z A-Z < in.txt > out/upper.txt; mkdir -p out/dir/sub; \
         echo a > out/dir/a; echo b > out/dir/sub/b; ln -s upper.txt out/link; \
         echo to-stderr >&2; env | sort > out/env.txt",
    );
    spec.input = Some(input.path().to_owned());
    spec.output_paths = vec![
        "out/upper.txt".into(),
        "out/dir".into(),
        "out/link".into(),
        "out/env.txt".into(),
    ];
    spec.environment.push(("ZED".into(), "last".into()));

    let response = execute(&remote, &spec).await.unwrap();
    assert_eq!(status_code(&response), Code::Ok, "{:?}", response.status);
    assert!(!response.cached_result);
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(
        blob_text(&remote, result.stdout_digest.as_ref()).await,
        "tool ran\n"
    );
    assert_eq!(
        blob_text(&remote, result.stderr_digest.as_ref()).await,
        "to-stderr\n"
    );
    let upper = result
        .output_files
        .iter()
        .find(|f| f.path == "out/upper.txt")
        .unwrap();
    assert_eq!(blob_text(&remote, upper.digest.as_ref()).await, "HELLO\n");
    let env = result
        .output_files
        .iter()
        .find(|f| f.path == "out/env.txt")
        .unwrap();
    let env = blob_text(&remote, env.digest.as_ref()).await;
    let names: Vec<&str> = env.lines().map(|l| l.split('=').next().unwrap()).collect();
    // Exactly the Command's environment (sh itself adds PWD, which is the working dir).
    assert!(
        names.iter().all(|n| ["PATH", "ZED", "PWD"].contains(n)),
        "{env}"
    );
    assert_eq!(result.output_symlinks.len(), 1);
    assert_eq!(result.output_symlinks[0].target, "upper.txt");
    let dir = &result.output_directories[0];
    assert_eq!(dir.path, "out/dir");
    let tree_digest = Digest::from_proto(dir.tree_digest.as_ref()).unwrap();
    let tree = Tree::decode(remote.read_blob(&tree_digest).await.unwrap()).unwrap();
    let root = tree.root.unwrap();
    assert_eq!(root.files[0].name, "a");
    assert_eq!(root.directories[0].name, "sub");
    assert_eq!(tree.children[0].files[0].name, "b");
    let metadata = result.execution_metadata.unwrap();
    assert!(metadata.worker.contains("local-0"));
    for ts in [
        &metadata.queued_timestamp,
        &metadata.worker_start_timestamp,
        &metadata.input_fetch_start_timestamp,
        &metadata.input_fetch_completed_timestamp,
        &metadata.execution_start_timestamp,
        &metadata.execution_completed_timestamp,
        &metadata.output_upload_start_timestamp,
        &metadata.output_upload_completed_timestamp,
        &metadata.worker_completed_timestamp,
    ] {
        assert!(ts.as_ref().is_some_and(|t| t.seconds > 0));
    }

    // The same action again: a cache hit.
    let again = execute(&remote, &spec).await.unwrap();
    assert!(again.cached_result);
    assert_eq!(again.result.unwrap().output_files.len(), 2);
    // skip_cache_lookup runs it anyway.
    let mut fresh = spec.clone();
    fresh.skip_cache_lookup = true;
    assert!(!execute(&remote, &fresh).await.unwrap().cached_result);

    // A failing action is reported but never cached.
    let failing = shell("echo nope; exit 7");
    let first = execute(&remote, &failing).await.unwrap();
    assert_eq!(status_code(&first), Code::Ok);
    assert_eq!(first.result.as_ref().unwrap().exit_code, 7);
    let second = execute(&remote, &failing).await.unwrap();
    assert!(!second.cached_result);
    // do_not_cache is honoured too.
    let mut uncached = shell("true");
    uncached.do_not_cache = true;
    execute(&remote, &uncached).await.unwrap();
    assert!(!execute(&remote, &uncached).await.unwrap().cached_result);
}

/// A Command in the REAPI 2.0 style that Bazel 4 sends: output_files and
/// output_directories rather than output_paths.
#[allow(deprecated)]
#[tokio::test(flavor = "multi_thread")]
async fn old_style_outputs_and_working_directory() {
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    let input = tempfile::tempdir().unwrap();
    std::fs::create_dir(input.path().join("pkg")).unwrap();
    std::fs::write(input.path().join("pkg/src.txt"), "source").unwrap();
    let spec = shell(
        "cat src.txt > gen/copy.txt; ln -s copy.txt gen/alias; mkdir -p outdir/x; touch outdir/x/y",
    );
    let tree = paddock_client::tree::merkle_tree(input.path())
        .await
        .unwrap();
    let mut blobs = tree.blobs;
    let root = tree.root;
    let command = Command {
        arguments: spec.arguments.clone(),
        environment_variables: vec![paddock_reapi::proto::re::command::EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        output_files: vec!["gen/alias".into(), "gen/copy.txt".into()],
        output_directories: vec!["outdir".into()],
        working_directory: "pkg".into(),
        ..Default::default()
    };
    let (command_digest, command_bytes) = Digest::of_message(&command);
    let action = Action {
        command_digest: Some(command_digest.to_proto()),
        input_root_digest: Some(root.to_proto()),
        ..Default::default()
    };
    let (action_digest, action_bytes) = Digest::of_message(&action);
    blobs.push((command_digest, Source::Memory(Bytes::from(command_bytes))));
    blobs.push((action_digest, Source::Memory(Bytes::from(action_bytes))));
    remote.upload_missing(blobs).await.unwrap();
    let response = execute_digest(&remote, &action_digest, &ExecSpec::default())
        .await
        .unwrap();
    assert_eq!(status_code(&response), Code::Ok, "{:?}", response.status);
    let result = response.result.unwrap();
    assert_eq!(result.output_files.len(), 1);
    assert_eq!(result.output_files[0].path, "gen/copy.txt");
    assert_eq!(
        blob_text(&remote, result.output_files[0].digest.as_ref()).await,
        "source"
    );
    assert_eq!(result.output_file_symlinks.len(), 1);
    assert_eq!(result.output_file_symlinks[0].path, "gen/alias");
    assert_eq!(result.output_directories[0].path, "outdir");
    assert!(
        result.output_symlinks.is_empty(),
        "output_symlinks is for output_paths only"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_blobs_are_reported_for_reupload() {
    let farm = Farm::start(&[]);
    let remote = farm.remote("m").await;
    let input = tempfile::tempdir().unwrap();
    std::fs::write(input.path().join("data.bin"), "payload").unwrap();
    let spec = ExecSpec {
        input: Some(input.path().to_owned()),
        ..shell("cat data.bin")
    };
    let prepared = prepare(&spec).await.unwrap();
    let run = |remote: Remote| async move {
        execute_digest(&remote, &prepared.digest, &ExecSpec::default())
            .await
            .unwrap()
    };

    // Nothing uploaded: the Action itself is missing.
    let response = run(remote.clone()).await;
    assert_eq!(status_code(&response), Code::FailedPrecondition);
    let subjects = missing_blobs_of(response.status.as_ref().unwrap());
    assert_eq!(subjects, vec![prepared.digest.blob_subject()]);

    // Everything but the input file: the worker finds it missing.
    let data = Digest::of(b"payload");
    let without_file: Vec<(Digest, Source)> = prepared
        .blobs
        .iter()
        .filter(|(d, _)| *d != data)
        .cloned()
        .collect();
    remote.upload_missing(without_file).await.unwrap();
    let response = run(remote.clone()).await;
    assert_eq!(status_code(&response), Code::FailedPrecondition);
    assert_eq!(
        missing_blobs_of(response.status.as_ref().unwrap()),
        vec![data.blob_subject()]
    );

    // Upload it and retry: success.
    remote.upload_missing(prepared.blobs.clone()).await.unwrap();
    let response = run(remote.clone()).await;
    assert_eq!(status_code(&response), Code::Ok);
    assert_eq!(
        blob_text(&remote, response.result.unwrap().stdout_digest.as_ref()).await,
        "payload"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_are_refused() {
    let farm = Farm::start(&[
        "--config",
        &config_file("[scheduler]\nmax_timeout = \"10m\"\ndefault_timeout = \"5m\"\n"),
    ]);
    let remote = farm.remote("").await;
    let execute_raw = |request: ExecuteRequest| {
        let mut client = remote.execution();
        async move {
            match client.execute(request).await {
                Err(s) => s.code(),
                Ok(r) => match r.into_inner().next().await {
                    Some(Err(s)) => s.code(),
                    _ => Code::Ok,
                },
            }
        }
    };
    let bad = paddock_reapi::proto::re::Digest {
        hash: "xyz".into(),
        size_bytes: 1,
    };
    assert_eq!(
        execute_raw(ExecuteRequest {
            action_digest: Some(bad),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument
    );
    assert_eq!(
        execute_raw(ExecuteRequest::default()).await,
        Code::InvalidArgument
    );
    // A blob that is not an Action.
    let junk = Bytes::from_static(b"\xff\xff not a protobuf");
    let junk_digest = Digest::of(&junk);
    remote.upload(vec![(junk_digest, junk)]).await.unwrap();
    assert_eq!(
        execute_raw(ExecuteRequest {
            action_digest: Some(junk_digest.to_proto()),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument
    );
    // A timeout beyond the server's maximum.
    let spec = ExecSpec {
        timeout: Some(Duration::from_secs(3600)),
        ..shell("true")
    };
    let err = execute(&remote, &spec).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    // A command with an escaping output path.
    let spec = ExecSpec {
        output_paths: vec!["../escape".into()],
        ..shell("true")
    };
    let err = execute(&remote, &spec).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    // A program that does not exist.
    let spec = ExecSpec {
        arguments: vec!["/no/such/program".into()],
        ..Default::default()
    };
    let response = execute(&remote, &spec).await.unwrap();
    assert_eq!(status_code(&response), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn timeouts_kill_the_whole_process_tree() {
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    let child = unique_sleep();
    let spec = ExecSpec {
        timeout: Some(Duration::from_millis(1500)),
        ..shell(&format!("echo started; sleep {child} & sleep 30"))
    };
    let started = Instant::now();
    let running = {
        let (remote, spec) = (remote.clone(), spec.clone());
        tokio::spawn(async move { execute(&remote, &spec).await.unwrap() })
    };
    let pid = wait_for_process(&format!("sleep {child}")).await;
    let response = running.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(
        status_code(&response),
        Code::DeadlineExceeded,
        "{:?}",
        response.status
    );
    let result = response
        .result
        .expect("a timed-out action still reports what it wrote");
    assert_eq!(
        blob_text(&remote, result.stdout_digest.as_ref()).await,
        "started\n"
    );
    assert!(
        wait_gone(pid).await,
        "the background child outlived the timeout"
    );
    // Timed-out results are not cached.
    assert!(!execute(&remote, &spec).await.unwrap().cached_result);
}

/// Starts an action and returns its stream after its first update.
async fn start(remote: &Remote, spec: &ExecSpec) -> (String, tonic::Streaming<Operation>) {
    let prepared = prepare(spec).await.unwrap();
    remote.upload_missing(prepared.blobs).await.unwrap();
    let mut stream = remote
        .execution()
        .execute(ExecuteRequest {
            instance_name: remote.instance().to_owned(),
            action_digest: Some(prepared.digest.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.done);
    (first.name, stream)
}

/// A `sleep` whose argument no other process on the machine has, so the test can
/// find it in the host's /proc whatever sandbox it runs in.
fn unique_sleep() -> String {
    format!(
        "{}.{:06}",
        40 + rand::random::<u32>() % 20,
        rand::random::<u32>() % 1_000_000
    )
}

async fn wait_gone(pid: i32) -> bool {
    for _ in 0..600 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_operation_stops_the_action_on_its_worker() {
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    let sleep = unique_sleep();
    let (name, mut stream) = start(&remote, &shell(&format!("exec sleep {sleep}"))).await;
    let pid = wait_for_process(&format!("sleep {sleep}")).await;
    OperationsClient::new(remote.channel())
        .cancel_operation(CancelOperationRequest { name: name.clone() })
        .await
        .unwrap();
    let mut last = None;
    while let Some(op) = stream.next().await {
        last = Some(op.unwrap());
    }
    let last = last.unwrap();
    assert!(last.done);
    assert_eq!(status_code(&response_of(&last)), Code::Cancelled);
    assert!(
        wait_gone(pid).await,
        "the action's process is still running"
    );
    let op = OperationsClient::new(remote.channel())
        .get_operation(GetOperationRequest { name })
        .await
        .unwrap()
        .into_inner();
    assert!(op.done);
    let err = OperationsClient::new(remote.channel())
        .cancel_operation(CancelOperationRequest {
            name: "operations/unknown".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_action_nobody_waits_for_is_cancelled_after_the_grace_period() {
    let farm = Farm::start(&[
        "--config",
        &config_file("[scheduler]\norphan_grace = \"500ms\"\n"),
    ]);
    let remote = farm.remote("").await;
    let sleep = unique_sleep();
    let (_, stream) = start(&remote, &shell(&format!("exec sleep {sleep}"))).await;
    let pid = wait_for_process(&format!("sleep {sleep}")).await;
    drop(stream);
    assert!(wait_gone(pid).await, "the orphaned action kept running");
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_execution_reattaches_and_identical_actions_are_merged() {
    let farm = Farm::start(&[]);
    let remote = farm.remote("merge").await;
    // Each execution prints fresh random bytes: equal outputs mean one execution.
    let spec = shell("head -c 16 /dev/urandom | od -An -tx1; sleep 1");
    let (name, first_stream) = start(&remote, &spec).await;
    let mut others = Vec::new();
    for _ in 0..4 {
        let remote = remote.clone();
        let spec = spec.clone();
        others.push(tokio::spawn(async move {
            execute(&remote, &spec).await.unwrap()
        }));
    }
    // The first client goes away and comes back by name.
    drop(first_stream);
    let mut waited = remote
        .execution()
        .wait_execution(WaitExecutionRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut stages = Vec::new();
    let mut last = None;
    while let Some(op) = waited.next().await {
        let op = op.unwrap();
        stages.push(stage(&op));
        last = Some(op);
    }
    let last = last.unwrap();
    assert!(last.done);
    assert_eq!(last.name, name);
    assert_eq!(*stages.last().unwrap(), 4, "COMPLETED last");
    let response = response_of(&last);
    assert_eq!(status_code(&response), Code::Ok);
    let stdout = response.result.as_ref().unwrap().stdout_digest.clone();
    for other in others {
        let r = other.await.unwrap();
        assert_eq!(
            r.result.unwrap().stdout_digest,
            stdout,
            "five requests, one execution"
        );
    }
    let err = remote
        .execution()
        .wait_execution(WaitExecutionRequest {
            name: "operations/nope".into(),
        })
        .await;
    let code = match err {
        Err(s) => s.code(),
        Ok(r) => r.into_inner().next().await.unwrap().unwrap_err().code(),
    };
    assert_eq!(code, Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn platforms_are_matched_and_impossible_ones_fail_fast() {
    let farm = Farm::start(&[
        "--config",
        &config_file(
            "[scheduler]\nunsatisfiable_grace = \"3s\"\n[worker.properties]\nPool = \"fast\"\n",
        ),
    ]);
    let remote = farm.remote("").await;
    for ok in [
        vec![("OSFamily", "Linux")],
        vec![("Pool", "fast"), ("ISA", "x86-64")],
        vec![("cores", "1"), ("memory", "1GiB")],
    ] {
        let spec = ExecSpec {
            platform: ok
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..shell("true")
        };
        let response = execute(&remote, &spec).await.unwrap();
        assert_eq!(
            status_code(&response),
            Code::Ok,
            "{ok:?}: {:?}",
            response.status
        );
    }
    for impossible in [
        vec![("Pool", "gpu")],
        vec![("cores", "4096")],
        vec![("OSFamily", "Windows")],
    ] {
        let spec = ExecSpec {
            platform: impossible
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..shell("true")
        };
        let started = Instant::now();
        let response = execute(&remote, &spec).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(status_code(&response), Code::FailedPrecondition);
        let message = &response.status.as_ref().unwrap().message;
        let (k, v) = impossible[0];
        assert!(message.contains(&format!("{k}={v}")), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_action_survives_its_worker_being_killed() {
    let server = Farm::server("127.0.0.1:0", &[]);
    let mut first = Worker::start(&server.worker_url, "first", &["--capacity", "1"]);
    let remote = server.remote("").await;
    let sleep = unique_sleep();
    let script = format!("sleep {sleep} & sleep 2; echo finished");
    let (_, mut stream) = start(&remote, &shell(&script)).await;
    let pid = wait_for_process(&format!("sleep {sleep}")).await;
    // The only worker dies mid-action; a second one joins and finishes it.
    first.kill9();
    let _second = Worker::start(&server.worker_url, "second", &["--capacity", "1"]);
    let response = last_response(&mut stream).await;
    assert_eq!(status_code(&response), Code::Ok, "{:?}", response.status);
    let result = response.result.unwrap();
    assert_eq!(result.execution_metadata.unwrap().worker, "second");
    assert_eq!(
        blob_text(&remote, result.stdout_digest.as_ref()).await,
        "finished\n"
    );
    // The first attempt did not outlive its worker.
    assert!(
        wait_gone(pid).await,
        "the killed worker's action kept running"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_worker_loses_its_actions_and_its_late_result_is_ignored() {
    let server = Farm::server(
        "127.0.0.1:0",
        &[
            "--config",
            &config_file(
                "[scheduler]\nheartbeat_interval = \"200ms\"\nheartbeat_timeout = \"2s\"\n",
            ),
        ],
    );
    let frozen = Worker::start(&server.worker_url, "frozen", &["--capacity", "1"]);
    let remote = server.remote("").await;
    let sleep = unique_sleep();
    let script = format!("sleep {sleep} & sleep 3; echo ok");
    let (_, mut stream) = start(&remote, &shell(&script)).await;
    wait_for_process(&format!("sleep {sleep}")).await;
    frozen.freeze();
    let _healthy = Worker::start(&server.worker_url, "healthy", &["--capacity", "1"]);
    let response = last_response(&mut stream).await;
    assert_eq!(status_code(&response), Code::Ok, "{:?}", response.status);
    assert_eq!(
        response.result.unwrap().execution_metadata.unwrap().worker,
        "healthy"
    );
    // The frozen worker wakes up, finds its session gone, and reconnects.
    frozen.thaw();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let response = execute(&remote, &shell("echo after-thaw")).await.unwrap();
    assert_eq!(status_code(&response), Code::Ok);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_reconnects_when_the_server_comes_back() {
    let listen = free_address();
    let mut server = Farm::server(&listen, &[]);
    let worker = Worker::start(&server.worker_url, "steady", &["--capacity", "1"]);
    let response = execute(&server.remote("").await, &shell("echo one"))
        .await
        .unwrap();
    assert_eq!(status_code(&response), Code::Ok);
    server.restart();
    let remote = server.remote("").await;
    let started = Instant::now();
    let response = execute(&remote, &shell("echo two")).await.unwrap();
    assert_eq!(
        status_code(&response),
        Code::Ok,
        "{:?}\n{}",
        response.status,
        worker.log()
    );
    assert_eq!(
        response.result.unwrap().execution_metadata.unwrap().worker,
        "steady"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// What clients were told is queued or running outlives a crash of the server:
/// started again on its data directory, it queues those executions again under the
/// same operation names, so clients that come back with WaitExecution get their
/// answers (the one that was running runs again).
#[tokio::test(flavor = "multi_thread")]
async fn queued_and_running_actions_survive_a_crash_of_the_server() {
    let mut server = Farm::server(&free_address(), &[]);
    let _worker = Worker::start(&server.worker_url, "steady", &["--capacity", "1"]);
    let remote = server.remote("").await;
    let (running, mut stream) = start(&remote, &shell("sleep 3; echo running")).await;
    while stage(&stream.next().await.unwrap().unwrap()) != 3 {}
    // Two more wait behind it.
    let (first, _first) = start(&remote, &shell("echo first")).await;
    let (second, _second) = start(&remote, &shell("echo second")).await;
    server.kill9();
    server.start_again();
    let remote = server.remote("").await;
    let mut streams = Vec::new();
    for (name, stdout) in [
        (running, "running\n"),
        (first, "first\n"),
        (second, "second\n"),
    ] {
        let waited = remote
            .execution()
            .wait_execution(WaitExecutionRequest { name: name.clone() })
            .await
            .unwrap_or_else(|e| panic!("{name} was forgotten: {e}"))
            .into_inner();
        streams.push((name, stdout, waited));
    }
    for (name, stdout, mut waited) in streams {
        let response = last_response(&mut waited).await;
        assert_eq!(
            status_code(&response),
            Code::Ok,
            "{name}: {:?}",
            response.status
        );
        let result = response.result.unwrap();
        assert_eq!(
            blob_text(&remote, result.stdout_digest.as_ref()).await,
            stdout
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn input_trees_with_symlinks_and_executables_are_materialised() {
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    let input = tempfile::tempdir().unwrap();
    let root = input.path();
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::write(root.join("a/b/data"), "deep").unwrap();
    std::fs::write(root.join("a/run"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(
        root.join("a/run"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("b/data", root.join("a/link")).unwrap();
    let spec = ExecSpec {
        input: Some(root.to_owned()),
        ..shell("cat a/link; a/run; test -x a/run && ! test -x a/b/data && echo modes-ok")
    };
    let response = execute(&remote, &spec).await.unwrap();
    assert_eq!(status_code(&response), Code::Ok);
    let result = response.result.unwrap();
    assert_eq!(
        result.exit_code,
        0,
        "{}",
        blob_text(&remote, result.stderr_digest.as_ref()).await
    );
    assert_eq!(
        blob_text(&remote, result.stdout_digest.as_ref()).await,
        "deeprun\nmodes-ok\n"
    );

    // A hand-made input tree with a symlink leaving the root is refused.
    let escaping = Directory {
        symlinks: vec![paddock_reapi::proto::re::SymlinkNode {
            name: "evil".into(),
            target: "../../etc/passwd".into(),
            ..Default::default()
        }],
        files: vec![FileNode {
            name: "f".into(),
            digest: Some(Digest::EMPTY.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let (root_digest, root_bytes) = Digest::of_message(&escaping);
    let command = Command {
        arguments: vec!["true".into()],
        ..Default::default()
    };
    let (command_digest, command_bytes) = Digest::of_message(&command);
    let action = Action {
        command_digest: Some(command_digest.to_proto()),
        input_root_digest: Some(root_digest.to_proto()),
        ..Default::default()
    };
    let (action_digest, action_bytes) = Digest::of_message(&action);
    remote
        .upload(vec![
            (root_digest, root_bytes.into()),
            (command_digest, command_bytes.into()),
            (action_digest, action_bytes.into()),
        ])
        .await
        .unwrap();
    let response = execute_digest(&remote, &action_digest, &ExecSpec::default())
        .await
        .unwrap();
    assert_eq!(
        status_code(&response),
        Code::InvalidArgument,
        "{:?}",
        response.status
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn operations_can_be_polled_deleted_and_inlined() {
    let farm = Farm::start(&[
        "--config",
        &config_file("[scheduler]\norphan_grace = \"1500ms\"\n"),
    ]);
    let remote = farm.remote("").await;
    let mut operations = OperationsClient::new(remote.channel());

    // A client that drops its stream but polls GetOperation keeps the action alive.
    let (name, stream) = start(&remote, &shell("sleep 4; echo polled")).await;
    drop(stream);
    let mut last = None;
    for _ in 0..100 {
        let op = operations
            .get_operation(GetOperationRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        let done = op.done;
        last = Some(op);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let response = response_of(&last.unwrap());
    assert_eq!(status_code(&response), Code::Ok, "{:?}", response.status);

    // DeleteOperation forgets the operation without cancelling the execution: its
    // result still reaches the ActionCache.
    let spec = shell("sleep 1; echo deleted");
    let action = prepare(&spec).await.unwrap().digest;
    let (name, _stream) = start(&remote, &spec).await;
    operations
        .delete_operation(paddock_reapi::proto::longrunning::DeleteOperationRequest {
            name: name.clone(),
        })
        .await
        .unwrap();
    let err = operations
        .get_operation(GetOperationRequest { name })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mut cached = false;
    for _ in 0..100 {
        let found = remote
            .action_cache()
            .get_action_result(paddock_reapi::proto::re::GetActionResultRequest {
                action_digest: Some(action.to_proto()),
                ..Default::default()
            })
            .await;
        if found.is_ok() {
            cached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cached,
        "the deleted operation's execution was cancelled:\n{}",
        farm.log()
    );

    // inline_stdout is honoured.
    let prepared = prepare(&shell("echo inlined")).await.unwrap();
    remote.upload_missing(prepared.blobs).await.unwrap();
    let mut stream = remote
        .execution()
        .execute(ExecuteRequest {
            action_digest: Some(prepared.digest.to_proto()),
            inline_stdout: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(op) = stream.next().await {
        last = Some(op.unwrap());
    }
    let result = response_of(&last.unwrap()).result.unwrap();
    assert_eq!(result.stdout_raw, b"inlined\n");

    // Unsupported output node properties are refused.
    let spec = shell("true");
    let mut prepared = prepare(&spec).await.unwrap();
    let command = Command {
        arguments: spec.arguments.clone(),
        output_node_properties: vec!["mtime".into()],
        ..Default::default()
    };
    let (command_digest, command_bytes) = Digest::of_message(&command);
    let action = Action {
        command_digest: Some(command_digest.to_proto()),
        input_root_digest: Some(Digest::of_message(&Directory::default()).0.to_proto()),
        ..Default::default()
    };
    let (action_digest, action_bytes) = Digest::of_message(&action);
    prepared
        .blobs
        .push((command_digest, Source::Memory(command_bytes.into())));
    prepared
        .blobs
        .push((action_digest, Source::Memory(action_bytes.into())));
    remote.upload_missing(prepared.blobs).await.unwrap();
    let err = execute_digest(&remote, &action_digest, &ExecSpec::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
}

/// A value of a counter in the farm's metrics (0 if absent).
fn counter(farm: &Farm, name: &str) -> f64 {
    common::http_get(&farm.metrics_url)
        .lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_assignment_its_worker_stops_reporting_is_lost_and_its_late_result_discarded() {
    use paddock_proto::worker::v1 as wire;
    use tokio_stream::wrappers::ReceiverStream;
    let server = Farm::server(
        "127.0.0.1:0",
        &[
            "--config",
            &config_file("[scheduler]\nheartbeat_interval = \"200ms\"\n"),
        ],
    );
    // A worker over the real protocol that takes an assignment, then heartbeats
    // without it, as one that lost it would.
    let remote = Remote::connect(&server.worker_url, "").await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<wire::WorkerMessage>(16);
    let say = |message| wire::WorkerMessage {
        message: Some(message),
    };
    tx.send(say(wire::worker_message::Message::Register(
        wire::Register {
            name: "forgetful".into(),
            properties: paddock_worker::detected_properties()
                .into_iter()
                .map(|(name, value)| wire::Property { name, value })
                .collect(),
            capacity: 1,
        },
    )))
    .await
    .unwrap();
    let mut inbound = wire::scheduler_client::SchedulerClient::new(remote.channel())
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let client = server.remote("").await;
    let spec = shell(&format!("echo {}", uuid::Uuid::new_v4()));
    let (_, mut stream) = start(&client, &spec).await;
    let assignment = loop {
        match inbound.message().await.unwrap().unwrap().message {
            Some(wire::scheduler_message::Message::Assignment(a)) => break a,
            _ => continue,
        }
    };
    let late_before = counter(&server, "paddock_late_results_total");
    // A healthy worker joins, so that the retry has somewhere else to go...
    let _healthy = Worker::start(
        &server.worker_url,
        "healthy",
        &["--runner", "host", "--capacity", "1"],
    );
    let admin = paddock_proto::admin::v1::admin_client::AdminClient::new(client.channel());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = admin
            .clone()
            .list_workers(paddock_proto::admin::v1::ListWorkersRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers;
        if listed.iter().any(|w| w.name == "healthy" && w.connected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the healthy worker never connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and the forgetful one heartbeats without its assignment.
    let beats = tokio::spawn({
        let tx = tx.clone();
        async move {
            loop {
                let beat = wire::Heartbeat {
                    running: vec![],
                    cache: None,
                };
                if tx
                    .send(wire::WorkerMessage {
                        message: Some(wire::worker_message::Message::Heartbeat(beat)),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    // The scheduler gives the assignment up and the healthy worker runs it.
    let response = last_response(&mut stream).await;
    assert_eq!(status_code(&response), Code::Ok, "{:?}", response.status);
    assert_eq!(
        response.result.unwrap().execution_metadata.unwrap().worker,
        "healthy"
    );
    // The forgetful worker answers after all, with a forgery: it is discarded.
    let forged = paddock_reapi::proto::re::ActionResult {
        exit_code: 3,
        ..Default::default()
    };
    tx.send(say(wire::worker_message::Message::Finished(
        wire::Finished {
            assignment_id: assignment.assignment_id,
            outcome: Some(wire::finished::Outcome::Completed(wire::Completed {
                action_result: forged.encode_to_vec(),
                timed_out: false,
                message: String::new(),
            })),
        },
    )))
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(&server, "paddock_late_results_total") <= late_before {
        assert!(Instant::now() < deadline, "the late result was not seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let prepared = prepare(&spec).await.unwrap();
    let cached = client
        .action_cache()
        .get_action_result(paddock_reapi::proto::re::GetActionResultRequest {
            action_digest: Some(prepared.digest.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.exit_code, 0);
    assert_eq!(cached.execution_metadata.unwrap().worker, "healthy");
    assert!(counter(&server, "paddock_lost_assignments_total") >= 1.0);
    beats.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_task_panics_fails_the_attempt_instead_of_hanging_it() {
    let server = Farm::server("127.0.0.1:0", &[]);
    let _buggy = Worker::start(
        &server.worker_url,
        "buggy",
        &[
            "--runner",
            "host",
            "--capacity",
            "1",
            "--dangerous-fault-injection",
            "panic=1",
        ],
    );
    let remote = server.remote("").await;
    let response = tokio::time::timeout(
        Duration::from_secs(60),
        execute(&remote, &shell("echo never")),
    )
    .await
    .expect("the action must not hang")
    .unwrap();
    // Every attempt failed on the only worker there is: the client hears why.
    assert_eq!(
        status_code(&response),
        Code::Unavailable,
        "{:?}",
        response.status
    );
    let message = response.status.unwrap().message;
    assert!(message.contains("a bug in the worker"), "{message}");
}

/// The worker an action ran on.
fn ran_on(response: &ExecuteResponse) -> String {
    let result = response.result.as_ref().expect("a result");
    result.execution_metadata.as_ref().unwrap().worker.clone()
}

/// Among free workers, an action goes to one that laid out its inputs lately, even
/// when another has more free slots; with locality off, to the one with more slots.
#[tokio::test(flavor = "multi_thread")]
async fn actions_go_where_their_inputs_already_are() {
    for locality in [true, false] {
        let config = config_file(&format!("[scheduler]\nlocality = {locality}\n"));
        let server = Farm::server("127.0.0.1:0", &["--config", &config]);
        let remote = server.remote("").await;
        let host = ["--runner", "host"];
        let _holder = Worker::start(
            &server.worker_url,
            "holder",
            &[&host[..], &["--capacity", "1"]].concat(),
        );
        let tree = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tree.path().join("src/lib")).unwrap();
        std::fs::write(tree.path().join("src/lib/big.h"), vec![b'x'; 1 << 20]).unwrap();
        let with_tree = |script: &str| ExecSpec {
            input: Some(tree.path().to_owned()),
            ..shell(script)
        };
        let first = execute(&remote, &with_tree("wc -c < src/lib/big.h"))
            .await
            .unwrap();
        assert_eq!(ran_on(&first), "holder");
        let _roomy = Worker::start(
            &server.worker_url,
            "roomy",
            &[&host[..], &["--capacity", "4"]].concat(),
        );
        // Heartbeats (every 2 s) carry the holder's summary; there is nothing to
        // wait on but time.
        tokio::time::sleep(Duration::from_secs(5)).await;
        for i in 0..3 {
            let response = execute(
                &remote,
                &with_tree(&format!("echo {i}; wc -c < src/lib/big.h")),
            )
            .await
            .unwrap();
            let expected = if locality { "holder" } else { "roomy" };
            assert_eq!(
                ran_on(&response),
                expected,
                "locality {locality}, action {i}"
            );
        }
        // Inputs nobody holds go where most slots are free.
        let elsewhere = execute(&remote, &shell("echo no inputs")).await.unwrap();
        assert_eq!(ran_on(&elsewhere), "roomy");
    }
}
