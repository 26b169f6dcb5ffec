//! Planning an apply or a delete: pure functions from the documents and a snapshot of what etcd
//! holds to one transaction (guards + writes). Executing the plan is `store::execute`; if any
//! guard fails (another replica or client changed something in between) the caller re-reads
//! and plans again, so every batch lands whole, on the state it was planned against.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use meshd_manifest::{Document, DocumentError, ManifestErrors, ObjectRef, SourcedDocument};
use meshd_state::{ClusterName, ServiceKey};

use crate::keys::{object_key, vip_key, VipOwner};
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

/// What etcd holds that planning needs, read at one revision: the objects of the request and
/// every VIP allocation.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub objects: BTreeMap<ObjectRef, StoredObject>,
    pub vips: BTreeMap<IpAddr, VipOwner>,
    pub revision: i64,
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
/// Kubernetes: clients and remote clusters may hold it.
pub fn plan_apply(
    docs: &[SourcedDocument],
    snapshot: &Snapshot,
    cidr: &ServiceCidr,
    offset: u128,
) -> Result<Plan, ManifestErrors> {
    meshd_manifest::check_unique(docs)?;
    let mut plan = Plan::default();
    let mut errors = Vec::new();
    // Addresses held by other services, plus those claimed earlier in this batch.
    let mut taken: BTreeSet<IpAddr> = snapshot.vips.keys().copied().collect();
    for d in docs {
        let object = d.document.object_ref();
        let key = object_key(&object);
        let stored = snapshot.objects.get(&object);
        let mut vip = None;
        let document = match &d.document {
            Document::Service(svc) => {
                let mut svc = svc.clone();
                let current = stored.and_then(|s| match &s.document {
                    Some(Document::Service(old)) => old.spec.cluster_ip,
                    _ => None,
                });
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
                        let ours = owner.is_some_and(|o| {
                            o.namespace == object.namespace && o.name == object.name
                        });
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
                                .map(|o| format!("Service {}/{}", o.namespace, o.name))
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
        });
    }
    if errors.is_empty() {
        Ok(plan)
    } else {
        Err(ManifestErrors(errors))
    }
}

fn owner_json(object: &ObjectRef) -> Vec<u8> {
    serde_json::to_vec(&VipOwner {
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
            });
            continue;
        };
        plan.guards.push(guard_for(key.clone(), Some(stored)));
        plan.writes.push(Write::Delete(key));
        let mut vip = None;
        if let Some(Document::Service(svc)) = &stored.document {
            vip = svc.spec.cluster_ip;
            if let Some(ip) = vip {
                let owned = snapshot
                    .vips
                    .get(&ip)
                    .is_some_and(|o| o.namespace == object.namespace && o.name == object.name);
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

    fn cidr() -> ServiceCidr {
        ServiceCidr::new("10.96.0.0/24".parse().unwrap()).unwrap()
    }

    /// Applies a plan to a snapshot as etcd would.
    fn commit(snapshot: &mut Snapshot, plan: &Plan) {
        snapshot.revision += 1;
        for w in &plan.writes {
            match w {
                Write::Put(k, v) => {
                    if let Some(ip) = crate::keys::parse_vip_key(k) {
                        snapshot.vips.insert(ip, serde_json::from_slice(v).unwrap());
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
        let err = plan_apply(&batch, &snap, &cidr(), 0).unwrap_err();
        // c asks for the address a was just given in the same batch.
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].field, "spec.clusterIP");

        let batch = docs(&(svc("c", ", clusterIP: 10.96.0.1") + &svc("a", "") + &svc("b", "")));
        let plan = plan_apply(&batch, &snap, &cidr(), 0).unwrap();
        let vips: Vec<String> = plan
            .outcomes
            .iter()
            .map(|o| o.vip.unwrap().to_string())
            .collect();
        assert_eq!(vips, ["10.96.0.1", "10.96.0.2", "10.96.0.3"]);
        assert!(plan.outcomes.iter().all(|o| o.action == Action::Created));
        commit(&mut snap, &plan);

        // Re-applying without clusterIP keeps the VIPs and changes nothing.
        let again = plan_apply(&docs(&svc("a", "")), &snap, &cidr(), 0).unwrap();
        assert_eq!(again.outcomes[0].vip.unwrap().to_string(), "10.96.0.2");
        assert_eq!(again.outcomes[0].action, Action::Unchanged);
        assert!(again.writes.is_empty());

        // Changing the VIP is refused; taking another service's VIP is refused.
        let e = plan_apply(
            &docs(&svc("a", ", clusterIP: 10.96.0.9")),
            &snap,
            &cidr(),
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("immutable"), "{e}");
        let e = plan_apply(
            &docs(&svc("d", ", clusterIP: 10.96.0.3")),
            &snap,
            &cidr(),
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("Service default/b"), "{e}");
        let e =
            plan_apply(&docs(&svc("d", ", clusterIP: 10.1.0.3")), &snap, &cidr(), 0).unwrap_err();
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
        let p = plan_apply(&docs(&svc("e", "")), &snap, &cidr(), 0).unwrap();
        assert_eq!(p.outcomes[0].vip.unwrap().to_string(), "10.96.0.2");
    }

    #[test]
    fn guards_cover_every_object_and_new_vip() {
        let snap = Snapshot::default();
        let plan = plan_apply(&docs(&svc("a", "")), &snap, &cidr(), 0).unwrap();
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
}
