//! The container runner: each action in its own container, started by a helper
//! process (see [`crate::helper`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use paddock_config::ByteSize;
use paddock_runner::{Identities, ResourceUsage, RunError, RunOutcome, RunSpec, Runner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::helper::{Request, Response, NOT_FOUND_MARKER};
use crate::rootfs::{HostResolver, Rootfs, RootfsResolver};
use crate::spec::{self, ContainerSpec, Limits};
use crate::toolchain::{self, HashCache};
use crate::zygote::Zygote;

/// How a worker's containers are set up.
pub struct SandboxOptions {
    /// The zygote that forks a helper per container.
    pub zygote: Zygote,
    /// Where the runner keeps container state and root templates.
    pub dir: PathBuf,
    /// The worker's cgroup; each action gets a child of it.
    pub cgroup_parent: PathBuf,
    /// The identities actions run as (each run names its own, see
    /// [`RunSpec::identity`]).
    pub identities: Identities,
    /// Limits for actions that ask for none.
    pub defaults: Limits,
    /// The most any action gets, whatever it asks for.
    pub maxima: Limits,
    /// The fleet's totals, on the parent cgroup.
    pub total_memory: Option<u64>,
    pub total_pids: Option<u64>,
    /// The size of each action's private `/tmp`.
    pub tmp_size: u64,
    /// Resolvers asked before the host one, in order.
    pub resolvers: Vec<Arc<dyn RootfsResolver>>,
}

pub struct ContainerRunner {
    options: SandboxOptions,
    host: HostResolver,
    state_root: PathBuf,
    toolchain_hashes: Arc<HashCache>,
}

impl ContainerRunner {
    /// Prepares the runner: root templates, the parent cgroup with its totals, and a
    /// clean slate (containers and cgroups a previous life left behind are removed).
    pub fn new(options: SandboxOptions) -> Result<ContainerRunner, String> {
        let state_root = options.dir.join("state");
        std::fs::create_dir_all(&state_root)
            .map_err(|e| format!("creating {}: {e}", state_root.display()))?;
        for leftover in std::fs::read_dir(&state_root)
            .map_err(|e| e.to_string())?
            .flatten()
        {
            let path = leftover.path();
            tracing::warn!(container = %path.display(), "removing a container left by an earlier run");
            if let Ok(mut container) = libcontainer::container::Container::load(path.clone()) {
                let _ = container.delete(true);
            }
            let _ = std::fs::remove_dir_all(&path);
        }
        let removed = crate::cgroups::remove_children(&options.cgroup_parent);
        if !removed.is_empty() {
            tracing::warn!(
                count = removed.len(),
                "removed cgroups left by an earlier run"
            );
        }
        crate::cgroups::create_parent(
            &options.cgroup_parent,
            options.total_memory,
            options.total_pids,
        )?;
        let host = HostResolver::prepare(&options.dir, options.identities)
            .map_err(|e| format!("preparing the host root: {e}"))?;
        Ok(ContainerRunner {
            options,
            host,
            state_root,
            toolchain_hashes: Arc::default(),
        })
    }

    /// The identities actions run as.
    pub fn identities(&self) -> Identities {
        self.options.identities
    }

    /// The resolver of last resort: the worker's own toolchain.
    pub fn host(&self) -> &HostResolver {
        &self.host
    }

    /// The worker's cgroup, under which each action gets its own.
    pub fn cgroup_parent(&self) -> &Path {
        &self.options.cgroup_parent
    }

    /// The limits for an action's platform: what it asks for, within the maxima.
    fn limits(&self, platform: &[(String, String)]) -> Result<Limits, RunError> {
        let mut limits = self.options.defaults;
        let bad = |name: &str, value: &str, what: &str| {
            RunError::Action(format!("platform property {name}={value:?} is not {what}"))
        };
        for (name, value) in platform {
            match name.as_str() {
                "memory" => {
                    let bytes = value
                        .parse::<ByteSize>()
                        .map_err(|_| bad(name, value, "a size such as 2GiB"))?;
                    limits.memory_bytes = Some(bytes.bytes());
                }
                "pids" => {
                    let pids = value
                        .parse::<u64>()
                        .map_err(|_| bad(name, value, "a number"))?;
                    limits.pids = Some(pids);
                }
                "cores" => {
                    let cores = value
                        .parse::<f64>()
                        .ok()
                        .filter(|c| c.is_finite() && *c > 0.0)
                        .ok_or_else(|| bad(name, value, "a positive number"))?;
                    limits.cores = Some(cores);
                }
                _ => {}
            }
        }
        let max = self.options.maxima;
        let cap = |v: Option<u64>, m: Option<u64>| match (v, m) {
            (Some(v), Some(m)) => Some(v.min(m)),
            (v, m) => v.or(m),
        };
        Ok(Limits {
            memory_bytes: cap(limits.memory_bytes, max.memory_bytes),
            pids: cap(limits.pids, max.pids),
            cores: match (limits.cores, max.cores) {
                (Some(v), Some(m)) => Some(v.min(m)),
                (v, _) => v,
            },
        })
    }

    async fn rootfs(&self, platform: &[(String, String)]) -> Result<Rootfs, RunError> {
        for resolver in &self.options.resolvers {
            match resolver.resolve(platform).await {
                Ok(Some(rootfs)) => return Ok(rootfs),
                Ok(None) => {}
                Err(e) => {
                    return Err(e
                        .context(format_args!("{} platform", resolver.name()))
                        .into())
                }
            }
        }
        self.host
            .resolve(platform)
            .await
            .map_err(|e| RunError::Worker(e.to_string()))?
            .ok_or_else(|| RunError::Worker("the host resolver declined".into()))
    }
}

/// The platform property that mounts the input root at an absolute path of the
/// action's choosing (rather than [`spec::WORK_DIR`]), so that paths compiled into
/// outputs (`__FILE__`, debug info, dependency files) match the client's.
pub const INPUT_ROOT_PATH: &str = "input-root-path";

/// Top-level directories the input root may not be mounted in or over: the
/// container's own and the toolchain's.
const RESERVED: &[&str] = &[
    "proc", "dev", "sys", "etc", "nix", "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32",
    "opt", "run", "var",
];

/// The validated `input-root-path` of a platform, if it names one: absolute,
/// normal, not in a reserved directory, and neither at, beneath nor above any of the
/// root's bind mounts (nor `/tmp` itself, though beneath it is fine).
fn input_root_path(
    platform: &[(String, String)],
    rootfs: &Rootfs,
) -> Result<Option<PathBuf>, RunError> {
    let values = crate::rootfs::property_values(platform, INPUT_ROOT_PATH);
    let value = match values.as_slice() {
        [] => return Ok(None),
        [one] => *one,
        _ => {
            return Err(RunError::Action(format!(
                "the platform names {INPUT_ROOT_PATH} more than once"
            )))
        }
    };
    let bad = |why: &str| RunError::Action(format!("{INPUT_ROOT_PATH}={value:?}: {why}"));
    let path = PathBuf::from(value);
    let names: Vec<&str> = value.split('/').skip(1).collect();
    if !value.starts_with('/')
        || value.len() > 1024
        || names
            .iter()
            .any(|n| n.is_empty() || *n == "." || *n == "..")
    {
        return Err(bad("must be an absolute, normal path"));
    }
    if names.len() < 2 {
        // One level deep would cover a whole top-level directory of the root.
        return Err(bad("must be at least two levels deep"));
    }
    if RESERVED.contains(&names[0]) {
        return Err(bad("lies in a directory the container reserves"));
    }
    let clashes = rootfs
        .mounts
        .iter()
        .map(|m| m.destination.as_path())
        .chain([Path::new("/proc"), Path::new("/dev"), Path::new("/tmp")])
        .any(|d| d.starts_with(&path) || (path.starts_with(d) && d != Path::new("/tmp")));
    if clashes {
        return Err(bad("overlaps a mount of the container"));
    }
    Ok(Some(path))
}

/// Makes the mount point of a chosen input-root path in the container's root (not
/// needed beneath `/tmp`, a fresh tmpfs where the sandbox makes it). The root belongs
/// to the worker and no action writes it, and the directories are made one at a
/// time without following symlinks.
fn prepare_input_mount_point(rootfs: &Rootfs, path: &Path) -> Result<(), RunError> {
    if path.starts_with("/tmp") {
        return Ok(());
    }
    let root = paddock_fs::Dir::open(&rootfs.root)
        .map_err(|e| RunError::Worker(format!("opening the container's root: {e}")))?;
    let rel = path.strip_prefix("/").expect("validated as absolute");
    root.create_dirs(rel, 0o755, None).map_err(|e| {
        RunError::Worker(format!(
            "making the mount point {} in the container's root: {e}",
            path.display()
        ))
    })?;
    Ok(())
}

impl Drop for ContainerRunner {
    fn drop(&mut self) {
        // A helper may still be deleting its last container's cgroup (teardown follows
        // the answer): whatever is left goes now, so the parent can go too.
        crate::cgroups::remove_children(&self.options.cgroup_parent);
        crate::cgroups::remove_parent(&self.options.cgroup_parent);
    }
}

fn describe_bytes(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

#[async_trait]
impl Runner for ContainerRunner {
    async fn run(&self, run: RunSpec, cancel: CancellationToken) -> Result<RunOutcome, RunError> {
        self.run_timed(run, cancel)
            .await
            .map(|(outcome, _)| outcome)
    }
}

impl ContainerRunner {
    /// Runs an action, also saying where the time went, phase by phase (in
    /// microseconds): the runner's own preparation, then the helper's phases.
    pub async fn run_timed(
        &self,
        run: RunSpec,
        cancel: CancellationToken,
    ) -> Result<(RunOutcome, Vec<(String, u64)>), RunError> {
        let started = std::time::Instant::now();
        let Some(identity) = run.identity else {
            return Err(RunError::Worker(
                "the container runner needs an identity for each action".into(),
            ));
        };
        let limits = self.limits(&run.platform)?;
        if !run.input_root.join(&run.working_directory).is_dir() {
            return Err(RunError::Action(format!(
                "the working directory {:?} is not a directory in the input root",
                run.working_directory
            )));
        }
        let mut rootfs = self.rootfs(&run.platform).await?;
        if let Some(path) = input_root_path(&run.platform, &rootfs)? {
            prepare_input_mount_point(&rootfs, &path)?;
            rootfs.work_dir = path;
        }
        let (platform, input_root, root, mounts, hashes) = (
            run.platform.clone(),
            run.input_root.clone(),
            rootfs.root.clone(),
            rootfs.mounts.clone(),
            self.toolchain_hashes.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let view = toolchain::View {
                root: &root,
                mounts: &mounts,
            };
            toolchain::check(&platform, &input_root, &view, &hashes)
        })
        .await
        .map_err(|e| RunError::Worker(e.to_string()))??;
        let action_dir = run
            .stdout
            .parent()
            .ok_or_else(|| RunError::Worker("the stdout file has no directory".into()))?
            .to_owned();
        let id = format!(
            "paddock-{}",
            action_dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("action")
        );
        let cgroup = self.options.cgroup_parent.join(&id);
        // The root's variables apply beneath the Command's: a name the Command sets
        // keeps the Command's value.
        let environment = rootfs
            .environment
            .iter()
            .filter(|(k, _)| !run.environment.iter().any(|(c, _)| c == k))
            .chain(&run.environment)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let oci = spec::build(&ContainerSpec {
            arguments: &run.arguments,
            environment,
            working_directory: &run.working_directory,
            rootfs: &rootfs,
            input_root: &run.input_root,
            identity,
            limits,
            max_file_size: run.max_file_size,
            cgroups_path: cgroup.clone(),
            tmp_size: self.options.tmp_size,
        })
        .map_err(RunError::Worker)?;
        let bundle = action_dir.join("bundle");
        let prepared_bundle = bundle.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            std::fs::create_dir_all(&prepared_bundle).map_err(|e| e.to_string())?;
            oci.save(prepared_bundle.join("config.json"))
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| RunError::Worker(e.to_string()))?
        .map_err(|e| RunError::Worker(format!("writing the container's bundle: {e}")))?;
        let prepared = started.elapsed().as_micros() as u64;

        let request = Request {
            container_id: id,
            bundle,
            state_root: self.state_root.clone(),
            stdout: run.stdout.clone(),
            stderr: run.stderr.clone(),
            timeout_ms: run.timeout.as_millis() as u64,
            cgroup,
        };
        let mut line = serde_json::to_vec(&request).map_err(|e| RunError::Worker(e.to_string()))?;
        line.push(b'\n');
        let helper = tokio::net::UnixStream::connect(self.options.zygote.socket())
            .await
            .map_err(|e| RunError::Worker(format!("reaching the sandbox zygote: {e}")))?;
        let (mut from_helper, mut to_helper) = helper.into_split();
        to_helper
            .write_all(&line)
            .await
            .map_err(|e| RunError::Worker(format!("talking to the sandbox helper: {e}")))?;
        // The connection stays open: closing our side is how the helper is told to stop.
        let mut output = Vec::new();
        let mut read = std::pin::pin!(from_helper.read_to_end(&mut output));
        let read_result = tokio::select! {
            r = &mut read => r,
            _ = cancel.cancelled() => {
                let _ = to_helper.shutdown().await;
                read.await
            }
        };
        drop(to_helper);
        read_result
            .map_err(|e| RunError::Worker(format!("reading from the sandbox helper: {e}")))?;
        drop(rootfs); // the root's lease ends with the container
        let response: Response = serde_json::from_slice(&output).map_err(|e| {
            RunError::Worker(format!(
                "the sandbox helper gave no answer ({e}); see the worker's log"
            ))
        })?;
        if let Some(error) = response.error {
            return Err(RunError::Worker(format!("sandbox: {error}")));
        }
        if response.cancelled {
            return Err(RunError::Cancelled);
        }
        if response.exit_code == 127 {
            if let Some(message) = not_found_message(&run.stderr).await {
                return Err(RunError::Action(message));
            }
        }
        let out_of_memory = response.signal == Some(libc::SIGKILL)
            && !response.timed_out
            && response.memory_limit_hits > 0;
        let message = if out_of_memory {
            format!(
                "the action ran out of memory: it was killed at {} of its {} limit (raise it with the platform property memory=...)",
                describe_bytes(response.peak_memory_bytes),
                describe_bytes(response.memory_limit_bytes)
            )
        } else if response.timed_out {
            format!("killed at its timeout of {}s", run.timeout.as_secs_f64())
        } else if let Some(signal) = response.signal {
            format!("killed by signal {signal}")
        } else {
            String::new()
        };
        let helper_total: u64 = response.phases.iter().map(|(_, t)| t).sum();
        let total = started.elapsed().as_micros() as u64;
        let mut phases = vec![("prepare root and bundle".to_owned(), prepared)];
        phases.extend(response.phases);
        phases.push((
            "zygote fork and messages".to_owned(),
            total.saturating_sub(prepared + helper_total),
        ));
        let outcome = RunOutcome {
            exit_code: response.exit_code,
            timed_out: response.timed_out,
            duration: Duration::from_micros(response.run_micros),
            message,
            usage: Some(ResourceUsage {
                peak_memory_bytes: response.peak_memory_bytes,
                memory_limit_bytes: limits.memory_bytes.unwrap_or(0),
                cpu_user_micros: response.cpu_user_micros,
                cpu_system_micros: response.cpu_system_micros,
                out_of_memory,
            }),
        };
        Ok((outcome, phases))
    }
}

/// The helper's "cannot run" message, if the action's stderr starts with it.
async fn not_found_message(stderr: &Path) -> Option<String> {
    let mut head = vec![0u8; 4096];
    let mut file = tokio::fs::File::open(stderr).await.ok()?;
    let n = file.read(&mut head).await.ok()?;
    let text = String::from_utf8_lossy(&head[..n]);
    text.starts_with(NOT_FOUND_MARKER).then(|| {
        text.trim_start_matches("paddock: ")
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::BindMount;

    #[test]
    fn an_input_root_path_must_stay_clear_of_the_containers_own_directories() {
        let rootfs = Rootfs {
            root: "/nonexistent".into(),
            writable: false,
            work_dir: spec::WORK_DIR.into(),
            mounts: vec![BindMount {
                source: "/srv/tools".into(),
                destination: "/srv/tools".into(),
            }],
            environment: Vec::new(),
            lease: None,
        };
        let asked = |value: &str| {
            input_root_path(&[(INPUT_ROOT_PATH.to_owned(), value.to_owned())], &rootfs)
        };
        for good in ["/tmp/build/project", "/home/me/src", "/srv/project"] {
            assert_eq!(asked(good).unwrap(), Some(PathBuf::from(good)), "{good}");
        }
        for bad in [
            "/",
            "/tmp",
            "/home",
            "relative/path",
            "/home/me/../../etc",
            "/home/./me",
            "/home//me",
            "/usr/src/x",
            "/proc/self",
            "/etc/x/y",
            "/nix/store/x",
            "/dev/shm/x",
            "/srv/tools/x",
            "/srv",
            "/work/../usr/x",
        ] {
            assert!(
                matches!(asked(bad), Err(RunError::Action(_))),
                "{bad:?} was accepted"
            );
        }
        let twice = [
            (INPUT_ROOT_PATH.to_owned(), "/tmp/a/b".to_owned()),
            (INPUT_ROOT_PATH.to_owned(), "/tmp/c/d".to_owned()),
        ];
        assert!(input_root_path(&twice, &rootfs).is_err());
        assert_eq!(input_root_path(&[], &rootfs).unwrap(), None);
    }
}
