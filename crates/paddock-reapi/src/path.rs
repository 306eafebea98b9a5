//! Rules for the paths and names that clients put in Commands, Directories and results.
//!
//! Every path that reaches the file system passes one of these checks first, so no
//! client can name a file outside the directory it was given.

/// Why a path or name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} {path:?} is absolute; it must be relative")]
    Absolute { what: &'static str, path: String },
    #[error("{what} {path:?} ends with a slash")]
    TrailingSlash { what: &'static str, path: String },
    #[error("{what} {path:?} has an empty, `.` or `..` segment")]
    BadSegment { what: &'static str, path: String },
    #[error("{what} {path:?} contains a NUL byte")]
    Nul { what: &'static str, path: String },
    #[error("{what} {path:?} is not a single path segment")]
    NotAName { what: &'static str, path: String },
}

/// Checks a relative, normalised path: no leading or trailing slash, no empty, `.` or
/// `..` segments. `allow_empty` admits the empty path, which means "the root itself".
pub fn check_relative(what: &'static str, path: &str, allow_empty: bool) -> Result<(), PathError> {
    if path.is_empty() {
        return if allow_empty {
            Ok(())
        } else {
            Err(PathError::Empty { what })
        };
    }
    if path.contains('\0') {
        return Err(PathError::Nul {
            what,
            path: path.to_owned(),
        });
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute {
            what,
            path: path.to_owned(),
        });
    }
    if path.ends_with('/') {
        return Err(PathError::TrailingSlash {
            what,
            path: path.to_owned(),
        });
    }
    if path
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(PathError::BadSegment {
            what,
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Checks the name of a node in a Directory: exactly one normal path segment.
pub fn check_name(what: &'static str, name: &str) -> Result<(), PathError> {
    if name.is_empty() {
        return Err(PathError::Empty { what });
    }
    if name.contains('\0') {
        return Err(PathError::Nul {
            what,
            path: name.to_owned(),
        });
    }
    if name.contains('/') || name == "." || name == ".." {
        return Err(PathError::NotAName {
            what,
            path: name.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert!(check_relative("p", "a/b/c", false).is_ok());
        assert!(check_relative("p", "", true).is_ok());
        assert!(check_relative("p", "", false).is_err());
        assert!(check_relative("p", "/a", false).is_err());
        assert!(check_relative("p", "a/", false).is_err());
        assert!(check_relative("p", "a//b", false).is_err());
        assert!(check_relative("p", "a/../b", false).is_err());
        assert!(check_relative("p", "./a", false).is_err());
        assert!(check_relative("p", "a\0b", false).is_err());
    }

    #[test]
    fn names() {
        assert!(check_name("n", "file.txt").is_ok());
        assert!(check_name("n", "..").is_err());
        assert!(check_name("n", "a/b").is_err());
        assert!(check_name("n", "").is_err());
    }
}
