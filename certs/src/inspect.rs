//! What a certificate says: subject, SANs, issuer, key usage, validity. Used by
//! `meshd certs inspect`, by validation, and to re-issue a certificate on rotation.

use std::net::IpAddr;
use std::path::Path;

use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pem_files::read_certs;
use crate::CertError;

/// The fields of one X.509 certificate that matter to the mesh.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    /// Full subject, RFC 4514 style (`CN=remote, OU=c1, O=meshd`).
    pub subject: String,
    /// Subject CN: for client certificates this is the etcd user name.
    pub common_name: Option<String>,
    /// Subject OU: the cluster a leaf certificate was issued for.
    pub organizational_unit: Option<String>,
    pub issuer: String,
    /// Hex, colon separated, as openssl prints it.
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    pub is_ca: bool,
    /// Key usage bits, e.g. `digitalSignature`, `keyCertSign`.
    pub key_usage: Vec<String>,
    /// Extended key usages, e.g. `serverAuth`, `clientAuth`.
    pub extended_key_usage: Vec<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    /// Signature algorithm of the certificate's public key, e.g. `ecdsa` or `rsa`.
    pub public_key_algorithm: String,
}

impl CertInfo {
    /// Parses one DER certificate; `what`/`path` only serve the error message.
    pub fn from_der(
        what: &'static str,
        path: &Path,
        der: &CertificateDer<'_>,
    ) -> Result<Self, CertError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Invalid {
            what,
            path: path.to_owned(),
            reason: format!("not a valid X.509 certificate: {e}"),
        })?;
        Ok(Self::from_x509(&cert))
    }

    pub(crate) fn from_x509(cert: &X509Certificate<'_>) -> Self {
        let first_attr = |it: &mut dyn Iterator<
            Item = &x509_parser::x509::AttributeTypeAndValue<'_>,
        >| { it.next().and_then(|a| a.as_str().ok()).map(str::to_owned) };
        let subject = cert.subject();
        let mut dns_names = Vec::new();
        let mut ip_addresses = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                    GeneralName::IPAddress(b) => {
                        if let Some(ip) = ip_from_bytes(b) {
                            ip_addresses.push(ip);
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut key_usage = Vec::new();
        if let Ok(Some(ku)) = cert.key_usage() {
            let ku = ku.value;
            for (set, name) in [
                (ku.digital_signature(), "digitalSignature"),
                (ku.non_repudiation(), "contentCommitment"),
                (ku.key_encipherment(), "keyEncipherment"),
                (ku.data_encipherment(), "dataEncipherment"),
                (ku.key_agreement(), "keyAgreement"),
                (ku.key_cert_sign(), "keyCertSign"),
                (ku.crl_sign(), "cRLSign"),
                (ku.encipher_only(), "encipherOnly"),
                (ku.decipher_only(), "decipherOnly"),
            ] {
                if set {
                    key_usage.push(name.to_owned());
                }
            }
        }
        let mut extended_key_usage = Vec::new();
        if let Ok(Some(eku)) = cert.extended_key_usage() {
            let eku = eku.value;
            for (set, name) in [
                (eku.any, "any"),
                (eku.server_auth, "serverAuth"),
                (eku.client_auth, "clientAuth"),
                (eku.code_signing, "codeSigning"),
                (eku.email_protection, "emailProtection"),
                (eku.time_stamping, "timeStamping"),
                (eku.ocsp_signing, "OCSPSigning"),
            ] {
                if set {
                    extended_key_usage.push(name.to_owned());
                }
            }
            extended_key_usage.extend(eku.other.iter().map(|o| o.to_id_string()));
        }
        let public_key_algorithm = match cert.public_key().parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(_)) => "rsa",
            Ok(x509_parser::public_key::PublicKey::EC(_)) => "ecdsa",
            Ok(x509_parser::public_key::PublicKey::DSA(_)) => "dsa",
            Ok(x509_parser::public_key::PublicKey::GostR3410(_))
            | Ok(x509_parser::public_key::PublicKey::GostR3410_2012(_)) => "gost",
            _ => {
                if cert.public_key().algorithm.algorithm.to_id_string() == "1.3.101.112" {
                    "ed25519"
                } else {
                    "unknown"
                }
            }
        }
        .to_owned();
        CertInfo {
            subject: subject.to_string(),
            common_name: first_attr(&mut subject.iter_common_name()),
            organizational_unit: first_attr(&mut subject.iter_organizational_unit()),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string(),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            is_ca: cert.is_ca(),
            key_usage,
            extended_key_usage,
            dns_names,
            ip_addresses,
            public_key_algorithm,
        }
    }

    /// All SANs for messages: `dns:a, ip:1.2.3.4`, or `none`.
    pub fn sans_display(&self) -> String {
        let all: Vec<String> = self
            .dns_names
            .iter()
            .map(|d| format!("dns:{d}"))
            .chain(self.ip_addresses.iter().map(|i| format!("ip:{i}")))
            .collect();
        if all.is_empty() {
            "none".into()
        } else {
            all.join(", ")
        }
    }

    pub fn has_eku(&self, name: &str) -> bool {
        // A certificate without the extension may be used for any purpose (RFC 5280 4.2.1.12).
        self.extended_key_usage.is_empty()
            || self
                .extended_key_usage
                .iter()
                .any(|e| e == name || e == "any")
    }
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

/// Every certificate in a PEM file, parsed.
pub fn inspect_file(path: &Path) -> Result<Vec<CertInfo>, CertError> {
    read_certs("certificate", path)?
        .iter()
        .map(|der| CertInfo::from_der("certificate", path, der))
        .collect()
}

/// RFC 3339, for messages.
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}
