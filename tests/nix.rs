//! Nix-hermetic platforms with Debian's Nix 2.8 and no nixpkgs: store paths made in
//! the test itself (a static busybox added to the store, and a derivation whose output
//! refers to it), signed and unsigned `file://` binary caches, a worker whose store
//! lacks the paths, garbage collections mid-action, and Bazel genrules that run in
//! the closure.

mod common;

use std::time::Duration;

use common::bazel::Workspace;
use common::{config_file, nix_command, wait_for_process, Farm, Worker, WorkerSetup};
use paddock_client::exec::{execute, ExecSpec};
use paddock_client::Remote;
use paddock_reapi::Digest;
use tokio::sync::Mutex;
use tonic::Code;

/// The store and its garbage collector are shared: one Nix test at a time.
static STORE: Mutex<()> = Mutex::const_new(());

fn nix(args: &[&str]) -> String {
    let output = nix_command(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?} (apt-get install nix-bin): {e}"));
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn valid(path: &str) -> bool {
    nix_command("nix-store")
        .args(["--check-validity", path])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Two store paths made here: `bb-{tag}` (a static busybox with its applets) and
/// `tools-{tag}`, built by a bare derivation, whose `bin/hello` refers to `bb`, so
/// the closure of `tools` has two paths.
struct StorePaths {
    busybox: String,
    tools: String,
    _dir: tempfile::TempDir,
}

impl StorePaths {
    fn make(tag: &str) -> StorePaths {
        let dir = tempfile::tempdir().unwrap();
        let bb = dir.path().join(format!("bb-{tag}"));
        std::fs::create_dir_all(bb.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", bb.join("bin/busybox"))
            .expect("a static busybox (apt-get install busybox-static)");
        for applet in [
            "sh",
            "ls",
            "cat",
            "echo",
            "env",
            "sleep",
            "tr",
            "mkdir",
            "true",
            "sha256sum",
        ] {
            std::os::unix::fs::symlink("busybox", bb.join("bin").join(applet)).unwrap();
        }
        std::fs::write(bb.join("tag"), tag).unwrap();
        let busybox = nix(&["nix-store", "--add", bb.to_str().unwrap()]);
        let expr = dir.path().join("tools.nix");
        std::fs::write(
            &expr,
            format!(
                r#"let bb = builtins.storePath "{busybox}"; in
derivation {{
  name = "tools-{tag}";
  system = builtins.currentSystem;
  builder = "${{bb}}/bin/sh";
  PATH = "${{bb}}/bin";
  args = [ "-c" "mkdir -p $out/bin; printf '#!${{bb}}/bin/sh\necho hello from tools-{tag}\n' > $out/bin/hello; busybox chmod +x $out/bin/hello" ];
}}
"#
            ),
        )
        .unwrap();
        let tools = nix(&["nix-build", expr.to_str().unwrap(), "--no-out-link"]);
        StorePaths {
            busybox,
            tools,
            _dir: dir,
        }
    }

    fn both(&self) -> String {
        format!("{} {}", self.busybox, self.tools)
    }

    /// Removes both paths (and the derivation that refers to busybox) from this
    /// machine's store.
    fn delete(&self) {
        let deriver = nix(&["nix-store", "--query", "--deriver", &self.tools]);
        nix(&[
            "nix-store",
            "--delete",
            &self.tools,
            &deriver,
            &self.busybox,
        ]);
        assert!(!valid(&self.tools) && !valid(&self.busybox));
    }
}

/// A `file://` binary cache holding `paths`, signed with a fresh key unless not.
struct Cache {
    dir: tempfile::TempDir,
    public_key: String,
}

impl Cache {
    fn make(paths: &[&str], signed: bool) -> Cache {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        let public = dir.path().join("public");
        nix(&[
            "nix-store",
            "--generate-binary-cache-key",
            "paddock-test-cache",
            secret.to_str().unwrap(),
            public.to_str().unwrap(),
        ]);
        let mut to = format!("file://{}", dir.path().join("cache").display());
        if signed {
            to.push_str(&format!("?secret-key={}", secret.display()));
        }
        let mut args = vec![
            "nix",
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--to",
            &to,
        ];
        args.extend(paths);
        nix(&args);
        Cache {
            public_key: std::fs::read_to_string(public).unwrap().trim().to_owned(),
            dir,
        }
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.path().join("cache").display())
    }

    /// A worker configuration that substitutes from this cache only.
    fn worker_config(&self, extra: &str) -> String {
        config_file(&format!(
            "[worker.nix]\nsubstituters = [\"{}\"]\ntrusted_public_keys = [\"{}\"]\n{extra}",
            self.url(),
            self.public_key
        ))
    }

    /// Damages every NAR in the cache.
    fn tamper(&self) {
        let nars = self.dir.path().join("cache/nar");
        for nar in std::fs::read_dir(nars).unwrap() {
            let path = nar.unwrap().path();
            let mut bytes = std::fs::read(&path).unwrap();
            let at = bytes.len() / 2;
            bytes[at] ^= 0x55;
            std::fs::write(&path, bytes).unwrap();
        }
    }
}

fn in_closure(paths: &str, script: &str) -> ExecSpec {
    ExecSpec {
        arguments: vec!["sh".into(), "-c".into(), script.into()],
        platform: vec![
            ("OSFamily".into(), "Linux".into()),
            ("nix-store-paths".into(), paths.into()),
        ],
        ..Default::default()
    }
}

async fn stdout(remote: &Remote, spec: &ExecSpec) -> (i32, String, String) {
    let response = execute(remote, spec).await.unwrap();
    let status = response.status.clone().unwrap_or_default();
    assert_eq!(status.code, 0, "{}", status.message);
    let result = response.result.unwrap();
    let read = |d: Option<paddock_reapi::proto::re::Digest>| {
        let remote = remote.clone();
        async move {
            let d = Digest::from_proto(d.as_ref()).unwrap();
            String::from_utf8_lossy(&remote.read_blob(&d).await.unwrap()).into_owned()
        }
    };
    let out = read(result.stdout_digest.clone()).await;
    let err = read(result.stderr_digest.clone()).await;
    (result.exit_code, out, err)
}

fn base(path: &str) -> &str {
    path.strip_prefix("/nix/store/").unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn actions_see_exactly_their_closure_substituted_from_a_signed_cache() {
    let _store = STORE.lock().await;
    let paths = StorePaths::make(&format!("closure-{}", rand::random::<u32>()));
    let cache = Cache::make(&[&paths.tools], true);
    paths.delete();

    let farm = Farm::start(&["--config", &cache.worker_config("")]);
    let remote = farm.remote("").await;
    // busybox provides bin/sh and bin/env, so /bin/sh and /usr/bin/env point into it,
    // as on NixOS; nothing else of /usr or /lib exists.
    let script =
        "ls /nix/store; test -e /usr/lib && echo HOST-USR; test -e /lib && echo HOST-LIB; \
                  echo PATH=$PATH; hello; ls /bin; readlink /bin/sh; ls /usr/bin";
    let (code, out, err) = stdout(&remote, &in_closure(&paths.both(), script)).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    let mut listed = [base(&paths.busybox), base(&paths.tools)];
    listed.sort();
    assert_eq!(
        &lines[..2],
        &listed[..],
        "/nix/store holds the closure and nothing else:\n{out}"
    );
    assert!(!out.contains("HOST-"), "{out}");
    // PATH lists the named paths' bin directories, in the paths' sorted order.
    let mut named = [paths.busybox.as_str(), paths.tools.as_str()];
    named.sort();
    assert!(
        out.contains(&format!("PATH={}/bin:{}/bin", named[0], named[1])),
        "{out}"
    );
    assert!(out.contains("hello from tools-"), "{out}");
    assert!(out.contains(&format!("{}/bin/sh", paths.busybox)), "{out}");
    assert_eq!(lines.last(), Some(&"env"), "{out}");
    // Substituted, with GC roots while the worker keeps the closure prepared.
    assert!(valid(&paths.tools) && valid(&paths.busybox));

    // Listing only `tools` still mounts its closure (busybox, which its script needs),
    // but no listed path provides a shell: no /bin, no /usr/bin. The command names
    // busybox's sh itself.
    let spec = ExecSpec {
        arguments: vec![
            format!("{}/bin/sh", paths.busybox),
            "-c".into(),
            "ls /nix/store | wc -l; hello; test -e /usr/bin && echo HAS-USR-BIN; test -e /bin && echo HAS-BIN; true".into(),
        ],
        environment: vec![("PATH".into(), format!("{}/bin:{}/bin", paths.busybox, paths.tools))],
        platform: vec![("nix-store-paths".into(), paths.tools.clone())],
        ..Default::default()
    };
    let (code, out, _) = stdout(&remote, &spec).await;
    assert_eq!(code, 0);
    assert!(
        out.starts_with("2\n") && out.contains("hello from tools-"),
        "{out}"
    );
    assert!(!out.contains("HAS-"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn paths_that_cannot_be_made_valid_fail_with_failed_precondition() {
    let _store = STORE.lock().await;
    let paths = StorePaths::make(&format!("refused-{}", rand::random::<u32>()));
    let unsigned = Cache::make(&[&paths.tools], false);
    let tampered = Cache::make(&[&paths.tools], true);
    tampered.tamper();
    paths.delete();

    for (what, config) in [
        ("unsigned", unsigned.worker_config("")),
        ("tampered", tampered.worker_config("")),
    ] {
        let farm = Farm::start(&["--config", &config]);
        let remote = farm.remote("").await;
        let response = execute(&remote, &in_closure(&paths.both(), "true"))
            .await
            .unwrap();
        let status = response.status.unwrap();
        assert_eq!(
            Code::from_i32(status.code),
            Code::FailedPrecondition,
            "{what}: {}",
            status.message
        );
        assert!(
            status.message.contains(&paths.tools),
            "{what}: {}",
            status.message
        );
        assert!(
            !valid(&paths.tools),
            "{what}: a refused path entered the store"
        );
    }

    let farm = Farm::start(&["--config", &unsigned.worker_config("")]);
    let remote = farm.remote("").await;
    let missing = "/nix/store/00000000000000000000000000000000-never-built";
    let response = execute(&remote, &in_closure(missing, "true"))
        .await
        .unwrap();
    let status = response.status.unwrap();
    assert_eq!(Code::from_i32(status.code), Code::FailedPrecondition);
    assert!(status.message.contains(missing), "{}", status.message);
    // Malformed paths are refused without asking Nix.
    for bad in [
        "/nix/store/short-x",
        "/usr/bin",
        "/nix/store/00000000000000000000000000000000-x/bin",
    ] {
        let response = execute(&remote, &in_closure(bad, "true")).await.unwrap();
        let status = response.status.unwrap();
        assert_eq!(
            Code::from_i32(status.code),
            Code::FailedPrecondition,
            "{bad}"
        );
        assert!(status.message.contains(bad), "{}", status.message);
    }
    // A worker without Nix is never given Nix actions: with host runners only, the
    // action is unsatisfiable.
    let plain = Farm::start(&[
        "--runner",
        "host",
        "--config",
        &config_file("[scheduler]\nunsatisfiable_grace = \"3s\"\n"),
    ]);
    let remote = plain.remote("").await;
    // Once an ordinary action has run, the farm's worker is surely connected.
    let plain_action = ExecSpec {
        arguments: vec!["/bin/true".into()],
        ..Default::default()
    };
    let response = execute(&remote, &plain_action).await.unwrap();
    assert_eq!(response.status.unwrap_or_default().code, 0);
    let response = execute(&remote, &in_closure(missing, "true"))
        .await
        .unwrap();
    let status = response.status.unwrap();
    assert_eq!(Code::from_i32(status.code), Code::FailedPrecondition);
    assert!(status.message.contains("lacks"), "{}", status.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_collection_cannot_pull_a_closure_away_and_the_cache_is_bounded() {
    let _store = STORE.lock().await;
    let first = StorePaths::make(&format!("gc-a-{}", rand::random::<u32>()));
    let farm = Farm::start(&[
        "--config",
        &config_file("[worker.nix]\nmax_closures = 1\nsubstituters = []\n"),
    ]);
    let remote = farm.remote("").await;

    // A collection while the action sleeps: its closure stays.
    let marker = format!("gc-while-running-{}", rand::random::<u32>());
    let running = {
        let remote = remote.clone();
        let spec = in_closure(&first.both(), &format!("sleep 2; hello # {marker}"));
        tokio::spawn(async move { stdout(&remote, &spec).await })
    };
    wait_for_process(&marker).await;
    nix(&["nix-store", "--gc"]);
    assert!(valid(&first.tools), "the GC took a closure in use");
    let (code, out, err) = running.await.unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("hello from tools-gc-a"), "{out}");

    // With room for one closure, using a second lets the first go.
    let second = StorePaths::make(&format!("gc-b-{}", rand::random::<u32>()));
    let (code, _, _) = stdout(&remote, &in_closure(&second.both(), "hello")).await;
    assert_eq!(code, 0);
    nix(&["nix-store", "--gc"]);
    assert!(
        !valid(&first.tools),
        "the first closure should have lost its GC root"
    );
    assert!(valid(&second.tools), "the cached closure keeps its GC root");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_produce_identical_outputs() {
    let _store = STORE.lock().await;
    let paths = StorePaths::make(&format!("agree-{}", rand::random::<u32>()));
    let server = Farm::server("127.0.0.1:0", &[]);
    let remote = server.remote("").await;
    let spec = ExecSpec {
        output_paths: vec!["out.txt".into()],
        ..in_closure(
            &paths.both(),
            "hello > out.txt; ls /nix/store >> out.txt; sha256sum out.txt",
        )
    };
    let mut outputs = Vec::new();
    for name in ["left", "right"] {
        let mut worker = Worker::start(&server.worker_url, name, &["--capacity", "1"]);
        let response = execute(
            &remote,
            &ExecSpec {
                skip_cache_lookup: true,
                ..spec.clone()
            },
        )
        .await
        .unwrap();
        let result = response.result.unwrap();
        assert_eq!(result.exit_code, 0);
        assert_eq!(result.execution_metadata.as_ref().unwrap().worker, name);
        outputs.push((result.output_files, result.stdout_digest));
        worker.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(outputs[0], outputs[1]);
}

#[test]
fn bazel_genrules_run_in_a_nix_closure_and_rebuild_from_the_cache() {
    let _store = STORE.blocking_lock();
    let paths = StorePaths::make(&format!("bazel-{}", rand::random::<u32>()));
    let farm = Farm::start(&[
        "--config",
        &config_file("[worker.nix]\nsubstituters = []\n"),
    ]);
    let ws = Workspace::new("nix");
    let flags = [
        format!("--remote_executor={}", farm.url),
        "--remote_instance_name=nix".into(),
        "--spawn_strategy=remote".into(),
        "--genrule_strategy=remote".into(),
        "--noremote_local_fallback".into(),
        format!(
            "--remote_default_exec_properties=nix-store-paths={},{}",
            paths.busybox, paths.tools
        ),
        format!("--shell_executable={}/bin/sh", paths.busybox),
        format!(
            "--action_env=PATH={}/bin:{}/bin",
            paths.busybox, paths.tools
        ),
    ];
    let mut args = vec!["build", "//..."];
    args.extend(flags.iter().map(String::as_str));
    let first = ws.bazel(&args);
    assert!(
        first.success,
        "{}\n--- paddock ---\n{}",
        first.output,
        farm.log()
    );
    let remote = first.all_of_kind("remote");
    assert!(remote >= 3, "{}", first.output);
    let greeting = String::from_utf8(ws.output("greeting.txt")).unwrap();
    assert!(greeting.contains("hello from tools-bazel"), "{greeting}");
    let store = String::from_utf8(ws.output("store.txt")).unwrap();
    assert_eq!(store.lines().count(), 2, "{store}");

    assert_eq!(ws.rebuild_from_cache(&args), remote);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_nix_cannot_serve_says_why_and_offers_no_nix_platform() {
    let _store = STORE.lock().await;
    // The paths are valid in the store: only the workers' Nix is broken.
    let paths = StorePaths::make(&format!("unusable-{}", rand::random::<u32>()));
    let server = Farm::server(
        "127.0.0.1:0",
        &[
            "--config",
            &config_file("[scheduler]\nunsatisfiable_grace = \"2s\"\n"),
        ],
    );
    let remote = server.remote("").await;
    let daemon_conf = tempfile::tempdir().unwrap();
    std::fs::write(
        daemon_conf.path().join("nix.conf"),
        "store = daemon\nsubstituters =\n",
    )
    .unwrap();
    let conf_dir = daemon_conf.path().display().to_string();
    let cases = [
        (
            "read-only-store",
            WorkerSetup {
                read_only: vec!["/nix".into()],
                ..Default::default()
            },
            "the store is not writable",
        ),
        (
            "no-daemon",
            WorkerSetup {
                env: vec![
                    ("NIX_CONF_DIR".into(), conf_dir.clone()),
                    ("NIX_USER_CONF_FILES".into(), format!("{conf_dir}/nix.conf")),
                ],
                ..Default::default()
            },
            "the Nix daemon does not answer",
        ),
    ];
    for (name, setup, hint) in cases {
        let mut worker = Worker::start_with(&server.worker_url, name, &["--capacity", "1"], setup);
        // An ordinary action runs: the worker is up and connected.
        let plain = ExecSpec {
            arguments: vec!["/bin/true".into()],
            skip_cache_lookup: true,
            ..Default::default()
        };
        let response = execute(&remote, &plain).await.unwrap();
        assert_eq!(
            response.status.unwrap_or_default().code,
            0,
            "{name}: {}",
            worker.log()
        );
        let log = worker.log();
        assert!(
            log.contains("this worker's Nix is not usable: it offers no Nix platform"),
            "{name}: {log}"
        );
        assert!(log.contains(hint), "{name}: expected {hint:?} in\n{log}");
        // It offers no Nix platform: with no other worker, a Nix action has nowhere to run.
        let response = execute(&remote, &in_closure(&paths.both(), "hello"))
            .await
            .unwrap();
        let status = response.status.unwrap();
        assert_eq!(
            Code::from_i32(status.code),
            Code::FailedPrecondition,
            "{name}: {}",
            status.message
        );
        assert!(
            status.message.contains(name) && status.message.contains("nix"),
            "{name}: {}",
            status.message
        );
        worker.stop();
    }
}
