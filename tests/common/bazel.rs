//! Driving a real Bazel (Debian's 4.2.3) against a workspace from `tests/bazel/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::repo_root;

/// The offline Bazel stand-ins: `$PADDOCK_SHARED_DIR`, else `shared/` beside the repository.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("PADDOCK_SHARED_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => repo_root().join("../shared"),
    }
}

/// Where the tests' Bazel finds the OpenSSL half of its gRPC (netty-tcnative).
///
/// Debian's Bazel bundles netty-tcnative's Java classes but not its native library,
/// and its netty has no ALPN through the JDK: without the library, every `grpcs://`
/// connection fails ("JDK provider does not support ALPN protocol"). Debian's
/// `libnetty-tcnative-jni` has the library under another name (hyphenated), which
/// the library itself refuses to load as; a copy under the name netty looks for, in
/// a directory of the tests' own, given to Bazel's JVM with `java.library.path`,
/// makes TLS work. Nothing of the machine's configuration changes.
fn tcnative_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let installed = Path::new("/usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so");
        assert!(
            installed.exists(),
            "{} is missing: apt-get install libnetty-tcnative-jni (tests/run does)",
            installed.display()
        );
        let dir = std::env::temp_dir().join("paddock-test-tcnative");
        std::fs::create_dir_all(&dir).unwrap();
        // Copied, not linked: the library checks the name it was loaded under.
        let tmp = dir.join(format!("copy.{}", std::process::id()));
        std::fs::copy(installed, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("libnetty_tcnative.so")).unwrap();
        dir
    })
    .clone()
}

/// A private copy of a test workspace with its own Bazel server, shut down on drop.
pub struct Workspace {
    tmp: tempfile::TempDir,
}

/// What one Bazel command printed, and how it ended.
pub struct BazelRun {
    pub success: bool,
    pub output: String,
}

impl BazelRun {
    /// The breakdown of Bazel's process summary, e.g.
    /// `INFO: 210 processes: 109 internal, 101 remote.` → `[(109, "internal"), (101, "remote")]`.
    pub fn processes(&self) -> Vec<(usize, String)> {
        let line = self
            .output
            .lines()
            .rev()
            .find(|l| l.contains(" processes: ") || l.contains(" process: "))
            .unwrap_or_else(|| panic!("no process summary in:\n{}", self.output));
        let summary = line.split_once(": ").unwrap().1;
        let breakdown = summary.split_once(": ").map(|(_, b)| b).unwrap_or("");
        breakdown
            .trim_end_matches('.')
            .split(", ")
            .filter(|part| !part.is_empty())
            .map(|part| {
                let (count, kind) = part.split_once(' ').unwrap();
                (count.parse().unwrap(), kind.to_owned())
            })
            .collect()
    }

    /// How many processes of a kind (e.g. "remote cache hit") the summary counts.
    pub fn count(&self, kind: &str) -> usize {
        self.processes()
            .iter()
            .filter(|(_, k)| k == kind)
            .map(|(n, _)| n)
            .sum()
    }

    /// Every process kind other than "internal".
    pub fn non_internal(&self) -> Vec<(usize, String)> {
        self.processes()
            .into_iter()
            .filter(|(_, k)| k != "internal")
            .collect()
    }

    /// Asserts that every process but the internal ones was of `kind` (e.g. "remote");
    /// returns how many there were.
    pub fn all_of_kind(&self, kind: &str) -> usize {
        let count = self.count(kind);
        assert_eq!(
            self.non_internal(),
            vec![(count, kind.to_owned())],
            "every action must be {kind}:\n{}",
            self.output
        );
        count
    }
}

impl Workspace {
    /// Copies `tests/bazel/{name}` and writes its WORKSPACE for the offline stand-ins.
    pub fn new(name: &str) -> Workspace {
        let tmp = tempfile::tempdir().unwrap();
        let src = repo_root().join("tests/bazel").join(name);
        copy_tree(&src, &tmp.path().join("ws"));
        let template = std::fs::read_to_string(tmp.path().join("ws/WORKSPACE.template")).unwrap();
        let shared = shared_dir()
            .canonicalize()
            .expect("the shared/ directory beside the repository");
        std::fs::write(
            tmp.path().join("ws/WORKSPACE"),
            template.replace("%SHARED%", shared.to_str().unwrap()),
        )
        .unwrap();
        Workspace { tmp }
    }

    pub fn dir(&self) -> PathBuf {
        self.tmp.path().join("ws")
    }

    /// Runs `bazel <args>` in the workspace with a private output root.
    pub fn bazel(&self, args: &[&str]) -> BazelRun {
        let output = Command::new("bazel")
            .arg(format!(
                "--output_user_root={}",
                self.tmp.path().join("root").display()
            ))
            .arg(format!(
                "--host_jvm_args=-Djava.library.path={}",
                tcnative_dir().display()
            ))
            .args(args)
            .current_dir(self.dir())
            .env_remove("RUST_LOG")
            .output()
            .expect("running bazel (apt-get install bazel-bootstrap)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        BazelRun {
            success: output.status.success(),
            output: text,
        }
    }

    /// The bytes of an output under `bazel-bin`.
    /// `bazel clean`, then `args` again: asserts that the rebuild succeeds with every
    /// action a remote cache hit, and returns how many there were.
    pub fn rebuild_from_cache(&self, args: &[&str]) -> usize {
        let clean = self.bazel(&["clean"]);
        assert!(clean.success, "{}", clean.output);
        let second = self.bazel(args);
        assert!(second.success, "rebuild failed:\n{}", second.output);
        second.all_of_kind("remote cache hit")
    }

    pub fn output(&self, path: &str) -> Vec<u8> {
        std::fs::read(self.dir().join("bazel-bin").join(path))
            .unwrap_or_else(|e| panic!("reading bazel-bin/{path}: {e}"))
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = Command::new("bazel")
            .arg(format!(
                "--output_user_root={}",
                self.tmp.path().join("root").display()
            ))
            .arg(format!(
                "--host_jvm_args=-Djava.library.path={}",
                tcnative_dir().display()
            ))
            .arg("shutdown")
            .current_dir(self.dir())
            .output();
        // Bazel leaves read-only directories behind; make them removable.
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(self.tmp.path())
            .output();
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The flags that send every action of the `cc` workspace to the farm at `url`.
pub fn remote_flags(url: &str) -> Vec<String> {
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
