//! This node's endpoints: one task owns them (the state file, the address allocator, the
//! program attachments) and serves add/delete/list requests from the API one at a time.
//!
//! Add: address from the pod CIDR -> identity (etcd transaction) -> record persisted -> netns
//! and veth -> from_endpoint attached -> ENDPOINTS entry in the maps (waits for the
//! reconciler) -> ipcache record published under the node's lease. Delete runs the same steps
//! backwards. Each step undoes the earlier ones when it fails, and the record is written
//! before any plumbing exists, so a crash leaves nothing the next start does not know about.
//! The record carries the phase (adding, deleting) until the request completes: a start after
//! a crash makes the plumbing of an interrupted add again from scratch (a half-made veth may
//! lack its address or routes, a half-made namespace may be a bare mount point) and finishes
//! an interrupted delete.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshd_api::pb;
use meshd_datapath::{plumbing, Datapath, LocalEndpoint};
use meshd_kvstore::{resolve_identity, EtcdStore};
use meshd_state::{
    check_dns_label, check_dns_subdomain, IpcacheEntry, IpcacheKey, Labels, CLUSTER_LABEL,
    NAMESPACE_LABEL,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::AgentConfig;

/// This node's lease-backed publisher (kvstore's).
pub type Publisher = meshd_kvstore::Publisher<meshd_kvstore::EtcdStore>;
use crate::now_ms;
use crate::reconciler::{LocalEndpoints, ReconcileStatus};
use crate::store::{EndpointRecord, EndpointStore, Phase};

/// Why a request failed, mapped to a gRPC status by the server.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("endpoint {0:?} not found")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<EndpointError> for tonic::Status {
    fn from(e: EndpointError) -> Self {
        match e {
            EndpointError::Invalid(m) => tonic::Status::invalid_argument(m),
            EndpointError::AlreadyExists(m) => tonic::Status::already_exists(m),
            EndpointError::NotFound(_) => tonic::Status::not_found(e.to_string()),
            EndpointError::Unavailable(m) => tonic::Status::unavailable(m),
            EndpointError::Internal(m) => tonic::Status::internal(m),
        }
    }
}

#[derive(Debug)]
enum Request {
    Add(
        pb::AddEndpointRequest,
        oneshot::Sender<Result<pb::Endpoint, EndpointError>>,
    ),
    Delete(String, oneshot::Sender<Result<pb::Endpoint, EndpointError>>),
    List(oneshot::Sender<Vec<pb::Endpoint>>),
}

/// Handle for the API server.
#[derive(Debug, Clone)]
pub struct Endpoints {
    tx: mpsc::Sender<Request>,
}

impl Endpoints {
    pub async fn add(&self, req: pb::AddEndpointRequest) -> Result<pb::Endpoint, EndpointError> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::Add(req, tx)).await?;
        rx.await.map_err(|_| stopped())?
    }

    pub async fn delete(&self, name: String) -> Result<pb::Endpoint, EndpointError> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::Delete(name, tx)).await?;
        rx.await.map_err(|_| stopped())?
    }

    pub async fn list(&self) -> Vec<pb::Endpoint> {
        let (tx, rx) = oneshot::channel();
        if self.send(Request::List(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    async fn send(&self, r: Request) -> Result<(), EndpointError> {
        self.tx.send(r).await.map_err(|_| stopped())
    }
}

/// What an add request asks for, checked: the endpoint's name, namespace and user labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddRequest {
    pub name: String,
    pub namespace: String,
    pub user_labels: Labels,
}

/// Checks an add request as it arrives over the API (any bytes a client sends). Pure.
pub fn check_add_request(req: &pb::AddEndpointRequest) -> Result<AddRequest, EndpointError> {
    let name = req.name.clone();
    check_dns_subdomain("name", &name).map_err(|e| EndpointError::Invalid(e.to_string()))?;
    if name.len() > 63 {
        return Err(EndpointError::Invalid(format!(
            "name {name:?} is longer than 63 characters"
        )));
    }
    let namespace = if req.namespace.is_empty() {
        "default".to_string()
    } else {
        req.namespace.clone()
    };
    check_dns_label("namespace", &namespace).map_err(|e| EndpointError::Invalid(e.to_string()))?;
    let user_labels: Labels = req.labels.clone().into_iter().collect();
    user_labels
        .validate("labels")
        .map_err(|e| EndpointError::Invalid(e.to_string()))?;
    for reserved in [CLUSTER_LABEL, NAMESPACE_LABEL] {
        if user_labels.get(reserved).is_some() {
            return Err(EndpointError::Invalid(format!(
                "label {reserved} is set by the agent (use --namespace for the namespace)"
            )));
        }
    }
    Ok(AddRequest {
        name,
        namespace,
        user_labels,
    })
}

fn stopped() -> EndpointError {
    EndpointError::Unavailable("the agent is shutting down".into())
}

/// Runtime facts of an endpoint, read from its links.
#[derive(Debug, Clone, Copy)]
struct Link {
    host_ifindex: u32,
    host_mac: [u8; 6],
    endpoint_mac: [u8; 6],
    mtu: u32,
}

pub struct EndpointManager {
    config: Arc<AgentConfig>,
    store: EndpointStore,
    datapath: Datapath,
    etcd: EtcdStore,
    publisher: Arc<Publisher>,
    links: BTreeMap<String, Link>,
    local: watch::Sender<Arc<LocalEndpoints>>,
    reconciled: watch::Receiver<ReconcileStatus>,
    underlay_mtu: u32,
}

const IDENTITY_TIMEOUT: Duration = Duration::from_secs(15);
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(15);

impl EndpointManager {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<AgentConfig>,
        store: EndpointStore,
        datapath: Datapath,
        etcd: EtcdStore,
        publisher: Arc<Publisher>,
        local: watch::Sender<Arc<LocalEndpoints>>,
        reconciled: watch::Receiver<ReconcileStatus>,
        underlay_mtu: u32,
    ) -> Self {
        Self {
            config,
            store,
            datapath,
            etcd,
            publisher,
            links: BTreeMap::new(),
            local,
            reconciled,
            underlay_mtu,
        }
    }

    /// Brings every endpoint of the state file back: plumbing checked (recreated only if it is
    /// gone, e.g. after a reboot), program attached, map entry, identity and ipcache record.
    pub async fn recover(&mut self) {
        let records: Vec<EndpointRecord> = self.store.endpoints().cloned().collect();
        for mut rec in records {
            if rec.phase == Phase::Deleting {
                tracing::warn!(endpoint = rec.name, ip = %rec.ip, "finishing a delete interrupted by a crash");
                self.finish_delete(&rec).await;
                continue;
            }
            // An interrupted add may have left a veth without its address or routes: what
            // exists of it is not trusted.
            let found = if rec.phase == Phase::Adding {
                Err("its add was interrupted".to_owned())
            } else {
                block(|| read_link(&rec))
            };
            let link = match found {
                Ok(link) => {
                    tracing::info!(endpoint = rec.name, ip = %rec.ip, "recovered endpoint");
                    link
                }
                Err(e) => {
                    tracing::warn!(endpoint = rec.name, error = %e, "endpoint plumbing missing; recreating it");
                    if rec.phase == Phase::Adding {
                        // Nothing runs in it yet (the add never answered), and it may be half
                        // made too: a crash between creating the mount point and binding the
                        // namespace to it leaves a file that is no namespace.
                        self.undo_plumbing(&rec);
                    } else {
                        let _ = block(|| plumbing::delete_endpoint(None, &rec.host_ifname));
                    }
                    match block(|| create_plumbing(&rec, self.underlay_mtu)) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(endpoint = rec.name, error = %e, "cannot recreate endpoint; leaving it out");
                            continue;
                        }
                    }
                }
            };
            if let Err(e) = self.datapath.attach_endpoint(&rec.host_ifname) {
                tracing::error!(endpoint = rec.name, error = %e, "cannot attach from_endpoint");
            }
            // The identity key may have been collected while we were away: make sure it is
            // there (the index gives back the same number).
            match tokio::time::timeout(
                IDENTITY_TIMEOUT,
                resolve_identity(
                    &self.etcd,
                    &self.config.cluster,
                    self.config.cluster_id,
                    &rec.labels,
                ),
            )
            .await
            {
                Ok(Ok(id)) if id != rec.identity => {
                    tracing::warn!(endpoint = rec.name, old = %rec.identity, new = %id, "identity changed");
                    rec.identity = id;
                    if let Err(e) = self.store.insert(rec.clone()) {
                        tracing::error!(error = %e, "cannot persist endpoint");
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(endpoint = rec.name, error = %e, "identity check failed; keeping the recorded one")
                }
                Err(_) => tracing::warn!(
                    endpoint = rec.name,
                    "identity check timed out; keeping the recorded one"
                ),
            }
            if rec.phase != Phase::Ready {
                rec.phase = Phase::Ready;
                if let Err(e) = self.store.insert(rec.clone()) {
                    tracing::error!(error = %e, "cannot persist endpoint");
                }
            }
            self.links.insert(rec.name.clone(), link);
            if let Err(e) = self.publish(&rec).await {
                tracing::warn!(endpoint = rec.name, error = %e, "ipcache record not published yet");
            }
        }
        let generation = self.sync_local();
        self.wait_reconciled(generation).await.ok();
    }

    pub fn spawn(self) -> Endpoints {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.run(rx));
        Endpoints { tx }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(req) = rx.recv().await {
            match req {
                Request::Add(r, reply) => {
                    let res = self.add(r).await;
                    if let Err(e) = &res {
                        tracing::warn!(error = %e, "endpoint add failed");
                    }
                    let _ = reply.send(res);
                }
                Request::Delete(name, reply) => {
                    let _ = reply.send(self.delete(&name).await);
                }
                Request::List(reply) => {
                    let _ = reply.send(self.store.endpoints().map(|r| self.describe(r)).collect());
                }
            }
        }
    }

    fn describe(&self, r: &EndpointRecord) -> pb::Endpoint {
        let link = self.links.get(&r.name);
        pb::Endpoint {
            name: r.name.clone(),
            namespace: r.namespace.clone(),
            labels: r
                .labels
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ip: r.ip.to_string(),
            identity: r.identity.get(),
            netns: format!("/run/netns/{}", r.netns),
            host_ifname: r.host_ifname.clone(),
            host_ifindex: link.map(|l| l.host_ifindex).unwrap_or(0),
            mac: link
                .map(|l| plumbing::format_mac(l.endpoint_mac))
                .unwrap_or_default(),
            mtu: link.map(|l| l.mtu).unwrap_or(0),
            created_ms: r.created_ms,
        }
    }

    fn host_ifname(&self, name: &str) -> String {
        // Interface names are at most 15 bytes; endpoint names are longer. A stable hash keeps
        // the name the same for the same endpoint; collisions take the next salt.
        (0u32..)
            .map(|salt| format!("lxc{:08x}", fnv1a(name.as_bytes(), salt)))
            .find(|n| !self.store.host_ifname_in_use(n))
            .expect("some salt is free")
    }

    async fn add(&mut self, req: pb::AddEndpointRequest) -> Result<pb::Endpoint, EndpointError> {
        let AddRequest {
            name,
            namespace,
            user_labels,
        } = check_add_request(&req)?;
        if let Some(existing) = self.store.get(&name) {
            if existing.user_labels == user_labels && existing.namespace == namespace {
                return Ok(self.describe(existing));
            }
            return Err(EndpointError::AlreadyExists(format!(
                "endpoint {name:?} exists with labels {} in namespace {}",
                existing.user_labels, existing.namespace
            )));
        }
        let mut labels = user_labels.clone();
        labels.insert(NAMESPACE_LABEL, namespace.clone());
        labels.insert(CLUSTER_LABEL, self.config.cluster.as_str());

        let ip = self
            .store
            .allocate_ip(&name)
            .map_err(|e| EndpointError::Unavailable(e.to_string()))?;
        let identity = match tokio::time::timeout(
            IDENTITY_TIMEOUT,
            resolve_identity(
                &self.etcd,
                &self.config.cluster,
                self.config.cluster_id,
                &labels,
            ),
        )
        .await
        {
            Ok(Ok(id)) => id,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!(
                        "identity of {labels}: etcd did not answer within {IDENTITY_TIMEOUT:?}"
                    ),
                };
                // Without etcd a label set already in use on this node still has a known
                // number: the endpoint starts, and its ipcache record is published once etcd
                // answers (the publisher keeps it). A new label set has to wait for etcd.
                match self.store.identity_of(&labels) {
                    Some(id) => {
                        tracing::warn!(endpoint = name, identity = %id, error = %why, "etcd unavailable: using the identity of an endpoint with the same labels on this node");
                        id
                    }
                    None => {
                        self.store.release_ip(ip);
                        return Err(EndpointError::Unavailable(format!(
                            "{why} (no endpoint on this node has these labels, so their identity cannot be known without etcd)"
                        )));
                    }
                }
            }
        };
        let rec = EndpointRecord {
            netns: format!("{}{name}", self.config.endpoint_netns_prefix),
            host_ifname: self.host_ifname(&name),
            name: name.clone(),
            namespace,
            user_labels,
            labels,
            identity,
            ip,
            created_ms: now_ms(),
            phase: Phase::Adding,
        };
        self.store
            .insert(rec.clone())
            .map_err(|e| EndpointError::Internal(e.to_string()))?;

        let link = match block(|| create_plumbing(&rec, self.underlay_mtu)) {
            Ok(l) => l,
            Err(e) => {
                self.undo_plumbing(&rec);
                let _ = self.store.remove(&name);
                return Err(EndpointError::Internal(e));
            }
        };
        if let Err(e) = self.datapath.attach_endpoint(&rec.host_ifname) {
            self.undo_plumbing(&rec);
            let _ = self.store.remove(&name);
            return Err(EndpointError::Internal(e.to_string()));
        }
        self.links.insert(name.clone(), link);
        let generation = self.sync_local();
        if let Err(e) = self.wait_reconciled(generation).await {
            tracing::warn!(endpoint = name, error = %e, "endpoint not in the maps yet");
        }
        let rec = EndpointRecord {
            phase: Phase::Ready,
            ..rec
        };
        self.store
            .insert(rec.clone())
            .map_err(|e| EndpointError::Internal(e.to_string()))?;
        if let Err(e) = self.publish(&rec).await {
            // Kept by the publisher and written once etcd answers.
            tracing::warn!(endpoint = name, error = %e, "ipcache record not published yet");
        }
        tracing::info!(endpoint = name, ip = %ip, identity = %identity, netns = rec.netns, "endpoint added");
        Ok(self.describe(&rec))
    }

    async fn delete(&mut self, name: &str) -> Result<pb::Endpoint, EndpointError> {
        let rec = self
            .store
            .get(name)
            .cloned()
            .ok_or_else(|| EndpointError::NotFound(name.to_owned()))?;
        let described = self.describe(&rec);
        if rec.phase != Phase::Deleting {
            self.store
                .insert(EndpointRecord {
                    phase: Phase::Deleting,
                    ..rec.clone()
                })
                .map_err(|e| EndpointError::Internal(e.to_string()))?;
        }
        let key = IpcacheKey::host(self.config.cluster.clone(), rec.ip.into());
        if let Err(e) = self.publisher.delete::<IpcacheEntry>(&key).await {
            tracing::warn!(endpoint = name, error = %e, "ipcache record not deleted yet; retrying");
        }
        self.links.remove(name);
        // Forget it before the maps: the reconciler then removes its ENDPOINTS entry.
        let ip = rec.ip;
        let mut remaining: BTreeMap<Ipv4Addr, LocalEndpoint> =
            self.local.borrow().endpoints.clone();
        remaining.remove(&ip);
        let generation = self.local.borrow().generation + 1;
        self.local.send_replace(Arc::new(LocalEndpoints {
            generation,
            endpoints: remaining,
        }));
        let _ = self.wait_reconciled(generation).await;
        if let Err(e) = self.datapath.detach_endpoint(&rec.host_ifname) {
            tracing::warn!(endpoint = name, error = %e, "detaching from_endpoint failed");
        }
        self.undo_plumbing(&rec);
        self.store
            .remove(name)
            .map_err(|e| EndpointError::Internal(e.to_string()))?;
        self.sync_local();
        tracing::info!(endpoint = name, ip = %ip, "endpoint deleted");
        Ok(described)
    }

    /// The rest of a delete a crash interrupted, at start (before the reconciler is given the
    /// endpoint set, so its map entry goes with the first diff): the ipcache record (published
    /// under the dead agent's lease, which may not have expired yet), the program, the plumbing
    /// and finally the record with its address.
    async fn finish_delete(&mut self, rec: &EndpointRecord) {
        let key = IpcacheKey::host(self.config.cluster.clone(), rec.ip.into());
        if let Err(e) = self.publisher.delete::<IpcacheEntry>(&key).await {
            tracing::warn!(endpoint = rec.name, error = %e, "ipcache record not deleted yet; retrying");
        }
        if let Err(e) = self.datapath.detach_endpoint(&rec.host_ifname) {
            tracing::debug!(endpoint = rec.name, error = %e, "detaching from_endpoint failed");
        }
        self.undo_plumbing(rec);
        if let Err(e) = self.store.remove(&rec.name) {
            tracing::error!(endpoint = rec.name, error = %e, "cannot persist the delete");
        }
        tracing::info!(endpoint = rec.name, ip = %rec.ip, "endpoint deleted");
    }

    fn undo_plumbing(&self, rec: &EndpointRecord) {
        if let Err(e) = block(|| plumbing::delete_endpoint(None, &rec.host_ifname)) {
            tracing::warn!(endpoint = rec.name, error = %e, "deleting veth failed");
        }
        if let Err(e) = block(|| plumbing::delete_netns(&rec.netns)) {
            tracing::warn!(endpoint = rec.name, error = %e, "deleting netns failed");
        }
    }

    async fn publish(&self, rec: &EndpointRecord) -> Result<(), meshd_kvstore::KvError> {
        let key = IpcacheKey::host(self.config.cluster.clone(), rec.ip.into());
        let entry = IpcacheEntry {
            prefix: key.prefix,
            identity: rec.identity,
            host_ip: self.config.node_ip.into(),
            endpoint: Some(rec.name.clone()),
            namespace: Some(rec.namespace.clone()),
        };
        self.publisher.publish(&key, &entry).await
    }

    /// Sends the current endpoint set to the reconciler; returns its generation.
    fn sync_local(&self) -> u64 {
        let endpoints: BTreeMap<Ipv4Addr, LocalEndpoint> = self
            .store
            .endpoints()
            .filter_map(|r| {
                self.links.get(&r.name).map(|l| {
                    (
                        r.ip,
                        LocalEndpoint {
                            ifindex: l.host_ifindex,
                            identity: r.identity.get(),
                            mac: l.endpoint_mac,
                            node_mac: l.host_mac,
                        },
                    )
                })
            })
            .collect();
        let generation = self.local.borrow().generation + 1;
        self.local.send_replace(Arc::new(LocalEndpoints {
            generation,
            endpoints,
        }));
        generation
    }

    async fn wait_reconciled(&self, generation: u64) -> Result<(), String> {
        let mut rx = self.reconciled.clone();
        let wait = async {
            rx.wait_for(|s| s.endpoints_generation >= generation)
                .await
                .map(|_| ())
        };
        match tokio::time::timeout(RECONCILE_TIMEOUT, wait).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("reconciler stopped".into()),
            Err(_) => Err(format!(
                "the reconciler did not apply the change within {RECONCILE_TIMEOUT:?}: {}",
                self.reconciled
                    .borrow()
                    .last_error
                    .clone()
                    .unwrap_or_default()
            )),
        }
    }
}

/// Runs blocking work (shelling out to `ip`) without stalling the runtime's other tasks.
fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn create_plumbing(rec: &EndpointRecord, underlay_mtu: u32) -> Result<Link, String> {
    plumbing::add_netns(&rec.netns).map_err(|e| e.to_string())?;
    let link = plumbing::create_endpoint(&plumbing::EndpointSpec {
        node_netns: None,
        endpoint_netns: &rec.netns,
        host_ifname: &rec.host_ifname,
        ip: rec.ip,
        underlay_mtu,
    })
    .map_err(|e| e.to_string())?;
    Ok(Link {
        host_ifindex: link.host_ifindex,
        host_mac: link.host_mac,
        endpoint_mac: link.endpoint_mac,
        mtu: link.mtu,
    })
}

fn read_link(rec: &EndpointRecord) -> Result<Link, String> {
    if !Path::new("/run/netns").join(&rec.netns).exists() {
        return Err(format!("network namespace {} is gone", rec.netns));
    }
    let host = plumbing::link_info(None, &rec.host_ifname).map_err(|e| e.to_string())?;
    let ep = plumbing::link_info(Some(&rec.netns), plumbing::ENDPOINT_IFNAME)
        .map_err(|e| e.to_string())?;
    Ok(Link {
        host_ifindex: host.ifindex,
        host_mac: host.mac,
        endpoint_mac: ep.mac,
        mtu: ep.mtu,
    })
}

fn fnv1a(bytes: &[u8], salt: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5 ^ salt.wrapping_mul(0x0100_0193);
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable_and_salted() {
        assert_eq!(fnv1a(b"web", 0), fnv1a(b"web", 0));
        assert_ne!(fnv1a(b"web", 0), fnv1a(b"web", 1));
        assert_ne!(fnv1a(b"web", 0), fnv1a(b"api", 0));
    }
}
