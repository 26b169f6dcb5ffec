//! Planning an apply or a delete: pure functions from the documents and a snapshot of what etcd
//! holds to one transaction (guards + writes). Executing the plan is `store::execute`; if any
//! guard fails (another replica or client changed something in between) the caller re-reads
//! and plans again, so every batch lands whole, on the state it was planned against.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use meshd_manifest::{
    Document, DocumentError, ManifestErrors, ObjectRef, Service, SourcedDocument,
};
use meshd_state::{ClusterName, FieldError, Protocol, ServiceKey};

use crate::keys::{node_port_key, object_key, vip_key, ServiceOwner};
use crate::node_ports::NodePortRange;
use crate::vip::ServiceCidr;

/// An object as stored in etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    /// `None` when the stored value no longer validates (written under older rules): still
    /// an object to guard against and to overwrite or delete.
    pub document: Option<Document>,
    pub json: Vec<u8>,
    pub mod_revision: i64,
}

/// What etcd holds that planning needs, read at one revision: the objects of the request,
/// every VIP and node port allocation, and (when the request gives external addresses) what
/// the cluster's nodes occupy.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub objects: BTreeMap<ObjectRef, StoredObject>,
    pub vips: BTreeMap<IpAddr, ServiceOwner>,
    pub node_ports: BTreeMap<u16, ServiceOwner>,
    pub nodes: ClusterNodes,
    pub revision: i64,
}

/// The addresses of the cluster's nodes, from their records in etcd: an external address may
/// be neither a node's IP nor inside a node's pod CIDR (packets to it would never reach a
/// service).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterNodes {
    /// Node IP -> node name.
    pub node_ips: BTreeMap<IpAddr, String>,
    /// Pod CIDR and the node it belongs to.
    pub pod_cidrs: Vec<(IpNet, String)>,
}

impl ClusterNodes {
    /// Why `ip` may not be an external address of this cluster, if it may not.
    fn conflict(&self, ip: IpAddr) -> Option<String> {
        if let Some(node) = self.node_ips.get(&ip) {
            return Some(format!(
                "{ip} is the IP of node {node} (its node ports serve that address)"
            ));
        }
        self.pod_cidrs
            .iter()
            .find(|(cidr, _)| cidr.contains(&ip))
            .map(|(cidr, node)| format!("{ip} is inside the pod CIDR {cidr} of node {node}"))
    }
}

/// Where a service's VIP and node ports come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ranges {
    pub cidr: ServiceCidr,
    pub node_ports: NodePortRange,
}

/// A condition of the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guard {
    /// The key does not exist.
    Absent(String),
    /// The key exists, last modified at this revision.
    Unchanged(String, i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put(String, Vec<u8>),
    Delete(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Created,
    Configured,
    Unchanged,
    Deleted,
    NotFound,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Created => "created",
            Action::Configured => "configured",
            Action::Unchanged => "unchanged",
            Action::Deleted => "deleted",
            Action::NotFound => "not found",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub object: ObjectRef,
    pub action: Action,
    pub vip: Option<IpAddr>,
    /// Services: the node ports held after an apply (the ports', then the health check's).
    pub node_ports: Vec<u16>,
}

/// One etcd transaction and what it does to each object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub guards: Vec<Guard>,
    pub writes: Vec<Write>,
    pub outcomes: Vec<Outcome>,
}

fn guard_for(key: String, stored: Option<&StoredObject>) -> Guard {
    match stored {
        Some(s) => Guard::Unchanged(key, s.mod_revision),
        None => Guard::Absent(key),
    }
}

fn err(d: &SourcedDocument, field: &str, reason: String) -> DocumentError {
    DocumentError::document(&d.file, d.index, field, reason)
        .with_object(d.document.object_ref().to_string())
}

/// Plans storing every document. Services get a VIP: the one they already have, the one they
/// ask for (`spec.clusterIP`, which must be free and inside the service CIDR), or the lowest
/// free one (scanning from `offset`, 0 for lowest-first). A VIP is immutable once given, as in
/// Kubernetes: clients and remote clusters may hold it. NodePort and LoadBalancer services get
/// node ports the same way (see [`assign_node_ports`]); external addresses are checked against
/// the cluster's nodes.
pub fn plan_apply(
    docs: &[SourcedDocument],
    snapshot: &Snapshot,
    ranges: &Ranges,
    offset: u128,
) -> Result<Plan, ManifestErrors> {
    meshd_manifest::check_unique(docs)?;
    let cidr = &ranges.cidr;
    let mut plan = Plan::default();
    let mut errors = Vec::new();
    // Addresses held by other services, plus those claimed earlier in this batch.
    let mut taken: BTreeSet<IpAddr> = snapshot.vips.keys().copied().collect();
    // The same for node ports.
    let mut ports = PortClaims {
        taken: snapshot.node_ports.keys().copied().collect(),
        range: ranges.node_ports,
        offset,
    };
    for d in docs {
        let object = d.document.object_ref();
        let key = object_key(&object);
        let stored = snapshot.objects.get(&object);
        let mut vip = None;
        let mut node_ports = Vec::new();
        let document = match &d.document {
            Document::Service(svc) => {
                let mut svc = svc.clone();
                let old = stored.and_then(|s| match &s.document {
                    Some(Document::Service(old)) => Some(old),
                    _ => None,
                });
                if let Err(e) = check_external_addresses(&svc, &snapshot.nodes, cidr) {
                    errors.push(err(d, &e.field, e.reason));
                    continue;
                }
                if let Err(e) =
                    assign_node_ports(&mut svc, old, &object, snapshot, &mut ports, &mut plan)
                {
                    errors.push(err(d, &e.field, e.reason));
                    continue;
                }
                let current = old.and_then(|old| old.spec.cluster_ip);
                let wanted = svc.spec.cluster_ip;
                let chosen = match (current, wanted) {
                    (Some(cur), Some(want)) if cur != want => {
                        errors.push(err(
                            d,
                            "spec.clusterIP",
                            format!(
                                "is immutable: the service has {cur}; delete and re-create it to \
                                 change its VIP"
                            ),
                        ));
                        continue;
                    }
                    (Some(cur), _) => cur,
                    (None, Some(want)) => {
                        let owner = snapshot.vips.get(&want);
                        let ours = owner.is_some_and(|o| o.is(&object));
                        if !cidr.is_assignable(want) {
                            errors.push(err(
                                d,
                                "spec.clusterIP",
                                format!(
                                    "{want} is not an assignable address of the service CIDR {}",
                                    cidr.net()
                                ),
                            ));
                            continue;
                        }
                        if !ours && taken.contains(&want) {
                            let holder = owner
                                .map(ToString::to_string)
                                .unwrap_or_else(|| "another service of this batch".into());
                            errors.push(err(
                                d,
                                "spec.clusterIP",
                                format!("{want} is already allocated to {holder}"),
                            ));
                            continue;
                        }
                        taken.insert(want);
                        if !ours {
                            plan.guards.push(Guard::Absent(vip_key(want)));
                            plan.writes
                                .push(Write::Put(vip_key(want), owner_json(&object)));
                        }
                        want
                    }
                    (None, None) => match cidr.allocate_from(&taken, offset) {
                        Some(ip) => {
                            taken.insert(ip);
                            plan.guards.push(Guard::Absent(vip_key(ip)));
                            plan.writes
                                .push(Write::Put(vip_key(ip), owner_json(&object)));
                            ip
                        }
                        None => {
                            errors.push(err(
                                d,
                                "spec.clusterIP",
                                format!("the service CIDR {} is exhausted", cidr.net()),
                            ));
                            continue;
                        }
                    },
                };
                svc.spec.cluster_ip = Some(chosen);
                vip = Some(chosen);
                node_ports = svc.node_ports().collect();
                Document::Service(svc)
            }
            other => other.clone(),
        };
        let json = document.to_json();
        plan.guards.push(guard_for(key.clone(), stored));
        let action = match stored {
            Some(s) if s.json == json => Action::Unchanged,
            Some(_) => Action::Configured,
            None => Action::Created,
        };
        if action != Action::Unchanged {
            plan.writes.push(Write::Put(key, json));
        }
        plan.outcomes.push(Outcome {
            object,
            action,
            vip,
            node_ports,
        });
    }
    if errors.is_empty() {
        Ok(plan)
    } else {
        Err(ManifestErrors(errors))
    }
}

/// External and load balancer addresses must not be the cluster's own: a node's IP, an
/// address of a pod CIDR, or one of the service CIDR (a VIP's frontend and an external one on
/// the same address and port would be one SERVICES entry, silently shared).
fn check_external_addresses(
    svc: &Service,
    nodes: &ClusterNodes,
    cidr: &ServiceCidr,
) -> Result<(), FieldError> {
    let spec = &svc.spec;
    let fields = spec
        .external_ips
        .iter()
        .enumerate()
        .map(|(i, ip)| (format!("spec.externalIPs[{i}]"), *ip))
        .chain(
            spec.load_balancer_ip
                .map(|ip| ("spec.loadBalancerIP".to_owned(), ip)),
        );
    for (at, ip) in fields {
        if let Some(reason) = nodes.conflict(ip) {
            return Err(FieldError::new(at, reason));
        }
        if cidr.net().contains(&ip) {
            return Err(FieldError::new(
                at,
                format!(
                    "{ip} is inside the service CIDR {} (where VIPs are allocated)",
                    cidr.net()
                ),
            ));
        }
    }
    Ok(())
}

/// Node ports claimed so far in a plan: those other services hold, plus those given earlier in
/// the batch.
struct PortClaims {
    taken: BTreeSet<u16>,
    range: NodePortRange,
    offset: u128,
}

/// One service's node ports while it is planned.
struct ServicePorts<'a> {
    object: &'a ObjectRef,
    snapshot: &'a Snapshot,
    /// Ports the service holds after the apply.
    held: BTreeSet<u16>,
}

impl ServicePorts<'_> {
    /// Whether the service already holds `port` (its allocation key names it).
    fn ours(&self, port: u16) -> bool {
        self.snapshot
            .node_ports
            .get(&port)
            .is_some_and(|o| o.is(self.object))
    }

    /// Takes `port` for the service: one it holds, or a free one of the range (a new
    /// allocation key, created only if still absent when the transaction runs).
    fn claim(
        &mut self,
        port: u16,
        at: &str,
        claims: &mut PortClaims,
        plan: &mut Plan,
    ) -> Result<(), FieldError> {
        if self.held.contains(&port) || self.ours(port) {
            self.held.insert(port);
            claims.taken.insert(port);
            return Ok(());
        }
        if !claims.range.contains(port) {
            return Err(FieldError::new(
                at,
                format!(
                    "{port} is outside the node port range {} of this cluster",
                    claims.range
                ),
            ));
        }
        if claims.taken.contains(&port) {
            let holder = self
                .snapshot
                .node_ports
                .get(&port)
                .map(ToString::to_string)
                .unwrap_or_else(|| "another service of this batch".into());
            return Err(FieldError::new(
                at,
                format!("{port} is already allocated to {holder}"),
            ));
        }
        claims.taken.insert(port);
        self.held.insert(port);
        plan.guards.push(Guard::Absent(node_port_key(port)));
        plan.writes
            .push(Write::Put(node_port_key(port), owner_json(self.object)));
        Ok(())
    }

    /// `kept` if the service still holds it, else a free port of the range.
    fn keep_or_allocate(
        &self,
        kept: Option<u16>,
        at: &str,
        claims: &PortClaims,
    ) -> Result<u16, FieldError> {
        if let Some(port) = kept.filter(|p| self.ours(*p)) {
            return Ok(port);
        }
        claims
            .range
            .allocate_from(&claims.taken, claims.offset)
            .ok_or_else(|| {
                FieldError::new(
                    at,
                    format!("the node port range {} is exhausted", claims.range),
                )
            })
    }
}

/// Gives a service the node ports its type asks for, in `spec.ports[].nodePort` and
/// `spec.healthCheckNodePort`, and frees those it no longer holds. A port keeps its node port
/// across re-applies that leave it out (as `clusterIP`); a given one must be in the range and
/// free, or already this service's. The allocation keys change in the plan's transaction, so
/// a port is never given twice and never leaks.
fn assign_node_ports(
    svc: &mut Service,
    old: Option<&Service>,
    object: &ObjectRef,
    snapshot: &Snapshot,
    claims: &mut PortClaims,
    plan: &mut Plan,
) -> Result<(), FieldError> {
    let mut ports = ServicePorts {
        object,
        snapshot,
        held: BTreeSet::new(),
    };
    // (node port, protocol) pairs given to the service's ports so far.
    let mut used: BTreeSet<(u16, Protocol)> = BTreeSet::new();
    let wants_health_check = svc.spec.wants_health_check_node_port();
    let health_check = "spec.healthCheckNodePort";
    // Given ports first, so a port left out is never allocated one given later.
    if svc.spec.service_type().has_node_ports() {
        for (i, p) in svc.spec.ports.iter().enumerate() {
            if let Some(port) = p.node_port {
                ports.claim(port, &format!("spec.ports[{i}].nodePort"), claims, plan)?;
                used.insert((port, p.protocol()));
            }
        }
    }
    let given_health_check = svc
        .spec
        .health_check_node_port
        .filter(|_| wants_health_check);
    if let Some(port) = given_health_check {
        ports.claim(port, health_check, claims, plan)?;
    }
    if svc.spec.service_type().has_node_ports() {
        for (i, p) in svc.spec.ports.iter_mut().enumerate() {
            if p.node_port.is_some() {
                continue;
            }
            let at = format!("spec.ports[{i}].nodePort");
            let kept = old
                .and_then(|old| {
                    old.spec
                        .ports
                        .iter()
                        .find(|o| o.port == p.port && o.protocol() == p.protocol())
                })
                .and_then(|o| o.node_port)
                .filter(|port| {
                    !used.contains(&(*port, p.protocol())) && Some(*port) != given_health_check
                });
            let port = ports.keep_or_allocate(kept, &at, claims)?;
            ports.claim(port, &at, claims, plan)?;
            used.insert((port, p.protocol()));
            p.node_port = Some(port);
        }
    }
    if wants_health_check && given_health_check.is_none() {
        let kept = old
            .and_then(|old| old.spec.health_check_node_port)
            .filter(|port| !used.iter().any(|(u, _)| u == port));
        let port = ports.keep_or_allocate(kept, health_check, claims)?;
        ports.claim(port, health_check, claims, plan)?;
        svc.spec.health_check_node_port = Some(port);
    }
    // Ports the service held and no longer does (a port removed, its type changed, a node
    // port changed) are freed in the same transaction.
    for (port, owner) in &snapshot.node_ports {
        if owner.is(object) && !ports.held.contains(port) {
            plan.writes.push(Write::Delete(node_port_key(*port)));
        }
    }
    Ok(())
}

fn owner_json(object: &ObjectRef) -> Vec<u8> {
    serde_json::to_vec(&ServiceOwner {
        namespace: object.namespace.clone(),
        name: object.name.clone(),
    })
    .expect("plain struct serialises")
}

/// Plans deleting objects. A service takes its VIP allocation and its published record with
/// it, in the same transaction, so no agent keeps a frontend of a deleted service.
pub fn plan_delete(objects: &[ObjectRef], snapshot: &Snapshot, cluster: &ClusterName) -> Plan {
    let mut plan = Plan::default();
    let mut seen = BTreeSet::new();
    for object in objects {
        if !seen.insert(object.clone()) {
            continue;
        }
        let key = object_key(object);
        let Some(stored) = snapshot.objects.get(object) else {
            plan.guards.push(Guard::Absent(key));
            plan.outcomes.push(Outcome {
                object: object.clone(),
                action: Action::NotFound,
                vip: None,
                node_ports: Vec::new(),
            });
            continue;
        };
        plan.guards.push(guard_for(key.clone(), Some(stored)));
        plan.writes.push(Write::Delete(key));
        let mut vip = None;
        if matches!(object.kind, meshd_manifest::Kind::Service) {
            // Every node port the service holds, as recorded by the allocation keys (even if
            // the stored manifest no longer validates).
            for (port, owner) in &snapshot.node_ports {
                if owner.is(object) {
                    plan.writes.push(Write::Delete(node_port_key(*port)));
                }
            }
        }
        if let Some(Document::Service(svc)) = &stored.document {
            vip = svc.spec.cluster_ip;
            if let Some(ip) = vip {
                let owned = snapshot.vips.get(&ip).is_some_and(|o| o.is(object));
                if owned {
                    plan.writes.push(Write::Delete(vip_key(ip)));
                }
            }
            plan.writes.push(Write::Delete(
                ServiceKey {
                    cluster: cluster.clone(),
                    namespace: object.namespace.clone(),
                    name: object.name.clone(),
                }
                .to_string(),
            ));
        }
        plan.outcomes.push(Outcome {
            object: object.clone(),
            action: Action::Deleted,
            vip,
            node_ports: Vec::new(),
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_manifest::Kind;

    fn docs(text: &str) -> Vec<SourcedDocument> {
        meshd_manifest::parse_str("t.yaml", text).unwrap()
    }

    fn svc(name: &str, extra: &str) -> String {
        format!(
            "apiVersion: meshd.io/v1\nkind: Service\nmetadata: {{ name: {name} }}\n\
             spec: {{ selector: {{ app: {name} }}, ports: [ {{ port: 80 }} ]{extra} }}\n---\n"
        )
    }

    fn ranges() -> Ranges {
        Ranges {
            cidr: ServiceCidr::new("10.96.0.0/24".parse().unwrap()).unwrap(),
            node_ports: "30000-30002".parse().unwrap(),
        }
    }

    /// Applies a plan to a snapshot as etcd would.
    fn commit(snapshot: &mut Snapshot, plan: &Plan) {
        snapshot.revision += 1;
        for w in &plan.writes {
            match w {
                Write::Put(k, v) => {
                    if let Some(ip) = crate::keys::parse_vip_key(k) {
                        snapshot.vips.insert(ip, serde_json::from_slice(v).unwrap());
                    } else if let Some(port) = crate::keys::parse_node_port_key(k) {
                        snapshot
                            .node_ports
                            .insert(port, serde_json::from_slice(v).unwrap());
                    } else if let Some(r) = crate::keys::parse_object_key(k) {
                        let text = String::from_utf8(v.clone()).unwrap();
                        let document = meshd_manifest::parse_document(k, 1, &text).unwrap();
                        snapshot.objects.insert(
                            r,
                            StoredObject {
                                document: Some(document),
                                json: v.clone(),
                                mod_revision: snapshot.revision,
                            },
                        );
                    }
                }
                Write::Delete(k) => {
                    if let Some(ip) = crate::keys::parse_vip_key(k) {
                        snapshot.vips.remove(&ip);
                    } else if let Some(port) = crate::keys::parse_node_port_key(k) {
                        snapshot.node_ports.remove(&port);
                    } else if let Some(r) = crate::keys::parse_object_key(k) {
                        snapshot.objects.remove(&r);
                    }
                }
            }
        }
    }

    #[test]
    fn vips_are_allocated_once_and_kept() {
        let mut snap = Snapshot::default();
        let batch = docs(&(svc("a", "") + &svc("b", "") + &svc("c", ", clusterIP: 10.96.0.1")));
        let err = plan_apply(&batch, &snap, &ranges(), 0).unwrap_err();
        // c asks for the address a was just given in the same batch.
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].field, "spec.clusterIP");

        let batch = docs(&(svc("c", ", clusterIP: 10.96.0.1") + &svc("a", "") + &svc("b", "")));
        let plan = plan_apply(&batch, &snap, &ranges(), 0).unwrap();
        let vips: Vec<String> = plan
            .outcomes
            .iter()
            .map(|o| o.vip.unwrap().to_string())
            .collect();
        assert_eq!(vips, ["10.96.0.1", "10.96.0.2", "10.96.0.3"]);
        assert!(plan.outcomes.iter().all(|o| o.action == Action::Created));
        commit(&mut snap, &plan);

        // Re-applying without clusterIP keeps the VIPs and changes nothing.
        let again = plan_apply(&docs(&svc("a", "")), &snap, &ranges(), 0).unwrap();
        assert_eq!(again.outcomes[0].vip.unwrap().to_string(), "10.96.0.2");
        assert_eq!(again.outcomes[0].action, Action::Unchanged);
        assert!(again.writes.is_empty());

        // Changing the VIP is refused; taking another service's VIP is refused.
        let e = plan_apply(
            &docs(&svc("a", ", clusterIP: 10.96.0.9")),
            &snap,
            &ranges(),
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("immutable"), "{e}");
        let e = plan_apply(
            &docs(&svc("d", ", clusterIP: 10.96.0.3")),
            &snap,
            &ranges(),
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("Service default/b"), "{e}");
        let e = plan_apply(
            &docs(&svc("d", ", clusterIP: 10.1.0.3")),
            &snap,
            &ranges(),
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("service CIDR"), "{e}");

        // Deleting releases the VIP and the published record; the address is reused.
        let cluster = ClusterName::new("c1").unwrap();
        let del = plan_delete(&[batch[1].document.object_ref()], &snap, &cluster);
        assert!(del.writes.contains(&Write::Delete(
            "meshd/state/services/v1/c1/default/a".into()
        )));
        assert!(del.writes.contains(&Write::Delete(
            "meshd/config/service-ips/v1/10.96.0.2".into()
        )));
        commit(&mut snap, &del);
        let p = plan_apply(&docs(&svc("e", "")), &snap, &ranges(), 0).unwrap();
        assert_eq!(p.outcomes[0].vip.unwrap().to_string(), "10.96.0.2");
    }

    #[test]
    fn guards_cover_every_object_and_new_vip() {
        let snap = Snapshot::default();
        let plan = plan_apply(&docs(&svc("a", "")), &snap, &ranges(), 0).unwrap();
        assert_eq!(
            plan.guards,
            vec![
                Guard::Absent("meshd/config/service-ips/v1/10.96.0.1".into()),
                Guard::Absent("meshd/config/services/v1/default/a".into()),
            ]
        );
        let missing = ObjectRef {
            kind: Kind::NetworkPolicy,
            namespace: "default".into(),
            name: "x".into(),
        };
        let del = plan_delete(&[missing], &snap, &ClusterName::new("c1").unwrap());
        assert_eq!(del.outcomes[0].action, Action::NotFound);
        assert!(del.writes.is_empty());
    }

    fn node_ports_of(plan: &Plan, name: &str) -> Vec<u16> {
        let i = plan
            .outcomes
            .iter()
            .position(|o| o.object.name == name)
            .unwrap();
        let Write::Put(_, json) = plan
            .writes
            .iter()
            .find(|w| matches!(w, Write::Put(k, _) if k.ends_with(&format!("/default/{name}"))))
            .unwrap_or_else(|| panic!("{name} ({:?}) is written", plan.outcomes[i]))
        else {
            unreachable!()
        };
        let Document::Service(svc) =
            meshd_manifest::parse_document("t", 1, std::str::from_utf8(json).unwrap()).unwrap()
        else {
            panic!()
        };
        svc.node_ports().collect()
    }

    fn owners(snap: &Snapshot) -> Vec<(u16, String)> {
        snap.node_ports
            .iter()
            .map(|(p, o)| (*p, o.name.clone()))
            .collect()
    }

    #[test]
    fn node_ports_are_allocated_unique_kept_and_freed() {
        let mut snap = Snapshot::default();
        let np = |name: &str, extra: &str| svc(name, &format!(", type: NodePort{extra}"));
        // a asks for 30001; b gets the lowest free one, 30000.
        let batch = docs(
            &(np("a", "").replace("{ port: 80 }", "{ port: 80, nodePort: 30001 }") + &np("b", "")),
        );
        let plan = plan_apply(&batch, &snap, &ranges(), 0).unwrap();
        assert_eq!(node_ports_of(&plan, "a"), [30001]);
        assert_eq!(node_ports_of(&plan, "b"), [30000]);
        assert!(plan
            .guards
            .contains(&Guard::Absent("meshd/config/node-ports/v1/30001".into())));
        commit(&mut snap, &plan);
        assert_eq!(
            owners(&snap),
            [(30000, "b".to_owned()), (30001, "a".to_owned())]
        );

        // Re-applying b as it was written (no nodePort) keeps its port and writes nothing.
        let again = plan_apply(&docs(&np("b", "")), &snap, &ranges(), 0).unwrap();
        assert_eq!(again.outcomes[0].action, Action::Unchanged);
        assert!(again.writes.is_empty(), "{:?}", again.writes);

        // A taken port is refused, naming the holder; so is one outside the range; nothing is
        // planned for the rest of the batch.
        let take = |port: u16| {
            np("c", "").replace("{ port: 80 }", &format!("{{ port: 80, nodePort: {port} }}"))
        };
        let e = plan_apply(&docs(&(svc("d", "") + &take(30001))), &snap, &ranges(), 0).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].field, "spec.ports[0].nodePort");
        assert!(
            e.to_string()
                .contains("already allocated to Service default/a"),
            "{e}"
        );
        let e = plan_apply(&docs(&take(31000)), &snap, &ranges(), 0).unwrap_err();
        assert!(
            e.to_string()
                .contains("outside the node port range 30000-30002"),
            "{e}"
        );
        // Two services of one batch asking for the same port.
        let e = plan_apply(
            &docs(
                &(take(30002)
                    + &np("e", "").replace("{ port: 80 }", "{ port: 80, nodePort: 30002 }")),
            ),
            &snap,
            &ranges(),
            0,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("another service of this batch"),
            "{e}"
        );

        // c gets the last port; then the range is exhausted.
        let plan = plan_apply(&docs(&np("c", "")), &snap, &ranges(), 0).unwrap();
        assert_eq!(node_ports_of(&plan, "c"), [30002]);
        commit(&mut snap, &plan);
        let e = plan_apply(&docs(&np("e", "")), &snap, &ranges(), 0).unwrap_err();
        assert!(e.to_string().contains("exhausted"), "{e}");

        // b turns ClusterIP: its port is freed in the same plan, and e can have it.
        let plan = plan_apply(&docs(&svc("b", "")), &snap, &ranges(), 0).unwrap();
        assert!(plan
            .writes
            .contains(&Write::Delete("meshd/config/node-ports/v1/30000".into())));
        commit(&mut snap, &plan);
        let plan = plan_apply(&docs(&np("e", "")), &snap, &ranges(), 0).unwrap();
        assert_eq!(node_ports_of(&plan, "e"), [30000]);
        commit(&mut snap, &plan);

        // Deleting a frees its port with its objects.
        let del = plan_delete(
            &[docs(&np("a", ""))[0].document.object_ref()],
            &snap,
            &ClusterName::new("c1").unwrap(),
        );
        assert!(del
            .writes
            .contains(&Write::Delete("meshd/config/node-ports/v1/30001".into())));
        commit(&mut snap, &del);
        assert_eq!(
            owners(&snap),
            [(30000, "e".to_owned()), (30002, "c".to_owned())]
        );
    }

    #[test]
    fn health_check_node_port_and_changed_node_ports() {
        let mut snap = Snapshot::default();
        let lb = |extra: &str| {
            svc(
                "lb",
                &format!(", type: LoadBalancer, externalTrafficPolicy: Local{extra}"),
            )
        };
        let plan = plan_apply(&docs(&lb("")), &snap, &ranges(), 0).unwrap();
        assert_eq!(
            node_ports_of(&plan, "lb"),
            [30000, 30001],
            "port, then health check"
        );
        commit(&mut snap, &plan);
        // Back to Cluster policy: the health check port goes, the node port stays.
        let plan = plan_apply(
            &docs(&svc("lb", ", type: LoadBalancer")),
            &snap,
            &ranges(),
            0,
        )
        .unwrap();
        assert_eq!(node_ports_of(&plan, "lb"), [30000]);
        commit(&mut snap, &plan);
        assert_eq!(owners(&snap), [(30000, "lb".to_owned())]);
        // Moving the node port to a given one frees the old one.
        let moved = svc("lb", ", type: LoadBalancer")
            .replace("{ port: 80 }", "{ port: 80, nodePort: 30002 }");
        let plan = plan_apply(&docs(&moved), &snap, &ranges(), 0).unwrap();
        commit(&mut snap, &plan);
        assert_eq!(owners(&snap), [(30002, "lb".to_owned())]);
        // A given health check port is claimed before ports are allocated: the port left out
        // gets another one.
        let fresh = Snapshot::default();
        let plan = plan_apply(
            &docs(&lb(", healthCheckNodePort: 30000")),
            &fresh,
            &ranges(),
            0,
        )
        .unwrap();
        assert_eq!(node_ports_of(&plan, "lb"), [30001, 30000]);
    }

    #[test]
    fn external_addresses_may_not_be_the_clusters_own() {
        let mut snap = Snapshot::default();
        snap.nodes
            .node_ips
            .insert("192.168.1.1".parse().unwrap(), "n1".into());
        snap.nodes
            .pod_cidrs
            .push(("10.1.1.0/24".parse().unwrap(), "n1".into()));
        let with = |extra: &str| docs(&svc("x", &format!(", type: LoadBalancer{extra}")));
        for (extra, field, reason) in [
            (
                ", externalIPs: [ 203.0.113.1, 192.168.1.1 ]",
                "spec.externalIPs[1]",
                "the IP of node n1",
            ),
            (
                ", loadBalancerIP: 10.1.1.9",
                "spec.loadBalancerIP",
                "inside the pod CIDR 10.1.1.0/24 of node n1",
            ),
            // Another service's VIP, or one it may get.
            (
                ", externalIPs: [ 10.96.0.1 ]",
                "spec.externalIPs[0]",
                "inside the service CIDR 10.96.0.0/24",
            ),
        ] {
            let e = plan_apply(&with(extra), &snap, &ranges(), 0).unwrap_err();
            assert_eq!(e.0[0].field, field, "{e}");
            assert!(e.to_string().contains(reason), "{e}");
        }
        assert!(plan_apply(
            &with(", externalIPs: [ 203.0.113.1 ], loadBalancerIP: 198.51.100.1"),
            &snap,
            &ranges(),
            0
        )
        .is_ok());
    }
}
