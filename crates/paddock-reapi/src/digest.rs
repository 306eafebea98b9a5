//! SHA-256 content digests, parsed strictly.
//!
//! A [`Digest`] can only be built from a 64-character lowercase hex hash and a
//! non-negative size, so code that holds one never re-validates it.

use std::fmt;

use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::proto::re;

/// Why a digest from a client was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest is missing")]
    Missing,
    #[error("digest hash {0:?} is not 64 lowercase hexadecimal characters (SHA-256)")]
    BadHash(String),
    #[error("digest size_bytes {0} is negative")]
    NegativeSize(i64),
    #[error("digest size {0:?} is not a non-negative decimal integer")]
    BadSize(String),
    #[error("digest function {0} is not supported: this server uses SHA256 only")]
    UnsupportedFunction(i32),
    #[error("digest {0:?} is not written HASH/SIZE")]
    NotHashSlashSize(String),
}

/// A validated SHA-256 digest: the hash of a blob and its size in bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Digest {
    hash: [u8; 32],
    size: u64,
}

/// Hash tables keyed by digests feed only eight bytes of the SHA-256 to their hasher:
/// those bytes are already uniformly distributed, and equality still compares all.
impl std::hash::Hash for Digest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&self.hash[..8]);
        state.write_u64(u64::from_le_bytes(prefix));
    }
}

impl Digest {
    /// The digest of the empty blob, which REAPI servers must always hold.
    pub const EMPTY: Digest = Digest {
        hash: [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f,
            0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b,
            0x78, 0x52, 0xb8, 0x55,
        ],
        size: 0,
    };

    pub fn new(hash: [u8; 32], size: u64) -> Self {
        Digest { hash, size }
    }

    /// Parses a hash in REAPI form (lowercase hex) and a size.
    pub fn parse(hash: &str, size: i64) -> Result<Self, DigestError> {
        if size < 0 {
            return Err(DigestError::NegativeSize(size));
        }
        Ok(Digest {
            hash: parse_hash(hash)?,
            size: size as u64,
        })
    }

    /// Parses the `{hash}` and `{size}` segments of a resource name or a file name.
    pub fn parse_parts(hash: &str, size: &str) -> Result<Self, DigestError> {
        if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) {
            return Err(DigestError::BadSize(size.to_owned()));
        }
        let size: u64 = size
            .parse()
            .map_err(|_| DigestError::BadSize(size.to_owned()))?;
        if size > i64::MAX as u64 {
            return Err(DigestError::BadSize(size.to_string()));
        }
        Ok(Digest {
            hash: parse_hash(hash)?,
            size,
        })
    }

    /// Validates a digest from a request; `None` is an error.
    pub fn from_proto(digest: Option<&re::Digest>) -> Result<Self, DigestError> {
        let digest = digest.ok_or(DigestError::Missing)?;
        Digest::parse(&digest.hash, digest.size_bytes)
    }

    pub fn to_proto(&self) -> re::Digest {
        re::Digest {
            hash: self.hash_hex(),
            size_bytes: self.size as i64,
        }
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest {
            hash: Sha256::digest(data).into(),
            size: data.len() as u64,
        }
    }

    /// Encodes a message canonically and returns its digest with the encoding.
    pub fn of_message<M: Message>(message: &M) -> (Self, Vec<u8>) {
        let bytes = message.encode_to_vec();
        (Digest::of(&bytes), bytes)
    }

    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_empty_blob(&self) -> bool {
        *self == Digest::EMPTY
    }

    /// The `blobs/{hash}/{size}` subject REAPI uses in `PreconditionFailure`s.
    pub fn blob_subject(&self) -> String {
        format!("blobs/{}/{}", self.hash_hex(), self.size)
    }
}

/// Decodes 64 lowercase hex digits in one pass; anything else is refused. This runs for
/// every digest of every request (ten thousand per FindMissingBlobs), so it is lean.
fn parse_hash(hash: &str) -> Result<[u8; 32], DigestError> {
    fn nibble(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        }
    }
    let bad = || DigestError::BadHash(hash.chars().take(80).collect());
    let bytes = hash.as_bytes();
    if bytes.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0]).ok_or_else(bad)? << 4) | nibble(pair[1]).ok_or_else(bad)?;
    }
    Ok(out)
}

/// Checks the `digest_function` of a request: unset or SHA256.
pub fn check_digest_function(value: i32) -> Result<(), DigestError> {
    match re::digest_function::Value::try_from(value) {
        Ok(re::digest_function::Value::Unknown) | Ok(re::digest_function::Value::Sha256) => Ok(()),
        _ => Err(DigestError::UnsupportedFunction(value)),
    }
}

/// The inverse of `Display`: `HASH/SIZE`.
impl std::str::FromStr for Digest {
    type Err = DigestError;

    fn from_str(text: &str) -> Result<Self, DigestError> {
        let (hash, size) = text
            .split_once('/')
            .ok_or_else(|| DigestError::NotHashSlashSize(text.to_owned()))?;
        Digest::parse_parts(hash, size)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash_hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Hashes a blob as it streams past and says whether it matched what was promised.
#[derive(Clone, Default)]
pub struct DigestHasher {
    sha: Sha256,
    len: u64,
}

impl DigestHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.len += data.len() as u64;
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> Digest {
        Digest {
            hash: self.sha.finalize().into(),
            size: self.len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_blob_constant_matches_sha256_of_nothing() {
        assert_eq!(Digest::of(b""), Digest::EMPTY);
        assert!(Digest::EMPTY.is_empty_blob());
    }

    #[test]
    fn parse_rejects_malformed_hashes_and_sizes() {
        let good = Digest::EMPTY.hash_hex();
        assert!(Digest::parse(&good, 0).is_ok());
        assert_eq!(Digest::parse(&good, -1), Err(DigestError::NegativeSize(-1)));
        assert!(matches!(
            Digest::parse(&good.to_uppercase(), 0),
            Err(DigestError::BadHash(_))
        ));
        assert!(matches!(
            Digest::parse(&good[..63], 0),
            Err(DigestError::BadHash(_))
        ));
        assert!(matches!(
            Digest::parse_parts(&good, "+3"),
            Err(DigestError::BadSize(_))
        ));
        assert!(matches!(
            Digest::parse_parts(&good, "99999999999999999999"),
            Err(DigestError::BadSize(_))
        ));
        assert_eq!(Digest::from_proto(None), Err(DigestError::Missing));
    }

    #[test]
    fn streaming_hash_equals_one_shot_hash() {
        let mut hasher = DigestHasher::new();
        hasher.update(b"hello ");
        hasher.update(b"world");
        assert_eq!(hasher.finish(), Digest::of(b"hello world"));
    }

    #[test]
    fn digest_functions() {
        assert!(check_digest_function(0).is_ok());
        assert!(check_digest_function(1).is_ok());
        assert!(check_digest_function(2).is_err());
        assert!(check_digest_function(99).is_err());
    }
}
