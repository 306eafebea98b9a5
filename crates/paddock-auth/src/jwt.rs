//! JSON Web Tokens: HS256 with a shared secret, or RS256, ES256 and EdDSA with the
//! issuer's keys (a JWKS document, re-read when it changes). A token must carry the
//! configured issuer and audience and an expiry; its permissions come from a claim.
//! Verified tokens are remembered (by digest, until they expire or the keys change),
//! so that a build's thousands of calls pay for one signature check. A token's
//! identity is named `jwt:` and its subject, so that no issuer can mint the name of a
//! configured token or certificate.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashlink::LruCache;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use paddock_config::{JwtConfig, Permission};
use parking_lot::Mutex;

use crate::{Grant, Pattern, Principal, Proof, Unauthenticated};

/// Verified tokens remembered.
const REMEMBERED: usize = 4096;
/// How often the JWKS file is looked at for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// The shortest HS256 secret accepted: a short one can be guessed offline from any
/// token signed with it.
const MIN_SECRET: usize = 32;
/// What names a JWT's identity.
pub const PREFIX: &str = "jwt:";

/// `xxx.yyy.zzz`: a JWS in compact form.
pub fn looks_like_jwt(credential: &str) -> bool {
    credential.split('.').count() == 3
}

struct Keys {
    set: JwkSet,
    modified: Option<SystemTime>,
    checked: Instant,
}

/// Verified tokens by the SHA-256 of their text: who each stands for, and when it
/// expires (seconds since the epoch).
type Remembered = LruCache<[u8; 32], (Arc<Principal>, u64)>;

pub struct Verifier {
    config: JwtConfig,
    secret: Option<DecodingKey>,
    jwks: Option<(PathBuf, Mutex<Keys>)>,
    remembered: Mutex<Remembered>,
}

fn read_jwks(path: &PathBuf) -> Result<(JwkSet, Option<SystemTime>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the JWKS {}: {e}", path.display()))?;
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|e| format!("the JWKS {} is not valid: {e}", path.display()))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((set, modified))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The algorithm a JWK is for: its own `alg`, else its key type's usual one.
fn algorithm_of(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    use jsonwebtoken::jwk::KeyAlgorithm as K;
    if let Some(alg) = jwk.common.key_algorithm {
        // Only the signature algorithms this server accepts; a key for anything else
        // (encryption, HMAC in a public key set) is never used.
        return match alg {
            K::RS256 => Some(Algorithm::RS256),
            K::RS384 => Some(Algorithm::RS384),
            K::RS512 => Some(Algorithm::RS512),
            K::PS256 => Some(Algorithm::PS256),
            K::PS384 => Some(Algorithm::PS384),
            K::PS512 => Some(Algorithm::PS512),
            K::ES256 => Some(Algorithm::ES256),
            K::ES384 => Some(Algorithm::ES384),
            K::EdDSA => Some(Algorithm::EdDSA),
            _ => None,
        };
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(_) => Some(Algorithm::ES256),
        AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
        AlgorithmParameters::OctetKey(_) => None,
    }
}

impl Verifier {
    pub fn new(config: &JwtConfig) -> Result<Verifier, String> {
        let secret = match &config.secret_file {
            Some(file) => {
                let text = std::fs::read(file)
                    .map_err(|e| format!("reading the JWT secret {}: {e}", file.display()))?;
                let trimmed = text.strip_suffix(b"\n").unwrap_or(&text);
                if trimmed.len() < MIN_SECRET {
                    return Err(format!(
                        "the JWT secret {} holds {} bytes; HS256 needs at least {MIN_SECRET}",
                        file.display(),
                        trimmed.len()
                    ));
                }
                Some(DecodingKey::from_secret(trimmed))
            }
            None => None,
        };
        let jwks = match &config.jwks_file {
            Some(path) => {
                let (set, modified) = read_jwks(path)?;
                Some((
                    path.clone(),
                    Mutex::new(Keys {
                        set,
                        modified,
                        checked: Instant::now(),
                    }),
                ))
            }
            None => None,
        };
        Ok(Verifier {
            config: config.clone(),
            secret,
            jwks,
            remembered: Mutex::new(LruCache::new(REMEMBERED)),
        })
    }

    /// The key for a token with `header`, and the one algorithm it may use.
    fn key(
        &self,
        header: &jsonwebtoken::Header,
    ) -> Result<(DecodingKey, Algorithm), Unauthenticated> {
        let refuse = |why: &str| Unauthenticated(format!("the token is refused: {why}"));
        if header.alg == Algorithm::HS256 {
            return match &self.secret {
                Some(secret) => Ok((secret.clone(), Algorithm::HS256)),
                None => Err(refuse("this server takes no HS256 tokens")),
            };
        }
        let Some((path, keys)) = &self.jwks else {
            return Err(refuse("this server takes only HS256 tokens"));
        };
        let mut keys = keys.lock();
        if keys.checked.elapsed() >= RELOAD_EVERY {
            keys.checked = Instant::now();
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if modified != keys.modified {
                match read_jwks(path) {
                    Ok((set, modified)) => {
                        tracing::info!(jwks = %path.display(), "reloaded the JWT keys");
                        keys.set = set;
                        keys.modified = modified;
                        // A key taken out revokes what it signed.
                        self.remembered.lock().clear();
                    }
                    Err(e) => tracing::warn!(error = %e, "keeping the JWT keys loaded before"),
                }
            }
        }
        let jwk = match &header.kid {
            Some(kid) => keys.set.find(kid),
            None if keys.set.keys.len() == 1 => keys.set.keys.first(),
            None => None,
        }
        .ok_or_else(|| refuse("no key of this server signed it"))?;
        let algorithm =
            algorithm_of(jwk).ok_or_else(|| refuse("its key is not one for signatures"))?;
        if algorithm != header.alg {
            return Err(refuse("it is signed with another algorithm than its key's"));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|_| refuse("its key cannot be used"))?;
        Ok((key, algorithm))
    }

    /// The principal a JWT stands for; `digest` is the token's SHA-256, under which a
    /// verified token is remembered.
    pub fn verify(
        &self,
        token: &str,
        digest: &[u8; 32],
    ) -> Result<Arc<Principal>, Unauthenticated> {
        if let Some((principal, expires)) = self.remembered.lock().get(digest) {
            if *expires > now() {
                return Ok(principal.clone());
            }
        }
        let header = decode_header(token)
            .map_err(|_| Unauthenticated("the bearer token is not a valid JWT".into()))?;
        let (key, algorithm) = self.key(&header)?;
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = decode::<serde_json::Value>(token, &key, &validation).map_err(|e| {
            Unauthenticated(
                match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired",
                    ErrorKind::ImmatureSignature => "the token is not valid yet",
                    ErrorKind::InvalidAudience => "the token is for another audience",
                    ErrorKind::InvalidIssuer => "the token is from another issuer",
                    ErrorKind::InvalidSignature => "the token's signature does not verify",
                    ErrorKind::MissingRequiredClaim(_) => "the token lacks exp, iss or aud",
                    _ => "the token is not valid",
                }
                .to_owned(),
            )
        })?;
        let claims = data.claims;
        let subject = claims[&self.config.name_claim]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                Unauthenticated(format!("the token has no {} claim", self.config.name_claim))
            })?;
        let name = format!("{PREFIX}{subject}");
        // Absent: every instance. Present, it must say which, plainly: a claim that is
        // not a list of names is refused rather than read as "everywhere".
        let instances: Vec<String> = match claims.get(&self.config.instances_claim) {
            None => vec!["*".into()],
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    Unauthenticated(format!(
                        "the token's {} claim is not a list of instance patterns",
                        self.config.instances_claim
                    ))
                })?,
            Some(_) => {
                return Err(Unauthenticated(format!(
                    "the token's {} claim is not a list of instance patterns",
                    self.config.instances_claim
                )))
            }
        };
        let mut grants = Vec::new();
        if let Some(serde_json::Value::Array(items)) = claims.get(&self.config.permissions_claim) {
            for item in items.iter().filter_map(|i| i.as_str()) {
                let (permission, pattern) = match item.split_once(':') {
                    Some((p, pattern)) => (p, Some(pattern)),
                    None => (item, None),
                };
                let Ok(permission) = permission.parse::<Permission>() else {
                    tracing::warn!(%name, claim = %item, "a token names an unknown permission");
                    continue;
                };
                match pattern {
                    Some(pattern) => grants.push(Grant {
                        permission,
                        instances: Pattern::new(pattern),
                    }),
                    None => grants.extend(instances.iter().map(|i| Grant {
                        permission,
                        instances: Pattern::new(i),
                    })),
                }
            }
        }
        let expires = claims["exp"].as_u64().unwrap_or(0);
        let principal = Arc::new(Principal::new(name, Proof::Jwt, grants));
        self.remembered
            .lock()
            .insert(*digest, (principal.clone(), expires));
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &[u8] = b"a shared secret of thirty-two bytes or more";

    fn config(dir: &std::path::Path) -> JwtConfig {
        std::fs::write(dir.join("secret"), [SECRET, b"\n"].concat()).unwrap();
        JwtConfig {
            secret_file: Some(dir.join("secret")),
            jwks_file: None,
            issuer: "https://issuer.example".into(),
            audience: "paddock".into(),
            permissions_claim: "paddock_permissions".into(),
            instances_claim: "paddock_instances".into(),
            name_claim: "sub".into(),
        }
    }

    fn token(secret: &[u8], claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn issuer_audience_expiry_and_signature_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let verifier = Verifier::new(&config(dir.path())).unwrap();
        let later = now() + 600;
        let good = serde_json::json!({
            "sub": "dev-alice", "iss": "https://issuer.example", "aud": "paddock", "exp": later,
            "paddock_permissions": ["cas.read", "ac.read", "execute:team-*", "bogus"],
        });
        let check = |t: &str| {
            use sha2::Digest as _;
            verifier.verify(t, &sha2::Sha256::digest(t.as_bytes()).into())
        };
        let alice = check(&token(SECRET, good.clone())).unwrap();
        assert_eq!(alice.name(), "jwt:dev-alice");
        assert!(alice.may(Permission::AcRead, "main"));
        assert!(
            alice.may(Permission::Execute, "team-x") && !alice.may(Permission::Execute, "main")
        );
        assert!(!alice.may(Permission::AcWrite, "main"));
        let mut expired = good.clone();
        expired["exp"] = serde_json::json!(now() - 3600);
        let mut audience = good.clone();
        audience["aud"] = serde_json::json!("someone-else");
        let mut issuer = good.clone();
        issuer["iss"] = serde_json::json!("https://evil.example");
        let mut bad_instances = good.clone();
        bad_instances["paddock_instances"] = serde_json::json!("team-a");
        for (what, t, want) in [
            (
                "instances",
                token(SECRET, bad_instances),
                "instance patterns",
            ),
            ("expired", token(SECRET, expired), "expired"),
            ("audience", token(SECRET, audience), "audience"),
            ("issuer", token(SECRET, issuer), "issuer"),
            ("signature", token(b"wrong-secret", good), "signature"),
        ] {
            let refused = check(&t).unwrap_err().to_string();
            assert!(refused.contains(want), "{what}: {refused}");
            assert!(!refused.contains(&t), "{what}: the token was echoed");
        }
    }

    #[test]
    fn a_short_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        std::fs::write(dir.path().join("short"), "hunter2\n").unwrap();
        config.secret_file = Some(dir.path().join("short"));
        let refused = Verifier::new(&config).err().unwrap();
        assert!(refused.contains("at least 32"), "{refused}");
    }
}
