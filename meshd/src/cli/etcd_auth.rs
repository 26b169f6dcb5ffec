//! The etcd users and roles of a mesh cluster, and the steps that bring an etcd there.
//!
//! Pure: `plan` compares what etcd has with what the mesh needs and returns the steps; the
//! `meshd etcd bootstrap` and `meshd clustermesh connect|disconnect` commands read the state and
//! apply them. Running bootstrap again finds nothing to do, so it is idempotent and also repairs
//! drift (a permission too many on a role is revoked).
//!
//! With `--client-cert-auth`, etcd 3.4 takes a client certificate's CN as the user name, so the
//! users here are certificate CNs (see `meshd_certs::Principal`) and have no password. Every
//! name carries its cluster: one mesh CA signs every cluster's certificates, so a user that
//! existed under the same name in every cluster would let one cluster's certificate into all.
//!
//! | user                    | roles                          | may                                     |
//! |-------------------------|--------------------------------|-----------------------------------------|
//! | `root`                  | root                           | (etcd requires it; no certificate names it) |
//! | `admin-<cluster>`       | root                           | everything, in its own cluster only     |
//! | `node-<cluster>-<node>` | node, node-<cluster>-<node>    | publish what agents publish; read what agents read |
//! | `remote-<other>`        | remote                         | read the shared prefixes; added by `clustermesh connect <other>` |

use std::collections::{BTreeMap, BTreeSet};

use meshd_certs::Principal;
use meshd_state::keys::{
    CLUSTER_CONFIG_PREFIX, IDENTITIES_PREFIX, IDENTITY_INDEX_PREFIX, IPCACHE_PREFIX, NODES_PREFIX,
    POLICIES_PREFIX, STATE_PREFIX, SYNCED_PREFIX,
};
use meshd_state::{IdentityRecord, IpcacheEntry, NodeRecord, Resource};

/// etcd's built-in superuser role; `auth enable` requires a user `root` holding it.
pub const ROOT_ROLE: &str = "root";
/// What every agent of the cluster may do (its node's own record is a role per node).
pub const NODE_ROLE: &str = "node";
/// Read-only on what other clusters may see.
pub const REMOTE_ROLE: &str = "remote";

/// Users of the scheme before names carried their cluster: `remote` and `admin` were the same
/// user in every cluster, so a certificate of one cluster opened all of them. Bootstrap removes
/// them (user `root` stays: etcd refuses to delete it).
pub const LEGACY_USERS: [&str; 2] = ["remote", "admin"];
/// Roles of that scheme (`admin`: read-write on everything meshd stores).
pub const LEGACY_ROLES: [&str; 1] = ["admin"];

/// The prefixes a remote cluster may read (DESIGN.md "State in etcd"); nothing else.
pub const REMOTE_READABLE: [&str; 3] = [STATE_PREFIX, SYNCED_PREFIX, CLUSTER_CONFIG_PREFIX];

/// The prefix of the mirrors of remote clusters (the cache), which local agents read. Written
/// only by the apiserver's mirror (`--kvstoremesh`, with the admin certificate); never in
/// [`REMOTE_READABLE`]: the cache is not re-exported.
pub use meshd_state::keys::CACHE_PREFIX;
/// The mirror's status of each cached cluster (every version of `keys::CACHE_STATUS_PREFIX`).
pub const CACHE_STATUS_ROOT: &str = "meshd/cache-status/";

/// What an agent reads in its own cluster: the shared state, the canaries, the cluster config,
/// the policies, the cache and the mirror's status of each cached cluster. Not the apiserver's
/// manifests, VIP allocations or leader key.
pub const NODE_READABLE: [&str; 6] = [
    STATE_PREFIX,
    SYNCED_PREFIX,
    CLUSTER_CONFIG_PREFIX,
    POLICIES_PREFIX,
    CACHE_PREFIX,
    CACHE_STATUS_ROOT,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

/// One key-range permission of a role, as etcd stores it: `[key, range_end)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Grant {
    pub access: Access,
    pub key: String,
    /// Empty for a single key.
    pub range_end: String,
}

impl Grant {
    /// Every key starting with `prefix`.
    pub fn prefix(access: Access, prefix: &str) -> Grant {
        Grant {
            access,
            key: prefix.to_owned(),
            range_end: prefix_end(prefix),
        }
    }

    /// Exactly one key.
    pub fn key(access: Access, key: &str) -> Grant {
        Grant {
            access,
            key: key.to_owned(),
            range_end: String::new(),
        }
    }
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let access = match self.access {
            Access::Read => "read",
            Access::Write => "write",
            Access::ReadWrite => "readwrite",
        };
        if self.range_end == prefix_end(&self.key) {
            write!(f, "{access} {}*", self.key)
        } else if self.range_end.is_empty() {
            write!(f, "{access} {}", self.key)
        } else {
            write!(f, "{access} [{}, {})", self.key, self.range_end)
        }
    }
}

/// The range end etcd uses for "every key with this prefix": the prefix with its last byte
/// incremented (meshd prefixes are ASCII and end in `/`, so no carry is ever needed).
pub fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0xff {
            bytes.push(last + 1);
            return String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    // All 0xff (never for our prefixes): etcd's "to the end" marker.
    "\0".to_owned()
}

/// Users (with their roles) and roles (with their grants) of an etcd cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthState {
    pub roles: BTreeMap<String, BTreeSet<Grant>>,
    pub users: BTreeMap<String, BTreeSet<String>>,
}

/// The grants every agent of `cluster` holds in its own etcd: write what agents publish (node
/// records are per node, see `node_role`), read what agents watch.
fn node_grants(cluster: &str) -> BTreeSet<Grant> {
    let mut grants: BTreeSet<Grant> = NODE_READABLE
        .iter()
        .map(|p| Grant::prefix(Access::Read, p))
        .collect();
    // Endpoints and identities are the cluster's, not one node's: any node may allocate an
    // identity another node then uses, and an endpoint's key is its IP.
    for prefix in [IPCACHE_PREFIX, IDENTITIES_PREFIX, IDENTITY_INDEX_PREFIX] {
        grants.insert(Grant::prefix(
            Access::ReadWrite,
            &format!("{prefix}{cluster}/"),
        ));
    }
    // The agents' sync canaries, and not the apiserver's (services): a node that marked services
    // synced would make remote clusters withdraw services that were never listed.
    for kind in [NodeRecord::KIND, IpcacheEntry::KIND, IdentityRecord::KIND] {
        grants.insert(Grant::key(
            Access::ReadWrite,
            &format!("{SYNCED_PREFIX}{cluster}/{kind}"),
        ));
    }
    grants
}

/// The role of one node: its own node record, so a node cannot take over another node's tunnel
/// endpoint or pod CIDRs. Named like its user.
fn node_role(cluster: &str, node: &str) -> (String, BTreeSet<Grant>) {
    (
        Principal::node(cluster, node).common_name(),
        BTreeSet::from([Grant::key(
            Access::ReadWrite,
            &format!("{NODES_PREFIX}{cluster}/{node}"),
        )]),
    )
}

fn remote_grants() -> BTreeSet<Grant> {
    REMOTE_READABLE
        .iter()
        .map(|p| Grant::prefix(Access::Read, p))
        .collect()
}

/// What the etcd of `cluster` needs, with a user for each of `nodes`.
pub fn desired(cluster: &str, nodes: &[String]) -> AuthState {
    let mut roles = BTreeMap::new();
    // The root role carries no explicit grants: etcd lets it do everything.
    roles.insert(ROOT_ROLE.to_owned(), BTreeSet::new());
    roles.insert(NODE_ROLE.to_owned(), node_grants(cluster));
    roles.insert(REMOTE_ROLE.to_owned(), remote_grants());
    let mut users = BTreeMap::from([
        (
            meshd_certs::ETCD_ROOT_USER.to_owned(),
            BTreeSet::from([ROOT_ROLE.to_owned()]),
        ),
        (
            Principal::admin(cluster).common_name(),
            BTreeSet::from([ROOT_ROLE.to_owned()]),
        ),
    ]);
    for node in nodes {
        let (role, grants) = node_role(cluster, node);
        users.insert(
            Principal::node(cluster, node).common_name(),
            BTreeSet::from([NODE_ROLE.to_owned(), role.clone()]),
        );
        roles.insert(role, grants);
    }
    AuthState { roles, users }
}

/// What connecting `other` needs: the remote role and the user `remote-<other>` holding it.
pub fn connected(other: &str) -> AuthState {
    AuthState {
        roles: BTreeMap::from([(REMOTE_ROLE.to_owned(), remote_grants())]),
        users: BTreeMap::from([(
            Principal::remote(other).common_name(),
            BTreeSet::from([REMOTE_ROLE.to_owned()]),
        )]),
    }
}

/// The steps that cut `other` off: its user goes. The role stays for the other clusters.
pub fn plan_disconnect(current: &AuthState, other: &str) -> Vec<Step> {
    let user = Principal::remote(other).common_name();
    if current.users.contains_key(&user) {
        vec![Step::DeleteUser { user }]
    } else {
        Vec::new()
    }
}

/// The remote clusters connected in `current`: every `remote-<cluster>` user.
pub fn connected_clusters(current: &AuthState) -> Vec<String> {
    current
        .users
        .keys()
        .filter_map(|u| u.strip_prefix("remote-"))
        .map(str::to_owned)
        .collect()
}

/// One change to etcd's auth configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    AddRole {
        role: String,
    },
    GrantPermission {
        role: String,
        grant: Grant,
    },
    RevokePermission {
        role: String,
        grant: Grant,
    },
    /// Without a password: the user authenticates by certificate CN.
    AddUser {
        user: String,
    },
    DeleteUser {
        user: String,
    },
    DeleteRole {
        role: String,
    },
    GrantRole {
        user: String,
        role: String,
    },
    RevokeRole {
        user: String,
        role: String,
    },
    /// Last step of every bootstrap (see `plan_bootstrap`).
    EnableAuth,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::AddRole { role } => write!(f, "add role {role}"),
            Step::GrantPermission { role, grant } => write!(f, "grant role {role}: {grant}"),
            Step::RevokePermission { role, grant } => write!(f, "revoke from role {role}: {grant}"),
            Step::AddUser { user } => write!(f, "add user {user} (no password, certificate CN)"),
            Step::DeleteUser { user } => write!(f, "delete user {user}"),
            Step::DeleteRole { role } => write!(f, "delete role {role}"),
            Step::GrantRole { user, role } => write!(f, "grant role {role} to user {user}"),
            Step::RevokeRole { user, role } => write!(f, "revoke role {role} from user {user}"),
            Step::EnableAuth => write!(f, "enable auth"),
        }
    }
}

/// The steps that turn `current` into `desired` for the roles and users `desired` names, and
/// remove the users and roles of the scheme before per-cluster names (`LEGACY_USERS`,
/// `LEGACY_ROLES`). Other roles and users etcd has are left alone: they are the operator's, or
/// connections made by `meshd clustermesh connect`. No `EnableAuth`: see `plan_bootstrap`.
pub fn plan(current: &AuthState, desired: &AuthState) -> Vec<Step> {
    let mut steps = Vec::new();
    for user in LEGACY_USERS {
        if current.users.contains_key(user) && !desired.users.contains_key(user) {
            steps.push(Step::DeleteUser {
                user: user.to_owned(),
            });
        }
    }
    for role in LEGACY_ROLES {
        if current.roles.contains_key(role) && !desired.roles.contains_key(role) {
            steps.push(Step::DeleteRole {
                role: role.to_owned(),
            });
        }
    }
    for (role, grants) in &desired.roles {
        let have = current.roles.get(role);
        if have.is_none() {
            steps.push(Step::AddRole { role: role.clone() });
        }
        let empty = BTreeSet::new();
        let have = have.unwrap_or(&empty);
        for grant in have.difference(grants) {
            steps.push(Step::RevokePermission {
                role: role.clone(),
                grant: grant.clone(),
            });
        }
        for grant in grants.difference(have) {
            steps.push(Step::GrantPermission {
                role: role.clone(),
                grant: grant.clone(),
            });
        }
    }
    for (user, roles) in &desired.users {
        let have = current.users.get(user);
        if have.is_none() {
            steps.push(Step::AddUser { user: user.clone() });
        }
        let empty = BTreeSet::new();
        let have = have.unwrap_or(&empty);
        for role in have.difference(roles) {
            steps.push(Step::RevokeRole {
                user: user.clone(),
                role: role.clone(),
            });
        }
        for role in roles.difference(have) {
            steps.push(Step::GrantRole {
                user: user.clone(),
                role: role.clone(),
            });
        }
    }
    steps
}

/// `plan`, then `auth enable` (always: etcd 3.4 has no call that says whether auth is on, and
/// enabling it again is a no-op).
pub fn plan_bootstrap(current: &AuthState, desired: &AuthState) -> Vec<Step> {
    let mut steps = plan(current, desired);
    steps.push(Step::EnableAuth);
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies steps to an in-memory state, as etcd would.
    fn apply(state: &mut AuthState, steps: &[Step]) {
        for step in steps {
            match step {
                Step::AddRole { role } => {
                    state.roles.entry(role.clone()).or_default();
                }
                Step::GrantPermission { role, grant } => {
                    state.roles.get_mut(role).unwrap().insert(grant.clone());
                }
                Step::RevokePermission { role, grant } => {
                    state.roles.get_mut(role).unwrap().remove(grant);
                }
                Step::AddUser { user } => {
                    state.users.entry(user.clone()).or_default();
                }
                Step::DeleteUser { user } => {
                    assert!(state.users.remove(user).is_some(), "no user {user}");
                }
                Step::DeleteRole { role } => {
                    assert!(state.roles.remove(role).is_some(), "no role {role}");
                    for roles in state.users.values_mut() {
                        roles.remove(role);
                    }
                }
                Step::GrantRole { user, role } => {
                    assert!(
                        state.roles.contains_key(role),
                        "role {role} granted before it exists"
                    );
                    state.users.get_mut(user).unwrap().insert(role.clone());
                }
                Step::RevokeRole { user, role } => {
                    state.users.get_mut(user).unwrap().remove(role);
                }
                Step::EnableAuth => {}
            }
        }
    }

    fn nodes(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn fresh_etcd_gets_everything_then_nothing() {
        let want = desired("c1", &nodes(&["n1", "n2"]));
        let mut etcd = AuthState::default();
        let steps = plan_bootstrap(&etcd, &want);
        assert_eq!(steps.last(), Some(&Step::EnableAuth));
        for (user, role) in [
            ("root", "root"),
            ("admin-c1", "root"),
            ("node-c1-n1", "node"),
            ("node-c1-n1", "node-c1-n1"),
            ("node-c1-n2", "node-c1-n2"),
        ] {
            assert!(
                steps.contains(&Step::GrantRole {
                    user: user.into(),
                    role: role.into()
                }),
                "{user} {role}: {steps:?}"
            );
        }
        apply(&mut etcd, &steps);
        assert_eq!(etcd, want);
        assert_eq!(
            plan_bootstrap(&etcd, &want),
            vec![Step::EnableAuth],
            "second run changes nothing"
        );
    }

    #[test]
    fn remote_reads_exactly_the_shared_prefixes() {
        let want = desired("c1", &[]);
        let remote: Vec<String> = want.roles["remote"].iter().map(|g| g.to_string()).collect();
        assert_eq!(
            remote,
            vec![
                "read meshd/cluster-config/*",
                "read meshd/state/*",
                "read meshd/synced/*"
            ]
        );
        // Nobody holds it until a cluster is connected.
        assert!(want.users.values().all(|r| !r.contains("remote")));
        assert_eq!(
            Grant::prefix(Access::Read, "meshd/state/").range_end,
            "meshd/state0"
        );
    }

    #[test]
    fn the_cache_is_read_by_nodes_and_never_exported() {
        let want = desired("c1", &nodes(&["n1"]));
        let covers = |g: &Grant, key: &str| {
            g.key.as_str() <= key && (g.range_end.is_empty() || key < g.range_end.as_str())
        };
        assert!(meshd_state::keys::CACHE_STATUS_PREFIX.starts_with(CACHE_STATUS_ROOT));
        for key in [
            format!("{CACHE_PREFIX}c2/state/nodes/v1/c2/n1"),
            meshd_state::keys::cache_status_key("c2"),
        ] {
            assert!(
                !want.roles["remote"].iter().any(|g| covers(g, &key)),
                "remote clusters must not read {key}"
            );
            assert!(
                want.roles["node"]
                    .iter()
                    .any(|g| g.access == Access::Read && covers(g, &key)),
                "agents read {key}"
            );
        }
    }

    #[test]
    fn a_node_writes_only_what_agents_publish_in_its_own_cluster() {
        let want = desired("c1", &nodes(&["n1"]));
        let mut writable: Vec<String> = want.roles["node"]
            .iter()
            .chain(want.roles["node-c1-n1"].iter())
            .filter(|g| g.access != Access::Read)
            .map(|g| g.to_string())
            .collect();
        writable.sort();
        assert_eq!(
            writable,
            vec![
                "readwrite meshd/state/identities/v1/c1/*",
                "readwrite meshd/state/identity-labels/v1/c1/*",
                "readwrite meshd/state/ip/v1/c1/*",
                "readwrite meshd/state/nodes/v1/c1/n1",
                "readwrite meshd/synced/c1/identities",
                "readwrite meshd/synced/c1/ip",
                "readwrite meshd/synced/c1/nodes",
            ]
        );
        let readable: Vec<String> = want.roles["node"]
            .iter()
            .filter(|g| g.access == Access::Read)
            .map(|g| g.to_string())
            .collect();
        assert!(!readable.iter().any(|g| g.contains("meshd/config/services")));
        assert!(readable.contains(&"read meshd/config/policies/v1/*".to_string()));
    }

    #[test]
    fn legacy_users_go_and_connections_stay() {
        let want = desired("c1", &[]);
        let mut etcd = want.clone();
        // Bootstrapped before per-cluster names, and c2 connected since.
        etcd.roles.insert(
            "admin".into(),
            BTreeSet::from([Grant::prefix(Access::ReadWrite, "meshd/")]),
        );
        etcd.users
            .insert("admin".into(), BTreeSet::from(["admin".to_string()]));
        etcd.users
            .insert("remote".into(), BTreeSet::from(["remote".to_string()]));
        apply(&mut etcd, &plan(&AuthState::default(), &connected("c2")));
        let steps = plan(&etcd, &want);
        assert_eq!(
            steps,
            vec![
                Step::DeleteUser {
                    user: "remote".into()
                },
                Step::DeleteUser {
                    user: "admin".into()
                },
                Step::DeleteRole {
                    role: "admin".into()
                },
            ]
        );
        apply(&mut etcd, &steps);
        assert_eq!(connected_clusters(&etcd), vec!["c2".to_string()]);
        assert_eq!(plan(&etcd, &want), vec![]);
    }

    #[test]
    fn connect_and_disconnect_touch_one_cluster() {
        let mut etcd = desired("c1", &[]);
        for other in ["c2", "c3"] {
            let steps = plan(&etcd, &connected(other));
            apply(&mut etcd, &steps);
        }
        assert_eq!(etcd.users["remote-c2"], BTreeSet::from(["remote".into()]));
        assert_eq!(
            plan(&etcd, &connected("c2")),
            vec![],
            "connect is idempotent"
        );
        let steps = plan_disconnect(&etcd, "c2");
        assert_eq!(
            steps,
            vec![Step::DeleteUser {
                user: "remote-c2".into()
            }]
        );
        apply(&mut etcd, &steps);
        assert_eq!(connected_clusters(&etcd), vec!["c3".to_string()]);
        assert!(plan_disconnect(&etcd, "c2").is_empty(), "already gone");
    }

    #[test]
    fn drift_is_repaired_and_foreign_entries_kept() {
        let want = desired("c1", &[]);
        let mut etcd = want.clone();
        // Someone widened the remote role and gave the admin more roles.
        etcd.roles
            .get_mut("remote")
            .unwrap()
            .insert(Grant::prefix(Access::ReadWrite, "meshd/"));
        etcd.users
            .get_mut("admin-c1")
            .unwrap()
            .insert("remote".into());
        // An operator's own user stays.
        etcd.users
            .insert("alice".into(), BTreeSet::from(["root".to_string()]));
        let steps = plan_bootstrap(&etcd, &want);
        assert_eq!(
            steps,
            vec![
                Step::RevokePermission {
                    role: "remote".into(),
                    grant: Grant::prefix(Access::ReadWrite, "meshd/")
                },
                Step::RevokeRole {
                    user: "admin-c1".into(),
                    role: "remote".into()
                },
                Step::EnableAuth,
            ]
        );
        apply(&mut etcd, &steps);
        assert!(etcd.users.contains_key("alice"));
        assert_eq!(plan_bootstrap(&etcd, &want), vec![Step::EnableAuth]);
    }
}
