//! The desired content of the datapath maps, in domain types, and the diff that drives a map
//! from any actual content to it.
//!
//! The reconciler is level-triggered: it may read the pinned maps back into a
//! [`DesiredDatapath`] (the "actual" state), call [`diff`] against the view's desired state and
//! apply the operations. Applying them yields exactly the desired state, touches nothing that
//! is already right (an unchanged entry produces no operation, so a restart does not flap), and
//! a second diff is empty.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use meshd_state::{ClusterId, NumericIdentity};

use crate::services::DesiredServices;

/// Policy direction, from the point of view of the subject (local) endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic the subject receives.
    Ingress,
    /// Traffic the subject sends.
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// An IP protocol the policy map can match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpProto {
    Icmp,
    Tcp,
    Udp,
}

impl IpProto {
    /// The IANA protocol number, as in the datapath's policy key.
    pub fn number(self) -> u8 {
        match self {
            IpProto::Icmp => 1,
            IpProto::Tcp => 6,
            IpProto::Udp => 17,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            1 => Some(IpProto::Icmp),
            6 => Some(IpProto::Tcp),
            17 => Some(IpProto::Udp),
            _ => None,
        }
    }
}

/// Where a prefix lives, as the ipcache map says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpcacheTarget {
    pub identity: NumericIdentity,
    /// The node to tunnel to; `None` hands packets to this node's stack (local endpoints and
    /// node IPs).
    pub tunnel_endpoint: Option<IpAddr>,
    /// The prefix belongs to this node (`MESHD_IPCACHE_F_LOCAL`).
    pub local: bool,
}

/// A policy map key. The datapath looks up the most specific key first: exact port, any port
/// of the protocol, any protocol; each with the peer identity, then with any peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// The local endpoint's identity.
    pub subject: NumericIdentity,
    /// `None` = any peer.
    pub peer: Option<NumericIdentity>,
    /// `None` = any protocol.
    pub proto: Option<IpProto>,
    /// Destination port, TCP/UDP only; `None` = any port.
    pub dport: Option<u16>,
    pub direction: Direction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub verdict: Verdict,
    /// Opaque rule id for monitor output (see [`crate::policy::rule_cookie`]); 0 = built-in.
    pub cookie: u32,
}

/// Everything the maps should hold. Also the shape of the maps' actual content read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredDatapath {
    pub ipcache: BTreeMap<IpNet, IpcacheTarget>,
    /// Node IP -> cluster id, for validating the outer source of overlay packets.
    pub nodes: BTreeMap<IpAddr, ClusterId>,
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    /// (subject, direction) whose direction is default-deny (the marker entries).
    pub policy_enabled: BTreeSet<(NumericIdentity, Direction)>,
    /// SERVICES and BACKENDS. Driven by [`crate::services::diff_services`] (its own ordered
    /// operations), not by [`diff`].
    pub services: DesiredServices,
    /// NO_MASQ: destinations local endpoints reach with their own address, never masqueraded:
    /// the pod CIDRs of every admitted node of every cluster (and this node's own) and the
    /// configured `non_masquerade_cidrs` ([`crate::LocalNode::non_masquerade`]).
    pub no_masquerade: BTreeSet<IpNet>,
}

/// One write to one map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatapathOp {
    UpsertNode {
        ip: IpAddr,
        cluster_id: ClusterId,
    },
    UpsertIpcache {
        prefix: IpNet,
        target: IpcacheTarget,
    },
    UpsertPolicy {
        key: PolicyKey,
        value: PolicyValue,
    },
    DisablePolicy {
        subject: NumericIdentity,
        direction: Direction,
    },
    EnablePolicy {
        subject: NumericIdentity,
        direction: Direction,
    },
    DeletePolicy {
        key: PolicyKey,
    },
    DeleteIpcache {
        prefix: IpNet,
    },
    DeleteNode {
        ip: IpAddr,
    },
    /// A destination prefix is never masqueraded (NO_MASQ).
    UpsertNoMasquerade {
        prefix: IpNet,
    },
    DeleteNoMasquerade {
        prefix: IpNet,
    },
}

impl DatapathOp {
    /// Position in a batch. Additions go before removals so no packet meets a half-written
    /// state: a node is known before an ipcache entry tunnels to it, and an ipcache entry is
    /// removed before its node; allow entries exist before the marker that makes them matter
    /// is written, and a marker is removed (default-allow again) before its entries.
    pub fn phase(&self) -> u8 {
        match self {
            DatapathOp::UpsertNode { .. } => 0,
            DatapathOp::UpsertIpcache { .. } => 1,
            DatapathOp::UpsertPolicy { .. } => 2,
            DatapathOp::DisablePolicy { .. } => 3,
            DatapathOp::EnablePolicy { .. } => 4,
            DatapathOp::DeletePolicy { .. } => 5,
            DatapathOp::DeleteIpcache { .. } => 6,
            DatapathOp::DeleteNode { .. } => 7,
            // Whether a destination is masqueraded depends on no other map.
            DatapathOp::UpsertNoMasquerade { .. } => 0,
            DatapathOp::DeleteNoMasquerade { .. } => 7,
        }
    }
}

/// Sorts a batch into [`DatapathOp::phase`] order, keeping the order inside a phase.
pub fn order_ops(ops: &mut [DatapathOp]) {
    ops.sort_by_key(DatapathOp::phase);
}

/// Walks two sorted maps in step, calling `change(key, Some(new))` for keys new or changed in
/// `new` and `change(key, None)` for keys gone. Linear in the sizes, which matters at 100k
/// entries.
pub(crate) fn diff_maps<K: Ord, V: PartialEq>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    mut change: impl FnMut(&K, Option<&V>),
) {
    let mut o = old.iter().peekable();
    let mut n = new.iter().peekable();
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => break,
            (Some((ok, _)), None) => {
                change(ok, None);
                o.next();
            }
            (None, Some((nk, nv))) => {
                change(nk, Some(nv));
                n.next();
            }
            (Some((ok, ov)), Some((nk, nv))) => match ok.cmp(nk) {
                Ordering::Less => {
                    change(ok, None);
                    o.next();
                }
                Ordering::Greater => {
                    change(nk, Some(nv));
                    n.next();
                }
                Ordering::Equal => {
                    if ov != nv {
                        change(nk, Some(nv));
                    }
                    o.next();
                    n.next();
                }
            },
        }
    }
}

/// Operations on the ipcache map turning `actual` into `desired`.
pub fn diff_ipcache(
    actual: &BTreeMap<IpNet, IpcacheTarget>,
    desired: &BTreeMap<IpNet, IpcacheTarget>,
    ops: &mut Vec<DatapathOp>,
) {
    diff_maps(actual, desired, |prefix, target| {
        ops.push(match target {
            Some(target) => DatapathOp::UpsertIpcache {
                prefix: *prefix,
                target: *target,
            },
            None => DatapathOp::DeleteIpcache { prefix: *prefix },
        })
    });
}

/// Operations on the node map turning `actual` into `desired`.
pub fn diff_nodes(
    actual: &BTreeMap<IpAddr, ClusterId>,
    desired: &BTreeMap<IpAddr, ClusterId>,
    ops: &mut Vec<DatapathOp>,
) {
    diff_maps(actual, desired, |ip, cluster_id| {
        ops.push(match cluster_id {
            Some(cluster_id) => DatapathOp::UpsertNode {
                ip: *ip,
                cluster_id: *cluster_id,
            },
            None => DatapathOp::DeleteNode { ip: *ip },
        })
    });
}

/// Operations on NO_MASQ turning `actual` into `desired`.
pub fn diff_no_masquerade(
    actual: &BTreeSet<IpNet>,
    desired: &BTreeSet<IpNet>,
    ops: &mut Vec<DatapathOp>,
) {
    ops.extend(
        desired
            .difference(actual)
            .map(|p| DatapathOp::UpsertNoMasquerade { prefix: *p }),
    );
    ops.extend(
        actual
            .difference(desired)
            .map(|p| DatapathOp::DeleteNoMasquerade { prefix: *p }),
    );
}

/// Operations on the policy map (entries and markers) turning `actual` into `desired`, in
/// phase order.
pub fn diff_policy(actual: &DesiredDatapath, desired: &DesiredDatapath) -> Vec<DatapathOp> {
    let mut ops = Vec::new();
    diff_policy_into(actual, desired, &mut ops);
    order_ops(&mut ops);
    ops
}

fn diff_policy_into(
    actual: &DesiredDatapath,
    desired: &DesiredDatapath,
    ops: &mut Vec<DatapathOp>,
) {
    diff_policy_parts(
        (&actual.policy, &actual.policy_enabled),
        (&desired.policy, &desired.policy_enabled),
        ops,
    );
}

/// The policy entries and the (subject, direction) markers of a policy map.
pub(crate) type PolicyParts<'a> = (
    &'a BTreeMap<PolicyKey, PolicyValue>,
    &'a BTreeSet<(NumericIdentity, Direction)>,
);

/// Operations turning one policy map content into another (unordered: callers sort).
pub(crate) fn diff_policy_parts(
    (actual_policy, actual_enabled): PolicyParts<'_>,
    (desired_policy, desired_enabled): PolicyParts<'_>,
    ops: &mut Vec<DatapathOp>,
) {
    diff_maps(actual_policy, desired_policy, |key, value| {
        ops.push(match value {
            Some(value) => DatapathOp::UpsertPolicy {
                key: *key,
                value: *value,
            },
            None => DatapathOp::DeletePolicy { key: *key },
        })
    });
    for &(subject, direction) in desired_enabled.difference(actual_enabled) {
        ops.push(DatapathOp::EnablePolicy { subject, direction });
    }
    for &(subject, direction) in actual_enabled.difference(desired_enabled) {
        ops.push(DatapathOp::DisablePolicy { subject, direction });
    }
}

/// Every operation turning `actual` into `desired`, in phase order. Pure: `actual` may be the
/// maps read back after a restart, or the last desired state applied.
pub fn diff(actual: &DesiredDatapath, desired: &DesiredDatapath) -> Vec<DatapathOp> {
    let mut ops = Vec::new();
    diff_nodes(&actual.nodes, &desired.nodes, &mut ops);
    diff_ipcache(&actual.ipcache, &desired.ipcache, &mut ops);
    diff_policy_into(actual, desired, &mut ops);
    diff_no_masquerade(&actual.no_masquerade, &desired.no_masquerade, &mut ops);
    order_ops(&mut ops);
    ops
}

impl DesiredDatapath {
    /// Applies operations as a map writer would: an in-memory stand-in for the maps, used by
    /// tests and by anyone who keeps a mirror of what was written.
    pub fn apply_ops(&mut self, ops: &[DatapathOp]) {
        for op in ops {
            match *op {
                DatapathOp::UpsertNode { ip, cluster_id } => {
                    self.nodes.insert(ip, cluster_id);
                }
                DatapathOp::DeleteNode { ip } => {
                    self.nodes.remove(&ip);
                }
                DatapathOp::UpsertIpcache { prefix, target } => {
                    self.ipcache.insert(prefix, target);
                }
                DatapathOp::DeleteIpcache { prefix } => {
                    self.ipcache.remove(&prefix);
                }
                DatapathOp::UpsertPolicy { key, value } => {
                    self.policy.insert(key, value);
                }
                DatapathOp::DeletePolicy { key } => {
                    self.policy.remove(&key);
                }
                DatapathOp::EnablePolicy { subject, direction } => {
                    self.policy_enabled.insert((subject, direction));
                }
                DatapathOp::DisablePolicy { subject, direction } => {
                    self.policy_enabled.remove(&(subject, direction));
                }
                DatapathOp::UpsertNoMasquerade { prefix } => {
                    self.no_masquerade.insert(prefix);
                }
                DatapathOp::DeleteNoMasquerade { prefix } => {
                    self.no_masquerade.remove(&prefix);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(cluster: u32, local: u16) -> NumericIdentity {
        NumericIdentity::allocated(ClusterId::new(cluster).unwrap(), local).unwrap()
    }

    fn target(identity: NumericIdentity, tunnel: Option<&str>) -> IpcacheTarget {
        IpcacheTarget {
            identity,
            tunnel_endpoint: tunnel.map(|t| t.parse().unwrap()),
            local: tunnel.is_none(),
        }
    }

    fn sample(seed: u32) -> DesiredDatapath {
        let mut d = DesiredDatapath::default();
        for i in 0..50u32 {
            if (i + seed) % 3 == 0 {
                continue;
            }
            let prefix: IpNet = format!("10.{}.0.{i}/32", seed % 4).parse().unwrap();
            let tunnel = format!("192.168.0.{}", (i + seed) % 5 + 1);
            d.ipcache.insert(
                prefix,
                target(id(1 + (i % 3), 256 + (i as u16) % 7), Some(&tunnel)),
            );
            d.nodes
                .insert(tunnel.parse().unwrap(), ClusterId::new(1 + i % 2).unwrap());
        }
        for s in 0..4u16 {
            let subject = id(1, 256 + s);
            if (u32::from(s) + seed) % 2 == 0 {
                d.policy_enabled.insert((subject, Direction::Ingress));
            }
            for p in 0..(seed % 5) as u16 {
                d.policy.insert(
                    PolicyKey {
                        subject,
                        peer: Some(id(2, 300 + p)),
                        proto: Some(IpProto::Tcp),
                        dport: Some(8000 + p),
                        direction: Direction::Ingress,
                    },
                    PolicyValue {
                        verdict: Verdict::Allow,
                        cookie: seed,
                    },
                );
            }
        }
        for c in 0..4u32 {
            if (c + seed) % 3 != 0 {
                d.no_masquerade
                    .insert(format!("10.{c}.{}.0/24", seed % 2).parse().unwrap());
            }
        }
        d
    }

    #[test]
    fn diff_of_equal_states_is_empty() {
        for seed in 0..6 {
            let d = sample(seed);
            assert!(diff(&d, &d).is_empty());
            assert!(diff(&DesiredDatapath::default(), &DesiredDatapath::default()).is_empty());
        }
    }

    #[test]
    fn applying_the_diff_converges_and_is_idempotent() {
        for a in 0..6 {
            for b in 0..6 {
                let (mut actual, desired) = (sample(a), sample(b));
                let ops = diff(&actual, &desired);
                actual.apply_ops(&ops);
                assert_eq!(actual, desired, "from sample {a} to sample {b}");
                assert!(diff(&actual, &desired).is_empty());
                // Applying the same batch again (a retried batch) changes nothing.
                actual.apply_ops(&ops);
                assert_eq!(actual, desired);
            }
        }
    }

    #[test]
    fn unchanged_entries_are_left_alone() {
        let actual = sample(1);
        let mut desired = actual.clone();
        let prefix: IpNet = "10.9.9.9/32".parse().unwrap();
        desired
            .ipcache
            .insert(prefix, target(id(3, 999), Some("192.168.0.9")));
        let (&first, _) = desired.ipcache.iter().next().unwrap();
        desired.ipcache.remove(&first);
        let ops = diff(&actual, &desired);
        assert_eq!(
            ops,
            vec![
                DatapathOp::UpsertIpcache {
                    prefix,
                    target: target(id(3, 999), Some("192.168.0.9"))
                },
                DatapathOp::DeleteIpcache { prefix: first },
            ]
        );
    }

    #[test]
    fn a_changed_value_is_one_upsert() {
        let actual = sample(2);
        let mut desired = actual.clone();
        let (&prefix, t) = desired.ipcache.iter_mut().next().unwrap();
        t.tunnel_endpoint = Some("192.168.77.1".parse().unwrap());
        let t = *t;
        assert_eq!(
            diff(&actual, &desired),
            vec![DatapathOp::UpsertIpcache { prefix, target: t }]
        );
    }

    #[test]
    fn ops_come_in_safe_order() {
        let ops = diff(&sample(0), &sample(3));
        let phases: Vec<u8> = ops.iter().map(DatapathOp::phase).collect();
        let mut sorted = phases.clone();
        sorted.sort();
        assert_eq!(phases, sorted);
        // Turning policy on: the allow entries are written before the marker.
        let mut on = DesiredDatapath::default();
        let subject = id(1, 256);
        let key = PolicyKey {
            subject,
            peer: None,
            proto: Some(IpProto::Tcp),
            dport: Some(80),
            direction: Direction::Ingress,
        };
        on.policy.insert(
            key,
            PolicyValue {
                verdict: Verdict::Allow,
                cookie: 7,
            },
        );
        on.policy_enabled.insert((subject, Direction::Ingress));
        let off = DesiredDatapath::default();
        assert_eq!(
            diff(&off, &on),
            vec![
                DatapathOp::UpsertPolicy {
                    key,
                    value: PolicyValue {
                        verdict: Verdict::Allow,
                        cookie: 7
                    }
                },
                DatapathOp::EnablePolicy {
                    subject,
                    direction: Direction::Ingress
                },
            ]
        );
        // Turning it off: the marker goes first (default-allow), then the entries.
        assert_eq!(
            diff_policy(&on, &off),
            vec![
                DatapathOp::DisablePolicy {
                    subject,
                    direction: Direction::Ingress
                },
                DatapathOp::DeletePolicy { key },
            ]
        );
    }

    #[test]
    fn protocol_numbers_round_trip() {
        for p in [IpProto::Icmp, IpProto::Tcp, IpProto::Udp] {
            assert_eq!(IpProto::from_number(p.number()), Some(p));
        }
        assert_eq!(IpProto::from_number(132), None);
    }
}
