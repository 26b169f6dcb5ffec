//! `TlsFiles`: the on-disk triple (CA, certificate, key) of one mTLS identity, validated and
//! turned into rustls configs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use time::OffsetDateTime;

use crate::inspect::CertInfo;
use crate::pem_files::{read_certs, read_key};
use crate::validate::{
    check_chain, check_key_matches, check_name, check_signed_by, check_usage, check_validity, Usage,
};
use crate::CertError;

/// CA bundle, certificate chain and private key of one TLS identity, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The files of a `TlsFiles`, read and checked together.
#[derive(Debug)]
pub struct LoadedTls {
    pub roots: Arc<rustls::RootCertStore>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The leaf certificate.
    pub info: CertInfo,
}

impl TlsFiles {
    pub fn new(ca: impl Into<PathBuf>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        TlsFiles {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        }
    }

    /// The layout `meshd certs issue` writes: `DIR/ca.pem`, `DIR/NAME.pem`, `DIR/NAME-key.pem`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        TlsFiles {
            ca: dir.join(crate::CA_CERT_FILE),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        }
    }

    /// Reads and checks the files for use as a TLS client: readable PEM, CA certificates valid
    /// now, the leaf valid now, signed by the CA, with `clientAuth`, and the key matching it.
    pub fn validate_client(&self) -> Result<CertInfo, CertError> {
        Ok(self.load(Usage::Client, &[])?.info)
    }

    /// As `validate_client`, for a TLS server (`serverAuth`) that must answer to every one of
    /// `names` (DNS names or IP addresses, as clients will dial it).
    pub fn validate_server(&self, names: &[String]) -> Result<CertInfo, CertError> {
        Ok(self.load(Usage::Server, names)?.info)
    }

    /// Reads and validates the files. A rotation replaces the key and the certificate by two
    /// renames; a reader caught between them sees a key that does not match. The window is
    /// microseconds, unless the rotating process is descheduled between the renames on a loaded
    /// machine, so a mismatch is re-read for up to half a second before it is reported.
    pub fn load(&self, usage: Usage, names: &[String]) -> Result<LoadedTls, CertError> {
        const RETRIES: u32 = 20;
        const PAUSE: std::time::Duration = std::time::Duration::from_millis(25);
        let mut attempt = 0;
        loop {
            match self.load_once(usage, names) {
                Err(CertError::KeyMismatch { .. }) if attempt < RETRIES => {
                    attempt += 1;
                    std::thread::sleep(PAUSE);
                }
                other => return other,
            }
        }
    }

    fn load_once(&self, usage: Usage, names: &[String]) -> Result<LoadedTls, CertError> {
        let now = OffsetDateTime::now_utc();
        let cas = read_certs("CA", &self.ca)?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in &cas {
            let info = CertInfo::from_der("CA", &self.ca, ca)?;
            if !info.is_ca {
                return Err(CertError::Invalid {
                    what: "CA",
                    path: self.ca.clone(),
                    reason: format!(
                        "certificate \"{}\" is not a CA certificate (basicConstraints CA:FALSE or missing)",
                        info.subject
                    ),
                });
            }
            check_validity("CA", &self.ca, &info, now)?;
            roots.add(ca.clone()).map_err(|e| CertError::Invalid {
                what: "CA",
                path: self.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let chain = read_certs("certificate", &self.cert)?;
        let key = read_key("key", &self.key)?;
        let leaf = &chain[0];
        let info = CertInfo::from_der("certificate", &self.cert, leaf)?;
        check_key_matches(&self.cert, leaf, &self.key, &key)?;
        check_validity("certificate", &self.cert, &info, now)?;
        check_usage("certificate", &self.cert, &info, usage)?;
        // An intermediate in the chain file may be what the CA signed; otherwise the leaf.
        let signed = chain.last().expect("non-empty");
        check_signed_by("certificate", &self.cert, signed, &self.ca, &cas)?;
        for name in names {
            check_name("certificate", &self.cert, leaf, &info, name)?;
        }
        let roots = Arc::new(roots);
        check_chain(
            "certificate",
            &self.cert,
            &chain,
            roots.clone(),
            usage,
            UnixTime::now(),
        )?;
        Ok(LoadedTls {
            roots,
            chain,
            key,
            info,
        })
    }

    /// A rustls client config that offers TLS 1.3 only, trusts only `ca`, verifies the server's
    /// name or IP against its SANs, and presents `cert`/`key` as client certificate.
    ///
    /// Reads and validates the files now: call it per connection, and rotated files are used by
    /// the next connection without a restart.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, CertError> {
        let loaded = self.load(Usage::Client, &[])?;
        let config = rustls::ClientConfig::builder_with_provider(crate::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(loaded.roots)
            .with_client_auth_cert(loaded.chain, loaded.key)?;
        Ok(config)
    }

    /// A rustls server config, TLS 1.3 only, that requires a client certificate signed by `ca`.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, CertError> {
        let loaded = self.load(Usage::Server, &[])?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            loaded.roots,
            crate::provider(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let config = rustls::ServerConfig::builder_with_provider(crate::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(loaded.chain, loaded.key)?;
        Ok(config)
    }
}
