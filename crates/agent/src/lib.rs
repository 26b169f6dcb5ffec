//! `meshd agent`: the node agent runtime.
//!
//! Tasks and who owns what:
//! - the datapath is loaded and attached here at start (maps and links pinned under
//!   `<bpffs_dir>/<cluster>/<node>`, so forwarding goes on while the agent restarts);
//! - [`reconciler`] owns the maps and drives them to the desired state with the view's own
//!   operations (through `meshd_datapath`'s typed seam), with a full diff at start, after a
//!   failed write and on a safety-net timer;
//! - [`view_task`] owns the merged view (`meshd_mesh::MeshView`), fed by one [`watcher`] per
//!   cluster (the local etcd, and each remote from [`remotes`]), each through a queue of its
//!   own taken in turns ([`inputs`]);
//! - [`endpoints`] owns this node's endpoints (state file, addresses, veths, program links);
//! - kvstore's `Publisher` owns the node lease and the records published under it (the node
//!   record, each endpoint's ipcache entry) and writes the sync canaries;
//! - [`server`] answers the API on the Unix socket from the snapshots the others publish.
//! - [`metrics`] renders `/metrics` (with `metrics_addr`) from those same snapshots, per scrape.

pub mod cache_source;
pub mod config;
pub mod dir_watch;
pub mod egress;
pub mod endpoints;
pub mod health_check;
pub mod inputs;
pub mod ipam;
pub mod metrics;
pub mod moderation;
pub mod monitor;
pub mod reconciler;
pub mod remotes;
pub mod routes;
pub mod routing;
pub mod server;
pub mod store;
pub mod view_task;
pub mod watcher;

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use meshd_datapath::{bpffs, plumbing, Datapath, DatapathMaps, NodeConfig};
use meshd_kvstore::{Backend, EtcdConfig, EtcdStore};
use meshd_mesh::{LocalNode, MeshView};
use meshd_state::{
    ClusterConfig, ClusterConfigKey, IdentityRecord, IpcacheEntry, NodeKey, NodeRecord,
};
use tokio::sync::{mpsc, watch};

use self::config::{AgentArgs, AgentConfig, RemoteSource};
use self::endpoints::Publisher;

/// Name of the node's VXLAN device.
pub const VXLAN_IFNAME: &str = "meshd_vxlan";

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Entry point of `meshd agent`.
pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let config = match config::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprint!("meshd agent: {e}");
            return Ok(ExitCode::from(64));
        }
    };
    tune_allocator();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // One worker thread (BENCHMARKS.md, issue 11, session 10): the agent is mostly one
    // pipeline (etcd connection -> watch -> cluster watcher -> view -> reconciler), and with
    // a second worker the hand-offs between those tasks woke the other thread, parked it
    // again and moved the pipeline between cores: futex and scheduler work per event (under
    // churn at 500k entries: 54 us of CPU per event against 64 before on a quiet machine, 41
    // against 58 at load 8-15, where two workers with the same code gave 52). Bulk work (a list's pages, the view's
    // big turns, the reconciler's full diffs and big batches, shelling out for endpoints)
    // runs under `block_in_place` (`meshd_kvstore::off_the_worker`), which hands the worker's
    // other tasks to another thread meanwhile, so an initial sync still uses both cores.
    // `TOKIO_WORKER_THREADS` still chooses another count.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        runtime.worker_threads(1);
    }
    moderation::install(&mut runtime, config.event_moderation);
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_agent(Arc::new(config)))
}

/// Makes glibc's allocator give back what the initial sync frees: a fixed mmap threshold of
/// 256 KiB. glibc otherwise raises it to the size of each large block freed (list pages, event
/// batches, the start-up diff's operation list, compaction buffers, up to 32 MiB), after which
/// such blocks come from the heap and leave it fragmented when freed; above the threshold they
/// are mapped and unmapped on their own.
///
/// The arenas are left as glibc makes them (one per thread that allocates). An earlier agent,
/// with two runtime workers, also held every thread to one arena; with one worker and the bulk
/// work on `block_in_place` threads that cost both memory and time: 247-250 against 166-167
/// bytes of anonymous memory per remote entry after a 500k sync, and a slower sync in each of
/// three alternating rounds (BENCHMARKS.md, issue 11, session 11). Not measured apart, but
/// the likely cause: the list's decoding thread and the view's thread then take turns on one
/// lock, and one heap keeps the pieces both free.
///
/// Called before the runtime starts its threads.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| format!("unknown-{}", now_ms()))
}

/// Loads and attaches the datapath of this node; returns it, the underlay MTU and the uplink.
fn start_datapath(config: &AgentConfig) -> anyhow::Result<(Datapath, u32, String)> {
    let underlay_mtu = match (config.underlay_mtu, &config.underlay_device) {
        (Some(mtu), _) => mtu,
        (None, Some(dev)) => {
            plumbing::link_info(None, dev)
                .with_context(|| format!("reading the MTU of underlay device {dev}"))?
                .mtu
        }
        (None, None) => config::DEFAULT_UNDERLAY_MTU,
    };
    let _ = std::fs::create_dir_all(&config.bpffs_dir);
    if !bpffs::is_bpffs(&config.bpffs_dir) {
        bpffs::ensure_mounted(&config.bpffs_dir)?;
    }
    let pin_dir = config.pin_dir();
    bpffs::create_pin_dir(&pin_dir)?;
    let mut datapath = Datapath::load(&pin_dir)
        .with_context(|| format!("loading the datapath pinned at {}", pin_dir.display()))?;
    let native = config.routing.native();
    // Native routing has no tunnel: no VXLAN device (one left by an earlier tunnel-mode run
    // goes, and its program link with it).
    let vxlan_ifindex = if native {
        plumbing::delete_link_if_present(None, VXLAN_IFNAME)?;
        0
    } else {
        plumbing::create_vxlan(None, VXLAN_IFNAME, config.tunnel_port)?
    };
    let mut maps = DatapathMaps::open(&pin_dir)?;
    maps.set_config(NodeConfig {
        vxlan_ifindex,
        node_ip: config.node_ip,
        cluster_id: config.cluster_id.get(),
    })?;
    maps.set_event_limit(meshd_datapath::EventLimit {
        rate_per_cpu: config.flow_event_rate,
        flows: config.flow_events,
    })?;
    maps.set_native_routing(native)?;
    maps.set_service_lb_mode(config.routing.service_lb_mode)?;
    // The config refuses `program` in native routing; what was set in tunnel mode goes.
    let tunnel_encap = if native {
        meshd_datapath::TunnelEncap::Device
    } else {
        config.tunnel_encap
    };
    maps.set_tunnel_encap(tunnel_encap, config.tunnel_port)?;
    if !native {
        datapath.attach_overlay(VXLAN_IFNAME)?;
    }
    let uplink = start_egress(config, &mut datapath, &mut maps)?;
    tracing::info!(pin_dir = %pin_dir.display(), vxlan_ifindex, underlay_mtu,
        routing_mode = %config.routing.mode, service_lb_mode = %config.routing.service_lb_mode,
        %tunnel_encap, "datapath loaded");
    Ok((datapath, underlay_mtu, uplink))
}

/// Lets endpoints leave the mesh: the egress settings and NO_MASQ (the configured exceptions
/// and this node's pod CIDR; the view adds every admitted node's), then from_netdev on the uplink (the device holding the node IP
/// unless `underlay_device` names it), which translates the replies of masqueraded flows.
fn start_egress(
    config: &AgentConfig,
    datapath: &mut Datapath,
    maps: &mut DatapathMaps,
) -> anyhow::Result<String> {
    let egress = &config.egress;
    // Added, never removed here: after a restart NO_MASQ still holds the other clusters' pod
    // CIDRs, which the reconciler's first diff keeps (or drops with their clusters).
    for prefix in egress
        .non_masquerade_cidrs
        .iter()
        .chain(std::iter::once(&config.pod_cidr))
        .chain(native_cidr(config).iter())
    {
        maps.insert_no_masquerade(*prefix)?;
    }
    let uplink = match &config.underlay_device {
        Some(dev) => dev.clone(),
        None => plumbing::device_with_addr(None, config.node_ip)?.with_context(|| {
            format!(
                "no interface holds the node IP {} (set underlay_device)",
                config.node_ip
            )
        })?,
    };
    datapath
        .attach_netdev(&uplink)
        .with_context(|| format!("attaching from_netdev to the uplink {uplink}"))?;
    maps.set_egress(&meshd_datapath::EgressConfig {
        masquerade: egress.masquerade,
        nat_ports: egress.snat_port_range.clone(),
    })?;
    tracing::info!(uplink, masquerade = egress.masquerade, snat_ports = ?egress.snat_port_range,
        "egress to the world enabled");
    Ok(uplink)
}

/// Native routing: the underlay routes these addresses as they are; masquerading them would
/// cost the receiver the sender's identity (a NO_MASQ entry, like `non_masquerade_cidrs`).
fn native_cidr(config: &AgentConfig) -> Option<ipnet::Ipv4Net> {
    config
        .routing
        .native_routing_cidr
        .filter(|_| config.routing.native())
}

/// Reads `meshd/cluster-config/<cluster>`, which the cluster's apiserver writes (agents may not:
/// their certificates write only what agents publish), and shouts when it names another id.
/// Missing is retried: remote clusters admit this cluster only once it is there.
async fn check_cluster_config(store: &EtcdStore, config: &AgentConfig) -> anyhow::Result<()> {
    let key = ClusterConfigKey {
        cluster: config.cluster.clone(),
    };
    let k = key.to_string();
    let resp = store.client().get(k.as_str(), None).await?;
    let Some(kv) = resp.kvs().first() else {
        anyhow::bail!(
            "{k} is not published yet (the cluster's clustermesh-apiserver writes it; remote clusters admit this cluster only once it is there)"
        );
    };
    let (_, existing) = meshd_state::decode::<ClusterConfig>(&k, kv.value())?;
    if existing.id != config.cluster_id {
        tracing::error!(key = k, published = %existing.id, configured = %config.cluster_id,
            "the cluster's published id differs from this node's configuration");
    }
    if existing.routing_mode != config.routing.mode {
        tracing::error!(key = k, announced = %existing.routing_mode, configured = %config.routing.mode,
            "the cluster announces another routing mode than this node's (the apiserver's --routing-mode); remote clusters judge this cluster by the announced one");
    }
    Ok(())
}

/// The configured remote source, or else the one the cluster config announces (`cached`: the
/// cluster runs a mirror). The config is read for up to the start-up sync timeout; a cluster
/// whose config cannot be read by then is read directly, as before caches existed.
async fn resolve_remote_source(store: &EtcdStore, config: &AgentConfig) -> RemoteSource {
    if let Some(source) = config.remote_source {
        return source;
    }
    let key = ClusterConfigKey {
        cluster: config.cluster.clone(),
    }
    .to_string();
    let deadline = tokio::time::Instant::now() + config.startup_sync_timeout;
    loop {
        match store.range(&key, None, 0, 1).await {
            Ok(page) => {
                if let Some(kv) = page.kvs.iter().find(|kv| kv.key == key) {
                    match meshd_state::decode::<ClusterConfig>(&key, &kv.value) {
                        Ok((_, cfg)) if cfg.capabilities.cached => return RemoteSource::Cache,
                        Ok(_) => return RemoteSource::Direct,
                        Err(e) => tracing::warn!(error = %e, "cannot decide the remote source"),
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster config to decide the remote source")
            }
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(key, "no cluster config within the start-up sync timeout; reading remote clusters directly (set remote_source to choose)");
            return RemoteSource::Direct;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Starts the lease-backed publisher, retrying until the local etcd grants a lease (the
/// datapath keeps forwarding with its pinned state meanwhile).
async fn start_publisher(store: &EtcdStore, config: &AgentConfig) -> Publisher {
    let mut backoff = meshd_kvstore::Backoff::new(Default::default());
    loop {
        let cfg = meshd_kvstore::PublisherConfig {
            ttl: config.lease_ttl,
            ..Default::default()
        };
        match Publisher::start(store.clone(), config.cluster.clone(), cfg).await {
            Ok(p) => {
                tracing::info!(lease = format!("{:x}", p.lease().await), ttl = ?config.lease_ttl, "node lease granted");
                return p;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "cannot take the node lease");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Retries `f` every second until it succeeds.
async fn until_ok<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    loop {
        match f().await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = format!("{e:#}"), "{what} failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn run_agent(config: Arc<AgentConfig>) -> anyhow::Result<ExitCode> {
    let started_ms = now_ms();
    // Bound first: a port in use is a start error, before anything else is touched.
    let metrics_listener = match config.metrics_addr {
        Some(addr) => match meshd_telemetry::metrics::bind("metrics_addr", addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("meshd agent: {e}");
                return Ok(ExitCode::from(64));
            }
        },
        None => None,
    };
    let (datapath, underlay_mtu, uplink) = start_datapath(&config)?;

    let mut etcd = EtcdConfig::new(config.etcd_endpoints.clone());
    if let Some(tls) = &config.etcd_tls {
        etcd = etcd.with_tls(tls.clone());
    }
    // Lazy: the datapath forwards with what it has while etcd is away; everything below
    // retries until it answers.
    let store = match meshd_kvstore::connect_lazy(&etcd).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("meshd agent: local etcd: {e}");
            return Ok(ExitCode::from(64));
        }
    };

    {
        let (store, config) = (store.clone(), config.clone());
        tokio::spawn(async move {
            until_ok("reading the cluster config", || {
                check_cluster_config(&store, &config)
            })
            .await
        });
    }

    // The lease is not revoked on shutdown: a restarting agent writes the same records under
    // its new lease, so peers never see its endpoints go; if it does not come back, the lease
    // runs out and takes them along.
    let publisher = Arc::new(start_publisher(&store, &config).await);
    let node_key = NodeKey {
        cluster: config.cluster.clone(),
        node: config.node.clone(),
    };
    let node_record = NodeRecord {
        name: config.node.clone(),
        cluster: config.cluster.clone(),
        cluster_id: config.cluster_id,
        node_ip: config.node_ip.into(),
        pod_cidrs: vec![config.pod_cidr.into()],
        labels: Default::default(),
        boot_id: boot_id(),
    };
    if let Err(e) = publisher.publish(&node_key, &node_record).await {
        tracing::warn!(error = %e, "node record not published yet; retrying in the background");
    }

    // Channels between the tasks. Each cluster's watcher sends into a queue of its own, taken
    // in turns by the view task ([`inputs`]): a flooding cluster's backlog never sits in front
    // of another cluster's change.
    let (queues, view_inputs) = inputs::input_queues(inputs::QUEUE);
    // Bounded, and to one batch: a reconciler that falls behind slows the view task down (the
    // backlog stays in the clusters' queues, where every cluster gets its turn) instead of
    // queueing batches in front of the next round (64 of them were up to 260k writes).
    let (datapath_tx, datapath_rx) = mpsc::channel(1);
    let (full_request_tx, full_request_rx) = mpsc::channel(1);
    let (view_status_tx, view_status_rx) = watch::channel(Arc::new(Vec::new()));
    let (policies_tx, policies_rx) = watch::channel(view_task::PolicySummary::default());
    let (identities_tx, identities_rx) = watch::channel(Arc::new(view_task::IdentityLabels::new()));
    let (local_eps_tx, local_eps_rx) =
        watch::channel(Arc::new(reconciler::LocalEndpoints::default()));
    let (reconciled_tx, reconciled_rx) = watch::channel(reconciler::ReconcileStatus::default());
    let (local_conn_tx, local_conn_rx) = watch::channel(watcher::Connection::default());
    let (registry_tx, registry_rx) = watch::channel(Arc::new(remotes::Registry::new()));
    let (peers_tx, peers_rx) = watch::channel(None);
    let (routes_tx, routes_rx) = watch::channel(routes::RoutesStatus::default());
    let (health_checks_tx, health_checks_rx) =
        watch::channel(Arc::new(health_check::HealthChecks::default()));
    let (health_status_tx, health_status_rx) =
        watch::channel(health_check::HealthCheckStatus::default());

    let reconciler = reconciler::Reconciler::open(config.pin_dir())?;
    let propagation_delay = reconciler.propagation_delay();
    tokio::spawn(reconciler.run(
        datapath_rx,
        full_request_tx,
        local_eps_rx,
        reconciled_tx,
        config.resync_interval,
    ));
    let (monitor, monitor_handle) = monitor::Monitor::open(&config.pin_dir(), config.flow_history)?;
    tokio::spawn(monitor.run());

    tokio::spawn(
        watcher::ClusterWatcher {
            cluster: config.cluster.clone(),
            probe: watcher::Probe::Etcd(Box::new(store.clone())),
            backend: store.clone(),
            local: true,
            tx: queues.sender(&config.cluster),
            connection: local_conn_tx,
            limits: watcher::RemoteLimits::default(),
        }
        .run(),
    );

    let mut wait_for: BTreeSet<_> = [config.cluster.clone()].into();
    // Every remote cluster's keys together fit the maps (a limit per cluster alone lets a few
    // clusters overflow them); none with `remote_entry_limit: 0`.
    let limits = watcher::RemoteLimits {
        per_cluster: config.remote_entry_limit,
        room: config
            .remote_entry_limit
            .map(|_| meshd_kvstore::EntryRoom::new(watcher::remote_room())),
    };
    let remote_source = resolve_remote_source(&store, &config).await;
    tracing::info!(%remote_source, "reading remote clusters");
    match remote_source {
        RemoteSource::Direct => {
            if let Some(dir) = &config.remote_clusters_dir {
                wait_for.extend(remotes::configured(dir, &config.cluster));
                tokio::spawn(remotes::run(
                    dir.clone(),
                    config.cluster.clone(),
                    queues.clone(),
                    registry_tx,
                    limits,
                ));
            }
        }
        RemoteSource::Cache => {
            wait_for.extend(cache_source::configured(&store, &config.cluster).await);
            tokio::spawn(cache_source::run(
                store.clone(),
                config.cluster.clone(),
                queues.clone(),
                registry_tx,
                local_conn_rx.clone(),
                limits,
            ));
        }
    }
    tokio::spawn(
        view_task::ViewTask {
            view: MeshView::new(LocalNode {
                cluster: config.cluster.clone(),
                cluster_id: config.cluster_id,
                node_name: config.node.clone(),
                node_ip: config.node_ip.into(),
                pod_cidrs: vec![config.pod_cidr.into()],
                routing_mode: config.routing.mode,
                non_masquerade: config
                    .egress
                    .non_masquerade_cidrs
                    .iter()
                    .chain(native_cidr(&config).iter())
                    .map(|&p| p.into())
                    .collect(),
            }),
            inputs: view_inputs,
            peers: peers_tx,
            health_checks: health_checks_tx,
            datapath: datapath_tx,
            full_requests: full_request_rx,
            status: view_status_tx,
            policies: policies_tx,
            identities: identities_tx,
            wait_for,
            gate_timeout: config.startup_sync_timeout,
        }
        .run(),
    );

    tokio::spawn(
        health_check::HealthCheckServer {
            node_ip: config.node_ip.into(),
            desired: health_checks_rx,
            status: health_status_tx,
        }
        .run(),
    );

    // Native mode with auto_direct_node_routes: the agent's node routes on the uplink; else
    // none (any left from an earlier configuration go).
    let route_uplink = if config.routing.native() && config.routing.auto_direct_node_routes {
        Some(uplink.clone())
    } else {
        None
    };
    tokio::spawn(
        routes::RouteReconciler {
            uplink: route_uplink,
            native_cidr: config
                .routing
                .native_routing_cidr
                .filter(|_| config.routing.native()),
            nodes: peers_rx,
            status: routes_tx,
        }
        .run(),
    );

    let endpoint_store =
        store::EndpointStore::open(&config.state_dir, ipam::Ipam::new(config.pod_cidr))?;
    let mut manager = endpoints::EndpointManager::new(
        config.clone(),
        endpoint_store,
        datapath,
        store.clone(),
        publisher.clone(),
        local_eps_tx,
        reconciled_rx.clone(),
        underlay_mtu,
    );
    manager.recover().await;
    let endpoints = manager.spawn();

    {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            // Canaries say "this node's initial state is in etcd": written once the node
            // record and the recovered endpoints' records are (kvstore re-publishes first).
            until_ok("writing sync canaries", || async {
                publisher.mark_synced::<NodeRecord>().await?;
                publisher.mark_synced::<IpcacheEntry>().await?;
                publisher.mark_synced::<IdentityRecord>().await?;
                Ok(())
            })
            .await
        });
    }

    {
        // systemd (Type=notify) hears READY=1 once the start-up gate opened and the first full
        // diff drove the maps to the merged view: from then on a restart of a neighbour unit
        // that waits for this one finds the datapath in order. Without NOTIFY_SOCKET nothing is
        // sent. Wake-up moderation (`event_moderation_us`) starts then too.
        let mut reconciled = reconciled_rx.clone();
        tokio::spawn(async move {
            if reconciled.wait_for(|s| s.full_diffs > 0).await.is_ok() {
                let _ = sd_notify::notify(
                    false,
                    &[
                        sd_notify::NotifyState::Ready,
                        sd_notify::NotifyState::Status("maps follow the merged view"),
                    ],
                );
                tracing::info!("initial sync done; readiness notified");
                moderation::arm();
            }
        });
    }

    let listener = meshd_api::bind(&config.api_socket)?;
    let service = server::AgentService {
        config: config.clone(),
        started_ms,
        endpoints,
        publisher,
        view: view_status_rx,
        local_connection: local_conn_rx,
        remotes: registry_rx,
        reconciler: reconciled_rx,
        policies: policies_rx,
        monitor: monitor_handle,
        identities: identities_rx,
        routes: routes_rx,
        propagation_delay,
        health_checks: health_status_rx,
    };
    if let Some(listener) = metrics_listener {
        let service = service.clone();
        tracing::info!(addr = ?listener.local_addr().ok(), "serving /metrics");
        tokio::spawn(meshd_telemetry::metrics::serve(listener, move || {
            let service = service.clone();
            async move { service.metrics().await }
        }));
    }
    tracing::info!(socket = %config.api_socket.display(), cluster = %config.cluster, node = config.node, "agent ready");
    meshd_api::serve(&config.api_socket, listener, service, shutdown_signal()).await?;
    tracing::info!("shutting down; the datapath stays in place and the lease runs out unless the agent returns");
    Ok(ExitCode::SUCCESS)
}
