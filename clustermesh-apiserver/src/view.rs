//! The leader's view of its cluster: applied services, the cluster's endpoints (ipcache entries
//! and identities) and the service records it published. Pure: events go in, the records that
//! should be published and the identities nobody uses come out. The I/O around it is in
//! `controller`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use meshd_kvstore::{EventKind, RawEvent};
use meshd_manifest::{Document, Service};
use meshd_state::{
    decode, ClusterName, IdentityKey, IdentityRecord, IpcacheEntry, Labels, NumericIdentity,
    Resource, ResourceKey, ServiceBackend, ServiceFrontend, ServiceKey, ServiceRecord,
    NAMESPACE_LABEL,
};

use crate::keys::{parse_object_key, SERVICES_CONFIG_PREFIX};

/// Namespace and name of a service.
pub type ServiceId = (String, String);

/// A service as applied, with the revision of its config key (guards the record writes).
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedService {
    pub service: Service,
    pub mod_revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownIdentity {
    pub labels: Labels,
    pub mod_revision: i64,
}

/// A write the leader should make to converge the published records.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordChange {
    /// Publish `record`, provided the service config is still at `config_revision`.
    Put {
        key: ServiceKey,
        record: ServiceRecord,
        config_revision: i64,
    },
    /// Remove a record whose service no longer exists (provided it still does not).
    Delete { key: ServiceKey },
}

#[derive(Debug, Clone)]
pub struct ClusterView {
    cluster: ClusterName,
    pub services: BTreeMap<ServiceId, AppliedService>,
    pub ipcache: BTreeMap<IpNet, IpcacheEntry>,
    pub identities: BTreeMap<NumericIdentity, KnownIdentity>,
    pub records: BTreeMap<ServiceId, ServiceRecord>,
}

impl ClusterView {
    pub fn new(cluster: ClusterName) -> Self {
        Self {
            cluster,
            services: BTreeMap::new(),
            ipcache: BTreeMap::new(),
            identities: BTreeMap::new(),
            records: BTreeMap::new(),
        }
    }

    pub fn cluster(&self) -> &ClusterName {
        &self.cluster
    }

    /// The prefixes the view is built from.
    pub fn prefixes(&self) -> [String; 4] {
        [
            SERVICES_CONFIG_PREFIX.to_owned(),
            IpcacheEntry::cluster_prefix(&self.cluster),
            IdentityRecord::cluster_prefix(&self.cluster),
            ServiceRecord::cluster_prefix(&self.cluster),
        ]
    }

    /// Applies one event (from a list, as a put, or from a watch). Keys of other prefixes are
    /// ignored; malformed values are logged and treated as absent, so one bad entry does not
    /// stop the cluster's services.
    pub fn apply(&mut self, event: &RawEvent) {
        let key = event.kv.key.as_str();
        let put = event.kind == EventKind::Put;
        let value = &event.kv.value;
        if key.starts_with(SERVICES_CONFIG_PREFIX) {
            let Some(object) = parse_object_key(key) else {
                return;
            };
            let id = (object.namespace, object.name);
            let parsed = put
                .then(|| {
                    let text = String::from_utf8_lossy(value);
                    meshd_manifest::parse_document(key, 1, &text)
                        .map_err(|e| tracing::warn!(error = %e, "ignoring stored service"))
                        .ok()
                })
                .flatten();
            match parsed {
                Some(Document::Service(service)) => {
                    self.services.insert(
                        id,
                        AppliedService {
                            service,
                            mod_revision: event.kv.mod_revision,
                        },
                    );
                }
                _ => {
                    self.services.remove(&id);
                }
            }
        } else if key.starts_with(&IpcacheEntry::cluster_prefix(&self.cluster)) {
            self.apply_typed::<IpcacheEntry>(event, |view, k, rec| match rec {
                Some(entry) => {
                    view.ipcache.insert(k.prefix, entry);
                }
                None => {
                    view.ipcache.remove(&k.prefix);
                }
            });
        } else if key.starts_with(&IdentityRecord::cluster_prefix(&self.cluster)) {
            let rev = event.kv.mod_revision;
            self.apply_typed::<IdentityRecord>(event, |view, k: IdentityKey, rec| match rec {
                Some(r) => {
                    view.identities.insert(
                        k.id,
                        KnownIdentity {
                            labels: r.labels,
                            mod_revision: rev,
                        },
                    );
                }
                None => {
                    view.identities.remove(&k.id);
                }
            });
        } else if key.starts_with(&ServiceRecord::cluster_prefix(&self.cluster)) {
            self.apply_typed::<ServiceRecord>(event, |view, k: ServiceKey, rec| {
                let id = (k.namespace, k.name);
                match rec {
                    Some(r) => {
                        view.records.insert(id, r);
                    }
                    None => {
                        view.records.remove(&id);
                    }
                }
            });
        }
    }

    fn apply_typed<R: Resource>(
        &mut self,
        event: &RawEvent,
        update: impl FnOnce(&mut Self, R::Key, Option<R>),
    ) {
        let key = event.kv.key.as_str();
        match event.kind {
            EventKind::Put => match decode::<R>(key, &event.kv.value) {
                Ok((k, r)) if k.cluster() == &self.cluster => update(self, k, Some(r)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring malformed entry");
                    if let Ok(k) = R::Key::parse(key) {
                        update(self, k, None);
                    }
                }
            },
            EventKind::Delete => {
                if let Ok(k) = R::Key::parse(key) {
                    update(self, k, None);
                }
            }
        }
    }

    /// The records that should be published, one per applied service.
    pub fn desired_records(&self) -> BTreeMap<ServiceId, ServiceRecord> {
        let endpoints = endpoints_by_identity(&self.ipcache);
        self.services
            .iter()
            .map(|(id, s)| {
                (
                    id.clone(),
                    compute_record(&s.service, &endpoints, &self.identities),
                )
            })
            .collect()
    }

    /// What to write so the published records equal the desired ones.
    pub fn record_changes(&self) -> Vec<RecordChange> {
        let desired = self.desired_records();
        let key = |(namespace, name): &ServiceId| ServiceKey {
            cluster: self.cluster.clone(),
            namespace: namespace.clone(),
            name: name.clone(),
        };
        let mut changes = Vec::new();
        for (id, record) in &desired {
            if self.records.get(id) != Some(record) {
                changes.push(RecordChange::Put {
                    key: key(id),
                    record: record.clone(),
                    config_revision: self.services[id].mod_revision,
                });
            }
        }
        for id in self.records.keys() {
            if !desired.contains_key(id) {
                changes.push(RecordChange::Delete { key: key(id) });
            }
        }
        changes
    }

    /// Identities some ipcache entry of the cluster refers to.
    pub fn identities_in_use(&self) -> BTreeSet<NumericIdentity> {
        self.ipcache.values().map(|e| e.identity).collect()
    }
}

/// The cluster's endpoints grouped by identity: services select by identity labels, so each
/// service checks every identity once instead of every endpoint.
pub type EndpointsByIdentity<'a> = BTreeMap<NumericIdentity, Vec<&'a IpcacheEntry>>;

/// Groups the endpoints (single-address entries; wider prefixes such as world or node CIDRs
/// are not endpoints) by identity.
pub fn endpoints_by_identity(ipcache: &BTreeMap<IpNet, IpcacheEntry>) -> EndpointsByIdentity<'_> {
    let mut by_id: EndpointsByIdentity<'_> = BTreeMap::new();
    for entry in ipcache.values() {
        if entry.prefix.prefix_len() == entry.prefix.max_prefix_len() {
            by_id.entry(entry.identity).or_default().push(entry);
        }
    }
    by_id
}

/// A service's record in this cluster: a frontend per port on the VIP (with the port's node
/// port, and the service's exposure outside the mesh), and a backend per port for every endpoint of the service's namespace whose identity labels include the selector.
/// An endpoint is ready when it is published: agents publish an endpoint once it is plumbed and
/// withdraw it (or its lease expires) when it goes away.
pub fn compute_record(
    service: &Service,
    endpoints: &EndpointsByIdentity<'_>,
    identities: &BTreeMap<NumericIdentity, KnownIdentity>,
) -> ServiceRecord {
    // Validated when applied; a stored service always has options and a VIP.
    let options = service.options().unwrap_or_default();
    let selector = &service.spec.selector;
    let mut frontends = Vec::new();
    if let Some(vip) = service.spec.cluster_ip {
        for p in &service.spec.ports {
            frontends.push(ServiceFrontend {
                ip: vip,
                port: p.port,
                protocol: p.protocol(),
                port_name: p.name().to_owned(),
                node_port: p.node_port,
            });
        }
    }
    let mut backends = Vec::new();
    for (id, entries) in endpoints {
        let Some(identity) = identities.get(id) else {
            continue;
        };
        let labels = &identity.labels;
        if !selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v.as_str()))
        {
            continue;
        }
        for entry in entries {
            // The namespace from the entry, else from the identity's labels. An endpoint that
            // names none is treated as belonging to every namespace rather than to none.
            let namespace = entry
                .namespace
                .as_deref()
                .or_else(|| labels.get(NAMESPACE_LABEL));
            if namespace.is_some_and(|ns| ns != service.namespace()) {
                continue;
            }
            for p in &service.spec.ports {
                backends.push(ServiceBackend {
                    ip: entry.prefix.addr(),
                    port: p.target_port(),
                    protocol: p.protocol(),
                    ready: true,
                    port_name: p.name().to_owned(),
                });
            }
        }
    }
    backends.sort_by(|a, b| {
        (&a.port_name, a.ip, a.port, a.protocol).cmp(&(&b.port_name, b.ip, b.port, b.protocol))
    });
    ServiceRecord {
        namespace: service.namespace().to_owned(),
        name: service.name().to_owned(),
        frontends,
        backends,
        global: options.global,
        shared: options.shared,
        affinity: options.affinity,
        service_type: service.spec.service_type(),
        external_ips: service.spec.external_ips.clone(),
        load_balancer_ip: service.spec.load_balancer_ip,
        external_traffic_policy: service.spec.external_traffic_policy(),
        health_check_node_port: service.spec.health_check_node_port,
    }
}

/// Tracks how long each identity has gone unused. An identity becomes garbage once no ipcache
/// entry has referred to it for the whole grace period, as observed by this leader: a new
/// leader starts every clock afresh, so a failover only ever delays collection.
#[derive(Debug, Default)]
pub struct IdentityGc {
    unused_since: BTreeMap<NumericIdentity, Instant>,
}

impl IdentityGc {
    /// Identities to delete now.
    pub fn collect(
        &mut self,
        now: Instant,
        grace: Duration,
        known: impl IntoIterator<Item = NumericIdentity>,
        in_use: &BTreeSet<NumericIdentity>,
    ) -> Vec<NumericIdentity> {
        let known: BTreeSet<NumericIdentity> = known.into_iter().collect();
        self.unused_since
            .retain(|id, _| known.contains(id) && !in_use.contains(id));
        let mut garbage = Vec::new();
        for id in known.difference(in_use) {
            let since = *self.unused_since.entry(*id).or_insert(now);
            if now.duration_since(since) >= grace {
                garbage.push(*id);
            }
        }
        garbage
    }

    /// Forgets an identity (deleted, or found in use again).
    pub fn forget(&mut self, id: NumericIdentity) {
        self.unused_since.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_kvstore::KeyValue;
    use meshd_state::{Affinity, ClusterId, Protocol, CLUSTER_LABEL};

    fn c1() -> ClusterName {
        ClusterName::new("c1").unwrap()
    }

    fn put(key: &str, value: &str, rev: i64) -> RawEvent {
        RawEvent {
            kind: EventKind::Put,
            kv: KeyValue {
                key: key.into(),
                value: value.as_bytes().to_vec(),
                mod_revision: rev,
                lease: 0,
            },
        }
    }

    fn del(key: &str) -> RawEvent {
        RawEvent {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: key.into(),
                value: vec![],
                mod_revision: 0,
                lease: 0,
            },
        }
    }

    fn id(local: u16) -> NumericIdentity {
        NumericIdentity::allocated(ClusterId::new(1).unwrap(), local).unwrap()
    }

    const ECHO: &str = r#"{"apiVersion":"meshd.io/v1","kind":"Service","metadata":{"name":"echo","namespace":"default","annotations":{"service.meshd.io/global":"true","service.meshd.io/affinity":"local"}},"spec":{"selector":{"app":"echo"},"ports":[{"name":"http","port":80,"targetPort":8080}],"clusterIP":"10.96.0.1"}}"#;

    fn endpoint(view: &mut ClusterView, ip: &str, identity: NumericIdentity, rev: i64) {
        view.apply(&put(
            &format!("meshd/state/ip/v1/c1/{ip}"),
            &format!(
                r#"{{"prefix":"{ip}/32","identity":{identity},"host_ip":"192.168.0.1","namespace":"default"}}"#
            ),
            rev,
        ));
    }

    fn identity(view: &mut ClusterView, identity: NumericIdentity, app: &str, rev: i64) {
        view.apply(&put(
            &format!("meshd/state/identities/v1/c1/id/{identity}"),
            &format!(
                r#"{{"labels":{{"app":"{app}","{CLUSTER_LABEL}":"c1","{NAMESPACE_LABEL}":"default"}}}}"#
            ),
            rev,
        ));
    }

    #[test]
    fn backends_follow_endpoints() {
        let mut view = ClusterView::new(c1());
        view.apply(&put("meshd/config/services/v1/default/echo", ECHO, 5));
        identity(&mut view, id(300), "echo", 6);
        identity(&mut view, id(301), "other", 7);
        endpoint(&mut view, "10.1.0.5", id(300), 8);
        endpoint(&mut view, "10.1.0.6", id(301), 9);
        endpoint(&mut view, "10.1.0.4", id(300), 10);

        let changes = view.record_changes();
        assert_eq!(changes.len(), 1);
        let RecordChange::Put {
            key,
            record,
            config_revision,
        } = &changes[0]
        else {
            panic!("{changes:?}")
        };
        assert_eq!(key.to_string(), "meshd/state/services/v1/c1/default/echo");
        assert_eq!(*config_revision, 5);
        assert!(record.global && record.shared && record.affinity == Affinity::Local);
        assert_eq!(record.frontends.len(), 1);
        assert_eq!(record.frontends[0].ip.to_string(), "10.96.0.1");
        assert_eq!(record.frontends[0].protocol, Protocol::Tcp);
        let backends: Vec<String> = record
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.ip, b.port))
            .collect();
        assert_eq!(backends, ["10.1.0.4:8080", "10.1.0.5:8080"]);

        // Once published (the watch echoes the write), nothing more to do.
        view.apply(&put(
            "meshd/state/services/v1/c1/default/echo",
            &serde_json::to_string(record).unwrap(),
            11,
        ));
        assert!(view.record_changes().is_empty());

        // An endpoint goes away: one backend left.
        view.apply(&del("meshd/state/ip/v1/c1/10.1.0.4"));
        let changes = view.record_changes();
        let RecordChange::Put { record, .. } = &changes[0] else {
            panic!()
        };
        assert_eq!(record.backends.len(), 1);

        // The service is deleted: its record goes too.
        view.apply(&del("meshd/config/services/v1/default/echo"));
        assert!(matches!(
            view.record_changes().as_slice(),
            [RecordChange::Delete { .. }]
        ));
    }

    #[test]
    fn other_namespaces_and_clusters_do_not_match() {
        let mut view = ClusterView::new(c1());
        view.apply(&put("meshd/config/services/v1/default/echo", ECHO, 5));
        identity(&mut view, id(300), "echo", 6);
        view.apply(&put(
            "meshd/state/ip/v1/c1/10.1.0.7",
            &format!(
                r#"{{"prefix":"10.1.0.7/32","identity":{},"host_ip":"192.168.0.1","namespace":"prod"}}"#,
                id(300)
            ),
            7,
        ));
        // Another cluster's keys are not ours (and would not be in our etcd anyway).
        view.apply(&put(
            "meshd/state/ip/v1/c2/10.2.0.7",
            &format!(
                r#"{{"prefix":"10.2.0.7/32","identity":{},"host_ip":"192.168.0.2"}}"#,
                id(300)
            ),
            8,
        ));
        let desired = view.desired_records();
        assert!(desired[&("default".into(), "echo".into())]
            .backends
            .is_empty());
    }

    #[test]
    fn gc_waits_for_the_grace_period() {
        let mut gc = IdentityGc::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let used: BTreeSet<_> = [id(300)].into();
        assert!(gc.collect(t0, grace, [id(300), id(301)], &used).is_empty());
        assert!(gc
            .collect(
                t0 + Duration::from_secs(9),
                grace,
                [id(300), id(301)],
                &used
            )
            .is_empty());
        // 301 was used again in between: its clock restarts.
        let both: BTreeSet<_> = [id(300), id(301)].into();
        gc.collect(
            t0 + Duration::from_secs(9),
            grace,
            [id(300), id(301)],
            &both,
        );
        assert!(gc
            .collect(
                t0 + Duration::from_secs(12),
                grace,
                [id(300), id(301)],
                &used
            )
            .is_empty());
        assert_eq!(
            gc.collect(
                t0 + Duration::from_secs(22),
                grace,
                [id(300), id(301)],
                &used
            ),
            vec![id(301)]
        );
    }

    #[test]
    fn records_carry_the_exposure() {
        use meshd_state::{ServiceType, TrafficPolicy};
        let mut view = ClusterView::new(c1());
        let lb = ECHO
            .replace(r#""clusterIP":"10.96.0.1""#, r#""clusterIP":"10.96.0.1","type":"LoadBalancer","externalIPs":["203.0.113.5"],"loadBalancerIP":"198.51.100.5","externalTrafficPolicy":"Local","healthCheckNodePort":32001"#)
            .replace(r#""targetPort":8080"#, r#""targetPort":8080,"nodePort":30080"#);
        view.apply(&put("meshd/config/services/v1/default/echo", &lb, 5));
        let record = &view.desired_records()[&("default".into(), "echo".into())];
        assert_eq!(record.service_type, ServiceType::LoadBalancer);
        assert_eq!(record.frontends[0].node_port, Some(30080));
        assert_eq!(
            record.external_ips,
            ["203.0.113.5".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(
            record.load_balancer_ip,
            Some("198.51.100.5".parse().unwrap())
        );
        assert_eq!(record.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(record.health_check_node_port, Some(32001));
        // A ClusterIP service's record is as before.
        view.apply(&put("meshd/config/services/v1/default/echo", ECHO, 6));
        let record = &view.desired_records()[&("default".into(), "echo".into())];
        let json = serde_json::to_string(record).unwrap();
        for absent in ["type", "node_port", "external", "load_balancer", "health"] {
            assert!(!json.contains(absent), "{absent} in {json}");
        }
    }
}
