//! A real OCI registry on loopback (Debian's `docker-registry`, the CNCF
//! distribution registry), images built by the recipes in `images/`, and skopeo to
//! push them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_address, repo_root};

pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub host: String,
    /// `USER:PASSWORD` when the registry wants a login.
    login: Option<String>,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry with its storage in a fresh directory and waits until it
    /// answers.
    pub fn start() -> Registry {
        Registry::launch(None)
    }

    /// Starts a registry that accepts only `user` with `password` (HTTP basic auth
    /// against an htpasswd file, as registries behind a login do).
    pub fn start_with_login(user: &str, password: &str) -> Registry {
        Registry::launch(Some((user, password)))
    }

    fn launch(login: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let host = free_address();
        let config = dir.path().join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {host}\n",
            dir.path().join("storage").display()
        );
        if let Some((user, password)) = login {
            // bcrypt, which the registry requires, from Python's crypt module.
            let hashed = Command::new("python3")
                .args(["-W", "ignore", "-c"])
                .arg(format!(
                    "import crypt; print(crypt.crypt({password:?}, crypt.mksalt(crypt.METHOD_BLOWFISH)))"
                ))
                .output()
                .unwrap();
            assert!(
                hashed.status.success(),
                "{}",
                String::from_utf8_lossy(&hashed.stderr)
            );
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(
                &htpasswd,
                format!("{user}:{}", String::from_utf8_lossy(&hashed.stdout)),
            )
            .unwrap();
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: paddock-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, text).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        // Debian calls the distribution registry `docker-registry`; nixpkgs, `registry`.
        let program = ["docker-registry", "registry"]
            .into_iter()
            .find(|p| Command::new(p).arg("--version").output().is_ok())
            .unwrap_or("docker-registry");
        let child = Command::new(program)
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let login = login.map(|(user, password)| format!("{user}:{password}"));
        let registry = Registry {
            child,
            host,
            login,
            dir,
        };
        for _ in 0..1200 {
            if std::net::TcpStream::connect(&registry.host).is_ok() {
                return registry;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("the registry did not start:\n{}", registry.log());
    }

    /// Pushes `layout:tag` as `repository:tag` and returns the pushed manifest's
    /// digest. `extra` goes to `skopeo copy` (e.g. a compression format).
    pub fn push(&self, layout: &Path, tag: &str, repository: &str, extra: &[&str]) -> String {
        let digest_file = self.dir.path().join("digest");
        let output = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false", "--digestfile"])
            .arg(&digest_file)
            .args(self.login.iter().flat_map(|l| ["--dest-creds", l.as_str()]))
            .args(extra)
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repository}:{tag}", self.host))
            .output()
            .expect("skopeo (apt-get install skopeo)");
        assert!(
            output.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::read_to_string(digest_file)
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Pushes an image index (a multi-platform "manifest list") of manifests already
    /// in `repository`, each with its architecture; returns the index's digest.
    pub fn push_index(&self, repository: &str, tag: &str, entries: &[(&str, &str)]) -> String {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(digest, architecture)| {
                let size = std::fs::metadata(self.blob_path(digest)).unwrap().len();
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest,
                    "size": size,
                    "platform": { "architecture": architecture, "os": "linux" },
                })
            })
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .unwrap();
        let mut stream = std::net::TcpStream::connect(&self.host).unwrap();
        let head = format!(
            "PUT /v2/{repository}/manifests/{tag} HTTP/1.1\r\nHost: {}\r\n\
             Content-Type: application/vnd.oci.image.index.v1+json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.host,
            body.len()
        );
        std::io::Write::write_all(&mut stream, head.as_bytes()).unwrap();
        std::io::Write::write_all(&mut stream, &body).unwrap();
        let mut response = String::new();
        std::io::Read::read_to_string(&mut stream, &mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 201"), "{response}");
        format!("sha256:{}", paddock_reapi::Digest::of(&body).hash_hex())
    }

    /// A configuration file for a farm whose workers may pull from this registry (it
    /// is on loopback, which workers refuse unless it is listed), with `extra` lines.
    pub fn worker_config(&self, extra: &str) -> String {
        super::config_file(&format!(
            "[worker.oci]\nregistries = [\"{}\"]\n{extra}",
            self.host
        ))
    }

    /// `docker://HOST/REPOSITORY@DIGEST`.
    pub fn pinned(&self, repository: &str, digest: &str) -> String {
        format!("docker://{}/{repository}@{digest}", self.host)
    }

    /// Where the registry keeps a blob's bytes.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many requests so far were `GET`s of paths starting with `prefix`
    /// (e.g. `/v2/busybox/blobs/`), from the access log.
    pub fn gets(&self, prefix: &str) -> usize {
        let needle = format!("\"GET {prefix}");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `images/{recipe}` to add `layout:tag`.
pub fn build_image(recipe: &str, layout: &Path, tag: &str) {
    let output = Command::new(repo_root().join("images").join(recipe))
        .arg(layout)
        .arg(tag)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "images/{recipe} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The manifest digest of `layout:tag`, from its index.
pub fn layout_digest(layout: &Path, tag: &str) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("{tag} is not in {}", layout.display()))["digest"]
        .as_str()
        .unwrap()
        .to_owned()
}
