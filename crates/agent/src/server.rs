//! The agent's gRPC API: endpoints go to the endpoint manager, status is assembled from the
//! snapshots the tasks publish (no task is asked, nothing is locked).

use std::sync::Arc;

use meshd_api::pb;
use meshd_datapath::{Counter, Direction, FlowRecord, FlowVerdict};
use meshd_mesh::ClusterStatus as ViewStatus;
use tokio::sync::{broadcast, watch};
use tonic::{Request, Response, Status};

use crate::config::AgentConfig;
use crate::endpoints::Endpoints;
use crate::endpoints::Publisher;
use crate::monitor::{Flow, MonitorHandle};
use crate::reconciler::ReconcileStatus;
use crate::remotes::Registry;
use crate::view_task::IdentityLabels;
use crate::watcher::Connection;

#[derive(Clone)]
pub struct AgentService {
    pub config: Arc<AgentConfig>,
    pub started_ms: u64,
    pub endpoints: Endpoints,
    pub publisher: Arc<Publisher>,
    pub view: watch::Receiver<Arc<Vec<ViewStatus>>>,
    pub local_connection: watch::Receiver<Connection>,
    pub remotes: watch::Receiver<Arc<Registry>>,
    pub reconciler: watch::Receiver<ReconcileStatus>,
    pub policies: watch::Receiver<crate::view_task::PolicySummary>,
    pub monitor: MonitorHandle,
    pub identities: watch::Receiver<Arc<IdentityLabels>>,
    pub routes: watch::Receiver<crate::routes::RoutesStatus>,
    /// The reconciler's `meshd_propagation_delay_seconds`.
    pub propagation_delay: crate::metrics::PropagationDelay,
    pub health_checks: watch::Receiver<crate::health_check::HealthCheckStatus>,
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

fn drop_notification(
    d: &FlowRecord,
    missed_before: u64,
    identities: &IdentityLabels,
) -> pb::DropNotification {
    let labels = |id: u32| identities.get(&id).cloned().unwrap_or_default();
    pb::DropNotification {
        src_labels: labels(d.src_identity),
        dst_labels: labels(d.dst_identity),
        timestamp_ns: d.timestamp_ns,
        reason: d.reason,
        reason_name: meshd_ebpf::abi::reason_name(d.reason).to_owned(),
        direction: direction_name(d.direction).to_owned(),
        src_identity: d.src_identity,
        dst_identity: d.dst_identity,
        saddr: d.saddr.to_string(),
        daddr: d.daddr.to_string(),
        sport: u32::from(d.sport),
        dport: u32::from(d.dport),
        proto: u32::from(d.proto),
        ifindex: d.ifindex,
        missed_before,
    }
}

fn flow_notification(
    f: &Flow,
    missed_before: u64,
    identities: &IdentityLabels,
    monitor: &MonitorHandle,
    node: &str,
) -> pb::FlowNotification {
    let r = &f.record;
    let labels = |id: u32| identities.get(&id).cloned().unwrap_or_default();
    pb::FlowNotification {
        verdict: match r.verdict {
            FlowVerdict::Forwarded => "forwarded",
            FlowVerdict::Dropped => "dropped",
        }
        .to_owned(),
        reason: r.reason,
        reason_name: meshd_ebpf::abi::reason_name(r.reason).to_owned(),
        direction: direction_name(r.direction).to_owned(),
        saddr: r.saddr.to_string(),
        sport: u32::from(r.sport),
        daddr: r.daddr.to_string(),
        dport: u32::from(r.dport),
        proto: u32::from(r.proto),
        src_identity: r.src_identity,
        dst_identity: r.dst_identity,
        src_labels: labels(r.src_identity),
        dst_labels: labels(r.dst_identity),
        service: r.service.map(|s| s.to_string()).unwrap_or_default(),
        ifindex: r.ifindex,
        timestamp_ns: r.timestamp_ns,
        time_ms: f.time_ms,
        missed_before,
        datapath_lost: monitor.events_lost(),
        node: node.to_owned(),
    }
}

/// The kept flows, then the live ones after them, for one subscriber, until it goes away or the
/// agent stops; a subscriber that fell behind gets the count of what it missed with the next
/// one.
fn flow_stream(
    history: Vec<Arc<Flow>>,
    live: broadcast::Receiver<Arc<Flow>>,
    identities: watch::Receiver<Arc<IdentityLabels>>,
    monitor: MonitorHandle,
    node: String,
) -> impl futures::Stream<Item = Result<pb::FlowNotification, Status>> {
    let after = history.last().map_or(0, |f| f.seq);
    let state = (history.into_iter(), live, 0u64);
    futures::stream::unfold(state, move |(mut history, mut live, mut missed)| {
        let identities = identities.clone();
        let monitor = monitor.clone();
        let node = node.clone();
        async move {
            let flow = match history.next() {
                Some(f) => f,
                None => loop {
                    match live.recv().await {
                        Ok(f) if f.seq <= after => continue,
                        Ok(f) => break f,
                        Err(broadcast::error::RecvError::Lagged(n)) => missed += n,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                },
            };
            let known = identities.borrow().clone();
            let n = flow_notification(&flow, missed, &known, &monitor, &node);
            Some((Ok(n), (history, live, 0)))
        }
    })
}

fn counter(c: &Counter) -> pb::DatapathCounter {
    pb::DatapathCounter {
        direction: direction_name(c.direction).to_owned(),
        reason: c.reason,
        reason_name: meshd_ebpf::abi::reason_name(c.reason).to_owned(),
        packets: c.packets,
        bytes: c.bytes,
    }
}

/// Drop notifications for one subscriber, until it goes away (the send fails) or the agent
/// stops; a subscriber that fell behind gets the count of what it missed with the next one.
fn drop_stream(
    rx: broadcast::Receiver<FlowRecord>,
    identities: watch::Receiver<Arc<IdentityLabels>>,
) -> impl futures::Stream<Item = Result<pb::DropNotification, Status>> {
    futures::stream::unfold((rx, 0u64), move |(mut rx, mut missed)| {
        let identities = identities.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(d) => {
                        let known = identities.borrow().clone();
                        return Some((Ok(drop_notification(&d, missed, &known)), (rx, 0)));
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => missed += n,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    })
}

fn cluster_status(
    name: &str,
    local: bool,
    view: Option<&ViewStatus>,
    conn: Option<&Connection>,
) -> pb::ClusterStatus {
    let mut s = pb::ClusterStatus {
        name: name.to_owned(),
        local,
        ..Default::default()
    };
    if let Some(v) = view {
        s.cluster_id = v.cluster_id.map(|id| u32::from(id.get())).unwrap_or(0);
        s.ready = v.ready;
        s.refused = v
            .refused
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default();
        s.nodes = v.nodes.admitted as u64;
        s.endpoints = v.ipcache.admitted as u64;
        s.identities = v.identities.admitted as u64;
        s.rejected = v.rejected_total;
        s.pending = (v.ipcache.pending + v.nodes.pending) as u64;
    }
    if let Some(c) = conn {
        s.connected = c.connected;
        s.access_denied = c.access_denied;
        s.stale_since_ms = c.stale_since_ms;
        s.last_error = c.last_error.clone().unwrap_or_default();
        s.last_sync_ms = c.last_sync_ms;
        s.rejected += c.malformed;
        s.malformed = c
            .malformed_by_kind
            .iter()
            .map(|(k, n)| ((*k).to_owned(), *n))
            .collect();
        s.entry_limit = c.entry_limit;
        s.entries_held = c.entries_held;
        s.over_limit = c.over_limit;
        s.degraded = c.degraded.clone().unwrap_or_default();
        s.failures = c.failures;
        if !local {
            s.source = if c.cache.is_some() { "cache" } else { "direct" }.to_owned();
        }
        s.cache = c.cache.as_ref().map(|m| pb::CacheView {
            connected: m.connected,
            ready: m.ready,
            stale_since_ms: m.stale_since.unwrap_or(0),
            last_sync_ms: m.last_sync_unix_ms,
            entries: m.entries,
            rejected: m.rejected,
            limit: m.limit,
            lag_ms: m.lag_ms,
            last_error: m.last_error.clone().unwrap_or_default(),
            over_limit: m.over_limit,
            oversized: m.oversized,
        });
        // The mirror refused keys of the cluster for its limit: the cache, so this node's view,
        // holds only part of it.
        if let Some(m) = c.cache.as_ref().filter(|m| m.over_limit > 0) {
            if s.degraded.is_empty() {
                s.degraded = format!(
                    "the cache holds only part of it: the mirror refused {} keys for its limit ({})",
                    m.over_limit, m.limit
                );
            }
        }
    }
    s
}

impl AgentService {
    fn clusters(&self) -> Vec<pb::ClusterStatus> {
        let view = self.view.borrow().clone();
        let remotes = self.remotes.borrow().clone();
        let local_name = self.config.cluster.as_str();
        let find = |n: &str| view.iter().find(|v| v.name.as_str() == n);
        let mut out = Vec::new();
        let mut local = cluster_status(
            local_name,
            true,
            find(local_name),
            Some(&self.local_connection.borrow()),
        );
        local.cluster_id = u32::from(self.config.cluster_id.get());
        local.etcd_endpoints = self.config.etcd_endpoints.join(",");
        local.policies = self.policies.borrow().count as u64;
        out.push(local);
        for (name, entry) in remotes.iter() {
            let conn = entry.connection.as_ref().map(|c| c.borrow().clone());
            let mut s = cluster_status(name.as_str(), false, find(name.as_str()), conn.as_ref());
            s.etcd_endpoints = entry.endpoints.clone();
            if let Some(e) = &entry.config_error {
                s.refused = e.clone();
            }
            out.push(s);
        }
        out
    }
}

#[tonic::async_trait]
impl meshd_api::Agent for AgentService {
    type MonitorStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::DropNotification, Status>> + Send + 'static>,
    >;

    async fn monitor(
        &self,
        _: Request<pb::MonitorRequest>,
    ) -> Result<Response<Self::MonitorStream>, Status> {
        Ok(Response::new(Box::pin(drop_stream(
            self.monitor.drops.subscribe(),
            self.identities.clone(),
        ))))
    }

    type ObserveStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::FlowNotification, Status>> + Send + 'static>,
    >;

    async fn observe(
        &self,
        req: Request<pb::ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let since_ms = req.into_inner().since_ms;
        // Subscribed before the history is read, so nothing falls between the two.
        let live = self.monitor.flows.subscribe();
        let history = if since_ms == 0 {
            Vec::new()
        } else {
            self.monitor.history(since_ms).await
        };
        Ok(Response::new(Box::pin(flow_stream(
            history,
            live,
            self.identities.clone(),
            self.monitor.clone(),
            self.config.node.clone(),
        ))))
    }

    async fn add_endpoint(
        &self,
        req: Request<pb::AddEndpointRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        Ok(Response::new(self.endpoints.add(req.into_inner()).await?))
    }

    async fn delete_endpoint(
        &self,
        req: Request<pb::DeleteEndpointRequest>,
    ) -> Result<Response<pb::DeleteEndpointResponse>, Status> {
        let deleted = self.endpoints.delete(req.into_inner().name).await?;
        Ok(Response::new(pb::DeleteEndpointResponse {
            deleted: Some(deleted),
        }))
    }

    async fn list_endpoints(
        &self,
        _: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        Ok(Response::new(pb::ListEndpointsResponse {
            endpoints: self.endpoints.list().await,
        }))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let lease = self.publisher.lease().await;
        Ok(Response::new(pb::StatusResponse {
            node: Some(pb::NodeStatus {
                cluster: self.config.cluster.to_string(),
                cluster_id: u32::from(self.config.cluster_id.get()),
                name: self.config.node.clone(),
                node_ip: self.config.node_ip.to_string(),
                pod_cidr: self.config.pod_cidr.to_string(),
                lease_id: lease,
                published: lease != 0,
                started_ms: self.started_ms,
                version: env!("CARGO_PKG_VERSION").to_owned(),
            }),
            endpoints: self.endpoints.list().await,
            clusters: self.clusters(),
            datapath: Some(self.datapath().await),
            certificates: self.certificates(),
            warnings: self.warnings(),
            routing: Some(self.routing()),
        }))
    }
}

impl AgentService {
    /// The policy warnings, then the health check node ports that could not be served.
    fn warnings(&self) -> Vec<String> {
        let mut out = self.policies.borrow().warnings.clone();
        out.extend(
            self.health_checks
                .borrow()
                .failed
                .iter()
                .map(|(port, e)| format!("health check node port {port} not served: {e}")),
        );
        out
    }

    fn routing(&self) -> pb::RoutingStatus {
        let r = &self.config.routing;
        let routes = self.routes.borrow().clone();
        pb::RoutingStatus {
            mode: r.mode.to_string(),
            native_routing_cidr: r
                .native_routing_cidr
                .filter(|_| r.native())
                .map(|c| c.to_string())
                .unwrap_or_default(),
            auto_direct_node_routes: r.auto_direct_node_routes,
            routes_installed: routes.installed,
            skipped_nodes: routes.skipped,
            skipped_total: routes.skipped_total,
            route_failures: routes.failures,
            route_error: routes.last_error,
            outside_native_cidr: routes.outside_native_cidr,
            route_protocol: u32::from(crate::routes::ROUTE_PROTOCOL),
            service_lb_mode: r.service_lb_mode.to_string(),
        }
    }

    async fn datapath(&self) -> pb::DatapathStatus {
        let r = self.reconciler.borrow().clone();
        let readings = self.monitor.readings().await;
        pb::DatapathStatus {
            pin_dir: self.config.pin_dir().display().to_string(),
            ipcache_entries: r.ipcache_entries as u64,
            endpoint_entries: r.endpoint_entries as u64,
            node_entries: r.node_entries as u64,
            policy_entries: r.policy_entries as u64,
            reconciles: r.rounds,
            last_reconcile_ms: r.last_round_ms,
            last_error: r.last_error.unwrap_or_default(),
            counters: readings.counters.iter().map(counter).collect(),
            ops_applied: r.ops_applied,
            ct_entries: readings.ct_entries,
            nat_entries: readings.nat_entries,
            full_diffs: r.full_diffs,
            corrections: r.corrections,
            failed_writes: r.failed_writes,
            service_entries: r.service_entries as u64,
        }
    }

    /// The text of `/metrics`, from the same snapshots as `Status`.
    pub async fn metrics(&self) -> String {
        let datapath = self.datapath().await;
        let clusters = self.clusters();
        let identities = self.identities.borrow().len();
        let routing = self.routing();
        crate::metrics::render(&crate::metrics::Snapshot {
            clusters: &clusters,
            datapath: &datapath,
            identities,
            events_lost: self.monitor.events_lost(),
            now_ms: crate::now_ms(),
            routing: &routing,
            propagation_delay: &self.propagation_delay,
            naps: crate::moderation::stats(),
        })
    }

    /// Every certificate and CA file in use, read now: rotated files show their new dates
    /// without a restart, as the connections use them.
    fn certificates(&self) -> Vec<pb::CertificateStatus> {
        let window = i64::from(self.config.cert_expiry_warning_days);
        let mut out = Vec::new();
        let mut report = |used_for: &str, tls: &meshd_certs::TlsFiles| {
            for (kind, path) in [("certificate", &tls.cert), ("ca", &tls.ca)] {
                out.extend(certificate_status(used_for, kind, path, window));
            }
        };
        if let Some(tls) = &self.config.etcd_tls {
            report("local etcd", tls);
        }
        for (cluster, entry) in self.remotes.borrow().iter() {
            if let Some(tls) = &entry.tls {
                report(&format!("remote {cluster}"), tls);
            }
        }
        out
    }
}

/// The certificates of one PEM file (a CA bundle holds several during a CA rotation).
fn certificate_status(
    used_for: &str,
    kind: &str,
    path: &std::path::Path,
    window_days: i64,
) -> Vec<pb::CertificateStatus> {
    let base = pb::CertificateStatus {
        used_for: used_for.to_owned(),
        kind: kind.to_owned(),
        path: path.display().to_string(),
        ..Default::default()
    };
    match meshd_certs::inspect_file(path) {
        Err(e) => vec![pb::CertificateStatus {
            error: e.to_string(),
            expiring: true,
            ..base
        }],
        Ok(infos) => {
            let now = time::OffsetDateTime::now_utc();
            infos
                .into_iter()
                .map(|info| {
                    let days_left = (info.not_after - now).whole_days();
                    pb::CertificateStatus {
                        subject: info.subject,
                        not_after_ms: u64::try_from(
                            (info.not_after.unix_timestamp_nanos() / 1_000_000).max(0),
                        )
                        .unwrap_or(0),
                        days_left,
                        expiring: info.not_after - now < time::Duration::days(window_days),
                        ..base.clone()
                    }
                })
                .collect()
        }
    }
}
