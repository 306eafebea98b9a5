//! Image platforms against a real registry on loopback: images built offline by the
//! recipes in `images/`, pushed with skopeo, pulled by the worker with oci-client,
//! unpacked and run through per-action overlays; a Bazel build whose actions run in
//! a toolchain image. And images on the worker's terms, since the image is the
//! client's choice: registries at private addresses, answers from servers that are
//! no registry, layers that unpack to far more than their size, set-id bits, and
//! layout paths outside the directories the operator names.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::bazel::Workspace;
use common::registry::{build_image, layout_digest, Registry};
use common::Farm;
use paddock_client::exec::{execute, ExecSpec};
use paddock_client::Remote;
use paddock_reapi::{Digest, DigestHasher};
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

/// A digest that no image has.
fn zero_digest() -> String {
    format!("sha256:{}", "0".repeat(64))
}

/// Waits (up to ten seconds) until `dir` is empty and returns how many entries it
/// still has: a failed build's scratch directory is removed in the background, so
/// it may outlive the response by a moment.
async fn entries_once_cleaned(dir: &Path) -> usize {
    for _ in 0..200 {
        if entries(dir) == 0 {
            return 0;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    entries(dir)
}

/// Runs a command-line tool, which must succeed; returns its standard output.
fn tool(command: &mut Command) -> String {
    command.stdin(Stdio::null());
    let output = match command.output() {
        Ok(output) => output,
        Err(e) => panic!("{command:?}: {e}"),
    };
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: DigestHasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Archives `dir` as a layer (GNU tar: every entry root's, in name order) gzip'd
/// into `out`, and returns the digest of the uncompressed archive, the layer's
/// `diff_id`. The archive streams from tar through this process into gzip, so a
/// layer of hundreds of MiB never lands on disk uncompressed.
fn gzip_layer(dir: &Path, out: &Path) -> String {
    let mut tar = Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-C",
        ])
        .arg(dir)
        .args(["-cf", "-", "."])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("GNU tar");
    let mut gzip = Command::new("gzip")
        .arg("-n")
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(out).unwrap())
        .spawn()
        .expect("gzip");
    let mut tee = HashingWriter {
        inner: gzip.stdin.take().unwrap(),
        hasher: DigestHasher::new(),
    };
    std::io::copy(tar.stdout.as_mut().unwrap(), &mut tee).unwrap();
    let HashingWriter { inner, hasher } = tee;
    drop(inner); // the end of gzip's input
    assert!(tar.wait().unwrap().success(), "tar failed");
    assert!(gzip.wait().unwrap().success(), "gzip failed");
    format!("sha256:{}", hasher.finish().hash_hex())
}

/// Writes `bytes` as a blob of the OCI layout `layout` and returns its descriptor.
fn put_blob(layout: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let digest = format!("sha256:{}", Digest::of(bytes).hash_hex());
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(digest.trim_start_matches("sha256:")), bytes).unwrap();
    serde_json::json!({ "mediaType": media_type, "digest": digest, "size": bytes.len() })
}

/// Makes `layout` an OCI layout (as `umoci init` would) holding one image tagged
/// `tag`, made by hand: `layers` are gzip'd tars, each with its `diff_id`. Returns
/// the manifest's digest.
fn write_layout(layout: &Path, tag: &str, layers: &[(Vec<u8>, String)]) -> String {
    std::fs::create_dir_all(layout).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let descriptors: Vec<serde_json::Value> = layers
        .iter()
        .map(|(blob, _)| put_blob(layout, "application/vnd.oci.image.layer.v1.tar+gzip", blob))
        .collect();
    let diff_ids: Vec<String> = layers.iter().map(|(_, diff_id)| diff_id.clone()).collect();
    let architecture = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    };
    let config = serde_json::json!({
        "architecture": architecture,
        "os": "linux",
        "config": { "Env": ["PATH=/bin"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config = put_blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).unwrap(),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": descriptors,
    });
    let mut manifest = put_blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    let digest = manifest["digest"].as_str().unwrap().to_owned();
    manifest["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": tag });
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest],
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    digest
}

#[tokio::test(flavor = "multi_thread")]
async fn registries_at_private_addresses_are_refused_unless_listed() {
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    build_image("busybox.sh", layout.path(), "1");
    let digest = registry.push(layout.path(), "1", "busybox", &[]);
    let image = registry.pinned("busybox", &digest);
    // The same registry by a name that resolves to loopback: the check is on the
    // addresses a name resolves to, not on how the client spells the host.
    let by_name = format!(
        "docker://{}/busybox@{digest}",
        registry.host.replace("127.0.0.1", "localhost")
    );
    // skopeo's push made requests of its own; from here on, none may arrive.
    let requests = registry.gets("/v2/");

    // No `registries` list: any registry at a public address, none at loopback. A
    // client naming the worker's own loopback is the client's fault.
    let open = Farm::start(&[]);
    let remote = open.remote("").await;
    for refused in [&image, &by_name] {
        let ran = run(&remote, in_image(refused, "echo ran")).await;
        assert_eq!(
            ran.code,
            Code::FailedPrecondition,
            "{refused}: {}",
            ran.message
        );
        assert!(
            ran.message.contains("[worker.oci] registries"),
            "{refused}: {}",
            ran.message
        );
    }
    assert_eq!(
        registry.gets("/v2/"),
        requests,
        "a refused registry was contacted:\n{}",
        registry.log()
    );
    // The cloud's metadata service: refused before any connection, so at once (a
    // connection attempt alone could take the worker's 10 s connect timeout).
    let started = Instant::now();
    let ran = run(
        &remote,
        in_image(
            &format!("docker://169.254.169.254/x@{}", zero_digest()),
            "echo ran",
        ),
    )
    .await;
    assert_eq!(ran.code, Code::FailedPrecondition, "{}", ran.message);
    assert!(
        ran.message.contains("[worker.oci] registries"),
        "{}",
        ran.message
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusing took {:?}",
        started.elapsed()
    );
    drop(open);

    // Listed by its operator, the loopback registry serves.
    let listed = Farm::start(&["--config", &registry.worker_config("")]);
    let remote = listed.remote("").await;
    assert_runs_in(&remote, &image).await;
    // Listing an address lists that registry, not every name that resolves there.
    let ran = run(&remote, in_image(&by_name, "echo ran")).await;
    assert_eq!(ran.code, Code::FailedPrecondition, "{}", ran.message);
    assert!(
        ran.message.contains("[worker.oci] registries"),
        "{}",
        ran.message
    );
}

/// A server on loopback that is no registry (an internal web service, a metadata
/// endpoint): every answer carries `secret`, in its body and in any challenge, and
/// every request target is recorded. What it answers depends on the repository a
/// path names (`/v2/{repository}/...`); anything else gets a plain 401.
struct NotARegistry {
    /// `127.0.0.1:PORT`.
    host: String,
    secret: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl NotARegistry {
    fn start() -> NotARegistry {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let secret = format!("secret-{}", uuid::Uuid::new_v4());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let server = NotARegistry {
            host: host.clone(),
            secret: secret.clone(),
            requests: requests.clone(),
        };
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (host, secret, requests) = (host.clone(), secret.clone(), requests.clone());
                std::thread::spawn(move || answer(stream, &host, &secret, &requests));
            }
        });
        server
    }

    /// An image pinned to a digest no image has, in `repository` on this server.
    fn image(&self, repository: &str) -> String {
        format!("docker://{}/{repository}@{}", self.host, zero_digest())
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// How many requests so far had targets starting with `prefix`.
    fn requested(&self, prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|t| t.starts_with(prefix))
            .count()
    }
}

/// Reads one request from `stream`, records its target and answers it as
/// [`NotARegistry`] does.
fn answer(mut stream: TcpStream, host: &str, secret: &str, requests: &Mutex<Vec<String>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
        if head.len() > 64 << 10 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let target = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    requests.lock().unwrap().push(target.clone());
    let port = host.rsplit_once(':').unwrap().1;
    let repository = target
        .strip_prefix("/v2/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("");
    let page = format!("<html><body>{secret}</body></html>");
    // OCI error bodies, with the secret where a registry puts its words, or where
    // only a known error code may be.
    let errors = |code: &str| {
        format!(r#"{{"errors":[{{"code":"{code}","message":"{secret}","detail":"{secret}"}}]}}"#)
    };
    let challenge = |realm: String| {
        format!(
            "WWW-Authenticate: Bearer realm=\"{realm}\",service=\"registry\",\
             error=\"invalid_token\",error_description=\"{secret}\"\r\n"
        )
    };
    let (status, headers, body) = match repository {
        "missing" => ("404 Not Found", String::new(), errors("MANIFEST_UNKNOWN")),
        "broken" => ("500 Internal Server Error", String::new(), errors(secret)),
        // Token services at the metadata address, at a name for this machine's
        // loopback (which the worker's list does not name), and on this server.
        "metadata-realm" => (
            "401 Unauthorized",
            challenge("http://169.254.169.254/token".to_owned()),
            page,
        ),
        "named-realm" => (
            "401 Unauthorized",
            challenge(format!("http://localhost:{port}/by-name/token")),
            page,
        ),
        "own-realm" => (
            "401 Unauthorized",
            challenge(format!("http://{host}/own/token")),
            page,
        ),
        "metadata-redirect" => (
            "302 Found",
            "Location: http://169.254.169.254/latest/meta-data/\r\n".to_owned(),
            page,
        ),
        "named-redirect" => (
            "302 Found",
            format!("Location: http://localhost:{port}/by-name/redirected\r\n"),
            page,
        ),
        _ => ("401 Unauthorized", String::new(), page),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n{headers}\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_from_a_non_registry_are_never_repeated() {
    let server = NotARegistry::start();
    // Listed, so the worker talks to it: what it answers is what must not travel.
    let farm = Farm::start(&[
        "--config",
        &common::config_file(&format!(
            "[worker.oci]\nregistries = [\"{}\"]\n",
            server.host
        )),
    ]);
    let remote = farm.remote("").await;
    // The action's faults (final) first, then the worker's (retried up to
    // `max_attempts`, then UNAVAILABLE).
    let cases: [(&str, Code, &[&str]); 7] = [
        // Only the status and a known OCI error code are repeated.
        (
            "missing",
            Code::FailedPrecondition,
            &["not found", "HTTP 404", "MANIFEST_UNKNOWN"],
        ),
        // A token service at a refused address: refused by the worker's own
        // check (`token()` answers FAILED_PRECONDITION, "refused"), never asked.
        (
            "metadata-realm",
            Code::FailedPrecondition,
            &["refused", "169.254.169.254", "[worker.oci] registries"],
        ),
        (
            "named-realm",
            Code::FailedPrecondition,
            &["refused", "[worker.oci] registries"],
        ),
        // Redirects are held to the same rule.
        (
            "metadata-redirect",
            Code::FailedPrecondition,
            &["refused", "[worker.oci] registries"],
        ),
        (
            "named-redirect",
            Code::FailedPrecondition,
            &["refused", "[worker.oci] registries"],
        ),
        ("broken", Code::Unavailable, &["HTTP 500"]),
        // A token service the worker may reach, which refuses it.
        (
            "own-realm",
            Code::Unavailable,
            &["HTTP 401", "refused this worker"],
        ),
    ];
    for (repository, code, wanted) in cases {
        let response = execute(&remote, &in_image(&server.image(repository), "echo ran"))
            .await
            .unwrap();
        // Anywhere in the response: status, message, details, result.
        let everything = format!("{response:?}");
        assert!(
            !everything.contains(&server.secret),
            "{repository}: the server's answer reached the client: {everything}"
        );
        let status = response.status.unwrap_or_default();
        assert_eq!(
            Code::from_i32(status.code),
            code,
            "{repository}: {}",
            status.message
        );
        for word in wanted {
            assert!(
                status.message.contains(word),
                "{repository}: {word:?} not in {}",
                status.message
            );
        }
    }
    let requests = server.requests();
    // Every challenge and redirect was given...
    for repository in [
        "metadata-realm",
        "named-realm",
        "own-realm",
        "metadata-redirect",
        "named-redirect",
    ] {
        assert!(
            server.requested(&format!("/v2/{repository}/")) > 0,
            "{repository} was never asked for: {requests:?}"
        );
    }
    // ...the token service on this server that the worker may use was asked (so a
    // request for a token here would be seen)...
    assert!(server.requested("/own/token") > 0, "{requests:?}");
    // ...and nothing at the refused name for this same server ever was.
    assert_eq!(
        server.requested("/by-name/"),
        0,
        "a refused token service or redirect was followed: {requests:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_layer_that_unpacks_to_far_more_than_its_size_is_stopped() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let content = work.path().join("content");
    std::fs::create_dir(&content).unwrap();
    // 300 MiB of zeros, sparse: it takes no room here, and tar reads it as zeros.
    std::fs::File::create(content.join("zeros"))
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let gzipped = work.path().join("layer.tar.gz");
    let diff_id = gzip_layer(&content, &gzipped);
    let blob = std::fs::read(&gzipped).unwrap();
    // A layer small enough to pass any bound on what is pulled.
    assert!(blob.len() < 1 << 20, "the layer is {} bytes", blob.len());
    let layout = work.path().join("layout");
    write_layout(&layout, "1", &[(blob, diff_id)]);
    let digest = registry.push(&layout, "1", "bomb", &[]);

    let farm = Farm::start(&[
        "--config",
        &registry.worker_config("max_unpacked_size = \"64MiB\"\n"),
    ]);
    let remote = farm.remote("").await;
    let ran = run(
        &remote,
        in_image(&registry.pinned("bomb", &digest), "echo ran"),
    )
    .await;
    // What the action names is more than this worker allows: its fault, final.
    assert_eq!(ran.code, Code::ResourceExhausted, "{}", ran.message);
    assert!(ran.message.contains("max_unpacked_size"), "{}", ran.message);
    // Nothing of the 64 MiB it got to is kept.
    assert_eq!(
        entries(&oci_dir(&farm).join("chains")),
        0,
        "a chain was kept"
    );
    assert_eq!(
        entries_once_cleaned(&oci_dir(&farm).join("tmp")).await,
        0,
        "scratch was left"
    );
    // The worker is fine.
    let ok = run(
        &remote,
        ExecSpec {
            arguments: vec!["true".into()],
            ..ExecSpec::default()
        },
    )
    .await;
    assert_eq!(ok.code, Code::Ok, "{}", ok.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn set_id_bits_never_reach_an_action() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    build_image("busybox.sh", &layout, "1");
    // A layer on top with busybox set-user-ID and set-group-ID root. (Named
    // `busybox-*`: busybox runs `APPLET ARGS` only when its own name starts so.)
    let extra = work.path().join("extra");
    let bin = extra.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (name, mode) in [("busybox-suid", 0o4755), ("busybox-sgid", 0o2755)] {
        std::fs::copy("/bin/busybox", bin.join(name)).unwrap();
        std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let tar = work.path().join("extra.tar");
    tool(
        Command::new("tar")
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mtime=@0",
                "-C",
            ])
            .arg(&extra)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    );
    // The bits are really in the layer.
    let listing = tool(Command::new("tar").arg("-tvf").arg(&tar));
    assert!(
        listing.contains("-rwsr-xr-x 0/0") && listing.contains("-rwxr-sr-x 0/0"),
        "{listing}"
    );
    tool(
        Command::new("umoci")
            .args(["raw", "add-layer", "--image"])
            .arg(format!("{}:1", layout.display()))
            .arg(&tar),
    );
    let digest = registry.push(&layout, "1", "setid", &[]);

    let farm = Farm::start(&["--config", &registry.worker_config("")]);
    let remote = farm.remote("").await;
    let ran = run(
        &remote,
        in_image(
            &registry.pinned("setid", &digest),
            "cd /bin && stat -c '%a %u' busybox-suid busybox-sgid && id -u && id -g \
             && ./busybox-suid id -u && ./busybox-sgid id -g",
        ),
    )
    .await;
    ran.assert_succeeded();
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{}", ran.stdout);
    // Still root's files, without the bits...
    assert_eq!(lines[..2], ["755 0", "755 0"], "{}", ran.stdout);
    // ...so running them changes no identity: the action's own uid and gid.
    assert_eq!(lines[2], "70000", "{}", ran.stdout);
    assert_eq!(lines[4], lines[2], "{}", ran.stdout);
    assert_eq!(lines[5], lines[3], "{}", ran.stdout);
    assert_ne!(lines[3], "0", "{}", ran.stdout);
    // Nor are the bits in the worker's unpacked chains, which outlive the action.
    let mut seen = 0;
    for chain in std::fs::read_dir(oci_dir(&farm).join("chains")).unwrap() {
        let bin = chain.unwrap().path().join("root/bin");
        for name in ["busybox-suid", "busybox-sgid"] {
            if let Ok(meta) = std::fs::symlink_metadata(bin.join(name)) {
                assert_eq!(meta.mode() & 0o7777, 0o755, "{}", bin.join(name).display());
                seen += 1;
            }
        }
    }
    assert_eq!(seen, 2, "the top chain has both files");
}

#[tokio::test(flavor = "multi_thread")]
async fn layouts_only_from_directories_the_operator_names() {
    let parent = tempfile::tempdir().unwrap();
    // Real paths: the worker follows no symlink beneath the listed directory, so
    // the test must not hand it one by accident.
    let parent_path = parent.path().canonicalize().unwrap();
    let listed = parent_path.join("layouts");
    std::fs::create_dir(&listed).unwrap();
    let layout = listed.join("busybox");
    build_image("busybox.sh", &layout, "1");
    let digest = layout_digest(&layout, "1");
    let image = format!("oci-layout:{}@{digest}", layout.display());

    // No `layouts`: a client's path reaches nothing on the worker.
    let unlisted = Farm::start(&[]);
    let remote = unlisted.remote("").await;
    let ran = run(&remote, in_image(&image, "echo ran")).await;
    assert_eq!(ran.code, Code::FailedPrecondition, "{}", ran.message);
    assert!(
        ran.message.contains("[worker.oci] layouts"),
        "{}",
        ran.message
    );
    drop(unlisted);

    let farm = Farm::start(&[
        "--config",
        &common::config_file(&format!(
            "[worker.oci]\nlayouts = [\"{}\"]\n",
            listed.display()
        )),
    ]);
    let remote = farm.remote("").await;
    assert_runs_in(&remote, &image).await;

    // A directory whose name merely starts like the listed one's is not in it.
    let sibling = parent_path.join("layouts-other");
    std::fs::create_dir(&sibling).unwrap();
    tool(
        Command::new("cp")
            .arg("-a")
            .arg(&layout)
            .arg(sibling.join("busybox")),
    );
    let beside = format!("oci-layout:{}/busybox@{digest}", sibling.display());
    let ran = run(&remote, in_image(&beside, "echo ran")).await;
    assert_eq!(ran.code, Code::FailedPrecondition, "{}", ran.message);
    assert!(
        ran.message.contains("[worker.oci] layouts"),
        "{}",
        ran.message
    );

    // A path beneath the listed directory that climbs out through a symlink in it
    // (here back to the very same layout, by way of `/`): the worker opens layout
    // paths beneath the listed directory without following symlinks.
    let link = listed.join("link");
    std::os::unix::fs::symlink("/", &link).unwrap();
    let climbing = format!("oci-layout:{}{}@{digest}", link.display(), layout.display());
    let ran = run(&remote, in_image(&climbing, "echo ran")).await;
    assert_eq!(ran.code, Code::FailedPrecondition, "{}", ran.message);
    assert!(ran.message.contains("layout"), "{}", ran.message);
    // Not left for the temporary directory's clean-up to meet.
    std::fs::remove_file(&link).unwrap();
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
