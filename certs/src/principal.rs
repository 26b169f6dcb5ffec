//! Who a client certificate speaks for: its role and its cluster.
//!
//! Every client certificate the mesh issues names its cluster twice: in the CN (which etcd with
//! `--client-cert-auth` takes as the user name, so it must be unique across the mesh) and in the
//! OU (which the CA wrote and which a reader can check without parsing the CN). One mesh CA signs
//! every cluster's certificates, so a name without its cluster would be valid everywhere: before
//! per-cluster names, `CN=root` of any cluster was root of every cluster. Authorization therefore
//! checks the whole principal, never the CN alone.
//!
//! | CN                       | role   | what it may do                                            |
//! |--------------------------|--------|-----------------------------------------------------------|
//! | `admin-<cluster>`        | admin  | root of that cluster's etcd, its apiserver                |
//! | `node-<cluster>-<node>`  | node   | publish that node's records in its own cluster's etcd     |
//! | `remote-<cluster>`       | remote | read other clusters' shared state, where they connected it |

use crate::CertInfo;

/// The client roles of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Node,
    Remote,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Node => "node",
            Role::Remote => "remote",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A client certificate's identity: role, cluster and (for nodes) node name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Principal {
    pub role: Role,
    pub cluster: String,
    /// The node of a node certificate; `None` for the other roles.
    pub node: Option<String>,
}

/// CNs of the certificates issued before names carried their cluster. etcd still has a user
/// `root` (it refuses `auth enable` without one), so these are refused by name everywhere we
/// look at certificates, with the command that re-issues them.
pub const LEGACY_COMMON_NAMES: [&str; 3] = ["root", "remote", "admin"];

/// Why a client certificate names no principal of this mesh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalError {
    #[error(
        "certificate CN {cn:?} was issued before credentials were named per cluster and is no longer accepted; re-issue it with `{reissue}`"
    )]
    Legacy { cn: String, reissue: String },
    #[error("certificate CN {cn:?} has no OU naming its cluster; certificates of the mesh CA carry one (`meshd certs issue`)")]
    NoCluster { cn: String },
    #[error(
        "certificate CN {cn:?} does not fit its cluster OU {cluster:?}: expected admin-{cluster}, node-{cluster}-<node> or remote-{cluster}"
    )]
    Mismatch { cn: String, cluster: String },
    #[error("certificate has no CN")]
    NoCommonName,
}

impl Principal {
    pub fn admin(cluster: &str) -> Principal {
        Principal {
            role: Role::Admin,
            cluster: cluster.to_owned(),
            node: None,
        }
    }

    pub fn node(cluster: &str, node: &str) -> Principal {
        Principal {
            role: Role::Node,
            cluster: cluster.to_owned(),
            node: Some(node.to_owned()),
        }
    }

    pub fn remote(cluster: &str) -> Principal {
        Principal {
            role: Role::Remote,
            cluster: cluster.to_owned(),
            node: None,
        }
    }

    /// The certificate CN, which is also the etcd user name.
    pub fn common_name(&self) -> String {
        match (&self.role, &self.node) {
            (Role::Node, Some(node)) => format!("node-{}-{node}", self.cluster),
            (role, _) => format!("{role}-{}", self.cluster),
        }
    }

    /// Reads the principal of a certificate from its CN and OU (the cluster the CA wrote).
    pub fn from_cert(info: &CertInfo) -> Result<Principal, PrincipalError> {
        let cn = info
            .common_name
            .as_deref()
            .ok_or(PrincipalError::NoCommonName)?;
        let cluster = info.organizational_unit.as_deref().unwrap_or("");
        Principal::parse(cn, cluster)
    }

    /// The principal of the (first) certificate in the PEM file `path`; the error names the
    /// file.
    pub fn read_file(path: &std::path::Path) -> Result<Principal, String> {
        let info = crate::inspect_file(path)
            .map_err(|e| e.to_string())?
            .remove(0);
        Principal::from_cert(&info).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The principal named by `cn` in `cluster` (the OU). The cluster comes from the OU, never
    /// from splitting the CN: cluster names may contain `-`, so `node-a-b-c` alone is ambiguous.
    pub fn parse(cn: &str, cluster: &str) -> Result<Principal, PrincipalError> {
        if LEGACY_COMMON_NAMES.contains(&cn) {
            let kind = if cn == "remote" { "remote" } else { "admin" };
            let cluster = if cluster.is_empty() {
                "<cluster>"
            } else {
                cluster
            };
            return Err(PrincipalError::Legacy {
                cn: cn.to_owned(),
                reissue: format!(
                    "meshd certs issue {kind} --cluster {cluster} --ca CA --ca-key CA-KEY --out-dir DIR --force"
                ),
            });
        }
        if cluster.is_empty() {
            return Err(PrincipalError::NoCluster { cn: cn.to_owned() });
        }
        let mismatch = || PrincipalError::Mismatch {
            cn: cn.to_owned(),
            cluster: cluster.to_owned(),
        };
        let (role, rest) = cn.split_once('-').ok_or_else(mismatch)?;
        match role {
            "admin" if rest == cluster => Ok(Principal::admin(cluster)),
            "remote" if rest == cluster => Ok(Principal::remote(cluster)),
            "node" => {
                let node = rest
                    .strip_prefix(cluster)
                    .and_then(|r| r.strip_prefix('-'))
                    .filter(|n| !n.is_empty())
                    .ok_or_else(mismatch)?;
                Ok(Principal::node(cluster, node))
            }
            _ => Err(mismatch()),
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.common_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_cn_and_ou() {
        for p in [
            Principal::admin("c1"),
            Principal::remote("c1"),
            Principal::node("c1", "n1"),
            // Cluster and node names may contain dashes: the OU disambiguates.
            Principal::node("eu-west", "node-a-1"),
        ] {
            assert_eq!(
                Principal::parse(&p.common_name(), &p.cluster),
                Ok(p.clone())
            );
        }
        assert_eq!(Principal::node("c1", "n1").common_name(), "node-c1-n1");
        assert_eq!(Principal::admin("c1").common_name(), "admin-c1");
        assert_eq!(Principal::remote("c2").common_name(), "remote-c2");
    }

    #[test]
    fn a_cn_of_another_cluster_is_refused() {
        // CN and OU disagree: a certificate made by hand (--cn) cannot borrow a cluster's name.
        for (cn, ou) in [
            ("admin-c1", "c2"),
            ("remote-c1", "c2"),
            ("node-c1-n1", "c2"),
            ("node-c1-", "c1"),
            ("node-c10-n1", "c1"),
            ("alice", "c1"),
        ] {
            assert!(
                matches!(
                    Principal::parse(cn, ou),
                    Err(PrincipalError::Mismatch { .. })
                ),
                "{cn} in {ou}"
            );
        }
        assert!(matches!(
            Principal::parse("admin-c1", ""),
            Err(PrincipalError::NoCluster { .. })
        ));
    }

    #[test]
    fn legacy_names_say_how_to_reissue() {
        let err = Principal::parse("root", "c2").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"root\""), "{msg}");
        assert!(
            msg.contains("meshd certs issue admin --cluster c2"),
            "{msg}"
        );
        let msg = Principal::parse("remote", "c1").unwrap_err().to_string();
        assert!(
            msg.contains("meshd certs issue remote --cluster c1"),
            "{msg}"
        );
    }
}
