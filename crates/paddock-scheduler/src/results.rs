//! What a worker's ActionResult must be before it is cached or returned, and what
//! two results of one action are compared by.

use paddock_cas::{referenced_blobs, BlobStore};
use paddock_reapi::proto::re::{ActionResult, Command, OutputSymlink};
use paddock_reapi::validate;

/// Checks a result against the command it answers and the CAS: well formed, every
/// output at a path the command declared, symlinks as this server allows them, and
/// every blob it references (files, stdout and stderr, trees and every file in
/// them) present in the CAS, which verified each one's digest as it was written.
/// An error says what is wrong; the result is then the worker's fault.
#[allow(deprecated)] // REAPI 2.0 clients declare outputs the old way
pub async fn check(
    cas: &dyn BlobStore,
    command: &Command,
    result: &ActionResult,
    max_tree_directories: usize,
) -> Result<(), String> {
    validate::action_result(result)?;
    let declared = |path: &str| -> bool {
        command.output_paths.iter().any(|p| p == path)
            || command.output_files.iter().any(|p| p == path)
            || command.output_directories.iter().any(|p| p == path)
    };
    let outputs = result
        .output_files
        .iter()
        .map(|f| ("file", &f.path))
        .chain(
            result
                .output_directories
                .iter()
                .map(|d| ("directory", &d.path)),
        )
        .chain(symlinks(result).map(|s| ("symlink", &s.path)));
    for (kind, path) in outputs {
        if !declared(path) {
            return Err(format!(
                "it reports the output {kind} {path:?}, which the command does not declare"
            ));
        }
    }
    let blobs = referenced_blobs(result, cas, max_tree_directories)
        .await
        .map_err(|e| format!("cannot read its output trees: {e}"))?
        .ok_or("an output tree it names is missing from the CAS or malformed")?;
    let missing = cas
        .find_missing(&blobs)
        .await
        .map_err(|e| format!("cannot check its outputs: {e}"))?;
    if let Some(first) = missing.first() {
        return Err(format!(
            "{} of the {} blobs it names are not in the CAS (e.g. {first})",
            missing.len(),
            blobs.len()
        ));
    }
    Ok(())
}

/// Every output symlink, in REAPI 2.1's field and 2.0's.
#[allow(deprecated)] // REAPI 2.0's output_file_symlinks and output_directory_symlinks
fn symlinks(result: &ActionResult) -> impl Iterator<Item = &OutputSymlink> {
    result
        .output_symlinks
        .iter()
        .chain(&result.output_file_symlinks)
        .chain(&result.output_directory_symlinks)
}

/// What two runs of a deterministic action must agree on: the exit code and every
/// output (files with their digests and executable bits, directories by their tree,
/// symlinks by their targets). Standard output and error are left out, as they often
/// carry timings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outputs {
    exit_code: i32,
    entries: Vec<String>,
}

impl Outputs {
    pub fn of(result: &ActionResult) -> Outputs {
        let digest = |d: &Option<paddock_reapi::proto::re::Digest>| {
            d.as_ref()
                .map(|d| format!("{}/{}", d.hash, d.size_bytes))
                .unwrap_or_default()
        };
        let mut entries: Vec<String> = result
            .output_files
            .iter()
            .map(|f| format!("file {} {} {}", f.path, digest(&f.digest), f.is_executable))
            .chain(
                result
                    .output_directories
                    .iter()
                    .map(|d| format!("dir {} {}", d.path, digest(&d.tree_digest))),
            )
            .chain(symlinks(result).map(|s| format!("link {} {}", s.path, s.target)))
            .collect();
        entries.sort();
        entries.dedup();
        Outputs {
            exit_code: result.exit_code,
            entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paddock_cas::MemoryStore;
    use paddock_reapi::proto::re::OutputFile;
    use paddock_reapi::Digest;

    fn file(path: &str, content: &[u8]) -> OutputFile {
        OutputFile {
            path: path.into(),
            digest: Some(Digest::of(content).to_proto()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn undeclared_outputs_and_missing_blobs_are_refused() {
        let cas = MemoryStore::new();
        cas.put(&Digest::of(b"out"), bytes::Bytes::from_static(b"out"))
            .await
            .unwrap();
        let command = Command {
            output_paths: vec!["out".into()],
            ..Default::default()
        };
        let good = ActionResult {
            output_files: vec![file("out", b"out")],
            ..Default::default()
        };
        assert_eq!(check(&cas, &command, &good, 1000).await, Ok(()));
        let undeclared = ActionResult {
            output_files: vec![file("elsewhere", b"out")],
            ..Default::default()
        };
        let err = check(&cas, &command, &undeclared, 1000).await.unwrap_err();
        assert!(err.contains("does not declare"), "{err}");
        let missing = ActionResult {
            output_files: vec![file("out", b"never uploaded")],
            ..Default::default()
        };
        let err = check(&cas, &command, &missing, 1000).await.unwrap_err();
        assert!(err.contains("not in the CAS"), "{err}");
    }

    #[test]
    fn outputs_compare_without_stdout() {
        let a = ActionResult {
            output_files: vec![file("out", b"1")],
            stdout_digest: Some(Digest::of(b"took 3ms").to_proto()),
            ..Default::default()
        };
        let mut b = a.clone();
        b.stdout_digest = Some(Digest::of(b"took 4ms").to_proto());
        assert_eq!(Outputs::of(&a), Outputs::of(&b));
        b.output_files[0] = file("out", b"2");
        assert_ne!(Outputs::of(&a), Outputs::of(&b));
    }
}
