//! Deployment without nixpkgs: every `.nix` file parses with Debian's Nix, the
//! configuration the NixOS module renders for its defaults (and for set options) is
//! valid, so is the README's example, and bad configurations give the errors the
//! README promises.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{nix_command, paddock_bin, repo_root};

fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() && !name.starts_with('.') && name != "target" {
            nix_files(&path, out);
        } else if name.ends_with(".nix") {
            out.push(path);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let mut files = Vec::new();
    nix_files(&repo_root(), &mut files);
    assert!(files.iter().any(|f| f.ends_with("flake.nix")));
    assert!(files
        .iter()
        .any(|f| f.ends_with("nixos-modules/paddock.nix")));
    for file in files {
        let output = nix_command("nix-instantiate")
            .arg("--parse")
            .arg(&file)
            .output()
            .expect("nix-instantiate (apt-get install nix-bin)");
        assert!(
            output.status.success(),
            "{} does not parse: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Runs `paddock config check` on `text` saved as `name`; returns (success, output).
fn check(name: &str, text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let output = Command::new(paddock_bin())
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Evaluates the module's settings renderer with Nix, as JSON.
fn render(expression: &str) -> String {
    let settings = repo_root().join("nixos-modules/settings.nix");
    let output = nix_command("nix-instantiate")
        .args(["--eval", "--strict", "--json", "-E"])
        .arg(format!(
            "let s = import {}; in {expression}",
            settings.display()
        ))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn the_module_renders_valid_configurations() {
    for (what, expression) in [
        ("server defaults", "s.server s.defaults.server"),
        ("worker defaults", "s.worker s.defaults.worker"),
        (
            "server with settings",
            r#"s.server (s.defaults.server // { listen = "10.0.0.1:9000"; settings = { storage.max_size = "100GiB"; scheduler.max_attempts = 5; }; })"#,
        ),
        (
            "server with TLS and credentials",
            r#"s.server (s.defaults.server // { listen = "0.0.0.0:8980"; workerListen = "0.0.0.0:8982"; tls = { certFile = "/var/lib/secrets/farm.pem"; keyFile = "/var/lib/secrets/farm.key"; clientCaFile = "/var/lib/secrets/ca.pem"; }; tokens = [ { name = "ci"; tokenFile = "/var/lib/secrets/ci.token"; permissions = [ "cas.read" "execute" ]; } { name = "dev"; sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; permissions = [ "ac.read" ]; instances = [ "team-*" ]; } ]; certificates = [ { subject = "CN=builder-1"; permissions = [ "worker" ]; } ]; jwt = { secretFile = "/var/lib/secrets/jwt"; issuer = "https://idp"; audience = "paddock"; }; })"#,
        ),
        (
            "servers sharing a database",
            r#"s.server (s.defaults.server // { database = { }; })"#,
        ),
        (
            "servers sharing a database elsewhere",
            r#"s.server (s.defaults.server // { database = { url = "postgresql://paddock@db:5432/paddock"; passwordFile = "/s/db"; tlsCaFile = "/etc/db-ca.pem"; }; })"#,
        ),
        (
            "worker with credentials",
            r#"s.worker (s.defaults.worker // { scheduler = "grpcs://farm:8982"; tls = { caFile = "/etc/ca.pem"; }; tokenFile = "/var/lib/secrets/worker.token"; })"#,
        ),
        (
            "worker with options",
            r#"s.worker (s.defaults.worker // { maxConcurrentActions = 8; properties = { Pool = "large"; zone = [ "a" "b" ]; }; settings = { worker.sandbox.default_memory = "8GiB"; worker.nix.max_closures = 16; }; })"#,
        ),
    ] {
        let json = render(expression);
        let (ok, output) = check("rendered.json", &json);
        assert!(ok, "{what}: {json}\n{output}");
    }
    // Secrets are named where systemd's LoadCredential puts them, never inline.
    let json = render(
        r#"s.server (s.defaults.server // { tls = { certFile = "/s/c.pem"; keyFile = "/s/c.key"; }; tokens = [ { name = "ci"; tokenFile = "/s/ci"; permissions = [ "execute" ]; } ]; })"#,
    );
    for path in [
        "/run/credentials/paddock-server.service/tls-cert",
        "/run/credentials/paddock-server.service/tls-key",
        "/run/credentials/paddock-server.service/token-ci",
    ] {
        assert!(json.contains(path), "{path}: {json}");
    }
    assert!(!json.contains("/s/ci"), "{json}");
    let credentials = render(
        r#"s.serverCredentials (s.defaults.server // { tls = { certFile = "/s/c.pem"; keyFile = "/s/c.key"; }; tokens = [ { name = "ci"; tokenFile = "/s/ci"; permissions = [ "execute" ]; } ]; })"#,
    );
    assert!(
        credentials.contains(r#""file":"/s/ci","name":"token-ci""#),
        "{credentials}"
    );
    let json = render(
        r#"s.server (s.defaults.server // { database = { url = "postgresql://paddock@db/paddock"; passwordFile = "/s/db"; tlsCaFile = "/s/db-ca.pem"; }; })"#,
    );
    assert!(
        json.contains(r#""backend":"postgres""#)
            && json.contains("/run/credentials/paddock-server.service/database-password")
            && json.contains("/run/credentials/paddock-server.service/database-ca")
            && !json.contains("/s/db"),
        "{json}"
    );
    // Settings merge deeply into what the options set.
    let json = render(
        r#"s.worker (s.defaults.worker // { maxConcurrentActions = 8; settings.worker.cache_size = "1GiB"; })"#,
    );
    assert!(
        json.contains(r#""capacity":8"#) && json.contains(r#""cache_size":"1GiB""#),
        "{json}"
    );
}

#[test]
fn the_readme_configuration_example_is_valid() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let section = readme
        .split("## Configuration")
        .nth(1)
        .expect("a Configuration section");
    let example = section
        .split("```toml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a TOML example");
    for key in [
        "[server]",
        "[storage]",
        "[scheduler]",
        "[worker]",
        "[worker.sandbox]",
        "[worker.nix]",
        "[worker.oci]",
        "[worker.credentials]",
        "[auth.quotas]",
        "[state]",
        "[history]",
        "[scheduler.autoscaling]",
    ] {
        assert!(example.contains(key), "the example lacks {key}");
    }
    let (ok, output) = check("example.toml", example);
    assert!(ok, "{output}");
}

#[test]
fn bad_configurations_name_the_key_and_line() {
    let cases = [
        (
            "[storage]\nbackend = \"disk\"\nmax_sise = \"1GiB\"\n",
            &["max_sise", "line 3"][..],
        ),
        (
            "[worker]\ncapacity = \"four\"\n",
            &["capacity", "line 2"][..],
        ),
        (
            "[storage]\nmax_size = \"ten\"\n",
            &["max_size", "line 2", "not a size"][..],
        ),
        (
            "[scheduler]\nmax_timeout = \"forever\"\n",
            &["max_timeout", "not a duration"][..],
        ),
        ("[surprise]\nx = 1\n", &["surprise", "line 1"][..]),
        ("[worker]\nrunner = \"docker\"\n", &["runner", "docker"][..]),
        (
            "[scheduler]\nheartbeat_interval = \"20s\"\n",
            &["line 2", "heartbeat_interval", "heartbeat_timeout"][..],
        ),
        (
            "[storage]\nmax_batch_size = 0\n",
            &["max_batch_size", "line 2"][..],
        ),
        (
            "[worker]\nname = \"w\"\nscheduler = \"grpcs://farm\"\n",
            &["line 3", "worker.scheduler", "grpcs://HOST:PORT"][..],
        ),
        (
            "[[auth.tokens]]\nname = \"ci\"\npermissions = [\"cas.read\", \"cache.write\"]\nsha256 = \"00\"\n",
            &["cache.write", "cas.read"][..],
        ),
        (
            "[[auth.certificates]]\nsubject = \"CN=builder-1\"\npermissions = [\"worker\"]\n",
            &["auth.certificates", "client_ca_file"][..],
        ),
        (
            "[worker.sandbox]\ncgroup_parent = \"paddock\"\n",
            &["line 2", "cgroup_parent", "absolute"][..],
        ),
    ];
    for (text, wanted) in cases {
        let (ok, output) = check("bad.toml", text);
        assert!(!ok, "accepted:\n{text}");
        for w in wanted {
            assert!(output.contains(w), "{text}\n-> {output}\nlacks {w:?}");
        }
    }
    // Every problem at once, not only the first.
    let (ok, output) = check(
        "bad.toml",
        "[scheduler]\nmax_attempts = 0\n[worker]\ncapacity = 0\n",
    );
    assert!(
        !ok && output.contains("2 problems")
            && output.contains("line 2: scheduler.max_attempts")
            && output.contains("line 4: worker.capacity"),
        "{output}"
    );
    let (ok, output) = check("bad.json", r#"{"server": {"listn": "0.0.0.0:1"}}"#);
    assert!(
        !ok && output.contains("listn") && output.contains("line 1"),
        "{output}"
    );
}
