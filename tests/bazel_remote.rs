//! Bazel 4.2.3 builds and tests a C++ workspace entirely on Paddock's workers: every
//! action runs remotely, the outputs match a local build, the tests pass, and after
//! `bazel clean` the rebuild is all remote cache hits. Over TLS, Bazel proves itself
//! with a bearer token or a client certificate, unchanged; with a read-only token it
//! gets cache hits and writes nothing.

mod common;

use std::path::Path;

use common::bazel::{remote_flags, Workspace};
use common::pki::Pki;
use common::{config_file, Farm};

/// Outputs compared byte for byte between the local and the remote build.
const OUTPUTS: &[&str] = &[
    "app/calc",
    "app/greet",
    "chain/liblink20.a",
    "gen/manifest.txt",
    "gen/notice.txt",
    "gen/squares.cc",
    "gen/version.h",
    "math/libpow.a",
    "tools/table_gen",
];

#[test]
fn bazel_builds_and_tests_everything_remotely() {
    // The reference: a purely local build.
    let local = Workspace::new("cc");
    let built = local.bazel(&["build", "//..."]);
    assert!(built.success, "local build failed:\n{}", built.output);
    let expected: Vec<Vec<u8>> = OUTPUTS.iter().map(|p| local.output(p)).collect();
    drop(local);

    let farm = Farm::start(&[]);
    let ws = Workspace::new("cc");
    let flags = remote_flags(&farm.url);
    let mut args: Vec<&str> = vec!["test", "//..."];
    args.extend(flags.iter().map(String::as_str));
    let first = ws.bazel(&args);
    assert!(
        first.success,
        "remote build and test failed:\n{}\n--- paddock log ---\n{}",
        first.output,
        farm.log()
    );
    let remote = first.all_of_kind("remote");
    assert!(remote > 80, "{}", first.output);
    assert!(
        first
            .output
            .contains("Executed 5 out of 5 tests: 5 tests pass."),
        "{}",
        first.output
    );
    for (path, want) in OUTPUTS.iter().zip(&expected) {
        assert!(
            &ws.output(path) == want,
            "{path} differs from the local build"
        );
    }

    assert_eq!(ws.rebuild_from_cache(&args), remote);
}

/// ActionCache entries on disk (each a file below `action-cache/`).
fn action_cache_entries(dir: &Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == "tmp") {
            continue;
        }
        if path.is_dir() {
            count += action_cache_entries(&path);
        } else {
            count += 1;
        }
    }
    count
}

#[test]
fn bazel_builds_over_tls_with_a_token_with_client_certificates_and_reads_with_a_read_only_token() {
    let pki = Pki::new();
    let ci = pki.token("ci");
    let reader = pki.token("reader");
    pki.client("bazel-client");
    let client = ["cas.read", "cas.write", "ac.read", "ac.write", "execute"];
    let mut config = pki.tls_section();
    config += &pki.token_section("ci", &client, &["*"]);
    config += &pki.token_section("reader", &["cas.read", "ac.read"], &["*"]);
    config += &format!(
        "[[auth.certificates]]\nsubject = \"CN=bazel-client\"\npermissions = {client:?}\n"
    );
    let farm = Farm::start(&["--config", &config_file(&config)]);
    assert!(farm.url.starts_with("grpcs://127.0.0.1:"), "{}", farm.url);
    let ca = format!("--tls_certificate={}", pki.path("ca.pem").display());

    // A bearer token, as a header: Bazel needs no change.
    let ws = Workspace::new("cc");
    let mut flags = remote_flags(&farm.url);
    flags.push(ca.clone());
    flags.push(format!("--remote_header=Authorization=Bearer {ci}"));
    let mut args: Vec<&str> = vec!["test", "//..."];
    args.extend(flags.iter().map(String::as_str));
    let built = ws.bazel(&args);
    assert!(
        built.success,
        "the build with a token failed:\n{}\n--- paddock log ---\n{}",
        built.output,
        farm.log()
    );
    let remote = built.all_of_kind("remote");
    assert!(remote > 80, "{}", built.output);
    assert!(!farm.log().contains(&ci), "the token reached the log");
    drop(ws);

    // A client certificate (and its PKCS#8 key), every action run again.
    let ws = Workspace::new("cc");
    let mut flags = remote_flags(&farm.url);
    flags.push(ca.clone());
    flags.push(format!(
        "--tls_client_certificate={}",
        pki.path("bazel-client.pem").display()
    ));
    flags.push(format!(
        "--tls_client_key={}",
        pki.path("bazel-client.key").display()
    ));
    flags.push("--noremote_accept_cached".into());
    let mut args: Vec<&str> = vec!["build", "//..."];
    args.extend(flags.iter().map(String::as_str));
    let built = ws.bazel(&args);
    assert!(
        built.success,
        "the build with a client certificate failed:\n{}\n--- paddock log ---\n{}",
        built.output,
        farm.log()
    );
    assert!(built.all_of_kind("remote") > 60, "{}", built.output);
    drop(ws);

    // A read-only token: the server's capabilities tell Bazel it may not write, and
    // Bazel, asked to upload its local results, says so...
    let entries = action_cache_entries(&farm.data_dir.join("action-cache"));
    let ws = Workspace::new("cc");
    let mut read_only = vec![
        format!("--remote_cache={}", farm.url),
        "--remote_instance_name=bazel/remote".into(),
        ca.clone(),
        format!("--remote_header=Authorization=Bearer {reader}"),
        // The platform of the remote builds, so the same action digests.
        "--remote_default_exec_properties=OSFamily=Linux".into(),
        "--jobs=8".into(),
    ];
    let mut args: Vec<&str> = vec!["build", "//..."];
    args.extend(read_only.iter().map(String::as_str));
    let refused = ws.bazel(&args);
    assert!(
        !refused.success && refused.output.contains("not authorized to write"),
        "{}",
        refused.output
    );
    // ...so a developer reads only, and everything CI built is a cache hit...
    read_only.push("--noremote_upload_local_results".into());
    let mut args: Vec<&str> = vec!["build", "//..."];
    args.extend(read_only.iter().map(String::as_str));
    let built = ws.bazel(&args);
    assert!(
        built.success,
        "the read-only build failed:\n{}",
        built.output
    );
    let hits = built.all_of_kind("remote cache hit");
    assert!(hits > 60, "{}", built.output);
    // ...and what it builds itself stays its own: the ActionCache gains nothing.
    let source = ws.dir().join("math/pow.cc");
    let mut text = std::fs::read_to_string(&source).unwrap();
    text.push_str("\n// changed by a developer with a read-only token\n");
    std::fs::write(&source, text).unwrap();
    let built = ws.bazel(&args);
    assert!(
        built.success,
        "the read-only rebuild failed:\n{}",
        built.output
    );
    let local: usize = ["linux-sandbox", "processwrapper-sandbox", "local"]
        .iter()
        .map(|kind| built.count(kind))
        .sum();
    assert!(local > 0, "{}", built.output);
    assert_eq!(
        action_cache_entries(&farm.data_dir.join("action-cache")),
        entries,
        "a read-only token wrote the ActionCache:\n{}",
        built.output
    );
}

/// Bytes the workers fetched from the CAS, from the farm's metrics.
fn fetched_bytes(farm: &Farm) -> u64 {
    common::metric(
        &common::http_get(&farm.metrics_url),
        "paddock_worker_fetched_bytes_total",
    ) as u64
}

/// The workspace built on four workers, with the scheduler's locality on and off:
/// the bytes the workers fetched are printed for BENCHMARKS.md.
#[test]
fn bazel_on_four_workers_with_and_without_locality() {
    let mut figures = Vec::new();
    for locality in [true, false] {
        let config = config_file(&format!(
            "[server]\nlocal_workers = 4\n[scheduler]\nlocality = {locality}\n"
        ));
        let farm = Farm::start(&["--config", &config]);
        let ws = Workspace::new("cc");
        let flags = remote_flags(&farm.url);
        let mut args: Vec<&str> = vec!["build", "//..."];
        args.extend(flags.iter().map(String::as_str));
        let built = ws.bazel(&args);
        assert!(built.success, "{}\n{}", built.output, farm.log());
        let remote = built.all_of_kind("remote");
        assert!(remote > 50, "{}", built.output);
        let fetched = fetched_bytes(&farm);
        assert!(fetched > 0, "no paddock_worker_fetched_bytes_total");
        figures.push((locality, remote, fetched));
    }
    for (locality, actions, fetched) in figures {
        println!(
            "BENCHMARK locality {}: {actions} remote actions on 4 workers, workers fetched {fetched} bytes ({:.1} MiB)",
            if locality { "on" } else { "off" },
            fetched as f64 / (1 << 20) as f64
        );
    }
}
