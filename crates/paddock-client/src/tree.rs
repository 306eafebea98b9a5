//! Local directories as REAPI Merkle trees, and REAPI outputs back as local files.

// REAPI 2.0 results (from Bazel-era servers) fill the fields deprecated in 2.1.
#![allow(deprecated)]

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use paddock_reapi::proto::re::{
    ActionResult, Directory, DirectoryNode, FileNode, OutputSymlink, SymlinkNode, Tree,
};
use paddock_reapi::{validate, Digest};
use prost::Message;

use crate::{hash_file, ClientError, Remote, Source};

/// A directory turned into REAPI form: its root digest and every blob under it.
pub struct MerkleTree {
    pub root: Digest,
    pub blobs: Vec<(Digest, Source)>,
}

/// Builds the Merkle tree of `dir` (files, executable bits, relative symlinks).
pub async fn merkle_tree(dir: &Path) -> Result<MerkleTree, ClientError> {
    let mut blobs = Vec::new();
    let root = directory(dir, &mut blobs).await?;
    let (digest, bytes) = Digest::of_message(&root);
    blobs.push((digest, Source::Memory(Bytes::from(bytes))));
    Ok(MerkleTree {
        root: digest,
        blobs,
    })
}

async fn directory(
    dir: &Path,
    blobs: &mut Vec<(Digest, Source)>,
) -> Result<Directory, ClientError> {
    let mut entries = Vec::new();
    let mut reader = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = reader.next_entry().await? {
        let name = entry.file_name().into_string().map_err(|n| {
            ClientError::Protocol(format!("{:?} is not a UTF-8 file name", dir.join(n)))
        })?;
        entries.push((name, entry.path()));
    }
    entries.sort();
    let mut out = Directory::default();
    for (name, path) in entries {
        let meta = tokio::fs::symlink_metadata(&path).await?;
        if meta.file_type().is_symlink() {
            let target = tokio::fs::read_link(&path).await?;
            let target = target.to_str().map(str::to_owned).ok_or_else(|| {
                ClientError::Protocol(format!("{} has a non-UTF-8 target", path.display()))
            })?;
            out.symlinks.push(SymlinkNode {
                name,
                target,
                ..Default::default()
            });
        } else if meta.is_dir() {
            let sub = Box::pin(directory(&path, blobs)).await?;
            let (digest, bytes) = Digest::of_message(&sub);
            blobs.push((digest, Source::Memory(Bytes::from(bytes))));
            out.directories.push(DirectoryNode {
                name,
                digest: Some(digest.to_proto()),
            });
        } else if meta.is_file() {
            let digest = hash_file(&path).await?;
            blobs.push((digest, Source::File(path)));
            out.files.push(FileNode {
                name,
                digest: Some(digest.to_proto()),
                is_executable: meta.permissions().mode() & 0o111 != 0,
                ..Default::default()
            });
        }
    }
    Ok(out)
}

/// Writes a file from the CAS, with the requested executable bit.
async fn write_file(
    remote: &Remote,
    digest: &Digest,
    executable: bool,
    path: &Path,
) -> Result<(), ClientError> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    remote.read_to_file(digest, path).await?;
    let mode = if executable { 0o755 } else { 0o644 };
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).await?;
    Ok(())
}

async fn write_symlink(link: &OutputSymlink, dest: &Path) -> Result<(), ClientError> {
    let path = dest.join(&link.path);
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let _ = tokio::fs::remove_file(&path).await;
    tokio::fs::symlink(&link.target, &path).await?;
    Ok(())
}

/// Downloads every output of `result` under `dest`.
/// Paths are checked first: nothing is written outside `dest`.
pub async fn download_outputs(
    remote: &Remote,
    result: &ActionResult,
    dest: &Path,
) -> Result<(), ClientError> {
    validate::action_result(result).map_err(ClientError::Protocol)?;
    for file in &result.output_files {
        let digest = parse(file.digest.as_ref())?;
        write_file(remote, &digest, file.is_executable, &dest.join(&file.path)).await?;
    }
    for link in result
        .output_symlinks
        .iter()
        .chain(&result.output_file_symlinks)
        .chain(&result.output_directory_symlinks)
    {
        write_symlink(link, dest).await?;
    }
    for dir in &result.output_directories {
        let tree_digest = parse(dir.tree_digest.as_ref())?;
        let tree = Tree::decode(remote.read_blob(&tree_digest).await?)
            .map_err(|e| ClientError::Protocol(format!("tree {tree_digest}: {e}")))?;
        let children: HashMap<Digest, &Directory> = tree
            .children
            .iter()
            .map(|d| (Digest::of_message(d).0, d))
            .collect();
        let root = tree
            .root
            .as_ref()
            .ok_or_else(|| ClientError::Protocol("tree without root".into()))?;
        let mut stack: Vec<(&Directory, PathBuf)> = vec![(root, dest.join(&dir.path))];
        while let Some((directory, at)) = stack.pop() {
            validate::directory(directory, "").map_err(ClientError::Protocol)?;
            tokio::fs::create_dir_all(&at).await?;
            for file in &directory.files {
                let digest = parse(file.digest.as_ref())?;
                write_file(remote, &digest, file.is_executable, &at.join(&file.name)).await?;
            }
            for link in &directory.symlinks {
                let _ = tokio::fs::remove_file(at.join(&link.name)).await;
                tokio::fs::symlink(&link.target, at.join(&link.name)).await?;
            }
            for sub in &directory.directories {
                let digest = parse(sub.digest.as_ref())?;
                let child = children.get(&digest).ok_or_else(|| {
                    ClientError::Protocol(format!("tree lacks directory {digest}"))
                })?;
                stack.push((child, at.join(&sub.name)));
            }
        }
    }
    Ok(())
}

fn parse(digest: Option<&paddock_reapi::proto::re::Digest>) -> Result<Digest, ClientError> {
    Digest::from_proto(digest)
        .map_err(|e| ClientError::Protocol(format!("bad digest in a result: {e}")))
}
