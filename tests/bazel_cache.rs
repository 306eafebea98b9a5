//! Bazel uses Paddock as a remote cache: a build stores its results, and after
//! `bazel clean` the rebuild comes entirely from the cache.

mod common;

use common::bazel::Workspace;
use common::Farm;

#[test]
fn bazel_rebuild_after_clean_is_all_remote_cache_hits() {
    let farm = Farm::start(&[]);
    let ws = Workspace::new("cc");
    let cache = format!("--remote_cache={}", farm.url);
    let flags = [
        cache.as_str(),
        "--remote_instance_name=bazel/cache",
        "--jobs=4",
    ];

    let mut args = vec!["build", "//..."];
    args.extend(flags);
    let first = ws.bazel(&args);
    assert!(first.success, "first build failed:\n{}", first.output);
    let executed: usize = first.non_internal().iter().map(|(n, _)| n).sum();
    assert!(
        executed > 50,
        "expected a real build, got {:?}",
        first.processes()
    );
    let calc = ws.output("app/calc");
    let squares = ws.output("gen/squares.cc");

    assert_eq!(ws.rebuild_from_cache(&args), executed);
    assert_eq!(ws.output("app/calc"), calc);
    assert_eq!(ws.output("gen/squares.cc"), squares);
}
