//! Who is calling, and what they may do.
//!
//! A caller proves who it is with a bearer token (`authorization: Bearer ...`),
//! matched against configured tokens, which are kept only as SHA-256 digests and
//! compared in constant time; with a JSON Web Token, checked for its signature
//! (HS256 with a shared secret, or RS256, ES256, EdDSA with the issuer's JWKS), issuer,
//! audience and expiry, whose claims carry its permissions; or with a client
//! certificate that TLS already verified against the configured CA, matched by its
//! subject or subjectAltName. The result is a [`Principal`]: a name and the
//! permissions it holds on instance-name patterns. With nothing configured (a farm on
//! loopback), every caller is the anonymous principal, who may do everything.
//!
//! This crate decides; the transport (`paddock-server`) asks. It never logs or returns
//! a credential, only the name it stands for.

mod certificate;
mod jwt;
mod pattern;

use std::collections::HashSet;
use std::sync::Arc;

use paddock_config::{AuthConfig, Permission};
use sha2::{Digest as _, Sha256};

pub use pattern::Pattern;

/// A permission on the instances a pattern matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub permission: Permission,
    pub instances: Pattern,
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// Nothing: the server is open (no authentication configured).
    Anonymous,
    Token,
    Jwt,
    Certificate,
    /// A worker in the server's own process.
    Local,
}

/// A caller whose identity is established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    name: String,
    proof: Proof,
    grants: Vec<Grant>,
}

/// A caller without the permission a call needs.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{who} lacks the {} permission on instance {instance:?}", permission.name())]
pub struct Denied {
    pub who: String,
    pub permission: Permission,
    pub instance: String,
}

/// A caller whose credentials are missing or wrong. The reason never holds the
/// credential itself.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unauthenticated(pub String);

/// Names no credential may take: the open server's caller, and the server's own
/// workers.
pub const RESERVED: [&str; 2] = ["anonymous", "local-workers"];

fn every(permission: Permission) -> Grant {
    Grant {
        permission,
        instances: Pattern::any(),
    }
}

impl Principal {
    pub fn new(name: impl Into<String>, proof: Proof, grants: Vec<Grant>) -> Principal {
        Principal {
            name: name.into(),
            proof,
            grants,
        }
    }

    /// The caller of an open server: every permission, everywhere.
    pub fn anonymous() -> Principal {
        Principal::new(
            "anonymous",
            Proof::Anonymous,
            Permission::ALL.map(every).to_vec(),
        )
    }

    /// Workers running inside the server's own process.
    pub fn local_workers() -> Principal {
        Principal::new(
            "local-workers",
            Proof::Local,
            vec![every(Permission::Worker)],
        )
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn proof(&self) -> Proof {
        self.proof
    }

    /// Whether the caller may do `permission` on `instance`.
    pub fn may(&self, permission: Permission, instance: &str) -> bool {
        self.grants
            .iter()
            .any(|grant| grant.permission == permission && grant.instances.matches(instance))
    }

    /// The caller as a worker: on the workers' listener, a worker reads and writes
    /// the CAS of the instances it serves (its actions' inputs and outputs), whatever
    /// else it may do. Elsewhere it has only what it was granted.
    pub fn serving_workers(&self) -> Principal {
        let mut grants = self.grants.clone();
        for grant in &self.grants {
            if grant.permission == Permission::Worker {
                for permission in [Permission::CasRead, Permission::CasWrite] {
                    grants.push(Grant {
                        permission,
                        instances: grant.instances.clone(),
                    });
                }
            }
        }
        Principal {
            name: self.name.clone(),
            proof: self.proof,
            grants,
        }
    }

    /// Whether the caller may do `permission` on some instance.
    pub fn may_somewhere(&self, permission: Permission) -> bool {
        self.grants
            .iter()
            .any(|grant| grant.permission == permission)
    }

    /// [`Principal::may`], as an error naming what is missing.
    pub fn require(&self, permission: Permission, instance: &str) -> Result<(), Denied> {
        match self.may(permission, instance) {
            true => Ok(()),
            false => Err(Denied {
                who: self.name.clone(),
                permission,
                instance: instance.to_owned(),
            }),
        }
    }
}

/// A configured bearer token: its digest and what it grants.
struct Token {
    sha256: [u8; 32],
    principal: Arc<Principal>,
}

fn grants(permissions: &[Permission], instances: &[String]) -> Vec<Grant> {
    permissions
        .iter()
        .flat_map(|p| {
            instances.iter().map(move |i| Grant {
                permission: *p,
                instances: Pattern::new(i),
            })
        })
        .collect()
}

/// Compares two digests in time that does not depend on where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Tells callers apart, as the configuration says.
pub struct Authenticator {
    /// No way of telling callers apart is configured: everyone is `anonymous`.
    open: bool,
    anonymous: Arc<Principal>,
    tokens: Vec<Token>,
    certificates: Vec<certificate::Rule>,
    jwt: Option<jwt::Verifier>,
    /// The names of configured identities, and reserved ones: a certificate whose
    /// common name is one of them must be given a name of its own.
    names: HashSet<String>,
}

impl Authenticator {
    /// Reads the token files and keys the configuration names.
    pub fn new(config: &AuthConfig) -> Result<Authenticator, String> {
        // Every identity has a name of its own: quotas, operations, uploads and worker
        // names belong to names.
        let mut names: HashSet<String> = RESERVED.iter().map(|n| (*n).to_owned()).collect();
        let configured = config
            .tokens
            .iter()
            .map(|t| &t.name)
            .chain(config.certificates.iter().filter_map(|c| c.name.as_ref()));
        for name in configured {
            if name.starts_with(jwt::PREFIX) || !names.insert(name.clone()) {
                return Err(format!(
                    "the identity name {name:?} is taken (by another token or certificate, or reserved: {}, and {}…)",
                    RESERVED.join(", "),
                    jwt::PREFIX
                ));
            }
        }
        let mut tokens = Vec::new();
        for token in &config.tokens {
            let sha256 = match (&token.token_file, &token.sha256) {
                (Some(file), _) => {
                    let text = std::fs::read_to_string(file).map_err(|e| {
                        format!(
                            "reading the token of {:?} from {}: {e}",
                            token.name,
                            file.display()
                        )
                    })?;
                    let secret = text.trim_end_matches(['\n', '\r']);
                    if secret.is_empty() {
                        return Err(format!("the token file of {:?} is empty", token.name));
                    }
                    Sha256::digest(secret.as_bytes()).into()
                }
                (None, Some(hex_digest)) => {
                    let bytes = hex::decode(hex_digest)
                        .map_err(|e| format!("the sha256 of {:?}: {e}", token.name))?;
                    <[u8; 32]>::try_from(bytes.as_slice())
                        .map_err(|_| format!("the sha256 of {:?} is not 32 bytes", token.name))?
                }
                (None, None) => {
                    return Err(format!(
                        "the token {:?} has no token_file or sha256",
                        token.name
                    ))
                }
            };
            tokens.push(Token {
                sha256,
                principal: Arc::new(Principal::new(
                    token.name.clone(),
                    Proof::Token,
                    grants(&token.permissions, &token.instances),
                )),
            });
        }
        let certificates = config
            .certificates
            .iter()
            .map(certificate::Rule::new)
            .collect::<Result<Vec<_>, _>>()?;
        let jwt = config.jwt.as_ref().map(jwt::Verifier::new).transpose()?;
        Ok(Authenticator {
            open: !config.configured(),
            anonymous: Arc::new(Principal::anonymous()),
            tokens,
            certificates,
            jwt,
            names,
        })
    }

    /// Whether callers are told apart at all.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Who is calling, from the `authorization` header's value (if any) and the
    /// client certificate TLS verified (its DER, if any).
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        certificate: Option<&[u8]>,
    ) -> Result<Arc<Principal>, Unauthenticated> {
        if self.open {
            return Ok(self.anonymous.clone());
        }
        if let Some(header) = authorization {
            let credential = header
                .strip_prefix("Bearer ")
                .or_else(|| header.strip_prefix("bearer "))
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    Unauthenticated("the authorization header is not `Bearer TOKEN`".into())
                })?;
            return self.bearer(credential);
        }
        if let Some(der) = certificate {
            return certificate::identify(&self.certificates, der, &self.names);
        }
        Err(Unauthenticated(
            "no credentials: send `authorization: Bearer TOKEN`, or a client certificate".into(),
        ))
    }

    fn bearer(&self, credential: &str) -> Result<Arc<Principal>, Unauthenticated> {
        let digest: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
        // Every configured token is compared, whether or not an earlier one matched.
        let mut found = None;
        for token in &self.tokens {
            if same(&token.sha256, &digest) {
                found = Some(token.principal.clone());
            }
        }
        if let Some(principal) = found {
            return Ok(principal);
        }
        match &self.jwt {
            Some(verifier) if jwt::looks_like_jwt(credential) => {
                verifier.verify(credential, &digest)
            }
            _ => Err(Unauthenticated(
                "the bearer token is not one this server knows".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paddock_config::TokenConfig;

    fn config(tokens: Vec<TokenConfig>) -> AuthConfig {
        AuthConfig {
            tokens,
            ..Default::default()
        }
    }

    #[test]
    fn tokens_are_matched_by_digest_and_grant_per_instance() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ci.token");
        std::fs::write(&file, "s3cret-ci\n").unwrap();
        let reader_digest = hex::encode(Sha256::digest(b"reader-token"));
        let auth = Authenticator::new(&config(vec![
            TokenConfig {
                name: "ci".into(),
                token_file: Some(file),
                sha256: None,
                permissions: vec![Permission::CasWrite, Permission::AcWrite],
                instances: vec!["team-*".into()],
            },
            TokenConfig {
                name: "reader".into(),
                token_file: None,
                sha256: Some(reader_digest),
                permissions: vec![Permission::AcRead],
                instances: vec!["*".into()],
            },
        ]))
        .unwrap();
        let ci = auth.authenticate(Some("Bearer s3cret-ci"), None).unwrap();
        assert_eq!(ci.name(), "ci");
        assert!(ci.may(Permission::AcWrite, "team-a"));
        assert!(!ci.may(Permission::AcWrite, "other"));
        assert!(!ci.may(Permission::AcRead, "team-a"));
        let reader = auth
            .authenticate(Some("Bearer reader-token"), None)
            .unwrap();
        let denied = reader.require(Permission::AcWrite, "main").unwrap_err();
        assert_eq!(
            denied.to_string(),
            "reader lacks the ac.write permission on instance \"main\""
        );
        for bad in [Some("Bearer nope"), Some("Basic abc"), None] {
            let refused = auth.authenticate(bad, None).unwrap_err();
            assert!(!refused.to_string().contains("nope"), "{refused}");
        }
    }

    #[test]
    fn an_open_server_lets_everyone_do_everything_and_workers_use_the_cas() {
        let auth = Authenticator::new(&AuthConfig::default()).unwrap();
        let anyone = auth.authenticate(None, None).unwrap();
        assert!(Permission::ALL.iter().all(|p| anyone.may(*p, "whatever")));
        let local = Principal::local_workers();
        assert!(!local.may(Permission::CasWrite, "x"));
        let serving = local.serving_workers();
        assert!(serving.may(Permission::CasWrite, "x") && !serving.may(Permission::AcWrite, "x"));
    }

    #[test]
    fn every_identity_has_a_name_of_its_own() {
        let token = |name: &str| TokenConfig {
            name: name.into(),
            token_file: None,
            sha256: Some("0".repeat(64)),
            permissions: vec![Permission::CasRead],
            instances: vec!["*".into()],
        };
        for names in [
            vec!["ci", "ci"],
            vec!["anonymous"],
            vec!["local-workers"],
            vec!["jwt:admin"],
        ] {
            let refused = Authenticator::new(&config(names.iter().map(|n| token(n)).collect()))
                .err()
                .unwrap();
            assert!(refused.contains("is taken"), "{refused}");
        }
        assert!(Authenticator::new(&config(vec![token("ci"), token("dev")])).is_ok());
    }
}
