//! The start-up check: can this worker's Nix do what its configuration asks?
//!
//! A worker that offers Nix platforms must be able to add to its store (realising and
//! substituting both write it), to register GC roots, to check the signatures of what
//! it substitutes, and, when `allow_builds` is on, to build. Each is tried for real or
//! read from Nix's effective configuration (`nix show-config`), so that a worker on a
//! stock machine says at start-up exactly what is missing, instead of failing its
//! first `nix-store-paths` action.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::NixOptions;

/// What a usable Nix looks like.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// Nix's major version, as workers advertise it (`nix=2`).
    pub major: String,
    /// The full version, for logs.
    pub version: String,
    /// Things that work but deserve an operator's eye.
    pub warnings: Vec<String>,
    /// The binary caches the worker will substitute from.
    pub substituters: Vec<String>,
}

/// Why this worker's Nix cannot serve Nix platforms: each problem says what is
/// missing and how to provide it.
#[derive(Debug, Clone)]
pub struct Unusable {
    /// Whether Nix is installed at all (`nix-store` on the `PATH`).
    pub installed: bool,
    pub problems: Vec<String>,
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("; "))
    }
}

impl std::error::Error for Unusable {}

/// A short text that a probe adds to the store: the same bytes every time, so the
/// store holds one small path for it however often workers start.
const PROBE: &[u8] = b"Paddock checks that its worker can add to the Nix store.\n";

/// How long a check of one binary cache may take.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks this worker's Nix against `options`.
pub async fn check(options: &NixOptions) -> Result<Readiness, Unusable> {
    if !installed() {
        return Err(Unusable {
            installed: false,
            problems: vec![
                "nix-store is not on the PATH: install Nix (Debian and Ubuntu: apt install nix-bin)"
                    .into(),
            ],
        });
    }
    let unusable = |problems| Unusable {
        installed: true,
        problems,
    };
    let version = run(options, "nix-store", &["--version"])
        .await
        .map_err(|e| unusable(vec![format!("nix-store --version fails: {e}{}", hint(&e))]))?;
    let version = version
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_owned();
    let major = version.split('.').next().unwrap_or_default().to_owned();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();

    match probe_store(options).await {
        Ok(()) => {}
        Err(problem) => problems.push(problem),
    }
    let settings = match settings(options).await {
        Ok(s) => s,
        Err(e) => {
            problems.push(format!("cannot read Nix's configuration: {e}"));
            return Err(unusable(problems));
        }
    };
    let substituters = match options.substituters.is_empty() {
        true => settings.list("substituters"),
        false => options.substituters.clone(),
    };
    let keys = match options.trusted_public_keys.is_empty() {
        true => settings.list("trusted-public-keys"),
        false => options.trusted_public_keys.clone(),
    };
    if !substituters.is_empty() && keys.is_empty() && settings.flag("require-sigs") {
        problems.push(format!(
            "binary caches are configured ({}) but no key to check their signatures, and Nix requires signatures (require-sigs): nothing could be substituted; set [worker.nix] trusted_public_keys (or trusted-public-keys in nix.conf)",
            substituters.join(", ")
        ));
    }
    let group = settings.text("build-users-group");
    if options.allow_builds && !group.is_empty() {
        match build_group_members(&group) {
            None => problems.push(format!(
                "allow_builds is on, but the group {group:?} that nix.conf names in build-users-group does not exist: create it with build users (groupadd -r {group}; useradd -r -g {group} -G {group} -d /var/empty -s /usr/sbin/nologin {group}1, and so on), or set build-users-group = (empty) in nix.conf to build as root"
            )),
            Some(0) => problems.push(format!(
                "allow_builds is on, but the build users group {group:?} has no members: add build users to it (useradd -r -g {group} -G {group} -d /var/empty -s /usr/sbin/nologin {group}1, and so on)"
            )),
            Some(_) => {}
        }
    }
    if !options.allow_builds && !group.is_empty() && build_group_members(&group).is_none() {
        warnings.push(format!(
            "nix.conf names the build users group {group:?}, which does not exist: substituting works, building would not (allow_builds is off)"
        ));
    }
    if !problems.is_empty() {
        return Err(unusable(problems));
    }
    Ok(Readiness {
        major,
        version,
        warnings,
        substituters,
    })
}

/// Whether `nix-store` is on the `PATH` (running it may already need a usable store).
fn installed() -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join("nix-store").is_file())
}

/// Asks each binary cache whether it answers; the caches that do not, with why.
/// Slow (network timeouts), so the worker runs it after start-up and only logs.
pub async fn unreachable_caches(options: &NixOptions, caches: &[String]) -> Vec<String> {
    let mut unreachable = Vec::new();
    for cache in caches {
        let args = [
            "--extra-experimental-features",
            "nix-command",
            "store",
            "ping",
            "--store",
            cache.as_str(),
        ];
        match tokio::time::timeout(PING_TIMEOUT, run(options, "nix", &args)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => unreachable.push(format!("{cache}: {e}")),
            Err(_) => unreachable.push(format!(
                "{cache}: no answer within {}s",
                PING_TIMEOUT.as_secs()
            )),
        }
    }
    unreachable
}

/// Adds the probe to the store and roots it, as realising an action's paths does.
async fn probe_store(options: &NixOptions) -> Result<(), String> {
    let dir = options.dir.join("probe");
    let file = dir.join("paddock-nix-probe");
    let root = dir.join("gc-root");
    let prepared = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&file, PROBE))
        .and_then(|()| match std::fs::remove_file(&root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        });
    if let Err(e) = prepared {
        return Err(format!("cannot write {}: {e}", dir.display()));
    }
    let added = run(options, "nix-store", &["--add", path_arg(&file)])
        .await
        .map_err(|e| format!("cannot add to the Nix store: {e}{}", hint(&e)))?;
    let path = added.trim().to_owned();
    let rooted = run(
        options,
        "nix-store",
        &["--realise", &path, "--add-root", path_arg(&root)],
    )
    .await;
    let _ = std::fs::remove_file(&root);
    rooted.map_err(|e| format!("cannot register Nix GC roots: {e}{}", hint(&e)))?;
    Ok(())
}

fn path_arg(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

/// Advice for the failures seen on stock machines.
fn hint(error: &str) -> String {
    let uid = nix_uid();
    if error.contains("daemon-socket") || error.contains("cannot connect to socket") {
        " (the Nix daemon does not answer: start it, e.g. systemctl start nix-daemon; or, as root, use the store directly: unset NIX_REMOTE and drop `store = daemon` from nix.conf)".into()
    } else if error.contains("Permission denied")
        || error.contains("Read-only file system")
        || error.contains("remounting")
    {
        match uid {
            0 => " (the store is not writable: /nix is mounted read-only here; mount it writable, or give the worker a Nix daemon with NIX_REMOTE=daemon)".into(),
            uid => format!(" (the store is not writable for this worker, uid {uid}: run the worker as root, or give it a Nix daemon with NIX_REMOTE=daemon)"),
        }
    } else {
        String::new()
    }
}

fn nix_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Nix's effective settings (`nix show-config --json`).
struct Settings(serde_json::Value);

impl Settings {
    fn value(&self, name: &str) -> &serde_json::Value {
        &self.0[name]["value"]
    }

    fn list(&self, name: &str) -> Vec<String> {
        match self.value(name) {
            serde_json::Value::Array(items) => items
                .iter()
                .filter_map(|v| v.as_str())
                .map(str::to_owned)
                .collect(),
            serde_json::Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        }
    }

    fn flag(&self, name: &str) -> bool {
        self.value(name).as_bool().unwrap_or(true)
    }

    fn text(&self, name: &str) -> String {
        self.value(name).as_str().unwrap_or_default().to_owned()
    }
}

async fn settings(options: &NixOptions) -> Result<Settings, String> {
    let json = run(
        options,
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "show-config",
            "--json",
        ],
    )
    .await?;
    serde_json::from_str(&json)
        .map(Settings)
        .map_err(|e| format!("nix show-config printed something that is not JSON: {e}"))
}

/// The number of members of a group, `None` if it does not exist.
fn build_group_members(name: &str) -> Option<usize> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam returns a pointer into static storage or null; the worker reads
    // it at once, at start-up, before anything else in the process looks up groups.
    unsafe {
        let group = libc::getgrnam(name.as_ptr());
        if group.is_null() {
            return None;
        }
        let mut members = 0;
        let mut member = (*group).gr_mem;
        while !member.is_null() && !(*member).is_null() {
            members += 1;
            member = member.add(1);
        }
        Some(members)
    }
}

/// Runs a Nix command with the worker's binary caches and keys; its standard output,
/// or the last lines of its standard error.
pub(crate) async fn run(
    options: &NixOptions,
    program: &str,
    args: &[&str],
) -> Result<String, String> {
    let mut command = tokio::process::Command::new(program);
    command.args(args);
    if !options.substituters.is_empty() {
        command.args(["--option", "substituters", &options.substituters.join(" ")]);
    }
    if !options.trusted_public_keys.is_empty() {
        command.args([
            "--option",
            "trusted-public-keys",
            &options.trusted_public_keys.join(" "),
        ]);
    }
    command
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = command
        .output()
        .await
        .map_err(|e| format!("running {program}: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .rev()
            .take(3)
            .collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(tail.join("; "));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
