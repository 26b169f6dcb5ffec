use std::path::PathBuf;

/// What went wrong with a certificate or key file. Every variant names the file (or files) and the
/// reason in words an operator can act on: certificate trouble is the most common way a mesh
/// breaks, and "bad certificate" from a TLS handshake says neither which file nor why.
// Kept small (at most 96 bytes): other crates' errors embed it, and clippy's result_large_err
// counts the whole enum.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    // The I/O error is part of the message and deliberately not a `source`: callers print the
    // whole chain (`{:#}`), which would repeat it.
    #[error("cannot read {what} file {path}: {cause}")]
    Read {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot write {what} file {path}: {cause}")]
    Write {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{what} file {path}: {reason}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "{what} file {path} already exists; refusing to overwrite it (pass --force to replace it)"
    )]
    Exists { what: &'static str, path: PathBuf },
    #[error("{what} file {path}: certificate expired at {not_after} (now {now})")]
    Expired {
        what: &'static str,
        path: PathBuf,
        not_after: String,
        now: String,
    },
    #[error("{what} file {path}: certificate is not valid before {not_before} (now {now}); is a clock wrong?")]
    NotYetValid {
        what: &'static str,
        path: PathBuf,
        not_before: String,
        now: String,
    },
    #[error("key file {key} does not match certificate file {cert}: its public key differs from the certificate's")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// `names` says who issued the certificate and who the CA is, e.g.
    /// `issuer "CN=other CA", CA subject "CN=meshd mesh CA"`.
    #[error("{what} file {path}: certificate is not signed by the CA in {ca} ({names})")]
    UnknownIssuer {
        what: &'static str,
        path: PathBuf,
        ca: PathBuf,
        names: String,
    },
    #[error("{what} file {path}: incompatible key usage: {reason}")]
    WrongUsage {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} file {path}: certificate is not valid for \"{name}\" (its SANs: {sans})")]
    WrongName {
        what: &'static str,
        path: PathBuf,
        name: String,
        sans: String,
    },
    #[error("issuing a certificate for {subject}: {reason}")]
    Issue { subject: String, reason: String },
    #[error("building TLS config: {0}")]
    Tls(rustls::Error),
}

// Not `#[from]`: that would also make it the `source`, and the message already carries it.
impl From<rustls::Error> for CertError {
    fn from(e: rustls::Error) -> Self {
        CertError::Tls(e)
    }
}

impl CertError {
    /// The file the error is about (the certificate for a key mismatch).
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            CertError::Read { path, .. }
            | CertError::Write { path, .. }
            | CertError::Invalid { path, .. }
            | CertError::Exists { path, .. }
            | CertError::Expired { path, .. }
            | CertError::NotYetValid { path, .. }
            | CertError::UnknownIssuer { path, .. }
            | CertError::WrongUsage { path, .. }
            | CertError::WrongName { path, .. } => Some(path),
            CertError::KeyMismatch { cert, .. } => Some(cert),
            CertError::Issue { .. } | CertError::Tls(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stays_small_enough_to_embed() {
        assert!(std::mem::size_of::<super::CertError>() <= 96);
    }
}
