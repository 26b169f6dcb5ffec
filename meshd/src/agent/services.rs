//! The SERVICES and BACKENDS part of the reconciler: reading the pinned maps back into
//! `meshd_mesh::DesiredServices` and applying `diff_services` operations, in their order (slots
//! before the count that covers them, the count lowered before slots go).

use std::net::IpAddr;

use meshd_datapath::{DatapathError, DatapathMaps, LbBackend, LbFrontend};
use meshd_mesh::{
    diff_services, Backend, BackendSlot, DesiredServices, Frontend, IpProto, ServiceOp,
};
use meshd_state::ClusterId;

/// The datapath balances IPv4 only: IPv6 frontends and backends stay in the view.
pub fn ipv4_services(d: &DesiredServices) -> DesiredServices {
    DesiredServices {
        services: d
            .services
            .iter()
            .filter(|(f, _)| f.ip.is_ipv4())
            .map(|(f, c)| (*f, *c))
            .collect(),
        backends: d
            .backends
            .iter()
            .filter(|(s, _)| s.frontend.ip.is_ipv4())
            .map(|(s, b)| (*s, *b))
            .collect(),
    }
}

fn lb_frontend(f: &Frontend) -> Option<LbFrontend> {
    match f.ip {
        IpAddr::V4(addr) => Some(LbFrontend {
            addr,
            port: f.port,
            proto: f.proto.number(),
        }),
        IpAddr::V6(_) => None,
    }
}

/// What the maps hold. Entries nothing could want (another protocol, cluster id 0) are deleted
/// right away.
pub fn read_back(maps: &mut DatapathMaps) -> Result<DesiredServices, DatapathError> {
    let mut actual = DesiredServices::default();
    for (f, count) in maps.services()? {
        match IpProto::from_number(f.proto) {
            Some(proto @ (IpProto::Tcp | IpProto::Udp)) => {
                let frontend = Frontend {
                    ip: IpAddr::V4(f.addr),
                    port: f.port,
                    proto,
                };
                actual.services.insert(frontend, count);
            }
            _ => maps.delete_service(f)?,
        }
    }
    for (f, slot, b) in maps.backends()? {
        let proto = IpProto::from_number(f.proto);
        let cluster_id = ClusterId::new(u32::from(b.cluster_id));
        match (proto, cluster_id) {
            (Some(proto @ (IpProto::Tcp | IpProto::Udp)), Ok(cluster_id)) => {
                let frontend = Frontend {
                    ip: IpAddr::V4(f.addr),
                    port: f.port,
                    proto,
                };
                actual.backends.insert(
                    BackendSlot { frontend, slot },
                    Backend {
                        cluster_id,
                        ip: IpAddr::V4(b.addr),
                        port: b.port,
                    },
                );
            }
            _ => maps.delete_backend(f, slot)?,
        }
    }
    Ok(actual)
}

fn apply(maps: &mut DatapathMaps, op: &ServiceOp) -> Result<(), DatapathError> {
    match *op {
        ServiceOp::UpsertBackend { slot, backend } => {
            let (Some(f), IpAddr::V4(addr)) = (lb_frontend(&slot.frontend), backend.ip) else {
                return Ok(());
            };
            maps.upsert_backend(
                f,
                slot.slot,
                LbBackend {
                    addr,
                    port: backend.port,
                    cluster_id: backend.cluster_id.get(),
                },
            )
        }
        ServiceOp::UpsertService { frontend, count } => match lb_frontend(&frontend) {
            Some(f) => maps.upsert_service(f, count),
            None => Ok(()),
        },
        ServiceOp::DeleteService { frontend } => match lb_frontend(&frontend) {
            Some(f) => maps.delete_service(f),
            None => Ok(()),
        },
        ServiceOp::DeleteBackend { slot } => match lb_frontend(&slot.frontend) {
            Some(f) => maps.delete_backend(f, slot.slot),
            None => Ok(()),
        },
    }
}

/// Outcome of one round over the service maps.
#[derive(Debug, Default)]
pub struct Round {
    pub applied: u64,
    pub failed: usize,
    pub first_error: Option<String>,
}

/// Drives the maps from `applied` (updated as writes succeed) to the IPv4 part of `desired`.
/// A failed write stops the round: later operations may depend on it (a count covering the
/// slot that failed), and the next round diffs again.
pub fn reconcile(
    maps: &mut DatapathMaps,
    applied: &mut DesiredServices,
    desired: &DesiredServices,
) -> Round {
    let mut round = Round::default();
    for op in diff_services(applied, &ipv4_services(desired)) {
        match apply(maps, &op) {
            Ok(()) => {
                applied.apply_ops(std::slice::from_ref(&op));
                round.applied += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, ?op, "service map write failed; will retry");
                round.failed += 1;
                round.first_error = Some(e.to_string());
                break;
            }
        }
    }
    round
}

#[cfg(test)]
mod tests {
    use meshd_state::{Affinity, ClusterName, Protocol, ServiceBackend, ServiceFrontend};

    use super::*;

    /// Real pinned maps: the desired services are written, read back equal, a change is one
    /// small diff, and IPv6 frontends are left out.
    #[test]
    fn service_maps_follow_the_desired_state() {
        if !(meshd_testing::require_root() && meshd_testing::require_bpffs()) {
            return;
        }
        let pin = meshd_datapath::bpffs::ScratchPinDir::new(
            std::path::Path::new("/sys/fs/bpf"),
            "meshd-agent-services",
        )
        .unwrap();
        let _datapath = meshd_datapath::Datapath::load(pin.path()).unwrap();
        let mut maps = DatapathMaps::open(pin.path()).unwrap();

        let c1 = ClusterName::new("c1").unwrap();
        let c2 = ClusterName::new("c2").unwrap();
        let record = |vip: &str, backends: &[&str]| meshd_state::ServiceRecord {
            namespace: "default".into(),
            name: "echo".into(),
            frontends: vec![ServiceFrontend {
                ip: vip.parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                port_name: "http".into(),
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
        };
        let desired = |local: &[&str], remote: &[&str]| {
            let (r1, r2, r6) = (
                record("10.96.0.10", local),
                record("10.97.0.10", remote),
                meshd_state::ServiceRecord {
                    name: "v6".into(),
                    ..record("fd00::10", &["fd00::5"])
                },
            );
            meshd_mesh::desired_services(
                &c1,
                [(&c1, 1, &r1), (&c2, 2, &r2), (&c1, 1, &r6)].map(|(c, id, r)| {
                    meshd_mesh::ClusterService {
                        cluster: c,
                        cluster_id: ClusterId::new(id).unwrap(),
                        record: r,
                    }
                }),
            )
        };

        let mut applied = read_back(&mut maps).unwrap();
        assert_eq!(applied, DesiredServices::default());
        let want = desired(&["10.1.0.5", "10.1.0.6"], &["10.2.0.5"]);
        let round = reconcile(&mut maps, &mut applied, &want);
        assert_eq!(round.failed, 0, "{:?}", round.first_error);
        assert_eq!(round.applied, 4, "three slots and a count");
        assert_eq!(read_back(&mut maps).unwrap(), ipv4_services(&want));
        assert_eq!(maps.services().unwrap().len(), 1, "no IPv6 frontend");

        // c1 loses a backend: the count goes down and one slot goes.
        let want = desired(&["10.1.0.5"], &["10.2.0.5"]);
        let round = reconcile(&mut maps, &mut applied, &want);
        assert_eq!(
            round.applied, 3,
            "slot 1 rewritten, count lowered, slot 2 deleted"
        );
        assert_eq!(read_back(&mut maps).unwrap(), ipv4_services(&want));
        assert_eq!(reconcile(&mut maps, &mut applied, &want).applied, 0);

        // Started over from what the maps hold (an agent restart): nothing to write.
        let mut fresh = read_back(&mut maps).unwrap();
        assert_eq!(reconcile(&mut maps, &mut fresh, &want).applied, 0);
        // Nothing wanted any more: everything goes.
        reconcile(&mut maps, &mut fresh, &DesiredServices::default());
        assert!(maps.services().unwrap().is_empty());
        assert!(maps.backends().unwrap().is_empty());
    }
}
