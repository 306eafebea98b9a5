//! Collecting an action's outputs as REAPI describes them: files, directories (as
//! Tree messages), and symlinks, for `output_paths` (REAPI 2.1+) and for the older
//! `output_files`/`output_directories`. Every file is hashed here, before upload.

// REAPI 2.0 clients such as Bazel 4 use the fields deprecated in 2.1.
#![allow(deprecated)]

use std::collections::{HashSet, VecDeque};
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use paddock_client::Source;
use paddock_reapi::proto::re::{
    command::OutputDirectoryFormat, ActionResult, Command, Directory, DirectoryNode, FileNode,
    OutputDirectory, OutputFile, OutputSymlink, SymlinkNode, Tree,
};
use paddock_reapi::{validate, Digest, DigestHasher};
use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The outputs break REAPI's rules (a file where a directory was declared, an
    /// absolute symlink): FAILED_PRECONDITION for the client.
    #[error("{0}")]
    Invalid(String),
    /// This worker failed to read them.
    #[error("{0}")]
    Worker(String),
}

/// The outputs, ready to upload.
#[derive(Default)]
pub struct Collected {
    /// The output fields of the ActionResult.
    pub result: ActionResult,
    /// Every blob the result references, and where its bytes are.
    pub blobs: Vec<(Digest, Source)>,
    /// Output files worth keeping in the worker's cache: digest, executable, path.
    pub files: Vec<(Digest, bool, PathBuf)>,
}

fn worker_error(path: &Path, e: std::io::Error) -> OutputError {
    OutputError::Worker(format!("reading output {}: {e}", path.display()))
}

/// Hashes a file, streaming.
pub fn hash_file(path: &Path) -> Result<Digest, OutputError> {
    let mut file = fs::File::open(path).map_err(|e| worker_error(path, e))?;
    let mut hasher = DigestHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| worker_error(path, e))?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

fn is_executable(meta: &fs::Metadata) -> bool {
    meta.permissions().mode() & 0o111 != 0
}

impl Collected {
    fn file(&mut self, path: &Path, meta: &fs::Metadata) -> Result<(Digest, bool), OutputError> {
        let digest = hash_file(path)?;
        let executable = is_executable(meta);
        self.blobs.push((digest, Source::File(path.to_owned())));
        self.files.push((digest, executable, path.to_owned()));
        Ok((digest, executable))
    }

    /// A declared output file at `rel`.
    fn output_file(
        &mut self,
        rel: &str,
        path: &Path,
        meta: &fs::Metadata,
    ) -> Result<OutputFile, OutputError> {
        let (digest, is_executable) = self.file(path, meta)?;
        Ok(OutputFile {
            path: rel.to_owned(),
            digest: Some(digest.to_proto()),
            is_executable,
            ..Default::default()
        })
    }

    fn message<M: Message>(&mut self, message: &M) -> Digest {
        let (digest, bytes) = Digest::of_message(message);
        self.blobs
            .push((digest, Source::Memory(Bytes::from(bytes))));
        digest
    }

    /// Encodes `dir` as a Tree (and, if asked, as separate Directory blobs).
    fn directory(
        &mut self,
        rel: &str,
        path: &Path,
        format: OutputDirectoryFormat,
    ) -> Result<OutputDirectory, OutputError> {
        let mut all = Vec::new();
        let root = self.walk(path, rel, &mut all)?;
        // Children in breadth-first order from the root, each distinct one once, so
        // parents come before children (`is_topologically_sorted`).
        let by_digest: std::collections::HashMap<Digest, Directory> = all.into_iter().collect();
        let mut children = Vec::new();
        let mut seen = HashSet::new();
        let mut queue: VecDeque<&Directory> = VecDeque::from([&root]);
        while let Some(dir) = queue.pop_front() {
            for sub in &dir.directories {
                let digest = Digest::from_proto(sub.digest.as_ref()).expect("made here");
                if seen.insert(digest) {
                    let child = &by_digest[&digest];
                    children.push(child.clone());
                    queue.push_back(child);
                }
            }
        }
        let wants_directories = format != OutputDirectoryFormat::TreeOnly;
        let root_digest = wants_directories.then(|| {
            for child in &children {
                self.message(child);
            }
            self.message(&root)
        });
        let tree = Tree {
            root: Some(root),
            children,
        };
        let tree_digest = self.message(&tree);
        Ok(OutputDirectory {
            path: rel.to_owned(),
            tree_digest: Some(tree_digest.to_proto()),
            is_topologically_sorted: true,
            root_directory_digest: root_digest.map(|d| d.to_proto()),
        })
    }

    /// Builds the Directory for `path`, recording every descendant in `all`.
    fn walk(
        &mut self,
        path: &Path,
        rel: &str,
        all: &mut Vec<(Digest, Directory)>,
    ) -> Result<Directory, OutputError> {
        let mut names: Vec<(String, PathBuf)> = Vec::new();
        for entry in fs::read_dir(path).map_err(|e| worker_error(path, e))? {
            let entry = entry.map_err(|e| worker_error(path, e))?;
            let name = entry.file_name().into_string().map_err(|n| {
                OutputError::Invalid(format!(
                    "output {:?} has a name that is not UTF-8",
                    path.join(n)
                ))
            })?;
            names.push((name, entry.path()));
        }
        names.sort();
        let mut dir = Directory::default();
        for (name, child) in names {
            let meta = fs::symlink_metadata(&child).map_err(|e| worker_error(&child, e))?;
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if meta.file_type().is_symlink() {
                let target = symlink_target(&child, &child_rel)?;
                dir.symlinks.push(SymlinkNode {
                    name,
                    target,
                    ..Default::default()
                });
            } else if meta.is_dir() {
                let sub = self.walk(&child, &child_rel, all)?;
                let (digest, _) = Digest::of_message(&sub);
                all.push((digest, sub));
                dir.directories.push(DirectoryNode {
                    name,
                    digest: Some(digest.to_proto()),
                });
            } else if meta.is_file() {
                let (digest, is_executable) = self.file(&child, &meta)?;
                dir.files.push(FileNode {
                    name,
                    digest: Some(digest.to_proto()),
                    is_executable,
                    ..Default::default()
                });
            } else {
                tracing::warn!(path = %child.display(), "skipping an output that is neither file, directory nor symlink");
            }
        }
        Ok(dir)
    }
}

/// An output symlink at `rel`, its target read from `path`.
fn output_symlink(path: &Path, rel: &str) -> Result<OutputSymlink, OutputError> {
    Ok(OutputSymlink {
        path: rel.to_owned(),
        target: symlink_target(path, rel)?,
        ..Default::default()
    })
}

/// Reads a symlink among the outputs; absolute targets are refused, as this server
/// advertises `SymlinkAbsolutePathStrategy.DISALLOWED`.
fn symlink_target(path: &Path, rel: &str) -> Result<String, OutputError> {
    let target = fs::read_link(path).map_err(|e| worker_error(path, e))?;
    let target = target.into_os_string().into_string().map_err(|_| {
        OutputError::Invalid(format!(
            "output symlink {rel:?} has a target that is not UTF-8"
        ))
    })?;
    validate::output_symlink_target(rel, &target).map_err(OutputError::Invalid)?;
    Ok(target)
}

/// Collects the outputs `command` declares, relative to `working_dir`.
pub fn collect(working_dir: &Path, command: &Command) -> Result<Collected, OutputError> {
    let mut out = Collected::default();
    let format = OutputDirectoryFormat::try_from(command.output_directory_format)
        .unwrap_or(OutputDirectoryFormat::TreeOnly);
    let lstat = |rel: &str| {
        let path = working_dir.join(rel);
        match fs::symlink_metadata(&path) {
            Ok(meta) => Ok(Some((path, meta))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(worker_error(&path, e)),
        }
    };
    if !command.output_paths.is_empty() {
        for rel in &command.output_paths {
            let Some((path, meta)) = lstat(rel)? else {
                continue;
            };
            if meta.file_type().is_symlink() {
                let symlink = output_symlink(&path, rel)?;
                out.result.output_symlinks.push(symlink);
            } else if meta.is_dir() {
                let dir = out.directory(rel, &path, format)?;
                out.result.output_directories.push(dir);
            } else if meta.is_file() {
                let file = out.output_file(rel, &path, &meta)?;
                out.result.output_files.push(file);
            } else {
                return Err(OutputError::Invalid(format!(
                    "output {rel:?} is not a file, directory or symlink"
                )));
            }
        }
        return Ok(out);
    }
    for rel in &command.output_files {
        let Some((path, meta)) = lstat(rel)? else {
            continue;
        };
        if meta.file_type().is_symlink() {
            if path.is_dir() {
                return Err(OutputError::Invalid(format!(
                    "output file {rel:?} is a symlink to a directory"
                )));
            }
            let symlink = output_symlink(&path, rel)?;
            out.result.output_file_symlinks.push(symlink);
        } else if meta.is_file() {
            let file = out.output_file(rel, &path, &meta)?;
            out.result.output_files.push(file);
        } else {
            return Err(OutputError::Invalid(format!(
                "output file {rel:?} is not a regular file"
            )));
        }
    }
    for rel in &command.output_directories {
        let Some((path, meta)) = lstat(rel)? else {
            continue;
        };
        if meta.file_type().is_symlink() {
            if !path.is_dir() {
                return Err(OutputError::Invalid(format!(
                    "output directory {rel:?} is a symlink to a non-directory"
                )));
            }
            let symlink = output_symlink(&path, rel)?;
            out.result.output_directory_symlinks.push(symlink);
        } else if meta.is_dir() {
            let dir = out.directory(rel, &path, format)?;
            out.result.output_directories.push(dir);
        } else {
            return Err(OutputError::Invalid(format!(
                "output directory {rel:?} is not a directory"
            )));
        }
    }
    Ok(out)
}

/// Creates the parent directories of every declared output, as REAPI requires.
pub fn create_parents(working_dir: &Path, command: &Command) -> std::io::Result<()> {
    let outputs = if command.output_paths.is_empty() {
        command
            .output_files
            .iter()
            .chain(&command.output_directories)
            .collect::<Vec<_>>()
    } else {
        command.output_paths.iter().collect()
    };
    for rel in outputs {
        if let Some(parent) = Path::new(rel).parent() {
            fs::create_dir_all(working_dir.join(parent))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_files_trees_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let wd = dir.path();
        fs::create_dir_all(wd.join("out/sub")).unwrap();
        fs::write(wd.join("out/a.txt"), b"a").unwrap();
        fs::write(wd.join("out/sub/b.txt"), b"b").unwrap();
        fs::write(wd.join("tool"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(wd.join("tool"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("tool", wd.join("link")).unwrap();
        let command = Command {
            arguments: vec!["x".into()],
            output_paths: vec!["link".into(), "missing".into(), "out".into(), "tool".into()],
            ..Default::default()
        };
        let got = collect(wd, &command).unwrap();
        assert_eq!(got.result.output_files.len(), 1);
        assert!(got.result.output_files[0].is_executable);
        assert_eq!(got.result.output_symlinks[0].target, "tool");
        let tree_digest =
            Digest::from_proto(got.result.output_directories[0].tree_digest.as_ref()).unwrap();
        let tree_bytes = got
            .blobs
            .iter()
            .find_map(|(d, s)| match s {
                Source::Memory(b) if *d == tree_digest => Some(b.clone()),
                _ => None,
            })
            .unwrap();
        let tree = Tree::decode(tree_bytes).unwrap();
        assert_eq!(tree.root.as_ref().unwrap().files[0].name, "a.txt");
        assert_eq!(tree.children.len(), 1);
        assert_eq!(tree.children[0].files[0].name, "b.txt");
    }

    #[test]
    fn absolute_symlinks_and_wrong_kinds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let wd = dir.path();
        std::os::unix::fs::symlink("/etc/passwd", wd.join("abs")).unwrap();
        fs::create_dir(wd.join("d")).unwrap();
        let abs = Command {
            output_paths: vec!["abs".into()],
            ..Default::default()
        };
        assert!(matches!(collect(wd, &abs), Err(OutputError::Invalid(_))));
        let file_is_dir = Command {
            output_files: vec!["d".into()],
            ..Default::default()
        };
        assert!(matches!(
            collect(wd, &file_is_dir),
            Err(OutputError::Invalid(_))
        ));
    }
}
