//! Structural checks of the messages clients send: ActionResults, Commands and
//! Directories. Each returns a sentence that says what is wrong, for INVALID_ARGUMENT.

// REAPI v2.0 clients such as Bazel 4 still use the fields deprecated in v2.1.
#![allow(deprecated)]

use std::collections::HashSet;

use crate::digest::Digest;
use crate::path::{check_name, check_relative};
use crate::proto::re::{ActionResult, Command, Directory};

/// Checks every digest and path in an ActionResult: digests well formed, paths
/// relative and normalised, symlink targets relative and inside the working directory.
pub fn action_result(result: &ActionResult) -> Result<(), String> {
    for file in &result.output_files {
        check_relative("output file path", &file.path, false).map_err(|e| e.to_string())?;
        Digest::from_proto(file.digest.as_ref())
            .map_err(|e| format!("output file {:?}: {e}", file.path))?;
    }
    for dir in &result.output_directories {
        check_relative("output directory path", &dir.path, true).map_err(|e| e.to_string())?;
        let tree = dir
            .tree_digest
            .as_ref()
            .map(|d| Digest::from_proto(Some(d)));
        let root = dir
            .root_directory_digest
            .as_ref()
            .map(|d| Digest::from_proto(Some(d)));
        match (tree, root) {
            (None, None) => {
                return Err(format!(
                    "output directory {:?} has neither tree_digest nor root_directory_digest",
                    dir.path
                ))
            }
            (Some(Err(e)), _) | (_, Some(Err(e))) => {
                return Err(format!("output directory {:?}: {e}", dir.path))
            }
            _ => {}
        }
    }
    let symlinks = result
        .output_symlinks
        .iter()
        .chain(&result.output_file_symlinks)
        .chain(&result.output_directory_symlinks);
    for link in symlinks {
        check_relative("output symlink path", &link.path, false).map_err(|e| e.to_string())?;
        output_symlink_target(&link.path, &link.target)?;
    }
    for (what, digest) in [
        ("stdout_digest", &result.stdout_digest),
        ("stderr_digest", &result.stderr_digest),
    ] {
        if let Some(d) = digest {
            Digest::from_proto(Some(d)).map_err(|e| format!("{what}: {e}"))?;
        }
    }
    Ok(())
}

/// An output symlink's target must be relative (this server advertises
/// `SymlinkAbsolutePathStrategy.DISALLOWED`); `..` is allowed anywhere, as REAPI says.
pub fn output_symlink_target(link: &str, target: &str) -> Result<(), String> {
    if target.is_empty() {
        return Err(format!("symlink {link:?} has an empty target"));
    }
    if target.contains('\0') {
        return Err(format!("symlink {link:?} has a target with a NUL byte"));
    }
    if target.starts_with('/') {
        return Err(format!(
            "symlink {link:?} has the absolute target {target:?}; absolute symlinks are disallowed"
        ));
    }
    Ok(())
}

/// Checks a Command: arguments present, environment names sane, output paths and the
/// working directory relative and normalised, no output both a file and a directory.
pub fn command(command: &Command) -> Result<(), String> {
    if command.arguments.is_empty() || command.arguments[0].is_empty() {
        return Err("command has no arguments".into());
    }
    if command.arguments.iter().any(|a| a.contains('\0')) {
        return Err("command arguments contain a NUL byte".into());
    }
    for var in &command.environment_variables {
        if var.name.is_empty() || var.name.contains('=') || var.name.contains('\0') {
            return Err(format!(
                "environment variable name {:?} is invalid",
                var.name
            ));
        }
        if var.value.contains('\0') {
            return Err(format!(
                "environment variable {:?} has a NUL byte",
                var.name
            ));
        }
    }
    check_relative("working_directory", &command.working_directory, true)
        .map_err(|e| e.to_string())?;
    if let Some(property) = command.output_node_properties.first() {
        return Err(format!(
            "output node property {property:?} is not supported by this server"
        ));
    }
    let uses_output_paths = !command.output_paths.is_empty();
    if uses_output_paths {
        for p in &command.output_paths {
            check_relative("output path", p, true).map_err(|e| e.to_string())?;
        }
    } else {
        let mut files = HashSet::new();
        for p in &command.output_files {
            check_relative("output file", p, false).map_err(|e| e.to_string())?;
            if !files.insert(p.as_str()) {
                return Err(format!("output file {p:?} is listed twice"));
            }
        }
        for p in &command.output_directories {
            check_relative("output directory", p, true).map_err(|e| e.to_string())?;
            if files.contains(p.as_str()) {
                return Err(format!(
                    "{p:?} is both an output file and an output directory"
                ));
            }
        }
    }
    Ok(())
}

/// Checks one Directory: names are single segments, unique and sorted; digests are well
/// formed; symlink targets are relative (`at` is the directory's path from the root,
/// for messages). Where a symlink leads depends on the whole tree: see
/// [`crate::tree::InputTree::check_symlink`].
pub fn directory(dir: &Directory, at: &str) -> Result<(), String> {
    let mut names = HashSet::new();
    let join = |name: &str| {
        if at.is_empty() {
            name.to_owned()
        } else {
            format!("{at}/{name}")
        }
    };
    for (kind, list) in [
        (
            "file",
            dir.files
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>(),
        ),
        (
            "directory",
            dir.directories.iter().map(|d| d.name.as_str()).collect(),
        ),
        (
            "symlink",
            dir.symlinks.iter().map(|s| s.name.as_str()).collect(),
        ),
    ] {
        for pair in list.windows(2) {
            if pair[0] >= pair[1] {
                return Err(format!(
                    "{kind} names in directory {at:?} are not sorted and unique: {:?} then {:?}",
                    pair[0], pair[1]
                ));
            }
        }
        for name in list {
            check_name("directory entry", name).map_err(|e| format!("in {at:?}: {e}"))?;
            if !names.insert(name) {
                return Err(format!("{:?} appears twice in directory {at:?}", name));
            }
        }
    }
    for file in &dir.files {
        Digest::from_proto(file.digest.as_ref())
            .map_err(|e| format!("file {:?}: {e}", join(&file.name)))?;
    }
    for sub in &dir.directories {
        Digest::from_proto(sub.digest.as_ref())
            .map_err(|e| format!("directory {:?}: {e}", join(&sub.name)))?;
    }
    for link in &dir.symlinks {
        output_symlink_target(&join(&link.name), &link.target)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::re::{FileNode, OutputFile, OutputSymlink, SymlinkNode};

    #[test]
    fn results_with_bad_paths_or_digests_are_refused() {
        let good = OutputFile {
            path: "out/a".into(),
            digest: Some(Digest::EMPTY.to_proto()),
            ..Default::default()
        };
        let mut r = ActionResult {
            output_files: vec![good.clone()],
            ..Default::default()
        };
        assert!(action_result(&r).is_ok());
        r.output_files[0].path = "../escape".into();
        assert!(action_result(&r).is_err());
        r.output_files[0] = good;
        r.output_files[0].digest.as_mut().unwrap().hash = "nope".into();
        assert!(action_result(&r).is_err());
        let r = ActionResult {
            output_symlinks: vec![OutputSymlink {
                path: "link".into(),
                target: "/etc/passwd".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(action_result(&r).is_err());
        // `..` is allowed in output symlink targets, even past the working directory.
        let r = ActionResult {
            output_symlinks: vec![OutputSymlink {
                path: "link".into(),
                target: "../x".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(action_result(&r).is_ok());
    }

    #[test]
    fn directories_must_be_canonical_and_contained() {
        let file = |name: &str| FileNode {
            name: name.into(),
            digest: Some(Digest::EMPTY.to_proto()),
            ..Default::default()
        };
        let ok = Directory {
            files: vec![file("a"), file("b")],
            ..Default::default()
        };
        assert!(directory(&ok, "").is_ok());
        let unsorted = Directory {
            files: vec![file("b"), file("a")],
            ..Default::default()
        };
        assert!(directory(&unsorted, "").is_err());
        let dotdot = Directory {
            files: vec![file("..")],
            ..Default::default()
        };
        assert!(directory(&dotdot, "").is_err());
        let absolute = Directory {
            symlinks: vec![SymlinkNode {
                name: "l".into(),
                target: "/etc/passwd".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(directory(&absolute, "sub").is_err());
    }

    #[test]
    fn commands() {
        let mut c = Command {
            arguments: vec!["/bin/true".into()],
            output_files: vec!["a".into()],
            output_directories: vec!["a".into()],
            ..Default::default()
        };
        assert!(command(&c).is_err());
        c.output_directories = vec!["d".into()];
        assert!(command(&c).is_ok());
        c.working_directory = "/abs".into();
        assert!(command(&c).is_err());
        c.working_directory = String::new();
        c.arguments.clear();
        assert!(command(&c).is_err());
    }
}
