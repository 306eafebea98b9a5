//! `paddock bench sandbox`: what a container costs per action, against a plain
//! fork/exec and the plain-process runner, and against `runc run` of the same
//! bundle, with the container's time broken down phase by phase.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use paddock_runner::{Identities, ProcessRunner, RunSpec, Runner};
use tokio_util::sync::CancellationToken;

use crate::rootfs::RootfsResolver;
use crate::runner::ContainerRunner;
use crate::spec::{self, ContainerSpec};

/// Percentiles of one way of running the command.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub p50: Duration,
    pub p99: Duration,
}

impl Figures {
    fn of(mut samples: Vec<Duration>) -> Figures {
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Figures {
            p50: at(0.5),
            p99: at(0.99),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SandboxBenchReport {
    pub iterations: usize,
    pub command: String,
    pub fork_exec: Figures,
    pub process_runner: Figures,
    pub container: Figures,
    /// `None` when `runc` is not installed.
    pub runc: Option<Figures>,
    /// Median microseconds of each phase of a container run, in order.
    pub phases: Vec<(String, u64)>,
}

/// The run of iteration `i`: its own directory, and (as a worker gives each running
/// action its own) an identity that differs from the previous run's, which owns the
/// input root.
fn spec_for(
    dir: &Path,
    i: usize,
    command: &[String],
    identities: Identities,
) -> std::io::Result<RunSpec> {
    let action = dir.join(format!("action-{i}"));
    let root = action.join("root");
    std::fs::create_dir_all(&root)?;
    let identity = identities.get(i as u32 % identities.count.max(1));
    std::os::unix::fs::chown(&root, Some(identity.uid), Some(identity.gid))?;
    Ok(RunSpec {
        arguments: command.to_vec(),
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        input_root: root,
        working_directory: String::new(),
        stdout: action.join("stdout"),
        stderr: action.join("stderr"),
        timeout: Duration::from_secs(60),
        platform: Vec::new(),
        identity: Some(identity),
        max_file_size: None,
    })
}

/// Runs `iterations` of `command` each way. `dir` is scratch space.
pub async fn run(
    runner: &ContainerRunner,
    dir: &Path,
    iterations: usize,
    command: Vec<String>,
) -> Result<SandboxBenchReport, String> {
    let io = |e: std::io::Error| e.to_string();
    let iterations = iterations.max(1);

    let mut samples = Vec::new();
    for _ in 0..iterations {
        let started = Instant::now();
        let status = std::process::Command::new(&command[0])
            .args(&command[1..])
            .status()
            .map_err(io)?;
        samples.push(started.elapsed());
        if !status.success() {
            return Err(format!("{command:?} failed"));
        }
    }
    let fork_exec = Figures::of(samples);

    let mut samples = Vec::new();
    for i in 0..iterations {
        let spec = spec_for(dir, i, &command, runner.identities()).map_err(io)?;
        let started = Instant::now();
        ProcessRunner
            .run(spec, CancellationToken::new())
            .await
            .map_err(|e| e.to_string())?;
        samples.push(started.elapsed());
        std::fs::remove_dir_all(dir.join(format!("action-{i}"))).map_err(io)?;
    }
    let process_runner = Figures::of(samples);

    let (container, phases) = time_container(runner, dir, iterations, &command, &[]).await?;

    let runc = runc_samples(runner, dir, iterations, &command)
        .await?
        .map(Figures::of);
    Ok(SandboxBenchReport {
        iterations,
        command: command.join(" "),
        fork_exec,
        process_runner,
        container,
        runc,
        phases,
    })
}

/// Times `iterations` container runs of `command` on `platform`, one at a time:
/// percentiles end to end, and the median of each phase.
pub async fn time_container(
    runner: &ContainerRunner,
    dir: &Path,
    iterations: usize,
    command: &[String],
    platform: &[(String, String)],
) -> Result<(Figures, Vec<(String, u64)>), String> {
    let io = |e: std::io::Error| e.to_string();
    let mut samples = Vec::new();
    let mut phases: BTreeMap<usize, (String, Vec<u64>)> = BTreeMap::new();
    for i in 0..iterations.max(1) {
        let mut spec = spec_for(dir, i, command, runner.identities()).map_err(io)?;
        spec.platform = platform.to_vec();
        let started = Instant::now();
        let (outcome, timed) = runner
            .run_timed(spec, CancellationToken::new())
            .await
            .map_err(|e| e.to_string())?;
        samples.push(started.elapsed());
        if outcome.exit_code != 0 {
            return Err(format!(
                "the sandboxed {command:?} exited with {}",
                outcome.exit_code
            ));
        }
        for (n, (name, micros)) in timed.into_iter().enumerate() {
            phases
                .entry(n)
                .or_insert_with(|| (name, Vec::new()))
                .1
                .push(micros);
        }
        std::fs::remove_dir_all(dir.join(format!("action-{i}"))).map_err(io)?;
    }
    let phases = phases
        .into_values()
        .map(|(name, mut values)| {
            values.sort();
            (name, values[values.len() / 2])
        })
        .collect();
    Ok((Figures::of(samples), phases))
}

/// `runc run` of a bundle with the same spec (plus a network namespace, which
/// Paddock's helper makes itself); `None` if runc is not installed.
async fn runc_samples(
    runner: &ContainerRunner,
    dir: &Path,
    iterations: usize,
    command: &[String],
) -> Result<Option<Vec<Duration>>, String> {
    let Ok(found) = std::process::Command::new("runc").arg("--version").output() else {
        return Ok(None);
    };
    if !found.status.success() {
        return Ok(None);
    }
    let rootfs = runner
        .host()
        .resolve(&[])
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no host root")?;
    let mut samples = Vec::new();
    for i in 0..iterations {
        let run = spec_for(dir, i, command, runner.identities()).map_err(|e| e.to_string())?;
        let bundle = dir.join(format!("action-{i}/bundle"));
        std::fs::create_dir_all(&bundle).map_err(|e| e.to_string())?;
        let mut oci = spec::build(&ContainerSpec {
            arguments: command,
            environment: vec!["PATH=/usr/bin:/bin".into()],
            working_directory: "",
            rootfs: &rootfs,
            input_root: &run.input_root,
            identity: run.identity.expect("made above"),
            limits: Default::default(),
            max_file_size: None,
            cgroups_path: runner.cgroup_parent().join(format!("runc-{i}")),
            tmp_size: 64 << 20,
        })?;
        if let Some(linux) = oci.linux_mut() {
            let mut namespaces = linux.namespaces().clone().unwrap_or_default();
            namespaces.push(
                oci_spec::runtime::LinuxNamespaceBuilder::default()
                    .typ(oci_spec::runtime::LinuxNamespaceType::Network)
                    .build()
                    .map_err(|e| e.to_string())?,
            );
            linux.set_namespaces(Some(namespaces));
        }
        oci.save(bundle.join("config.json"))
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let status = tokio::process::Command::new("runc")
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("paddock-bench-{}-{i}", std::process::id()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .map_err(|e| e.to_string())?;
        samples.push(started.elapsed());
        if !status.success() {
            return Err(format!("runc run failed: {status}"));
        }
        std::fs::remove_dir_all(dir.join(format!("action-{i}"))).map_err(|e| e.to_string())?;
    }
    // runc makes the parent in every hierarchy, the named `systemd` one and the
    // unified one included, where Paddock's own clean-up does not look.
    let parent = runner.cgroup_parent();
    let relative = parent.strip_prefix("/").unwrap_or(parent);
    for hierarchy in ["systemd", "unified"] {
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(hierarchy).join(relative));
    }
    Ok(Some(samples))
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

impl fmt::Display for SandboxBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Sandbox benchmark: `{}`, {} runs each, one at a time",
            self.command, self.iterations
        )?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, fig: &Figures| {
            writeln!(
                f,
                "  {name:<34} p50 {:>9}  p99 {:>9}",
                ms(fig.p50),
                ms(fig.p99)
            )
        };
        row(f, "fork/exec", &self.fork_exec)?;
        row(f, "process runner (--runner host)", &self.process_runner)?;
        row(f, "container runner", &self.container)?;
        if let Some(runc) = &self.runc {
            row(f, "runc run (same bundle)", runc)?;
        } else {
            writeln!(
                f,
                "  runc run                           (runc not installed)"
            )?;
        }
        let ratio = |a: &Figures, b: &Figures| a.p50.as_secs_f64() / b.p50.as_secs_f64();
        writeln!(
            f,
            "  container overhead over fork/exec: {} p50 ({:.1}x); over the process runner: {}",
            ms(self.container.p50.saturating_sub(self.fork_exec.p50)),
            ratio(&self.container, &self.fork_exec),
            ms(self.container.p50.saturating_sub(self.process_runner.p50)),
        )?;
        if let Some(runc) = &self.runc {
            writeln!(
                f,
                "  container / runc: {:.2}x at p50",
                ratio(&self.container, runc)
            )?;
        }
        writeln!(f, "  where a container's time goes (medians):")?;
        for (name, micros) in &self.phases {
            writeln!(f, "    {name:<32} {:>8.2} ms", *micros as f64 / 1000.0)?;
        }
        Ok(())
    }
}
