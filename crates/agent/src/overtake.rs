//! Which changes may be written before older ones still waiting, and what that cancels.
//!
//! Why: while a cluster's big list or flood is written (batches of hundreds of ipcache writes,
//! several of them queued between the view task and the maps), another cluster's one change
//! used to wait for all of them (`make floods`: c2's median propagation to c1/n1 rose from 0.6
//! to 2.3 ms while c3's keys were admitted). A small round of ipcache changes (an endpoint
//! added or gone, the common change) goes ahead of what is queued instead: the view task hands
//! it on while its bulk round waits for room, and the reconciler writes it between two chunks
//! of the batch it is writing.
//!
//! Why it is safe: each key's last write still wins. An older op on a key the newer round also
//! writes is dropped (superseded), so the order of the writes of one key is kept. Ops on other
//! keys are not ordered against it: they come from other events, which could have arrived in
//! the other order (different clusters' events never were ordered). The one order that matters
//! across keys is the datapath's safe order ([`DatapathOp::phase`]): a node is known before an
//! ipcache entry tunnels to it. So a round does not overtake an older op on a node it tunnels
//! to, and only ipcache ops overtake (policy markers, nodes and services keep their order).

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;
use meshd_mesh::{DatapathOp, ServiceOp};

/// Most ops of a round that may overtake: a few events' worth, so the time it makes older
/// writes wait stays small.
pub const MAX_OPS: usize = 256;

/// A round that may go ahead of older ops: the keys it writes and the nodes it tunnels to.
#[derive(Debug)]
pub struct Overtaking {
    prefixes: HashSet<IpNet>,
    tunnels: HashSet<IpAddr>,
}

impl Overtaking {
    /// `Some` if the round may overtake: ipcache ops only, at most [`MAX_OPS`], no service op.
    pub fn of(ops: &[DatapathOp], service_ops: &[ServiceOp]) -> Option<Self> {
        if ops.is_empty() || ops.len() > MAX_OPS || !service_ops.is_empty() {
            return None;
        }
        let mut o = Overtaking {
            prefixes: HashSet::with_capacity(ops.len()),
            tunnels: HashSet::new(),
        };
        for op in ops {
            match op {
                DatapathOp::UpsertIpcache { prefix, target } => {
                    o.prefixes.insert(*prefix);
                    o.tunnels.extend(target.tunnel_endpoint);
                }
                DatapathOp::DeleteIpcache { prefix } => {
                    o.prefixes.insert(*prefix);
                }
                _ => return None,
            }
        }
        Some(o)
    }

    /// Whether the older, unwritten `op` must be written first: a write of a node one of the
    /// round's entries tunnels to (its upsert comes before the entry, in safe order).
    pub fn waits_for(&self, op: &DatapathOp) -> bool {
        match op {
            DatapathOp::UpsertNode { ip, .. } | DatapathOp::DeleteNode { ip } => {
                self.tunnels.contains(ip)
            }
            _ => false,
        }
    }

    /// Whether the older, unwritten `op` is superseded by the round (the same ipcache key):
    /// it is dropped, so the key ends as the round leaves it.
    pub fn supersedes(&self, op: &DatapathOp) -> bool {
        match op {
            DatapathOp::UpsertIpcache { prefix, .. } | DatapathOp::DeleteIpcache { prefix } => {
                self.prefixes.contains(prefix)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use meshd_mesh::IpcacheTarget;
    use meshd_state::{ClusterId, NumericIdentity};

    use super::*;

    fn upsert(prefix: &str, identity: u32, host: &str) -> DatapathOp {
        DatapathOp::UpsertIpcache {
            prefix: prefix.parse().unwrap(),
            target: IpcacheTarget {
                identity: NumericIdentity::new(identity).unwrap(),
                tunnel_endpoint: Some(host.parse().unwrap()),
                local: false,
            },
        }
    }

    /// A round's ops overtake older ones on other keys, replace older ones on its keys, and
    /// wait for a node they tunnel to; anything but ipcache ops does not overtake.
    #[test]
    fn what_overtakes_what() {
        let newer = [
            upsert("10.2.0.5/32", (2 << 16) | 300, "192.168.0.2"),
            DatapathOp::DeleteIpcache {
                prefix: "10.2.0.6/32".parse().unwrap(),
            },
        ];
        let o = Overtaking::of(&newer, &[]).expect("ipcache ops overtake");
        // The same keys, older: superseded.
        assert!(o.supersedes(&upsert("10.2.0.5/32", (3 << 16) | 300, "192.168.0.3")));
        assert!(o.supersedes(&upsert("10.2.0.6/32", (2 << 16) | 300, "192.168.0.2")));
        // Another key (an overlapping prefix is another LPM entry): kept, not waited for.
        let other = upsert("10.2.0.0/16", (3 << 16) | 300, "192.168.0.3");
        assert!(!o.supersedes(&other) && !o.waits_for(&other));
        // The node the upsert tunnels to, older and unwritten: the round waits.
        let node = DatapathOp::UpsertNode {
            ip: "192.168.0.2".parse().unwrap(),
            cluster_id: ClusterId::new(2).unwrap(),
        };
        assert!(o.waits_for(&node));
        assert!(!o.waits_for(&DatapathOp::UpsertNode {
            ip: "192.168.0.3".parse().unwrap(),
            cluster_id: ClusterId::new(3).unwrap(),
        }));
        // Nodes, policies, services and big rounds keep their place.
        assert!(Overtaking::of(&[node], &[]).is_none());
        assert!(Overtaking::of(&[], &[]).is_none());
        let many: Vec<DatapathOp> = (0..=MAX_OPS)
            .map(|i| {
                upsert(
                    &format!("10.2.{}.{}/32", i / 256, i % 256),
                    (2 << 16) | 300,
                    "192.168.0.2",
                )
            })
            .collect();
        assert!(Overtaking::of(&many, &[]).is_none());
    }
}
