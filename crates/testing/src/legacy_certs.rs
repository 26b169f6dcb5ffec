//! Client certificates of the scheme before credentials were named per cluster (`CN=root`,
//! `CN=remote`), which the mesh CA no longer issues: tests use them to check that every part of
//! the mesh refuses them and says how to re-issue.

use std::path::{Path, PathBuf};

/// Signs a client certificate with subject `CN=<cn>, OU=<cluster>, O=meshd` by the CA in
/// `ca_cert`/`ca_key` (PEM files), and writes `<stem>.pem` and `<stem>-key.pem` into `dir`.
/// Returns the certificate and key paths.
pub fn issue_client(
    ca_cert: &Path,
    ca_key: &Path,
    cn: &str,
    cluster: &str,
    dir: &Path,
    stem: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(ca_key)?)?;
    let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(ca_cert)?, ca_key)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, cluster);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "meshd");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(dir)?;
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}-key.pem"));
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok((cert_path, key_path))
}
