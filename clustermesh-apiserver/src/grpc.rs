//! The gRPC service: authorization by client certificate, validation of every document, then
//! planning and executing each request as one etcd transaction (re-planned if another writer
//! got in between).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use meshd_certs::{Principal, Role};

use meshd_kvstore::EtcdStore;
use meshd_manifest::{
    check_unique, Document, DocumentError, Kind, ManifestErrors, ObjectRef, SourcedDocument,
};
use meshd_state::{check_dns_label, check_dns_subdomain, ClusterName, Resource, ServiceRecord};
use tonic::{Request, Response, Status};

use crate::error::ApiserverError;
use crate::keys::{kind_prefix, parse_object_key};
use crate::metrics::ApiMetrics;
use crate::pb;
use crate::plan::{plan_apply, plan_delete, Outcome, Plan, Ranges, Snapshot};
use crate::store::{execute, range_all, read_snapshot};
use crate::tls::PeerIdentity;

/// Attempts at planning against a fresh snapshot when other writers keep winning.
const ATTEMPTS: usize = 16;

#[derive(Clone)]
pub struct ApiService {
    pub store: EtcdStore,
    pub cluster: ClusterName,
    /// Where VIPs and node ports come from.
    pub ranges: Ranges,
    pub max_txn_ops: usize,
    /// Client certificate CNs allowed to use the API besides the cluster's admin certificate
    /// (`admin-<cluster>`): operators' own certificates, still of this cluster (OU).
    pub admins: Arc<Vec<String>>,
    /// Requests by method and code, and the refused ones (also on `/counters`).
    pub metrics: ApiMetrics,
}

impl From<ApiserverError> for Status {
    fn from(e: ApiserverError) -> Self {
        match &e {
            ApiserverError::Manifests(_) | ApiserverError::TooLarge { .. } => {
                Status::invalid_argument(e.to_string())
            }
            ApiserverError::Contended { .. } => Status::aborted(e.to_string()),
            _ => Status::unavailable(e.to_string()),
        }
    }
}

fn outcome_pb(o: &Outcome) -> pb::ObjectResult {
    pb::ObjectResult {
        object: Some(meshd_api::apiserver::object_ref(&o.object)),
        action: o.action.to_string(),
        vip: o.vip.map(|v| v.to_string()).unwrap_or_default(),
        node_ports: o.node_ports.iter().map(|p| u32::from(*p)).collect(),
    }
}

impl ApiService {
    /// Only this cluster's admins may use the API. The whole identity counts, never the CN
    /// alone: one mesh CA signs every cluster's certificates, so the cluster (the OU the CA
    /// wrote, which the CN must repeat) decides as much as the role.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let peer = request
            .extensions()
            .get::<PeerIdentity>()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let cn = peer.common_name.as_deref().unwrap_or("");
        let ou = peer.organizational_unit.as_deref().unwrap_or("");
        let verdict = authorize_principal(&self.cluster, &self.admins, cn, ou);
        if let Err(reason) = &verdict {
            self.metrics.refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!(remote = %peer.remote, cn, ou, %reason, "API request refused");
        }
        verdict.map_err(Status::permission_denied)
    }

    /// Plans against a fresh snapshot and executes, again while guards fail.
    async fn run(
        &self,
        objects: &[ObjectRef],
        with_nodes: bool,
        dry_run: bool,
        plan: impl Fn(&Snapshot, usize) -> Result<Plan, ApiserverError>,
    ) -> Result<(Plan, i64), ApiserverError> {
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                // Jitter, so writers that collided do not collide again in lockstep.
                let pause = rand::random::<u64>() % (10 * attempt as u64 + 10);
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            }
            let snapshot = read_snapshot(&self.store, &self.cluster, objects, with_nodes).await?;
            let plan = plan(&snapshot, attempt)?;
            if dry_run {
                return Ok((plan, 0));
            }
            if let Some(revision) = execute(&self.store, &plan, self.max_txn_ops).await? {
                return Ok((plan, revision));
            }
            tracing::debug!("plan guards failed; planning again on a fresh snapshot");
        }
        Err(ApiserverError::Contended { what: "apply" })
    }
}

/// Whether the client certificate `cn`/`ou` may use the API of `cluster`; the refusal says why
/// in words the client can act on (it becomes the gRPC status message).
pub fn authorize_principal(
    cluster: &ClusterName,
    extra_admins: &[String],
    cn: &str,
    ou: &str,
) -> Result<(), String> {
    if ou == cluster.as_str() && extra_admins.iter().any(|a| a == cn) {
        return Ok(());
    }
    let principal = Principal::parse(cn, ou).map_err(|e| {
        format!("refused: certificate CN {cn:?} may not use this API: {e}; this apiserver serves cluster {cluster}")
    })?;
    if principal.cluster != cluster.as_str() {
        return Err(format!(
            "refused: {principal} may not use this API: it is a certificate of cluster {}, and this apiserver serves cluster {cluster}, which only its own admin certificate (admin-{cluster}) may use",
            principal.cluster
        ));
    }
    match principal.role {
        Role::Admin => Ok(()),
        Role::Node => Err(format!(
            "refused: {principal} may not use this API: it is a node certificate, which publishes its node's records in etcd and calls no apiserver; use the cluster's admin certificate (admin-{cluster})"
        )),
        Role::Remote => Err(format!(
            "refused: {principal} may not use this API: it is a remote certificate, which only reads other clusters' shared state in their etcd; use the cluster's admin certificate (admin-{cluster})"
        )),
    }
}

/// Parses and validates every document of a request; all problems reported together.
pub fn parse_request(docs: &[pb::SourceDocument]) -> Result<Vec<SourcedDocument>, ManifestErrors> {
    if docs.is_empty() {
        return Err(ManifestErrors(vec![DocumentError::file(
            "<request>",
            "no documents",
        )]));
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for d in docs {
        let index = d.index as usize;
        match meshd_manifest::parse_document(&d.file, index, &d.text) {
            Ok(document) => out.push(SourcedDocument {
                file: d.file.clone(),
                index,
                document,
                text: d.text.clone(),
            }),
            Err(e) => errors.extend(e.0),
        }
    }
    if let Err(e) = check_unique(&out) {
        errors.extend(e.0);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ManifestErrors(errors))
    }
}

/// Parses and validates the objects a delete request names; all problems reported together.
pub fn parse_refs(refs: &[pb::ObjectRef]) -> Result<Vec<ObjectRef>, ManifestErrors> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        let at = |field: &str, reason: String| {
            DocumentError::document("<request>", i + 1, format!("objects[{i}].{field}"), reason)
        };
        let kind = match r.kind.parse::<Kind>() {
            Ok(k) => k,
            Err(reason) => {
                errors.push(at("kind", reason));
                continue;
            }
        };
        if let Err(e) = check_dns_label("namespace", &r.namespace) {
            errors.push(at("namespace", e.reason));
            continue;
        }
        // Policy names may be DNS subdomains (as in Kubernetes); service names are labels.
        let name_ok = match kind {
            Kind::Service => check_dns_label("name", &r.name),
            Kind::NetworkPolicy => check_dns_subdomain("name", &r.name),
        };
        if let Err(e) = name_ok {
            errors.push(at("name", e.reason));
            continue;
        }
        out.push(ObjectRef {
            kind,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        });
    }
    if errors.is_empty() && out.is_empty() {
        errors.push(DocumentError::file("<request>", "no objects"));
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ManifestErrors(errors))
    }
}

/// The calls themselves; the trait below counts each one.
impl ApiService {
    async fn apply_call(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let docs = parse_request(&req.documents).map_err(ApiserverError::from)?;
        let objects: Vec<ObjectRef> = docs.iter().map(|d| d.document.object_ref()).collect();
        // External addresses are checked against the cluster's nodes, read only when given.
        let with_nodes = docs.iter().any(|d| match &d.document {
            Document::Service(s) => {
                !s.spec.external_ips.is_empty() || s.spec.load_balancer_ip.is_some()
            }
            _ => false,
        });
        let (plan, revision) = self
            .run(&objects, with_nodes, req.dry_run, |snapshot, attempt| {
                // Lowest-first unless a concurrent apply took our pick: then anywhere.
                let offset = if attempt == 0 { 0 } else { rand::random() };
                Ok(plan_apply(&docs, snapshot, &self.ranges, offset)?)
            })
            .await?;
        for o in &plan.outcomes {
            tracing::info!(object = %o.object, action = %o.action, dry_run = req.dry_run, "apply");
        }
        tracing::Span::current().record("meshd.revision", revision);
        Ok(Response::new(pb::ApplyResponse {
            results: plan.outcomes.iter().map(outcome_pb).collect(),
            revision,
        }))
    }

    async fn delete_call(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.authorize(&request)?;
        let refs = parse_refs(&request.into_inner().objects).map_err(ApiserverError::from)?;
        let (plan, revision) = self
            .run(&refs, false, false, |snapshot, _| {
                Ok(plan_delete(&refs, snapshot, &self.cluster))
            })
            .await?;
        for o in &plan.outcomes {
            tracing::info!(object = %o.object, action = %o.action, "delete");
        }
        tracing::Span::current().record("meshd.revision", revision);
        Ok(Response::new(pb::DeleteResponse {
            results: plan.outcomes.iter().map(outcome_pb).collect(),
            revision,
        }))
    }

    async fn list_services_call(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        self.authorize(&request)?;
        let namespace = request.into_inner().namespace;
        let (kvs, rev) = range_all(&self.store, kind_prefix(Kind::Service), 0)
            .await
            .map_err(ApiserverError::from)?;
        let (records, _) = range_all(
            &self.store,
            &ServiceRecord::cluster_prefix(&self.cluster),
            rev,
        )
        .await
        .map_err(ApiserverError::from)?;
        let records: BTreeMap<String, Vec<u8>> =
            records.into_iter().map(|kv| (kv.key, kv.value)).collect();
        let mut services = Vec::new();
        for kv in kvs {
            let Some(object) = parse_object_key(&kv.key) else {
                continue;
            };
            if !namespace.is_empty() && object.namespace != namespace {
                continue;
            }
            let text = String::from_utf8_lossy(&kv.value).into_owned();
            let vip = match meshd_manifest::parse_document(&kv.key, 1, &text) {
                Ok(Document::Service(s)) => s.spec.cluster_ip.map(|ip| ip.to_string()),
                _ => None,
            };
            let record_key = meshd_state::ServiceKey {
                cluster: self.cluster.clone(),
                namespace: object.namespace.clone(),
                name: object.name.clone(),
            }
            .to_string();
            services.push(pb::ServiceInfo {
                namespace: object.namespace,
                name: object.name,
                vip: vip.unwrap_or_default(),
                manifest_json: text,
                record_json: records
                    .get(&record_key)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default(),
            });
        }
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn list_policies_call(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        self.authorize(&request)?;
        let namespace = request.into_inner().namespace;
        let (kvs, _) = range_all(&self.store, kind_prefix(Kind::NetworkPolicy), 0)
            .await
            .map_err(ApiserverError::from)?;
        let policies = kvs
            .into_iter()
            .filter_map(|kv| {
                let object = parse_object_key(&kv.key)?;
                (namespace.is_empty() || object.namespace == namespace).then(|| pb::PolicyInfo {
                    namespace: object.namespace,
                    name: object.name,
                    manifest_json: String::from_utf8_lossy(&kv.value).into_owned(),
                })
            })
            .collect();
        Ok(Response::new(pb::ListPoliciesResponse { policies }))
    }
}

#[tonic::async_trait]
impl pb::cluster_mesh_server::ClusterMesh for ApiService {
    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        self.metrics
            .observe("Apply", self.apply_call(request))
            .await
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.metrics
            .observe("Delete", self.delete_call(request))
            .await
    }

    async fn list_services(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        self.metrics
            .observe("ListServices", self.list_services_call(request))
            .await
    }

    async fn list_policies(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        self.metrics
            .observe("ListPolicies", self.list_policies_call(request))
            .await
    }
}
