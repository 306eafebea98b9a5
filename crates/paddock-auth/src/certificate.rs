//! Identities from client certificates, which TLS has already verified against the
//! configured CA: a certificate is matched by the attributes of its subject and by
//! its subjectAltNames.

use std::collections::HashSet;
use std::sync::Arc;

use paddock_config::CertificateConfig;
use x509_parser::prelude::*;

use crate::{grants, Principal, Proof, Unauthenticated};

/// One `[[auth.certificates]]` entry.
pub struct Rule {
    /// `(attribute, value)` pairs the subject must have, e.g. `("CN", "builder-1")`.
    subject: Vec<(String, String)>,
    /// A subjectAltName the certificate must carry, e.g. `DNS:builder-1.example`.
    san: Option<String>,
    /// The identity's name, if the configuration sets one.
    name: Option<String>,
    config: CertificateConfig,
}

/// `CN=a, O=b` as pairs; `\,` escapes a comma in a value.
fn parse_subject(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut current = String::new();
    let mut parts = Vec::new();
    let mut escaped = false;
    for c in text.chars() {
        match (escaped, c) {
            (true, _) => {
                current.push(c);
                escaped = false;
            }
            (false, '\\') => escaped = true,
            (false, ',' | '+') => parts.push(std::mem::take(&mut current)),
            (false, _) => current.push(c),
        }
    }
    parts.push(current);
    for part in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} in subject {text:?} is not ATTRIBUTE=VALUE"))?;
        pairs.push((key.trim().to_ascii_uppercase(), value.trim().to_owned()));
    }
    Ok(pairs)
}

/// The short name of an attribute type, as people write subjects.
fn attribute_name(oid: &x509_parser::der_parser::oid::Oid) -> String {
    let known = [
        ("2.5.4.3", "CN"),
        ("2.5.4.10", "O"),
        ("2.5.4.11", "OU"),
        ("2.5.4.6", "C"),
        ("2.5.4.7", "L"),
        ("2.5.4.8", "ST"),
        ("2.5.4.5", "SERIALNUMBER"),
        ("0.9.2342.19200300.100.1.25", "DC"),
        ("0.9.2342.19200300.100.1.1", "UID"),
        ("1.2.840.113549.1.9.1", "EMAILADDRESS"),
    ];
    let text = oid.to_id_string();
    known
        .iter()
        .find(|(id, _)| *id == text)
        .map(|(_, name)| (*name).to_owned())
        .unwrap_or(text)
}

/// Whether two subjectAltNames (`KIND:value`) are the same: DNS names ignore case,
/// URIs and mail addresses do not.
fn same_name(have: &str, want: &str) -> bool {
    match (have.split_once(':'), want.split_once(':')) {
        (Some((kind, a)), Some((wanted, b))) if kind.eq_ignore_ascii_case(wanted) => {
            if kind.eq_ignore_ascii_case("DNS") {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        }
        _ => false,
    }
}

/// What a verified certificate says of its holder.
struct Holder {
    subject: Vec<(String, String)>,
    sans: Vec<String>,
}

impl Holder {
    fn of(der: &[u8]) -> Result<Holder, Unauthenticated> {
        let (_, cert) = parse_x509_certificate(der)
            .map_err(|_| Unauthenticated("the client certificate cannot be read".into()))?;
        let mut subject = Vec::new();
        for rdn in cert.subject().iter_rdn() {
            for attribute in rdn.iter() {
                if let Ok(value) = attribute.as_str() {
                    subject.push((attribute_name(attribute.attr_type()), value.to_owned()));
                }
            }
        }
        let mut sans = Vec::new();
        if let Ok(Some(extension)) = cert.subject_alternative_name() {
            for name in &extension.value.general_names {
                match name {
                    GeneralName::DNSName(n) => sans.push(format!("DNS:{n}")),
                    GeneralName::URI(u) => sans.push(format!("URI:{u}")),
                    GeneralName::RFC822Name(e) => sans.push(format!("email:{e}")),
                    _ => {}
                }
            }
        }
        Ok(Holder { subject, sans })
    }

    fn common_name(&self) -> Option<&str> {
        self.subject
            .iter()
            .find(|(k, _)| k == "CN")
            .map(|(_, v)| v.as_str())
    }

    fn describe(&self) -> String {
        let subject: Vec<String> = self
            .subject
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        subject.join(",")
    }
}

impl Rule {
    pub fn new(config: &CertificateConfig) -> Result<Rule, String> {
        let subject = match &config.subject {
            Some(text) => parse_subject(text)?,
            None => Vec::new(),
        };
        if subject.is_empty() && config.san.as_deref().is_none_or(|s| s.trim().is_empty()) {
            return Err(
                "an [[auth.certificates]] rule names no subject attribute and no san: it would match every certificate"
                    .into(),
            );
        }
        Ok(Rule {
            subject,
            san: config.san.clone(),
            name: config.name.clone(),
            config: config.clone(),
        })
    }

    fn matches(&self, holder: &Holder) -> bool {
        let subject = self
            .subject
            .iter()
            .all(|want| holder.subject.contains(want));
        let san = self
            .san
            .as_ref()
            .is_none_or(|want| holder.sans.iter().any(|have| same_name(have, want)));
        subject && san
    }
}

/// The principal a verified client certificate stands for: the first rule it
/// matches. A name taken from the certificate (its common name) must not be one of
/// `taken`, the names of configured identities and reserved ones.
pub fn identify(
    rules: &[Rule],
    der: &[u8],
    taken: &HashSet<String>,
) -> Result<Arc<Principal>, Unauthenticated> {
    let holder = Holder::of(der)?;
    let rule = rules
        .iter()
        .find(|rule| rule.matches(&holder))
        .ok_or_else(|| {
            Unauthenticated(format!(
                "the client certificate {} is not one this server knows",
                holder.describe()
            ))
        })?;
    let name = match &rule.name {
        Some(name) => name.clone(),
        None => {
            let name = holder
                .common_name()
                .map(str::to_owned)
                .unwrap_or_else(|| holder.describe());
            if taken.contains(&name) || name.starts_with(crate::jwt::PREFIX) {
                return Err(Unauthenticated(format!(
                    "the client certificate's name {name:?} is another identity's; give its rule a name"
                )));
            }
            name
        }
    };
    Ok(Arc::new(Principal::new(
        name,
        Proof::Certificate,
        grants(&rule.config.permissions, &rule.config.instances),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use paddock_config::Permission;

    fn certificate(cn: &str, org: Option<&str>, dns: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        if let Some(org) = org {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, org);
        }
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn rule(subject: Option<&str>, san: Option<&str>) -> Rule {
        Rule::new(&CertificateConfig {
            subject: subject.map(str::to_owned),
            san: san.map(str::to_owned),
            name: None,
            permissions: vec![Permission::Worker],
            instances: vec!["*".into()],
        })
        .unwrap()
    }

    #[test]
    fn subjects_and_sans_pick_the_rule_and_the_name() {
        let rules = [
            rule(Some("CN=builder-1"), None),
            rule(Some("CN=ci, O=Example"), None),
            rule(None, Some("DNS:cache.example")),
        ];
        let taken: HashSet<String> = ["ci-token".to_owned(), "local-workers".to_owned()].into();
        let id = |der: &[u8]| identify(&rules, der, &taken);
        let p = id(&certificate("builder-1", None, &[])).unwrap();
        assert_eq!(p.name(), "builder-1");
        assert!(id(&certificate("ci", Some("Example"), &[])).is_ok());
        assert!(id(&certificate("ci", Some("Other"), &[])).is_err());
        let p = id(&certificate("anything", None, &["CACHE.example"])).unwrap();
        assert_eq!(p.name(), "anything");
        let refused = id(&certificate("stranger", None, &[])).unwrap_err();
        assert!(refused.to_string().contains("CN=stranger"), "{refused}");
        // A common name that is another identity's is not taken over.
        for taken_name in ["local-workers", "ci-token", "jwt:someone"] {
            let refused = id(&certificate(taken_name, None, &["cache.example"])).unwrap_err();
            assert!(
                refused.to_string().contains("another identity"),
                "{refused}"
            );
        }
        // A rule that names nothing would match every certificate.
        assert!(Rule::new(&CertificateConfig {
            subject: Some(" ".into()),
            san: None,
            name: None,
            permissions: vec![Permission::Worker],
            instances: vec!["*".into()],
        })
        .is_err());
        assert_eq!(
            parse_subject(r"CN=a\,b, O=x").unwrap(),
            vec![("CN".into(), "a,b".into()), ("O".into(), "x".into())]
        );
    }
}
