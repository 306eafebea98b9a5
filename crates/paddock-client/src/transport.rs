//! How a client reaches a server: plain gRPC or TLS (`grpcs://`, checked against a
//! CA, optionally with a client certificate), and a bearer token on every call; or,
//! for a server in the same process, in-memory connections ([`LocalServer`]).

use std::path::{Path, PathBuf};
use std::task::{Context, Poll};

use http::header::AUTHORIZATION;
use http::HeaderValue;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::ClientError;

/// What a client proves itself with, and which servers it trusts.
#[derive(Clone, Default)]
pub struct Credentials {
    /// The CA that signed the server's certificate (for `grpcs://`); unset, the
    /// system's roots.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate and its key (mutual TLS).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// A bearer token, sent as `authorization: Bearer TOKEN`.
    pub token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    /// Never the token itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path)
        .map_err(|e| ClientError::Protocol(format!("reading the {what} {}: {e}", path.display())))
}

impl Credentials {
    /// Credentials from files: a CA, a certificate and key, a token file (its
    /// trailing newline ignored); the token may instead come from `token`.
    pub fn from_files(
        tls_ca: Option<PathBuf>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        token_file: Option<&Path>,
        token: Option<String>,
    ) -> Result<Credentials, ClientError> {
        let token = match token_file {
            Some(file) => Some(
                String::from_utf8_lossy(&read(file, "token file")?)
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            None => token.filter(|t| !t.is_empty()),
        };
        if tls_cert.is_some() != tls_key.is_some() {
            return Err(ClientError::Protocol(
                "a client certificate needs its key, and a key its certificate".into(),
            ));
        }
        Ok(Credentials {
            tls_ca,
            tls_cert,
            tls_key,
            token,
        })
    }

    fn tls(&self) -> Result<ClientTlsConfig, ClientError> {
        let mut tls = ClientTlsConfig::new();
        tls = match &self.tls_ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?)),
            None => tls.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            tls = tls.identity(Identity::from_pem(
                read(cert, "client certificate")?,
                read(key, "client key")?,
            ));
        }
        Ok(tls)
    }
}

/// `grpc://host:port` (or `http://`, or a bare `host:port`) and `grpcs://` (or
/// `https://`) as an endpoint, with TLS for the latter.
pub fn endpoint(url: &str, credentials: &Credentials) -> Result<Endpoint, ClientError> {
    let (uri, tls) = if let Some(rest) = url
        .strip_prefix("grpcs://")
        .or_else(|| url.strip_prefix("https://"))
    {
        (format!("https://{rest}"), true)
    } else if let Some(rest) = url
        .strip_prefix("grpc://")
        .or_else(|| url.strip_prefix("http://"))
    {
        (format!("http://{rest}"), false)
    } else {
        (format!("http://{url}"), false)
    };
    if !tls && (credentials.tls_cert.is_some() || credentials.tls_ca.is_some()) {
        return Err(ClientError::Protocol(format!(
            "{url}: TLS options were given for a plain-text address; use grpcs://"
        )));
    }
    if !tls && credentials.token.is_some() && !is_loopback(&uri) {
        tracing::warn!(%url, "sending a bearer token in plain text; use grpcs://");
    }
    let mut endpoint = Endpoint::from_shared(uri)?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(64 << 20));
    if tls {
        endpoint = endpoint.tls_config(credentials.tls()?)?;
    }
    Ok(endpoint)
}

/// Whether `uri` names this machine.
fn is_loopback(uri: &str) -> bool {
    let host = uri
        .split("://")
        .nth(1)
        .and_then(|rest| rest.rsplit_once(':'))
        .map_or("", |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A channel that adds the caller's bearer token to every request.
#[derive(Clone, Debug)]
pub struct Transport {
    channel: Channel,
    authorization: Option<HeaderValue>,
}

impl Transport {
    pub fn new(channel: Channel, token: Option<&str>) -> Result<Transport, ClientError> {
        let authorization = token
            .map(|t| {
                let mut value = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    ClientError::Protocol("the token has characters a header cannot carry".into())
                })?;
                value.set_sensitive(true);
                Ok::<_, ClientError>(value)
            })
            .transpose()?;
        Ok(Transport {
            channel,
            authorization,
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Transport {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(value) = &self.authorization {
            request.headers_mut().insert(AUTHORIZATION, value.clone());
        }
        tower::Service::call(&mut self.channel, request)
    }
}

/// How much an in-memory connection buffers each way.
const LOCAL_BUFFER: usize = 4 << 20;

/// A server in this process, reached through in-memory connections: each is one end
/// of a pipe whose other end is handed to the server. Nothing leaves the process, so
/// no credentials are needed; the server decides who such callers are.
#[derive(Clone, Debug)]
pub struct LocalServer {
    connections: mpsc::Sender<DuplexStream>,
}

impl LocalServer {
    /// A server's address, and the connections it is to serve.
    pub fn new() -> (LocalServer, mpsc::Receiver<DuplexStream>) {
        let (connections, accepted) = mpsc::channel(16);
        (LocalServer { connections }, accepted)
    }

    /// A channel to the server.
    pub async fn channel(&self) -> Result<Channel, ClientError> {
        let connections = self.connections.clone();
        let connector = tower::service_fn(move |_: http::Uri| {
            let connections = connections.clone();
            async move {
                let (client, server) = tokio::io::duplex(LOCAL_BUFFER);
                connections
                    .send(server)
                    .await
                    .map_err(|_| std::io::Error::other("the local server has stopped"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(client))
            }
        });
        Ok(Endpoint::from_static("http://local.paddock")
            .connect_with_connector(connector)
            .await?)
    }
}
