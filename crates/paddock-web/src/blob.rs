//! Reading the CAS for pages: messages decoded within a size bound, what kind of
//! REAPI message a blob looks like, and the differences between two input trees
//! (walked together, never descending where both sides hold the same directory).

use std::collections::BTreeMap;

use bytes::Bytes;
use paddock_cas::{read_all, BlobStore, StoreError};
use paddock_reapi::proto::re::{Action, ActionResult, Command, Directory, Tree};
use paddock_reapi::{validate, Digest};
use prost::Message;

/// The largest blob a page decodes or shows in full.
pub const MAX_SHOWN: u64 = 4 << 20;
/// The largest blob offered as a download through the pages (bigger ones are for
/// `paddock cas get`).
pub const MAX_DOWNLOAD: u64 = 64 << 20;
/// The most differences between two input trees listed.
pub const MAX_CHANGES: usize = 1000;
/// The most directories a comparison of two input trees reads.
const MAX_DIRECTORIES_COMPARED: usize = 20_000;

/// Why a blob could not be shown.
#[derive(Debug)]
pub enum BlobError {
    Missing(Digest),
    TooLarge {
        digest: Digest,
        limit: u64,
    },
    Undecodable {
        digest: Digest,
        kind: &'static str,
    },
    Store(StoreError),
    /// A comparison that would read more than it may.
    TooBig(String),
}

impl std::fmt::Display for BlobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobError::Missing(d) => write!(f, "blob {d} is not in the CAS (any more)"),
            BlobError::TooLarge { digest, limit } => {
                write!(f, "blob {digest} is larger than the {limit} bytes a page shows; use `paddock cas get {digest}`")
            }
            BlobError::Undecodable { digest, kind } => {
                write!(f, "blob {digest} is not a {kind}")
            }
            BlobError::Store(e) => write!(f, "the CAS failed: {e}"),
            BlobError::TooBig(what) => write!(f, "{what}"),
        }
    }
}

/// A blob's bytes, if it is at most `limit` long.
pub async fn bytes(cas: &dyn BlobStore, digest: &Digest, limit: u64) -> Result<Bytes, BlobError> {
    if digest.size() > limit {
        return Err(BlobError::TooLarge {
            digest: *digest,
            limit,
        });
    }
    read_all(cas, digest)
        .await
        .map_err(BlobError::Store)?
        .ok_or(BlobError::Missing(*digest))
}

/// A blob decoded as `M`.
pub async fn message<M: Message + Default>(
    cas: &dyn BlobStore,
    digest: &Digest,
    kind: &'static str,
) -> Result<M, BlobError> {
    message_within(cas, digest, kind, MAX_SHOWN).await
}

/// A blob of at most `limit` bytes decoded as `M`.
pub async fn message_within<M: Message + Default>(
    cas: &dyn BlobStore,
    digest: &Digest,
    kind: &'static str,
    limit: u64,
) -> Result<M, BlobError> {
    let bytes = bytes(cas, digest, limit).await?;
    M::decode(bytes).map_err(|_| BlobError::Undecodable {
        digest: *digest,
        kind,
    })
}

/// The kinds of REAPI message a page decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Action,
    Command,
    Directory,
    Tree,
    ActionResult,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Action,
        Kind::Command,
        Kind::Directory,
        Kind::Tree,
        Kind::ActionResult,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Action => "Action",
            Kind::Command => "Command",
            Kind::Directory => "Directory",
            Kind::Tree => "Tree",
            Kind::ActionResult => "ActionResult",
        }
    }

    pub fn parse(word: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(word))
    }
}

fn digest_ok(d: Option<&paddock_reapi::proto::re::Digest>) -> bool {
    Digest::from_proto(d).is_ok()
}

/// What a blob most likely is: the first kind it decodes as and that passes that
/// kind's checks. Protobuf decodes almost anything as something, so the checks are
/// what tell.
pub fn guess(bytes: &[u8]) -> Option<Kind> {
    if bytes.is_empty() {
        return None;
    }
    if let Ok(action) = Action::decode(bytes) {
        if digest_ok(action.command_digest.as_ref()) && digest_ok(action.input_root_digest.as_ref())
        {
            return Some(Kind::Action);
        }
    }
    if let Ok(tree) = Tree::decode(bytes) {
        if tree
            .root
            .as_ref()
            .is_some_and(|root| validate::directory(root, "").is_ok())
            && tree
                .children
                .iter()
                .all(|d| validate::directory(d, "").is_ok())
            && tree.root.as_ref().is_some_and(|r| {
                !(r.files.is_empty() && r.directories.is_empty() && r.symlinks.is_empty())
            })
        {
            return Some(Kind::Tree);
        }
    }
    if let Ok(directory) = Directory::decode(bytes) {
        let some = !(directory.files.is_empty()
            && directory.directories.is_empty()
            && directory.symlinks.is_empty());
        if some && validate::directory(&directory, "").is_ok() {
            return Some(Kind::Directory);
        }
    }
    if let Ok(command) = Command::decode(bytes) {
        // Arguments are text: the bytes of nested messages are not.
        let printable = |s: &String| !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t');
        if !command.arguments.is_empty()
            && command.arguments.iter().all(printable)
            && validate::command(&command).is_ok()
        {
            return Some(Kind::Command);
        }
    }
    if let Ok(result) = ActionResult::decode(bytes) {
        if result.execution_metadata.is_some() && validate::action_result(&result).is_ok() {
            return Some(Kind::ActionResult);
        }
    }
    None
}

/// One difference between two input trees, by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputChange {
    Added(String),
    Removed(String),
    /// The file's contents (or executable bit, or link target) differ.
    Changed(String),
}

impl InputChange {
    pub fn path(&self) -> &str {
        match self {
            InputChange::Added(p) | InputChange::Removed(p) | InputChange::Changed(p) => p,
        }
    }
}

/// An entry of a directory, as far as comparing goes.
#[derive(PartialEq, Eq)]
enum Entry {
    File(Digest, bool),
    Link(String),
    Dir(Digest),
}

fn entries(directory: &Directory) -> BTreeMap<String, Entry> {
    let mut entries = BTreeMap::new();
    for f in &directory.files {
        if let Ok(d) = Digest::from_proto(f.digest.as_ref()) {
            entries.insert(f.name.clone(), Entry::File(d, f.is_executable));
        }
    }
    for l in &directory.symlinks {
        entries.insert(l.name.clone(), Entry::Link(l.target.clone()));
    }
    for d in &directory.directories {
        if let Ok(digest) = Digest::from_proto(d.digest.as_ref()) {
            entries.insert(d.name.clone(), Entry::Dir(digest));
        }
    }
    entries
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}/{name}")
    }
}

/// Every path under a directory (for a subtree one side lacks), within the budget.
async fn all_paths(
    cas: &dyn BlobStore,
    root: Digest,
    prefix: String,
    budget: &mut usize,
    out: &mut Vec<String>,
) -> Result<(), BlobError> {
    let mut pending = vec![(root, prefix)];
    while let Some((digest, prefix)) = pending.pop() {
        if out.len() >= MAX_CHANGES {
            return Ok(());
        }
        *budget = budget.checked_sub(1).ok_or_else(too_big)?;
        let directory: Directory = message(cas, &digest, "Directory").await?;
        for (name, entry) in entries(&directory) {
            match entry {
                Entry::Dir(d) => pending.push((d, join(&prefix, &name))),
                _ => out.push(join(&prefix, &name)),
            }
        }
    }
    Ok(())
}

fn too_big() -> BlobError {
    BlobError::TooBig(format!(
        "the input trees differ in more than {MAX_DIRECTORIES_COMPARED} directories; not compared"
    ))
}

/// The files and links that differ between two input roots, by path, in order.
pub async fn diff_trees(
    cas: &dyn BlobStore,
    old: Digest,
    new: Digest,
) -> Result<Vec<InputChange>, BlobError> {
    let mut changes = Vec::new();
    let mut budget = MAX_DIRECTORIES_COMPARED;
    let mut pending = vec![(old, new, String::new())];
    while let Some((old, new, prefix)) = pending.pop() {
        if old == new {
            continue;
        }
        if changes.len() >= MAX_CHANGES {
            break;
        }
        budget = budget.checked_sub(2).ok_or_else(too_big)?;
        let before = entries(&message::<Directory>(cas, &old, "Directory").await?);
        let after = entries(&message::<Directory>(cas, &new, "Directory").await?);
        for (name, was) in &before {
            let path = join(&prefix, name);
            match (was, after.get(name)) {
                (Entry::Dir(a), Some(Entry::Dir(b))) => pending.push((*a, *b, path)),
                (Entry::Dir(a), _) => {
                    let mut gone = Vec::new();
                    all_paths(cas, *a, path.clone(), &mut budget, &mut gone).await?;
                    changes.extend(gone.into_iter().map(InputChange::Removed));
                    if after.contains_key(name) {
                        changes.push(InputChange::Added(path));
                    }
                }
                (_, Some(Entry::Dir(b))) => {
                    changes.push(InputChange::Removed(path.clone()));
                    let mut came = Vec::new();
                    all_paths(cas, *b, path, &mut budget, &mut came).await?;
                    changes.extend(came.into_iter().map(InputChange::Added));
                }
                (was, Some(is)) if was != is => changes.push(InputChange::Changed(path)),
                (_, Some(_)) => {}
                (_, None) => changes.push(InputChange::Removed(path)),
            }
        }
        for (name, is) in &after {
            if before.contains_key(name) {
                continue;
            }
            let path = join(&prefix, name);
            match is {
                Entry::Dir(b) => {
                    let mut came = Vec::new();
                    all_paths(cas, *b, path, &mut budget, &mut came).await?;
                    changes.extend(came.into_iter().map(InputChange::Added));
                }
                _ => changes.push(InputChange::Added(path)),
            }
        }
    }
    changes.sort_by(|a, b| a.path().cmp(b.path()));
    changes.truncate(MAX_CHANGES);
    Ok(changes)
}

/// The most entries a tree archive holds.
const MAX_ARCHIVE_ENTRIES: usize = 100_000;

/// One 512-byte ustar header.
fn tar_header(path: &str, kind: u8, mode: u32, size: u64, link: &str) -> Result<[u8; 512], String> {
    let mut header = [0u8; 512];
    // Paths longer than the name field go into the prefix field, split at a `/`.
    let (prefix, name) = if path.len() <= 100 {
        ("", path)
    } else {
        let split = path[..path.len().min(156)]
            .rfind('/')
            .filter(|&at| at <= 155 && path.len() - at - 1 <= 100)
            .ok_or_else(|| format!("{path:?} is too long for a tar archive"))?;
        (&path[..split], &path[split + 1..])
    };
    if link.len() > 100 {
        return Err(format!(
            "the target of {path:?} is too long for a tar archive"
        ));
    }
    let put = |header: &mut [u8; 512], at: usize, value: &[u8]| {
        header[at..at + value.len()].copy_from_slice(value);
    };
    put(&mut header, 0, name.as_bytes());
    put(&mut header, 100, format!("{mode:07o}\0").as_bytes());
    put(&mut header, 108, b"0000000\0");
    put(&mut header, 116, b"0000000\0");
    put(&mut header, 124, format!("{size:011o}\0").as_bytes());
    put(&mut header, 136, b"00000000000\0");
    put(&mut header, 148, b"        ");
    header[156] = kind;
    put(&mut header, 157, link.as_bytes());
    put(&mut header, 257, b"ustar\0");
    put(&mut header, 263, b"00");
    put(&mut header, 345, prefix.as_bytes());
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    put(&mut header, 148, format!("{sum:06o}\0 ").as_bytes());
    Ok(header)
}

/// The tree under a Directory as a tar archive (ustar): directories, files with
/// their executable bit, and symlinks, all under `top/`; at most `limit` bytes of
/// file contents and 100,000 entries.
pub async fn tree_archive(
    cas: &dyn BlobStore,
    root: Digest,
    top: &str,
    limit: u64,
) -> Result<Bytes, BlobError> {
    let mut out = Vec::new();
    let mut contents: u64 = 0;
    let mut entries = 0usize;
    let mut pending = vec![(root, top.to_owned())];
    let too_big = |what: String| BlobError::TooBig(what);
    while let Some((digest, prefix)) = pending.pop() {
        let directory: Directory = message(cas, &digest, "Directory").await?;
        // Names must be plain and unique, so that no entry of the archive can lead
        // through a symlink or out of `top` when it is unpacked.
        validate::directory(&directory, &prefix)
            .map_err(|e| too_big(format!("not archived: {e}")))?;
        entries +=
            1 + directory.files.len() + directory.directories.len() + directory.symlinks.len();
        if entries > MAX_ARCHIVE_ENTRIES {
            return Err(too_big(format!(
                "the tree holds more than {MAX_ARCHIVE_ENTRIES} entries; use `paddock cas get`"
            )));
        }
        out.extend_from_slice(
            &tar_header(&format!("{prefix}/"), b'5', 0o755, 0, "").map_err(too_big)?,
        );
        for file in &directory.files {
            let Ok(blob) = Digest::from_proto(file.digest.as_ref()) else {
                continue;
            };
            contents += blob.size();
            if contents > limit {
                return Err(too_big(format!(
                    "the tree's files hold more than the {limit} bytes an archive may; use `paddock cas get`"
                )));
            }
            let mode = if file.is_executable { 0o755 } else { 0o644 };
            let path = join(&prefix, &file.name);
            out.extend_from_slice(
                &tar_header(&path, b'0', mode, blob.size(), "").map_err(too_big)?,
            );
            let data = bytes(cas, &blob, limit).await?;
            out.extend_from_slice(&data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        for link in &directory.symlinks {
            let path = join(&prefix, &link.name);
            out.extend_from_slice(
                &tar_header(&path, b'2', 0o777, 0, &link.target).map_err(too_big)?,
            );
        }
        for child in &directory.directories {
            if let Ok(d) = Digest::from_proto(child.digest.as_ref()) {
                pending.push((d, join(&prefix, &child.name)));
            }
        }
    }
    out.resize(out.len() + 1024, 0);
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use paddock_cas::MemoryStore;
    use paddock_reapi::proto::re::{DirectoryNode, FileNode};

    async fn put(cas: &MemoryStore, message: &impl Message) -> Digest {
        let (digest, bytes) = Digest::of_message(message);
        cas.put(&digest, Bytes::from(bytes)).await.unwrap();
        digest
    }

    fn file(name: &str, contents: &[u8]) -> FileNode {
        FileNode {
            name: name.into(),
            digest: Some(Digest::of(contents).to_proto()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_changed_file_deep_in_the_tree_is_named_by_its_path() {
        let cas = MemoryStore::new();
        let lib_a = put(
            &cas,
            &Directory {
                files: vec![file("x.c", b"1"), file("y.c", b"2")],
                ..Default::default()
            },
        )
        .await;
        let lib_b = put(
            &cas,
            &Directory {
                files: vec![file("x.c", b"1"), file("y.c", b"3")],
                ..Default::default()
            },
        )
        .await;
        let same = put(
            &cas,
            &Directory {
                files: vec![file("z.h", b"z")],
                ..Default::default()
            },
        )
        .await;
        let root = |lib: Digest, extra: Option<FileNode>| Directory {
            files: extra.into_iter().collect(),
            directories: vec![
                DirectoryNode {
                    name: "inc".into(),
                    digest: Some(same.to_proto()),
                },
                DirectoryNode {
                    name: "lib".into(),
                    digest: Some(lib.to_proto()),
                },
            ],
            ..Default::default()
        };
        let old = put(&cas, &root(lib_a, None)).await;
        let new = put(&cas, &root(lib_b, Some(file("BUILD", b"b")))).await;
        let changes = diff_trees(&cas, old, new).await.unwrap();
        assert_eq!(
            changes,
            vec![
                InputChange::Added("BUILD".into()),
                InputChange::Changed("lib/y.c".into()),
            ]
        );
        assert_eq!(
            guess(
                &Directory {
                    files: vec![file("a", b"a")],
                    ..Default::default()
                }
                .encode_to_vec()
            ),
            Some(Kind::Directory)
        );
    }

    #[tokio::test]
    async fn a_tree_archive_is_a_tar_that_tar_reads() {
        let cas = MemoryStore::new();
        for contents in [&b"int main() {}\n"[..], b"#!/bin/sh\n"] {
            let digest = Digest::of(contents);
            cas.put(&digest, Bytes::copy_from_slice(contents))
                .await
                .unwrap();
        }
        let tools = Directory {
            files: vec![FileNode {
                is_executable: true,
                ..file("run.sh", b"#!/bin/sh\n")
            }],
            ..Default::default()
        };
        let tools = put(&cas, &tools).await;
        let root = Directory {
            files: vec![file("main.c", b"int main() {}\n")],
            directories: vec![DirectoryNode {
                name: "tools".into(),
                digest: Some(tools.to_proto()),
            }],
            symlinks: vec![paddock_reapi::proto::re::SymlinkNode {
                name: "link".into(),
                target: "main.c".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let root = put(&cas, &root).await;
        let archive = tree_archive(&cas, root, "input", 1 << 20).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        std::fs::write(&path, &archive).unwrap();
        let listed = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&path)
            .output()
            .unwrap();
        assert!(listed.status.success(), "{listed:?}");
        let listed = String::from_utf8_lossy(&listed.stdout);
        for expected in [
            "input/main.c",
            "input/tools/run.sh",
            "input/link -> main.c",
            "rwxr-xr-x",
        ] {
            assert!(listed.contains(expected), "{expected} in:\n{listed}");
        }
        let too_small = tree_archive(&cas, root, "input", 4).await;
        assert!(matches!(too_small, Err(BlobError::TooBig(_))));
    }
}
