//! Registries, on the worker's terms: which it may reach and at which addresses,
//! with which credentials, and how much it reads from them.
//!
//! A `container-image` property is the client's choice, so the registry host is too.
//! Left alone, a worker would fetch from wherever an action points it: its own
//! loopback, the cloud's metadata address, a host inside the farm's network, with
//! the worker's credentials. So every request goes through one HTTP client whose
//! resolver looks each host up once and refuses it if any of its addresses is not
//! public (loopback, link-local, private, and the like), unless the operator listed
//! the registry; host names that are addresses are checked the same way, redirects
//! too, and the token service a registry names. Proxies from the environment are
//! not used (a proxy would resolve names on its own). Every body is read with a
//! bound (manifests, tokens, layers up to the size their descriptor gives), and no
//! error ever carries what a server answered beyond its status and a known OCI error
//! code: a non-registry's answer must not travel back to the client.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use paddock_sandbox::ResolveError;
use parking_lot::Mutex;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{StatusCode, Url};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Manifests and configs are small; more than this is refused.
pub const MAX_METADATA: u64 = 16 << 20;
/// A token service's answer.
const MAX_TOKEN: u64 = 64 << 10;
/// Redirects followed for one request (registries send blobs to a CDN).
const MAX_REDIRECTS: usize = 5;
/// How long a manifest or token request may take, and a layer download may wait
/// for its next bytes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// OCI error codes a registry may answer with, the only words of its answer that an
/// error message repeats.
const KNOWN_CODES: &[&str] = &[
    "BLOB_UNKNOWN",
    "MANIFEST_UNKNOWN",
    "MANIFEST_INVALID",
    "NAME_UNKNOWN",
    "NAME_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
];

/// How the worker reaches registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// The only registries (`HOST[:PORT]`) it may pull from; empty: any registry at
    /// a public address. A listed registry may be at any address.
    pub allowed: Vec<String>,
    /// Registries reached over plain HTTP (loopback ones always are).
    pub insecure: Vec<String>,
    /// `(username, password)` per repository prefix (`HOST[:PORT][/REPO...]`).
    pub credentials: HashMap<String, (String, String)>,
}

/// Whether an address is one that any registry could legitimately be at.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
                || (a == 198 && (18..20).contains(&b)) // benchmarking
                || a >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let segments = v6.segments();
            // NAT64 (64:ff9b::/96) carries an IPv4 address.
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let v4 = std::net::Ipv4Addr::new(
                    (segments[6] >> 8) as u8,
                    segments[6] as u8,
                    (segments[7] >> 8) as u8,
                    segments[7] as u8,
                );
                return is_public(IpAddr::V4(v4));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (segments[0] & 0xfe00) == 0xfc00 // unique local
                || (segments[0] & 0xffc0) == 0xfe80 // link-local
                || (segments[0] == 0x2001 && segments[1] == 0xdb8)) // documentation
        }
    }
}

/// The host of `HOST[:PORT]` (or `[V6]:PORT`), lowercase.
fn host_of(registry: &str) -> String {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host.to_ascii_lowercase()
}

/// `localhost`, `127.0.0.0/8` and `::1`: registries reached over plain HTTP.
fn is_loopback(registry: &str) -> bool {
    let host = host_of(registry);
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A request refused by policy: the client named a registry this worker may not use.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Which hosts may be at non-public addresses: those of listed registries.
struct Guard {
    listed: HashSet<String>,
}

impl Guard {
    fn check(&self, host: &str, ip: IpAddr) -> Result<(), Refused> {
        match is_public(ip) || self.listed.contains(&host.to_ascii_lowercase()) {
            true => Ok(()),
            false => Err(Refused(format!(
                "{host} is at {ip}, a loopback, link-local or private address; a worker pulls from such registries only when they are listed in [worker.oci] registries"
            ))),
        }
    }

    /// Checks a URL whose host is an address (those never reach the resolver).
    fn check_url(&self, url: &Url) -> Result<(), Refused> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check(&ip.to_string(), IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check(&ip.to_string(), IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => Ok(()),
            None => Err(Refused(format!("{url} has no host"))),
        }
    }
}

/// Resolves each host once and hands the HTTP client exactly the addresses it
/// checked, so that no second lookup can answer differently.
struct GuardedResolver(Arc<Guard>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            for addr in &addrs {
                guard.check(&host, addr.ip())?;
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Every registry a worker pulls from, through one guarded HTTP client.
pub struct Registries {
    options: RegistryOptions,
    guard: Arc<Guard>,
    http: reqwest::Client,
    /// Bearer tokens by registry and repository.
    tokens: Mutex<HashMap<(String, String), String>>,
}

/// One repository in one registry.
#[derive(Debug, Clone)]
pub struct Repository {
    /// `HOST[:PORT]` as requests name it.
    pub registry: String,
    pub name: String,
}

impl Repository {
    fn scheme(&self, registries: &Registries) -> &'static str {
        let plain = is_loopback(&self.registry)
            || registries
                .options
                .insecure
                .iter()
                .any(|r| r.eq_ignore_ascii_case(&self.registry));
        if plain {
            "http"
        } else {
            "https"
        }
    }
}

/// How a request went wrong, worded for the client without the server's answer.
fn failure(e: reqwest::Error, what: &str) -> ResolveError {
    let mut source: Option<&dyn std::error::Error> = Some(&e);
    while let Some(error) = source {
        if let Some(refused) = error.downcast_ref::<Refused>() {
            return ResolveError::Precondition(format!("{what}: refused: {refused}"));
        }
        source = error.source();
    }
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_redirect() {
        "refused a redirect"
    } else {
        "the request failed"
    };
    ResolveError::Worker(format!("{what}: {kind}"))
}

/// What a registry's error answer says, in words this worker chooses.
async fn status_failure(response: reqwest::Response, what: &str) -> ResolveError {
    let status = response.status();
    let code = read_limited(response, 4 << 10)
        .await
        .ok()
        .and_then(|body| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned))
        .filter(|c| KNOWN_CODES.contains(&c.as_str()));
    let said = match code {
        Some(code) => format!("HTTP {} ({code})", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    };
    match status {
        StatusCode::NOT_FOUND => ResolveError::Precondition(format!("{what}: not found ({said})")),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ResolveError::Worker(format!(
            "{what}: the registry refused this worker ({said}); check [worker.oci.credentials]"
        )),
        _ => ResolveError::Worker(format!("{what}: the registry answered {said}")),
    }
}

/// A body, refused once it is longer than `limit`.
async fn read_limited(mut response: reqwest::Response, limit: u64) -> Result<Bytes, String> {
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(format!("the answer is larger than {limit} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| e.without_url().to_string())?
    {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(format!("the answer is larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.into())
}

/// The `key="value"` parameters of a `WWW-Authenticate` challenge, and its scheme.
fn challenge(header: &str) -> (String, HashMap<String, String>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            },
            None => match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            },
        };
        params.insert(key, value.to_owned());
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_ascii_lowercase(), params)
}

impl Registries {
    pub fn new(options: RegistryOptions) -> Result<Registries, String> {
        let guard = Arc::new(Guard {
            listed: options.allowed.iter().map(|r| host_of(r)).collect(),
        });
        let redirect_guard = guard.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(Refused("too many redirects".into()));
            }
            let downgraded = attempt.previous().iter().any(|u| u.scheme() == "https")
                && attempt.url().scheme() != "https";
            if downgraded {
                return attempt.error(Refused("a redirect from https to plain http".into()));
            }
            match redirect_guard.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(refused) => attempt.error(refused),
            }
        });
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver(guard.clone())))
            .redirect(policy)
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("paddock/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("building the registry client: {e}"))?;
        Ok(Registries {
            options,
            guard,
            http,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// Whether this worker may pull from `registry` at all.
    pub fn check(&self, registry: &str) -> Result<(), ResolveError> {
        let allowed = &self.options.allowed;
        if !allowed.is_empty() && !allowed.iter().any(|r| r.eq_ignore_ascii_case(registry)) {
            return Err(ResolveError::Precondition(format!(
                "the registry {registry} is not one this worker may pull from ([worker.oci] registries)"
            )));
        }
        let host = host_of(registry);
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.guard
                .check(&host, ip)
                .map_err(|e| ResolveError::Precondition(e.to_string()))?;
        }
        Ok(())
    }

    /// The credentials configured for the longest prefix of `registry/repository`.
    fn credentials(&self, repository: &Repository) -> Option<&(String, String)> {
        let full = format!("{}/{}", repository.registry, repository.name).to_ascii_lowercase();
        self.options
            .credentials
            .iter()
            .filter(|(prefix, _)| {
                let prefix = prefix.trim_end_matches('/').to_ascii_lowercase();
                full == prefix || full.starts_with(&format!("{prefix}/"))
            })
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, login)| login)
    }

    fn url(&self, repository: &Repository, path: &str) -> Result<Url, ResolveError> {
        let text = format!(
            "{}://{}/v2/{}/{path}",
            repository.scheme(self),
            repository.registry,
            repository.name
        );
        Url::parse(&text)
            .map_err(|e| ResolveError::Precondition(format!("{text} is not a URL: {e}")))
    }

    /// A GET with the repository's authorisation, going through the registry's
    /// token flow once if it asks for one.
    async fn get(
        &self,
        repository: &Repository,
        url: Url,
        accept: Option<&'static str>,
        what: &str,
    ) -> Result<reqwest::Response, ResolveError> {
        self.guard
            .check_url(&url)
            .map_err(|e| ResolveError::Precondition(e.to_string()))?;
        let key = (repository.registry.clone(), repository.name.clone());
        let mut authorisation = self.tokens.lock().get(&key).map(|t| format!("Bearer {t}"));
        for attempt in 0..2 {
            let mut request = self.http.get(url.clone());
            if let Some(accept) = accept {
                request = request.header(ACCEPT, HeaderValue::from_static(accept));
            }
            if let Some(value) = &authorisation {
                request = request.header(AUTHORIZATION, value);
            }
            let response = request.send().await.map_err(|e| failure(e, what))?;
            if response.status() != StatusCode::UNAUTHORIZED || attempt == 1 {
                return Ok(response);
            }
            let Some(header) = response
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
            else {
                return Ok(response);
            };
            let (scheme, params) = challenge(&header);
            authorisation = match scheme.as_str() {
                "bearer" => {
                    let token = self.token(repository, &params, what).await?;
                    self.tokens.lock().insert(key.clone(), token.clone());
                    Some(format!("Bearer {token}"))
                }
                "basic" => match self.credentials(repository) {
                    Some((user, password)) => Some(basic(user, password)),
                    None => return Ok(response),
                },
                _ => return Ok(response),
            };
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// A pull token from the service the registry's challenge names.
    async fn token(
        &self,
        repository: &Repository,
        params: &HashMap<String, String>,
        what: &str,
    ) -> Result<String, ResolveError> {
        let realm = params.get("realm").ok_or_else(|| {
            ResolveError::Worker(format!(
                "{what}: the registry's challenge names no token service"
            ))
        })?;
        let mut url = Url::parse(realm).map_err(|_| {
            ResolveError::Worker(format!(
                "{what}: the registry names a token service that is not a URL"
            ))
        })?;
        if url.scheme() != "https" && repository.scheme(self) == "https" {
            return Err(ResolveError::Precondition(format!(
                "{what}: refused: the registry names a token service over plain http"
            )));
        }
        self.guard
            .check_url(&url)
            .map_err(|e| ResolveError::Precondition(format!("{what}: refused: {e}")))?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = params.get("service") {
                query.append_pair("service", service);
            }
            query.append_pair("scope", &format!("repository:{}:pull", repository.name));
        }
        let mut request = self.http.get(url).timeout(REQUEST_TIMEOUT);
        if let Some((user, password)) = self.credentials(repository) {
            request = request.header(AUTHORIZATION, basic(user, password));
        }
        let response = request.send().await.map_err(|e| failure(e, what))?;
        if !response.status().is_success() {
            return Err(status_failure(response, &format!("{what}: the token service")).await);
        }
        let body = read_limited(response, MAX_TOKEN)
            .await
            .map_err(|e| ResolveError::Worker(format!("{what}: the token service: {e}")))?;
        let answer: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
            ResolveError::Worker(format!("{what}: the token service's answer is not JSON"))
        })?;
        answer["token"]
            .as_str()
            .or_else(|| answer["access_token"].as_str())
            .map(str::to_owned)
            .ok_or_else(|| ResolveError::Worker(format!("{what}: the token service gave no token")))
    }

    /// A manifest (or index) by tag or digest: its bytes and digest, checked against
    /// `reference` when that is a digest.
    pub async fn manifest(
        &self,
        repository: &Repository,
        reference: &str,
    ) -> Result<(Bytes, String), ResolveError> {
        self.check(&repository.registry)?;
        let what = format!(
            "the manifest {}/{}:{reference}",
            repository.registry, repository.name
        );
        let url = self.url(repository, &format!("manifests/{reference}"))?;
        let response = self
            .get(repository, url, Some(MANIFEST_TYPES), &what)
            .await?;
        if !response.status().is_success() {
            return Err(status_failure(response, &what).await);
        }
        let body = read_limited(response, MAX_METADATA)
            .await
            .map_err(|e| ResolveError::Precondition(format!("{what}: {e}")))?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if reference.starts_with("sha256:") && digest != reference {
            return Err(ResolveError::Infrastructure(format!(
                "{what}: the registry sent a manifest whose digest is {digest}"
            )));
        }
        Ok((body, digest))
    }

    /// Streams the blob `digest` of `size` bytes into `out`, checking both; returns
    /// the bytes written.
    pub async fn blob(
        &self,
        repository: &Repository,
        digest: &str,
        size: u64,
        out: &mut (impl AsyncWrite + Unpin),
    ) -> Result<u64, ResolveError> {
        self.check(&repository.registry)?;
        let what = format!("the blob {digest}");
        let url = self.url(repository, &format!("blobs/{digest}"))?;
        let mut response = self.get(repository, url, None, &what).await?;
        if !response.status().is_success() {
            return Err(status_failure(response, &what).await);
        }
        if response.content_length().is_some_and(|n| n != size) {
            return Err(ResolveError::Infrastructure(format!(
                "{what}: the registry offers a different size than the manifest's {size} bytes"
            )));
        }
        let mut sha = Sha256::new();
        let mut written = 0u64;
        while let Some(chunk) = response.chunk().await.map_err(|e| failure(e, &what))? {
            written += chunk.len() as u64;
            if written > size {
                return Err(ResolveError::Infrastructure(format!(
                    "{what}: the registry sent more than the manifest's {size} bytes"
                )));
            }
            sha.update(&chunk);
            out.write_all(&chunk)
                .await
                .map_err(|e| ResolveError::io(format_args!("writing {what}"), e))?;
        }
        let actual = format!("sha256:{}", hex::encode(sha.finalize()));
        if written != size || actual != digest {
            return Err(ResolveError::Infrastructure(format!(
                "{what}: the registry sent {written} bytes whose digest is {actual}"
            )));
        }
        Ok(written)
    }
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for public in ["8.8.8.8", "2606:4700::1111", "100.128.0.1"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "224.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
    }

    #[test]
    fn loopback_registries_are_plain_http() {
        for plain in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.3.2.1",
            "[::1]:5000",
        ] {
            assert!(is_loopback(plain), "{plain}");
        }
        for tls in [
            "ghcr.io",
            "10.0.0.1:5000",
            "localhost.example:5000",
            "[2001:db8::1]:443",
        ] {
            assert!(!is_loopback(tls), "{tls}");
        }
    }

    #[test]
    fn challenges_and_credentials() {
        let (scheme, params) = challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(scheme, "bearer");
        assert_eq!(params["realm"], "https://auth.example/token");
        assert_eq!(params["scope"], "repository:a/b:pull,push");
        let registries = Registries::new(RegistryOptions {
            credentials: HashMap::from([
                (
                    "reg.example".to_owned(),
                    ("host".to_owned(), "1".to_owned()),
                ),
                (
                    "reg.example/team".to_owned(),
                    ("team".to_owned(), "2".to_owned()),
                ),
            ]),
            ..Default::default()
        })
        .unwrap();
        let repo = |name: &str| Repository {
            registry: "reg.example".into(),
            name: name.into(),
        };
        assert_eq!(registries.credentials(&repo("team/app")).unwrap().0, "team");
        assert_eq!(
            registries.credentials(&repo("teamster/app")).unwrap().0,
            "host"
        );
        let narrow = Registries::new(RegistryOptions {
            credentials: HashMap::from([(
                "reg.example/team".to_owned(),
                ("team".to_owned(), "2".to_owned()),
            )]),
            ..Default::default()
        })
        .unwrap();
        assert!(narrow.credentials(&repo("other/app")).is_none());
    }

    #[test]
    fn only_listed_registries_may_be_private() {
        let open = Registries::new(RegistryOptions::default()).unwrap();
        assert!(open.check("127.0.0.1:5000").is_err());
        assert!(open.check("169.254.169.254").is_err());
        assert!(open.check("ghcr.io").is_ok());
        let listed = Registries::new(RegistryOptions {
            allowed: vec!["127.0.0.1:5000".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(listed.check("127.0.0.1:5000").is_ok());
        assert!(listed.check("ghcr.io").is_err());
    }
}
