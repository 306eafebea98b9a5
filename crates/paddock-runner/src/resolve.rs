//! Finding the program an action names, as REAPI 2.3 describes: an absolute path, a
//! path relative to the working directory, or a bare name looked up in the Command's
//! `PATH` (or a default one when the Command sets none).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where bare program names are looked up when the Command sets no `PATH`.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Resolves `program` for a command running in `working_dir` with `environment`.
/// `root` maps absolute paths, for runners whose commands see a different root.
pub fn resolve_program(
    program: &str,
    working_dir: &Path,
    environment: &[(String, String)],
    root: &Path,
) -> Result<PathBuf, String> {
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    if program.contains('/') {
        let path = Path::new(program);
        let (shown, real) = if path.is_absolute() {
            (path.to_owned(), inside(path))
        } else {
            (working_dir.join(path), working_dir.join(path))
        };
        return if is_executable(&real) {
            Ok(shown)
        } else {
            Err(format!(
                "cannot run {program:?}: no executable file at that path"
            ))
        };
    }
    let search = environment
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    for dir in search.split(':').filter(|d| !d.is_empty()) {
        let dir = Path::new(dir);
        let (shown, real) = if dir.is_absolute() {
            (dir.join(program), inside(dir).join(program))
        } else {
            (
                working_dir.join(dir).join(program),
                working_dir.join(dir).join(program),
            )
        };
        if is_executable(&real) {
            return Ok(shown);
        }
    }
    Err(format!(
        "cannot run {program:?}: not found in PATH {search:?}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_absolute_relative_and_bare_names() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("bin/tool");
        std::fs::create_dir_all(tool.parent().unwrap()).unwrap();
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = Path::new("/");
        assert_eq!(
            resolve_program("bin/tool", dir.path(), &[], root).unwrap(),
            dir.path().join("bin/tool")
        );
        let env = vec![("PATH".to_string(), "bin:/nonexistent".to_string())];
        assert_eq!(
            resolve_program("tool", dir.path(), &env, root).unwrap(),
            tool
        );
        assert!(
            resolve_program("sh", dir.path(), &[], root).is_ok(),
            "default PATH"
        );
        assert!(resolve_program("no-such-tool", dir.path(), &env, root).is_err());
        assert!(resolve_program("./missing", dir.path(), &[], root).is_err());
        assert!(resolve_program("/bin/sh", dir.path(), &[], root).is_ok());
    }
}
