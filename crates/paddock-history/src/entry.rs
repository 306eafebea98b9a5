//! The history's changes as they are kept lasting: each change is an [`Entry`] that
//! the history applies the same way whether it was made here a moment ago, read
//! back at start-up, or made by another server sharing the store. Entries are JSON
//! (one per line in a file, one per row in a database); results inside them are
//! their protobuf encoding, in base64.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use paddock_reapi::proto::re::ActionResult;
use paddock_reapi::Digest;
use serde::{Deserialize, Serialize};

use crate::{BuildReport, HealthSample, Outcome, StandingChange};

/// One change to the history.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// An action served within an invocation.
    Action(ActionEntry),
    /// An invocation's build report as it now stands (it replaces any earlier one).
    Build(BuildEntry),
    /// A worker's change of standing.
    Standing(StandingChange),
    /// A pool's queue depth reached a new high for its minute.
    QueueDepth(QueueDepth),
    /// A sample of a worker's health window.
    Health(HealthEntry),
}

/// An action served within an invocation, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActionEntry {
    pub at: SystemTime,
    pub identity: String,
    pub invocation: String,
    pub instance: String,
    /// The client's tool and version, when it said.
    pub tool: String,
    #[serde(with = "digest_text")]
    pub digest: Digest,
    pub mnemonic: String,
    pub target: String,
    pub outcome: Outcome,
    #[serde(with = "result_base64")]
    pub result: Option<Arc<ActionResult>>,
}

/// An invocation's build report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildEntry {
    pub at: SystemTime,
    pub identity: String,
    pub invocation: String,
    pub report: BuildReport,
}

/// The deepest a pool's queue was in the minute of `at`, so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueDepth {
    pub at: SystemTime,
    pub pool: String,
    pub queued: u64,
}

/// A worker's health window, sampled.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthEntry {
    pub at: SystemTime,
    pub worker: String,
    pub sample: HealthSample,
}

impl Entry {
    /// A short name of the kind, as stores file it.
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Action(_) => "action",
            Entry::Build(_) => "build",
            Entry::Standing(_) => "standing",
            Entry::QueueDepth(_) => "queue_depth",
            Entry::Health(_) => "health",
        }
    }

    /// When the change was made.
    pub fn at(&self) -> SystemTime {
        match self {
            Entry::Action(e) => e.at,
            Entry::Build(e) => e.at,
            Entry::Standing(e) => e.at,
            Entry::QueueDepth(e) => e.at,
            Entry::Health(e) => e.at,
        }
    }

    /// The invocation it belongs to, as (identity, invocation id), if any.
    pub fn invocation(&self) -> Option<(&str, &str)> {
        match self {
            Entry::Action(e) => Some((&e.identity, &e.invocation)),
            Entry::Build(e) => Some((&e.identity, &e.invocation)),
            _ => None,
        }
    }

    /// The entry as stored.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an entry always serialises")
    }

    /// An entry as stored; `None` for one that is not an entry this Paddock knows.
    pub fn from_json(text: &str) -> Option<Entry> {
        serde_json::from_str(text).ok()
    }
}

/// `entries` less the build reports that a later one among them replaces.
pub fn without_replaced(entries: &[Entry]) -> Vec<&Entry> {
    let newest: HashMap<(&str, &str), usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, Entry::Build(_)))
        .filter_map(|(n, e)| Some((e.invocation()?, n)))
        .collect();
    entries
        .iter()
        .enumerate()
        .filter(|(n, e)| match (e, e.invocation()) {
            (Entry::Build(_), Some(key)) => newest.get(&key) == Some(n),
            _ => true,
        })
        .map(|(_, e)| e)
        .collect()
}

mod digest_text {
    use paddock_reapi::Digest;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(digest: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}/{}", digest.hash_hex(), digest.size()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let text = String::deserialize(d)?;
        let (hash, size) = text
            .split_once('/')
            .ok_or_else(|| D::Error::custom("a digest is HASH/SIZE"))?;
        Digest::parse_parts(hash, size).map_err(D::Error::custom)
    }
}

mod result_base64 {
    use std::sync::Arc;

    use base64::Engine;
    use paddock_reapi::proto::re::ActionResult;
    use prost::Message;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    pub fn serialize<S: Serializer>(
        result: &Option<Arc<ActionResult>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match result {
            Some(r) => s.serialize_some(&BASE64.encode(r.encode_to_vec())),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Arc<ActionResult>>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let bytes = BASE64.decode(text).map_err(D::Error::custom)?;
        let result = ActionResult::decode(bytes.as_slice()).map_err(D::Error::custom)?;
        Ok(Some(Arc::new(result)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_as_written() {
        let entry = Entry::Action(ActionEntry {
            at: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_234_567),
            identity: "alice".into(),
            invocation: "inv".into(),
            instance: "main".into(),
            tool: "bazel 7".into(),
            digest: Digest::of(b"action"),
            mnemonic: "CppCompile".into(),
            target: "//a:b".into(),
            outcome: Outcome::Executed { exit_code: 3 },
            result: Some(Arc::new(ActionResult {
                exit_code: 3,
                ..Default::default()
            })),
        });
        let back = Entry::from_json(&entry.to_json()).unwrap();
        let Entry::Action(back) = back else {
            panic!("{back:?}")
        };
        assert_eq!(back.digest, Digest::of(b"action"));
        assert_eq!(back.at, entry.at());
        assert_eq!(back.outcome, Outcome::Executed { exit_code: 3 });
        assert_eq!(back.result.unwrap().exit_code, 3);
        assert!(Entry::from_json("{\"kind\":\"unheard_of\"}").is_none());
        assert!(Entry::from_json("{\"kind\":\"action\",\"digest\":\"../x/1\"}").is_none());
    }
}
