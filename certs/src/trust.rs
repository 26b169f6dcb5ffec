//! A CA file that trusts several CAs at once: how a mesh moves to a new CA without a moment in
//! which one side refuses the other. Every `ca.pem` first trusts both CAs, then every leaf is
//! re-issued by the new one, then the old one is removed. Peers read their CA file on every new
//! connection (etcd at its start), so each step takes effect without a restart of meshd.

use std::path::Path;

use rustls::pki_types::CertificateDer;

use crate::inspect::CertInfo;
use crate::pem_files::{read_certs, write_atomic, CERT_MODE};
use crate::CertError;

/// The CAs of one CA file, in file order.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    cas: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    pub fn read(path: &Path) -> Result<TrustBundle, CertError> {
        let cas = read_certs("CA", path)?;
        for der in &cas {
            let info = CertInfo::from_der("CA", path, der)?;
            if !info.is_ca {
                return Err(CertError::Invalid {
                    what: "CA",
                    path: path.to_owned(),
                    reason: format!("certificate \"{}\" is not a CA certificate", info.subject),
                });
            }
        }
        Ok(TrustBundle { cas })
    }

    /// Adds the CAs of `other` not already trusted; how many were new.
    pub fn add(&mut self, other: &TrustBundle) -> usize {
        let mut added = 0;
        for ca in &other.cas {
            if !self.cas.contains(ca) {
                self.cas.push(ca.clone());
                added += 1;
            }
        }
        added
    }

    /// Removes the CAs of `other`; how many were there. Refuses to leave nothing trusted.
    pub fn remove(&mut self, other: &TrustBundle, path: &Path) -> Result<usize, CertError> {
        let before = self.cas.len();
        let kept: Vec<_> = self
            .cas
            .iter()
            .filter(|c| !other.cas.contains(c))
            .cloned()
            .collect();
        if kept.is_empty() {
            return Err(CertError::Invalid {
                what: "CA",
                path: path.to_owned(),
                reason: "removing these CAs would leave it trusting none; add the new CA first"
                    .into(),
            });
        }
        self.cas = kept;
        Ok(before - self.cas.len())
    }

    pub fn subjects(&self, path: &Path) -> Result<Vec<String>, CertError> {
        self.cas
            .iter()
            .map(|der| CertInfo::from_der("CA", path, der).map(|i| i.subject))
            .collect()
    }

    /// Writes the bundle over `path`, atomically (a reader sees the old or the new file).
    pub fn write(&self, path: &Path) -> Result<(), CertError> {
        let pem: String = self
            .cas
            .iter()
            .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
            .collect();
        write_atomic("CA", path, pem.as_bytes(), CERT_MODE, true)
    }
}
