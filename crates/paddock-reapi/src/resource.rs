//! ByteStream resource names for CAS blobs.
//!
//! Reads name `{instance}/blobs/{hash}/{size}`; writes name
//! `{instance}/uploads/{uuid}/blobs/{hash}/{size}{/optional_metadata}`. Either may
//! carry its data compressed instead: `compressed-blobs/{compressor}/` in place of
//! `blobs/`, with the digest still of the uncompressed data. The instance name may
//! span several segments (or none), so parsing looks for the first keyword.

use crate::digest::{Digest, DigestError};

/// Path segments that REAPI reserves; an instance name never contains them.
const RESERVED: &[&str] = &[
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

/// The lowercase names of REAPI digest functions, which may precede the hash.
const DIGEST_FUNCTIONS: &[&str] = &[
    "sha256",
    "sha1",
    "md5",
    "vso",
    "sha384",
    "sha512",
    "murmur3",
    "sha256tree",
    "blake3",
    "gitsha1",
];

/// Why a resource name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("resource name is empty")]
    Empty,
    #[error("resource name {0:?} has no `blobs/{{hash}}/{{size}}` part")]
    NoBlobs(String),
    #[error("resource name {0:?} is not of the form `{{instance}}/uploads/{{uuid}}/blobs/{{hash}}/{{size}}`")]
    NotAnUpload(String),
    #[error("resource name {0:?} has an empty path segment in its instance name")]
    EmptySegment(String),
    #[error("resource name {0:?} has unexpected segments after the size")]
    TrailingSegments(String),
    #[error(
        "compressor {0:?} is not supported: this server offers zstd (see supported_compressors)"
    )]
    Compressor(String),
    #[error(
        "digest function {0:?} in the resource name is not supported: this server uses SHA256"
    )]
    DigestFunction(String),
    #[error("resource name {name:?}: {error}")]
    Digest { name: String, error: DigestError },
}

/// How a resource's bytes travel; the digest is always of the uncompressed data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compressor {
    /// `blobs/`: as they are.
    Identity,
    /// `compressed-blobs/zstd/`: one or more Zstandard frames.
    Zstd,
}

/// A parsed read resource: `{instance}/blobs/{hash}/{size}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResource {
    pub instance: String,
    pub digest: Digest,
    pub compressor: Compressor,
}

/// A parsed upload resource: `{instance}/uploads/{uuid}/blobs/{hash}/{size}[/...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteResource {
    pub instance: String,
    pub uuid: String,
    pub digest: Digest,
    pub compressor: Compressor,
}

pub fn parse_read(name: &str) -> Result<ReadResource, ResourceError> {
    let segments = split(name)?;
    let at = segments
        .iter()
        .position(|s| RESERVED.contains(s))
        .ok_or_else(|| ResourceError::NoBlobs(name.to_owned()))?;
    let instance = instance_name(name, &segments[..at])?;
    let (digest, compressor, rest) = blob_part(name, &segments[at..])?;
    if !rest.is_empty() {
        return Err(ResourceError::TrailingSegments(name.to_owned()));
    }
    Ok(ReadResource {
        instance,
        digest,
        compressor,
    })
}

pub fn parse_write(name: &str) -> Result<WriteResource, ResourceError> {
    let segments = split(name)?;
    let at = segments
        .iter()
        .position(|s| RESERVED.contains(s))
        .ok_or_else(|| ResourceError::NotAnUpload(name.to_owned()))?;
    if segments[at] != "uploads" || segments.len() < at + 2 || segments[at + 1].is_empty() {
        return Err(ResourceError::NotAnUpload(name.to_owned()));
    }
    let instance = instance_name(name, &segments[..at])?;
    let uuid = segments[at + 1].to_owned();
    // Anything after the size is optional metadata, which this server ignores.
    let (digest, compressor, _metadata) = blob_part(name, &segments[at + 2..])?;
    Ok(WriteResource {
        instance,
        uuid,
        digest,
        compressor,
    })
}

/// The resource name a client reads a blob with.
pub fn read_name(instance: &str, digest: &Digest) -> String {
    join_instance(
        instance,
        &format!("blobs/{}/{}", digest.hash_hex(), digest.size()),
    )
}

/// The resource name a client uploads a blob with.
pub fn write_name(instance: &str, uuid: &str, digest: &Digest) -> String {
    join_instance(
        instance,
        &format!(
            "uploads/{uuid}/blobs/{}/{}",
            digest.hash_hex(),
            digest.size()
        ),
    )
}

fn join_instance(instance: &str, rest: &str) -> String {
    if instance.is_empty() {
        rest.to_owned()
    } else {
        format!("{instance}/{rest}")
    }
}

fn split(name: &str) -> Result<Vec<&str>, ResourceError> {
    if name.is_empty() {
        return Err(ResourceError::Empty);
    }
    Ok(name.split('/').collect())
}

fn instance_name(name: &str, segments: &[&str]) -> Result<String, ResourceError> {
    if segments.iter().any(|s| s.is_empty()) {
        return Err(ResourceError::EmptySegment(name.to_owned()));
    }
    Ok(segments.join("/"))
}

/// Parses `blobs/{function/}{hash}/{size}` (or `compressed-blobs/{compressor}/...`)
/// and returns the digest, the compressor and what follows.
fn blob_part<'a>(
    name: &str,
    segments: &'a [&'a str],
) -> Result<(Digest, Compressor, &'a [&'a str]), ResourceError> {
    let (compressor, mut rest) = match segments {
        ["blobs", rest @ ..] => (Compressor::Identity, rest),
        ["compressed-blobs", "zstd", rest @ ..] => (Compressor::Zstd, rest),
        ["compressed-blobs", other, ..] => return Err(ResourceError::Compressor((*other).into())),
        _ => return Err(ResourceError::NoBlobs(name.to_owned())),
    };
    if let Some(&function) = rest.first().filter(|s| DIGEST_FUNCTIONS.contains(s)) {
        // REAPI says SHA-256 is implied and left out; accept it spelled out all the same.
        if function != "sha256" {
            return Err(ResourceError::DigestFunction(function.to_owned()));
        }
        rest = &rest[1..];
    }
    let [hash, size, tail @ ..] = rest else {
        return Err(ResourceError::NoBlobs(name.to_owned()));
    };
    let digest = Digest::parse_parts(hash, size).map_err(|error| ResourceError::Digest {
        name: name.to_owned(),
        error,
    })?;
    Ok((digest, compressor, tail))
}

/// The resource name a client reads a compressed blob with.
pub fn compressed_read_name(instance: &str, digest: &Digest) -> String {
    join_instance(
        instance,
        &format!(
            "compressed-blobs/zstd/{}/{}",
            digest.hash_hex(),
            digest.size()
        ),
    )
}

/// The resource name a client uploads a compressed blob with.
pub fn compressed_write_name(instance: &str, uuid: &str, digest: &Digest) -> String {
    join_instance(
        instance,
        &format!(
            "uploads/{uuid}/compressed-blobs/zstd/{}/{}",
            digest.hash_hex(),
            digest.size()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash() -> String {
        Digest::EMPTY.hash_hex()
    }

    #[test]
    fn reads_with_any_instance_name() {
        let h = hash();
        let r = parse_read(&format!("blobs/{h}/0")).unwrap();
        assert_eq!(r.instance, "");
        assert_eq!(r.digest, Digest::EMPTY);
        let r = parse_read(&format!("a/b/c/blobs/{h}/0")).unwrap();
        assert_eq!(r.instance, "a/b/c");
        assert_eq!(
            read_name("a/b/c", &Digest::EMPTY),
            format!("a/b/c/blobs/{h}/0")
        );
    }

    #[test]
    fn compressed_names_carry_their_compressor() {
        let r = parse_read(&compressed_read_name("a/b", &Digest::EMPTY)).unwrap();
        assert_eq!(
            (r.instance.as_str(), r.compressor),
            ("a/b", Compressor::Zstd)
        );
        let w = parse_write(&compressed_write_name("", "u", &Digest::EMPTY)).unwrap();
        assert_eq!((w.uuid.as_str(), w.compressor), ("u", Compressor::Zstd));
        let plain = parse_read(&read_name("", &Digest::EMPTY)).unwrap();
        assert_eq!(plain.compressor, Compressor::Identity);
    }

    #[test]
    fn writes_keep_uuid_and_ignore_metadata() {
        let h = hash();
        let w = parse_write(&format!("main/uploads/u-1/blobs/{h}/0/extra/meta")).unwrap();
        assert_eq!(w.instance, "main");
        assert_eq!(w.uuid, "u-1");
        let w = parse_write(&write_name("", "x", &Digest::EMPTY)).unwrap();
        assert_eq!(w.instance, "");
    }

    #[test]
    fn refuses_malformed_names() {
        let h = hash();
        assert_eq!(parse_read(""), Err(ResourceError::Empty));
        assert!(matches!(
            parse_read("main/nothing"),
            Err(ResourceError::NoBlobs(_))
        ));
        assert!(matches!(
            parse_read(&format!("main/blobs/{h}")),
            Err(ResourceError::NoBlobs(_))
        ));
        assert!(matches!(
            parse_read(&format!("main/blobs/{h}/-1")),
            Err(ResourceError::Digest { .. })
        ));
        assert!(matches!(
            parse_read(&format!("main/blobs/{h}/0/x")),
            Err(ResourceError::TrailingSegments(_))
        ));
        assert!(matches!(
            parse_read(&format!("a//b/blobs/{h}/0")),
            Err(ResourceError::EmptySegment(_))
        ));
        assert!(matches!(
            parse_read(&format!("main/compressed-blobs/deflate/{h}/0")),
            Err(ResourceError::Compressor(_))
        ));
        assert!(matches!(
            parse_read(&format!("main/compressed-blobs/{h}/0")),
            Err(ResourceError::Compressor(_))
        ));
        assert!(matches!(
            parse_read(&format!("main/blobs/blake3/{h}/0")),
            Err(ResourceError::DigestFunction(_))
        ));
        assert!(parse_read(&format!("main/blobs/sha256/{h}/0")).is_ok());
        assert!(matches!(
            parse_write(&format!("main/blobs/{h}/0")),
            Err(ResourceError::NotAnUpload(_))
        ));
        assert!(matches!(
            parse_write(&format!("main/uploads//blobs/{h}/0")),
            Err(ResourceError::NotAnUpload(_))
        ));
        assert!(matches!(
            parse_write(&format!("main/uploads/u/blobs/{}/0", &h[1..])),
            Err(ResourceError::Digest { .. })
        ));
    }
}
