//! Materialising an action's input root.
//!
//! First the Directory graph is fetched, each distinct digest once, level by level,
//! and checked: every Directory's structure, the depth, and the size the tree
//! expands to (shared subtrees counted at every place they appear) against the
//! worker's limits, all before anything is laid out. Then the tree is laid out
//! through directory descriptors: each directory created beneath its parent's
//! descriptor and handed to the action's identity, each file a hard link to the
//! worker's read-only cache, each symlink created as it is after its chain was
//! resolved through the graph. The whole of it stops at the action's timeout or at a
//! cancellation.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use paddock_client::Remote;
use paddock_config::ActionLimits;
use paddock_fs::Dir;
use paddock_reapi::proto::re::Directory;
use paddock_reapi::tree::InputTree;
use paddock_reapi::{validate, Digest};
use paddock_runner::Identity;
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::cache::{Entry, FetchError, FileCache};

/// How often (in directories) laying out checks for a cancellation.
const CHECK_EVERY: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Blobs the action names are not in the CAS (the scheduler checks the claim).
    #[error("inputs missing from the CAS")]
    Missing(Vec<Digest>),
    /// The action's fault: the tree is malformed (bad names, an escaping symlink
    /// chain, a blob that is not a Directory).
    #[error("{0}")]
    Invalid(String),
    /// The action's fault: the tree is larger than the worker's limits allow.
    #[error("{0}")]
    Limit(String),
    /// This worker failed (its disk, its cache).
    #[error("{0}")]
    Worker(String),
    /// The CAS could not be reached.
    #[error("{0}")]
    Infrastructure(String),
    /// The action's timeout passed, or it was cancelled.
    #[error("stopped")]
    Stopped,
}

impl From<FetchError> for InputError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Missing(m) => InputError::Missing(m),
            FetchError::Worker(w) => InputError::Worker(w),
            FetchError::Infrastructure(w) => InputError::Infrastructure(w),
        }
    }
}

fn worker(doing: &str, e: impl std::fmt::Display) -> InputError {
    InputError::Worker(format!("{doing}: {e}"))
}

/// Runs `work` unless `stop` fires first.
async fn unless_stopped<T>(
    stop: &CancellationToken,
    work: impl std::future::Future<Output = T>,
) -> Result<T, InputError> {
    tokio::select! {
        out = work => Ok(out),
        _ = stop.cancelled() => Err(InputError::Stopped),
    }
}

/// What a fetched tree holds.
struct Graph {
    directories: HashMap<Digest, Directory>,
    /// Every distinct (file, executable) the tree holds.
    files: Vec<Entry>,
}

/// Lays out the tree rooted at `root` as the directory `dest` (which must not exist
/// yet; its parent is the worker's own), owned by `identity` when one is given.
/// Returns the digests of the directories it laid out.
pub async fn materialize(
    remote: &Remote,
    cache: &Arc<FileCache>,
    root: Digest,
    dest: &Path,
    identity: Option<Identity>,
    limits: &ActionLimits,
    stop: &CancellationToken,
) -> Result<Vec<Digest>, InputError> {
    let started = std::time::Instant::now();
    let graph = fetch_graph(remote, cache, root, limits, stop).await?;
    let files = graph.files.clone();
    let fetched_graph = started.elapsed();
    unless_stopped(stop, cache.ensure(&files, remote)).await??;
    tracing::debug!(
        directories = graph.directories.len(),
        files = files.len(),
        graph_ms = fetched_graph.as_millis() as u64,
        files_ms = (started.elapsed() - fetched_graph).as_millis() as u64,
        "inputs fetched"
    );

    let directories: Vec<Digest> = graph.directories.keys().copied().collect();
    let graph = Arc::new(graph);
    let mut total = 0;
    let mut pending: Option<Vec<Relink>> = None;
    for _ in 0..3 {
        let (shared, graph, dest, halt) =
            (cache.clone(), graph.clone(), dest.to_owned(), stop.clone());
        let retry = pending.take();
        let (linked, evicted) = tokio::task::spawn_blocking(move || match retry {
            None => lay_out(&shared, &graph, root, &dest, identity, &halt),
            Some(links) => relink(&shared, links),
        })
        .await
        .map_err(|e| worker("laying out the input root", e))??;
        total += linked;
        if evicted.is_empty() {
            tracing::debug!(
                linked = total,
                total_ms = started.elapsed().as_millis() as u64,
                "inputs laid out"
            );
            return Ok(directories);
        }
        // A concurrent action's downloads evicted some entries before they were
        // linked: fetch those again and finish.
        let entries: Vec<Entry> = evicted.iter().map(|r| r.entry).collect();
        unless_stopped(stop, cache.ensure(&entries, remote)).await??;
        pending = Some(evicted);
    }
    Err(InputError::Worker(
        "the local cache is too small: inputs were evicted before they could be linked".into(),
    ))
}

/// Fetches every distinct Directory of the tree, checks each one and the tree's
/// expanded size against `limits`.
async fn fetch_graph(
    remote: &Remote,
    cache: &Arc<FileCache>,
    root: Digest,
    limits: &ActionLimits,
    stop: &CancellationToken,
) -> Result<Graph, InputError> {
    let mut directories: HashMap<Digest, Directory> = HashMap::new();
    let mut seen: HashSet<Digest> = HashSet::from([root]);
    let mut missing: Vec<Digest> = Vec::new();
    let mut level = vec![root];
    let mut depth = 0u32;
    while !level.is_empty() {
        if depth > limits.max_tree_depth {
            return Err(InputError::Limit(format!(
                "the input tree nests directories more than {} deep (worker.limits.max_tree_depth)",
                limits.max_tree_depth
            )));
        }
        let entries: Vec<Entry> = level.iter().map(|d| (*d, false)).collect();
        match unless_stopped(stop, cache.ensure(&entries, remote)).await? {
            Ok(()) => {}
            Err(FetchError::Missing(m)) => missing.extend(m),
            Err(e) => return Err(e.into()),
        }
        let absent: HashSet<Digest> = missing.iter().copied().collect();
        let present: Vec<Digest> = level.into_iter().filter(|d| !absent.contains(d)).collect();
        let reader = cache.clone();
        let decoded = tokio::task::spawn_blocking(move || {
            present
                .into_iter()
                .map(|digest| {
                    let bytes = reader
                        .read(&(digest, false))
                        .map_err(|e| worker(&format!("reading cached directory {digest}"), e))?;
                    let dir = Directory::decode(bytes.as_slice()).map_err(|e| {
                        InputError::Invalid(format!("blob {digest} is not a Directory: {e}"))
                    })?;
                    validate::directory(&dir, &digest.to_string()).map_err(InputError::Invalid)?;
                    Ok((digest, dir))
                })
                .collect::<Result<Vec<_>, InputError>>()
        })
        .await
        .map_err(|e| worker("reading the input tree", e))??;
        let mut next = Vec::new();
        for (digest, dir) in decoded {
            for sub in &dir.directories {
                let sub = Digest::from_proto(sub.digest.as_ref()).expect("validated");
                if seen.insert(sub) {
                    next.push(sub);
                }
            }
            directories.insert(digest, dir);
        }
        // Each distinct directory is at least one entry of the expanded tree.
        if seen.len() as u64 > limits.max_input_entries {
            return Err(too_many_entries(seen.len() as u64, limits));
        }
        level = next;
        depth += 1;
    }
    if !missing.is_empty() {
        // The files are asked for too, so that the client hears of everything at once.
        let files = distinct_files(&directories);
        if let Err(FetchError::Missing(m)) = cache.ensure(&files, remote).await {
            missing.extend(m);
        }
        missing.sort();
        missing.dedup();
        return Err(InputError::Missing(missing));
    }
    let (entries, bytes) = expanded_size(&directories, root);
    if entries > limits.max_input_entries {
        return Err(too_many_entries(entries, limits));
    }
    if bytes > limits.max_input_bytes.bytes() {
        return Err(InputError::Limit(format!(
            "the input tree's files add up to {bytes} bytes (counted where they appear), more than this worker's limit of {} (worker.limits.max_input_bytes)",
            limits.max_input_bytes
        )));
    }
    let files = distinct_files(&directories);
    Ok(Graph { directories, files })
}

fn too_many_entries(entries: u64, limits: &ActionLimits) -> InputError {
    InputError::Limit(format!(
        "the input tree expands to at least {entries} files, directories and symlinks (counted where they appear), more than this worker's limit of {} (worker.limits.max_input_entries)",
        limits.max_input_entries
    ))
}

fn distinct_files(directories: &HashMap<Digest, Directory>) -> Vec<Entry> {
    let mut files: HashSet<Entry> = HashSet::new();
    for dir in directories.values() {
        for file in &dir.files {
            let digest = Digest::from_proto(file.digest.as_ref()).expect("validated");
            files.insert((digest, file.is_executable));
        }
    }
    files.into_iter().collect()
}

/// The entries and file bytes the tree at `root` expands to, every subtree counted
/// where it appears: computed once per distinct directory, children first.
fn expanded_size(directories: &HashMap<Digest, Directory>, root: Digest) -> (u64, u64) {
    let mut sizes: HashMap<Digest, (u64, u64)> = HashMap::with_capacity(directories.len());
    let mut stack = vec![(root, false)];
    while let Some((digest, children_done)) = stack.pop() {
        if sizes.contains_key(&digest) {
            continue;
        }
        let dir = &directories[&digest];
        let children = dir
            .directories
            .iter()
            .map(|d| Digest::from_proto(d.digest.as_ref()).expect("validated"));
        if !children_done {
            stack.push((digest, true));
            stack.extend(
                children
                    .filter(|c| !sizes.contains_key(c))
                    .map(|c| (c, false)),
            );
            continue;
        }
        let mut entries = (dir.files.len() + dir.symlinks.len() + dir.directories.len()) as u64;
        let mut bytes = dir
            .files
            .iter()
            .map(|f| f.digest.as_ref().map_or(0, |d| d.size_bytes.max(0) as u64))
            .fold(0u64, u64::saturating_add);
        for child in children {
            let (e, b) = sizes[&child];
            entries = entries.saturating_add(e);
            bytes = bytes.saturating_add(b);
        }
        sizes.insert(digest, (entries, bytes));
    }
    sizes[&root]
}

/// A link that failed because its cache entry was evicted: to make again.
struct Relink {
    entry: Entry,
    dir: Arc<Dir>,
    name: OsString,
}

type Layout = (usize, Vec<Relink>);

/// One directory to lay out: where it goes and how it was reached.
struct Frame {
    digest: Digest,
    parent: Arc<Dir>,
    name: OsString,
    ancestry: Rc<Ancestry>,
}

/// The directories above one being laid out, for resolving its symlinks.
struct Ancestry {
    digest: Digest,
    path: String,
    parent: Option<Rc<Ancestry>>,
}

impl Ancestry {
    fn digests(self: &Rc<Self>) -> Vec<Digest> {
        let mut out = Vec::new();
        let mut at = Some(self.clone());
        while let Some(node) = at {
            out.push(node.digest);
            at = node.parent.clone();
        }
        out.reverse();
        out
    }
}

/// Creates the tree on disk; returns the number of files linked and the links that
/// failed because their cache entry had been evicted.
fn lay_out(
    cache: &FileCache,
    graph: &Graph,
    root: Digest,
    dest: &Path,
    identity: Option<Identity>,
    stop: &CancellationToken,
) -> Result<Layout, InputError> {
    let tree = InputTree::new(&graph.directories);
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return Err(InputError::Worker(format!(
            "{} is not a place for an input root",
            dest.display()
        )));
    };
    let parent = Dir::open(parent).map_err(|e| worker("opening the action directory", e))?;
    let owner = identity.map(|i| (i.uid, i.gid));
    let mut linked = 0;
    let mut evicted = Vec::new();
    let mut stack = vec![Frame {
        digest: root,
        parent: Arc::new(parent),
        name: name.to_owned(),
        ancestry: Rc::new(Ancestry {
            digest: root,
            path: String::new(),
            parent: None,
        }),
    }];
    let mut made = 0usize;
    while let Some(frame) = stack.pop() {
        made += 1;
        if made.is_multiple_of(CHECK_EVERY) && stop.is_cancelled() {
            return Err(InputError::Stopped);
        }
        let dir = graph.directories.get(&frame.digest).expect("fetched");
        let here = frame
            .parent
            .create_dir(&frame.name, 0o755)
            .map_err(|e| worker(&format!("creating {:?}", frame.ancestry.path), e))?;
        if let Some((uid, gid)) = owner {
            here.chown(uid, gid)
                .map_err(|e| worker("handing the input root to the action", e))?;
        }
        let here = Arc::new(here);
        for file in &dir.files {
            let entry = (
                Digest::from_proto(file.digest.as_ref()).expect("validated"),
                file.is_executable,
            );
            let name = OsStr::new(&file.name);
            match cache.link(&entry, &here, name) {
                Ok(()) => linked += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => evicted.push(Relink {
                    entry,
                    dir: here.clone(),
                    name: name.to_owned(),
                }),
                Err(e) => return Err(worker(&format!("linking {:?}", file.name), e)),
            }
        }
        if !dir.symlinks.is_empty() {
            let ancestors = frame.ancestry.digests();
            for link in &dir.symlinks {
                let path = join(&frame.ancestry.path, &link.name);
                tree.check_symlink(&ancestors, &path, &link.target)
                    .map_err(InputError::Invalid)?;
                here.symlink(OsStr::new(&link.target), OsStr::new(&link.name))
                    .map_err(|e| worker(&format!("creating the symlink {path:?}"), e))?;
            }
        }
        for sub in &dir.directories {
            let digest = Digest::from_proto(sub.digest.as_ref()).expect("validated");
            stack.push(Frame {
                digest,
                parent: here.clone(),
                name: OsString::from(&sub.name),
                ancestry: Rc::new(Ancestry {
                    digest,
                    path: join(&frame.ancestry.path, &sub.name),
                    parent: Some(frame.ancestry.clone()),
                }),
            });
        }
    }
    Ok((linked, evicted))
}

fn join(at: &str, name: &str) -> String {
    match at {
        "" => name.to_owned(),
        _ => format!("{at}/{name}"),
    }
}

fn relink(cache: &FileCache, links: Vec<Relink>) -> Result<Layout, InputError> {
    let mut linked = 0;
    let mut evicted = Vec::new();
    for link in links {
        match cache.link(&link.entry, &link.dir, &link.name) {
            Ok(()) => linked += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => evicted.push(link),
            Err(e) => return Err(worker(&format!("linking {:?}", link.name), e)),
        }
    }
    Ok((linked, evicted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use paddock_reapi::proto::re::DirectoryNode;

    fn node(name: &str, dir: &Directory) -> DirectoryNode {
        DirectoryNode {
            name: name.into(),
            digest: Some(Digest::of_message(dir).0.to_proto()),
        }
    }

    #[test]
    fn shared_subtrees_count_where_they_appear() {
        // Eight children that are all the same directory, three levels deep: 8^3
        // leaves from four distinct Directory messages.
        let leaf = Directory::default();
        let mut level = leaf.clone();
        let mut directories = HashMap::from([(Digest::of_message(&leaf).0, leaf)]);
        for _ in 0..3 {
            let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
            level = Directory {
                directories: names.iter().map(|n| node(n, &level)).collect(),
                ..Default::default()
            };
            directories.insert(Digest::of_message(&level).0, level.clone());
        }
        let root = Digest::of_message(&level).0;
        let (entries, bytes) = expanded_size(&directories, root);
        assert_eq!(entries, 8 + 64 + 512);
        assert_eq!(bytes, 0);
    }
}
