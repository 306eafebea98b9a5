//! Why an action missed the cache: the nearest earlier execution of "the same"
//! action (the same instance, mnemonic and outputs) and what differs between the two
//! (arguments, environment, platform, the input files by path, and the Action's own
//! fields). The history supplies the candidates; the CAS supplies both sides.

use std::collections::BTreeMap;

use paddock_cas::BlobStore;
use paddock_history::{ActionRecord, History};
use paddock_reapi::proto::re::{Action, Command};
use paddock_reapi::Digest;

use crate::blob::{self, BlobError, InputChange};

/// Earlier executions looked at, at most.
const CANDIDATES: usize = 20;
/// The largest Action or Command of a candidate read.
const MAX_CANDIDATE_BLOB: u64 = 256 << 10;

/// An action and its command, as read from the CAS.
pub struct Loaded {
    pub action: Action,
    pub command: Command,
    pub input_root: Option<Digest>,
}

pub async fn load(cas: &dyn BlobStore, digest: &Digest) -> Result<Loaded, BlobError> {
    load_within(cas, digest, blob::MAX_SHOWN).await
}

async fn load_within(
    cas: &dyn BlobStore,
    digest: &Digest,
    limit: u64,
) -> Result<Loaded, BlobError> {
    let action: Action = blob::message_within(cas, digest, "Action", limit).await?;
    let command_digest =
        Digest::from_proto(action.command_digest.as_ref()).map_err(|_| BlobError::Undecodable {
            digest: *digest,
            kind: "Action with a command",
        })?;
    let command: Command = blob::message_within(cas, &command_digest, "Command", limit).await?;
    let input_root = Digest::from_proto(action.input_root_digest.as_ref()).ok();
    Ok(Loaded {
        action,
        command,
        input_root,
    })
}

/// What an action promises to produce: the key that makes two actions "the same".
#[allow(deprecated)] // REAPI 2.0 clients declare outputs the old way
pub fn outputs(command: &Command) -> Vec<String> {
    let mut outputs: Vec<String> = command
        .output_paths
        .iter()
        .chain(&command.output_files)
        .chain(&command.output_directories)
        .cloned()
        .collect();
    outputs.sort();
    outputs.dedup();
    outputs
}

/// A value that differs: (what, before, after); `None` for absent.
pub type Changed = (String, Option<String>, Option<String>);

/// What differs between an earlier execution and this one.
pub struct Explanation {
    pub earlier: ActionRecord,
    pub arguments: Vec<Changed>,
    pub environment: Vec<Changed>,
    pub platform: Vec<Changed>,
    /// Other fields of the Action and Command (working directory, timeout, …).
    pub other: Vec<Changed>,
    pub inputs: Result<Vec<InputChange>, String>,
}

impl Explanation {
    /// Whether anything at all was found to differ.
    pub fn found_difference(&self) -> bool {
        !(self.arguments.is_empty()
            && self.environment.is_empty()
            && self.platform.is_empty()
            && self.other.is_empty()
            && self.inputs.as_ref().is_ok_and(|i| i.is_empty()))
    }
}

fn map_diff(before: BTreeMap<String, String>, after: BTreeMap<String, String>) -> Vec<Changed> {
    let mut changed = Vec::new();
    for (name, was) in &before {
        match after.get(name) {
            Some(is) if is == was => {}
            is => changed.push((name.clone(), Some(was.clone()), is.cloned())),
        }
    }
    for (name, is) in &after {
        if !before.contains_key(name) {
            changed.push((name.clone(), None, Some(is.clone())));
        }
    }
    changed
}

#[allow(deprecated)] // Command.platform, from REAPI 2.0 clients
fn platform(command: &Command, action: &Action) -> BTreeMap<String, String> {
    let platform = action.platform.as_ref().or(command.platform.as_ref());
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for p in platform.into_iter().flat_map(|p| &p.properties) {
        let entry = map.entry(p.name.clone()).or_default();
        if !entry.is_empty() {
            entry.push(',');
        }
        entry.push_str(&p.value);
    }
    map
}

fn compare(
    before: &Loaded,
    after: &Loaded,
) -> (Vec<Changed>, Vec<Changed>, Vec<Changed>, Vec<Changed>) {
    let (a, b) = (&before.command.arguments, &after.command.arguments);
    let arguments = (0..a.len().max(b.len()))
        .filter(|&i| a.get(i) != b.get(i))
        .map(|i| {
            (
                format!("argument {i}"),
                a.get(i).cloned(),
                b.get(i).cloned(),
            )
        })
        .collect();
    let env = |c: &Command| -> BTreeMap<String, String> {
        c.environment_variables
            .iter()
            .map(|v| (v.name.clone(), v.value.clone()))
            .collect()
    };
    let environment = map_diff(env(&before.command), env(&after.command));
    let platform = map_diff(
        platform(&before.command, &before.action),
        platform(&after.command, &after.action),
    );
    let fields = |l: &Loaded| -> BTreeMap<String, String> {
        let mut f = BTreeMap::new();
        f.insert(
            "working directory".into(),
            l.command.working_directory.clone(),
        );
        f.insert(
            "timeout".into(),
            l.action
                .timeout
                .as_ref()
                .map(|t| format!("{}.{:09}s", t.seconds, t.nanos))
                .unwrap_or_default(),
        );
        f.insert("do_not_cache".into(), l.action.do_not_cache.to_string());
        f.insert("salt".into(), hex::encode(&l.action.salt));
        f.insert(
            "output_node_properties".into(),
            l.command.output_node_properties.join(","),
        );
        f
    };
    let other = map_diff(fields(before), fields(after));
    (arguments, environment, platform, other)
}

/// The nearest earlier execution of the same action as `record` that `visible`
/// lets the caller see (given identity and instance), and what differs; `None` when
/// the history holds none.
pub async fn explain(
    history: &History,
    cas: &dyn BlobStore,
    record: &ActionRecord,
    this: &Loaded,
    visible: &(dyn Fn(&str, &str) -> bool + Sync),
) -> Option<Explanation> {
    let wanted = outputs(&this.command);
    let candidates = history.earlier_executions(
        &record.instance,
        &record.mnemonic,
        record.seq,
        visible,
        CANDIDATES,
    );
    for candidate in candidates {
        if candidate.digest == record.digest {
            continue;
        }
        let Ok(earlier) = load_within(cas, &candidate.digest, MAX_CANDIDATE_BLOB).await else {
            continue;
        };
        if outputs(&earlier.command) != wanted {
            continue;
        }
        let (arguments, environment, platform, other) = compare(&earlier, this);
        let inputs = match (earlier.input_root, this.input_root) {
            (Some(old), Some(new)) => blob::diff_trees(cas, old, new)
                .await
                .map_err(|e| e.to_string()),
            _ => Err("an input root digest is missing".to_owned()),
        };
        return Some(Explanation {
            earlier: candidate,
            arguments,
            environment,
            platform,
            other,
            inputs,
        });
    }
    None
}
