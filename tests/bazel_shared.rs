//! Bazel against servers that share their state (PostgreSQL) and their blobs (an
//! S3-compatible store): a build sent to one server while another serves the
//! workers, across a crash of the first; and a build that keeps its outputs remote
//! (`--remote_download_minimal`) building again after the CAS collected garbage.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::bazel::{remote_flags, Workspace};
use common::postgres::Postgres;
use common::s3::{shared_config, Backend, Storage, S3};
use common::{free_address, http_get, metric, random_blob, Farm, Worker};
use paddock_reapi::Digest;

#[test]
fn bazel_builds_through_one_server_while_another_serves_the_workers_and_survives_its_crash() {
    let (s3, postgres) = (S3::start(), Postgres::start());
    let config = shared_config(&s3, &postgres, "", "");
    let mut a = Farm::server(&free_address(), &["--config", &config]);
    let b = Farm::server(&free_address(), &["--config", &config]);
    let _workers: Vec<Worker> = (0..2)
        .map(|i| Worker::start(&b.worker_url, &format!("on-b-{i}"), &["--capacity", "2"]))
        .collect();

    let ws = Workspace::new("cc");
    let mut flags = remote_flags(&a.url);
    flags.push("--remote_retries=20".into());
    let mut args: Vec<&str> = vec!["test", "//..."];
    args.extend(flags.iter().map(String::as_str));
    let first = ws.bazel(&args);
    assert!(
        first.success,
        "the build through A failed:\n{}\n--- A ---\n{}\n--- B ---\n{}",
        first.output,
        a.log(),
        b.log()
    );
    assert!(first.all_of_kind("remote") > 80, "{}", first.output);
    assert!(
        first
            .output
            .contains("Executed 5 out of 5 tests: 5 tests pass."),
        "{}",
        first.output
    );

    // Every action again, and A killed and started again in the middle.
    let clean = ws.bazel(&["clean"]);
    assert!(clean.success, "{}", clean.output);
    let mut args: Vec<&str> = vec!["build", "//...", "--noremote_accept_cached"];
    args.extend(flags.iter().map(String::as_str));
    let again = std::thread::scope(|scope| {
        let build = scope.spawn(|| ws.bazel(&args));
        std::thread::sleep(Duration::from_secs(6));
        a.kill9();
        std::thread::sleep(Duration::from_secs(1));
        a.start_again();
        build.join().unwrap()
    });
    assert!(
        again.success,
        "the build through a restarted A failed:\n{}\n--- A ---\n{}\n--- B ---\n{}",
        again.output,
        a.log(),
        b.log()
    );
    assert!(again.all_of_kind("remote") > 60, "{}", again.output);
    assert_eq!(
        a.log().matches("paddock is up").count(),
        2,
        "A was started again"
    );
    assert!(
        http_get(&a.metrics_url).contains("paddock_"),
        "A serves again"
    );
}

fn junk(count: usize, size: usize) -> Vec<(Digest, Bytes)> {
    (0..count).map(|_| random_blob(size)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn bazel_keeping_outputs_remote_builds_again_after_a_collection() {
    // Room for the build and the new blobs, not for the old ones too; leases long
    // enough to cover the whole test from the first build on.
    let lease = Duration::from_secs(40);
    let storage = Storage::start_with(
        Backend::S3,
        "max_size = \"48MiB\"\nblob_lease = \"40s\"\ncollect_interval = \"1s\"\n",
        "",
    );
    let remote = storage.remote("").await;
    let old = junk(30, 1 << 20);
    remote.upload(old.clone()).await.unwrap();
    tokio::time::sleep(lease + Duration::from_secs(5)).await;

    let ws = Workspace::new("cc");
    let mut flags = remote_flags(&storage.url);
    flags.push("--remote_download_minimal".into());
    let build = |ws: &Workspace, flags: &[String]| {
        let mut args: Vec<&str> = vec!["build", "//..."];
        args.extend(flags.iter().map(String::as_str));
        ws.bazel(&args)
    };
    let mut first = tokio::task::block_in_place(|| build(&ws, &flags));
    if !first.success
        && first.output.contains("(Exit 34)")
        && first.output.contains("No such file or directory")
    {
        // Bazel 4.2.3's builds without the bytes now and then look for an input it
        // never downloaded on disk (seen twice in five runs, in this first build,
        // before any collection, with nothing wrong in the server's log). This build
        // only sets the stage; once more, and it must succeed.
        first = tokio::task::block_in_place(|| build(&ws, &flags));
    }
    assert!(first.success, "{}\n{}", first.output, storage.log());
    assert!(
        !ws.dir().join("bazel-bin/app/calc").exists(),
        "the outputs stayed remote"
    );

    // New blobs take the store past its bound: a collection follows.
    let new = junk(20, 1 << 20);
    remote.upload(new.clone()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = http_get(&storage.metrics_url);
        if metric(&page, "paddock_cas_collected_blobs_total") > 0.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no collection");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let old_digests: Vec<Digest> = old.iter().map(|(d, _)| *d).collect();
    let new_digests: Vec<Digest> = new.iter().map(|(d, _)| *d).collect();
    assert!(
        !remote.find_missing(&old_digests).await.unwrap().is_empty(),
        "old, unleased blobs were collected"
    );
    assert!(remote.find_missing(&new_digests).await.unwrap().is_empty());

    // A change to the object, so that the link runs again, on the farm, against
    // libraries Bazel never downloaded.
    let calc = ws.dir().join("app/calc.cc");
    let source = std::fs::read_to_string(&calc).unwrap();
    std::fs::write(
        &calc,
        format!("{source}\nint paddock_changed() {{ return 1; }}\n"),
    )
    .unwrap();
    let second = tokio::task::block_in_place(|| build(&ws, &flags));
    assert!(
        second.success,
        "the build after a collection failed:\n{}\n{}",
        second.output,
        storage.log()
    );
    assert!(second.count("remote") >= 2, "{}", second.output);
}
