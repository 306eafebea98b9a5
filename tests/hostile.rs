//! Hostile actions and hostile peers against real `paddock` processes and real
//! containers, each attack written as an attacker would write it.
//!
//! Every attack aims at a canary on the host: a 0600 file with unique contents in a
//! 0700 directory under the host's temporary directory. Afterwards the canary must be
//! as it was (mode, link count, owner, contents, nothing beside it), its contents
//! never returned to the client nor uploaded to the CAS, and the worker still
//! healthy. The attacks:
//!
//! - outputs declared beneath a symlink the action made (to `/`, or climbing out);
//! - a working directory the action replaced with such a symlink;
//! - input symlinks whose targets each stay inside the root, but which climb out
//!   once the chain is followed;
//! - an action tampering with the cached input files that later actions share;
//! - a fake scheduler whose assignment ids are host paths;
//! - input trees of shared subtrees that expand to millions of entries;
//! - syscalls and socket families outside the seccomp allow list;
//! - a worker that claims the CAS lacks inputs that it holds.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::registry::{build_image, Registry};
use common::{config_file, workers, Farm, Worker, WorkerSetup};
use futures::{Stream, StreamExt};
use paddock_client::exec::{execute, execute_digest, prepare, ExecSpec};
use paddock_client::{Remote, Source};
use paddock_proto::admin::v1::Worker as Listed;
use paddock_proto::worker::v1 as wire;
use paddock_reapi::proto::re::{
    command::EnvironmentVariable, Action, ActionResult, Command, Directory, DirectoryNode,
    ExecuteResponse, FileNode, Tree,
};
use paddock_reapi::status::missing_blobs_of;
use paddock_reapi::Digest;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::Code;

/// More `..` than any input root or work directory is deep: relative, yet it leads
/// to `/` of whichever machine resolves it (`..` stops at `/`).
fn climbing() -> String {
    [".."; 64].join("/")
}

/// A secret on the host that every attack aims at: a 0600 file with unique contents
/// in a 0700 directory, both the test's (root's, like the worker's own files).
struct Canary {
    dir: PathBuf,
    file: PathBuf,
    content: Vec<u8>,
    uid: u32,
    _tmp: tempfile::TempDir,
}

impl Canary {
    fn new() -> Canary {
        let tmp = tempfile::Builder::new()
            .prefix("paddock-canary-")
            .tempdir()
            .unwrap();
        // The path without symlinks: the attacks reach the canary from the host's
        // `/`, so they must name it as it really is.
        let dir = tmp.path().canonicalize().unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let file = dir.join("secret");
        let content = format!(
            "canary {} must never leave this host\n",
            uuid::Uuid::new_v4()
        )
        .into_bytes();
        std::fs::write(&file, &content).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let uid = std::fs::metadata(&file).unwrap().uid();
        Canary {
            dir,
            file,
            content,
            uid,
            _tmp: tmp,
        }
    }

    /// The canary's directory relative to `/`: what an attack appends to a way out
    /// of its input root.
    fn rel(&self) -> String {
        self.dir
            .strip_prefix("/")
            .unwrap()
            .to_str()
            .expect("a UTF-8 temporary directory")
            .to_owned()
    }

    /// Asserts that nothing happened to the canary, and that `returned` (what the
    /// client got back) does not hold its contents.
    fn assert_intact(&self, what: &str, returned: &[u8]) {
        let file = std::fs::symlink_metadata(&self.file)
            .unwrap_or_else(|e| panic!("{what}: the canary file is gone: {e}"));
        assert!(
            file.file_type().is_file(),
            "{what}: the canary file was replaced"
        );
        assert_eq!(
            file.mode() & 0o7777,
            0o600,
            "{what}: the canary file's mode changed"
        );
        assert_eq!(file.nlink(), 1, "{what}: the canary file was hard-linked");
        assert_eq!(
            file.uid(),
            self.uid,
            "{what}: the canary file changed hands"
        );
        assert_eq!(
            std::fs::read(&self.file).unwrap(),
            self.content,
            "{what}: the canary file was changed"
        );
        let dir = std::fs::symlink_metadata(&self.dir)
            .unwrap_or_else(|e| panic!("{what}: the canary directory is gone: {e}"));
        assert!(dir.is_dir(), "{what}: the canary directory was replaced");
        assert_eq!(
            dir.mode() & 0o7777,
            0o700,
            "{what}: the canary directory's mode changed"
        );
        assert_eq!(
            dir.uid(),
            self.uid,
            "{what}: the canary directory changed hands"
        );
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["secret"],
            "{what}: something was made beside the canary"
        );
        assert!(
            !contains(returned, &self.content),
            "{what}: the canary's contents were returned to the client"
        );
    }

    /// Asserts that the canary's contents never reached the CAS: whatever the client
    /// was told, no worker read the canary and uploaded it.
    async fn assert_not_uploaded(&self, remote: &Remote) {
        let digest = Digest::of(&self.content);
        let missing = remote.find_missing(&[digest]).await.unwrap();
        assert_eq!(
            missing,
            [digest],
            "the canary's contents were uploaded to the CAS"
        );
    }
}

/// Whether `needle` occurs anywhere in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A shell script as an action that always runs (never answered from the cache).
fn shell(script: &str) -> ExecSpec {
    ExecSpec {
        arguments: vec!["sh".into(), "-c".into(), script.into()],
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        skip_cache_lookup: true,
        ..Default::default()
    }
}

fn status_code(response: &ExecuteResponse) -> Code {
    Code::from_i32(response.status.as_ref().map(|s| s.code).unwrap_or(0))
}

async fn text(remote: &Remote, digest: Option<&paddock_reapi::proto::re::Digest>) -> String {
    let digest = Digest::from_proto(digest).unwrap();
    String::from_utf8_lossy(&remote.read_blob(&digest).await.unwrap()).into_owned()
}

async fn stdout_of(remote: &Remote, response: &ExecuteResponse) -> String {
    let result = response.result.as_ref().expect("a result");
    text(remote, result.stdout_digest.as_ref()).await
}

async fn stderr_of(remote: &Remote, response: &ExecuteResponse) -> String {
    let result = response.result.as_ref().expect("a result");
    text(remote, result.stderr_digest.as_ref()).await
}

/// Everything an execution gave back to the client: messages, standard streams,
/// symlink targets, output files and every file inside output directories.
async fn returned(remote: &Remote, response: &ExecuteResponse) -> Vec<u8> {
    let mut out = response.message.clone().into_bytes();
    if let Some(status) = &response.status {
        out.extend_from_slice(status.message.as_bytes());
    }
    let Some(result) = &response.result else {
        return out;
    };
    out.extend_from_slice(&result.stdout_raw);
    out.extend_from_slice(&result.stderr_raw);
    let mut blobs: Vec<Digest> = [&result.stdout_digest, &result.stderr_digest]
        .into_iter()
        .flatten()
        .map(|d| Digest::from_proto(Some(d)).unwrap())
        .collect();
    for file in &result.output_files {
        out.extend_from_slice(&file.contents);
        blobs.push(Digest::from_proto(file.digest.as_ref()).unwrap());
    }
    for link in &result.output_symlinks {
        out.extend_from_slice(link.target.as_bytes());
    }
    for dir in &result.output_directories {
        let tree_digest = Digest::from_proto(dir.tree_digest.as_ref()).unwrap();
        let tree = Tree::decode(remote.read_blob(&tree_digest).await.unwrap()).unwrap();
        for directory in tree.root.iter().chain(&tree.children) {
            for file in &directory.files {
                blobs.push(Digest::from_proto(file.digest.as_ref()).unwrap());
            }
        }
    }
    for digest in blobs {
        out.extend_from_slice(&remote.read_blob(&digest).await.unwrap());
    }
    out
}

/// How many outputs of any kind a response reports.
#[allow(deprecated)] // REAPI 2.0's symlink fields: nothing may be there either.
fn outputs(response: &ExecuteResponse) -> usize {
    response.result.as_ref().map_or(0, |r| {
        r.output_files.len()
            + r.output_directories.len()
            + r.output_symlinks.len()
            + r.output_file_symlinks.len()
            + r.output_directory_symlinks.len()
    })
}

/// Waits until every one of `names` has a session with the scheduler.
async fn wait_connected(url: &str, names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fleet = workers(url).await;
        if names
            .iter()
            .all(|name| fleet.get(*name).is_some_and(|w| w.connected))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not all of {names:?} connected: {fleet:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The farm still serves after an attack: a plain action runs on it, and every
/// connected worker is in good standing (an attack is the action's fault, not the
/// worker's).
async fn assert_healthy(url: &str, remote: &Remote, what: &str) {
    let nonce = uuid::Uuid::new_v4();
    let response = execute(remote, &shell(&format!("echo healthy {nonce}")))
        .await
        .unwrap();
    assert_eq!(
        status_code(&response),
        Code::Ok,
        "{what}: {:?}",
        response.status
    );
    assert_eq!(response.result.as_ref().unwrap().exit_code, 0, "{what}");
    assert_eq!(
        stdout_of(remote, &response).await,
        format!("healthy {nonce}\n"),
        "{what}"
    );
    let fleet = workers(url).await;
    let connected: Vec<&Listed> = fleet.values().filter(|w| w.connected).collect();
    assert!(!connected.is_empty(), "{what}: no worker is connected");
    for worker in connected {
        assert_eq!(worker.standing, "active", "{what}: {worker:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_beneath_a_symlink_the_action_made_are_not_followed() {
    let canary = Canary::new();
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    let rel = canary.rel();
    let climb = climbing();
    // The worker makes the declared outputs' parents before the command runs; the
    // command then swaps `h` for a symlink that leads to the host's `/` (absolute,
    // or relative and climbing), and declares the canary file, or its directory,
    // beneath it. Followed on the worker's side, each would be the host's canary.
    let cases = [
        (
            "rm -rf h && ln -s / h".to_owned(),
            format!("h/{rel}/secret"),
        ),
        ("rm -rf h && ln -s / h".to_owned(), format!("h/{rel}")),
        (
            format!("rm -rf h && ln -s {climb} h"),
            format!("h/{rel}/secret"),
        ),
        (format!("rm -rf h && ln -s {climb} h"), format!("h/{rel}")),
    ];
    for (script, output) in &cases {
        let what = format!("{script}, declaring {output}");
        let spec = ExecSpec {
            output_paths: vec![output.clone()],
            ..shell(&format!("{script} && readlink h"))
        };
        let response = execute(&remote, &spec).await.unwrap();
        assert_eq!(
            status_code(&response),
            Code::Ok,
            "{what}: {:?}",
            response.status
        );
        assert_eq!(
            response.result.as_ref().unwrap().exit_code,
            0,
            "{what}: the attack did not get to run: {}",
            stderr_of(&remote, &response).await
        );
        assert_eq!(
            outputs(&response),
            0,
            "{what}: an output beneath a symlink: {:?}",
            response.result
        );
        canary.assert_intact(&what, &returned(&remote, &response).await);
    }

    // The symlink itself, declared: to `/` it is refused (absolute symlinks are
    // disallowed); climbing, it is reported as the text it is, never followed.
    let spec = ExecSpec {
        output_paths: vec!["h".into()],
        ..shell("ln -s / h")
    };
    let response = execute(&remote, &spec).await.unwrap();
    assert_eq!(
        status_code(&response),
        Code::FailedPrecondition,
        "{:?}",
        response.status
    );
    let message = &response.status.as_ref().unwrap().message;
    assert!(message.contains("absolute"), "{message}");
    canary.assert_intact(
        "declaring a symlink to /",
        &returned(&remote, &response).await,
    );
    let spec = ExecSpec {
        output_paths: vec!["h".into()],
        ..shell(&format!("ln -s {climb} h"))
    };
    let response = execute(&remote, &spec).await.unwrap();
    assert_eq!(status_code(&response), Code::Ok, "{:?}", response.status);
    let result = response.result.as_ref().unwrap();
    assert_eq!(result.output_symlinks.len(), 1, "{result:?}");
    assert_eq!(result.output_symlinks[0].target, climb);
    assert_eq!(outputs(&response), 1, "{result:?}");
    canary.assert_intact(
        "declaring a climbing symlink",
        &returned(&remote, &response).await,
    );

    canary.assert_not_uploaded(&remote).await;
    assert_healthy(&farm.url, &remote, "after outputs beneath symlinks").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_working_directory_replaced_by_a_symlink_yields_no_outputs() {
    let canary = Canary::new();
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    let rel = canary.rel();
    let climb = climbing();
    // The input root holds the working directory `wd`, in which the worker makes
    // the outputs' parents; the command removes `wd` and puts a symlink to the
    // host's `/` in its place, so that the declared outputs, read relative to the
    // working directory, would be the canary and its directory.
    let input = tempfile::tempdir().unwrap();
    std::fs::create_dir(input.path().join("wd")).unwrap();
    for target in ["/", climb.as_str()] {
        let what = format!("working directory replaced by a symlink to {target}");
        let spec = ExecSpec {
            input: Some(input.path().to_owned()),
            working_directory: "wd".into(),
            output_paths: vec![format!("{rel}/secret"), rel.clone()],
            ..shell(&format!(
                "cd /work && rm -rf wd && ln -s {target} wd && readlink wd"
            ))
        };
        let response = execute(&remote, &spec).await.unwrap();
        assert_eq!(
            status_code(&response),
            Code::Ok,
            "{what}: {:?}",
            response.status
        );
        assert_eq!(
            response.result.as_ref().unwrap().exit_code,
            0,
            "{what}: the attack did not get to run: {}",
            stderr_of(&remote, &response).await
        );
        assert_eq!(stdout_of(&remote, &response).await, format!("{target}\n"));
        assert_eq!(
            outputs(&response),
            0,
            "{what}: outputs through the symlink: {:?}",
            response.result
        );
        canary.assert_intact(&what, &returned(&remote, &response).await);
    }
    canary.assert_not_uploaded(&remote).await;
    assert_healthy(&farm.url, &remote, "after a replaced working directory").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn input_symlinks_that_climb_out_once_chained_are_refused() {
    let canary = Canary::new();
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    // DEPTH directories `d/d/.../d`; in the deepest, `up -> ../..` (DEPTH times);
    // at the root, `esc -> d/.../d/up/../..` (DEPTH + 1 times) `/{canary}`.
    //
    // As text, every target stays inside: `up` climbs DEPTH levels from DEPTH
    // levels down, to the root; `esc` descends DEPTH + 1 names (the `d`s and `up`),
    // climbs DEPTH + 1 levels back to the root, and descends to `{canary}`, which
    // inside the root does not exist. Followed as the kernel follows it, `up` is
    // the root itself, so the DEPTH + 1 levels that `esc` climbs from there lead
    // above the root: to `/` of whichever machine lays the tree out, and on to the
    // host's canary. DEPTH exceeds the depth of any input root on the worker.
    const DEPTH: usize = 30;
    let input = tempfile::tempdir().unwrap();
    let deepest = input.path().join(["d"; DEPTH].join("/"));
    std::fs::create_dir_all(&deepest).unwrap();
    std::os::unix::fs::symlink([".."; DEPTH].join("/"), deepest.join("up")).unwrap();
    let esc = format!(
        "{}/up/{}/{}",
        ["d"; DEPTH].join("/"),
        [".."; DEPTH + 1].join("/"),
        canary.rel()
    );
    std::os::unix::fs::symlink(&esc, input.path().join("esc")).unwrap();
    // On this host the chain does reach the canary: the attack is real.
    assert_eq!(
        std::fs::read(input.path().join("esc/secret")).unwrap(),
        canary.content
    );
    // And the client sends the symlinks as they are, as SymlinkNodes.
    let tree = paddock_client::tree::merkle_tree(input.path())
        .await
        .unwrap();
    let root = tree
        .blobs
        .iter()
        .find_map(|(digest, source)| match source {
            Source::Memory(bytes) if *digest == tree.root => {
                Some(Directory::decode(bytes.clone()).unwrap())
            }
            _ => None,
        })
        .expect("the root Directory");
    assert!(
        root.symlinks
            .iter()
            .any(|s| s.name == "esc" && s.target == esc),
        "{root:?}"
    );

    // The action reads through the chain and declares an output beneath it, so
    // that the worker would make `newdir` through it before the command ran.
    let spec = ExecSpec {
        input: Some(input.path().to_owned()),
        output_paths: vec!["esc/newdir/out".into()],
        ..shell("cat esc/secret; mkdir -p esc/newdir && cat esc/secret > esc/newdir/out")
    };
    let response = execute(&remote, &spec).await.unwrap();
    assert_eq!(
        status_code(&response),
        Code::InvalidArgument,
        "{:?}",
        response.status
    );
    let message = &response.status.as_ref().unwrap().message;
    assert!(message.contains("esc"), "{message}");
    assert_eq!(outputs(&response), 0);
    canary.assert_intact(
        "a chained symlink out of the input root",
        &returned(&remote, &response).await,
    );
    canary.assert_not_uploaded(&remote).await;
    assert_healthy(&farm.url, &remote, "after an escaping input tree").await;
}

/// Asserts that a worker's cache entry is the worker's (root's), read-only, holds
/// `content`, and is linked nowhere but in the cache.
fn assert_cache_entry(path: &Path, content: &[u8], when: &str) {
    let meta = std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{when}: no cache entry at {}: {e}", path.display()));
    assert_eq!(meta.uid(), 0, "{when}: the cache entry is not the worker's");
    assert_eq!(
        meta.mode() & 0o7777,
        0o444,
        "{when}: the cache entry is not read-only"
    );
    assert_eq!(
        meta.nlink(),
        1,
        "{when}: the cache entry is linked elsewhere"
    );
    assert_eq!(
        std::fs::read(path).unwrap(),
        content,
        "{when}: the cache entry changed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_action_cannot_tamper_with_inputs_that_later_actions_share() {
    let canary = Canary::new();
    // `paddock up` has one worker: A, B and C all run on it, one after another (so
    // as the same uid), and share its cache.
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    let original = format!("original {}", uuid::Uuid::new_v4());
    let blob = Digest::of(original.as_bytes());

    // A writes the blob; the worker keeps it in its cache for later actions.
    let a = ExecSpec {
        output_paths: vec!["out.bin".into()],
        ..shell(&format!("printf '%s' '{original}' > out.bin"))
    };
    let response = execute(&remote, &a).await.unwrap();
    assert_eq!(status_code(&response), Code::Ok, "{:?}", response.status);
    let produced = &response.result.as_ref().unwrap().output_files;
    assert_eq!(produced.len(), 1, "{produced:?}");
    assert_eq!(
        Digest::from_proto(produced[0].digest.as_ref()).unwrap(),
        blob
    );
    let cached =
        farm.data_dir
            .join("workers/0/cache")
            .join(format!("{}-{}", blob.hash_hex(), blob.size()));
    assert_cache_entry(&cached, original.as_bytes(), "after A");

    // B gets the blob as its input, a hard link to that cache entry, and tries
    // every way of changing it, recording what worked.
    let input = tempfile::tempdir().unwrap();
    std::fs::write(input.path().join("in.bin"), &original).unwrap();
    let tamper = [
        "chmod u+w in.bin 2>/dev/null && echo CHMOD-WORKED || echo chmod-refused",
        "chmod 777 in.bin 2>/dev/null && echo CHMOD-777-WORKED || echo chmod-777-refused",
        "(echo TAMPERED > in.bin) 2>/dev/null && echo WRITE-WORKED || echo write-refused",
        "(echo TAMPERED >> in.bin) 2>/dev/null && echo APPEND-WORKED || echo append-refused",
        "echo TAMPERED > tampered && (cp tampered in.bin) 2>/dev/null && echo CP-WORKED || echo cp-refused",
        "truncate -s 0 in.bin 2>/dev/null && echo TRUNCATE-WORKED || echo truncate-refused",
        "touch -d 2000-01-01 in.bin 2>/dev/null && echo TOUCH-WORKED || echo touch-refused",
        // Its input root is its own to change: this replaces its link, not the file.
        "rm -f in.bin && echo TAMPERED > in.bin && echo replaced-own-copy",
        "cat in.bin",
    ]
    .join("\n");
    let b = ExecSpec {
        input: Some(input.path().to_owned()),
        ..shell(&tamper)
    };
    let response = execute(&remote, &b).await.unwrap();
    assert_eq!(status_code(&response), Code::Ok, "{:?}", response.status);
    let stdout = stdout_of(&remote, &response).await;
    assert_eq!(
        stdout,
        "chmod-refused\nchmod-777-refused\nwrite-refused\nappend-refused\ncp-refused\n\
         truncate-refused\ntouch-refused\nreplaced-own-copy\nTAMPERED\n",
        "stderr: {}",
        stderr_of(&remote, &response).await
    );
    assert_cache_entry(&cached, original.as_bytes(), "after B's attempts");

    // C gets the same input and sees exactly what A wrote.
    let c = ExecSpec {
        input: Some(input.path().to_owned()),
        ..shell("cat in.bin")
    };
    let response = execute(&remote, &c).await.unwrap();
    assert_eq!(status_code(&response), Code::Ok, "{:?}", response.status);
    assert_eq!(stdout_of(&remote, &response).await, original);
    assert_cache_entry(&cached, original.as_bytes(), "after C");

    canary.assert_intact("after tampering with inputs", b"");
    assert_healthy(&farm.url, &remote, "after tampering with inputs").await;
}

/// A scheduler that is not Paddock's, as a compromised or impersonated one would be:
/// it gives the first worker that registers the assignments the test wrote, ids and
/// all, passes on everything the worker says, and keeps the session open for as
/// long as the worker does. It decides nothing else.
struct FakeScheduler {
    assignments: parking_lot::Mutex<Vec<wire::Assignment>>,
    heard: mpsc::UnboundedSender<wire::WorkerMessage>,
}

#[tonic::async_trait]
impl wire::scheduler_server::Scheduler for FakeScheduler {
    type SessionStream =
        Pin<Box<dyn Stream<Item = Result<wire::SchedulerMessage, tonic::Status>> + Send>>;

    async fn session(
        &self,
        request: tonic::Request<tonic::Streaming<wire::WorkerMessage>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        use wire::scheduler_message::Message as S;
        let mut inbound = request.into_inner();
        match inbound.message().await? {
            Some(wire::WorkerMessage {
                message: Some(wire::worker_message::Message::Register(_)),
            }) => {}
            _ => {
                return Err(tonic::Status::invalid_argument(
                    "a session starts with Register",
                ))
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let registered = wire::Registered {
            heartbeat_interval_ms: 1000,
        };
        let _ = tx.send(wire::SchedulerMessage {
            message: Some(S::Registered(registered)),
        });
        let assignments = std::mem::take(&mut *self.assignments.lock());
        for assignment in assignments {
            let _ = tx.send(wire::SchedulerMessage {
                message: Some(S::Assignment(assignment)),
            });
        }
        let heard = self.heard.clone();
        tokio::spawn(async move {
            // The session lasts as long as `tx`: keep it until the worker hangs up.
            let _session = tx;
            while let Ok(Some(message)) = inbound.message().await {
                if heard.send(message).is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            UnboundedReceiverStream::new(rx).map(Ok),
        )))
    }
}

fn finished_of(message: wire::WorkerMessage) -> Option<wire::Finished> {
    match message.message {
        Some(wire::worker_message::Message::Finished(finished)) => Some(finished),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduler_cannot_choose_where_the_worker_writes() {
    let canary = Canary::new();
    // Ids a worker that named its directories after them would turn into paths:
    // the canary's directory itself; a way up from the worker's directories to it;
    // and a name longer than any file system takes.
    let ids = [
        canary.dir.to_str().unwrap().to_owned(),
        format!("{}/{}", climbing(), canary.rel()),
        "x".repeat(10_000),
    ];

    // One action for all three: it writes `marker` where it runs, then waits for
    // the test to let it finish, so that the test can look at the worker's
    // directories while all three run.
    let command = Command {
        arguments: vec![
            "sh".into(),
            "-c".into(),
            "echo planted > marker; while [ ! -e go ]; do sleep 0.05; done".into(),
        ],
        environment_variables: vec![EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        output_paths: vec!["marker".into()],
        ..Default::default()
    };
    let (command_digest, command_bytes) = Digest::of_message(&command);
    let (root_digest, root_bytes) = Digest::of_message(&Directory::default());
    let action = Action {
        command_digest: Some(command_digest.to_proto()),
        input_root_digest: Some(root_digest.to_proto()),
        ..Default::default()
    };
    let (action_digest, action_bytes) = Digest::of_message(&action);
    let assignments: Vec<wire::Assignment> = ids
        .iter()
        .map(|id| wire::Assignment {
            assignment_id: id.clone(),
            instance_name: String::new(),
            action_digest: Some(wire::Digest {
                hash: action_digest.hash_hex(),
                size_bytes: action_digest.size() as i64,
            }),
            action: action_bytes.clone(),
            command: command_bytes.clone(),
            timeout_ms: 120_000,
            queued_at_micros: paddock_reapi::time::unix_micros(SystemTime::now()),
        })
        .collect();

    // The fake scheduler and a real CAS (Paddock's own services, in memory) on one
    // loopback port, as a worker expects them.
    let (heard_tx, mut heard) = mpsc::unbounded_channel();
    let fake = FakeScheduler {
        assignments: parking_lot::Mutex::new(assignments),
        heard: heard_tx,
    };
    let cas: Arc<dyn paddock_cas::BlobStore> = Arc::new(paddock_cas::WithEmptyBlob::new(Arc::new(
        paddock_cas::MemoryStore::new(),
    )));
    let storage = paddock_server::Storage {
        cas,
        action_cache: Arc::new(paddock_cas::MemoryActionCache::new(16)),
        history: Arc::new(paddock_history::History::new(Default::default())),
    };
    let routes = paddock_server::cache_routes(
        &storage,
        paddock_server::Limits {
            max_batch_size: 4 << 20,
            max_batch_blobs: 100_000,
            max_tree_directories: 1_000_000,
        },
        &Default::default(),
        true,
    )
    .add_service(wire::scheduler_server::SchedulerServer::new(fake));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("grpc://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(paddock_server::serve(
        listener,
        None,
        routes,
        paddock_server::Access {
            callers: paddock_server::Callers::anyone(),
            audience: paddock_server::Audience::Workers,
        },
        std::future::pending(),
    ));
    let remote = Remote::connect(&url, "").await.unwrap();
    remote
        .upload_missing(vec![
            (root_digest, Source::Memory(root_bytes.into())),
            (command_digest, Source::Memory(command_bytes.into())),
            (action_digest, Source::Memory(action_bytes.into())),
        ])
        .await
        .unwrap();

    let worker = Worker::start(&url, "target", &["--capacity", "3"]);
    let actions = worker.work_dir().join("actions");
    // Until every assignment's command runs (its `marker` is there), the worker
    // must not have answered any: an early answer is a refusal.
    let deadline = Instant::now() + Duration::from_secs(120);
    let roots = loop {
        while let Ok(message) = heard.try_recv() {
            if let Some(finished) = finished_of(message) {
                panic!(
                    "an assignment ended before its command could have: {:?}\n{}",
                    finished.outcome,
                    worker.log()
                );
            }
        }
        let roots: Vec<PathBuf> = std::fs::read_dir(&actions)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path().join("root"))
                    .filter(|root| root.join("marker").exists())
                    .collect()
            })
            .unwrap_or_default();
        if roots.len() == ids.len() {
            break roots;
        }
        assert!(
            Instant::now() < deadline,
            "the assignments did not all start:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    // While they run: the worker named their directories itself, and nothing
    // appeared beside the canary.
    for entry in std::fs::read_dir(&actions).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            name.parse::<u64>().is_ok(),
            "an action directory the worker did not name: {name:.80}"
        );
    }
    canary.assert_intact("while the assignments ran", b"");
    for root in &roots {
        std::fs::write(root.join("go"), b"").unwrap();
    }

    let mut answers: HashMap<String, wire::Finished> = HashMap::new();
    while answers.len() < ids.len() {
        let message = tokio::time::timeout(Duration::from_secs(120), heard.recv())
            .await
            .unwrap_or_else(|_| panic!("the worker did not answer:\n{}", worker.log()))
            .expect("the worker's session ended");
        if let Some(finished) = finished_of(message) {
            let id = finished.assignment_id.clone();
            assert!(
                answers.insert(id, finished).is_none(),
                "an assignment was answered twice"
            );
        }
    }
    let mut given_back = Vec::new();
    for id in &ids {
        let answer = answers
            .remove(id)
            .unwrap_or_else(|| panic!("no answer for the assignment {id:.80}"));
        let Some(wire::finished::Outcome::Completed(completed)) = &answer.outcome else {
            panic!(
                "the assignment {id:.80} was not run: {:?}\n{}",
                answer.outcome,
                worker.log()
            );
        };
        let result = ActionResult::decode(completed.action_result.as_slice()).unwrap();
        assert_eq!(result.exit_code, 0, "{id:.80}: {result:?}");
        let marker = result
            .output_files
            .iter()
            .find(|f| f.path == "marker")
            .unwrap_or_else(|| panic!("{id:.80}: no marker in {result:?}"));
        assert_eq!(text(&remote, marker.digest.as_ref()).await, "planted\n");
        let response = ExecuteResponse {
            result: Some(result),
            ..Default::default()
        };
        given_back.extend(returned(&remote, &response).await);
    }
    assert!(answers.is_empty(), "answers to unknown assignments");

    canary.assert_intact("after assignments with hostile ids", &given_back);
    canary.assert_not_uploaded(&remote).await;
    // Every action directory is gone, and none was ever named after an id.
    assert_eq!(std::fs::read_dir(&actions).unwrap().count(), 0);
    for entry in std::fs::read_dir(worker.work_dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!ids.contains(&name), "{name:.80} in the work directory");
    }
    drop(worker);
    server.abort();
}

/// A Directory whose `fanout` subdirectories (`d0`, `d1`, ...) are all `child`.
fn fan_out(child: &Directory, fanout: usize) -> Directory {
    let digest = Digest::of_message(child).0.to_proto();
    Directory {
        directories: (0..fanout)
            .map(|i| DirectoryNode {
                name: format!("d{i}"),
                digest: Some(digest.clone()),
            })
            .collect(),
        ..Default::default()
    }
}

/// A Directory message as a blob to upload.
fn blob(directory: &Directory) -> (Digest, Source) {
    let (digest, bytes) = Digest::of_message(directory);
    (digest, Source::Memory(bytes.into()))
}

/// Runs `script` on an input root the test built itself (`blobs` holds its
/// Directory messages and files), as a client that builds its own Action would.
async fn run_on_root(
    remote: &Remote,
    root: Digest,
    mut blobs: Vec<(Digest, Source)>,
    script: &str,
) -> ExecuteResponse {
    let command = Command {
        arguments: vec!["sh".into(), "-c".into(), script.into()],
        environment_variables: vec![EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        ..Default::default()
    };
    let (command_digest, command_bytes) = Digest::of_message(&command);
    let action = Action {
        command_digest: Some(command_digest.to_proto()),
        input_root_digest: Some(root.to_proto()),
        ..Default::default()
    };
    let (action_digest, action_bytes) = Digest::of_message(&action);
    blobs.push((command_digest, Source::Memory(command_bytes.into())));
    blobs.push((action_digest, Source::Memory(action_bytes.into())));
    remote.upload_missing(blobs).await.unwrap();
    let spec = ExecSpec {
        skip_cache_lookup: true,
        ..Default::default()
    };
    // No bound on how fast it must be refused; a hang is a failure all the same.
    tokio::time::timeout(
        Duration::from_secs(300),
        execute_digest(remote, &action_digest, &spec),
    )
    .await
    .expect("the execution did not end")
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_input_tree_of_shared_subtrees_is_refused_before_it_is_laid_out() {
    let canary = Canary::new();
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    // Eight subdirectories per level, all the same Directory, eight levels: nine
    // messages of a few hundred bytes that expand to 8 + 64 + ... + 8^8, over
    // nineteen million directories, far beyond the default limit of a million.
    let mut level = Directory::default();
    let mut blobs = vec![blob(&level)];
    for _ in 0..8 {
        level = fan_out(&level, 8);
        blobs.push(blob(&level));
    }
    let root = Digest::of_message(&level).0;
    let response = run_on_root(&remote, root, blobs, "echo laid out").await;
    assert_eq!(
        status_code(&response),
        Code::ResourceExhausted,
        "{:?}",
        response.status
    );
    let message = &response.status.as_ref().unwrap().message;
    assert!(
        message.contains("worker.limits.max_input_entries"),
        "{message}"
    );
    // Nothing of the tree is left on the worker.
    let actions = farm.data_dir.join("workers/0/actions");
    assert_eq!(std::fs::read_dir(actions).unwrap().count(), 0);
    canary.assert_intact(
        "a tree of shared subtrees",
        &returned(&remote, &response).await,
    );
    assert_healthy(&farm.url, &remote, "after an exploding input tree").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_subtrees_count_at_every_place_they_appear() {
    let canary = Canary::new();
    let config = config_file("[worker.limits]\nmax_input_entries = 100\n");
    let farm = Farm::start(&["--config", &config]);
    let remote = farm.remote("").await;
    let leaf = Directory {
        files: vec![FileNode {
            name: "f".into(),
            digest: Some(Digest::of(b"leaf").to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let file = (
        Digest::of(b"leaf"),
        Source::Memory(Bytes::from_static(b"leaf")),
    );
    // Under the limit: 4 + 4 * (4 + 4) = 36 entries, laid out in full, the shared
    // leaf at each of its 16 places.
    let small_mid = fan_out(&leaf, 4);
    let small = fan_out(&small_mid, 4);
    let response = run_on_root(
        &remote,
        Digest::of_message(&small).0,
        vec![file.clone(), blob(&leaf), blob(&small_mid), blob(&small)],
        "find . -type f | wc -l",
    )
    .await;
    assert_eq!(status_code(&response), Code::Ok, "{:?}", response.status);
    assert_eq!(stdout_of(&remote, &response).await.trim(), "16");
    // Three distinct messages, 3 entries if each were counted once, expand to
    // 8 + 8 * (8 + 8) = 136: over the limit only when counted where they appear.
    let mid = fan_out(&leaf, 8);
    let top = fan_out(&mid, 8);
    let response = run_on_root(
        &remote,
        Digest::of_message(&top).0,
        vec![file, blob(&leaf), blob(&mid), blob(&top)],
        "find . -type f | wc -l",
    )
    .await;
    assert_eq!(
        status_code(&response),
        Code::ResourceExhausted,
        "{:?}",
        response.status
    );
    let message = &response.status.as_ref().unwrap().message;
    assert!(
        message.contains("worker.limits.max_input_entries") && message.contains("136"),
        "{message}"
    );
    canary.assert_intact(
        "a shared tree over the limit",
        &returned(&remote, &response).await,
    );
    assert_healthy(&farm.url, &remote, "after a tree over the limit").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn syscalls_outside_the_allow_list_fail_and_the_action_carries_on() {
    let canary = Canary::new();
    let farm = Farm::start(&[]);
    let remote = farm.remote("").await;
    // Each probe prints `ok` or the errno of a call. Without the filter, an
    // unprivileged process opens vsock sockets, turns address randomisation off,
    // gets 0 from get_mempolicy (on NUMA kernels) and EINVAL from clone3 without
    // arguments.
    let probe = "import ctypes\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        def report(name, result):\n\
        \x20   print(name, 'ok' if result >= 0 else ctypes.get_errno())\n\
        report('vsock', libc.socket(40, 1, 0))\n\
        report('alg', libc.socket(38, 5, 0))\n\
        report('unix', libc.socket(1, 1, 0))\n\
        report('inet', libc.socket(2, 1, 0))\n\
        report('inet6', libc.socket(10, 1, 0))\n\
        report('netlink', libc.socket(16, 3, 0))\n\
        report('persona-no-aslr', libc.syscall(135, ctypes.c_ulong(0x0040000)))\n\
        report('persona-query', libc.syscall(135, ctypes.c_ulong(0xffffffff)))\n\
        report('get_mempolicy', libc.syscall(239, 0, 0, 0, 0, 0))\n\
        report('clone3', libc.syscall(435, None, 0))\n\
        report('syscall-470', libc.syscall(470))\n\
        report('syscall-1000', libc.syscall(1000))\n\
        print('carried on')\n";
    let spec = ExecSpec {
        arguments: vec!["python3".into(), "-c".into(), probe.into()],
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        skip_cache_lookup: true,
        ..Default::default()
    };
    let response = execute(&remote, &spec).await.unwrap();
    assert_eq!(status_code(&response), Code::Ok, "{:?}", response.status);
    let stdout = stdout_of(&remote, &response).await;
    assert_eq!(
        response.result.as_ref().unwrap().exit_code,
        0,
        "{stdout}\n{}",
        stderr_of(&remote, &response).await
    );
    let seen: HashMap<&str, &str> = stdout.lines().filter_map(|l| l.split_once(' ')).collect();
    for (call, expected) in [
        ("vsock", "97"), // EAFNOSUPPORT, as a kernel without the family answers
        ("alg", "97"),
        ("unix", "ok"),
        ("inet", "ok"),
        ("inet6", "ok"),
        ("netlink", "ok"),
        ("persona-no-aslr", "1"), // EPERM
        ("persona-query", "ok"),
        ("get_mempolicy", "38"), // ENOSYS: not on the allow list
        ("clone3", "38"),
        ("syscall-470", "38"),
        ("syscall-1000", "38"),
    ] {
        assert_eq!(seen.get(call).copied(), Some(expected), "{call}:\n{stdout}");
    }
    assert!(stdout.ends_with("carried on\n"), "{stdout}");
    canary.assert_intact("seccomp probes", &returned(&remote, &response).await);
    assert_healthy(&farm.url, &remote, "after seccomp probes").await;
}

/// A worker over the real protocol that lies: it takes every assignment, and once
/// `go` turns true answers each with "inputs missing", naming the action's input
/// root (which the CAS holds). Until then it holds them, with heartbeats, so that
/// the scheduler keeps it. Every assignment it gets is passed on to `seen`.
async fn lying_worker(
    url: String,
    mut go: watch::Receiver<bool>,
    seen: mpsc::UnboundedSender<wire::Assignment>,
) {
    use wire::scheduler_message::Message as S;
    use wire::worker_message::Message as W;
    let say = |message: W| wire::WorkerMessage {
        message: Some(message),
    };
    let remote = Remote::connect(&url, "").await.unwrap();
    let (tx, rx) = mpsc::channel::<wire::WorkerMessage>(64);
    let register = wire::Register {
        name: "liar".into(),
        properties: paddock_worker::detected_properties()
            .into_iter()
            .map(|(name, value)| wire::Property { name, value })
            .collect(),
        // Far more room than the honest worker: the scheduler prefers it.
        capacity: 64,
    };
    tx.send(say(W::Register(register))).await.unwrap();
    let mut inbound = wire::scheduler_client::SchedulerClient::new(remote.channel())
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut held: Vec<wire::Assignment> = Vec::new();
    let mut lying = false;
    let mut beat = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(wire::SchedulerMessage { message: Some(S::Assignment(assignment)) })) => {
                    let _ = seen.send(assignment.clone());
                    held.push(assignment);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            },
            changed = go.changed(), if !lying => {
                if changed.is_err() {
                    return;
                }
                lying = *go.borrow();
            }
            _ = beat.tick() => {
                let running = held.iter().map(|a| a.assignment_id.clone()).collect();
                if tx.send(say(W::Heartbeat(wire::Heartbeat { running, cache: None }))).await.is_err() {
                    return;
                }
            }
        }
        if lying {
            for assignment in held.drain(..) {
                let action = Action::decode(assignment.action.as_slice()).unwrap();
                let root = action.input_root_digest.unwrap();
                let lie = wire::Finished {
                    assignment_id: assignment.assignment_id,
                    outcome: Some(wire::finished::Outcome::MissingInputs(
                        wire::MissingInputs {
                            digests: vec![wire::Digest {
                                hash: root.hash,
                                size_bytes: root.size_bytes,
                            }],
                        },
                    )),
                };
                if tx.send(say(W::Finished(lie))).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_claims_present_inputs_are_missing_is_not_believed() {
    let canary = Canary::new();
    let server = Farm::server("127.0.0.1:0", &[]);
    let (go, go_rx) = watch::channel(false);
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let liar = tokio::spawn(lying_worker(server.worker_url.clone(), go_rx, seen_tx));
    wait_connected(&server.url, &["liar"]).await;

    let remote = server.remote("").await;
    let input = tempfile::tempdir().unwrap();
    let content = format!("honest {}", uuid::Uuid::new_v4());
    std::fs::write(input.path().join("in.txt"), &content).unwrap();
    let spec = ExecSpec {
        input: Some(input.path().to_owned()),
        ..shell("cat in.txt")
    };
    let prepared = prepare(&spec).await.unwrap();
    remote.upload_missing(prepared.blobs.clone()).await.unwrap();
    // One Execute, followed to its end: no client-side retry hides a false answer.
    let client = {
        let (remote, spec, digest) = (remote.clone(), spec.clone(), prepared.digest);
        tokio::spawn(async move { execute_digest(&remote, &digest, &spec).await })
    };
    // The liar, the only worker, gets the action; only then does an honest one join.
    let first = tokio::time::timeout(Duration::from_secs(30), seen.recv())
        .await
        .expect("the liar got no assignment")
        .expect("the liar is gone");
    assert_eq!(
        first.action_digest.map(|d| d.hash),
        Some(prepared.digest.hash_hex())
    );
    let honest = Worker::start(&server.worker_url, "honest", &["--capacity", "1"]);
    wait_connected(&server.url, &["honest"]).await;
    go.send(true).unwrap();

    let response = tokio::time::timeout(Duration::from_secs(180), client)
        .await
        .unwrap_or_else(|_| panic!("the execution did not end:\n{}", honest.log()))
        .unwrap()
        .unwrap();
    let status = response.status.clone().unwrap_or_default();
    assert_eq!(status.code, Code::Ok as i32, "{status:?}");
    assert!(
        missing_blobs_of(&status).is_empty(),
        "the lie reached the client: {status:?}"
    );
    let result = response.result.as_ref().unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.execution_metadata.as_ref().unwrap().worker, "honest");
    assert_eq!(stdout_of(&remote, &response).await, content);
    // The scheduler saw through the claim and held it against the liar.
    let metrics = common::http_get(&server.metrics_url);
    let false_reports: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("paddock_false_missing_reports_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(false_reports >= 1.0, "{metrics}");
    let fleet = workers(&server.url).await;
    let lies = fleet["liar"].totals.as_ref().unwrap().infra_failures;
    assert!(lies >= 1, "{:?}", fleet["liar"]);
    assert_eq!(fleet["honest"].standing, "active", "{:?}", fleet["honest"]);

    canary.assert_intact("a lying worker", &returned(&remote, &response).await);
    liar.abort();
}

/// Runs `count` actions at once, each with an input file of `size` bytes of its own,
/// in `platform`; every one must succeed (whatever worker it took to get there).
async fn build_succeeds(remote: &Remote, count: usize, size: usize, platform: &[(&str, &str)]) {
    let mut running = Vec::new();
    for i in 0..count {
        let input = tempfile::tempdir().unwrap();
        let mut bytes = vec![b'x'; size];
        let unique = format!("{i:08}{:08x}", rand::random::<u32>());
        bytes[..unique.len()].copy_from_slice(unique.as_bytes());
        std::fs::write(input.path().join("input"), &bytes).unwrap();
        let spec = ExecSpec {
            input: Some(input.path().to_owned()),
            skip_cache_lookup: true,
            platform: platform
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..shell("wc -c < input")
        };
        let remote = remote.clone();
        running.push(tokio::spawn(async move {
            let response = execute(&remote, &spec).await.unwrap();
            drop(input);
            let stdout = stdout_of(&remote, &response).await;
            (response, stdout)
        }));
    }
    for task in running {
        let (response, stdout) = task.await.unwrap();
        assert_eq!(status_code(&response), Code::Ok, "{:?}", response.status);
        assert_eq!(stdout.trim(), size.to_string(), "{response:?}");
    }
}

/// A worker whose root file systems fail is the one at fault: its actions run
/// elsewhere (the client's build succeeds), and the failures count in its health
/// until it is quarantined; the healthy workers stay active.
async fn root_failures_quarantine(
    server: &Farm,
    bad: &Worker,
    platform: &[(&str, &str)],
    symptom: &str,
) {
    let remote = server.remote("").await;
    build_succeeds(&remote, 24, 3 << 20, platform).await;
    let fleet = workers(&server.url).await;
    let worker = &fleet[&bad.name];
    assert_eq!(worker.standing, "quarantined", "{worker:?}\n{}", bad.log());
    assert!(
        worker.totals.as_ref().unwrap().infra_failures >= 4,
        "{worker:?}"
    );
    for good in ["good-1", "good-2"] {
        assert_eq!(fleet[good].standing, "active", "{:?}", fleet[good]);
    }
    // The scheduler says why it ran the actions elsewhere.
    assert!(server.log().contains(symptom), "{}", server.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_disk_is_full_is_quarantined_and_the_build_succeeds() {
    let server = Farm::server(
        "127.0.0.1:0",
        &[
            "--config",
            &config_file("[scheduler.quarantine]\nmin_samples = 4\n"),
        ],
    );
    let _good = ["good-1", "good-2"]
        .map(|name| Worker::start(&server.worker_url, name, &["--capacity", "2"]));
    // Its whole directory is a 2 MiB disk: no 3 MiB input fits in its cache.
    let bad = Worker::start_with(
        &server.worker_url,
        "full-disk",
        &["--capacity", "2"],
        WorkerSetup {
            work_dir_size: Some(2 << 20),
            ..Default::default()
        },
    );
    wait_connected(&server.url, &["good-1", "good-2", "full-disk"]).await;
    root_failures_quarantine(&server, &bad, &[], "No space left on device").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_image_mounts_fail_is_quarantined_and_the_build_succeeds() {
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    build_image("busybox.sh", layout.path(), "1");
    let digest = registry.push(layout.path(), "1", "busybox", &[]);
    let image = registry.pinned("busybox", &digest);
    let config = registry.worker_config("[scheduler.quarantine]\nmin_samples = 4\n");
    let server = Farm::server("127.0.0.1:0", &["--config", &config]);
    let worker_args = ["--capacity", "2", "--config", config.as_str()];
    let _good =
        ["good-1", "good-2"].map(|name| Worker::start(&server.worker_url, name, &worker_args));
    // overlayfs takes its directories in a comma- and colon-separated option: under a
    // directory whose name has a colon, no image root of this worker can be mounted.
    let bad = Worker::start_with(
        &server.worker_url,
        "broken-mounts",
        &worker_args,
        WorkerSetup {
            work_dir_name: Some("work:mounts".into()),
            ..Default::default()
        },
    );
    wait_connected(&server.url, &["good-1", "good-2", "broken-mounts"]).await;
    root_failures_quarantine(
        &server,
        &bad,
        &[("container-image", image.as_str())],
        "overlayfs",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_action_that_fills_the_disk_is_stopped_at_its_bound() {
    let farm = Farm::start(&[
        "--config",
        &config_file(
            "[worker.limits]\nmax_disk = \"16MiB\"\nmax_disk_entries = 1000\nmax_file_size = \"8MiB\"\n",
        ),
    ]);
    let remote = farm.remote("").await;
    let with_timeout = |script: &str| ExecSpec {
        timeout: Some(Duration::from_secs(120)),
        ..shell(script)
    };
    // It writes past its bound (in files each under max_file_size) and waits: the
    // guard stops it while it waits (left alone, it would end at its timeout).
    let response = execute(
        &remote,
        &with_timeout("for i in 1 2 3; do head -c 6291456 /dev/zero > big$i; done; sleep 600"),
    )
    .await
    .unwrap();
    assert_eq!(
        status_code(&response),
        Code::ResourceExhausted,
        "{response:?}"
    );
    assert!(
        response
            .status
            .as_ref()
            .unwrap()
            .message
            .contains("worker.limits.max_disk"),
        "{response:?}"
    );
    // It writes past its bound and ends before any measurement: the last look, after
    // it ended, catches it.
    let response = execute(
        &remote,
        &with_timeout("for i in 1 2 3; do head -c 6291456 /dev/zero > big$i; done"),
    )
    .await
    .unwrap();
    assert_eq!(
        status_code(&response),
        Code::ResourceExhausted,
        "{response:?}"
    );
    // Many small files count as entries.
    let response = execute(
        &remote,
        &with_timeout("mkdir d && cd d && for i in $(seq 1 2000); do : > f$i; done; sleep 600"),
    )
    .await
    .unwrap();
    assert_eq!(
        status_code(&response),
        Code::ResourceExhausted,
        "{response:?}"
    );
    assert!(
        response
            .status
            .as_ref()
            .unwrap()
            .message
            .contains("worker.limits.max_disk_entries"),
        "{response:?}"
    );
    // One file beyond max_file_size (within max_disk) fails as the kernel fails it
    // (RLIMIT_FSIZE).
    let response = execute(
        &remote,
        &with_timeout("head -c 12582912 /dev/zero > one; echo exit $?"),
    )
    .await
    .unwrap();
    let stdout = stdout_of(&remote, &response).await;
    let stderr = stderr_of(&remote, &response).await;
    // SIGXFSZ ends the writer (128 + 25), or it sees EFBIG where it ignores the signal.
    assert!(
        stdout.contains("exit 153") || stderr.contains("File too large"),
        "{stdout}\n{stderr}"
    );
    assert_healthy(&farm.url, &remote, "after filling the disk").await;
}
