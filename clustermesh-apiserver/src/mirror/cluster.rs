//! One remote cluster's mirror: list, write the difference in order, watch, fail-static.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use meshd_kvstore::{
    Backend, Backoff, EventKind, KeyValue, KvError, TxnOp, WatchMessage, MAX_VALUE_BYTES,
};
use meshd_state::keys::{
    cache_key, cache_prefix, CLUSTER_CONFIG_PREFIX, SHARED_STATE_PREFIXES, STATE_PREFIX,
    SYNCED_PREFIX,
};
use meshd_state::{CacheStatus, ClusterConfig, ClusterId, ClusterName};

use super::{drain, now_ms, write_batches, write_status, MirrorConfig, MirrorMetrics};

/// Watch events gathered into one write at most (several transactions of `batch` each).
const COALESCE_EVENTS: usize = 4096;

/// What a remote key is to the mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Class {
    /// `meshd/cluster-config/<cluster>`
    Config,
    /// `meshd/state/<kind>/<version>/<cluster>/...`
    State(String),
    /// `meshd/synced/<cluster>/<resource>`
    Canary(String),
    /// Under a watched prefix, but of another cluster or malformed: refused and counted.
    Foreign,
    /// Another cluster's config (under the config prefix): not mirrored, not counted.
    Ignored,
}

pub(crate) fn classify(cluster: &str, key: &str) -> Class {
    if let Some(rest) = key.strip_prefix(CLUSTER_CONFIG_PREFIX) {
        return if rest == cluster {
            Class::Config
        } else {
            Class::Ignored
        };
    }
    if let Some(rest) = key.strip_prefix(STATE_PREFIX) {
        let mut parts = rest.splitn(4, '/');
        let (kind, version, owner, tail) = (parts.next(), parts.next(), parts.next(), parts.next());
        return match (kind, version, owner, tail) {
            (Some(k), Some(v), Some(o), Some(t))
                if !k.is_empty() && !v.is_empty() && o == cluster && !t.is_empty() =>
            {
                Class::State(k.to_owned())
            }
            _ => Class::Foreign,
        };
    }
    if let Some(rest) = key.strip_prefix(SYNCED_PREFIX) {
        return match rest.split_once('/') {
            Some((o, r)) if o == cluster && !r.is_empty() && !r.contains('/') => {
                Class::Canary(r.to_owned())
            }
            _ => Class::Foreign,
        };
    }
    Class::Foreign
}

/// A state entry or canary whose value is over the size bound agents hold values to: the mirror
/// neither copies it nor lets it count against the limit. (The cluster config is checked by
/// decoding it, whatever its size: one key.)
fn oversized(class: &Class, value: &[u8]) -> bool {
    matches!(class, Class::State(_) | Class::Canary(_)) && value.len() > MAX_VALUE_BYTES
}

/// Whether `now` must be written over `written` (the status last written, `since` ago): at
/// once when its state changed, after `refresh` when only its counters and times did.
fn status_due(
    written: Option<&CacheStatus>,
    now: &CacheStatus,
    since: Duration,
    refresh: Duration,
) -> bool {
    let Some(written) = written else {
        return true;
    };
    if written == now {
        return false;
    }
    let state = |s: &CacheStatus| {
        (
            s.connected,
            s.ready,
            s.stale_since,
            s.limit,
            // Degraded or not (agents show it at once); the count itself is a counter.
            s.over_limit > 0,
            s.last_error.clone(),
        )
    };
    state(written) != state(now) || since >= refresh
}

fn fingerprint(value: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// One list's admission so far.
#[derive(Default)]
struct Listed {
    admitted: u64,
    rejected: u64,
    /// Of `rejected`: over the limit, and with a value over the size bound.
    over_limit: u64,
    oversized: u64,
    /// Cache keys the list has (what the sweep keeps).
    keep: std::collections::HashSet<String>,
    /// Canaries, written after everything else: (cache key, value, resource).
    canaries: Vec<(String, Vec<u8>, String)>,
}

/// A task aborted when dropped (a page fetch nobody waits for any more).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a session with the remote ended.
#[derive(Debug)]
enum End {
    /// Compacted, another etcd cluster id, or a withheld canary may be complete again: list
    /// again at once.
    Relist,
    /// The remote's cluster id changed: drain, then list again.
    IdChanged { old: ClusterId, new: ClusterId },
}

#[derive(Debug)]
enum Fail {
    /// The remote cannot be read (unreachable, refused, a watch ended).
    Remote(String),
    /// The local etcd refused a write.
    Local(String),
    /// The remote is not the cluster its file names, or carries the local cluster's id:
    /// drained, and tried again later.
    Refused(String),
}

fn remote_err(e: KvError) -> Fail {
    Fail::Remote(e.to_string())
}

fn local_err(e: KvError) -> Fail {
    Fail::Local(format!("local etcd: {e}"))
}

/// Mirrors one remote cluster `R` into the local store `L`.
pub struct ClusterMirror<R, L> {
    cluster: ClusterName,
    remote: R,
    local: L,
    config: Arc<MirrorConfig>,
    metrics: MirrorMetrics,
    status: CacheStatus,
    /// The status as last written (nothing is written while it stays the same), and when.
    written: Option<CacheStatus>,
    written_at: Instant,
    /// What the cache holds for this remote: cache key -> fingerprint of its value.
    cached: HashMap<String, u64>,
    /// Resources whose canary is withheld: an entry of theirs was refused.
    withheld: BTreeSet<String>,
    /// The remote's cluster id, as last seen.
    remote_id: Option<ClusterId>,
    config_key: String,
    /// What is read of the remote besides its config: `<kind prefix><cluster>/` for every
    /// shared kind, in key order, then `meshd/synced/<cluster>/`. Only the cluster's own
    /// keys: an etcd holding other clusters' state too sends none of their changes here.
    state_prefixes: Vec<String>,
    synced_prefix: String,
    last_list: Instant,
}

impl<R: Backend, L: Backend> ClusterMirror<R, L> {
    pub fn new(
        cluster: ClusterName,
        remote: R,
        local: L,
        config: Arc<MirrorConfig>,
        metrics: MirrorMetrics,
    ) -> Self {
        let status = CacheStatus {
            cluster: cluster.to_string(),
            limit: config.limit,
            ..Default::default()
        };
        let config_key = format!("{CLUSTER_CONFIG_PREFIX}{cluster}");
        let state_prefixes = SHARED_STATE_PREFIXES
            .iter()
            .map(|p| format!("{p}{cluster}/"))
            .collect();
        let synced_prefix = format!("{SYNCED_PREFIX}{cluster}/");
        Self {
            cluster,
            remote,
            local,
            config,
            metrics,
            status,
            written: None,
            written_at: Instant::now(),
            cached: HashMap::new(),
            withheld: BTreeSet::new(),
            remote_id: None,
            config_key,
            state_prefixes,
            synced_prefix,
            last_list: Instant::now(),
        }
    }

    /// Runs until aborted.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(self.config.backoff);
        self.restore().await;
        loop {
            let started = Instant::now();
            let result = self.session().await;
            if started.elapsed() >= self.config.backoff.max {
                backoff.reset();
            }
            match result {
                Ok(End::Relist) => continue,
                Ok(End::IdChanged { old, new }) => {
                    tracing::warn!(cluster = %self.cluster, %old, %new, "remote cluster id changed; draining the cache and mirroring again");
                    if let Err(e) = self.drain().await {
                        self.failed(Fail::Local(format!("local etcd: {e}"))).await;
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
                Err(fail) => {
                    let refused = matches!(fail, Fail::Refused(_));
                    self.failed(fail).await;
                    if refused {
                        if let Err(e) = self.drain().await {
                            tracing::warn!(cluster = %self.cluster, error = %e, "draining a refused remote");
                        }
                        let _ = self.flush_status().await;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// After a restart: what the cache and the last status say, so that a remote unreachable
    /// from the start stays what it was (ready, stale since when, its entries) rather than
    /// looking empty and never synced. Best effort: the first list replaces it all.
    async fn restore(&mut self) {
        let key = meshd_state::keys::cache_status_key(self.cluster.as_str());
        if let Ok(page) = self.local.range(&key, None, 0, 1).await {
            let last = page
                .kvs
                .into_iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| serde_json::from_slice::<CacheStatus>(&kv.value).ok());
            if let Some(last) = last {
                self.status = CacheStatus {
                    cluster: self.status.cluster.clone(),
                    connected: false,
                    limit: self.config.limit,
                    lag_ms: 0,
                    ..last
                };
                self.written = Some(self.status.clone());
            }
        }
        if let Ok(cached) = self.read_cache().await {
            self.cached = cached;
        }
    }

    async fn drain(&mut self) -> Result<(), KvError> {
        drain(&self.local, self.cluster.as_str(), self.config.batch).await?;
        self.cached.clear();
        self.withheld.clear();
        self.remote_id = None;
        self.written = None;
        self.status.ready = false;
        self.status.entries = 0;
        self.status.rejected = 0;
        self.status.over_limit = 0;
        self.status.oversized = 0;
        self.update_metrics();
        Ok(())
    }

    /// Records a failure: fail-static, the entries stay.
    async fn failed(&mut self, fail: Fail) {
        let (text, remote) = match fail {
            Fail::Remote(e) => (e, true),
            Fail::Refused(e) => {
                self.status.ready = false;
                (e, true)
            }
            Fail::Local(e) => (e, false),
        };
        tracing::warn!(cluster = %self.cluster, error = %text, "mirroring remote cluster");
        if remote {
            self.status.connected = false;
            self.status.stale_since.get_or_insert_with(now_ms);
        }
        self.status.last_error = Some(text);
        self.update_metrics();
        if let Err(e) = self.flush_status().await {
            tracing::debug!(cluster = %self.cluster, error = %e, "writing the status");
        }
    }

    fn update_metrics(&self) {
        self.metrics.set(&self.status);
    }

    async fn flush_status(&mut self) -> Result<(), KvError> {
        self.status.entries = self.cached.len() as u64;
        let due = status_due(
            self.written.as_ref(),
            &self.status,
            self.written_at.elapsed(),
            self.config.status_refresh,
        );
        if !due {
            return Ok(());
        }
        write_status(&self.local, &self.status).await?;
        self.written = Some(self.status.clone());
        self.written_at = Instant::now();
        Ok(())
    }

    /// Every key under `prefix` of the remote at `revision` (0: the latest).
    async fn list_remote(
        &self,
        prefix: &str,
        revision: i64,
    ) -> Result<(Vec<KeyValue>, meshd_kvstore::Header), KvError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .remote
                .range(prefix, after.as_deref(), revision, self.config.page_size)
                .await?;
            let header = page.header;
            let next = match (page.more, page.kvs.last()) {
                (true, Some(last)) => Some(last.key.clone()),
                _ => None,
            };
            out.extend(page.kvs);
            match next {
                Some(k) => after = Some(k),
                None => return Ok((out, header)),
            }
        }
    }

    /// What the cache holds for this remote now.
    async fn read_cache(&self) -> Result<HashMap<String, u64>, KvError> {
        let prefix = cache_prefix(self.cluster.as_str());
        let mut out = HashMap::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.local.range(&prefix, after.as_deref(), 0, 5000).await?;
            for kv in &page.kvs {
                out.insert(kv.key.clone(), fingerprint(&kv.value));
            }
            match (page.more, page.kvs.last()) {
                (true, Some(last)) => after = Some(last.key.clone()),
                _ => return Ok(out),
            }
        }
    }

    /// Checks the remote's cluster config; its id.
    fn check_config(&self, value: &[u8]) -> Result<ClusterId, Fail> {
        let (_, cfg) = meshd_state::decode::<ClusterConfig>(&self.config_key, value)
            .map_err(|e| Fail::Refused(format!("cluster {}: {e}", self.cluster)))?;
        if cfg.name != self.cluster {
            return Err(Fail::Refused(format!(
                "cluster {}: its cluster config names it {:?}",
                self.cluster,
                cfg.name.as_str()
            )));
        }
        if cfg.id == self.config.local_id {
            return Err(Fail::Refused(format!(
                "cluster {}: cluster id {} is the local cluster's id",
                self.cluster, cfg.id
            )));
        }
        Ok(cfg.id)
    }

    /// One list, then the watch until it ends.
    async fn session(&mut self) -> Result<End, Fail> {
        // The cluster config first: it fixes the revision every other list reads at.
        let (configs, header) = self
            .list_remote(CLUSTER_CONFIG_PREFIX, 0)
            .await
            .map_err(remote_err)?;
        let revision = header.revision;
        let etcd_cluster = header.cluster_id;
        let own = configs.iter().find(|kv| kv.key == self.config_key);
        match own {
            Some(kv) => {
                let id = self.check_config(&kv.value)?;
                // The cache of an earlier run (or session) may hold another id.
                let ck = cache_key(self.cluster.as_str(), &self.config_key).expect("under meshd/");
                let cached_id = self
                    .local
                    .range(&ck, None, 0, 1)
                    .await
                    .map_err(local_err)?
                    .kvs
                    .into_iter()
                    .find(|c| c.key == ck)
                    .and_then(|c| {
                        meshd_state::decode::<ClusterConfig>(&self.config_key, &c.value).ok()
                    })
                    .map(|(_, c)| c.id);
                if let Some(old) = cached_id.or(self.remote_id) {
                    if old != id {
                        return Ok(End::IdChanged { old, new: id });
                    }
                }
                self.remote_id = Some(id);
            }
            None => {
                if let Some(other) = configs.first() {
                    return Err(Fail::Refused(format!(
                        "cluster {}: its etcd publishes the cluster config of {:?}, not its own (a file named after the wrong cluster?)",
                        self.cluster,
                        other.key.strip_prefix(CLUSTER_CONFIG_PREFIX).unwrap_or(&other.key)
                    )));
                }
            }
        }
        self.status.connected = true;
        self.status.stale_since = None;
        self.status.last_error = None;
        if let Some(end) = self.list_into_cache(configs, revision).await? {
            return Ok(end);
        }
        self.last_list = Instant::now();
        self.flush_status().await.map_err(local_err)?;
        tracing::info!(cluster = %self.cluster, revision, entries = self.cached.len(), rejected = self.status.rejected, ready = self.status.ready, "remote cluster listed into the cache");
        self.watch(revision, etcd_cluster).await
    }

    /// Admits listed keys in order: counts them against the limit (withholding the canary of
    /// a resource that lost one), keeps canaries aside (written last), and returns the puts of
    /// the entries the cache does not hold as they are.
    fn admit(&mut self, list: &mut Listed, kvs: Vec<KeyValue>) -> Vec<TxnOp> {
        let cluster = self.cluster.as_str();
        let mut puts = Vec::new();
        for kv in kvs {
            let class = classify(cluster, &kv.key);
            match &class {
                Class::Ignored => continue,
                Class::Foreign => {
                    list.rejected += 1;
                    continue;
                }
                _ => {}
            }
            if oversized(&class, &kv.value) {
                // Not copied (agents would refuse it unread), and not held against the limit;
                // what the cache held of the key is swept, since the remote no longer has it.
                list.rejected += 1;
                list.oversized += 1;
                continue;
            }
            if list.admitted >= self.config.limit {
                list.rejected += 1;
                list.over_limit += 1;
                if let Class::State(r) | Class::Canary(r) = class {
                    self.withheld.insert(r);
                }
                continue;
            }
            list.admitted += 1;
            let ck = cache_key(cluster, &kv.key).expect("watched prefixes are under meshd/");
            match class {
                Class::Canary(r) => list.canaries.push((ck, kv.value, r)),
                _ => {
                    if self.cached.get(&ck) != Some(&fingerprint(&kv.value)) {
                        puts.push(TxnOp::put(ck.clone(), kv.value));
                    }
                    list.keep.insert(ck);
                }
            }
        }
        puts
    }

    /// Lists the remote at `revision` into the cache: its config, then its state kind by kind
    /// and page by page (each page written while the next one is fetched), then the sweep,
    /// then the canaries.
    /// `Some(Relist)` when the revision was compacted meanwhile.
    async fn list_into_cache(
        &mut self,
        configs: Vec<KeyValue>,
        revision: i64,
    ) -> Result<Option<End>, Fail> {
        let cluster = self.cluster.to_string();
        self.cached = self.read_cache().await.map_err(local_err)?;
        self.withheld.clear();
        let mut list = Listed::default();
        let mut writes = 0u64;
        let puts = self.admit(&mut list, configs);
        writes += puts.len() as u64;
        self.apply_ops(puts).await?;

        let (remote, size) = (self.remote.clone(), self.config.page_size);
        let fetch = |prefix: String, after: Option<String>| {
            let remote = remote.clone();
            AbortOnDrop(tokio::spawn(async move {
                remote
                    .range(&prefix, after.as_deref(), revision, size)
                    .await
            }))
        };
        for prefix in self.state_prefixes.clone() {
            let mut next = Some(fetch(prefix.clone(), None));
            while let Some(mut task) = next.take() {
                let page = match (&mut task.0).await {
                    Ok(Ok(page)) => page,
                    // Compacted between the first read and this one: list again, at once.
                    Ok(Err(KvError::Compacted { .. })) => return Ok(Some(End::Relist)),
                    Ok(Err(e)) => return Err(remote_err(e)),
                    Err(e) => return Err(Fail::Remote(format!("a page fetch failed: {e}"))),
                };
                if let (true, Some(last)) = (page.more, page.kvs.last()) {
                    next = Some(fetch(prefix.clone(), Some(last.key.clone())));
                }
                let puts = self.admit(&mut list, page.kvs);
                writes += puts.len() as u64;
                self.apply_ops(puts).await?;
            }
        }
        let synced = match self.list_remote(&self.synced_prefix, revision).await {
            Ok((kvs, _)) => kvs,
            Err(KvError::Compacted { .. }) => return Ok(Some(End::Relist)),
            Err(e) => return Err(remote_err(e)),
        };
        let no_puts = self.admit(&mut list, synced);
        debug_assert!(no_puts.is_empty(), "canaries are kept aside");
        if list.rejected > 0 {
            tracing::warn!(%cluster, rejected = list.rejected, limit = self.config.limit, withheld = ?self.withheld, "remote keys refused (over the limit or not of this cluster)");
        }
        let mut canary_puts = Vec::new();
        for (ck, value, r) in std::mem::take(&mut list.canaries) {
            if self.withheld.contains(&r) {
                continue;
            }
            if self.cached.get(&ck) != Some(&fingerprint(&value)) {
                canary_puts.push(TxnOp::put(ck.clone(), value));
            }
            list.keep.insert(ck);
        }
        let sweep: Vec<TxnOp> = self
            .cached
            .keys()
            .filter(|k| !list.keep.contains(k.as_str()))
            .map(|k| TxnOp::delete(k.clone()))
            .collect();
        writes += (sweep.len() + canary_puts.len()) as u64;
        // Canaries that go, before the entries they covered.
        let canary_prefix = format!("{}synced/", cache_prefix(&cluster));
        let (canary_deletes, sweep): (Vec<TxnOp>, Vec<TxnOp>) = sweep
            .into_iter()
            .partition(|op| op.key().starts_with(&canary_prefix));
        for ops in [canary_deletes, sweep, canary_puts] {
            self.apply_ops(ops).await?;
        }
        self.metrics.mirrored(cluster.as_str(), writes);
        self.status.rejected = list.rejected;
        self.status.over_limit = list.over_limit;
        self.status.oversized = list.oversized;
        self.status.ready = self.withheld.is_empty();
        self.status.last_sync_unix_ms = now_ms();
        self.update_metrics();
        Ok(None)
    }

    /// Writes `ops` in batches, keeping `cached` in step.
    async fn apply_ops(&mut self, ops: Vec<TxnOp>) -> Result<(), Fail> {
        let updates: Vec<(String, Option<u64>)> = ops
            .iter()
            .map(|op| match op {
                TxnOp::Put { key, value, .. } => (key.clone(), Some(fingerprint(value))),
                TxnOp::Delete { key } => (key.clone(), None),
            })
            .collect();
        write_batches(&self.local, ops, self.config.batch)
            .await
            .map_err(local_err)?;
        for (k, fp) in updates {
            match fp {
                Some(fp) => {
                    self.cached.insert(k, fp);
                }
                None => {
                    self.cached.remove(&k);
                }
            }
        }
        self.status.entries = self.cached.len() as u64;
        Ok(())
    }

    /// Watches what the list read, from after it.
    async fn watch(&mut self, revision: i64, etcd_cluster: u64) -> Result<End, Fail> {
        let mut streams = Vec::new();
        let prefixes = self
            .state_prefixes
            .iter()
            .chain([&self.synced_prefix, &self.config_key]);
        for prefix in prefixes {
            streams.push(
                self.remote
                    .watch(prefix, revision + 1)
                    .await
                    .map_err(remote_err)?,
            );
        }
        let mut merged = futures::stream::select_all(streams);
        let mut probe = tokio::time::interval(self.config.probe);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.tick().await;
        loop {
            tokio::select! {
                msg = merged.next() => match msg {
                    None => return Err(Fail::Remote("the watch ended".into())),
                    Some(Err(e)) => return Err(remote_err(e)),
                    Some(Ok(WatchMessage::Compacted { compact_revision })) => {
                        tracing::info!(cluster = %self.cluster, compact_revision, "remote watch compacted; listing again");
                        return Ok(End::Relist);
                    }
                    Some(Ok(WatchMessage::Events { header, mut events })) => {
                        if header.cluster_id != 0 && header.cluster_id != etcd_cluster {
                            tracing::warn!(cluster = %self.cluster, "the remote etcd's cluster id changed; listing again");
                            return Ok(End::Relist);
                        }
                        // What else has arrived meanwhile goes into the same write: under a
                        // steady stream of small watch responses, one transaction each made
                        // the local etcd's commit latency the mirror's rate, and a backlog
                        // (seconds of lag at 1,000 changes/s) built up behind it.
                        let mut after: Option<Option<Result<WatchMessage, KvError>>> = None;
                        while events.len() < COALESCE_EVENTS {
                            match merged.next().now_or_never() {
                                Some(Some(Ok(WatchMessage::Events { header, events: more })))
                                    if header.cluster_id == 0 || header.cluster_id == etcd_cluster =>
                                {
                                    events.extend(more);
                                }
                                Some(other) => {
                                    after = Some(other);
                                    break;
                                }
                                None => break,
                            }
                        }
                        if let Some(end) = self.apply_events(events).await? {
                            return Ok(end);
                        }
                        match after {
                            None => {}
                            Some(None) => return Err(Fail::Remote("the watch ended".into())),
                            Some(Some(Err(e))) => return Err(remote_err(e)),
                            // Compacted, or another etcd cluster behind the address.
                            Some(Some(Ok(_))) => {
                                tracing::info!(cluster = %self.cluster, "remote watch compacted or its etcd replaced; listing again");
                                return Ok(End::Relist);
                            }
                        }
                    }
                },
                _ = probe.tick() => {
                    self.remote
                        .range(&self.config_key, None, 0, 1)
                        .await
                        .map_err(remote_err)?;
                    self.flush_status().await.map_err(local_err)?;
                    // Room again for what was refused: a relist restores the withheld canaries.
                    if !self.withheld.is_empty()
                        && (self.cached.len() as u64) < self.config.limit
                        && self.last_list.elapsed() >= Duration::from_secs(30)
                    {
                        return Ok(End::Relist);
                    }
                }
            }
        }
    }

    /// Mirrors one batch of watch events.
    async fn apply_events(
        &mut self,
        events: Vec<meshd_kvstore::RawEvent>,
    ) -> Result<Option<End>, Fail> {
        if events.is_empty() {
            return Ok(None);
        }
        let received = Instant::now();
        let cluster = self.cluster.to_string();
        // The last operation per cache key (etcd refuses a key twice in one transaction).
        let mut pending: HashMap<String, Option<Vec<u8>>> = HashMap::new();
        let mut order: Vec<(String, bool)> = Vec::new();
        let mut count = self.cached.len() as u64;
        let mut new_canary = false;
        for ev in events {
            let class = classify(&cluster, &ev.kv.key);
            let mut put = ev.kind == EventKind::Put;
            if put && oversized(&class, &ev.kv.value) {
                // As a delete: the cache must not keep the key's older value either.
                self.status.rejected += 1;
                self.status.oversized += 1;
                put = false;
            }
            let canary = match &class {
                Class::Ignored => continue,
                Class::Foreign => {
                    if put {
                        self.status.rejected += 1;
                    }
                    continue;
                }
                Class::Config => {
                    if put {
                        let id = self.check_config(&ev.kv.value)?;
                        if let Some(old) = self.remote_id {
                            if old != id {
                                return Ok(Some(End::IdChanged { old, new: id }));
                            }
                        }
                        self.remote_id = Some(id);
                    }
                    false
                }
                Class::Canary(r) => {
                    if put && self.withheld.contains(r) {
                        continue;
                    }
                    if put
                        && !self
                            .cached
                            .contains_key(&cache_key(&cluster, &ev.kv.key).expect("under meshd/"))
                    {
                        // A new canary (a publisher's first sync completing): the entries it
                        // covers may still be on their way through the state watch, which etcd
                        // does not order with this one. A relist writes them first.
                        new_canary = true;
                        continue;
                    }
                    true
                }
                Class::State(_) => false,
            };
            let ck = cache_key(&cluster, &ev.kv.key).expect("watched prefixes are under meshd/");
            let exists = match pending.get(&ck) {
                Some(v) => v.is_some(),
                None => self.cached.contains_key(&ck),
            };
            if put {
                if !exists && count >= self.config.limit {
                    self.status.rejected += 1;
                    self.status.over_limit += 1;
                    let resource = match &class {
                        Class::State(k) | Class::Canary(k) => Some(k.clone()),
                        _ => None,
                    };
                    if let Some(r) = resource {
                        if self.withheld.insert(r.clone()) {
                            tracing::warn!(%cluster, resource = %r, limit = self.config.limit, "remote over the limit; withholding the canary of the resource");
                            let canary_key =
                                format!("{}synced/{cluster}/{r}", cache_prefix(&cluster));
                            let canary_exists = match pending.get(&canary_key) {
                                Some(v) => v.is_some(),
                                None => self.cached.contains_key(&canary_key),
                            };
                            if canary_exists {
                                if !pending.contains_key(&canary_key) {
                                    order.push((canary_key.clone(), true));
                                }
                                pending.insert(canary_key, None);
                                count -= 1;
                            }
                        }
                        self.status.ready = false;
                    }
                    continue;
                }
                if !exists {
                    count += 1;
                }
                if !pending.contains_key(&ck) {
                    order.push((ck.clone(), canary));
                }
                pending.insert(ck, Some(ev.kv.value));
            } else if exists {
                count -= 1;
                if !pending.contains_key(&ck) {
                    order.push((ck.clone(), canary));
                }
                pending.insert(ck, None);
            }
        }
        // Entries before canaries; a canary's delete before the entries it covered change.
        let mut first = Vec::new();
        let mut middle = Vec::new();
        let mut last = Vec::new();
        for (k, canary) in order {
            let v = pending.remove(&k).expect("recorded");
            match (v, canary) {
                (None, true) => first.push(TxnOp::delete(k)),
                (Some(v), true) => last.push(TxnOp::put(k, v)),
                (None, false) => middle.push(TxnOp::delete(k)),
                (Some(v), false) => middle.push(TxnOp::put(k, v)),
            }
        }
        let n = (first.len() + middle.len() + last.len()) as u64;
        for ops in [first, middle, last] {
            self.apply_ops(ops).await?;
        }
        self.metrics.mirrored(&cluster, n);
        self.status.lag_ms = received.elapsed().as_millis() as u64;
        self.status.last_sync_unix_ms = now_ms();
        self.update_metrics();
        if new_canary {
            tracing::info!(%cluster, "a new sync canary; listing again so that it lands after its entries");
            return Ok(Some(End::Relist));
        }
        Ok(None)
    }
}

/// A remote whose file cannot be used: the status says why, the cache keeps what it holds.
pub(crate) async fn refused_file<L: Backend>(
    local: L,
    cluster: String,
    limit: u64,
    error: String,
    metrics: MirrorMetrics,
) {
    let prefix = cache_prefix(&cluster);
    loop {
        let entries = meshd_kvstore::list_prefix(&local, &prefix)
            .await
            .map(|kvs| kvs.len() as u64);
        let status = CacheStatus {
            cluster: cluster.clone(),
            connected: false,
            ready: false,
            stale_since: Some(now_ms()),
            limit,
            entries: entries.as_ref().copied().unwrap_or(0),
            last_error: Some(error.clone()),
            ..Default::default()
        };
        metrics.set(&status);
        if entries.is_ok() && write_status(&local, &status).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_kvstore::MemoryStore;

    async fn dump(store: &MemoryStore, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let page = store.range(prefix, None, 0, 10_000).await.unwrap();
        page.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
    }

    /// An etcd replaced behind the same address (new cluster id, revisions start over): the
    /// open watches see the new id, and the mirror lists again and sweeps what is gone.
    #[tokio::test]
    async fn a_replaced_remote_etcd_is_listed_again_and_swept() {
        let remote = MemoryStore::new();
        let local = MemoryStore::new();
        let seed = |n: &'static str| {
            let remote = remote.clone();
            async move {
                remote
                    .put(
                        "meshd/cluster-config/c2",
                        br#"{"name":"c2","id":2}"#.to_vec(),
                        None,
                    )
                    .await
                    .unwrap();
                remote
                    .put(
                        &format!("meshd/state/nodes/v1/c2/{n}"),
                        n.as_bytes().to_vec(),
                        None,
                    )
                    .await
                    .unwrap();
            }
        };
        seed("old").await;
        let mut config = MirrorConfig::new(
            "/nonexistent".into(),
            ClusterName::new("c1").unwrap(),
            ClusterId::new(1).unwrap(),
        );
        config.probe = Duration::from_millis(20);
        let mirror = ClusterMirror::new(
            ClusterName::new("c2").unwrap(),
            remote.new_handle(),
            local.clone(),
            Arc::new(config),
            MirrorMetrics::default(),
        );
        let task = tokio::spawn(mirror.run());
        let nodes = "meshd/cache/c2/state/nodes/";
        let wait = |want: &'static str| {
            let local = local.clone();
            async move {
                for _ in 0..3000 {
                    let have = dump(&local, nodes).await;
                    if have.len() == 1 && have[0].1 == want.as_bytes() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!(
                    "the cache never held only {want}: {:?}",
                    dump(&local, nodes).await
                );
            }
        };
        wait("old").await;
        remote.replace_cluster();
        seed("new").await;
        wait("new").await;
        task.abort();
    }

    #[test]
    fn a_status_is_written_at_once_when_its_state_changes_and_its_counters_at_most_every_refresh() {
        let refresh = Duration::from_secs(5);
        let written = CacheStatus {
            cluster: "c2".into(),
            connected: true,
            ready: true,
            entries: 10,
            last_sync_unix_ms: 1,
            ..Default::default()
        };
        let soon = Duration::from_millis(10);
        assert!(status_due(None, &written, soon, refresh), "never written");
        assert!(!status_due(Some(&written), &written, refresh * 2, refresh));
        let counted = CacheStatus {
            entries: 11,
            rejected: 1,
            last_sync_unix_ms: 2,
            lag_ms: 3,
            ..written.clone()
        };
        assert!(!status_due(Some(&written), &counted, soon, refresh));
        assert!(status_due(Some(&written), &counted, refresh, refresh));
        for changed in [
            CacheStatus {
                connected: false,
                stale_since: Some(5),
                ..counted.clone()
            },
            CacheStatus {
                ready: false,
                ..counted.clone()
            },
            CacheStatus {
                last_error: Some("refused".into()),
                ..counted.clone()
            },
        ] {
            assert!(status_due(Some(&written), &changed, soon, refresh));
        }
    }

    #[test]
    fn keys_are_classified_by_their_cluster() {
        for (key, class) in [
            ("meshd/cluster-config/c2", Class::Config),
            ("meshd/cluster-config/c20", Class::Ignored),
            ("meshd/state/nodes/v1/c2/n1", Class::State("nodes".into())),
            (
                "meshd/state/ip/v1/c2/10.0.0.0/16",
                Class::State("ip".into()),
            ),
            ("meshd/state/nodes/v1/c3/n1", Class::Foreign),
            ("meshd/state/nodes/v1/c2/", Class::Foreign),
            ("meshd/state/nodes", Class::Foreign),
            ("meshd/synced/c2/nodes", Class::Canary("nodes".into())),
            ("meshd/synced/c3/nodes", Class::Foreign),
            ("meshd/synced/c2/a/b", Class::Foreign),
            ("meshd/other", Class::Foreign),
        ] {
            assert_eq!(classify("c2", key), class, "{key}");
        }
    }
}
