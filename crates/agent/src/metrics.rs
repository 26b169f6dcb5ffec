//! The agent's Prometheus metrics: a registry built per scrape from the snapshots the tasks
//! already publish (the same ones `Status` reads), so a scrape takes no lock a task holds and
//! the tasks count nothing for it.

use meshd_api::pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use std::sync::atomic::AtomicU64;

/// A gauge of a float (seconds).
type Seconds = Gauge<f64, AtomicU64>;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EntryLabels {
    cluster: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    direction: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

/// `meshd_propagation_delay_seconds`: the one metric counted as things happen rather than read
/// from a snapshot. Clones share the counts (the reconciler observes, scrapes read).
#[derive(Clone, Debug)]
pub struct PropagationDelay(Histogram, std::sync::Arc<AtomicU64>);

/// From 0.5 ms, doubling, to about 16 s.
const PROPAGATION_BUCKETS: (f64, f64, u16) = (0.0005, 2.0, 16);

impl Default for PropagationDelay {
    fn default() -> Self {
        let (start, factor, n) = PROPAGATION_BUCKETS;
        Self(
            Histogram::new(exponential_buckets(start, factor, n)),
            Default::default(),
        )
    }
}

impl PropagationDelay {
    /// One cluster event (received at `since`) whose map writes are done now.
    pub fn observe(&self, since: std::time::Instant) {
        self.0.observe(since.elapsed().as_secs_f64());
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Events observed so far.
    pub fn count(&self) -> u64 {
        self.1.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// What one scrape shows: the remote clusters, the datapath and the identities known.
pub struct Snapshot<'a> {
    pub clusters: &'a [pb::ClusterStatus],
    pub datapath: &'a pb::DatapathStatus,
    pub identities: usize,
    /// Datapath events (flows, drops) not sent: over the rate limit or the ring full.
    pub events_lost: u64,
    /// Unix ms of the scrape, for ages.
    pub now_ms: u64,
    /// The routing mode and the node routes (`meshd status`'s routing lines).
    pub routing: &'a pb::RoutingStatus,
    pub propagation_delay: &'a PropagationDelay,
    /// The runtime worker's naps under churn (`event_moderation_us`).
    pub naps: crate::moderation::NapStats,
}

fn gauge_family<S, G>(registry: &mut Registry, name: &str, help: &str) -> Family<S, G>
where
    S: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    G: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let f = Family::<S, G>::default();
    registry.register(name, help, f.clone());
    f
}

fn counter_family<S>(registry: &mut Registry, name: &str, help: &str) -> Family<S, Counter>
where
    S: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let f = Family::<S, Counter>::default();
    registry.register(name, help, f.clone());
    f
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The text of `/metrics` for one snapshot. Pure.
pub fn render(s: &Snapshot<'_>) -> String {
    let mut r = Registry::with_prefix("meshd");

    let ready = gauge_family::<ClusterLabels, Gauge>(
        &mut r,
        "remote_cluster_ready",
        "1 when the remote cluster is ready (connected, synced, admitted, not stale), else 0.",
    );
    let connected = gauge_family::<ClusterLabels, Gauge>(
        &mut r,
        "remote_cluster_connected",
        "1 while the agent's watch of the remote cluster's etcd is connected.",
    );
    let denied = gauge_family::<ClusterLabels, Gauge>(
        &mut r,
        "remote_cluster_access_denied",
        "1 when the remote etcd refused the agent's certificate or read permission.",
    );
    let stale = gauge_family::<ClusterLabels, Gauge>(
        &mut r,
        "remote_cluster_stale",
        "1 while the remote cluster's entries are kept from before a lost connection.",
    );
    let rejected = counter_family::<ClusterLabels>(
        &mut r,
        "remote_cluster_rejected_entries",
        "Entries of the remote cluster refused (malformed, or claiming what is not theirs).",
    );
    let pending = gauge_family::<ClusterLabels, Gauge>(
        &mut r,
        "remote_cluster_pending_entries",
        "Entries of the remote cluster held back until what they need arrives (an entry's node, the cluster's config).",
    );
    let failures = counter_family::<ClusterLabels>(
        &mut r,
        "remote_cluster_failures",
        "Times the remote cluster's etcd became unreachable or refused access.",
    );
    let age = gauge_family::<ClusterLabels, Seconds>(
        &mut r,
        "remote_cluster_last_event_age_seconds",
        "Time since the last list or event received from the remote cluster (absent before the first).",
    );
    let entries = gauge_family::<EntryLabels, Gauge>(
        &mut r,
        "remote_cluster_entries",
        "Admitted entries of the remote cluster by kind.",
    );
    let malformed = counter_family::<EntryLabels>(
        &mut r,
        "remote_cluster_malformed_entries",
        "Entries of the remote cluster that did not decode (bad JSON, missing fields, a value over the size bound), by kind; also in rejected_entries.",
    );
    let degraded = gauge_family::<ClusterLabels, Gauge>(
        &mut r,
        "remote_cluster_degraded",
        "1 while keys of the remote cluster are refused for its entry limit (it is served, but not whole).",
    );
    let over_limit = counter_family::<ClusterLabels>(
        &mut r,
        "remote_cluster_over_limit_entries",
        "New keys of the remote cluster refused for its entry limit.",
    );
    let held = gauge_family::<ClusterLabels, Gauge>(
        &mut r,
        "remote_cluster_held_entries",
        "Keys of the remote cluster held by the agent, against its entry limit.",
    );
    let entry_limit = gauge_family::<ClusterLabels, Gauge>(
        &mut r,
        "remote_cluster_entry_limit",
        "Keys of the remote cluster held at most (remote_entry_limit; absent when unlimited).",
    );
    for c in s.clusters.iter().filter(|c| !c.local) {
        let l = ClusterLabels {
            cluster: c.name.clone(),
        };
        // The same word `meshd status` shows: a stale cluster was synced once but is not ready.
        // Degraded and synced is ready (served), with entries refused for the limit.
        let is_ready = match meshd_api::cluster_state(c) {
            "ready" => true,
            "degraded" => c.ready,
            _ => false,
        };
        ready.get_or_create(&l).set(i64::from(is_ready));
        connected.get_or_create(&l).set(i64::from(c.connected));
        denied.get_or_create(&l).set(i64::from(c.access_denied));
        stale
            .get_or_create(&l)
            .set(i64::from(c.stale_since_ms != 0));
        rejected.get_or_create(&l).inc_by(c.rejected);
        pending.get_or_create(&l).set(gauge(c.pending));
        failures.get_or_create(&l).inc_by(c.failures);
        if c.last_sync_ms != 0 {
            age.get_or_create(&l)
                .set(s.now_ms.saturating_sub(c.last_sync_ms) as f64 / 1000.0);
        }
        degraded
            .get_or_create(&l)
            .set(i64::from(!c.degraded.is_empty()));
        over_limit.get_or_create(&l).inc_by(c.over_limit);
        held.get_or_create(&l).set(gauge(c.entries_held));
        if c.entry_limit != 0 {
            entry_limit.get_or_create(&l).set(gauge(c.entry_limit));
        }
        for (kind, n) in &c.malformed {
            malformed
                .get_or_create(&EntryLabels {
                    cluster: c.name.clone(),
                    kind: kind.clone(),
                })
                .inc_by(*n);
        }
        for (kind, n) in [
            ("nodes", c.nodes),
            ("endpoints", c.endpoints),
            ("identities", c.identities),
        ] {
            entries
                .get_or_create(&EntryLabels {
                    cluster: c.name.clone(),
                    kind: kind.to_owned(),
                })
                .set(gauge(n));
        }
    }

    let forwarded = counter_family::<PacketLabels>(
        &mut r,
        "datapath_forwarded_packets",
        "Packets the datapath forwarded, by path (reason) and direction.",
    );
    let dropped = counter_family::<PacketLabels>(
        &mut r,
        "datapath_dropped_packets",
        "Packets the datapath dropped, by reason and direction.",
    );
    for c in &s.datapath.counters {
        let family = if c.reason < 0 { &dropped } else { &forwarded };
        family
            .get_or_create(&PacketLabels {
                direction: c.direction.clone(),
                reason: c.reason_name.clone(),
            })
            .inc_by(c.packets);
    }

    let maps = gauge_family::<MapLabels, Gauge>(
        &mut r,
        "datapath_map_entries",
        "Entries in each datapath map.",
    );
    let capacity = gauge_family::<MapLabels, Gauge>(
        &mut r,
        "datapath_map_capacity",
        "Entries each datapath map can hold; entries / capacity is its pressure.",
    );
    let d = s.datapath;
    use meshd_ebpf::abi;
    // The ipcache spans two maps, the /32 hash and the LPM trie of prefixes; nearly every entry
    // is an endpoint's /32, so the hash map's capacity is the one that fills.
    for (map, n, max) in [
        ("ipcache", d.ipcache_entries, abi::IPCACHE_HOSTS_MAX),
        ("endpoints", d.endpoint_entries, abi::ENDPOINTS_MAX),
        ("nodes", d.node_entries, abi::NODES_MAX),
        ("policy", d.policy_entries, abi::POLICY_MAX),
        ("services", d.service_entries, abi::SERVICES_MAX),
        ("conntrack", d.ct_entries, abi::CT_MAX),
        ("nat", d.nat_entries, abi::NAT_MAX),
    ] {
        let l = MapLabels {
            map: map.to_owned(),
        };
        maps.get_or_create(&l).set(gauge(n));
        capacity.get_or_create(&l).set(i64::from(max));
    }

    counter(
        &mut r,
        "reconciler_rounds",
        "Batches of operations the reconciler applied to the maps (incremental or full).",
        d.reconciles,
    );
    counter(
        &mut r,
        "reconciler_operations",
        "Map operations the reconciler applied.",
        d.ops_applied,
    );
    counter(
        &mut r,
        "reconciler_full_diffs",
        "Full read-back diffs of the maps (start, after failed writes, safety net).",
        d.full_diffs,
    );
    counter(
        &mut r,
        "reconciler_corrections",
        "Writes the safety-net diff had to make; stays 0 unless something is wrong.",
        d.corrections,
    );
    counter(
        &mut r,
        "reconciler_failed_writes",
        "Map writes that failed (each retried by a full diff).",
        d.failed_writes,
    );
    counter(
        &mut r,
        "datapath_events_lost",
        "Flow and drop events the datapath did not send (over its per-CPU rate limit, or its ring buffer full); the packets themselves are counted.",
        s.events_lost,
    );
    counter(
        &mut r,
        "worker_naps",
        "Naps the runtime worker took before parking under churn (event_moderation_us), gathering events into fewer wake-ups.",
        s.naps.naps,
    );
    let nap_seconds: Counter<f64, AtomicU64> = Counter::default();
    nap_seconds.inc_by(s.naps.nap_micros as f64 / 1e6);
    r.register(
        "worker_nap_seconds",
        "Time the runtime worker spent in those naps.",
        nap_seconds,
    );
    counter(
        &mut r,
        "worker_nap_backoffs",
        "Times naps turned themselves off for a few wake-ups because they gathered one event each (changes made one at a time).",
        s.naps.backoffs,
    );
    let rt = s.routing;
    if rt.auto_direct_node_routes && rt.mode == "native" {
        let installed: Gauge = Gauge::default();
        installed.set(gauge(rt.routes_installed));
        r.register(
            "node_routes_installed",
            "The agent's node routes (auto_direct_node_routes) in the table.",
            installed,
        );
        let skipped: Gauge = Gauge::default();
        skipped.set(gauge(rt.skipped_nodes.len() as u64));
        r.register(
            "node_routes_skipped_nodes",
            "Nodes given no direct route: not on the uplink's segment (behind a gateway).",
            skipped,
        );
        counter(
            &mut r,
            "node_route_failures",
            "Node route changes that failed (each retried; `meshd status` shows the last ones).",
            rt.route_failures,
        );
    }
    r.register(
        "propagation_delay_seconds",
        "Time from a cluster's change arriving at the agent (its etcd watch event, decoded) to the datapath map writes it causes being done; incremental writes only (a full diff at start or after a failure is not timed). Records carry no write time, so the time in etcd and on the wire is not included.",
        s.propagation_delay.0.clone(),
    );
    let identities: Gauge = Gauge::default();
    identities.set(gauge(s.identities as u64));
    r.register(
        "identities",
        "Security identities known to the agent, local and remote.",
        identities,
    );

    meshd_telemetry::metrics::encode(&r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_clusters_and_drops_are_labelled() {
        let clusters = vec![
            pb::ClusterStatus {
                name: "c1".into(),
                local: true,
                ready: true,
                ..Default::default()
            },
            pb::ClusterStatus {
                name: "c2".into(),
                ready: true,
                connected: true,
                stale_since_ms: 5,
                nodes: 2,
                failures: 3,
                last_sync_ms: 1_500,
                ..Default::default()
            },
            pb::ClusterStatus {
                name: "c3".into(),
                ready: true,
                connected: true,
                ..Default::default()
            },
            // Over its entry limit, with undecodable entries.
            pb::ClusterStatus {
                name: "c4".into(),
                ready: true,
                connected: true,
                entry_limit: 2000,
                entries_held: 2000,
                over_limit: 77,
                degraded: "over its entry limit".into(),
                malformed: [("ipcache".to_owned(), 3)].into(),
                rejected: 3,
                ..Default::default()
            },
        ];
        let datapath = pb::DatapathStatus {
            counters: vec![
                pb::DatapathCounter {
                    direction: "ingress".into(),
                    reason: meshd_ebpf::abi::DROP_POLICY,
                    reason_name: "policy-denied".into(),
                    packets: 3,
                    bytes: 300,
                },
                pb::DatapathCounter {
                    direction: "egress".into(),
                    reason: meshd_ebpf::abi::FWD_TUNNEL,
                    reason_name: "forwarded-tunnel".into(),
                    packets: 7,
                    bytes: 700,
                },
            ],
            ipcache_entries: 4,
            ct_entries: 10,
            ops_applied: 12,
            corrections: 1,
            ..Default::default()
        };
        let text = render(&Snapshot {
            clusters: &clusters,
            datapath: &datapath,
            identities: 6,
            events_lost: 9,
            now_ms: 4_000,
            routing: &pb::RoutingStatus {
                mode: "native".into(),
                auto_direct_node_routes: true,
                routes_installed: 3,
                skipped_nodes: vec!["node c1/n3 ...".into()],
                route_failures: 2,
                ..Default::default()
            },
            propagation_delay: &{
                let delay = PropagationDelay::default();
                delay.observe(std::time::Instant::now());
                delay
            },
            naps: crate::moderation::NapStats {
                naps: 4,
                nap_micros: 2_500,
                backoffs: 1,
            },
        });
        for line in [
            "meshd_remote_cluster_ready{cluster=\"c2\"} 0",
            "meshd_node_routes_installed 3",
            "meshd_node_routes_skipped_nodes 1",
            "meshd_node_route_failures_total 2",
            "meshd_remote_cluster_stale{cluster=\"c2\"} 1",
            "meshd_remote_cluster_ready{cluster=\"c3\"} 1",
            "meshd_remote_cluster_entries{cluster=\"c2\",kind=\"nodes\"} 2",
            "meshd_datapath_dropped_packets_total{direction=\"ingress\",reason=\"policy-denied\"} 3",
            "meshd_datapath_forwarded_packets_total{direction=\"egress\",reason=\"forwarded-tunnel\"} 7",
            "meshd_datapath_map_entries{map=\"ipcache\"} 4",
            "meshd_reconciler_corrections_total 1",
            "meshd_identities 6",
            "meshd_propagation_delay_seconds_count 1",
            "meshd_propagation_delay_seconds_bucket{le=\"16.384\"} 1",
            "meshd_datapath_events_lost_total 9",
            "meshd_remote_cluster_failures_total{cluster=\"c2\"} 3",
            "meshd_remote_cluster_ready{cluster=\"c4\"} 1",
            "meshd_remote_cluster_degraded{cluster=\"c4\"} 1",
            "meshd_remote_cluster_degraded{cluster=\"c3\"} 0",
            "meshd_remote_cluster_over_limit_entries_total{cluster=\"c4\"} 77",
            "meshd_remote_cluster_held_entries{cluster=\"c4\"} 2000",
            "meshd_remote_cluster_entry_limit{cluster=\"c4\"} 2000",
            "meshd_remote_cluster_malformed_entries_total{cluster=\"c4\",kind=\"ipcache\"} 3",
            "meshd_remote_cluster_last_event_age_seconds{cluster=\"c2\"} 2.5",
            "meshd_datapath_map_entries{map=\"conntrack\"} 10",
            "meshd_datapath_map_capacity{map=\"conntrack\"} 262144",
            "meshd_reconciler_operations_total 12",
            "meshd_worker_naps_total 4",
            "meshd_worker_nap_seconds_total 0.0025",
            "meshd_worker_nap_backoffs_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        assert!(
            !text.contains("cluster=\"c1\""),
            "the local cluster is no remote:\n{text}"
        );
    }
}
