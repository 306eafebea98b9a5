//! Certificates and credentials for tests: a CA made with rcgen, the server's
//! certificate for 127.0.0.1, client certificates and tokens, and the configuration
//! sections that name them.

use std::path::PathBuf;

use paddock_client::Credentials;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority that signs certificates for the tests.
pub struct Authority {
    params: CertificateParams,
    key: KeyPair,
    pub pem: String,
}

impl Authority {
    pub fn new(name: &str) -> Authority {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).unwrap().pem();
        Authority { params, key, pem }
    }

    /// A certificate and its key (PKCS#8, as Bazel wants it), PEM.
    pub fn sign(
        &self,
        cn: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Files for one farm: its CA, its certificate, client certificates, tokens, JWT
/// keys, and the configuration that names them.
pub struct Pki {
    dir: tempfile::TempDir,
    pub ca: Authority,
}

impl Pki {
    pub fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: Authority::new("Paddock test CA"),
        };
        std::fs::write(pki.path("ca.pem"), &pki.ca.pem).unwrap();
        let (cert, key) = pki.ca.sign(
            "paddock-server",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        std::fs::write(pki.path("server.pem"), cert).unwrap();
        std::fs::write(pki.path("server.key"), key).unwrap();
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A client certificate for `cn` (files `cn.pem`, `cn.key`).
    pub fn client(&self, cn: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.ca.sign(cn, &[], ExtendedKeyUsagePurpose::ClientAuth);
        let (c, k) = (
            self.path(&format!("{cn}.pem")),
            self.path(&format!("{cn}.key")),
        );
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        (c, k)
    }

    /// A token file for `name`, holding a fresh random token; returns the token.
    pub fn token(&self, name: &str) -> String {
        let token = format!("{name}-{}", uuid::Uuid::new_v4().simple());
        std::fs::write(self.path(&format!("{name}.token")), format!("{token}\n")).unwrap();
        token
    }

    /// `[server.tls]` for this PKI, asking clients for certificates.
    pub fn tls_section(&self) -> String {
        format!(
            "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\nreload_interval = \"100ms\"\n",
            self.path("server.pem"),
            self.path("server.key"),
            self.path("ca.pem"),
        )
    }

    /// `[[auth.tokens]]` for `name`, its token in a file.
    pub fn token_section(&self, name: &str, permissions: &[&str], instances: &[&str]) -> String {
        format!(
            "[[auth.tokens]]\nname = {name:?}\ntoken_file = {:?}\npermissions = {permissions:?}\ninstances = {instances:?}\n",
            self.path(&format!("{name}.token")),
        )
    }

    pub fn trusting(&self) -> Credentials {
        Credentials {
            tls_ca: Some(self.path("ca.pem")),
            ..Default::default()
        }
    }

    pub fn with_token(&self, token: &str) -> Credentials {
        Credentials {
            token: Some(token.to_owned()),
            ..self.trusting()
        }
    }

    pub fn with_certificate(&self, cn: &str) -> Credentials {
        Credentials {
            tls_cert: Some(self.path(&format!("{cn}.pem"))),
            tls_key: Some(self.path(&format!("{cn}.key"))),
            ..self.trusting()
        }
    }
}
