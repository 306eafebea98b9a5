//! Bazel 4.2.3 builds and tests a C++ workspace entirely on Paddock's workers: every
//! action runs remotely, the outputs match a local build, the tests pass, and after
//! `bazel clean` the rebuild is all remote cache hits.

mod common;

use common::bazel::Workspace;
use common::Farm;

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

fn remote_flags(url: &str) -> Vec<String> {
    [
        format!("--remote_executor={url}"),
        "--remote_instance_name=bazel/remote".into(),
        "--spawn_strategy=remote".into(),
        "--genrule_strategy=remote".into(),
        "--strategy=CppCompile=remote".into(),
        "--strategy=CppLink=remote".into(),
        "--strategy=CppArchive=remote".into(),
        "--strategy=TestRunner=remote".into(),
        "--noremote_local_fallback".into(),
        "--remote_default_exec_properties=OSFamily=Linux".into(),
        "--jobs=8".into(),
    ]
    .to_vec()
}

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
