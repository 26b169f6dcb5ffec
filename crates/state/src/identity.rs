//! Security identities: a number standing for a label set.
//!
//! Layout (24 bits, so an identity fits a VXLAN VNI): bits 16-23 hold the cluster id (1-255),
//! bits 0-15 the id allocated inside the cluster (256-65535). Numbers 1-255 are reserved and
//! mean the same thing in every cluster (1 host, 2 world, 6 remote-node).
//!
//! Local-scope identities (bit 24 set, so never confused with one that fits a VNI) stand for
//! CIDR prefixes that policies name. A node derives them from the policies it holds: they never
//! leave the node (no VNI, no etcd record) and mean nothing on another node.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::labels::{Labels, CLUSTER_LABEL};
use crate::names::ClusterId;

/// First local id handed out by allocation; everything below is reserved.
pub const MIN_LOCAL_ID: u16 = 256;

/// Bit set in every local-scope identity.
pub const LOCAL_SCOPE_FLAG: u32 = 1 << 24;

/// A numeric security identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct NumericIdentity(u32);

impl NumericIdentity {
    /// The local host (the node itself).
    pub const HOST: Self = Self(1);
    /// Anything outside the mesh.
    pub const WORLD: Self = Self(2);
    /// Another node of the mesh (its host networking, not its endpoints).
    pub const REMOTE_NODE: Self = Self(6);

    /// An allocated identity of `cluster`. `local` must be at least 256.
    pub fn allocated(cluster: ClusterId, local: u16) -> Result<Self, FieldError> {
        if local < MIN_LOCAL_ID {
            return Err(FieldError::new(
                "identity",
                format!("local id {local} is reserved (allocated ids are 256-65535)"),
            ));
        }
        Ok(Self((u32::from(cluster.get()) << 16) | u32::from(local)))
    }

    /// Checks a number read from the outside: a reserved identity (1-255) or an allocated one
    /// (cluster bits 1-255, local bits 256-65535, nothing above bit 23).
    pub fn new(n: u32) -> Result<Self, FieldError> {
        let id = Self(n);
        if id.is_reserved()
            || (n >> 24 == 0 && id.cluster_id().is_some() && id.local() >= MIN_LOCAL_ID)
        {
            Ok(id)
        } else {
            Err(FieldError::new(
                "identity",
                format!(
                    "{n} is not a valid identity (reserved 1-255, or cluster id 1-255 in bits \
                     16-23 and local id 256-65535 in bits 0-15)"
                ),
            ))
        }
    }

    /// Local-scope identity number `n` (a CIDR prefix named by policy on this node).
    pub fn local_scope(n: u16) -> Self {
        Self(LOCAL_SCOPE_FLAG | u32::from(n))
    }

    /// Checks a number read back from this node's datapath maps: anything [`new`](Self::new)
    /// accepts, and local-scope identities, which only this node writes there.
    pub fn from_datapath(n: u32) -> Result<Self, FieldError> {
        if n & !0xffff == LOCAL_SCOPE_FLAG {
            Ok(Self(n))
        } else {
            Self::new(n)
        }
    }

    /// A local-scope identity (a CIDR prefix), see the module docs.
    pub fn is_local_scope(self) -> bool {
        self.0 & !0xffff == LOCAL_SCOPE_FLAG
    }

    pub fn get(self) -> u32 {
        self.0
    }

    pub fn is_reserved(self) -> bool {
        (1..=255).contains(&self.0)
    }

    /// The cluster that allocated this identity; `None` for reserved identities.
    pub fn cluster_id(self) -> Option<ClusterId> {
        if self.0 >> 24 != 0 {
            return None;
        }
        ClusterId::new((self.0 >> 16) & 0xff).ok()
    }

    /// The id inside the cluster (bits 0-15).
    pub fn local(self) -> u16 {
        (self.0 & 0xffff) as u16
    }
}

impl fmt::Display for NumericIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl TryFrom<u32> for NumericIdentity {
    type Error = FieldError;
    fn try_from(n: u32) -> Result<Self, Self::Error> {
        Self::new(n)
    }
}

impl From<NumericIdentity> for u32 {
    fn from(id: NumericIdentity) -> Self {
        id.0
    }
}

/// The value stored under an identity key: the sorted label set the number stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRecord {
    pub labels: Labels,
}

impl IdentityRecord {
    pub(crate) fn validate(&self, cluster: &str) -> Result<(), FieldError> {
        if self.labels.is_empty() {
            return Err(FieldError::new(
                "labels",
                "an identity needs at least one label",
            ));
        }
        self.labels.validate("labels")?;
        match self.labels.get(CLUSTER_LABEL) {
            Some(c) if c != cluster => Err(FieldError::new(
                format!("labels[{CLUSTER_LABEL:?}]"),
                format!("{c:?} differs from the cluster {cluster:?} of the key"),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let c = ClusterId::new(3).unwrap();
        let id = NumericIdentity::allocated(c, 300).unwrap();
        assert_eq!(id.get(), (3 << 16) | 300);
        assert_eq!(id.cluster_id(), Some(c));
        assert_eq!(id.local(), 300);
        assert!(!id.is_reserved());
        assert_eq!(NumericIdentity::new(id.get()).unwrap(), id);
        assert!(NumericIdentity::allocated(c, 255).is_err());
        let max = NumericIdentity::allocated(ClusterId::new(255).unwrap(), u16::MAX).unwrap();
        assert_eq!(max.get(), 0xff_ffff);
    }

    #[test]
    fn local_scope_identities_stay_on_the_node() {
        let id = NumericIdentity::local_scope(7);
        assert!(id.is_local_scope());
        assert_eq!(id.cluster_id(), None);
        assert!(!id.is_reserved());
        // Never accepted from etcd or a VNI, only from this node's own maps.
        assert!(NumericIdentity::new(id.get()).is_err());
        assert_eq!(NumericIdentity::from_datapath(id.get()).unwrap(), id);
        assert!(NumericIdentity::from_datapath((2 << 24) | 7).is_err());
        let allocated = NumericIdentity::allocated(ClusterId::new(1).unwrap(), 300).unwrap();
        assert!(!allocated.is_local_scope());
        assert_eq!(
            NumericIdentity::from_datapath(allocated.get()).unwrap(),
            allocated
        );
    }

    #[test]
    fn reserved_and_invalid_numbers() {
        assert!(NumericIdentity::HOST.is_reserved());
        assert_eq!(NumericIdentity::HOST.cluster_id(), None);
        assert_eq!(
            NumericIdentity::new(6).unwrap(),
            NumericIdentity::REMOTE_NODE
        );
        for bad in [
            0,
            256,
            1000,
            (1 << 16) | 5,
            1 << 24,
            (1 << 24) | (1 << 16) | 300,
        ] {
            assert!(
                NumericIdentity::new(bad).is_err(),
                "{bad} should be invalid"
            );
        }
        assert!(serde_json::from_str::<NumericIdentity>("0").is_err());
        assert!(serde_json::from_str::<NumericIdentity>("-1").is_err());
    }

    #[test]
    fn identity_record_checks_cluster_label() {
        let r = IdentityRecord {
            labels: Labels::from_pairs([("app", "web"), (CLUSTER_LABEL, "c1")]),
        };
        r.validate("c1").unwrap();
        let e = r.validate("c2").unwrap_err();
        assert_eq!(e.field, "labels[\"meshd.io/cluster\"]");
        assert!(IdentityRecord {
            labels: Labels::new()
        }
        .validate("c1")
        .is_err());
    }
}
