//! Collecting an action's outputs as REAPI describes them: files, directories (as
//! Tree messages), and symlinks, for `output_paths` (REAPI 2.1+) and for the older
//! `output_files`/`output_directories`.
//!
//! The action has ended, but everything in its input root is its work: every path
//! is opened beneath the root through directory descriptors, and a symlink anywhere
//! on the way is never followed (an output that is a symlink is reported as one; an
//! output beneath a symlink is not there). Each output file is taken over through the
//! descriptor it was opened as: given to the worker and made read-only, hashed, and
//! hard-linked into the worker's staging directory, which no action can reach, so
//! that what is uploaded and later cached is exactly what was hashed.

// REAPI 2.0 clients such as Bazel 4 use the fields deprecated in 2.1.
#![allow(deprecated)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use paddock_client::Source;
use paddock_config::ActionLimits;
use paddock_fs::{Dir, Found, Stat};
use paddock_reapi::proto::re::{
    command::OutputDirectoryFormat, ActionResult, Command, Directory, DirectoryNode, FileNode,
    OutputDirectory, OutputFile, OutputSymlink, SymlinkNode, Tree,
};
use paddock_reapi::{validate, Digest, DigestHasher};
use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The action's fault: the outputs break REAPI's rules (a file where a directory
    /// was declared, an absolute symlink). FAILED_PRECONDITION for the client.
    #[error("{0}")]
    Invalid(String),
    /// The action's fault: its outputs are larger than the worker's limits.
    #[error("{0}")]
    Limit(String),
    /// This worker failed to read or stage them.
    #[error("{0}")]
    Worker(String),
}

/// Where collected files go: a directory of the worker's own, outside every input
/// root, named by the worker.
pub struct Staging {
    pub dir: Dir,
    pub path: PathBuf,
    /// Who staged files belong to: the worker itself.
    pub owner: (u32, u32),
}

/// The outputs, ready to upload.
#[derive(Default)]
pub struct Collected {
    /// The output fields of the ActionResult.
    pub result: ActionResult,
    /// Every blob the result references, and where its bytes are.
    pub blobs: Vec<(Digest, Source)>,
    /// Output files staged for the worker's cache: digest, executable, staged name.
    pub files: Vec<(Digest, bool, OsString)>,
}

/// The walk's state: what is staged and what the limits still allow.
struct Collector<'a> {
    out: Collected,
    staging: &'a Staging,
    limits: &'a ActionLimits,
    bytes: u64,
    entries: u64,
}

fn worker_error(what: &str, e: std::io::Error) -> OutputError {
    OutputError::Worker(format!("reading output {what}: {e}"))
}

/// Hashes a file, streaming.
pub fn hash(mut file: &File, what: &str) -> Result<Digest, OutputError> {
    let mut hasher = DigestHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| worker_error(what, e))?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

/// Hashes a file the worker itself wrote (stdout, stderr).
pub fn hash_file(path: &Path) -> Result<Digest, OutputError> {
    let what = path.display().to_string();
    let file = File::open(path).map_err(|e| worker_error(&what, e))?;
    hash(&file, &what)
}

fn join(at: &str, name: &str) -> String {
    match at {
        "" => name.to_owned(),
        _ => format!("{at}/{name}"),
    }
}

impl Collector<'_> {
    fn count(&mut self, rel: &str) -> Result<(), OutputError> {
        self.entries += 1;
        if self.entries > self.limits.max_output_entries {
            return Err(OutputError::Limit(format!(
                "the outputs hold more than {} files, directories and symlinks (at {rel:?}; worker.limits.max_output_entries)",
                self.limits.max_output_entries
            )));
        }
        Ok(())
    }

    /// Takes over one output file: the worker's, read-only, hashed, staged.
    fn file(&mut self, rel: &str, file: File, stat: Stat) -> Result<(Digest, bool), OutputError> {
        self.count(rel)?;
        self.bytes = self.bytes.saturating_add(stat.size);
        if self.bytes > self.limits.max_output_bytes.bytes() {
            return Err(OutputError::Limit(format!(
                "the output files add up to more than {} (at {rel:?}; worker.limits.max_output_bytes)",
                self.limits.max_output_bytes
            )));
        }
        let executable = stat.executable();
        let (uid, gid) = self.staging.owner;
        paddock_fs::chown(&file, uid, gid).map_err(|e| worker_error(rel, e))?;
        paddock_fs::chmod(&file, if executable { 0o555 } else { 0o444 })
            .map_err(|e| worker_error(rel, e))?;
        let digest = hash(&file, rel)?;
        let name = OsString::from(self.out.files.len().to_string());
        if let Err(e) = self.staging.dir.link_file(&file, &name) {
            // Without the privilege to link a descriptor (a worker that is not root,
            // with the host runner), copy what was hashed.
            tracing::debug!(error = %e, "staging an output by copy");
            self.copy(&file, &name, executable, rel)?;
        }
        self.out
            .blobs
            .push((digest, Source::File(self.staging.path.join(&name))));
        self.out.files.push((digest, executable, name));
        Ok((digest, executable))
    }

    fn copy(
        &self,
        file: &File,
        name: &OsStr,
        executable: bool,
        rel: &str,
    ) -> Result<(), OutputError> {
        use std::io::Seek;
        let mode = if executable { 0o555 } else { 0o444 };
        let mut copy = self
            .staging
            .dir
            .create_file(name, mode)
            .map_err(|e| worker_error(rel, e))?;
        let mut source = file;
        source
            .seek(std::io::SeekFrom::Start(0))
            .map_err(|e| worker_error(rel, e))?;
        std::io::copy(&mut source, &mut copy).map_err(|e| worker_error(rel, e))?;
        Ok(())
    }

    fn message<M: Message>(&mut self, message: &M) -> Digest {
        let (digest, bytes) = Digest::of_message(message);
        self.out
            .blobs
            .push((digest, Source::Memory(Bytes::from(bytes))));
        digest
    }

    /// Encodes the output directory `dir` as a Tree (and, if asked, as separate
    /// Directory blobs).
    fn directory(
        &mut self,
        rel: &str,
        dir: &Dir,
        format: OutputDirectoryFormat,
    ) -> Result<OutputDirectory, OutputError> {
        let mut all = HashMap::new();
        let root = self.walk(dir, rel, 0, &mut all)?;
        // Children in breadth-first order from the root, each distinct one once, so
        // parents come before children (`is_topologically_sorted`).
        let mut children = Vec::new();
        let mut seen = HashSet::new();
        let mut queue: VecDeque<&Directory> = VecDeque::from([&root]);
        while let Some(dir) = queue.pop_front() {
            for sub in &dir.directories {
                let digest = Digest::from_proto(sub.digest.as_ref()).expect("made here");
                if seen.insert(digest) {
                    let child = &all[&digest];
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

    /// Builds the Directory for `dir`, recording every descendant in `all`.
    fn walk(
        &mut self,
        dir: &Dir,
        rel: &str,
        depth: u32,
        all: &mut HashMap<Digest, Directory>,
    ) -> Result<Directory, OutputError> {
        if depth > self.limits.max_tree_depth {
            return Err(OutputError::Limit(format!(
                "the output directory nests more than {} deep at {rel:?} (worker.limits.max_tree_depth)",
                self.limits.max_tree_depth
            )));
        }
        let mut out = Directory::default();
        for name in dir.names().map_err(|e| worker_error(rel, e))? {
            let child_rel = match name.to_str() {
                Some(n) => join(rel, n),
                None => {
                    return Err(OutputError::Invalid(format!(
                        "output {:?} has a name that is not UTF-8",
                        Path::new(rel).join(&name)
                    )))
                }
            };
            let text = child_rel.rsplit('/').next().unwrap_or_default().to_owned();
            match dir.entry(&name).map_err(|e| worker_error(&child_rel, e))? {
                None => {} // gone since it was listed
                Some(Found::Symlink(target)) => {
                    self.count(&child_rel)?;
                    out.symlinks.push(SymlinkNode {
                        name: text,
                        target: symlink_target(&child_rel, target)?,
                        ..Default::default()
                    });
                }
                Some(Found::Dir(sub)) => {
                    self.count(&child_rel)?;
                    let sub = self.walk(&sub, &child_rel, depth + 1, all)?;
                    let (digest, _) = Digest::of_message(&sub);
                    all.insert(digest, sub);
                    out.directories.push(DirectoryNode {
                        name: text,
                        digest: Some(digest.to_proto()),
                    });
                }
                Some(Found::File(file, stat)) => {
                    let (digest, is_executable) = self.file(&child_rel, file, stat)?;
                    out.files.push(FileNode {
                        name: text,
                        digest: Some(digest.to_proto()),
                        is_executable,
                        ..Default::default()
                    });
                }
                Some(Found::Other) => {
                    tracing::warn!(path = %child_rel, "skipping an output that is neither file, directory nor symlink");
                }
            }
        }
        Ok(out)
    }
}

/// A symlink's target among the outputs; absolute targets are refused, as this
/// server advertises `SymlinkAbsolutePathStrategy.DISALLOWED`.
fn symlink_target(rel: &str, target: OsString) -> Result<String, OutputError> {
    let target = target.into_string().map_err(|_| {
        OutputError::Invalid(format!(
            "output symlink {rel:?} has a target that is not UTF-8"
        ))
    })?;
    validate::output_symlink_target(rel, &target).map_err(OutputError::Invalid)?;
    Ok(target)
}

/// Where a symlink at `rel` (relative to the working directory) leads, by its text:
/// `None` when the text climbs above the working directory.
fn lexical_target(rel: &str, target: &str) -> Option<PathBuf> {
    let mut parts: Vec<&str> = rel.split('/').collect();
    parts.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            name => parts.push(name),
        }
    }
    Some(parts.iter().collect())
}

/// Collects the outputs `command` declares, relative to its working directory in
/// `root` (the action's input root), staging files in `staging`.
pub fn collect(
    root: &Dir,
    command: &Command,
    staging: &Staging,
    limits: &ActionLimits,
) -> Result<Collected, OutputError> {
    let mut c = Collector {
        out: Collected::default(),
        staging,
        limits,
        bytes: 0,
        entries: 0,
    };
    // A working directory that was replaced by a symlink has no outputs.
    let working_dir = match root.open_dir(Path::new(&command.working_directory)) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || paddock_fs::is_detour(&e) => {
            return Ok(c.out)
        }
        Err(e) => return Err(worker_error("the working directory", e)),
    };
    let format = OutputDirectoryFormat::try_from(command.output_directory_format)
        .unwrap_or(OutputDirectoryFormat::TreeOnly);
    let lookup = |rel: &str| {
        working_dir
            .lookup(Path::new(rel))
            .map_err(|e| worker_error(rel, e))
    };
    if !command.output_paths.is_empty() {
        for rel in &command.output_paths {
            match lookup(rel)? {
                None => {}
                Some(Found::Symlink(target)) => {
                    c.count(rel)?;
                    let target = symlink_target(rel, target)?;
                    c.out
                        .result
                        .output_symlinks
                        .push(output_symlink(rel, target));
                }
                Some(Found::Dir(dir)) => {
                    let dir = c.directory(rel, &dir, format)?;
                    c.out.result.output_directories.push(dir);
                }
                Some(Found::File(file, stat)) => {
                    let file = c.output_file(rel, file, stat)?;
                    c.out.result.output_files.push(file);
                }
                Some(Found::Other) => {
                    return Err(OutputError::Invalid(format!(
                        "output {rel:?} is not a file, directory or symlink"
                    )))
                }
            }
        }
        return Ok(c.out);
    }
    // Whether a symlink among the outputs leads to a directory, as far as its text
    // says (a symlink further on is not followed: then it is not known to).
    let leads_to_directory = |rel: &str, target: &str| -> Result<bool, OutputError> {
        let Some(to) = lexical_target(rel, target) else {
            return Ok(false);
        };
        Ok(matches!(
            working_dir.lookup(&to).map_err(|e| worker_error(rel, e))?,
            Some(Found::Dir(_))
        ))
    };
    for rel in &command.output_files {
        match lookup(rel)? {
            None => {}
            Some(Found::Symlink(target)) => {
                let target = symlink_target(rel, target)?;
                if leads_to_directory(rel, &target)? {
                    return Err(OutputError::Invalid(format!(
                        "output file {rel:?} is a symlink to a directory"
                    )));
                }
                c.count(rel)?;
                c.out
                    .result
                    .output_file_symlinks
                    .push(output_symlink(rel, target));
            }
            Some(Found::File(file, stat)) => {
                let file = c.output_file(rel, file, stat)?;
                c.out.result.output_files.push(file);
            }
            Some(_) => {
                return Err(OutputError::Invalid(format!(
                    "output file {rel:?} is not a regular file"
                )))
            }
        }
    }
    for rel in &command.output_directories {
        match lookup(rel)? {
            None => {}
            Some(Found::Symlink(target)) => {
                let target = symlink_target(rel, target)?;
                if !leads_to_directory(rel, &target)? {
                    return Err(OutputError::Invalid(format!(
                        "output directory {rel:?} is a symlink to something other than a directory in the outputs"
                    )));
                }
                c.count(rel)?;
                c.out
                    .result
                    .output_directory_symlinks
                    .push(output_symlink(rel, target));
            }
            Some(Found::Dir(dir)) => {
                let dir = c.directory(rel, &dir, format)?;
                c.out.result.output_directories.push(dir);
            }
            Some(_) => {
                return Err(OutputError::Invalid(format!(
                    "output directory {rel:?} is not a directory"
                )))
            }
        }
    }
    Ok(c.out)
}

fn output_symlink(rel: &str, target: String) -> OutputSymlink {
    OutputSymlink {
        path: rel.to_owned(),
        target,
        ..Default::default()
    }
}

impl Collector<'_> {
    /// A declared output file at `rel`.
    fn output_file(
        &mut self,
        rel: &str,
        file: File,
        stat: Stat,
    ) -> Result<OutputFile, OutputError> {
        let (digest, is_executable) = self.file(rel, file, stat)?;
        Ok(OutputFile {
            path: rel.to_owned(),
            digest: Some(digest.to_proto()),
            is_executable,
            ..Default::default()
        })
    }
}

/// The paths the command declares as outputs, in either REAPI version's fields.
pub fn declared(command: &Command) -> Vec<&String> {
    if command.output_paths.is_empty() {
        command
            .output_files
            .iter()
            .chain(&command.output_directories)
            .collect()
    } else {
        command.output_paths.iter().collect()
    }
}

/// Creates the parent directories of every declared output beneath the working
/// directory, as REAPI requires, owned by `owner`. A parent that the input root
/// holds as a symlink or a file is the action's fault.
pub fn create_parents(
    working_dir: &Dir,
    command: &Command,
    owner: Option<(u32, u32)>,
) -> Result<(), OutputError> {
    for rel in declared(command) {
        let Some(parent) = Path::new(rel).parent() else {
            continue;
        };
        if let Err(e) = working_dir.create_dirs(parent, 0o755, owner) {
            return Err(match paddock_fs::is_detour(&e) {
                true => OutputError::Invalid(format!(
                    "the parent of output {rel:?} is a symlink or a file in the input root"
                )),
                false => OutputError::Worker(format!("creating the parent of output {rel:?}: {e}")),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn staging(dir: &Path) -> Staging {
        let path = dir.join("staging");
        fs::create_dir(&path).unwrap();
        // SAFETY: geteuid and getegid cannot fail.
        let owner = unsafe { (libc::geteuid(), libc::getegid()) };
        Staging {
            dir: Dir::open(&path).unwrap(),
            path,
            owner,
        }
    }

    #[test]
    fn collects_files_trees_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let wd = dir.path().join("root");
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
        let staging = staging(dir.path());
        let got = collect(
            &Dir::open(&wd).unwrap(),
            &command,
            &staging,
            &ActionLimits::default(),
        )
        .unwrap();
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
        // Output files were taken over: read-only, and linked into the staging area.
        let tool = fs::metadata(wd.join("tool")).unwrap();
        assert_eq!(tool.mode() & 0o777, 0o555);
        assert_eq!(tool.nlink(), 2);
        assert_eq!(got.files.len(), 3);
    }

    #[test]
    fn nothing_beneath_a_symlink_is_collected() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret"), b"secret").unwrap();
        let wd = dir.path().join("root");
        fs::create_dir_all(&wd).unwrap();
        std::os::unix::fs::symlink(&outside, wd.join("h")).unwrap();
        std::os::unix::fs::symlink("../outside", wd.join("rel")).unwrap();
        let staging = staging(dir.path());
        let command = Command {
            output_files: vec!["h/secret".into(), "rel/secret".into()],
            output_directories: vec!["h".into()],
            ..Default::default()
        };
        let got = collect(
            &Dir::open(&wd).unwrap(),
            &command,
            &staging,
            &ActionLimits::default(),
        );
        // `h` is an absolute symlink: refused; nothing was read through it.
        assert!(matches!(got, Err(OutputError::Invalid(_))));
        let command = Command {
            output_files: vec!["h/secret".into(), "rel/secret".into()],
            ..Default::default()
        };
        let got = collect(
            &Dir::open(&wd).unwrap(),
            &command,
            &staging,
            &ActionLimits::default(),
        )
        .unwrap();
        assert!(got.result.output_files.is_empty());
        let secret = fs::metadata(outside.join("secret")).unwrap();
        assert_eq!(secret.nlink(), 1);
    }

    #[test]
    fn absolute_symlinks_wrong_kinds_and_limits_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let wd = dir.path().join("root");
        fs::create_dir_all(wd.join("d")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", wd.join("abs")).unwrap();
        fs::write(wd.join("big"), vec![0u8; 100]).unwrap();
        let staging = staging(dir.path());
        let root = Dir::open(&wd).unwrap();
        let limits = ActionLimits::default();
        let abs = Command {
            output_paths: vec!["abs".into()],
            ..Default::default()
        };
        assert!(matches!(
            collect(&root, &abs, &staging, &limits),
            Err(OutputError::Invalid(_))
        ));
        let file_is_dir = Command {
            output_files: vec!["d".into()],
            ..Default::default()
        };
        assert!(matches!(
            collect(&root, &file_is_dir, &staging, &limits),
            Err(OutputError::Invalid(_))
        ));
        let small = ActionLimits {
            max_output_bytes: "10B".parse().unwrap(),
            ..Default::default()
        };
        let big = Command {
            output_paths: vec!["big".into()],
            ..Default::default()
        };
        assert!(matches!(
            collect(&root, &big, &staging, &small),
            Err(OutputError::Limit(_))
        ));
    }
}
