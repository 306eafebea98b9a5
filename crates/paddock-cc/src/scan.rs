//! Finding what a compile reads, by asking the compiler itself: the same flags with
//! `-M`, which lists every file the preprocessor opens (system headers included).

use std::path::{Component, Path, PathBuf};
use std::process::Stdio;

/// Why the scan gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("running {0}: {1}")]
    Spawn(String, std::io::Error),
    /// The compiler refused (a missing header, a bad flag): the compile itself will
    /// fail, so it runs locally to say so exactly as it would.
    #[error("the compiler's dependency scan failed")]
    Failed,
    #[error("the compiler's dependency list is unreadable: {0}")]
    Unreadable(String),
}

/// The files `compiler` reads for a compile with `scan_args`, as absolute, lexically
/// normal paths (relative ones are taken from `cwd`).
pub fn dependencies(
    compiler: &Path,
    scan_args: &[String],
    cwd: &Path,
) -> Result<Vec<PathBuf>, ScanError> {
    let output = std::process::Command::new(compiler)
        .args(scan_args)
        .args(["-M", "-MT", "paddock-scan"])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| ScanError::Spawn(compiler.display().to_string(), e))?;
    if !output.status.success() {
        return Err(ScanError::Failed);
    }
    let text =
        String::from_utf8(output.stdout).map_err(|_| ScanError::Unreadable("not UTF-8".into()))?;
    let rule = text
        .strip_prefix("paddock-scan:")
        .ok_or_else(|| ScanError::Unreadable("no rule for the scan's target".into()))?;
    Ok(make_words(rule)
        .into_iter()
        .map(|word| normal(&cwd.join(word)))
        .collect())
}

/// The words of a make prerequisite list: whitespace-separated, with `\` before a
/// newline continuing the line, `\ ` and `\#` escaping, and `$$` for `$`.
fn make_words(rule: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = rule.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some('\n') => {
                    chars.next();
                    if !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                }
                Some(' ') | Some('#') | Some('\\') => word.push(chars.next().expect("peeked")),
                _ => word.push('\\'),
            },
            '$' if chars.peek() == Some(&'$') => {
                chars.next();
                word.push('$');
            }
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// `path` without `.` and with `..` taken lexically (as the compiler names it).
pub fn normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_rules_split_into_paths() {
        let words =
            make_words(" src/a.c include/a.h \\\n /usr/include/stdio.h my\\ dir/x.h cost$$.h\n");
        assert_eq!(
            words,
            [
                "src/a.c",
                "include/a.h",
                "/usr/include/stdio.h",
                "my dir/x.h",
                "cost$.h"
            ]
        );
        assert_eq!(
            normal(Path::new("/p/build/../src/./a.c")),
            PathBuf::from("/p/src/a.c")
        );
    }
}
