//! Static credentials from an AWS shared credentials file, for hosts that keep them
//! there rather than in the environment. Nothing here is ever logged.

use std::path::{Path, PathBuf};

/// An access key and its secret, with a session token for temporary ones.
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// Why the credentials file could not be used; the operator's to fix.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("reading the credentials file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the credentials file {path} has no profile [{profile}] with aws_access_key_id and aws_secret_access_key")]
    NoProfile { path: PathBuf, profile: String },
}

/// The file to read, if any: `configured`; otherwise, when the environment holds
/// no key of its own, `AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials` if it
/// exists.
pub fn file_to_read(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = configured {
        return Some(path.to_owned());
    }
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_some() {
        return None;
    }
    if let Some(path) = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
        return Some(PathBuf::from(path));
    }
    let default = PathBuf::from(std::env::var_os("HOME")?).join(".aws/credentials");
    default.exists().then_some(default)
}

/// Reads `profile` (or `AWS_PROFILE`, or `default`) from the file at `path`.
pub fn read(path: &Path, profile: Option<&str>) -> Result<StaticCredentials, CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|error| CredentialsError::Read {
        path: path.to_owned(),
        error,
    })?;
    let profile = profile
        .map(str::to_owned)
        .or_else(|| std::env::var("AWS_PROFILE").ok())
        .unwrap_or_else(|| "default".into());
    parse(&text, &profile).ok_or_else(|| CredentialsError::NoProfile {
        path: path.to_owned(),
        profile,
    })
}

/// The keys of section `[profile]` of an INI text.
fn parse(text: &str, profile: &str) -> Option<StaticCredentials> {
    let (mut in_profile, mut id, mut secret, mut token) = (false, None, None, None);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = section.trim() == profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = Some(value.trim().to_owned());
        match key.trim() {
            "aws_access_key_id" => id = value,
            "aws_secret_access_key" => secret = value,
            "aws_session_token" => token = value,
            _ => {}
        }
    }
    Some(StaticCredentials {
        access_key_id: id.filter(|v| !v.is_empty())?,
        secret_access_key: secret.filter(|v| !v.is_empty())?,
        session_token: token.filter(|v| !v.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_named_profile_only() {
        let text = "# comment\n[default]\naws_access_key_id = A1\naws_secret_access_key=S1\n\n\
                    [build]\naws_access_key_id = A2\naws_secret_access_key = S2\naws_session_token = T2\n";
        let default = parse(text, "default").unwrap();
        assert_eq!(
            (
                default.access_key_id.as_str(),
                default.secret_access_key.as_str()
            ),
            ("A1", "S1")
        );
        assert!(default.session_token.is_none());
        let build = parse(text, "build").unwrap();
        assert_eq!(build.session_token.as_deref(), Some("T2"));
        assert!(parse(text, "other").is_none());
        assert!(parse("[default]\naws_access_key_id = A\n", "default").is_none());
    }
}
