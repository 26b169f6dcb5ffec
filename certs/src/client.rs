use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Errors name the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} file {path}: {reason}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("building TLS config: {0}")]
    Tls(#[from] rustls::Error),
}

/// CA bundle, certificate chain and private key of one TLS identity, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certs_from(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read(what, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Invalid {
            what,
            path: path.to_owned(),
            reason: format!("not valid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CertError::Invalid {
            what,
            path: path.to_owned(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

fn key_from(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let pem = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| CertError::Invalid {
        what: "key",
        path: path.to_owned(),
        reason: format!("no usable private key: {e}"),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsFiles {
    /// A rustls client config that offers TLS 1.3 only, trusts only `ca`, and presents
    /// `cert`/`key` as client certificate. Reads the files now (call per connection for rotation).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, CertError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs_from("CA", &self.ca)? {
            roots.add(ca).map_err(|e| CertError::Invalid {
                what: "CA",
                path: self.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let chain = certs_from("certificate", &self.cert)?;
        let key = key_from(&self.key)?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(config)
    }
}
