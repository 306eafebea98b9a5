//! Materialising an action's input root: Directory messages and files come through
//! the local cache, and the tree is laid out with hard links to cached files.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use paddock_client::Remote;
use paddock_reapi::proto::re::Directory;
use paddock_reapi::{validate, Digest};
use prost::Message;

use crate::cache::{Entry, FetchError, FileCache};

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Blobs the action names are not in the CAS.
    #[error("inputs missing from the CAS")]
    Missing(Vec<Digest>),
    /// The input tree is malformed (bad names, escaping symlinks, undecodable).
    #[error("{0}")]
    Invalid(String),
    /// This worker failed (disk, network).
    #[error("{0}")]
    Worker(String),
}

impl From<FetchError> for InputError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Missing(m) => InputError::Missing(m),
            FetchError::Worker(w) => InputError::Worker(w),
        }
    }
}

/// Lays out the tree rooted at `root` under `dest` (which must not exist yet).
/// Returns how many files it linked.
pub async fn materialize(
    remote: &Remote,
    cache: &Arc<FileCache>,
    root: Digest,
    dest: &Path,
) -> Result<usize, InputError> {
    let mut directories: HashMap<Digest, Directory> = HashMap::new();
    let mut missing = Vec::new();
    let mut level = vec![root];
    while !level.is_empty() {
        let entries: Vec<Entry> = level.iter().map(|d| (*d, false)).collect();
        match cache.ensure(&entries, remote).await {
            Ok(()) => {}
            Err(FetchError::Missing(m)) => missing.extend(m),
            Err(e) => return Err(e.into()),
        }
        let mut next = Vec::new();
        for digest in level {
            if missing.contains(&digest) {
                continue;
            }
            let bytes = cache.read(&(digest, false)).map_err(|e| {
                InputError::Worker(format!("reading cached directory {digest}: {e}"))
            })?;
            let dir = Directory::decode(bytes.as_slice()).map_err(|e| {
                InputError::Invalid(format!("blob {digest} is not a Directory: {e}"))
            })?;
            for sub in &dir.directories {
                let sub = Digest::from_proto(sub.digest.as_ref())
                    .map_err(|e| InputError::Invalid(format!("directory {:?}: {e}", sub.name)))?;
                if !directories.contains_key(&sub) && !next.contains(&sub) {
                    next.push(sub);
                }
            }
            directories.insert(digest, dir);
        }
        level = next;
    }

    let mut files: HashSet<Entry> = HashSet::new();
    for dir in directories.values() {
        for file in &dir.files {
            let digest = Digest::from_proto(file.digest.as_ref())
                .map_err(|e| InputError::Invalid(format!("file {:?}: {e}", file.name)))?;
            files.insert((digest, file.is_executable));
        }
    }
    let files: Vec<Entry> = files.into_iter().collect();
    match cache.ensure(&files, remote).await {
        Ok(()) => {}
        Err(FetchError::Missing(m)) => missing.extend(m),
        Err(e) => return Err(e.into()),
    }
    if !missing.is_empty() {
        missing.sort();
        missing.dedup();
        return Err(InputError::Missing(missing));
    }

    let directories = Arc::new(directories);
    let mut pending: Option<Vec<(Entry, PathBuf)>> = None;
    let mut total = 0;
    for _ in 0..3 {
        let shared = cache.clone();
        let directories = directories.clone();
        let dest = dest.to_owned();
        let retry = pending.take();
        let (linked, evicted) = tokio::task::spawn_blocking(move || match retry {
            None => lay_out(&shared, &directories, root, &dest),
            Some(links) => relink(&shared, links),
        })
        .await
        .map_err(|e| InputError::Worker(e.to_string()))??;
        total += linked;
        if evicted.is_empty() {
            return Ok(total);
        }
        // A concurrent action's downloads evicted some entries before they were
        // linked: fetch those again and finish.
        let entries: Vec<Entry> = evicted.iter().map(|(e, _)| *e).collect();
        cache.ensure(&entries, remote).await?;
        pending = Some(evicted);
    }
    Err(InputError::Worker(
        "the local cache is too small: inputs were evicted before they could be linked".into(),
    ))
}

type Layout = (usize, Vec<(Entry, PathBuf)>);

/// Creates the tree on disk; returns the number of files linked and the links that
/// failed because their cache entry had been evicted.
fn lay_out(
    cache: &FileCache,
    directories: &HashMap<Digest, Directory>,
    root: Digest,
    dest: &Path,
) -> Result<Layout, InputError> {
    let io = |what: &str, path: &Path, e: std::io::Error| {
        InputError::Worker(format!("{what} {}: {e}", path.display()))
    };
    let mut linked = 0;
    let mut evicted = Vec::new();
    let mut stack = vec![(root, String::new())];
    while let Some((digest, at)) = stack.pop() {
        let dir = &directories[&digest];
        validate::directory(dir, &at).map_err(InputError::Invalid)?;
        let here = dest.join(&at);
        std::fs::create_dir_all(&here).map_err(|e| io("creating", &here, e))?;
        for file in &dir.files {
            let entry = (
                Digest::from_proto(file.digest.as_ref()).expect("validated"),
                file.is_executable,
            );
            let path = here.join(&file.name);
            match cache.link(&entry, &path) {
                Ok(()) => linked += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => evicted.push((entry, path)),
                Err(e) => return Err(io("linking", &path, e)),
            }
        }
        for link in &dir.symlinks {
            let path = here.join(&link.name);
            std::os::unix::fs::symlink(&link.target, &path)
                .map_err(|e| io("creating", &path, e))?;
        }
        for sub in &dir.directories {
            let child = Digest::from_proto(sub.digest.as_ref()).expect("validated");
            let path = if at.is_empty() {
                sub.name.clone()
            } else {
                format!("{at}/{}", sub.name)
            };
            stack.push((child, path));
        }
    }
    Ok((linked, evicted))
}

fn relink(cache: &FileCache, links: Vec<(Entry, PathBuf)>) -> Result<Layout, InputError> {
    let mut linked = 0;
    let mut evicted = Vec::new();
    for (entry, path) in links {
        match cache.link(&entry, &path) {
            Ok(()) => linked += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => evicted.push((entry, path)),
            Err(e) => {
                return Err(InputError::Worker(format!(
                    "linking {}: {e}",
                    path.display()
                )))
            }
        }
    }
    Ok((linked, evicted))
}
