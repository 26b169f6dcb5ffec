//! Certificates of a test mesh: one CA, and per cluster the etcd server certificate (IP SANs
//! of loopback and the underlay address nodes dial), the admin client certificate
//! (`admin-<cluster>`), the remote certificate its agents read other clusters with
//! (`remote-<cluster>`) and one node certificate per node (`node-<cluster>-<node>`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use meshd_certs::{LeafKind, MeshCa, TlsFiles};

pub struct Pki {
    dir: PathBuf,
    ca: MeshCa,
}

impl Pki {
    pub fn new(dir: &Path) -> anyhow::Result<Pki> {
        let ca = MeshCa::create("meshd e2e CA", 30)?;
        ca.write(&dir.join("mesh-ca"), false)?;
        Ok(Pki {
            dir: dir.to_owned(),
            ca,
        })
    }

    /// Issues server, admin and remote certificates of `cluster` into `<dir>/<cluster>/`.
    pub fn issue_cluster(&self, cluster: &str, server_ips: &[IpAddr]) -> anyhow::Result<PathBuf> {
        let out = self.dir.join(cluster);
        self.ca
            .issue_cluster_set(&out, cluster, 2, server_ips, &[], false)?;
        Ok(out)
    }

    /// Where the certificates live: `mesh-ca/`, `<cluster>/`, `<cluster>/<node>/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn files(&self, cluster: &str, kind: LeafKind) -> TlsFiles {
        TlsFiles::in_dir(&self.dir.join(cluster), kind.file_stem())
    }

    /// Issues node `node`'s certificate into `<dir>/<cluster>/<node>/`.
    pub fn issue_node(&self, cluster: &str, node: &str) -> anyhow::Result<TlsFiles> {
        let out = self.dir.join(cluster).join(node);
        self.ca.issue_node(&out, cluster, node, 2, false)?;
        Ok(self.node_files(cluster, node))
    }

    pub fn node_files(&self, cluster: &str, node: &str) -> TlsFiles {
        TlsFiles::in_dir(
            &self.dir.join(cluster).join(node),
            LeafKind::Node.file_stem(),
        )
    }
}
