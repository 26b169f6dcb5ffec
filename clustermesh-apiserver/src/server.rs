//! Wiring: listeners, the gRPC API, health, the cluster config, and the leader loop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshd_kvstore::{Backend, EtcdStore};
use meshd_state::{Capabilities, ClusterConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::controller::{run_term, ControllerConfig};
use crate::error::ApiserverError;
use crate::grpc::ApiService;
use crate::health::Health;
use crate::keys::leader_key;
use crate::leader::Leader;
use crate::metrics::ApiMetrics;
use crate::pb::cluster_mesh_server::ClusterMeshServer;
use crate::store::ensure_cluster_config;

/// A running apiserver. Dropping it aborts its tasks; `shutdown` stops it cleanly (and hands
/// leadership over at once).
pub struct Apiserver {
    pub api_addr: SocketAddr,
    pub health_addr: Option<SocketAddr>,
    pub health: Arc<Health>,
    /// Where `/metrics` is served, if it is (the bound port when configured as 0).
    pub metrics_addr: Option<SocketAddr>,
    /// The value of the leader key while this replica leads.
    pub replica_id: String,
    stop: watch::Sender<bool>,
    main: Option<JoinHandle<Result<(), ApiserverError>>>,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ApiserverError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ApiserverError::Listen {
            what,
            addr: addr.to_string(),
            source,
        })
}

impl Apiserver {
    /// Binds the listeners (port 0 allowed: see `api_addr`) and starts every task. Fails on
    /// unusable listeners or TLS files; an unreachable etcd is waited for, not an error.
    pub async fn start(config: Config) -> Result<Apiserver, ApiserverError> {
        // Bad server files are reported now, by name, not at the first handshake.
        config.tls.server_config()?;
        let api = bind("API listener", config.listen).await?;
        let api_addr = api.local_addr().map_err(|source| ApiserverError::Listen {
            what: "API listener",
            addr: config.listen.to_string(),
            source,
        })?;
        let health = Arc::new(Health::default());
        let mut tasks = Vec::new();
        let mut health_addr = None;
        if let Some(addr) = config.health_listen {
            let l = bind("health listener", addr).await?;
            health_addr = l.local_addr().ok();
            tasks.push(tokio::spawn(crate::health::serve(l, health.clone())));
        }
        let metrics = ApiMetrics::new(health.api_refused.clone());
        let mut metrics_addr = None;
        if let Some(addr) = config.metrics_addr {
            let l = bind("metrics listener (metrics-addr)", addr).await?;
            metrics_addr = l.local_addr().ok();
            let m = metrics.clone();
            tasks.push(tokio::spawn(meshd_telemetry::metrics::serve(
                l,
                move || {
                    let m = m.clone();
                    async move { m.render() }
                },
            )));
        }
        let store = meshd_kvstore::connect_lazy(&config.etcd).await?;
        let (stop, stop_rx) = watch::channel(false);

        let service = ApiService {
            store: store.clone(),
            cluster: config.cluster.clone(),
            ranges: crate::plan::Ranges {
                cidr: config.service_cidr,
                node_ports: config.node_port_range,
            },
            max_txn_ops: config.max_txn_ops,
            admins: Arc::new(config.admins.clone()),
            metrics: metrics.clone(),
        };
        let incoming = crate::tls::incoming(api, config.tls.clone());
        let mut grpc_stop = stop_rx.clone();
        let serving = health.clone();
        tasks.push(tokio::spawn(async move {
            serving.api_serving.store(true, Ordering::Relaxed);
            let r = tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(
                    ClusterMeshServer::new(service),
                    incoming,
                    async move {
                        let _ = grpc_stop.wait_for(|s| *s).await;
                    },
                )
                .await;
            serving.api_serving.store(false, Ordering::Relaxed);
            if let Err(e) = r {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        }));

        tasks.push(tokio::spawn(watch_etcd(store.clone(), health.clone())));
        // The mirror runs in the leader's term only (see `run`): one writer of the cache per
        // cluster, however many replicas.
        let mirror = config.kvstoremesh.as_ref().map(|k| {
            let mut mirror = crate::mirror::MirrorConfig::new(
                k.clusters_dir.clone(),
                config.cluster.clone(),
                config.cluster_id,
            );
            mirror.limit = k.limit;
            mirror.batch = config.max_txn_ops.min(crate::mirror::MAX_BATCH);
            (mirror, metrics.mirror.clone())
        });

        let replica_id = config.replica_id.clone();
        let main = tokio::spawn(run(
            config,
            store,
            health.clone(),
            metrics.identities.clone(),
            mirror,
            stop_rx,
        ));
        tracing::info!(%api_addr, ?health_addr, "clustermesh-apiserver started");
        Ok(Apiserver {
            api_addr,
            health_addr,
            health,
            metrics_addr,
            replica_id,
            stop,
            main: Some(main),
            tasks,
        })
    }

    /// Runs until the apiserver fails (a fatal configuration conflict) or is shut down.
    pub async fn wait(&mut self) -> Result<(), ApiserverError> {
        match self.main.as_mut() {
            Some(main) => {
                let r = main.await.unwrap_or(Ok(()));
                self.main = None;
                r
            }
            None => Ok(()),
        }
    }

    /// Stops serving, gives leadership up and waits for the leader loop to finish.
    pub async fn shutdown(mut self) -> Result<(), ApiserverError> {
        let _ = self.stop.send(true);
        let r = self.wait().await;
        for t in self.tasks.drain(..) {
            t.abort();
        }
        r
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        if let Some(main) = &self.main {
            main.abort();
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Keeps `etcd_reachable` current.
async fn watch_etcd(store: EtcdStore, health: Arc<Health>) {
    loop {
        let ok = store.status().await.is_ok();
        health.etcd_reachable.store(ok, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(if ok { 5 } else { 1 })).await;
    }
}

/// The mirror for as long as this replica leads, its writes fenced by the leader key: a
/// replica that lost leadership without noticing yet (a paused process, a partition) cannot
/// overwrite the cache its successor writes. Pending forever without `--kvstoremesh`.
async fn mirror_term(
    store: &EtcdStore,
    leader: &Leader,
    mirror: Option<&(crate::mirror::MirrorConfig, crate::mirror::MirrorMetrics)>,
) {
    let Some((config, metrics)) = mirror else {
        return std::future::pending().await;
    };
    // The revision this term's leader key was written at: the fence.
    let revision = loop {
        match store.range(leader.key(), None, 0, 1).await {
            Ok(page) => {
                match page
                    .kvs
                    .into_iter()
                    .find(|kv| kv.key == leader.key() && kv.value == leader.id().as_bytes())
                {
                    Some(kv) => break kv.mod_revision,
                    // Lost already: `hold` ends the term.
                    None => return std::future::pending().await,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the leader key for the mirror's fence; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let fence = meshd_kvstore::Compare::ModRevision {
        key: leader.key().to_owned(),
        revision,
    };
    let local = meshd_kvstore::Fenced::new(store.clone(), fence);
    crate::mirror::run(local, config.clone(), metrics.clone()).await
}

/// Cluster config first (retried while etcd is unreachable; a conflict is fatal), then the
/// leader loop until stopped.
async fn run(
    config: Config,
    store: EtcdStore,
    health: Arc<Health>,
    identities: Arc<AtomicI64>,
    mirror: Option<(crate::mirror::MirrorConfig, crate::mirror::MirrorMetrics)>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ApiserverError> {
    let cluster_config = ClusterConfig {
        name: config.cluster.clone(),
        id: config.cluster_id,
        capabilities: Capabilities {
            // Agents read remote clusters from the cache by default when it exists.
            cached: config.kvstoremesh.is_some(),
            ..Capabilities::default()
        },
        routing_mode: config.routing_mode,
    };
    loop {
        match ensure_cluster_config(&store, &cluster_config).await {
            Ok(()) => break,
            Err(e @ ApiserverError::ClusterConfigConflict { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "writing the cluster config; retrying");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    health.cluster_config_written.store(true, Ordering::Relaxed);

    let leader = Leader::new(
        store.clone(),
        leader_key(&config.cluster),
        config.replica_id.clone(),
        config.leader_lease_ttl,
    );
    let controller = ControllerConfig {
        cluster: config.cluster.clone(),
        identity_gc_grace: config.identity_gc_grace,
        resync_interval: config.resync_interval,
        identities,
    };
    loop {
        let lease = tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            lease = leader.acquire() => lease,
        };
        let stopped = tokio::select! {
            _ = stop.wait_for(|s| *s) => true,
            _ = leader.hold(lease) => false,
            r = run_term(&store, &leader, &controller) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "leader term ended");
                }
                false
            }
            // Never returns while the term lasts; dropped (its sessions aborted) when it ends.
            _ = mirror_term(&store, &leader, mirror.as_ref()) => false,
        };
        if let Some((_, metrics)) = &mirror {
            // Only the leader's figures describe the cache.
            metrics.forget_all();
        }
        leader.release(lease).await;
        if stopped {
            return Ok(());
        }
        // Let another replica take over if this one keeps failing.
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
