//! The value of the `container-image` platform property.
//!
//! Two forms, as Google RBE, Buildfarm and BuildBuddy write them:
//! `docker://REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]` for an image in a registry, and
//! `oci-layout:/ABSOLUTE/PATH@sha256:DIGEST` for an image already in an OCI layout
//! directory on the worker. Only SHA-256 digests are accepted.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use oci_client::Reference;

/// Where an image comes from, and whether the platform pins its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    Registry {
        /// Registry, repository and tag, without the digest.
        name: Reference,
        /// `sha256:HEX` of the manifest (or index), when the property pins it.
        digest: Option<String>,
        /// Whether the property names a tag (the parser adds `latest` otherwise).
        tagged: bool,
    },
    Layout {
        dir: PathBuf,
        digest: String,
    },
}

impl ImageRef {
    pub fn parse(value: &str) -> Result<ImageRef, String> {
        let value = value.trim();
        if let Some(rest) = value.strip_prefix("docker://") {
            let (name, digest) = match rest.rsplit_once('@') {
                Some((name, digest)) => (name, Some(check_digest(value, digest)?)),
                None => (rest, None),
            };
            if name.is_empty() {
                return Err(format!("{value:?} names no image"));
            }
            let tagged = name
                .rsplit('/')
                .next()
                .is_some_and(|last| last.contains(':'));
            let name: Reference = name
                .parse()
                .map_err(|e| format!("{value:?} is not an image reference: {e}"))?;
            return Ok(ImageRef::Registry {
                name,
                digest,
                tagged,
            });
        }
        if let Some(rest) = value.strip_prefix("oci-layout:") {
            let (dir, digest) = rest.rsplit_once('@').ok_or_else(|| {
                format!("{value:?}: an oci-layout image needs its digest, PATH@sha256:HEX")
            })?;
            let dir = PathBuf::from(dir);
            let normal = dir.is_absolute()
                && dir
                    .components()
                    .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
            if !normal {
                return Err(format!(
                    "{value:?}: the layout directory must be an absolute path without `.` or `..`"
                ));
            }
            return Ok(ImageRef::Layout {
                dir,
                digest: check_digest(value, digest)?,
            });
        }
        Err(format!(
            "{value:?} is not an image: use docker://REGISTRY/REPOSITORY[:TAG]@sha256:DIGEST \
             or oci-layout:/PATH@sha256:DIGEST"
        ))
    }

    /// The registry host (`HOST[:PORT]`) of a registry image.
    pub fn registry(&self) -> Option<&str> {
        match self {
            ImageRef::Registry { name, .. } => Some(name.resolve_registry()),
            ImageRef::Layout { .. } => None,
        }
    }

    pub fn layout_dir(&self) -> Option<&Path> {
        match self {
            ImageRef::Layout { dir, .. } => Some(dir),
            ImageRef::Registry { .. } => None,
        }
    }

    /// The pinned manifest digest, if there is one.
    pub fn digest(&self) -> Option<&str> {
        match self {
            ImageRef::Registry { digest, .. } => digest.as_deref(),
            ImageRef::Layout { digest, .. } => Some(digest),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Registry {
                name,
                digest,
                tagged,
            } => {
                write!(f, "docker://{}/{}", name.registry(), name.repository())?;
                if let (Some(tag), true) = (name.tag(), *tagged || digest.is_none()) {
                    write!(f, ":{tag}")?;
                }
                match digest {
                    Some(digest) => write!(f, "@{digest}"),
                    None => Ok(()),
                }
            }
            ImageRef::Layout { dir, digest } => {
                write!(f, "oci-layout:{}@{digest}", dir.display())
            }
        }
    }
}

/// `sha256:` and 64 lowercase hex digits.
pub fn check_digest(value: &str, digest: &str) -> Result<String, String> {
    let valid = digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    match valid {
        true => Ok(digest.to_owned()),
        false => Err(format!(
            "{value:?}: {digest:?} is not a digest of the form sha256:<64 lowercase hex digits>"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn registry_references() {
        let pinned =
            ImageRef::parse(&format!("docker://127.0.0.1:5000/tools/cc@sha256:{HEX}")).unwrap();
        assert_eq!(
            pinned.to_string(),
            format!("docker://127.0.0.1:5000/tools/cc@sha256:{HEX}")
        );
        assert_eq!(pinned.registry(), Some("127.0.0.1:5000"));
        assert_eq!(pinned.digest(), Some(format!("sha256:{HEX}").as_str()));
        let both = ImageRef::parse(&format!("docker://ghcr.io/a/b:v1@sha256:{HEX}")).unwrap();
        assert_eq!(
            both.to_string(),
            format!("docker://ghcr.io/a/b:v1@sha256:{HEX}")
        );
        let tagged = ImageRef::parse("docker://localhost:5000/busybox:1.36").unwrap();
        assert_eq!(tagged.to_string(), "docker://localhost:5000/busybox:1.36");
        assert_eq!(tagged.digest(), None);
        assert_eq!(tagged.registry(), Some("localhost:5000"));
        // Docker Hub's short names.
        let hub = ImageRef::parse("docker://ubuntu:22.04").unwrap();
        assert_eq!(hub.registry(), Some("index.docker.io"));
    }

    #[test]
    fn layout_references() {
        let layout = ImageRef::parse(&format!("oci-layout:/srv/images/cc@sha256:{HEX}")).unwrap();
        assert_eq!(layout.layout_dir(), Some(Path::new("/srv/images/cc")));
        for bad in [
            "oci-layout:/srv/images/cc".to_owned(),
            format!("oci-layout:relative/cc@sha256:{HEX}"),
            format!("oci-layout:/srv/../etc@sha256:{HEX}"),
        ] {
            assert!(ImageRef::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn malformed_references_are_refused_with_the_form() {
        for bad in [
            "ubuntu:22.04".to_owned(),
            "docker://".to_owned(),
            format!("docker://ghcr.io/a/b@sha512:{HEX}"),
            "docker://ghcr.io/a/b@sha256:ABC".to_owned(),
            format!("docker://ghcr.io/a/b@sha256:{}", HEX.to_uppercase()),
            "docker://ghcr.io/a/b:".to_owned(),
        ] {
            let err = ImageRef::parse(&bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }
}
