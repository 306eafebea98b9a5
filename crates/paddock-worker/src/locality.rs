//! What the worker tells the scheduler it holds, so that actions go where their
//! inputs already are: the digests of the input directories it laid out lately (a
//! bounded, least recently used set; their files went through the blob cache),
//! summarized as a Bloom filter and sent with a heartbeat when it changed.

use hashlink::LinkedHashMap;
use paddock_proto::worker::v1 as wire;
use paddock_reapi::filter::DigestFilter;
use paddock_reapi::Digest;
use parking_lot::Mutex;

/// Directories remembered; the filter is sized for them (about 5 KiB).
const REMEMBERED: usize = 4_096;

#[derive(Default)]
pub struct RecentTrees {
    state: Mutex<Recent>,
}

#[derive(Default)]
struct Recent {
    directories: LinkedHashMap<Digest, ()>,
    /// Counts changes, so that an unchanged set is not sent again.
    generation: u64,
}

impl RecentTrees {
    /// Notes the directories of an input tree just laid out.
    pub fn note(&self, directories: impl IntoIterator<Item = Digest>) {
        let mut state = self.state.lock();
        for digest in directories {
            if state.directories.to_back(&digest).is_none() {
                state.directories.insert(digest, ());
                state.generation += 1;
            }
        }
        while state.directories.len() > REMEMBERED {
            state.directories.pop_front();
        }
    }

    /// The summary, if the set changed since generation `sent` (updated).
    pub fn summary_since(&self, sent: &mut u64) -> Option<wire::CacheSummary> {
        let state = self.state.lock();
        if state.generation == *sent {
            return None;
        }
        *sent = state.generation;
        let mut filter = DigestFilter::with_capacity(REMEMBERED);
        for digest in state.directories.keys() {
            filter.insert(digest);
        }
        Some(wire::CacheSummary {
            bloom: filter.bits().to_vec(),
            hashes: filter.hashes(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_is_sent_when_the_set_changed_and_holds_what_was_noted() {
        let recent = RecentTrees::default();
        let mut sent = 0;
        assert!(recent.summary_since(&mut sent).is_none());
        let tree = [Digest::of(b"root"), Digest::of(b"sub")];
        recent.note(tree);
        let summary = recent.summary_since(&mut sent).expect("changed");
        let filter = DigestFilter::from_parts(summary.bloom, summary.hashes).unwrap();
        assert!(tree.iter().all(|d| filter.contains(d)));
        assert!(recent.summary_since(&mut sent).is_none(), "unchanged");
        recent.note([Digest::of(b"root")]);
        assert!(recent.summary_since(&mut sent).is_none(), "seen before");
    }
}
