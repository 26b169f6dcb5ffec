//! The typed seam: the view's operations applied to real pinned maps and the maps read back
//! in the view's shape.

mod common;

use common::can_run;
use meshd_datapath::{bpffs::ScratchPinDir, ipv4_only, Datapath, DatapathMaps};
use meshd_ebpf::abi;
use meshd_mesh::{
    diff, DatapathOp, DesiredDatapath, DesiredServices, Direction, IpProto, IpcacheTarget,
    PolicyKey, PolicyValue, Verdict,
};
use meshd_state::NumericIdentity;
use meshd_state::{
    Affinity, ClusterId, ClusterName, Protocol, ServiceBackend, ServiceFrontend, ServiceRecord,
};

/// Outcome of one round over the service maps.
#[derive(Debug, Default)]
struct Round {
    applied: u64,
    failed: usize,
    first_error: Option<String>,
}

/// Drives the maps from `applied` (updated as writes succeed) to the IPv4 part of `desired`
/// with the seam's typed operations, as the reconciler's full diff does.
fn reconcile(
    maps: &mut DatapathMaps,
    applied: &mut DesiredServices,
    desired: &DesiredServices,
) -> Round {
    let mut round = Round::default();
    let desired = DesiredDatapath {
        services: desired.clone(),
        ..DesiredDatapath::default()
    };
    for op in meshd_mesh::diff_services(applied, &ipv4_only(&desired).services) {
        match maps.apply_service(&op) {
            Ok(()) => {
                applied.apply_ops(std::slice::from_ref(&op));
                round.applied += 1;
            }
            Err(e) => {
                round.failed += 1;
                round.first_error = Some(e.to_string());
                break;
            }
        }
    }
    round
}

fn ipv4_services(d: &DesiredServices) -> DesiredServices {
    ipv4_only(&DesiredDatapath {
        services: d.clone(),
        ..DesiredDatapath::default()
    })
    .services
    .clone()
}

/// Real pinned maps: the desired services are written, read back equal, a change is one
/// small diff, and IPv6 frontends are left out.
#[test]
fn service_maps_follow_the_desired_state() {
    if !can_run() {
        return;
    }
    let pin =
        ScratchPinDir::new(std::path::Path::new("/sys/fs/bpf"), "meshd-agent-services").unwrap();
    let _datapath = Datapath::load(pin.path()).unwrap();
    let mut maps = DatapathMaps::open(pin.path()).unwrap();

    let c1 = ClusterName::new("c1").unwrap();
    let c2 = ClusterName::new("c2").unwrap();
    let record = |vip: &str, backends: &[&str]| ServiceRecord {
        namespace: "default".into(),
        name: "echo".into(),
        frontends: vec![ServiceFrontend {
            ip: vip.parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            port_name: "http".into(),
            node_port: None,
        }],
        backends: backends
            .iter()
            .map(|b| ServiceBackend {
                ip: b.parse().unwrap(),
                port: 8080,
                protocol: Protocol::Tcp,
                ready: true,
                port_name: "http".into(),
            })
            .collect(),
        global: true,
        shared: true,
        affinity: Affinity::None,
        service_type: Default::default(),
        external_ips: Vec::new(),
        load_balancer_ip: None,
        external_traffic_policy: Default::default(),
        health_check_node_port: None,
    };
    // r1 as a NodePort service with Local policy and an external IP.
    let public = |r: ServiceRecord| {
        let mut r = r;
        r.service_type = meshd_state::ServiceType::NodePort;
        r.external_traffic_policy = meshd_state::TrafficPolicy::Local;
        r.frontends[0].node_port = Some(30080);
        r.external_ips = vec!["203.0.113.10".parse().unwrap()];
        r
    };
    let node_cidrs = ["10.1.0.0/24".parse().unwrap()];
    let node = meshd_mesh::ServiceNode {
        cluster: &c1,
        node_ip: "192.168.1.1".parse().unwrap(),
        pod_cidrs: &node_cidrs,
    };
    let desired_with = |local: &[&str], remote: &[&str], exposed: bool| {
        let r1 = record("10.96.0.10", local);
        let (r1, r2, r6) = (
            if exposed { public(r1) } else { r1 },
            record("10.97.0.10", remote),
            ServiceRecord {
                name: "v6".into(),
                ..record("fd00::10", &["fd00::5"])
            },
        );
        meshd_mesh::desired_services(
            &node,
            [(&c1, 1, &r1), (&c2, 2, &r2), (&c1, 1, &r6)].map(|(c, id, r)| {
                meshd_mesh::ClusterService {
                    cluster: c,
                    cluster_id: ClusterId::new(id).unwrap(),
                    record: r,
                }
            }),
        )
    };

    let desired = |local: &[&str], remote: &[&str]| desired_with(local, remote, false);
    let mut applied = maps.read_back().unwrap().services;
    assert_eq!(applied, DesiredServices::default());
    let want = desired(&["10.1.0.5", "10.1.0.6"], &["10.2.0.5"]);
    let round = reconcile(&mut maps, &mut applied, &want);
    assert_eq!(round.failed, 0, "{:?}", round.first_error);
    assert_eq!(round.applied, 4, "three slots and a count");
    assert_eq!(maps.read_back().unwrap().services, ipv4_services(&want));
    assert_eq!(maps.services().unwrap().len(), 1, "no IPv6 frontend");

    // c1 loses a backend: the count goes down and one slot goes.
    let want = desired(&["10.1.0.5"], &["10.2.0.5"]);
    let round = reconcile(&mut maps, &mut applied, &want);
    assert_eq!(
        round.applied, 3,
        "slot 1 rewritten, count lowered, slot 2 deleted"
    );
    assert_eq!(maps.read_back().unwrap().services, ipv4_services(&want));
    assert_eq!(reconcile(&mut maps, &mut applied, &want).applied, 0);

    // Started over from what the maps hold (an agent restart): nothing to write.
    let mut fresh = maps.read_back().unwrap().services;
    assert_eq!(reconcile(&mut maps, &mut fresh, &want).applied, 0);

    // The service turns NodePort (Local policy) with an external IP: two more frontends,
    // flagged, over this node's backend only; their flags read back as written.
    let want = desired_with(&["10.1.0.5"], &["10.2.0.5"], true);
    let round = reconcile(&mut maps, &mut fresh, &want);
    assert_eq!(round.failed, 0, "{:?}", round.first_error);
    assert_eq!(round.applied, 4, "a slot and a count per new frontend");
    assert_eq!(maps.read_back().unwrap().services, ipv4_services(&want));
    let mut flags: Vec<(String, u32, u32)> = maps
        .services()
        .unwrap()
        .into_iter()
        .map(|(f, count, flags)| (format!("{}:{}", f.addr, f.port), count, flags))
        .collect();
    flags.sort();
    use meshd_ebpf::abi::{SERVICE_F_EXTERNAL_IP, SERVICE_F_LOCAL, SERVICE_F_NODE_PORT};
    assert_eq!(
        flags,
        [
            ("10.96.0.10:80".to_owned(), 2, 0),
            (
                "192.168.1.1:30080".to_owned(),
                1,
                SERVICE_F_NODE_PORT | SERVICE_F_LOCAL
            ),
            (
                "203.0.113.10:80".to_owned(),
                1,
                SERVICE_F_EXTERNAL_IP | SERVICE_F_LOCAL
            ),
        ]
    );
    assert_eq!(reconcile(&mut maps, &mut fresh, &want).applied, 0);

    // Nothing wanted any more: everything goes.
    reconcile(&mut maps, &mut fresh, &DesiredServices::default());
    assert!(maps.services().unwrap().is_empty());
    assert!(maps.backends().unwrap().is_empty());
}

/// The view's operations for ipcache (/32 and shorter prefixes, local and tunnelled), nodes,
/// policy (entries and markers) and NO_MASQ land in the maps, and the read-back is exactly the
/// desired shape again: a full diff against it is empty. Policy writes bump the policy revision,
/// deletes included; entries nothing could want are dropped by the read-back.
#[test]
fn operations_and_read_back_round_trip() {
    if !can_run() {
        return;
    }
    let pin = ScratchPinDir::new(std::path::Path::new("/sys/fs/bpf"), "meshd-dp-seam").unwrap();
    let _datapath = Datapath::load(pin.path()).unwrap();
    let mut maps = DatapathMaps::open(pin.path()).unwrap();
    let id = |n: u32| NumericIdentity::new(n).unwrap();
    let mut desired = DesiredDatapath::default();
    desired.ipcache.insert(
        "10.2.0.5/32".parse().unwrap(),
        IpcacheTarget {
            identity: id((2 << 16) | 300),
            tunnel_endpoint: Some("192.168.0.2".parse().unwrap()),
            local: false,
        },
    );
    desired.ipcache.insert(
        "10.1.7.0/24".parse().unwrap(),
        IpcacheTarget {
            identity: id((1 << 16) | 301),
            tunnel_endpoint: None,
            local: true,
        },
    );
    desired
        .nodes
        .insert("192.168.0.2".parse().unwrap(), ClusterId::new(2).unwrap());
    let subject = id((1 << 16) | 300);
    let key = PolicyKey {
        subject,
        peer: Some(id((2 << 16) | 300)),
        proto: Some(IpProto::Tcp),
        dport: Some(8080),
        direction: Direction::Ingress,
    };
    desired.policy.insert(
        key,
        PolicyValue {
            verdict: Verdict::Allow,
            cookie: 7,
        },
    );
    desired.policy_enabled.insert((subject, Direction::Ingress));
    desired.no_masquerade.insert("10.2.0.0/24".parse().unwrap());

    let ops = diff(&DesiredDatapath::default(), &desired);
    assert_eq!(ops.len(), 6);
    for op in &ops {
        maps.apply(op).unwrap();
    }
    let back = maps.read_back().unwrap();
    assert_eq!(back, desired);
    assert!(diff(&back, &desired).is_empty());

    let revision = maps.policy_revision().unwrap();
    maps.apply(&DatapathOp::DeletePolicy { key }).unwrap();
    assert!(
        maps.policy_revision().unwrap() != revision,
        "a policy delete must make the programs re-check connections"
    );
    // Deleting what is not there is fine (a retried batch).
    maps.apply(&DatapathOp::DeletePolicy { key }).unwrap();
    maps.apply(&DatapathOp::DeleteNode {
        ip: "192.168.0.9".parse().unwrap(),
    })
    .unwrap();

    // An entry no view could want (identity 0; the typed API cannot write one, so raw) is
    // an error to read and is removed by the read-back.
    {
        let path = pin
            .path()
            .join("maps")
            .join(meshd_ebpf::maps::IPCACHE_HOSTS);
        let map =
            aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(&path).unwrap()).unwrap();
        let mut hosts: aya::maps::HashMap<_, abi::IpcacheHostKey, abi::IpcacheValue> =
            aya::maps::HashMap::try_from(map).unwrap();
        let key = abi::IpcacheHostKey {
            addr: abi::ip_to_be("10.9.0.1".parse().unwrap()),
        };
        hosts.insert(key, abi::IpcacheValue::default(), 0).unwrap();
    }
    assert!(maps.ipcache_entry("10.9.0.1/32".parse().unwrap()).is_err());
    let back = maps.read_back().unwrap();
    assert_eq!(back.ipcache.len(), 2);
    assert!(maps
        .ipcache_entry("10.9.0.1/32".parse().unwrap())
        .unwrap()
        .is_none());
    assert!(back.policy.is_empty());
    assert_eq!(back.policy_enabled.len(), 1);
    // A remote cluster's pod CIDR leaves NO_MASQ with its cluster.
    maps.apply(&DatapathOp::DeleteNoMasquerade {
        prefix: "10.2.0.0/24".parse().unwrap(),
    })
    .unwrap();
    assert!(maps.read_back().unwrap().no_masquerade.is_empty());

    // IPv6 operations are accepted and write nothing.
    maps.apply(&DatapathOp::UpsertNode {
        ip: "fd00::2".parse().unwrap(),
        cluster_id: ClusterId::new(2).unwrap(),
    })
    .unwrap();
    assert_eq!(maps.read_back().unwrap().nodes.len(), 1);
}
