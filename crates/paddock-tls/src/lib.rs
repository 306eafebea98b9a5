//! TLS for Paddock's listeners: rustls with the aws-lc provider (the one provider of
//! the whole binary), the server's certificate and key read from PEM files and read
//! again when they change (rotation without a restart), and optional client
//! certificates verified against a CA, which then identify their holders. Clients
//! with a bearer token need no certificate, so one is asked for but not required.
//! Changes are found by the files' contents, not their times (a file replaced with
//! its old modification time, as Nix store paths are, still counts); a set of files
//! that does not load (a certificate written before its key) keeps the previous
//! configuration and is tried again until it does.
//!
//! Handshakes run in tasks of their own, with a timeout, so a slow or silent client
//! never holds up the accept loop; a failed handshake is logged and dropped.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes aws-lc the process's rustls provider; idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// What a client of another service (a database) checks that service's
/// certificate against: the CA certificates in `ca_file` (PEM), or the system's
/// trusted roots.
pub fn client_config(
    ca_file: Option<&std::path::Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(ca) => {
            for cert in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("reading the CA {}: {e}", ca.display()))?
            {
                let cert = cert.map_err(|e| format!("reading the CA {}: {e}", ca.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("the CA {}: {e}", ca.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                return Err(format!(
                    "the system has no trusted root certificates ({:?}); name a CA file",
                    found.errors
                ));
            }
            roots.add_parsable_certificates(found.certs);
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What protocol a listener speaks over TLS (ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC: HTTP/2, which gRPC clients (tonic, Bazel's grpc-java) insist on.
    Grpc,
    /// Plain HTTP/1.1 (the metrics and web pages).
    Http1,
}

/// The server's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl Files {
    fn all(&self) -> Vec<&Path> {
        let mut all = vec![self.cert.as_path(), self.key.as_path()];
        all.extend(self.client_ca.as_deref());
        all
    }

    /// What the files hold now, in brief.
    fn fingerprint(&self) -> Vec<Option<u64>> {
        self.all()
            .iter()
            .map(|p| {
                std::fs::read(p).ok().map(|bytes| {
                    let mut hasher = std::hash::DefaultHasher::new();
                    bytes.hash(&mut hasher);
                    hasher.finish()
                })
            })
            .collect()
    }
}

/// The configurations built from one reading of the files.
struct Loaded {
    grpc: Arc<ServerConfig>,
    http1: Arc<ServerConfig>,
    fingerprint: Vec<Option<u64>>,
}

/// A listener's TLS, re-read when its files change.
pub struct ServerTls {
    files: Files,
    loaded: RwLock<Loaded>,
    /// Files that did not load, as they were: reported once, tried again when they
    /// change.
    failed: Mutex<Option<Vec<Option<u64>>>>,
}

fn load(files: &Files) -> Result<Loaded, String> {
    let fingerprint = files.fingerprint();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("reading the certificate {}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", files.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("reading the key {}: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let build = |alpn: &[u8]| -> Result<Arc<ServerConfig>, String> {
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &files.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca)
                    .map_err(|e| format!("reading the client CA {}: {e}", ca.display()))?
                {
                    let cert =
                        cert.map_err(|e| format!("reading the client CA {}: {e}", ca.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("the client CA {}: {e}", ca.display()))?;
                }
                // A certificate is asked for and, when sent, verified; a client with a
                // token sends none.
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| format!("the client CA {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| format!("the certificate {} and its key: {e}", files.cert.display()))?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    };
    Ok(Loaded {
        grpc: build(b"h2")?,
        http1: build(b"http/1.1")?,
        fingerprint,
    })
}

impl ServerTls {
    /// Reads the files; an error says which file and why.
    pub fn load(files: Files) -> Result<Arc<ServerTls>, String> {
        install_provider();
        let loaded = load(&files)?;
        Ok(Arc::new(ServerTls {
            files,
            loaded: RwLock::new(loaded),
            failed: Mutex::new(None),
        }))
    }

    /// Reads the files again if any changed since the last reading. A reading that
    /// fails (a certificate written but not its key yet, say) keeps the previous one.
    pub fn reload_if_changed(&self) {
        let now = self.files.fingerprint();
        if self.loaded.read().expect("not poisoned").fingerprint == now {
            return;
        }
        let mut failed = self.failed.lock().expect("not poisoned");
        match load(&self.files) {
            Ok(loaded) => {
                *self.loaded.write().expect("not poisoned") = loaded;
                *failed = None;
                tracing::info!(cert = %self.files.cert.display(), "reloaded the TLS certificate and key");
            }
            Err(e) => {
                if failed.as_ref() != Some(&now) {
                    tracing::warn!(error = %e, "keeping the TLS configuration read before");
                    *failed = Some(now);
                }
            }
        }
    }

    /// Checks the files every `interval`, for as long as the returned task runs.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let tls = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(tls) = tls.upgrade() else { return };
                tokio::task::spawn_blocking(move || tls.reload_if_changed())
                    .await
                    .ok();
            }
        })
    }

    /// An acceptor with the configuration as it is now.
    fn acceptor(&self, protocol: Protocol) -> TlsAcceptor {
        let loaded = self.loaded.read().expect("not poisoned");
        TlsAcceptor::from(match protocol {
            Protocol::Grpc => loaded.grpc.clone(),
            Protocol::Http1 => loaded.http1.clone(),
        })
    }

    /// Takes `socket` through its handshake, within [`HANDSHAKE_TIMEOUT`]; a failure
    /// is logged (at debug: scanners and mistaken clients are common) and `None`.
    pub async fn accept(
        &self,
        socket: TcpStream,
        protocol: Protocol,
    ) -> Option<TlsStream<TcpStream>> {
        let peer = socket.peer_addr().ok();
        let acceptor = self.acceptor(protocol);
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(?peer, error = %e, "a TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(?peer, "a TLS handshake timed out");
                None
            }
        }
    }
}

/// Connections accepted on `listener` and through their TLS handshake, each
/// handshake in a task of its own. Failed handshakes are logged, never passed on:
/// a server that receives an error from its incoming stream stops.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    protocol: Protocol,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let socket = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => socket,
                    Err(e) => {
                        // Out of descriptors, say: wait a moment rather than spin.
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = socket.set_nodelay(true);
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                if let Some(stream) = tls.accept(socket, protocol).await {
                    let _ = tx.send(Ok(stream)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn files_are_read_again_only_when_they_change_and_bad_ones_are_survived() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "server", "first");
        let tls = ServerTls::load(Files {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
        })
        .unwrap();
        let before = tls.loaded.read().unwrap().grpc.clone();
        tls.reload_if_changed();
        assert!(Arc::ptr_eq(&before, &tls.loaded.read().unwrap().grpc));
        // A broken certificate: the old configuration stays.
        std::fs::write(&cert, "not a certificate").unwrap();
        tls.reload_if_changed();
        assert!(Arc::ptr_eq(&before, &tls.loaded.read().unwrap().grpc));
        // A new pair, with the old files' times (as a Nix store path would have):
        // found by content, taken.
        let times = std::fs::metadata(&key).unwrap().modified().unwrap();
        write_pair(dir.path(), "server", "second");
        for file in [&cert, &key] {
            std::fs::File::options()
                .write(true)
                .open(file)
                .unwrap()
                .set_modified(times)
                .unwrap();
        }
        tls.reload_if_changed();
        assert!(!Arc::ptr_eq(&before, &tls.loaded.read().unwrap().grpc));
        assert!(ServerTls::load(Files {
            cert: dir.path().join("missing.pem"),
            key,
            client_ca: None,
        })
        .is_err());
    }
}
