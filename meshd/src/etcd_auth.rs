//! The etcd users and roles of a mesh cluster, and the steps that bring an etcd there.
//!
//! Pure: `plan` compares what etcd has with what the mesh needs and returns the steps; the
//! `meshd etcd bootstrap` command reads the state and applies them. Running it again finds
//! nothing to do, so bootstrap is idempotent and also repairs drift (a permission too many on
//! the `remote` role is revoked).
//!
//! With `--client-cert-auth`, etcd 3.4 takes a client certificate's CN as the user name, so the
//! users here are certificate CNs and have no password.

use std::collections::{BTreeMap, BTreeSet};

use meshd_state::keys::{CLUSTER_CONFIG_PREFIX, ROOT, STATE_PREFIX, SYNCED_PREFIX};

/// etcd's built-in superuser role; `auth enable` requires a user `root` holding it.
pub const ROOT_ROLE: &str = "root";
/// Read-write on everything meshd stores, for a cluster's own components that need no user
/// management (a certificate with `--cn admin`).
pub const ADMIN_ROLE: &str = "admin";
/// Read-only on what other clusters may see.
pub const REMOTE_ROLE: &str = "remote";

/// The prefixes a remote cluster may read (DESIGN.md "State in etcd"); nothing else.
pub const REMOTE_READABLE: [&str; 3] = [STATE_PREFIX, SYNCED_PREFIX, CLUSTER_CONFIG_PREFIX];

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

/// What every mesh cluster's etcd needs.
pub fn desired() -> AuthState {
    let mut roles = BTreeMap::new();
    // The root role carries no explicit grants: etcd lets it do everything.
    roles.insert(ROOT_ROLE.to_owned(), BTreeSet::new());
    roles.insert(
        ADMIN_ROLE.to_owned(),
        BTreeSet::from([Grant::prefix(Access::ReadWrite, ROOT)]),
    );
    roles.insert(
        REMOTE_ROLE.to_owned(),
        REMOTE_READABLE
            .iter()
            .map(|p| Grant::prefix(Access::Read, p))
            .collect(),
    );
    let users = BTreeMap::from([
        (
            meshd_certs::ADMIN_USER.to_owned(),
            BTreeSet::from([ROOT_ROLE.to_owned()]),
        ),
        (
            ADMIN_ROLE.to_owned(),
            BTreeSet::from([ADMIN_ROLE.to_owned()]),
        ),
        (
            meshd_certs::REMOTE_USER.to_owned(),
            BTreeSet::from([REMOTE_ROLE.to_owned()]),
        ),
    ]);
    AuthState { roles, users }
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
    GrantRole {
        user: String,
        role: String,
    },
    RevokeRole {
        user: String,
        role: String,
    },
    /// Always last, and always planned: etcd 3.4 has no call that says whether auth is on, and
    /// enabling it again is a no-op.
    EnableAuth,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::AddRole { role } => write!(f, "add role {role}"),
            Step::GrantPermission { role, grant } => write!(f, "grant role {role}: {grant}"),
            Step::RevokePermission { role, grant } => write!(f, "revoke from role {role}: {grant}"),
            Step::AddUser { user } => write!(f, "add user {user} (no password, certificate CN)"),
            Step::GrantRole { user, role } => write!(f, "grant role {role} to user {user}"),
            Step::RevokeRole { user, role } => write!(f, "revoke role {role} from user {user}"),
            Step::EnableAuth => write!(f, "enable auth"),
        }
    }
}

/// The steps that turn `current` into `desired` for the roles and users `desired` names.
/// Roles and users etcd has beyond those are left alone: they are the operator's.
pub fn plan(current: &AuthState, desired: &AuthState) -> Vec<Step> {
    let mut steps = Vec::new();
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

    #[test]
    fn fresh_etcd_gets_everything_then_nothing() {
        let want = desired();
        let mut etcd = AuthState::default();
        let steps = plan(&etcd, &want);
        assert_eq!(steps.last(), Some(&Step::EnableAuth));
        assert!(steps.contains(&Step::AddUser {
            user: "root".into()
        }));
        assert!(steps.contains(&Step::GrantRole {
            user: "root".into(),
            role: "root".into()
        }));
        apply(&mut etcd, &steps);
        assert_eq!(etcd, want);
        assert_eq!(
            plan(&etcd, &want),
            vec![Step::EnableAuth],
            "second run changes nothing"
        );
    }

    #[test]
    fn remote_reads_exactly_the_shared_prefixes() {
        let want = desired();
        let remote: Vec<String> = want.roles["remote"].iter().map(|g| g.to_string()).collect();
        assert_eq!(
            remote,
            vec![
                "read meshd/cluster-config/*",
                "read meshd/state/*",
                "read meshd/synced/*"
            ]
        );
        assert_eq!(want.users["remote"], BTreeSet::from(["remote".to_string()]));
        assert_eq!(
            Grant::prefix(Access::Read, "meshd/state/").range_end,
            "meshd/state0"
        );
    }

    #[test]
    fn drift_is_repaired_and_foreign_entries_kept() {
        let want = desired();
        let mut etcd = want.clone();
        // Someone widened the remote role and gave the remote user more power.
        etcd.roles
            .get_mut("remote")
            .unwrap()
            .insert(Grant::prefix(Access::ReadWrite, "meshd/"));
        etcd.users.get_mut("remote").unwrap().insert("admin".into());
        // An operator's own user stays.
        etcd.users
            .insert("alice".into(), BTreeSet::from(["admin".to_string()]));
        let steps = plan(&etcd, &want);
        assert_eq!(
            steps,
            vec![
                Step::RevokePermission {
                    role: "remote".into(),
                    grant: Grant::prefix(Access::ReadWrite, "meshd/")
                },
                Step::RevokeRole {
                    user: "remote".into(),
                    role: "admin".into()
                },
                Step::EnableAuth,
            ]
        );
        apply(&mut etcd, &steps);
        assert!(etcd.users.contains_key("alice"));
        assert_eq!(plan(&etcd, &want), vec![Step::EnableAuth]);
    }
}
