//! Reading PEM files with errors that name the file, and writing them atomically with the right
//! permissions.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::CertError;

/// Private keys are readable by their owner only.
pub const KEY_MODE: u32 = 0o600;
/// Certificates are public.
pub const CERT_MODE: u32 = 0o644;

pub(crate) fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|cause| CertError::Read {
        what,
        path: path.to_owned(),
        cause,
    })
}

fn invalid(what: &'static str, path: &Path, reason: impl Into<String>) -> CertError {
    CertError::Invalid {
        what,
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Every CERTIFICATE block of a PEM file, in order; at least one.
pub fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read(what, path)?;
    certs_from_pem(what, path, &pem)
}

pub(crate) fn certs_from_pem(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let mut certs = Vec::new();
    let mut has_key = false;
    for section in <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(pem) {
        let (kind, der) =
            section.map_err(|e| invalid(what, path, format!("not valid PEM: {e}")))?;
        match kind {
            SectionKind::Certificate => certs.push(CertificateDer::from(der)),
            SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                has_key = true
            }
            _ => {}
        }
    }
    if certs.is_empty() {
        let reason = if has_key {
            "holds a private key, not a certificate (are --cert and --key swapped?)"
        } else {
            "no CERTIFICATE block found"
        };
        return Err(invalid(what, path, reason));
    }
    Ok(certs)
}

/// The one private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let pem = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        let reason = if CertificateDer::pem_slice_iter(&pem).next().is_some() {
            "holds a certificate, not a private key (are --cert and --key swapped?)".to_string()
        } else {
            format!("no usable private key: {e}")
        };
        invalid(what, path, reason)
    })
}

/// Writes `contents` to `path` atomically: a temporary file in the same directory with the final
/// mode from the start (a key is never world-readable, not even for a moment), synced, then
/// renamed over the target. A reader sees the old file or the new one, never a torn one.
///
/// With `overwrite` false an existing `path` is an error, so a key is never replaced by mistake.
pub fn write_atomic(
    what: &'static str,
    path: &Path,
    contents: &[u8],
    mode: u32,
    overwrite: bool,
) -> Result<(), CertError> {
    write_all_atomic(&[(what, path, contents, mode)], overwrite)
}

/// Writes several files as `write_atomic` does, but first stages (writes and syncs) every one of
/// them and only then renames them in order, back to back. A key and its certificate are then
/// replaced within microseconds of each other, so a reader rarely sees the new key with the old
/// certificate (and `TlsFiles::load` re-reads when it does).
pub fn write_all_atomic(
    files: &[(&'static str, &Path, &[u8], u32)],
    overwrite: bool,
) -> Result<(), CertError> {
    if !overwrite {
        for (what, path, _, _) in files {
            if path.exists() {
                return Err(CertError::Exists {
                    what,
                    path: path.to_path_buf(),
                });
            }
        }
    }
    let mut staged: Vec<(PathBuf, &Path, &'static str)> = Vec::new();
    let result = (|| {
        for (what, path, contents, mode) in files {
            let tmp = stage(what, path, contents, *mode)?;
            staged.push((tmp, path, what));
        }
        let mut dirs = Vec::new();
        for (tmp, path, what) in &staged {
            std::fs::rename(tmp, path).map_err(|cause| CertError::Write {
                what,
                path: path.to_path_buf(),
                cause,
            })?;
            dirs.push((parent_dir(path), *path, *what));
        }
        // Make the renames durable.
        for (dir, path, what) in dirs {
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|cause| CertError::Write {
                    what,
                    path: path.to_path_buf(),
                    cause,
                })?;
        }
        Ok(())
    })();
    if result.is_err() {
        for (tmp, _, _) in &staged {
            let _ = std::fs::remove_file(tmp);
        }
    }
    result
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Writes `contents` to a new temporary file next to `path`, with `mode`, synced.
fn stage(
    what: &'static str,
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<PathBuf, CertError> {
    let err = |cause| CertError::Write {
        what,
        path: path.to_owned(),
        cause,
    };
    let dir = parent_dir(path);
    std::fs::create_dir_all(&dir).map_err(err)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| err(std::io::Error::other("path has no file name")))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{nanos}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; a certificate must stay readable by others.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(err(e))
        }
    }
}
