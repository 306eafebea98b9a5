//! Paths beneath a root, opened through directory descriptors and never followed by
//! string.
//!
//! A worker must not follow, as a string, any path that an action could have
//! touched: an action can replace a directory of its input root with a symlink to
//! `/` (or to another action's files) and wait for the worker to walk through it.
//! [`Dir`] holds a descriptor of a directory, and every path below it is resolved by
//! the kernel beneath that directory with no symlink followed on the way
//! (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`,
//! or one component at a time with `O_NOFOLLOW` where `openat2` is missing). What is
//! found is then used through its own descriptor (`fstat`, `read`, `fchown`,
//! `linkat` of the descriptor), never by name again.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

/// An open directory: the root beneath which paths are resolved.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

/// What a name beneath a [`Dir`] turned out to be, opened where that makes sense.
#[derive(Debug)]
pub enum Found {
    /// A regular file, opened for reading, with its status as `fstat` gave it.
    File(File, Stat),
    Dir(Dir),
    /// A symlink, with its target (never followed).
    Symlink(OsString),
    /// A device, FIFO or socket: never opened.
    Other,
}

/// An entry's status as [`Dir::status`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryStatus {
    pub is_dir: bool,
    pub uid: u32,
    /// The blocks it occupies, in bytes.
    pub disk_bytes: u64,
}

/// The status of an open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    /// The permission bits.
    pub mode: u32,
    pub uid: u32,
    pub links: u64,
}

impl Stat {
    fn of(stat: &rustix::fs::Stat) -> Stat {
        Stat {
            size: stat.st_size as u64,
            mode: stat.st_mode & 0o7777,
            uid: stat.st_uid,
            links: stat.st_nlink,
        }
    }

    pub fn executable(&self) -> bool {
        self.mode & 0o111 != 0
    }
}

/// Flags for directories found on the way: no symlink is ever opened.
fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Whether an error means "a symlink was in the way" (or a file where a directory
/// should be), as opposed to a failure of the machine.
pub fn is_detour(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::EXDEV)
    )
}

/// The normal components of a relative path; anything else (`..`, an absolute
/// path) is refused, as no caller should ever pass one.
fn components(rel: &Path) -> io::Result<Vec<&OsStr>> {
    rel.components()
        .filter(|c| *c != Component::CurDir)
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a plain relative path", rel.display()),
            )),
        })
        .collect()
}

impl Dir {
    /// Opens a directory that the worker named itself (its own directories): the last
    /// component must not be a symlink.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = rustix::fs::open(path, dir_flags(), Mode::empty())?;
        Ok(Dir { fd })
    }

    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
        })
    }

    /// Opens `rel` beneath this directory with `flags`, following no symlink on the
    /// way or at the end.
    fn open_beneath(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        let names = components(rel)?;
        if names.is_empty() {
            return Ok(rustix::fs::openat(
                &self.fd,
                ".",
                flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?);
        }
        let resolve =
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(
            &self.fd,
            rel,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            resolve,
        ) {
            Err(e) if e == rustix::io::Errno::NOSYS || e == rustix::io::Errno::PERM => {}
            // openat2 refuses to resolve when a concurrent rename raced it; try again
            // the slow way rather than fail.
            Err(e) if e == rustix::io::Errno::AGAIN => {}
            other => return Ok(other?),
        }
        // No openat2 (Linux before 5.6, or a seccomp filter that hides it): one
        // component at a time, each opened without following a symlink.
        let (last, parents) = names.split_last().expect("not empty");
        let mut dir = self.fd.try_clone()?;
        for name in parents {
            dir = rustix::fs::openat(&dir, *name, dir_flags(), Mode::empty())?;
        }
        Ok(rustix::fs::openat(
            &dir,
            *last,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?)
    }

    /// The directory at `rel` beneath this one (`""` is this one).
    pub fn open_dir(&self, rel: &Path) -> io::Result<Dir> {
        let fd = self.open_beneath(rel, OFlags::RDONLY | OFlags::DIRECTORY)?;
        Ok(Dir { fd })
    }

    /// The status of `name`, an entry of this directory, without opening it or
    /// following it: its kind, owner and the disk it takes. `None` if there is no
    /// such entry.
    pub fn status(&self, name: &OsStr) -> io::Result<Option<EntryStatus>> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(EntryStatus {
                is_dir: rustix::fs::FileType::from_raw_mode(stat.st_mode)
                    == rustix::fs::FileType::Directory,
                uid: stat.st_uid,
                disk_bytes: (stat.st_blocks as u64).saturating_mul(512),
            })),
            Err(e) if e == rustix::io::Errno::NOENT => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// What `name`, an entry of this directory, is; `None` if there is no such entry.
    pub fn entry(&self, name: &OsStr) -> io::Result<Option<Found>> {
        let stat = match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(e) if e == rustix::io::Errno::NOENT => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
        Ok(Some(match kind {
            rustix::fs::FileType::Symlink => Found::Symlink(self.read_link(name)?),
            rustix::fs::FileType::Directory => {
                let fd = rustix::fs::openat(&self.fd, name, dir_flags(), Mode::empty())?;
                Found::Dir(Dir { fd })
            }
            rustix::fs::FileType::RegularFile => {
                // Non-blocking, in case it was swapped for a FIFO since the stat.
                let fd = rustix::fs::openat(
                    &self.fd,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                let stat = rustix::fs::fstat(&fd)?;
                if rustix::fs::FileType::from_raw_mode(stat.st_mode)
                    != rustix::fs::FileType::RegularFile
                {
                    return Ok(Some(Found::Other));
                }
                Found::File(File::from(fd), Stat::of(&stat))
            }
            _ => Found::Other,
        }))
    }

    /// What is at `rel` beneath this directory. `None` if nothing is there, or if
    /// reaching it would go through a symlink or a non-directory: what lies beneath
    /// a symlink does not exist, as far as the worker is concerned.
    pub fn lookup(&self, rel: &Path) -> io::Result<Option<Found>> {
        let names = components(rel)?;
        let Some((last, parents)) = names.split_last() else {
            return Ok(Some(Found::Dir(self.try_clone()?)));
        };
        let parent: std::path::PathBuf = parents.iter().collect();
        let parent = match self.open_dir(&parent) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound || is_detour(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        parent.entry(last)
    }

    /// The names in this directory (without `.` and `..`), sorted by their bytes.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let mut dir = rustix::fs::Dir::read_from(&self.fd)?;
        let mut names = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsStr::from_bytes(name).to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// The target of the symlink `name`.
    pub fn read_link(&self, name: &OsStr) -> io::Result<OsString> {
        let target = rustix::fs::readlinkat(&self.fd, name, Vec::new())?;
        Ok(OsStr::from_bytes(target.as_bytes()).to_owned())
    }

    /// Creates the directory `name` and opens it.
    pub fn create_dir(&self, name: &OsStr, mode: u32) -> io::Result<Dir> {
        rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode))?;
        let fd = rustix::fs::openat(&self.fd, name, dir_flags(), Mode::empty())?;
        Ok(Dir { fd })
    }

    /// Makes sure the directories of `rel` exist beneath this one, creating what is
    /// missing (owned by `owner`, when given); a symlink or a file on the way is an
    /// error ([`is_detour`]).
    pub fn create_dirs(&self, rel: &Path, mode: u32, owner: Option<(u32, u32)>) -> io::Result<Dir> {
        let mut dir = self.try_clone()?;
        for name in components(rel)? {
            match rustix::fs::mkdirat(&dir.fd, name, Mode::from_raw_mode(mode)) {
                Ok(()) => {
                    let created = Dir {
                        fd: rustix::fs::openat(&dir.fd, name, dir_flags(), Mode::empty())?,
                    };
                    if let Some((uid, gid)) = owner {
                        created.chown(uid, gid)?;
                    }
                    dir = created;
                }
                Err(e) if e == rustix::io::Errno::EXIST => {
                    dir = Dir {
                        fd: rustix::fs::openat(&dir.fd, name, dir_flags(), Mode::empty())?,
                    };
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(dir)
    }

    /// Creates the file `name` (it must not exist) for writing, with `mode`.
    pub fn create_file(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        Ok(File::from(fd))
    }

    /// Opens the regular file at `rel` beneath this directory for appending; `None`
    /// if there is none there (or only beneath a symlink).
    pub fn append_to(&self, rel: &Path) -> io::Result<Option<File>> {
        match self.open_beneath(rel, OFlags::WRONLY | OFlags::APPEND | OFlags::NONBLOCK) {
            Ok(fd) => {
                let stat = rustix::fs::fstat(&fd)?;
                Ok((rustix::fs::FileType::from_raw_mode(stat.st_mode)
                    == rustix::fs::FileType::RegularFile)
                    .then(|| File::from(fd)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound || is_detour(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a symlink `name` pointing at `target`.
    pub fn symlink(&self, target: &OsStr, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::symlinkat(target, &self.fd, name)?)
    }

    /// Hard-links `from_name` in `from` as `name` here (a symlink is linked as one).
    pub fn hard_link(&self, from: &Dir, from_name: &OsStr, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::linkat(
            &from.fd,
            from_name,
            &self.fd,
            name,
            AtFlags::empty(),
        )?)
    }

    /// Links the very file `file` was opened as under `name` here: no path is
    /// resolved again, so nothing can be swapped in between (needs
    /// `CAP_DAC_READ_SEARCH`, which root has).
    pub fn link_file(&self, file: &File, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::linkat(
            file,
            "",
            &self.fd,
            name,
            AtFlags::EMPTY_PATH,
        )?)
    }

    /// Renames `name` here to `to_name` in `to`.
    pub fn rename(&self, name: &OsStr, to: &Dir, to_name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::renameat(&self.fd, name, &to.fd, to_name)?)
    }

    /// Removes the file or symlink `name`.
    pub fn remove_file(&self, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())?)
    }

    /// Gives this directory to `uid` and `gid`.
    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        chown(&self.fd, uid, gid)
    }

    /// Sets this directory's permission bits.
    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        Ok(rustix::fs::fchmod(&self.fd, Mode::from_raw_mode(mode))?)
    }

    /// This directory's file system's free space, in bytes available to unprivileged
    /// users.
    pub fn available(&self) -> io::Result<u64> {
        let vfs = rustix::fs::fstatvfs(&self.fd)?;
        Ok(vfs.f_bavail.saturating_mul(vfs.f_frsize))
    }

    /// Makes every directory beneath (and including) this one writable by its owner,
    /// so that a tree an action made read-only can be removed; symlinks are not
    /// followed.
    pub fn make_removable(&self) -> io::Result<()> {
        let mut stack = vec![self.try_clone()?];
        while let Some(dir) = stack.pop() {
            dir.chmod(0o700)?;
            for name in dir.names()? {
                let stat = rustix::fs::statat(&dir.fd, &name, AtFlags::SYMLINK_NOFOLLOW)?;
                if rustix::fs::FileType::from_raw_mode(stat.st_mode)
                    == rustix::fs::FileType::Directory
                {
                    stack.push(Dir {
                        fd: rustix::fs::openat(&dir.fd, &name, dir_flags(), Mode::empty())?,
                    });
                }
            }
        }
        Ok(())
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Gives an open file (or directory) to `uid` and `gid`.
pub fn chown(fd: impl AsFd, uid: u32, gid: u32) -> io::Result<()> {
    let (uid, gid) = (
        rustix::fs::Uid::from_raw(uid),
        rustix::fs::Gid::from_raw(gid),
    );
    Ok(rustix::fs::fchown(fd, Some(uid), Some(gid))?)
}

/// Sets an open file's permission bits.
pub fn chmod(fd: impl AsFd, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?)
}

/// Removes a directory tree that the worker owns the path of, even one whose
/// directories an action made read-only; symlinks inside are removed, never
/// followed.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    Dir::open(path)?.make_removable()?;
    std::fs::remove_dir_all(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_on_the_way_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(outside.join("x")).unwrap();
        std::fs::write(outside.join("x/secret"), b"secret").unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/file"), b"mine").unwrap();
        symlink(&outside, root.join("h")).unwrap();
        symlink("../outside", root.join("up")).unwrap();
        symlink("file", root.join("d/link")).unwrap();
        let dir = Dir::open(&root).unwrap();

        assert!(dir.lookup(Path::new("h/x/secret")).unwrap().is_none());
        assert!(dir.lookup(Path::new("up/x/secret")).unwrap().is_none());
        assert!(is_detour(&dir.open_dir(Path::new("h")).unwrap_err()));
        assert!(dir.lookup(Path::new("../outside")).is_err());
        match dir.lookup(Path::new("h")).unwrap() {
            Some(Found::Symlink(target)) => assert_eq!(target, outside.as_os_str()),
            other => panic!("{other:?}"),
        }
        match dir.lookup(Path::new("d/link")).unwrap() {
            Some(Found::Symlink(target)) => assert_eq!(target, "file"),
            other => panic!("{other:?}"),
        }
        match dir.lookup(Path::new("d/file")).unwrap() {
            Some(Found::File(_, stat)) => assert_eq!(stat.size, 4),
            other => panic!("{other:?}"),
        }
        // Creating directories stops at a symlink instead of creating through it.
        assert!(is_detour(
            &dir.create_dirs(Path::new("h/new"), 0o755, None)
                .unwrap_err()
        ));
        assert!(!outside.join("new").exists());
        dir.create_dirs(Path::new("a/b/c"), 0o755, None).unwrap();
        assert!(root.join("a/b/c").is_dir());
        assert_eq!(
            dir.open_dir(Path::new("d")).unwrap().names().unwrap(),
            vec![OsString::from("file"), OsString::from("link")]
        );
    }

    #[test]
    fn read_only_trees_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"x").unwrap();
        let dir = Dir::open(&root.join("a")).unwrap();
        dir.chmod(0o500).unwrap();
        remove_tree(&root).unwrap();
        assert!(!root.exists());
    }
}
