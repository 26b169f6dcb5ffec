//! Remote cluster files: a directory with one file per remote cluster (file name = cluster
//! name, an optional `.yaml`/`.yml`/`.json` extension is ignored), read by the agents
//! (`remote_source: direct`) and by the apiserver's mirror (`--kvstoremesh`):
//!
//! ```yaml
//! endpoints: [https://192.168.60.200:2379]
//! ca: c2/ca.pem            # relative paths are relative to the directory
//! cert: c1/remote.pem      # this cluster's (c1's) remote certificate: CN remote-c1
//! key: c1/remote-key.pem
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use meshd_certs::TlsFiles;
use meshd_state::ClusterName;
use serde::Deserialize;

use crate::connect::EtcdConfig;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteClusterFile {
    pub endpoints: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The cluster a file configures, from its name (editor leftovers and hidden files: none).
pub fn cluster_of(path: &Path) -> Option<ClusterName> {
    let name = path.file_name()?.to_str()?;
    if name.starts_with('.') || name.ends_with('~') || name.ends_with(".tmp") {
        return None;
    }
    let stem = ["yaml", "yml", "json"]
        .iter()
        .find_map(|ext| name.strip_suffix(&format!(".{ext}")))
        .unwrap_or(name);
    ClusterName::new(stem).ok()
}

/// Parses a remote cluster file into an etcd config; relative paths are resolved against the
/// file's directory. The error names the file.
pub fn parse(path: &Path, text: &str) -> Result<EtcdConfig, String> {
    let file: RemoteClusterFile =
        serde_yaml::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?;
    if file.endpoints.is_empty() {
        return Err(format!(
            "{}: endpoints: at least one is required",
            path.display()
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let abs = |p: PathBuf| if p.is_absolute() { p } else { dir.join(p) };
    let mut config = EtcdConfig::new(file.endpoints);
    match (file.ca, file.cert, file.key) {
        (Some(ca), Some(cert), Some(key)) => {
            config = config.with_tls(TlsFiles::new(abs(ca), abs(cert), abs(key)));
        }
        (None, None, None) => {}
        _ => {
            return Err(format!(
                "{}: ca, cert and key go together (all or none)",
                path.display()
            ))
        }
    }
    Ok(config)
}

/// A remote file reads with this cluster's own remote certificate (`remote-<local>`): the
/// admin or a node certificate would be refused there anyway, and a certificate of another
/// cluster would read under that cluster's name.
pub fn check_remote_certificate(
    path: &Path,
    config: &EtcdConfig,
    local: &ClusterName,
) -> Result<(), String> {
    let Some(tls) = &config.tls else {
        return Ok(());
    };
    let want = meshd_certs::Principal::remote(local.as_str());
    match meshd_certs::Principal::read_file(&tls.cert)
        .map_err(|e| format!("{}: cert {e}", path.display()))?
    {
        p if p == want => Ok(()),
        p => Err(format!(
            "{}: cert {} is {p}; remote clusters are read with this cluster's remote certificate ({want}, `meshd certs issue remote --cluster {local}`)",
            path.display(),
            tls.cert.display()
        )),
    }
}

/// The cluster files of `dir` and their text; a missing directory configures none.
pub fn read_dir(dir: &Path) -> BTreeMap<ClusterName, (PathBuf, String)> {
    let mut present = BTreeMap::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                let path = e.path();
                if !path.is_file() {
                    continue;
                }
                let Some(cluster) = cluster_of(&path) else {
                    continue;
                };
                if let Ok(text) = std::fs::read_to_string(&path) {
                    present.insert(cluster, (path, text));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot read the remote clusters directory")
        }
    }
    present
}

/// The etcd config of remote `cluster` from its file, checked: not the local cluster, a
/// well-formed file, this cluster's remote certificate.
pub fn load(
    cluster: &ClusterName,
    path: &Path,
    text: &str,
    local: &ClusterName,
) -> Result<EtcdConfig, String> {
    if cluster == local {
        return Err(format!(
            "{}: names the local cluster {local}; a cluster cannot be its own remote",
            path.display()
        ));
    }
    let config = parse(path, text)?;
    check_remote_certificate(path, &config, local)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_name_clusters() {
        assert_eq!(cluster_of(Path::new("/d/c2")).unwrap().as_str(), "c2");
        assert_eq!(cluster_of(Path::new("/d/c2.yaml")).unwrap().as_str(), "c2");
        assert!(cluster_of(Path::new("/d/.c2.swp")).is_none());
        assert!(cluster_of(Path::new("/d/C_2")).is_none());
    }

    #[test]
    fn files_parse_with_paths_relative_to_the_directory_and_errors_name_the_file() {
        let cfg = parse(
            Path::new("/etc/meshd/clusters/c2"),
            "endpoints: [https://10.0.0.1:2379]\nca: c2/ca.pem\ncert: /abs/remote.pem\nkey: c2/k.pem\n",
        )
        .unwrap();
        let tls = cfg.tls.unwrap();
        assert_eq!(tls.ca, PathBuf::from("/etc/meshd/clusters/c2/ca.pem"));
        assert_eq!(tls.cert, PathBuf::from("/abs/remote.pem"));
        for text in [
            "endpoints: []",
            "endpoints: [https://x:1]\nca: a\n",
            "endpoints: [https://x:1]\nbogus: 1\n",
        ] {
            let err = parse(Path::new("/d/c2"), text).unwrap_err();
            assert!(err.contains("/d/c2"), "{err}");
        }
        let c1 = ClusterName::new("c1").unwrap();
        let err = load(&c1, Path::new("/d/c1"), "endpoints: [http://x:1]", &c1).unwrap_err();
        assert!(err.contains("own remote"), "{err}");
    }
}
