//! Tests of the merged view: merge, drain, every rejection, pending entries, conflicts, and
//! that the incremental operations always equal a diff of the maintained state and the
//! maintained state always equals a recomputation from scratch.

use std::net::IpAddr;

use ipnet::IpNet;
use meshd_state::{
    Capabilities, ClusterConfig, ClusterId, ClusterName, IdentityRecord, IpcacheEntry, Labels,
    NodeRecord, NumericIdentity, CLUSTER_LABEL, NAMESPACE_LABEL,
};

use super::*;
use crate::desired::{diff, DatapathOp, DesiredDatapath, Direction, IpProto, PolicyKey};
use crate::policy::NetworkPolicy;
use crate::reject::{ClusterRefusal, RejectReason};

fn cn(s: &str) -> ClusterName {
    ClusterName::new(s).unwrap()
}

fn cid(n: u32) -> ClusterId {
    ClusterId::new(n).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ident(cluster: u32, local: u16) -> NumericIdentity {
    NumericIdentity::allocated(cid(cluster), local).unwrap()
}

const LOCAL_IP: &str = "192.168.1.1";

fn local() -> LocalNode {
    LocalNode {
        cluster: cn("c1"),
        cluster_id: cid(1),
        node_name: "n1".into(),
        node_ip: ip(LOCAL_IP),
        pod_cidrs: vec![net("10.1.1.0/24")],
        routing_mode: Default::default(),
        non_masquerade: vec![net("172.16.0.0/12")],
    }
}

fn node(cluster: &str, id: u32, name: &str, node_ip: &str, cidr: &str) -> EventKind {
    EventKind::UpsertNode(NodeRecord {
        name: name.into(),
        cluster: cn(cluster),
        cluster_id: cid(id),
        node_ip: ip(node_ip),
        pod_cidrs: vec![net(cidr)],
        labels: Labels::new(),
        boot_id: "boot".into(),
    })
}

fn entry(prefix: &str, identity: NumericIdentity, host: &str) -> EventKind {
    let prefix = if prefix.contains('/') {
        net(prefix)
    } else {
        IpNet::from(ip(prefix))
    };
    EventKind::UpsertIpcache(IpcacheEntry {
        prefix,
        identity,
        host_ip: ip(host),
        endpoint: None,
        namespace: None,
    })
}

fn delete_entry(prefix: &str) -> EventKind {
    EventKind::DeleteIpcache {
        prefix: IpNet::from(ip(prefix)),
    }
}

fn config(name: &str, id: u32) -> EventKind {
    EventKind::ClusterConfig(ClusterConfig {
        name: cn(name),
        id: cid(id),
        capabilities: Capabilities::default(),
        routing_mode: Default::default(),
    })
}

fn identity(id: NumericIdentity, labels: &[(&str, &str)]) -> EventKind {
    EventKind::UpsertIdentity {
        id,
        record: IdentityRecord {
            labels: Labels::from_pairs(labels.iter().copied()),
        },
    }
}

/// Applies an event and checks the invariants every event must keep: the returned operations
/// are exactly the diff of the maintained maps, and the maintained maps equal a recomputation
/// from scratch.
fn apply(view: &mut MeshView, cluster: &str, kind: EventKind) -> Applied {
    apply_checked(view, vec![ClusterEvent::new(cn(cluster), kind)])
}

fn apply_checked(view: &mut MeshView, events: Vec<ClusterEvent>) -> Applied {
    let before = maps_of(view);
    let applied = view.apply_batch(events);
    let after = maps_of(view);
    assert_eq!(applied.ops, diff(&before, &after), "ops are the exact diff");
    let mut replay = before.clone();
    replay.apply_ops(&applied.ops);
    replay.services.apply_ops(&applied.service_ops);
    assert_eq!(replay, after);
    assert_eq!(
        view.desired_from_scratch().no_masquerade,
        after.no_masquerade,
        "incremental NO_MASQ == from scratch"
    );
    let (ipcache, nodes) = view.recompute_from_scratch();
    assert_eq!(
        ipcache, after.ipcache,
        "incremental ipcache == from scratch"
    );
    assert_eq!(nodes, after.nodes, "incremental nodes == from scratch");
    assert_eq!(
        applied.service_ops,
        crate::services::diff_services(&before.services, &after.services)
    );
    applied
}

/// Everything the view maintains for the maps.
fn maps_of(view: &MeshView) -> DesiredDatapath {
    view.desired()
}

fn target_of(view: &MeshView, prefix: &str) -> Option<IpcacheTarget> {
    view.desired_ipcache()
        .get(&IpNet::from(ip(prefix)))
        .copied()
}

fn tunnel(identity: NumericIdentity, host: &str) -> Option<IpcacheTarget> {
    Some(IpcacheTarget {
        identity,
        tunnel_endpoint: Some(ip(host)),
        local: false,
    })
}

/// c1 (local: n1 = this node, n2), c2 (id 2, one node), c3 (id 3, one node), with endpoints.
fn mesh() -> MeshView {
    let mut v = MeshView::new(local());
    apply(&mut v, "c1", node("c1", 1, "n1", LOCAL_IP, "10.1.1.0/24"));
    apply(
        &mut v,
        "c1",
        node("c1", 1, "n2", "192.168.1.2", "10.1.2.0/24"),
    );
    apply(&mut v, "c1", entry("10.1.1.5", ident(1, 300), LOCAL_IP));
    apply(
        &mut v,
        "c1",
        entry("10.1.2.5", ident(1, 301), "192.168.1.2"),
    );
    for (c, id) in [("c2", 2), ("c3", 3)] {
        apply(&mut v, c, config(c, id));
        apply(
            &mut v,
            c,
            node(
                c,
                id,
                "n1",
                &format!("192.168.{id}.1"),
                &format!("10.{id}.1.0/24"),
            ),
        );
        apply(
            &mut v,
            c,
            entry(
                &format!("10.{id}.1.5"),
                ident(id, 300),
                &format!("192.168.{id}.1"),
            ),
        );
    }
    v
}

#[test]
fn merges_local_and_remote_clusters() {
    let v = mesh();
    assert_eq!(
        target_of(&v, "10.1.1.5"),
        Some(IpcacheTarget {
            identity: ident(1, 300),
            tunnel_endpoint: None,
            local: true
        }),
        "an endpoint of this node is local, without tunnel"
    );
    assert_eq!(
        target_of(&v, "10.1.2.5"),
        tunnel(ident(1, 301), "192.168.1.2")
    );
    assert_eq!(
        target_of(&v, "10.2.1.5"),
        tunnel(ident(2, 300), "192.168.2.1")
    );
    assert_eq!(
        target_of(&v, "10.3.1.5"),
        tunnel(ident(3, 300), "192.168.3.1")
    );
    assert_eq!(
        target_of(&v, LOCAL_IP),
        Some(IpcacheTarget {
            identity: NumericIdentity::HOST,
            tunnel_endpoint: None,
            local: true
        })
    );
    for other in ["192.168.1.2", "192.168.2.1", "192.168.3.1"] {
        assert_eq!(
            target_of(&v, other),
            Some(IpcacheTarget {
                identity: NumericIdentity::REMOTE_NODE,
                tunnel_endpoint: None,
                local: false
            })
        );
    }
    let nodes: Vec<(IpAddr, ClusterId)> = v.desired_nodes().iter().map(|(a, b)| (*a, *b)).collect();
    assert_eq!(
        nodes,
        vec![
            (ip("192.168.1.2"), cid(1)),
            (ip("192.168.2.1"), cid(2)),
            (ip("192.168.3.1"), cid(3))
        ],
        "every node but this one, with its cluster id"
    );
    assert_eq!(v.desired_ipcache().len(), 8);
    for s in v.status() {
        assert_eq!(s.ipcache.rejected + s.nodes.rejected, 0, "{s:?}");
    }
}

#[test]
fn cluster_removed_drains_exactly_that_cluster() {
    let mut v = mesh();
    let applied = apply(&mut v, "c2", EventKind::ClusterRemoved);
    assert!(applied.ops.iter().all(|op| matches!(
        op,
        DatapathOp::DeleteIpcache { .. }
            | DatapathOp::DeleteNode { .. }
            | DatapathOp::DeleteNoMasquerade { .. }
    )));
    assert_eq!(
        applied.ops.len(),
        4,
        "endpoint, node ipcache entry, node, its pod CIDR in NO_MASQ: {applied:?}"
    );
    assert_eq!(target_of(&v, "10.2.1.5"), None);
    assert_eq!(target_of(&v, "192.168.2.1"), None);
    assert!(!v.desired_nodes().contains_key(&ip("192.168.2.1")));
    assert!(target_of(&v, "10.3.1.5").is_some());
    assert!(v.cluster_status(&cn("c2")).is_none());
    // Removing it again, or a cluster never seen, is harmless.
    assert!(apply(&mut v, "c2", EventKind::ClusterRemoved)
        .ops
        .is_empty());
    assert!(apply(&mut v, "c9", EventKind::ClusterRemoved)
        .ops
        .is_empty());
}

/// "Traffic to destinations outside every cluster's pod CIDRs is masqueraded": NO_MASQ holds
/// this node's pod CIDR and the configured exceptions from the start, and every admitted
/// node's pod CIDRs while it is admitted, however many nodes share one.
#[test]
fn every_admitted_nodes_pod_cidrs_are_never_masqueraded() {
    let fixed: BTreeSet<IpNet> = [net("10.1.1.0/24"), net("172.16.0.0/12")].into();
    assert_eq!(MeshView::new(local()).desired().no_masquerade, fixed);
    let mut v = mesh();
    let all: BTreeSet<IpNet> = fixed
        .iter()
        .copied()
        .chain(["10.1.2.0/24", "10.2.1.0/24", "10.3.1.0/24"].map(net))
        .collect();
    assert_eq!(v.desired().no_masquerade, all);

    // A second node of c2 on the same CIDR (a misconfiguration, or a move): the CIDR stays
    // until both are gone.
    apply(
        &mut v,
        "c2",
        node("c2", 2, "n2", "192.168.2.2", "10.2.1.0/24"),
    );
    let applied = apply(&mut v, "c2", EventKind::DeleteNode { name: "n1".into() });
    assert!(
        !applied
            .ops
            .iter()
            .any(|op| matches!(op, DatapathOp::DeleteNoMasquerade { .. })),
        "{applied:?}"
    );
    // A node whose cluster id is wrong is not admitted: its CIDR is not exempt.
    let applied = apply(
        &mut v,
        "c3",
        node("c3", 9, "n2", "192.168.3.2", "10.3.2.0/24"),
    );
    assert!(
        !v.desired().no_masquerade.contains(&net("10.3.2.0/24")),
        "{applied:?}"
    );
    // The remote cluster goes: its CIDRs with it, the fixed ones stay.
    let applied = apply(&mut v, "c2", EventKind::ClusterRemoved);
    assert!(applied.ops.contains(&DatapathOp::DeleteNoMasquerade {
        prefix: net("10.2.1.0/24")
    }));
    apply(&mut v, "c3", EventKind::ClusterRemoved);
    apply(&mut v, "c1", EventKind::DeleteNode { name: "n2".into() });
    apply(&mut v, "c1", EventKind::DeleteNode { name: "n1".into() });
    assert_eq!(v.desired().no_masquerade, fixed);
}

#[test]
fn identity_outside_the_cluster_range_is_rejected_until_a_valid_update() {
    let mut v = mesh();
    let bad = ident(3, 400);
    let applied = apply(&mut v, "c2", entry("10.2.1.6", bad, "192.168.2.1"));
    assert_eq!(applied.rejected.len(), 1);
    let r = &applied.rejected[0];
    assert_eq!(r.cluster, cn("c2"));
    assert_eq!(
        r.reason,
        RejectReason::IdentityOutOfRange {
            identity: bad,
            cluster_id: cid(2)
        }
    );
    let text = r.to_string();
    assert!(
        text.contains("cluster c2") && text.contains("meshd/state/ip/v1/c2/10.2.1.6"),
        "{text}"
    );
    assert!(applied.ops.is_empty(), "nothing reaches the datapath");
    assert_eq!(
        target_of(&v, "10.2.1.5"),
        tunnel(ident(2, 300), "192.168.2.1")
    );
    let s = v.cluster_status(&cn("c2")).unwrap();
    assert_eq!(
        (s.ipcache.rejected, s.ipcache.admitted, s.rejected_total),
        (1, 1, 1)
    );
    assert_eq!(v.rejections(&cn("c2")).len(), 1);

    // The same bad update again is reported and counted again.
    let again = apply(&mut v, "c2", entry("10.2.1.6", bad, "192.168.2.1"));
    assert_eq!(again.rejected.len(), 1);
    assert_eq!(v.cluster_status(&cn("c2")).unwrap().rejected_total, 2);

    // A valid update of the key replaces the rejection.
    let fixed = apply(
        &mut v,
        "c2",
        entry("10.2.1.6", ident(2, 400), "192.168.2.1"),
    );
    assert!(fixed.rejected.is_empty());
    assert_eq!(
        target_of(&v, "10.2.1.6"),
        tunnel(ident(2, 400), "192.168.2.1")
    );
    let s = v.cluster_status(&cn("c2")).unwrap();
    assert_eq!((s.ipcache.rejected, s.ipcache.admitted), (0, 2));
    assert!(v.rejections(&cn("c2")).is_empty());
}

#[test]
fn reserved_identities_are_refused_from_every_cluster() {
    let mut v = mesh();
    for (c, host, prefix) in [
        ("c2", "192.168.2.1", "10.2.1.7"),
        ("c1", "192.168.1.2", "10.1.2.7"),
    ] {
        for reserved in [
            NumericIdentity::HOST,
            NumericIdentity::WORLD,
            NumericIdentity::REMOTE_NODE,
        ] {
            let applied = apply(&mut v, c, entry(prefix, reserved, host));
            assert_eq!(
                applied.rejected[0].reason,
                RejectReason::ReservedIdentity { identity: reserved }
            );
            assert_eq!(target_of(&v, prefix), None);
        }
    }
}

#[test]
fn remote_prefixes_overlapping_local_ones_are_rejected() {
    let mut v = mesh();
    // Inside this node's pod CIDR, equal to a local endpoint, inside another local node's pod
    // CIDR, containing local prefixes, and a local node's IP.
    for (prefix, local) in [
        ("10.1.1.9/32", "10.1.1.0/24"),
        ("10.1.1.5/32", "10.1.1.0/24"),
        ("10.1.2.9/32", "10.1.2.0/24"),
        ("10.0.0.0/8", "10.1.1.0/24"),
        ("192.168.1.2/32", "192.168.1.2/32"),
    ] {
        let applied = apply(&mut v, "c2", entry(prefix, ident(2, 500), "192.168.2.1"));
        assert_eq!(applied.rejected.len(), 1, "{prefix}");
        match &applied.rejected[0].reason {
            RejectReason::OverlapsLocal {
                prefix: p,
                local: l,
            } => {
                assert_eq!(*p, net(prefix));
                assert!(
                    l.contains(&net(local)) || net(local).contains(l),
                    "{prefix}: {l}"
                );
            }
            other => panic!("{prefix}: {other}"),
        }
    }
    // The local entries were not disturbed.
    assert!(target_of(&v, "10.1.1.5").unwrap().local);
    assert_eq!(
        target_of(&v, "192.168.1.2").unwrap().identity,
        NumericIdentity::REMOTE_NODE
    );
}

#[test]
fn a_local_prefix_appearing_later_withdraws_the_overlapping_remote_entry() {
    let mut v = mesh();
    apply(
        &mut v,
        "c2",
        entry("10.9.0.5", ident(2, 500), "192.168.2.1"),
    );
    assert!(target_of(&v, "10.9.0.5").is_some());
    // A new local node whose pod CIDR covers it.
    let applied = apply(
        &mut v,
        "c1",
        node("c1", 1, "n3", "192.168.1.3", "10.9.0.0/24"),
    );
    assert_eq!(applied.rejected.len(), 1);
    assert_eq!(target_of(&v, "10.9.0.5"), None);
    // The local node goes: the remote entry is admitted again.
    let applied = apply(&mut v, "c1", EventKind::DeleteNode { name: "n3".into() });
    assert!(applied.rejected.is_empty());
    assert_eq!(
        target_of(&v, "10.9.0.5"),
        tunnel(ident(2, 500), "192.168.2.1")
    );
    // Same with a local endpoint of the same address.
    apply(
        &mut v,
        "c1",
        entry("10.9.0.5", ident(1, 320), "192.168.1.2"),
    );
    assert_eq!(
        target_of(&v, "10.9.0.5"),
        tunnel(ident(1, 320), "192.168.1.2")
    );
    apply(&mut v, "c1", delete_entry("10.9.0.5"));
    assert_eq!(
        target_of(&v, "10.9.0.5"),
        tunnel(ident(2, 500), "192.168.2.1")
    );
}

#[test]
fn an_entry_before_its_node_is_pending_and_admitted_when_the_node_appears() {
    let mut v = mesh();
    let applied = apply(
        &mut v,
        "c2",
        entry("10.2.2.5", ident(2, 300), "192.168.2.2"),
    );
    assert!(applied.rejected.is_empty());
    assert_eq!(applied.pending.len(), 1);
    assert_eq!(applied.pending[0].host_ip, ip("192.168.2.2"));
    assert!(applied.pending[0]
        .to_string()
        .contains("meshd/state/ip/v1/c2/10.2.2.5"));
    assert_eq!(target_of(&v, "10.2.2.5"), None);
    assert_eq!(v.cluster_status(&cn("c2")).unwrap().ipcache.pending, 1);
    assert_eq!(v.pending(&cn("c2")).len(), 1);

    let applied = apply(
        &mut v,
        "c2",
        node("c2", 2, "n2", "192.168.2.2", "10.2.2.0/24"),
    );
    assert_eq!(
        target_of(&v, "10.2.2.5"),
        tunnel(ident(2, 300), "192.168.2.2")
    );
    assert!(applied.ops.contains(&DatapathOp::UpsertNode {
        ip: ip("192.168.2.2"),
        cluster_id: cid(2)
    }));
    assert_eq!(v.cluster_status(&cn("c2")).unwrap().ipcache.pending, 0);

    // The node goes (lease expired): its entries are withdrawn and wait again.
    let applied = apply(&mut v, "c2", EventKind::DeleteNode { name: "n2".into() });
    assert_eq!(target_of(&v, "10.2.2.5"), None);
    assert_eq!(applied.pending.len(), 1);
    assert!(!v.desired_nodes().contains_key(&ip("192.168.2.2")));

    // In one batch (an initial list), the order does not matter and nothing is reported.
    let applied = apply_checked(
        &mut v,
        vec![
            ClusterEvent::new(cn("c2"), entry("10.2.3.5", ident(2, 300), "192.168.2.3")),
            ClusterEvent::new(cn("c2"), node("c2", 2, "n3", "192.168.2.3", "10.2.3.0/24")),
        ],
    );
    assert!(applied.pending.is_empty());
    assert!(target_of(&v, "10.2.3.5").is_some());
}

#[test]
fn a_node_moving_ip_moves_its_entries() {
    let mut v = mesh();
    apply(
        &mut v,
        "c2",
        node("c2", 2, "n1", "192.168.2.9", "10.2.1.0/24"),
    );
    // The entry still names the old IP: it waits for a node with that IP.
    assert_eq!(target_of(&v, "10.2.1.5"), None);
    assert!(!v.desired_nodes().contains_key(&ip("192.168.2.1")));
    apply(
        &mut v,
        "c2",
        entry("10.2.1.5", ident(2, 300), "192.168.2.9"),
    );
    assert_eq!(
        target_of(&v, "10.2.1.5"),
        tunnel(ident(2, 300), "192.168.2.9")
    );
}

#[test]
fn remote_data_waits_for_the_cluster_config() {
    let mut v = MeshView::new(local());
    apply(
        &mut v,
        "c4",
        node("c4", 4, "n1", "192.168.4.1", "10.4.1.0/24"),
    );
    apply(
        &mut v,
        "c4",
        entry("10.4.1.5", ident(4, 300), "192.168.4.1"),
    );
    apply(&mut v, "c4", identity(ident(4, 300), &[("app", "web")]));
    assert_eq!(target_of(&v, "10.4.1.5"), None);
    assert!(v.identities().is_empty());
    let s = v.cluster_status(&cn("c4")).unwrap();
    assert_eq!(
        (s.ipcache.pending, s.nodes.pending, s.cluster_id),
        (1, 1, None)
    );
    let applied = apply(&mut v, "c4", config("c4", 4));
    assert!(applied.policy_inputs_changed);
    assert!(target_of(&v, "10.4.1.5").is_some());
    assert_eq!(
        v.identities()[&ident(4, 300)].get(CLUSTER_LABEL),
        Some("c4"),
        "the cluster label is added where the publisher left it out"
    );
}

#[test]
fn readiness_needs_config_and_the_three_canaries() {
    let mut v = MeshView::new(local());
    apply(&mut v, "c2", EventKind::Synced(ResourceKind::Nodes));
    apply(&mut v, "c2", EventKind::Synced(ResourceKind::Ipcache));
    apply(&mut v, "c2", EventKind::Synced(ResourceKind::Identities));
    assert!(!v.cluster_status(&cn("c2")).unwrap().ready, "no config yet");
    apply(&mut v, "c2", config("c2", 2));
    assert!(v.cluster_status(&cn("c2")).unwrap().ready);
    let local_status = v.cluster_status(&cn("c1")).unwrap();
    assert!(local_status.local && !local_status.ready);
}

#[test]
fn a_cluster_using_the_local_id_is_refused_entirely() {
    let mut v = MeshView::new(local());
    apply(
        &mut v,
        "c2",
        node("c2", 1, "n1", "192.168.2.1", "10.2.1.0/24"),
    );
    apply(
        &mut v,
        "c2",
        entry("10.2.1.5", ident(1, 300), "192.168.2.1"),
    );
    apply(&mut v, "c2", identity(ident(1, 300), &[("app", "evil")]));
    let applied = apply(&mut v, "c2", config("c2", 1));
    assert_eq!(
        applied.refusals,
        vec![ClusterRefusal::IdConflictLocal {
            cluster: cn("c2"),
            id: cid(1)
        }]
    );
    assert!(applied.ops.is_empty());
    assert!(
        v.identities().is_empty(),
        "its identities could impersonate local ones"
    );
    let s = v.cluster_status(&cn("c2")).unwrap();
    assert!(s.refused.is_some() && !s.ready);
    // The remote fixes its config: everything comes in.
    apply(&mut v, "c2", config("c2", 2));
    apply(
        &mut v,
        "c2",
        node("c2", 2, "n1", "192.168.2.1", "10.2.1.0/24"),
    );
    apply(
        &mut v,
        "c2",
        entry("10.2.1.5", ident(2, 300), "192.168.2.1"),
    );
    assert!(target_of(&v, "10.2.1.5").is_some());
    assert!(v.cluster_status(&cn("c2")).unwrap().refused.is_none());
}

#[test]
fn the_incumbent_keeps_its_id_and_the_newcomer_waits() {
    let mut v = mesh();
    apply(
        &mut v,
        "c4",
        node("c4", 2, "n1", "192.168.4.1", "10.4.1.0/24"),
    );
    apply(
        &mut v,
        "c4",
        entry("10.4.1.5", ident(2, 999), "192.168.4.1"),
    );
    let applied = apply(&mut v, "c4", config("c4", 2));
    assert_eq!(
        applied.refusals,
        vec![ClusterRefusal::IdConflict {
            cluster: cn("c4"),
            id: cid(2),
            with: cn("c2")
        }]
    );
    assert!(applied.ops.is_empty());
    assert!(target_of(&v, "10.2.1.5").is_some(), "c2 undisturbed");
    assert_eq!(target_of(&v, "10.4.1.5"), None);
    // c2 goes: c4 is accepted on the spot.
    apply(&mut v, "c2", EventKind::ClusterRemoved);
    assert_eq!(
        target_of(&v, "10.4.1.5"),
        tunnel(ident(2, 999), "192.168.4.1")
    );
    assert_eq!(
        v.cluster_status(&cn("c4")).unwrap().cluster_id,
        Some(cid(2))
    );
}

#[test]
fn a_remote_announcing_another_routing_mode_is_refused_until_it_agrees() {
    use meshd_state::RoutingMode;
    let native = |name: &str, id: u32, mode: RoutingMode| {
        EventKind::ClusterConfig(ClusterConfig {
            name: cn(name),
            id: cid(id),
            capabilities: Capabilities::default(),
            routing_mode: mode,
        })
    };
    let mut v = MeshView::new(local());
    apply(
        &mut v,
        "c2",
        node("c2", 2, "n1", "192.168.2.1", "10.2.1.0/24"),
    );
    apply(
        &mut v,
        "c2",
        entry("10.2.1.5", ident(2, 300), "192.168.2.1"),
    );
    let applied = apply(&mut v, "c2", native("c2", 2, RoutingMode::Native));
    assert_eq!(
        applied.refusals,
        vec![ClusterRefusal::RoutingModeMismatch {
            cluster: cn("c2"),
            announced: RoutingMode::Native,
            local: RoutingMode::Tunnel,
        }]
    );
    assert!(applied.refusals[0]
        .to_string()
        .contains("routing mode native"));
    assert_eq!(target_of(&v, "10.2.1.5"), None);
    assert!(v.cluster_status(&cn("c2")).unwrap().refused.is_some());
    // It switches to the mesh's mode: admitted.
    apply(&mut v, "c2", native("c2", 2, RoutingMode::Tunnel));
    assert!(target_of(&v, "10.2.1.5").is_some());
    assert!(v.cluster_status(&cn("c2")).unwrap().refused.is_none());
    // A native node refuses a tunnelling remote the same way.
    let mut n = MeshView::new(LocalNode {
        routing_mode: RoutingMode::Native,
        ..local()
    });
    let applied = apply(&mut n, "c2", config("c2", 2));
    assert!(matches!(
        applied.refusals[..],
        [ClusterRefusal::RoutingModeMismatch { .. }]
    ));
}

#[test]
fn peer_nodes_are_the_admitted_nodes_but_this_one() {
    let mut v = MeshView::new(local());
    apply(&mut v, "c1", config("c1", 1));
    apply(&mut v, "c1", node("c1", 1, "n1", LOCAL_IP, "10.1.1.0/24"));
    apply(
        &mut v,
        "c1",
        node("c1", 1, "n2", "192.168.1.2", "10.1.2.0/24"),
    );
    apply(
        &mut v,
        "c2",
        node("c2", 2, "n1", "192.168.2.1", "10.2.1.0/24"),
    );
    let names = |v: &MeshView| -> Vec<String> {
        v.peer_nodes()
            .iter()
            .map(|n| format!("{}/{} {} {:?}", n.cluster, n.name, n.node_ip, n.pod_cidrs))
            .collect()
    };
    // c2 has no config yet: its node is not admitted.
    assert_eq!(names(&v), ["c1/n2 192.168.1.2 [10.1.2.0/24]"]);
    apply(&mut v, "c2", config("c2", 2));
    assert_eq!(
        names(&v),
        [
            "c1/n2 192.168.1.2 [10.1.2.0/24]",
            "c2/n1 192.168.2.1 [10.2.1.0/24]"
        ]
    );
    apply(&mut v, "c1", EventKind::DeleteNode { name: "n2".into() });
    assert_eq!(names(&v), ["c2/n1 192.168.2.1 [10.2.1.0/24]"]);
}

#[test]
fn a_remote_publishing_another_name_is_refused() {
    let mut v = MeshView::new(local());
    let applied = apply(&mut v, "c2", config("c9", 2));
    assert_eq!(
        applied.refusals,
        vec![ClusterRefusal::NameMismatch {
            configured: cn("c2"),
            published: cn("c9")
        }]
    );
    assert!(applied.refusals[0].to_string().contains("c9"));
}

#[test]
fn the_local_cluster_config_is_checked_but_never_refused() {
    let mut v = mesh();
    let applied = apply(&mut v, "c1", config("c1", 7));
    assert!(matches!(
        applied.refusals.as_slice(),
        [ClusterRefusal::LocalConfigMismatch { .. }]
    ));
    assert!(target_of(&v, "10.1.2.5").is_some());
    assert!(apply(&mut v, "c1", config("c1", 1)).refusals.is_empty());
}

#[test]
fn node_records_are_checked() {
    let mut v = mesh();
    // Wrong cluster id in the record: rejected, and its entries wait.
    let applied = apply(
        &mut v,
        "c2",
        node("c2", 3, "n2", "192.168.2.2", "10.2.2.0/24"),
    );
    assert_eq!(
        applied.rejected[0].reason,
        RejectReason::NodeClusterIdMismatch {
            record: cid(3),
            cluster: cid(2)
        }
    );
    assert!(applied.rejected[0]
        .to_string()
        .contains("meshd/state/nodes/v1/c2/n2"));
    apply(
        &mut v,
        "c2",
        entry("10.2.2.5", ident(2, 300), "192.168.2.2"),
    );
    assert_eq!(target_of(&v, "10.2.2.5"), None);
    // A record naming another cluster.
    let applied = apply(
        &mut v,
        "c2",
        node("c3", 2, "n4", "192.168.2.4", "10.2.4.0/24"),
    );
    assert!(matches!(
        applied.rejected[0].reason,
        RejectReason::WrongCluster { .. }
    ));
    // A remote node claiming this node's IP, or another local node's.
    for taken in [LOCAL_IP, "192.168.1.2"] {
        let applied = apply(&mut v, "c2", node("c2", 2, "n5", taken, "10.2.5.0/24"));
        assert!(
            matches!(
                applied.rejected[0].reason,
                RejectReason::NodeIpConflict { .. }
            ),
            "{taken}: {applied:?}"
        );
        assert_eq!(
            v.desired_nodes().get(&ip(taken)).copied(),
            (taken != LOCAL_IP).then_some(cid(1))
        );
    }
    assert_eq!(
        target_of(&v, LOCAL_IP).unwrap().identity,
        NumericIdentity::HOST
    );
    // Another local node claiming this node's IP.
    let applied = apply(&mut v, "c1", node("c1", 1, "n9", LOCAL_IP, "10.1.9.0/24"));
    assert!(matches!(
        applied.rejected[0].reason,
        RejectReason::NodeIpConflict { .. }
    ));
}

#[test]
fn two_remotes_claiming_a_node_ip_lower_id_wins() {
    let mut v = mesh();
    // c3 claims c2's node IP: c2 (id 2) keeps it.
    let applied = apply(
        &mut v,
        "c3",
        node("c3", 3, "n7", "192.168.2.1", "10.3.7.0/24"),
    );
    assert!(matches!(
        applied.rejected[0].reason,
        RejectReason::NodeIpConflict { .. }
    ));
    assert_eq!(v.desired_nodes()[&ip("192.168.2.1")], cid(2));
    // c2's node goes: the IP is c3's now.
    apply(&mut v, "c2", EventKind::DeleteNode { name: "n1".into() });
    assert_eq!(v.desired_nodes()[&ip("192.168.2.1")], cid(3));
}

#[test]
fn two_remotes_claiming_a_prefix_lower_id_wins_whatever_the_order() {
    for c3_first in [false, true] {
        let mut v = mesh();
        let c2 = ClusterEvent::new(cn("c2"), entry("10.50.0.1", ident(2, 700), "192.168.2.1"));
        let c3 = ClusterEvent::new(cn("c3"), entry("10.50.0.1", ident(3, 700), "192.168.3.1"));
        let order = if c3_first { vec![c3, c2] } else { vec![c2, c3] };
        let mut rejected = Vec::new();
        for e in order {
            rejected.extend(apply_checked(&mut v, vec![e]).rejected);
        }
        assert_eq!(
            target_of(&v, "10.50.0.1"),
            tunnel(ident(2, 700), "192.168.2.1")
        );
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].cluster, cn("c3"));
        assert!(matches!(
            rejected[0].reason,
            RejectReason::PrefixClaimed { .. }
        ));
        // The winner withdraws: the other claimant is admitted.
        apply(&mut v, "c2", delete_entry("10.50.0.1"));
        assert_eq!(
            target_of(&v, "10.50.0.1"),
            tunnel(ident(3, 700), "192.168.3.1")
        );
    }
}

#[test]
fn identity_records_are_checked() {
    let mut v = mesh();
    let applied = apply(&mut v, "c2", identity(ident(3, 300), &[("app", "x")]));
    assert!(matches!(
        applied.rejected[0].reason,
        RejectReason::IdentityOutOfRange { .. }
    ));
    assert!(applied.rejected[0]
        .to_string()
        .contains("meshd/state/identities/v1/c2/id/"));
    let applied = apply(
        &mut v,
        "c2",
        identity(ident(2, 300), &[("app", "x"), (CLUSTER_LABEL, "c3")]),
    );
    assert!(matches!(
        applied.rejected[0].reason,
        RejectReason::WrongCluster { .. }
    ));
    assert!(v.identities().is_empty());
    let applied = apply(&mut v, "c2", identity(ident(2, 300), &[("app", "x")]));
    assert!(applied.rejected.is_empty() && applied.policy_inputs_changed);
    assert_eq!(v.identities().len(), 1);
    let applied = apply(
        &mut v,
        "c2",
        EventKind::DeleteIdentity { id: ident(2, 300) },
    );
    assert!(applied.policy_inputs_changed);
    assert!(v.identities().is_empty());
    let s = v.cluster_status(&cn("c2")).unwrap();
    assert_eq!(
        (s.identities.stored, s.identities.rejected),
        (1, 1),
        "the bad one stays rejected"
    );
}

#[test]
fn services_are_stored_for_accepted_clusters() {
    let mut v = mesh();
    let svc = meshd_state::ServiceRecord {
        namespace: "default".into(),
        name: "echo".into(),
        frontends: vec![],
        backends: vec![],
        global: true,
        shared: true,
        affinity: meshd_state::Affinity::None,
        service_type: Default::default(),
        external_ips: Vec::new(),
        load_balancer_ip: None,
        external_traffic_policy: Default::default(),
        health_check_node_port: None,
    };
    apply(&mut v, "c2", EventKind::UpsertService(svc.clone()));
    apply(&mut v, "c5", EventKind::UpsertService(svc.clone()));
    apply(&mut v, "c5", config("c5", 2)); // refused: c2 has id 2
    let seen: Vec<&ClusterName> = v.services().map(|(c, _)| c).collect();
    assert_eq!(seen, vec![&cn("c2")]);
    apply(
        &mut v,
        "c2",
        EventKind::DeleteService {
            namespace: "default".into(),
            name: "echo".into(),
        },
    );
    assert_eq!(v.services().count(), 0);
}

/// A NodePort service through the view: its frontends on this node's IP and on its external
/// IP come and go with the record, one service's operations at a time, flagged, and switching
/// to Local policy rewrites them over this node's backends only.
#[test]
fn node_port_frontends_follow_the_record_incrementally() {
    use crate::desired::IpProto;
    use crate::services::{Backend, Exposure, Frontend, FrontendValue, ServiceOp};
    use meshd_state::TrafficPolicy;
    let mut v = mesh();
    let record = |public: u64, backends: u64| {
        let EventKind::UpsertService(mut r) = random_service("web", 1, backends, true, public)
        else {
            unreachable!()
        };
        r.external_ips = vec![ip("203.0.113.7")];
        r
    };
    let node_port = Frontend {
        ip: ip(LOCAL_IP),
        port: 30000 + u16::from(b'b'),
        proto: IpProto::Tcp,
    };
    let external = Frontend {
        ip: ip("203.0.113.7"),
        port: 80,
        proto: IpProto::Tcp,
    };
    let check = |v: &MeshView| {
        assert_eq!(v.desired().services, v.desired_from_scratch().services);
    };
    // 10.1.1.0 (this node) and 10.1.9.1 (another node of c1).
    let applied = apply(&mut v, "c1", EventKind::UpsertService(record(1, 2)));
    check(&v);
    let upserts: Vec<(Frontend, FrontendValue)> = applied
        .service_ops
        .iter()
        .filter_map(|op| match op {
            ServiceOp::UpsertService { frontend, value } => Some((*frontend, *value)),
            _ => None,
        })
        .filter(|(_, value)| value.exposure != Exposure::Vip)
        .collect();
    assert_eq!(
        upserts,
        [
            (
                node_port,
                FrontendValue {
                    count: 2,
                    exposure: Exposure::NodePort,
                    local_only: false
                }
            ),
            (
                external,
                FrontendValue {
                    count: 2,
                    exposure: Exposure::ExternalIp,
                    local_only: false
                }
            ),
        ]
    );
    // Local policy: the same frontends, now over this node's backend only.
    let mut local = record(1, 2);
    local.external_traffic_policy = TrafficPolicy::Local;
    let applied = apply(&mut v, "c1", EventKind::UpsertService(local));
    check(&v);
    let d = v.desired().services;
    for f in [node_port, external] {
        assert!(d.services[&f].local_only, "{f:?}");
        assert_eq!(
            d.backends_of(&f),
            [Backend {
                cluster_id: cid(1),
                ip: ip("10.1.1.0"),
                port: 8080
            }]
        );
    }
    // The VIP (10.96.<cluster>.<name length>) keeps its backends: no operation touches it.
    let vip = Frontend {
        ip: ip("10.96.1.3"),
        port: 80,
        proto: IpProto::Tcp,
    };
    assert_eq!(d.services[&vip].count, 2);
    assert!(
        applied.service_ops.iter().all(|op| match op {
            ServiceOp::UpsertService { frontend, .. } | ServiceOp::DeleteService { frontend } =>
                *frontend != vip,
            ServiceOp::UpsertBackend { slot, .. } | ServiceOp::DeleteBackend { slot } =>
                slot.frontend != vip,
        }),
        "{:?}",
        applied.service_ops
    );
    // Back to ClusterIP: the public frontends go, the VIP stays.
    let applied = apply(&mut v, "c1", EventKind::UpsertService(record(0, 2)));
    check(&v);
    let deleted: Vec<Frontend> = applied
        .service_ops
        .iter()
        .filter_map(|op| match op {
            ServiceOp::DeleteService { frontend } => Some(*frontend),
            _ => None,
        })
        .collect();
    assert_eq!(
        deleted,
        [node_port],
        "the external IP stays (any type has them)"
    );
    apply(
        &mut v,
        "c1",
        EventKind::DeleteService {
            namespace: "default".into(),
            name: "web".into(),
        },
    );
    check(&v);
    assert!(v.desired().services.services.is_empty());
}

/// Health check node ports follow the local cluster's Local services, their revision moving
/// only when what they answer changes; a remote cluster's record has none here.
#[test]
fn health_checks_follow_local_services_and_their_backends_on_this_node() {
    use meshd_state::TrafficPolicy;
    let mut v = mesh();
    let record = |backends: u64| {
        let EventKind::UpsertService(mut r) = random_service("web", 1, backends, true, 1) else {
            unreachable!()
        };
        r.external_traffic_policy = TrafficPolicy::Local;
        r.health_check_node_port = Some(32000);
        r
    };
    let rev0 = v.health_checks_revision();
    // Backend 0 (10.1.1.0) is on this node, 1 (10.1.9.1) elsewhere.
    apply(&mut v, "c1", EventKind::UpsertService(record(2)));
    let (rev1, checks) = v.health_checks();
    assert_ne!(rev1, rev0);
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[&32000].local_endpoints, 1);
    assert_eq!(checks[&32000].name, "web");
    // The same record again: nothing to publish.
    apply(&mut v, "c1", EventKind::UpsertService(record(2)));
    assert_eq!(v.health_checks_revision(), rev1);
    // Its local backend goes: 0.
    let mut without = record(2);
    without.backends.remove(0);
    apply(&mut v, "c1", EventKind::UpsertService(without));
    assert_eq!(v.health_checks().1[&32000].local_endpoints, 0);
    // A remote cluster's record of the same kind is not served here.
    let EventKind::UpsertService(mut remote) = random_service("api", 2, 2, true, 1) else {
        unreachable!()
    };
    remote.external_traffic_policy = TrafficPolicy::Local;
    remote.health_check_node_port = Some(32001);
    apply(&mut v, "c2", EventKind::UpsertService(remote));
    assert_eq!(v.health_checks().1.keys().collect::<Vec<_>>(), [&32000]);
    apply(
        &mut v,
        "c1",
        EventKind::DeleteService {
            namespace: "default".into(),
            name: "web".into(),
        },
    );
    assert!(v.health_checks().1.is_empty());
}

#[test]
fn policy_through_the_view_picks_up_remote_identities_that_appear_later() {
    let mut v = mesh();
    let ns = (NAMESPACE_LABEL, "default");
    apply(
        &mut v,
        "c1",
        identity(ident(1, 300), &[("app", "echo"), ns]),
    );
    apply(
        &mut v,
        "c1",
        identity(ident(1, 301), &[("app", "client"), ns]),
    );
    let policy = NetworkPolicy::from_yaml(
        r#"
apiVersion: meshd.io/v1
kind: NetworkPolicy
metadata: { name: echo, namespace: default }
spec:
  endpointSelector: { matchLabels: { app: echo } }
  ingress:
    - fromEndpoints: [ { matchLabels: { app: client } } ]
      toPorts: [ { ports: [ { port: "8080", protocol: TCP } ] } ]
"#,
    )
    .unwrap();
    assert!(v.apply_policy(PolicyEvent::Upsert(policy.clone())).unwrap());
    assert!(
        !v.apply_policy(PolicyEvent::Upsert(policy)).unwrap(),
        "unchanged"
    );
    let key = |peer| PolicyKey {
        subject: ident(1, 300),
        peer: Some(peer),
        proto: Some(IpProto::Tcp),
        dport: Some(8080),
        direction: Direction::Ingress,
    };
    let first = v.desired();
    assert!(first.policy.contains_key(&key(ident(1, 301))));
    assert!(!first.policy.contains_key(&key(ident(2, 301))));
    assert!(first
        .policy_enabled
        .contains(&(ident(1, 300), Direction::Ingress)));

    // A client appears in c2: the next recompile allows it, nothing else to do.
    let applied = apply(
        &mut v,
        "c2",
        identity(ident(2, 301), &[("app", "client"), ns]),
    );
    assert!(applied.policy_inputs_changed);
    let second = v.desired();
    assert!(second.policy.contains_key(&key(ident(2, 301))));
    assert_eq!(
        diff(&first, &second),
        vec![DatapathOp::UpsertPolicy {
            key: key(ident(2, 301)),
            value: second.policy[&key(ident(2, 301))]
        }]
    );

    // An invalid update is refused and the stored version stays.
    let mut broken = v.policies().next().unwrap().clone();
    broken.spec.ingress = None;
    assert!(v.apply_policy(PolicyEvent::Upsert(broken)).is_err());
    assert_eq!(v.desired(), second);
    assert!(v
        .apply_policy(PolicyEvent::Delete {
            namespace: "default".into(),
            name: "echo".into()
        })
        .unwrap());
    assert!(v.desired().policy_enabled.is_empty());
}

#[test]
fn many_entries_across_clusters_drain_and_come_back() {
    let mut v = MeshView::new(local());
    let mut batch = Vec::new();
    for (c, id) in [("c2", 2u32), ("c3", 3), ("c4", 4)] {
        batch.push(ClusterEvent::new(cn(c), config(c, id)));
        for n in 0..10u32 {
            batch.push(ClusterEvent::new(
                cn(c),
                node(
                    c,
                    id,
                    &format!("n{n}"),
                    &format!("192.168.{id}.{}", n + 1),
                    &format!("10.{id}.{n}.0/24"),
                ),
            ));
        }
        for i in 0..3000u32 {
            let n = i % 10;
            batch.push(ClusterEvent::new(
                cn(c),
                entry(
                    &format!("10.{id}.{n}.{}", i / 10 % 250 + 1),
                    ident(id, 256 + (i % 300) as u16),
                    &format!("192.168.{id}.{}", n + 1),
                ),
            ));
        }
    }
    // Entries listed before their nodes would arrive: shuffle deterministically.
    let mut rng = Lcg(7);
    for i in (1..batch.len()).rev() {
        let j = rng.next(i as u64 + 1) as usize;
        batch.swap(i, j);
    }
    let applied = apply_checked(&mut v, batch);
    assert!(applied.rejected.is_empty() && applied.pending.is_empty());
    // 3 clusters x 2500 distinct prefixes, 30 nodes, this node's IP.
    assert_eq!(v.desired_ipcache().len(), 3 * 2500 + 30 + 1);
    assert_eq!(v.desired_nodes().len(), 30);
    check_desired_is_sound(&v);

    let applied = apply(&mut v, "c3", EventKind::ClusterRemoved);
    // Entries, node IPs (ipcache and node map), and the nodes' pod CIDRs in NO_MASQ.
    assert_eq!(applied.ops.len(), 2500 + 10 + 10 + 10);
    assert!(v
        .desired_ipcache()
        .keys()
        .all(|p| !net("10.3.0.0/16").contains(p)));
    assert_eq!(v.desired_ipcache().len(), 2 * 2500 + 20 + 1);
    check_desired_is_sound(&v);
}

/// A tiny deterministic generator, so the property test needs no crate and replays exactly.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// A policy of the random streams: `app=<subject>` in `default` accepts `app=<peer>` (any
/// cluster) on TCP `port`; the variants add an egress section whose first rule allows any
/// peer on UDP and whose second reaches `app=<peer>` in every namespace, or a second ingress
/// rule overlapping the first, or rules naming prefixes and entities.
fn random_policy(name: &str, subject: &str, peer: &str, port: u16, variant: u64) -> NetworkPolicy {
    let extra = match variant {
        0 => format!(
            r#"
  egress:
    - toPorts: [ {{ ports: [ {{ port: "53", protocol: UDP }} ] }} ]
    - toEndpoints: [ {{ matchLabels: {{ app: {peer} }}, matchExpressions: [ {{ key: meshd.io/namespace, operator: Exists }} ] }} ]"#
        ),
        1 => format!(
            r#"
    - fromEndpoints: [ {{ matchLabels: {{ app: {subject} }} }}, {{ matchLabels: {{ app: {peer} }} }} ]"#
        ),
        // Prefixes: one inside the remote clusters' endpoint range with a hole in it, one
        // outside the mesh, and the entities; their identities come and go with the policy.
        2 => String::from(
            r#"
  egress:
    - toCIDRSet: [ { cidr: 10.2.0.0/16, except: [ 10.2.1.0/24 ] } ]
      toCIDR: [ 198.51.100.0/24 ]
    - toEntities: [ world, host ]
      toPorts: [ { ports: [ { port: "443", protocol: TCP } ] } ]"#,
        ),
        // A /32 that is also an endpoint's address of cluster 2 (the mesh entry wins while it
        // stands), a broader prefix around it, and the local cluster.
        3 => String::from(
            r#"
    - fromCIDR: [ 10.2.0.5, 10.0.0.0/8 ]
      fromEntities: [ cluster ]"#,
        ),
        _ => String::new(),
    };
    NetworkPolicy::from_yaml(&format!(
        r#"
apiVersion: meshd.io/v1
kind: NetworkPolicy
metadata: {{ name: {name}, namespace: default }}
spec:
  endpointSelector: {{ matchLabels: {{ app: {subject} }} }}
  ingress:
    - fromEndpoints: [ {{ matchLabels: {{ app: {peer} }} }} ]
      toPorts: [ {{ ports: [ {{ port: "{port}", protocol: TCP }} ] }} ]{extra}
"#
    ))
    .unwrap()
}

/// A service of the random streams: one frontend (the VIP depends on the cluster, so the
/// local record's decides) and `backends` ready backends, some on the local node (10.1.1.0/24).
/// `public` 0: ClusterIP; 1: NodePort; 2: LoadBalancer with Local policy and an external IP
/// every such service shares (two services claiming one frontend).
fn random_service(name: &str, cluster: u32, backends: u64, global: bool, public: u64) -> EventKind {
    use meshd_state::{
        Affinity, Protocol, ServiceBackend, ServiceFrontend, ServiceType, TrafficPolicy,
    };
    let (service_type, policy) = match public {
        0 => (ServiceType::ClusterIp, TrafficPolicy::Cluster),
        1 => (ServiceType::NodePort, TrafficPolicy::Cluster),
        _ => (ServiceType::LoadBalancer, TrafficPolicy::Local),
    };
    EventKind::UpsertService(meshd_state::ServiceRecord {
        namespace: "default".into(),
        name: name.into(),
        frontends: vec![ServiceFrontend {
            ip: ip(&format!("10.96.{cluster}.{}", name.len())),
            port: 80,
            protocol: Protocol::Tcp,
            port_name: "http".into(),
            node_port: (public > 0).then(|| 30000 + b_port(name)),
        }],
        backends: (0..backends)
            .map(|b| ServiceBackend {
                ip: ip(&format!(
                    "10.{cluster}.{}.{b}",
                    if b % 2 == 0 { 1 } else { 9 }
                )),
                port: 8080,
                protocol: Protocol::Tcp,
                ready: b % 3 != 2,
                port_name: "http".into(),
            })
            .collect(),
        global,
        shared: global,
        affinity: Affinity::None,
        service_type,
        external_ips: if public == 2 {
            vec![ip("203.0.113.1")]
        } else {
            Vec::new()
        },
        load_balancer_ip: None,
        external_traffic_policy: policy,
        health_check_node_port: None,
    })
}

/// A distinct node port per random service name (`s0`, `s1`, ...).
fn b_port(name: &str) -> u16 {
    name.bytes().last().map_or(0, u16::from)
}

#[test]
fn random_event_streams_keep_every_invariant() {
    let clusters = [("c1", 1u32), ("c2", 2), ("c3", 3), ("c4", 4)];
    let apps = ["x", "y", "z"];
    let mut seen = (0, 0, 0, 0);
    let mut seen_policy_and_service_ops = (0, 0);
    let mut seen_public_frontends = 0;
    for seed in 0..8u64 {
        let mut rng = Lcg(seed);
        let mut v = MeshView::new(local());
        // The maps as a reconciler drives them: empty, then the start-up full diff, then only
        // the operations the view emits. After every event they must equal the oracle.
        let mut model = DesiredDatapath::default();
        model.apply_ops(&diff(&model, &v.desired()));
        model.services.apply_ops(&crate::services::diff_services(
            &model.services,
            &v.desired().services,
        ));
        let check_model = |model: &DesiredDatapath, v: &MeshView| {
            assert_eq!(
                *model,
                v.desired_from_scratch(),
                "ops applied == from scratch"
            );
        };
        check_model(&model, &v);
        for _ in 0..60 {
            if rng.next(4) == 0 {
                let name = format!("p{}", rng.next(3));
                let event = if rng.next(3) == 0 {
                    PolicyEvent::Delete {
                        namespace: "default".into(),
                        name,
                    }
                } else {
                    PolicyEvent::Upsert(random_policy(
                        &name,
                        apps[rng.next(3) as usize],
                        apps[rng.next(3) as usize],
                        8000 + rng.next(3) as u16,
                        rng.next(5),
                    ))
                };
                let applied = v.update_policy(event).unwrap();
                seen_policy_and_service_ops.0 += applied.ops.len();
                model.apply_ops(&applied.ops);
                check_model(&model, &v);
            }
            let mut batch = Vec::new();
            for _ in 0..1 + rng.next(30) {
                let (c, id) = clusters[rng.next(4) as usize];
                // Sometimes a cluster publishes under a wrong id, sometimes overlapping.
                let ident_cluster = if rng.next(20) == 0 {
                    1 + rng.next(4) as u32
                } else {
                    id
                };
                let other = 1 + rng.next(4) as u32;
                let n = rng.next(4);
                let host = format!("192.168.{id}.{}", 1 + n);
                let kind = match rng.next(12) {
                    0..=4 => entry(
                        &format!(
                            "10.{}.{}.{}",
                            if rng.next(10) == 0 { other } else { id },
                            n,
                            rng.next(40)
                        ),
                        ident(ident_cluster, 256 + rng.next(50) as u16),
                        &host,
                    ),
                    5 | 6 => EventKind::DeleteIpcache {
                        prefix: IpNet::from(ip(&format!("10.{id}.{n}.{}", rng.next(40)))),
                    },
                    7 => node(
                        c,
                        if rng.next(15) == 0 { other } else { id },
                        &format!("n{n}"),
                        &host,
                        &format!("10.{id}.{n}.0/24"),
                    ),
                    8 => EventKind::DeleteNode {
                        name: format!("n{n}"),
                    },
                    9 => config(c, if rng.next(6) == 0 { other } else { id }),
                    10 if rng.next(2) == 0 => identity(
                        ident(ident_cluster, 256 + rng.next(50) as u16),
                        &[
                            ("app", apps[rng.next(3) as usize]),
                            (NAMESPACE_LABEL, "default"),
                        ],
                    ),
                    10 => match rng.next(3) {
                        0 => EventKind::DeleteIdentity {
                            id: ident(ident_cluster, 256 + rng.next(50) as u16),
                        },
                        1 => EventKind::DeleteService {
                            namespace: "default".into(),
                            name: format!("s{}", rng.next(3)),
                        },
                        _ => random_service(
                            &format!("s{}", rng.next(3)),
                            id,
                            rng.next(5),
                            rng.next(3) != 0,
                            rng.next(3),
                        ),
                    },
                    _ => {
                        if rng.next(4) == 0 {
                            EventKind::ClusterRemoved
                        } else {
                            EventKind::Synced(ResourceKind::Ipcache)
                        }
                    }
                };
                batch.push(ClusterEvent::new(cn(c), kind));
            }
            let applied = apply_checked(&mut v, batch);
            model.apply_ops(&applied.ops);
            model.services.apply_ops(&applied.service_ops);
            check_model(&model, &v);
            seen_policy_and_service_ops.0 += applied
                .ops
                .iter()
                .filter(|op| op.phase() >= 2 && op.phase() <= 5)
                .count();
            seen_policy_and_service_ops.1 += applied.service_ops.len();
            seen_public_frontends += applied
                .service_ops
                .iter()
                .filter(|op| {
                    matches!(op, crate::services::ServiceOp::UpsertService { value, .. }
                        if value.exposure != crate::services::Exposure::Vip)
                })
                .count();
            seen.0 += applied.rejected.len();
            seen.1 += applied.pending.len();
            seen.2 += applied.refusals.len();
            seen.3 += applied.ops.len();
            check_desired_is_sound(&v);
        }
    }
    // The stream really went through rejections, pending entries, refusals and changes.
    assert!(
        seen.0 > 50 && seen.1 > 50 && seen.2 > 5 && seen.3 > 500,
        "{seen:?}"
    );
    assert!(
        seen_policy_and_service_ops.0 > 50 && seen_policy_and_service_ops.1 > 50,
        "{seen_policy_and_service_ops:?}"
    );
    assert!(
        seen_public_frontends > 20,
        "node port / external frontends written: {seen_public_frontends}"
    );
}

/// Whatever happened, the desired state only holds what the rules allow.
fn check_desired_is_sound(v: &MeshView) {
    let local_id = v.local().cluster_id;
    let local_ip = v.local().node_ip;
    for (prefix, t) in v.desired_ipcache() {
        if let Some(tunnel) = t.tunnel_endpoint {
            let node_cluster = v.desired_nodes().get(&tunnel).copied();
            assert!(
                node_cluster.is_some(),
                "{prefix} tunnels to unknown {tunnel}"
            );
            assert_eq!(
                t.identity.cluster_id(),
                node_cluster,
                "{prefix}: identity {} tunnels to a node of another cluster",
                t.identity
            );
        } else if t.identity.is_reserved() {
            assert!(prefix.prefix_len() == 32);
        } else if t.identity.is_local_scope() {
            // A prefix a policy names, outside every mesh entry.
            let IpNet::V4(v4) = prefix else {
                panic!("{prefix}: CIDR identity for an IPv6 prefix")
            };
            assert_eq!(
                v.policy_index.cidr_identity(v4),
                Some(t.identity),
                "{prefix}"
            );
            assert!(!t.local);
        } else {
            assert_eq!(t.identity.cluster_id(), Some(local_id), "{prefix}");
            assert!(t.local);
        }
    }
    for (node_ip, cluster_id) in v.desired_nodes() {
        assert_ne!(*node_ip, local_ip);
        let s = v
            .status()
            .into_iter()
            .find(|s| s.cluster_id == Some(*cluster_id))
            .expect("node of a known cluster");
        assert!(s.refused.is_none());
    }
    // Public frontends: node ports on this node's IP only; Local ones over this node's own
    // backends only (this cluster's, inside this node's pod CIDRs).
    let services = v.desired_services();
    for (f, value) in &services.services {
        match value.exposure {
            crate::services::Exposure::NodePort => assert_eq!(f.ip, local_ip, "{f:?}"),
            crate::services::Exposure::ExternalIp => assert_ne!(f.ip, local_ip, "{f:?}"),
            crate::services::Exposure::Vip => assert!(!value.local_only, "{f:?}"),
        }
        if value.local_only {
            for b in services.backends_of(f) {
                assert_eq!(b.cluster_id, local_id, "{f:?}: {b:?}");
                assert!(
                    v.local().pod_cidrs.iter().any(|c| c.contains(&b.ip)),
                    "{f:?}: {b:?} is not on this node"
                );
            }
        }
    }
}

/// Counts live heap bytes, so the measurement can say what the view holds (RSS would include
/// what the allocator keeps after freeing).
struct CountingAlloc;

static LIVE_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn live_bytes() -> usize {
    LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
#[ignore = "measurement: run with --release -- --ignored --nocapture"]
fn measure_initial_sync_of_100k_remote_entries() {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};
    let n_nodes = 100u32;
    let mut events = vec![ClusterEvent::new(cn("c2"), config("c2", 2))];
    for i in 0..n_nodes {
        events.push(ClusterEvent::new(
            cn("c2"),
            node(
                "c2",
                2,
                &format!("n{i}"),
                &format!("172.16.{}.{}", i / 250, 1 + i % 250),
                &format!("10.{}.{}.0/24", 100 + i / 256, i % 256),
            ),
        ));
    }
    for i in 0..100_000u32 {
        let node_i = i % n_nodes;
        let addr = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(11, 0, 0, 0)) + i);
        events.push(ClusterEvent::new(
            cn("c2"),
            entry(
                &addr.to_string(),
                ident(2, 256 + (i % 1000) as u16),
                &format!("172.16.{}.{}", node_i / 250, 1 + node_i % 250),
            ),
        ));
    }
    // The end of the list, as the agent's watcher announces it (the view compacts its stores).
    events.push(ClusterEvent::new(
        cn("c2"),
        EventKind::Synced(ResourceKind::Ipcache),
    ));
    // The same records in a plain ordered map: the least any in-memory index must do, measured
    // in the same process so the ratio holds on a loaded machine.
    let raw: Vec<IpcacheEntry> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::UpsertIpcache(entry) => Some(entry.clone()),
            _ => None,
        })
        .collect();
    let best_of =
        |runs: usize, f: &mut dyn FnMut() -> Duration| (0..runs).map(|_| f()).min().unwrap();
    let raw_time = best_of(5, &mut || {
        let records = raw.clone();
        let t = Instant::now();
        let mut map = BTreeMap::new();
        for r in records {
            map.insert(r.prefix, r);
        }
        let elapsed = t.elapsed();
        assert_eq!(map.len(), 100_000);
        elapsed
    });
    let mut last = None;
    let apply_time = best_of(5, &mut || {
        let mut fresh = MeshView::new(local());
        let batch = events.clone();
        let t = Instant::now();
        let applied = fresh.apply_batch(batch);
        let elapsed = t.elapsed();
        assert_eq!(applied.ops.len(), 100_200);
        last = Some(fresh);
        elapsed
    });
    let v = last.unwrap();
    let heap_before = live_bytes();
    drop(v);
    let view_heap = heap_before - live_bytes();
    let mut v = MeshView::new(local());
    v.apply_batch(events.clone());
    let t = Instant::now();
    let desired = v.desired();
    let desired_time = t.elapsed();
    let t = Instant::now();
    let ops = diff(&DesiredDatapath::default(), &desired);
    let diff_time = t.elapsed();
    let t = Instant::now();
    let again = diff(&desired, &desired);
    let noop_time = t.elapsed();
    // One endpoint at a time on top of 100k (the propagation path).
    let mut single = Vec::new();
    for i in 0..1000u32 {
        let addr = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(12, 0, 0, 0)) + i);
        let e = ClusterEvent::new(
            cn("c2"),
            entry(&addr.to_string(), ident(2, 300), "172.16.0.1"),
        );
        let t = Instant::now();
        let applied = v.apply(e);
        single.push(t.elapsed());
        assert_eq!(applied.ops.len(), 1);
    }
    single.sort();
    println!(
        "100k remote ipcache entries: apply_batch {apply_time:?} (plain BTreeMap insert of the same records {raw_time:?}, ratio {:.1}), \
         desired() {desired_time:?}, diff(empty -> desired) {diff_time:?} ({} ops), diff(x, x) {noop_time:?}; \
         single upsert on top: p50 {:?} p99 {:?} max {:?}; the view holds {} MB of heap ({} bytes per entry)",
        apply_time.as_secs_f64() / raw_time.as_secs_f64(),
        ops.len(),
        single[500],
        single[990],
        single[999],
        view_heap / 1_000_000,
        view_heap / 100_000,
    );
    assert!(again.is_empty());
}

#[test]
fn a_policy_cidr_over_pod_cidrs_is_accepted_with_a_warning() {
    let mut v = MeshView::new(local());
    let policy = |name: &str, cidr: &str| {
        NetworkPolicy::from_yaml(&format!(
            "apiVersion: meshd.io/v1\nkind: NetworkPolicy\nmetadata: {{ name: {name} }}\nspec:\n  endpointSelector: {{}}\n  egress:\n    - toCIDR: [ {cidr} ]\n"
        ))
        .unwrap()
    };
    v.update_policy(PolicyEvent::Upsert(policy("outside", "198.51.100.0/24")))
        .unwrap();
    assert!(v.policy_warnings().is_empty(), "{:?}", v.policy_warnings());
    let applied = v
        .update_policy(PolicyEvent::Upsert(policy("wide", "10.0.0.0/8")))
        .unwrap();
    assert!(
        applied.ops.iter().any(|op| matches!(op, DatapathOp::UpsertIpcache { prefix, .. } if prefix.to_string() == "10.0.0.0/8")),
        "the prefix enters the ipcache: {:?}",
        applied.ops
    );
    let warnings = v.policy_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(
            "CIDR 10.0.0.0/8 in policy default/wide overlaps the pod CIDRs of cluster c1"
        ),
        "{warnings:?}"
    );
    v.update_policy(PolicyEvent::Delete {
        namespace: "default".into(),
        name: "wide".into(),
    })
    .unwrap();
    assert!(v.policy_warnings().is_empty());
}
