//! Checks of certificate files before any connection is attempted, each failing with an error
//! that names the file and the reason. The final word is rustls's own path validation (the same
//! code that runs in the handshake), so nothing accepted here is refused at connect time for a
//! reason this module could have seen.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::inspect::{rfc3339, CertInfo};
use crate::CertError;

/// What a leaf certificate is used for, i.e. which extended key usage it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server (etcd): needs `serverAuth`.
    Server,
    /// TLS client (meshd, apiserver, remote readers): needs `clientAuth`.
    Client,
}

impl Usage {
    fn eku(self) -> &'static str {
        match self {
            Usage::Server => "serverAuth",
            Usage::Client => "clientAuth",
        }
    }
}

/// The certificate is within its validity period at `now`.
pub fn check_validity(
    what: &'static str,
    path: &Path,
    info: &CertInfo,
    now: OffsetDateTime,
) -> Result<(), CertError> {
    if now > info.not_after {
        return Err(CertError::Expired {
            what,
            path: path.to_owned(),
            not_after: rfc3339(info.not_after),
            now: rfc3339(now),
        });
    }
    if now < info.not_before {
        return Err(CertError::NotYetValid {
            what,
            path: path.to_owned(),
            not_before: rfc3339(info.not_before),
            now: rfc3339(now),
        });
    }
    Ok(())
}

/// A leaf certificate carries the extended key usage its role needs and is not a CA.
pub fn check_usage(
    what: &'static str,
    path: &Path,
    info: &CertInfo,
    usage: Usage,
) -> Result<(), CertError> {
    let wrong = |reason: String| CertError::WrongUsage {
        what,
        path: path.to_owned(),
        reason,
    };
    if info.is_ca {
        return Err(wrong(
            "this is a CA certificate, not a leaf certificate (use the issued certificate, not ca.pem)".into(),
        ));
    }
    if !info.has_eku(usage.eku()) {
        return Err(wrong(format!(
            "used as a {} certificate but its extended key usage is [{}], without {}",
            match usage {
                Usage::Server => "server",
                Usage::Client => "client",
            },
            info.extended_key_usage.join(", "),
            usage.eku()
        )));
    }
    if !info.key_usage.is_empty() && !info.key_usage.iter().any(|k| k == "digitalSignature") {
        return Err(wrong(format!(
            "key usage [{}] lacks digitalSignature, which TLS 1.3 needs",
            info.key_usage.join(", ")
        )));
    }
    Ok(())
}

/// A server certificate covers `name` (a DNS name or an IP address) in its SANs.
pub fn check_name(
    what: &'static str,
    path: &Path,
    der: &CertificateDer<'_>,
    info: &CertInfo,
    name: &str,
) -> Result<(), CertError> {
    let wrong = || CertError::WrongName {
        what,
        path: path.to_owned(),
        name: name.to_owned(),
        sans: info.sans_display(),
    };
    let server_name = match name.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(name.to_owned()).map_err(|_| wrong())?,
    };
    let cert = webpki::EndEntityCert::try_from(der).map_err(|e| CertError::Invalid {
        what,
        path: path.to_owned(),
        reason: format!("not a valid end-entity certificate: {e}"),
    })?;
    cert.verify_is_valid_for_subject_name(&server_name)
        .map_err(|_| wrong())
}

/// The leaf's signature verifies with the public key of one of the CA certificates.
pub fn check_signed_by(
    what: &'static str,
    path: &Path,
    leaf: &CertificateDer<'_>,
    ca_path: &Path,
    cas: &[CertificateDer<'_>],
) -> Result<(), CertError> {
    let parse_err = |p: &Path, w: &'static str, e: String| CertError::Invalid {
        what: w,
        path: p.to_owned(),
        reason: format!("not a valid X.509 certificate: {e}"),
    };
    let (_, leaf_x509) =
        X509Certificate::from_der(leaf).map_err(|e| parse_err(path, what, e.to_string()))?;
    let mut ca_subjects = Vec::new();
    for ca in cas {
        let (_, ca_x509) =
            X509Certificate::from_der(ca).map_err(|e| parse_err(ca_path, "CA", e.to_string()))?;
        if leaf_x509
            .verify_signature(Some(ca_x509.public_key()))
            .is_ok()
        {
            return Ok(());
        }
        ca_subjects.push(ca_x509.subject().to_string());
    }
    Err(CertError::UnknownIssuer {
        what,
        path: path.to_owned(),
        ca: ca_path.to_owned(),
        names: format!(
            "issuer \"{}\", CA subject \"{}\"",
            leaf_x509.issuer(),
            ca_subjects.join("\"; \"")
        ),
    })
}

/// The private key is the one whose public half the certificate carries.
pub fn check_key_matches(
    cert_path: &Path,
    cert: &CertificateDer<'static>,
    key_path: &Path,
    key: &PrivateKeyDer<'static>,
) -> Result<(), CertError> {
    let provider = crate::provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| CertError::Invalid {
            what: "key",
            path: key_path.to_owned(),
            reason: format!("unsupported private key: {e}"),
        })?;
    let certified = rustls::sign::CertifiedKey::new(vec![cert.clone()], signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(CertError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            })
        }
        // The provider cannot derive the public key of this key type: nothing to compare.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(e) => Err(CertError::Invalid {
            what: "certificate",
            path: cert_path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// rustls's own chain validation for the role, as a last gate: it catches what the explicit checks
/// above do not spell out (a CA without the CA bit, a path length constraint, ...).
pub(crate) fn check_chain(
    what: &'static str,
    path: &Path,
    chain: &[CertificateDer<'static>],
    roots: Arc<rustls::RootCertStore>,
    usage: Usage,
    now: UnixTime,
) -> Result<(), CertError> {
    let provider = crate::provider();
    let (end_entity, intermediates) = chain.split_first().expect("chain is never empty");
    let result = match usage {
        Usage::Client => {
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))
                .and_then(|v| {
                    v.verify_client_cert(end_entity, intermediates, now)
                        .map(|_| ())
                })
        }
        Usage::Server => {
            // The name is checked separately (check_name); verify the path against a name the
            // certificate carries so only the chain is judged here.
            let (_, x509) =
                X509Certificate::from_der(end_entity).map_err(|e| CertError::Invalid {
                    what,
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
            let info = CertInfo::from_x509(&x509);
            let name = info
                .ip_addresses
                .first()
                .map(|ip| ServerName::IpAddress((*ip).into()))
                .or_else(|| {
                    info.dns_names
                        .first()
                        .and_then(|d| ServerName::try_from(d.clone()).ok())
                });
            let Some(name) = name else {
                return Err(CertError::WrongName {
                    what,
                    path: path.to_owned(),
                    name: "any name".into(),
                    sans: info.sans_display(),
                });
            };
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))
                .and_then(|v| {
                    rustls::client::danger::ServerCertVerifier::verify_server_cert(
                        v.as_ref(),
                        end_entity,
                        intermediates,
                        &name,
                        &[],
                        now,
                    )
                    .map(|_| ())
                })
        }
    };
    result.map_err(|e| CertError::Invalid {
        what,
        path: path.to_owned(),
        reason: format!("certificate chain rejected: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn info(not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertInfo {
        CertInfo {
            subject: "CN=remote".into(),
            common_name: Some("remote".into()),
            organizational_unit: None,
            issuer: "CN=ca".into(),
            serial: "01".into(),
            not_before,
            not_after,
            is_ca: false,
            key_usage: vec!["digitalSignature".into()],
            extended_key_usage: vec!["clientAuth".into()],
            dns_names: vec![],
            ip_addresses: vec![],
            public_key_algorithm: "ecdsa".into(),
        }
    }

    #[test]
    fn validity_is_inclusive_at_both_ends() {
        let t = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let c = info(t, t + Duration::days(1));
        let p = Path::new("c1/remote.pem");
        assert!(check_validity("certificate", p, &c, t).is_ok());
        assert!(check_validity("certificate", p, &c, t + Duration::days(1)).is_ok());
        let early = check_validity("certificate", p, &c, t - Duration::seconds(1)).unwrap_err();
        assert!(matches!(early, CertError::NotYetValid { .. }), "{early}");
        let late = check_validity(
            "certificate",
            p,
            &c,
            t + Duration::days(1) + Duration::seconds(1),
        )
        .unwrap_err();
        assert!(
            late.to_string().contains("expired at 2027-01-16T08:00:00Z"),
            "{late}"
        );
    }

    #[test]
    fn usage_follows_the_extended_key_usage() {
        let t = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let p = Path::new("c1/x.pem");
        let mut c = info(t, t);
        assert!(check_usage("certificate", p, &c, Usage::Client).is_ok());
        assert!(check_usage("certificate", p, &c, Usage::Server).is_err());
        // No extension at all: any purpose (RFC 5280 4.2.1.12), as Go and webpki accept it.
        c.extended_key_usage.clear();
        assert!(check_usage("certificate", p, &c, Usage::Server).is_ok());
        c.key_usage = vec!["keyEncipherment".into()];
        let err = check_usage("certificate", p, &c, Usage::Server).unwrap_err();
        assert!(err.to_string().contains("lacks digitalSignature"), "{err}");
        c.is_ca = true;
        assert!(check_usage("certificate", p, &c, Usage::Client)
            .unwrap_err()
            .to_string()
            .contains("CA certificate"));
    }
}
