//! Image platforms against a real registry on loopback: images built offline by the
//! recipes in `images/`, pushed with skopeo, pulled by the worker with oci-client,
//! unpacked and run through per-action overlays; a Bazel build whose actions run in
//! a toolchain image.

mod common;

use std::path::Path;
use std::time::Duration;

use common::bazel::Workspace;
use common::registry::{build_image, layout_digest, Registry};
use common::Farm;
use paddock_client::exec::{execute, ExecSpec};
use paddock_client::Remote;
use paddock_reapi::Digest;
use tonic::Code;

fn in_image(image: &str, script: &str) -> ExecSpec {
    ExecSpec {
        arguments: vec!["sh".into(), "-c".into(), script.into()],
        platform: vec![("container-image".into(), image.into())],
        timeout: Some(Duration::from_secs(120)),
        ..ExecSpec::default()
    }
}

struct Ran {
    code: Code,
    message: String,
    exit: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn assert_succeeded(&self) {
        assert_eq!(
            (self.code, self.exit),
            (Code::Ok, 0),
            "{}{}",
            self.message,
            self.stderr
        );
    }
}

/// Asserts that `echo ran` runs in `image`.
async fn assert_runs_in(remote: &Remote, image: &str) {
    let ran = run(remote, in_image(image, "echo ran")).await;
    assert_eq!(
        (ran.code, ran.stdout.as_str()),
        (Code::Ok, "ran\n"),
        "{}",
        ran.message
    );
}

async fn run(remote: &Remote, spec: ExecSpec) -> Ran {
    let response = execute(remote, &spec).await.unwrap();
    let status = response.status.clone().unwrap_or_default();
    let result = response.result.unwrap_or_default();
    let text = |digest: Option<paddock_reapi::proto::re::Digest>| {
        let remote = remote.clone();
        async move {
            match digest {
                Some(d) => {
                    let d = Digest::from_proto(Some(&d)).unwrap();
                    String::from_utf8(remote.read_blob(&d).await.unwrap().to_vec()).unwrap()
                }
                None => String::new(),
            }
        }
    };
    Ran {
        code: Code::from_i32(status.code),
        message: status.message,
        exit: result.exit_code,
        stdout: text(result.stdout_digest).await,
        stderr: text(result.stderr_digest).await,
    }
}

/// The worker's image directory inside a `paddock up` farm.
fn oci_dir(farm: &Farm) -> std::path::PathBuf {
    farm.data_dir.join("workers/0/oci")
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_action_runs_inside_its_image_and_sees_nothing_of_the_host() {
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    build_image("busybox.sh", layout.path(), "1");
    let digest = registry.push(layout.path(), "1", "busybox", &[]);
    let farm = Farm::start(&["--config", &registry.worker_config("")]);
    let remote = farm.remote("").await;
    let image = registry.pinned("busybox", &digest);
    let ran = run(
        &remote,
        ExecSpec {
            environment: vec![("GREETING".into(), "from the command".into())],
            ..in_image(
                &image,
                "cat /etc/image-release; echo \"$PATH|$GREETING\"; pwd; id -u; \
                 test ! -e /usr && test ! -e /etc/debian_version && echo no-host; \
                 echo scratch > /tmp/x && cat /tmp/x; cat /etc/hosts | head -1",
            )
        },
    )
    .await;
    ran.assert_succeeded();
    assert_eq!(
        ran.stdout,
        "busybox image\n/bin|from the command\n/work\n70000\nno-host\nscratch\n127.0.0.1\tlocalhost\n"
    );
    // The Command's variables win over the image's.
    let ran = run(
        &remote,
        ExecSpec {
            environment: vec![("PATH".into(), "/bin:/nowhere".into())],
            ..in_image(&image, "echo $PATH")
        },
    )
    .await;
    assert_eq!(ran.stdout, "/bin:/nowhere\n");
    // Nothing is left mounted once the actions are over.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&oci_dir(&farm).join("run").display().to_string()),
        "an overlay outlived its action"
    );
    assert_eq!(entries(&oci_dir(&farm).join("run")), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn layers_combine_with_whiteouts_opaque_directories_and_a_working_directory() {
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    build_image("layered.sh", layout.path(), "1");
    let digest = registry.push(layout.path(), "1", "layered", &[]);
    let farm = Farm::start(&["--config", &registry.worker_config("")]);
    let remote = farm.remote("").await;
    let input = tempfile::tempdir().unwrap();
    std::fs::create_dir(input.path().join("sub")).unwrap();
    std::fs::write(input.path().join("sub/in.txt"), "input\n").unwrap();
    let ran = run(
        &remote,
        ExecSpec {
            input: Some(input.path().to_owned()),
            working_directory: "sub".into(),
            ..in_image(
                &registry.pinned("layered", &digest),
                "pwd; cat in.txt; ls /data; cat /data/replaced; ls -A /opaque; echo $LAYERED",
            )
        },
    )
    .await;
    ran.assert_succeeded();
    assert_eq!(
        ran.stdout,
        "/srv/app/sub\ninput\nkept\nreplaced\nlayer 2\nnew\nyes\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_resolve_once_per_worker_and_digests_pin() {
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    build_image("busybox.sh", layout.path(), "v1");
    let first = registry.push(layout.path(), "v1", "tools", &[]);
    let farm = Farm::start(&["--config", &registry.worker_config("")]);
    let remote = farm.remote("").await;
    let tag = format!("docker://{}/tools:v1", registry.host);
    let ran = run(&remote, in_image(&tag, "cat /etc/image-release")).await;
    assert_eq!(ran.stdout, "busybox image\n", "{}", ran.message);
    assert!(farm.log().contains("names a tag, not a digest"));
    // The tag moves to a different image (the layered one): this worker keeps the
    // digest it resolved, so its cache key stays sound...
    build_image("layered.sh", layout.path(), "v1");
    let second = registry.push(layout.path(), "v1", "tools", &[]);
    assert_ne!(first, second);
    let ran = run(&remote, in_image(&tag, "ls /data 2>&1 | head -1; echo")).await;
    assert!(ran.stdout.contains("No such file"), "{}", ran.stdout);
    // ...and the pinned digest of either image runs that image.
    let ran = run(
        &remote,
        in_image(&registry.pinned("tools", &second), "ls /data"),
    )
    .await;
    assert_eq!(ran.stdout, "kept\nreplaced\n");
    let both = format!("docker://{}/tools:v1@{first}", registry.host);
    let ran = run(&remote, in_image(&both, "test -e /data || echo first")).await;
    assert_eq!(ran.stdout, "first\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_actions_pull_an_image_once_and_later_ones_pull_nothing() {
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    build_image("layered.sh", layout.path(), "1");
    let digest = registry.push(layout.path(), "1", "shared", &[]);
    let farm = Farm::start(&[
        "--config",
        &registry.worker_config("[worker]\ncapacity = 4\n"),
    ]);
    let remote = farm.remote("").await;
    let image = registry.pinned("shared", &digest);
    let blobs_before = registry.gets("/v2/shared/blobs/");
    let mut tasks = Vec::new();
    for i in 0..4 {
        let remote = remote.clone();
        let spec = in_image(&image, &format!("cat /data/kept; echo {i}"));
        tasks.push(tokio::spawn(async move { run(&remote, spec).await }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let ran = task.await.unwrap();
        assert_eq!(ran.stdout, format!("kept\n{i}\n"), "{}", ran.message);
    }
    // Three layers and a config, each fetched once.
    assert_eq!(
        registry.gets("/v2/shared/blobs/") - blobs_before,
        4,
        "{}",
        registry.log()
    );
    let requests = registry.gets("/v2/");
    let ran = run(&remote, in_image(&image, "cat /data/kept")).await;
    assert_eq!(ran.stdout, "kept\n");
    assert_eq!(
        registry.gets("/v2/"),
        requests,
        "a warm image went to the registry"
    );
    // After a restart too: the pinned image is unpacked and recorded on disk.
    let mut farm = farm;
    farm.restart();
    let remote = farm.remote("").await;
    let ran = run(&remote, in_image(&image, "cat /data/kept")).await;
    assert_eq!(ran.stdout, "kept\n", "{}", ran.message);
    assert_eq!(
        registry.gets("/v2/"),
        requests,
        "a restarted worker pulled again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_resolves_to_the_image_for_this_platform() {
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    build_image("busybox.sh", layout.path(), "plain");
    build_image("layered.sh", layout.path(), "layered");
    let plain = registry.push(layout.path(), "plain", "multi", &[]);
    let layered = registry.push(layout.path(), "layered", "multi", &[]);
    let (this, other) = match std::env::consts::ARCH {
        "aarch64" => ("arm64", "amd64"),
        _ => ("amd64", "arm64"),
    };
    // The other platform's entry first: the worker must pick, not take the first.
    let index = registry.push_index("multi", "all", &[(&layered, other), (&plain, this)]);
    let farm = Farm::start(&["--config", &registry.worker_config("")]);
    let remote = farm.remote("").await;
    let ran = run(
        &remote,
        in_image(
            &registry.pinned("multi", &index),
            "test -e /data || echo plain",
        ),
    )
    .await;
    assert_eq!(ran.stdout, "plain\n", "{}", ran.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_blob_is_refused_and_nothing_of_it_stays() {
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    build_image("busybox.sh", layout.path(), "1");
    let digest = registry.push(layout.path(), "1", "tampered", &[]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(registry.blob_path(&digest)).unwrap()).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    let blob = registry.blob_path(&layer);
    let original = std::fs::read(&blob).unwrap();
    // Same length, one byte flipped in the middle of the compressed stream.
    let mut bad = original.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0xff;
    std::fs::write(&blob, &bad).unwrap();

    let farm = Farm::start(&["--config", &registry.worker_config("")]);
    let remote = farm.remote("").await;
    let image = registry.pinned("tampered", &digest);
    let ran = run(&remote, in_image(&image, "echo ran")).await;
    // Bytes that do not match their digest are the registry's failing, not the
    // action's or the worker's: retried, and UNAVAILABLE in the end.
    assert_eq!(ran.code, Code::Unavailable, "{}", ran.stdout);
    assert!(
        ran.message.contains("oci platform") && ran.message.contains(&layer),
        "{}",
        ran.message
    );
    assert_eq!(
        entries(&oci_dir(&farm).join("chains")),
        0,
        "a chain was kept"
    );
    assert_eq!(entries(&oci_dir(&farm).join("tmp")), 0, "scratch was left");
    // Repaired, the same image pulls and runs: the failure was not cached.
    std::fs::write(&blob, &original).unwrap();
    assert_runs_in(&remote, &image).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_logins_come_from_the_worker_configuration() {
    let registry = Registry::start_with_login("builder", "s3cret");
    let layout = tempfile::tempdir().unwrap();
    build_image("busybox.sh", layout.path(), "1");
    let digest = registry.push(layout.path(), "1", "private", &[]);
    let image = registry.pinned("private", &digest);

    // Without credentials the registry refuses the worker: the worker's fault (its
    // registry access), retried, and in the end UNAVAILABLE, not the action's fault.
    let anonymous = Farm::start(&["--config", &registry.worker_config("")]);
    let remote = anonymous.remote("").await;
    let ran = run(&remote, in_image(&image, "echo ran")).await;
    assert_eq!(ran.code, Code::Unavailable, "{}", ran.stdout);
    assert!(
        ran.message.contains("refused this worker"),
        "{}",
        ran.message
    );
    drop(anonymous);

    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("password");
    std::fs::write(&password_file, "s3cret\n").unwrap();
    let login = |prefix: &str| {
        registry.worker_config(&format!(
            "[worker.oci.credentials.\"{prefix}\"]\nusername = \"builder\"\npassword_file = \"{}\"\n",
            password_file.display()
        ))
    };
    let farm = Farm::start(&["--config", &login(&registry.host)]);
    let remote = farm.remote("").await;
    assert_runs_in(&remote, &image).await;
    drop(farm);

    // Credentials for one repository are not sent for another on the same host.
    let other = registry.push(layout.path(), "1", "other", &[]);
    let farm = Farm::start(&["--config", &login(&format!("{}/private", registry.host))]);
    let remote = farm.remote("").await;
    assert_runs_in(&remote, &image).await;
    let ran = run(
        &remote,
        in_image(&registry.pinned("other", &other), "echo ran"),
    )
    .await;
    assert_eq!(ran.code, Code::Unavailable, "{}", ran.stdout);
    assert!(
        ran.message.contains("refused this worker"),
        "{}",
        ran.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_images_and_unreachable_registries_fail_cleanly() {
    let registry = Registry::start();
    let nowhere = common::free_address();
    let farm = Farm::start(&[
        "--config",
        &common::config_file(&format!(
            "[worker.oci]\nregistries = [\"{}\", \"{nowhere}\"]\n",
            registry.host
        )),
    ]);
    let remote = farm.remote("").await;
    let zero = format!("sha256:{}", "0".repeat(64));
    // What the action names that cannot be had: its fault, FAILED_PRECONDITION.
    for (image, wanted) in [
        (format!("docker://{}/absent:1", registry.host), "absent"),
        (registry.pinned("absent", &zero), "absent"),
        (
            format!("oci-layout:/nonexistent/layout@{zero}"),
            "/nonexistent/layout",
        ),
        ("busybox:latest".to_owned(), "not an image"),
        (
            format!("docker://{}/x@sha256:short", registry.host),
            "not a digest",
        ),
    ] {
        let ran = run(&remote, in_image(&image, "echo ran")).await;
        assert_eq!(
            ran.code,
            Code::FailedPrecondition,
            "{image}: {}",
            ran.message
        );
        assert!(ran.message.contains(wanted), "{image}: {}", ran.message);
    }
    // A registry that cannot be reached is no fault of the action's: retried on
    // (here, the only) worker, and UNAVAILABLE in the end, which clients retry.
    let ran = run(
        &remote,
        in_image(&format!("docker://{nowhere}/busybox@{zero}"), "echo ran"),
    )
    .await;
    assert_eq!(ran.code, Code::Unavailable, "{}", ran.message);
    assert!(ran.message.contains(&nowhere), "{}", ran.message);
    // The worker is still fine.
    let ok = run(
        &remote,
        ExecSpec {
            arguments: vec!["true".into()],
            ..ExecSpec::default()
        },
    )
    .await;
    assert_eq!(ok.code, Code::Ok);
}

#[tokio::test(flavor = "multi_thread")]
async fn zstd_layers_and_oci_layouts_without_a_registry() {
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    build_image("layered.sh", layout.path(), "1");
    let zstd = registry.push(
        layout.path(),
        "1",
        "zstd",
        &["--dest-compress", "--dest-compress-format", "zstd"],
    );
    let manifest = std::fs::read_to_string(registry.blob_path(&zstd)).unwrap();
    assert!(manifest.contains("tar+zstd"), "{manifest}");
    // Layouts only from the directories the worker's operator names.
    let layouts = format!(
        "layouts = [\"{}\"]\n",
        layout.path().parent().unwrap().display()
    );
    let farm = Farm::start(&["--config", &registry.worker_config(&layouts)]);
    let remote = farm.remote("").await;
    let ran = run(
        &remote,
        in_image(&registry.pinned("zstd", &zstd), "ls /data"),
    )
    .await;
    assert_eq!(ran.stdout, "kept\nreplaced\n", "{}", ran.message);

    let local = format!(
        "oci-layout:{}@{}",
        layout.path().display(),
        layout_digest(layout.path(), "1")
    );
    let ran = run(&remote, in_image(&local, "ls -A /opaque")).await;
    assert_eq!(ran.stdout, "new\n", "{}", ran.message);
}

/// Bazel builds the C++ workspace with every action in the Debian toolchain image;
/// the outputs match a local build byte for byte.
#[test]
fn bazel_builds_remotely_in_a_toolchain_image() {
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    build_image("debian-toolchain.sh", layout.path(), "cc");
    let digest = registry.push(layout.path(), "cc", "toolchain", &[]);
    let image = registry.pinned("toolchain", &digest);

    let local = Workspace::new("cc");
    let built = local.bazel(&["build", "//app:calc", "//gen:all"]);
    assert!(built.success, "local build failed:\n{}", built.output);
    let outputs = ["app/calc", "gen/squares.cc", "gen/manifest.txt"];
    let expected: Vec<Vec<u8>> = outputs.iter().map(|p| local.output(p)).collect();
    drop(local);

    let farm = Farm::start(&["--config", &registry.worker_config("")]);
    let ws = Workspace::new("cc");
    let flags = [
        format!("--remote_executor={}", farm.url),
        "--spawn_strategy=remote".into(),
        "--genrule_strategy=remote".into(),
        "--noremote_local_fallback".into(),
        format!("--remote_default_exec_properties=container-image={image}"),
        "--jobs=8".into(),
    ];
    let mut args = vec!["test", "//app:calc", "//gen:all", "//math/..."];
    args.extend(flags.iter().map(String::as_str));
    let run = ws.bazel(&args);
    assert!(
        run.success,
        "remote build in the image failed:\n{}\n--- paddock log ---\n{}",
        run.output,
        farm.log()
    );
    let remote = run.all_of_kind("remote");
    assert!(remote > 10, "{}", run.output);
    for (path, want) in outputs.iter().zip(&expected) {
        assert!(
            &ws.output(path) == want,
            "{path} differs from the local build"
        );
    }
    // The actions really ran in the image: the worker unpacked it.
    assert!(farm.log().contains("layer ready"), "{}", farm.log());
}
