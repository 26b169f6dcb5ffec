//! Failed TLS handshakes explained in terms of the files that caused them.
//!
//! A handshake error says "invalid peer certificate: UnknownIssuer" or "received fatal alert:
//! BadCertificate"; the operator needs to know which file to fix. `explain_tls_error` finds the
//! rustls error in an error chain and says which side refused what, naming our files.

use rustls::{AlertDescription, CertificateError, Error as TlsError};

use crate::TlsFiles;

/// The rustls error inside `err` (itself or any of its sources, also through `io::Error`).
pub fn find_tls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a TlsError> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<TlsError>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<TlsError>())
            {
                return Some(tls);
            }
        }
        current = e.source();
    }
    None
}

/// Explains why a TLS connection to `server` (the host as dialed) made with `files` failed, or
/// `None` when `err` holds no TLS error.
pub fn explain_tls_error(
    err: &(dyn std::error::Error + 'static),
    files: &TlsFiles,
    server: &str,
) -> Option<String> {
    find_tls_error(err).map(|tls| explain(tls, files, server))
}

/// Explains one rustls error; see `explain_tls_error`.
pub fn explain(err: &TlsError, files: &TlsFiles, server: &str) -> String {
    let ca = files.ca.display();
    let cert = files.cert.display();
    match err {
        TlsError::InvalidCertificate(cert_err) => match cert_err {
            CertificateError::UnknownIssuer
            | CertificateError::BadSignature
            | CertificateError::Other(_) => format!(
                "the certificate of {server} is not signed by the CA in {ca} ({cert_err:?}): is \
                 {server} a member of another mesh, or {ca} the CA of another mesh?"
            ),
            CertificateError::NotValidForName => format!(
                "the certificate of {server} does not name {server}: reissue the server \
                 certificate with --ip/--dns {server}, or dial a name it has"
            ),
            CertificateError::NotValidForNameContext { presented, .. } => format!(
                "the certificate of {server} does not name {server} (it names {}): reissue the \
                 server certificate with --ip/--dns {server}, or dial a name it has",
                presented.join(", ")
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
                "the certificate of {server} has expired ({cert_err:?}): rotate it with \
                 `meshd certs rotate server`"
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!(
                    "the certificate of {server} is not valid yet ({cert_err:?}): is a clock wrong?"
                )
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                format!(
                    "the certificate of {server} is not a server certificate (no serverAuth \
                     extended key usage, {cert_err:?})"
                )
            }
            other => format!("the certificate of {server} was rejected: {other:?}"),
        },
        TlsError::AlertReceived(alert) => match alert {
            AlertDescription::ProtocolVersion => format!(
                "{server} refused TLS 1.3 (alert {alert:?}): the mesh accepts nothing older; \
                 upgrade or reconfigure the server"
            ),
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateRequired => format!(
                "{server} refused our client certificate {cert} (alert {alert:?}): is it signed \
                 by the CA the server trusts (etcd --trusted-ca-file), valid now, and with \
                 clientAuth? (`meshd certs check --ca {ca} --cert {cert} --key {}`)",
                files.key.display()
            ),
            AlertDescription::HandshakeFailure => format!(
                "{server} ended the handshake (alert {alert:?}): it probably does not offer \
                 TLS 1.3, which the mesh requires"
            ),
            other => format!("{server} ended the handshake with alert {other:?}"),
        },
        TlsError::PeerIncompatible(why) => {
            format!("{server} is incompatible ({why:?}): the mesh requires TLS 1.3")
        }
        TlsError::InvalidMessage(_) | TlsError::InappropriateMessage { .. } => {
            format!("{server} does not speak TLS ({err}): is it a plaintext (http://) endpoint?")
        }
        other => format!("TLS with {server} failed: {other}"),
    }
}
