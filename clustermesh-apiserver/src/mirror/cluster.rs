//! One remote cluster's mirror: list, write the difference in order, watch, fail-static.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use meshd_kvstore::{Backend, Backoff, EventKind, KeyValue, KvError, TxnOp, WatchMessage};
use meshd_state::keys::{
    cache_key, cache_prefix, CLUSTER_CONFIG_PREFIX, STATE_PREFIX, SYNCED_PREFIX,
};
use meshd_state::{CacheStatus, ClusterConfig, ClusterId, ClusterName};

use super::{drain, now_ms, write_batches, write_status, MirrorConfig, MirrorMetrics};

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

fn fingerprint(value: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
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
    /// The status as last written (nothing is written while it stays the same).
    written: Option<CacheStatus>,
    /// What the cache holds for this remote: cache key -> fingerprint of its value.
    cached: HashMap<String, u64>,
    /// Resources whose canary is withheld: an entry of theirs was refused.
    withheld: BTreeSet<String>,
    /// The remote's cluster id, as last seen.
    remote_id: Option<ClusterId>,
    config_key: String,
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
        Self {
            cluster,
            remote,
            local,
            config,
            metrics,
            status,
            written: None,
            cached: HashMap::new(),
            withheld: BTreeSet::new(),
            remote_id: None,
            config_key,
            last_list: Instant::now(),
        }
    }

    /// Runs until aborted.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(self.config.backoff);
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

    async fn drain(&mut self) -> Result<(), KvError> {
        drain(&self.local, self.cluster.as_str(), self.config.batch).await?;
        self.cached.clear();
        self.withheld.clear();
        self.remote_id = None;
        self.written = None;
        self.status.ready = false;
        self.status.entries = 0;
        self.status.rejected = 0;
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
        if self.written.as_ref() == Some(&self.status) {
            return Ok(());
        }
        write_status(&self.local, &self.status).await?;
        self.written = Some(self.status.clone());
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
        let (state, _) = self
            .list_remote(STATE_PREFIX, revision)
            .await
            .map_err(remote_err)?;
        let (synced, _) = self
            .list_remote(SYNCED_PREFIX, revision)
            .await
            .map_err(remote_err)?;
        self.status.connected = true;
        self.status.stale_since = None;
        self.status.last_error = None;
        self.write_list(configs, state, synced).await?;
        self.last_list = Instant::now();
        self.flush_status().await.map_err(local_err)?;
        tracing::info!(cluster = %self.cluster, revision, entries = self.cached.len(), rejected = self.status.rejected, ready = self.status.ready, "remote cluster listed into the cache");
        self.watch(revision, etcd_cluster).await
    }

    /// Writes a full list: config, state, sweep, canaries.
    async fn write_list(
        &mut self,
        configs: Vec<KeyValue>,
        state: Vec<KeyValue>,
        synced: Vec<KeyValue>,
    ) -> Result<(), Fail> {
        let cluster = self.cluster.to_string();
        let limit = self.config.limit;
        self.cached = self.read_cache().await.map_err(local_err)?;
        self.withheld.clear();
        let mut rejected = 0u64;
        let mut admitted = 0u64;
        // (cache key, value, is a canary) in admission order.
        let mut desired: Vec<(String, Vec<u8>, Option<String>)> = Vec::new();
        for kv in configs.into_iter().chain(state).chain(synced) {
            let class = classify(&cluster, &kv.key);
            match &class {
                Class::Ignored => continue,
                Class::Foreign => {
                    rejected += 1;
                    continue;
                }
                _ => {}
            }
            if admitted >= limit {
                rejected += 1;
                match class {
                    Class::State(kind) => {
                        self.withheld.insert(kind);
                    }
                    Class::Canary(r) => {
                        self.withheld.insert(r);
                    }
                    _ => {}
                }
                continue;
            }
            admitted += 1;
            let ck = cache_key(&cluster, &kv.key).expect("watched prefixes are under meshd/");
            let canary = match class {
                Class::Canary(r) => Some(r),
                _ => None,
            };
            desired.push((ck, kv.value, canary));
        }
        if rejected > 0 {
            tracing::warn!(%cluster, rejected, limit, withheld = ?self.withheld, "remote keys refused (over the limit or not of this cluster)");
        }
        desired.retain(|(_, _, canary)| canary.as_ref().is_none_or(|r| !self.withheld.contains(r)));
        let keep: std::collections::HashSet<&str> =
            desired.iter().map(|(k, _, _)| k.as_str()).collect();
        let sweep: Vec<TxnOp> = self
            .cached
            .keys()
            .filter(|k| !keep.contains(k.as_str()))
            .map(|k| TxnOp::delete(k.clone()))
            .collect();
        let (canaries, entries): (Vec<_>, Vec<_>) =
            desired.into_iter().partition(|(_, _, c)| c.is_some());
        let changed = |cached: &HashMap<String, u64>,
                       items: Vec<(String, Vec<u8>, Option<String>)>| {
            items
                .into_iter()
                .filter(|(k, v, _)| cached.get(k) != Some(&fingerprint(v)))
                .map(|(k, v, _)| TxnOp::put(k, v))
                .collect::<Vec<_>>()
        };
        let puts = changed(&self.cached, entries);
        let canary_puts = changed(&self.cached, canaries);
        let writes = (puts.len() + sweep.len() + canary_puts.len()) as u64;
        // Canaries withheld now go before anything else changes.
        let (withheld_deletes, sweep): (Vec<TxnOp>, Vec<TxnOp>) = sweep
            .into_iter()
            .partition(|op| op.key().contains("/synced/"));
        for ops in [withheld_deletes, puts, sweep, canary_puts] {
            self.apply_ops(ops).await?;
        }
        self.metrics.mirrored(cluster.as_str(), writes);
        self.status.rejected = rejected;
        self.status.ready = self.withheld.is_empty();
        self.status.last_sync_unix_ms = now_ms();
        self.update_metrics();
        Ok(())
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

    /// Watches the three prefixes from after the list.
    async fn watch(&mut self, revision: i64, etcd_cluster: u64) -> Result<End, Fail> {
        let mut streams = Vec::new();
        for prefix in [STATE_PREFIX, SYNCED_PREFIX, self.config_key.as_str()] {
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
                    Some(Ok(WatchMessage::Events { header, events })) => {
                        if header.cluster_id != 0 && header.cluster_id != etcd_cluster {
                            tracing::warn!(cluster = %self.cluster, "the remote etcd's cluster id changed; listing again");
                            return Ok(End::Relist);
                        }
                        if let Some(end) = self.apply_events(events).await? {
                            return Ok(end);
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
        for ev in events {
            let class = classify(&cluster, &ev.kv.key);
            let put = ev.kind == EventKind::Put;
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
                    let resource = match &class {
                        Class::State(k) | Class::Canary(k) => Some(k.clone()),
                        _ => None,
                    };
                    if let Some(r) = resource {
                        if self.withheld.insert(r.clone()) {
                            tracing::warn!(%cluster, resource = %r, limit = self.config.limit, "remote over the limit; withholding the canary of the resource");
                            let canary_key =
                                format!("{}synced/{cluster}/{r}", cache_prefix(&cluster));
                            if self.cached.contains_key(&canary_key)
                                || pending.contains_key(&canary_key)
                            {
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
        let entries = super::count_keys(&local, &prefix).await;
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
