//! Input trees as a whole: symlinks resolved through the Directory graph, as the
//! kernel would resolve them once the tree is laid out.
//!
//! A symlink's text alone does not say where it leads: `d1/up -> ../..` stays
//! inside if `d1` is a directory two levels down, and leaves the root if `d1` is
//! itself a symlink to the top. Each symlink is therefore resolved component by
//! component, following the symlinks it meets (at most [`MAX_HOPS`], as the kernel
//! does) and applying `..` to where it actually is.

use std::collections::{HashMap, VecDeque};

use crate::digest::Digest;
use crate::proto::re::Directory;

/// How many symlinks one resolution may follow (the kernel's limit is 40 too).
pub const MAX_HOPS: usize = 40;

/// The Directory messages of an input tree, by digest.
pub struct InputTree<'a> {
    directories: &'a HashMap<Digest, Directory>,
}

enum Step<'a> {
    Directory(Digest),
    File,
    Symlink(&'a str),
    Missing,
}

impl<'a> InputTree<'a> {
    pub fn new(directories: &'a HashMap<Digest, Directory>) -> Self {
        InputTree { directories }
    }

    fn step(&self, dir: &Digest, name: &str) -> Step<'a> {
        let Some(directory) = self.directories.get(dir) else {
            return Step::Missing;
        };
        if let Some(sub) = directory.directories.iter().find(|d| d.name == name) {
            return match Digest::from_proto(sub.digest.as_ref()) {
                Ok(d) => Step::Directory(d),
                Err(_) => Step::Missing,
            };
        }
        if directory.files.iter().any(|f| f.name == name) {
            return Step::File;
        }
        match directory.symlinks.iter().find(|s| s.name == name) {
            Some(link) => Step::Symlink(&link.target),
            None => Step::Missing,
        }
    }

    /// Checks that the symlink at `link` (its path from the root, for messages),
    /// which lives in the directory reached through `ancestors` (the digests of the
    /// root and of each directory down to the link's own), leads to a place inside
    /// the root. What it leads to need not exist; a chain longer than [`MAX_HOPS`]
    /// fails as the kernel would fail it, and is let be.
    pub fn check_symlink(
        &self,
        ancestors: &[Digest],
        link: &str,
        target: &str,
    ) -> Result<(), String> {
        let escapes = || {
            format!("symlink {link:?} -> {target:?} leads outside the input root once the symlinks on its way are followed")
        };
        if target.is_empty() || target.starts_with('/') {
            return Err(escapes());
        }
        // Where the resolution stands: the directories from the root down. Once it
        // passes through something absent, only its depth is known.
        let mut stack: Vec<Digest> = ancestors.to_vec();
        let mut unknown_depth: Option<usize> = None;
        let mut pending: VecDeque<&str> = target.split('/').collect();
        let mut hops = 0;
        while let Some(component) = pending.pop_front() {
            match component {
                "" | "." => {}
                ".." => match &mut unknown_depth {
                    Some(depth) => {
                        *depth = depth.checked_sub(1).ok_or_else(escapes)?;
                    }
                    None => {
                        if stack.len() <= 1 {
                            return Err(escapes());
                        }
                        stack.pop();
                    }
                },
                name => {
                    if let Some(depth) = &mut unknown_depth {
                        *depth += 1;
                        continue;
                    }
                    let here = *stack.last().expect("the root is always there");
                    match self.step(&here, name) {
                        Step::Directory(d) => stack.push(d),
                        // A file with more to come fails to resolve (ENOTDIR): no
                        // escape. A file at the end is where the link points.
                        Step::File => return Ok(()),
                        Step::Symlink(next) => {
                            hops += 1;
                            if hops > MAX_HOPS || next.starts_with('/') || next.is_empty() {
                                // The kernel gives up (or the tree is already refused
                                // for the absolute link where it stands).
                                return Ok(());
                            }
                            for part in next.split('/').rev() {
                                pending.push_front(part);
                            }
                        }
                        Step::Missing => unknown_depth = Some(stack.len()),
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::re::{DirectoryNode, FileNode, SymlinkNode};

    fn dir(dirs: &[(&str, &Directory)], files: &[&str], links: &[(&str, &str)]) -> Directory {
        Directory {
            directories: dirs
                .iter()
                .map(|(name, d)| DirectoryNode {
                    name: (*name).into(),
                    digest: Some(Digest::of_message(*d).0.to_proto()),
                })
                .collect(),
            files: files
                .iter()
                .map(|name| FileNode {
                    name: (*name).into(),
                    digest: Some(Digest::of(b"x").to_proto()),
                    ..Default::default()
                })
                .collect(),
            symlinks: links
                .iter()
                .map(|(name, target)| SymlinkNode {
                    name: (*name).into(),
                    target: (*target).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn chains_are_followed_and_dot_dot_applies_where_they_lead() {
        // root/{a/b/c/, top -> a/b/c, d1 -> a/b/c, f}
        let c = dir(&[], &["file"], &[]);
        let b = dir(&[("c", &c)], &[], &[]);
        let a = dir(&[("b", &b)], &[], &[]);
        let root = dir(
            &[("a", &a)],
            &["f"],
            &[
                ("d1", "a/b/c"),
                ("esc", "d1/../../../.."),
                ("ok", "d1/../.."),
            ],
        );
        let mut map = HashMap::new();
        for d in [&c, &b, &a, &root] {
            map.insert(Digest::of_message(d).0, d.clone());
        }
        let tree = InputTree::new(&map);
        let at_root = [Digest::of_message(&root).0];
        // Textually `d1/../../../..` climbs from d1 (depth 1) out; followed, d1 is
        // three levels down, and four `..` still leave the root.
        assert!(tree
            .check_symlink(&at_root, "esc", "d1/../../../..")
            .is_err());
        // `d1/../..` lands on `a`: inside, though textually it would escape.
        assert!(tree.check_symlink(&at_root, "ok", "d1/../..").is_ok());
        assert!(tree.check_symlink(&at_root, "plain", "a/b").is_ok());
        assert!(tree.check_symlink(&at_root, "up", "..").is_err());
        assert!(tree
            .check_symlink(&at_root, "gone", "missing/../..")
            .is_err());
        assert!(tree.check_symlink(&at_root, "gone", "missing/..").is_ok());
        let deep = [
            at_root[0],
            Digest::of_message(&a).0,
            Digest::of_message(&b).0,
        ];
        assert!(tree.check_symlink(&deep, "a/b/up", "../..").is_ok());
        assert!(tree.check_symlink(&deep, "a/b/up", "../../..").is_err());
    }
}
