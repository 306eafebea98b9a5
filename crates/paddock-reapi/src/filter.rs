//! A compact, lossy summary of a set of digests (a Bloom filter): what a worker
//! tells the scheduler it holds, in about ten bits per digest. Membership may be
//! wrongly claimed (about 1% of the time at the intended fill) but never wrongly
//! denied. Digests are SHA-256 already, so the filter's hashes are slices of the
//! digest itself.

use crate::Digest;

/// The largest filter accepted from the network, and the most hashes.
pub const MAX_FILTER_BYTES: usize = 64 * 1024;
pub const MAX_FILTER_HASHES: u32 = 16;

/// A Bloom filter over digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestFilter {
    bits: Vec<u8>,
    hashes: u32,
}

impl DigestFilter {
    /// An empty filter sized for `items` digests at about 1% false positives (ten
    /// bits and seven hashes per digest), within [`MAX_FILTER_BYTES`].
    pub fn with_capacity(items: usize) -> DigestFilter {
        let bytes = (items.max(1) * 10).div_ceil(8).min(MAX_FILTER_BYTES);
        DigestFilter {
            bits: vec![0; bytes],
            hashes: 7,
        }
    }

    /// A filter received from elsewhere, checked against the bounds.
    pub fn from_parts(bits: Vec<u8>, hashes: u32) -> Result<DigestFilter, String> {
        if bits.is_empty() || bits.len() > MAX_FILTER_BYTES {
            return Err(format!(
                "a digest filter has 1 to {MAX_FILTER_BYTES} bytes, not {}",
                bits.len()
            ));
        }
        if !(1..=MAX_FILTER_HASHES).contains(&hashes) {
            return Err(format!(
                "a digest filter uses 1 to {MAX_FILTER_HASHES} hashes, not {hashes}"
            ));
        }
        Ok(DigestFilter { bits, hashes })
    }

    pub fn bits(&self) -> &[u8] {
        &self.bits
    }

    pub fn hashes(&self) -> u32 {
        self.hashes
    }

    pub fn insert(&mut self, digest: &Digest) {
        for bit in self.positions(digest) {
            self.bits[bit / 8] |= 1 << (bit % 8);
        }
    }

    /// Whether `digest` may be in the set (never false for one inserted).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.positions(digest)
            .all(|bit| self.bits[bit / 8] & (1 << (bit % 8)) != 0)
    }

    /// Double hashing over two 64-bit slices of the digest's hash.
    fn positions(&self, digest: &Digest) -> impl Iterator<Item = usize> {
        let hash = digest.hash();
        let first = u64::from_le_bytes(hash[0..8].try_into().expect("8 bytes"));
        let step = u64::from_le_bytes(hash[8..16].try_into().expect("8 bytes")) | 1;
        let size = self.bits.len() as u64 * 8;
        (0..u64::from(self.hashes))
            .map(move |i| (first.wrapping_add(i.wrapping_mul(step)) % size) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_found_and_strangers_mostly_not() {
        let mut filter = DigestFilter::with_capacity(1_000);
        let members: Vec<Digest> = (0..1_000)
            .map(|i| Digest::of(format!("in {i}").as_bytes()))
            .collect();
        for d in &members {
            filter.insert(d);
        }
        assert!(members.iter().all(|d| filter.contains(d)));
        let false_positives = (0..10_000)
            .filter(|i| filter.contains(&Digest::of(format!("out {i}").as_bytes())))
            .count();
        assert!(false_positives < 300, "{false_positives} of 10000");
        let again = DigestFilter::from_parts(filter.bits().to_vec(), filter.hashes()).unwrap();
        assert!(members.iter().all(|d| again.contains(d)));
    }

    #[test]
    fn filters_beyond_the_bounds_are_refused() {
        assert!(DigestFilter::from_parts(Vec::new(), 7).is_err());
        assert!(DigestFilter::from_parts(vec![0; MAX_FILTER_BYTES + 1], 7).is_err());
        assert!(DigestFilter::from_parts(vec![0; 8], 0).is_err());
        assert!(DigestFilter::from_parts(vec![0; 8], 17).is_err());
    }
}
