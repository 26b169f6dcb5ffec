//! The mirror's Prometheus metrics, per remote cluster (label `cluster`), rendered with the
//! apiserver's (`meshd_apiserver_mirror_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use meshd_state::CacheStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

/// Cheap to clone; shared by every remote's mirror.
#[derive(Clone, Default)]
pub struct MirrorMetrics {
    entries: Family<ClusterLabels, Gauge>,
    rejected: Family<ClusterLabels, Gauge>,
    limit: Family<ClusterLabels, Gauge>,
    over_limit: Family<ClusterLabels, Gauge>,
    degraded: Family<ClusterLabels, Gauge>,
    connected: Family<ClusterLabels, Gauge>,
    ready: Family<ClusterLabels, Gauge>,
    events: Family<ClusterLabels, Counter>,
}

fn labels(cluster: &str) -> ClusterLabels {
    ClusterLabels {
        cluster: cluster.to_owned(),
    }
}

impl MirrorMetrics {
    /// Shows `status`.
    pub fn set(&self, status: &CacheStatus) {
        let l = labels(&status.cluster);
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.entries.get_or_create(&l).set(g(status.entries));
        self.rejected.get_or_create(&l).set(g(status.rejected));
        self.limit.get_or_create(&l).set(g(status.limit));
        self.over_limit.get_or_create(&l).set(g(status.over_limit));
        self.degraded
            .get_or_create(&l)
            .set(i64::from(status.over_limit > 0));
        self.connected
            .get_or_create(&l)
            .set(i64::from(status.connected));
        self.ready.get_or_create(&l).set(i64::from(status.ready));
    }

    /// Counts `n` writes (puts and deletes) mirrored for `cluster`.
    pub fn mirrored(&self, cluster: &str, n: u64) {
        self.events.get_or_create(&labels(cluster)).inc_by(n);
    }

    /// A drained cluster leaves the metrics.
    pub fn forget(&self, cluster: &str) {
        let l = labels(cluster);
        self.entries.remove(&l);
        self.rejected.remove(&l);
        self.limit.remove(&l);
        self.over_limit.remove(&l);
        self.degraded.remove(&l);
        self.connected.remove(&l);
        self.ready.remove(&l);
        self.events.remove(&l);
    }

    /// Forgets every cluster (this replica stopped mirroring: another one leads).
    pub fn forget_all(&self) {
        for family in [
            &self.entries,
            &self.rejected,
            &self.limit,
            &self.connected,
            &self.ready,
        ] {
            family.clear();
        }
        self.events.clear();
    }

    /// Adds the families to `r` (help texts without a final period: the client adds one).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "mirror_entries",
            "Keys of the remote cluster in the local cache (kvstoremesh)",
            self.entries.clone(),
        );
        r.register(
            "mirror_rejected",
            "Keys of the remote cluster not mirrored since its last list: over the limit, not of that cluster, or with a value over the size bound",
            self.rejected.clone(),
        );
        r.register(
            "mirror_limit",
            "Keys mirrored from one remote cluster at most",
            self.limit.clone(),
        );
        r.register(
            "mirror_over_limit",
            "Keys of the remote cluster refused for the limit since its last list",
            self.over_limit.clone(),
        );
        r.register(
            "mirror_degraded",
            "1 while keys of the remote cluster are refused for the limit (the cache holds only part of it)",
            self.degraded.clone(),
        );
        r.register(
            "mirror_connected",
            "1 while the mirror reads the remote cluster's etcd",
            self.connected.clone(),
        );
        r.register(
            "mirror_ready",
            "1 once the remote's full list and its sync canaries are in the cache",
            self.ready.clone(),
        );
        r.register(
            "mirror_events",
            "Writes (puts and deletes) of the remote cluster's keys into the cache",
            self.events.clone(),
        );
    }
}
