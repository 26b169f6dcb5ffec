//! List-then-watch of a prefix, typed or raw, with mark-and-sweep relists.
//!
//! One task per watch: list the prefix page by page at one revision, then watch from that
//! revision + 1. When the watch is compacted, when a response comes from a different etcd
//! cluster id, and after every lost connection, it lists again; the [`Reflection`] turns each
//! list into upserts for what changed and deletes for what was not seen again, followed by
//! `Synced`. Failures are retried forever with capped exponential backoff and jitter; the
//! consumer keeps its last known state meanwhile (fail-static).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use meshd_state::{ClusterName, Resource};
use tokio::sync::{mpsc, Notify};
use tracing::Instrument;

use crate::backend::{Backend, WatchMessage};
use crate::backoff::{Backoff, BackoffConfig};
use crate::error::KvError;
use crate::quota::{EntryQuota, MAX_VALUE_BYTES};
use crate::reflection::{
    RawReflection, RawWatchEvent, Reflect, Reflection, WatchEvent, WatchStats,
};

#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// Keys per range read. etcd-client refuses responses over 4 MiB by default; 5000
    /// ipcache-sized records are about 0.7 MB.
    pub page_size: usize,
    pub backoff: BackoffConfig,
    /// Batches (one per page or watch response) buffered towards a slow consumer before the
    /// watcher waits for it.
    pub channel_capacity: usize,
    /// Shared by the watches of one remote cluster: the keys they hold together at most
    /// (typed watches; see [`EntryQuota`]). None: no limit.
    pub quota: Option<Arc<EntryQuota>>,
    /// Values longer than this are refused unread (typed watches).
    pub max_value_bytes: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            page_size: 5000,
            backoff: BackoffConfig::default(),
            channel_capacity: 16,
            quota: None,
            max_value_bytes: MAX_VALUE_BYTES,
        }
    }
}

/// The receiving end of a watch, of events `E`. Dropping it stops the watch.
pub struct EventWatch<E> {
    /// Events travel in batches (a page, a watch response): one channel operation and one
    /// wake-up per batch rather than per event.
    events: mpsc::Receiver<Vec<E>>,
    buffered: VecDeque<E>,
    stats: Arc<WatchStats>,
    relist: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// A typed watch of one [`Resource`] ([`watch_cluster`], [`watch_prefix`]).
pub type WatchHandle<R> = EventWatch<WatchEvent<R>>;
/// A raw watch ([`watch_raw`]).
pub type RawWatchHandle = EventWatch<RawWatchEvent>;

impl<E> EventWatch<E> {
    /// Ends the running watch and lists again (after the usual backoff), keeping what was
    /// listed before until the new list says otherwise. For a consumer that learned the watch
    /// should no longer be trusted: etcd checks permissions when a watch starts, not while it
    /// runs, so a watch opened before its user lost access keeps delivering.
    pub fn relist(&self) {
        self.relist.notify_one();
    }

    /// The next event; `None` only if the watch task ended (it does not end on errors).
    /// Cancel-safe: an event is never lost to a `select!` that dropped this future.
    pub async fn next(&mut self) -> Option<E> {
        loop {
            if let Some(ev) = self.buffered.pop_front() {
                return Some(ev);
            }
            self.buffered = self.events.recv().await?.into();
        }
    }

    /// The next event if one was delivered already.
    pub fn try_next(&mut self) -> Option<E> {
        if self.buffered.is_empty() {
            self.buffered = self.events.try_recv().ok()?.into();
        }
        self.buffered.pop_front()
    }

    pub fn stats(&self) -> Arc<WatchStats> {
        self.stats.clone()
    }
}

impl<E> Drop for EventWatch<E> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches every key of `R` of `cluster` (`R::cluster_prefix`).
pub fn watch_cluster<R: Resource, B: Backend>(
    backend: B,
    cluster: &ClusterName,
    config: WatchConfig,
) -> WatchHandle<R> {
    watch_prefix(
        backend,
        R::cluster_prefix(cluster),
        Some(cluster.clone()),
        config,
    )
}

/// Watches every key under `prefix`, keeping only keys of `scope` if given.
pub fn watch_prefix<R: Resource, B: Backend>(
    backend: B,
    prefix: String,
    scope: Option<ClusterName>,
    config: WatchConfig,
) -> WatchHandle<R> {
    let span =
        tracing::info_span!("watch", kind = R::KIND, prefix = %prefix, etcd = %backend.describe());
    start(
        backend,
        prefix.clone(),
        Reflection::for_prefix(prefix, scope)
            .with_limits(config.quota.clone(), config.max_value_bytes),
        config,
        span,
    )
}

/// Watches every key under `prefix`, raw: puts and deletes with their revisions, `Synced`
/// after each list and `Progress` after each watch response. The same list-then-watch as the
/// typed watch (mark-and-sweep relists, backoff, fail-static); decoding is the reader's.
pub fn watch_raw<B: Backend>(backend: B, prefix: String, config: WatchConfig) -> RawWatchHandle {
    let span =
        tracing::info_span!("watch", kind = "raw", prefix = %prefix, etcd = %backend.describe());
    start(backend, prefix, RawReflection::new(), config, span)
}

fn start<X: Reflect, B: Backend>(
    backend: B,
    prefix: String,
    reflection: X,
    config: WatchConfig,
    span: tracing::Span,
) -> EventWatch<X::Event> {
    let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
    let stats = Arc::new(WatchStats::default());
    let relist = Arc::new(Notify::new());
    let task = tokio::spawn(
        run(
            backend,
            prefix,
            reflection,
            config,
            stats.clone(),
            relist.clone(),
            tx,
        )
        .instrument(span),
    );
    EventWatch {
        events: rx,
        buffered: VecDeque::new(),
        stats,
        relist,
        task,
    }
}

type Batches<E> = mpsc::Sender<Vec<E>>;

/// Why a watch ended.
enum End {
    /// Consumer gone: stop.
    Closed,
    /// Compacted or a different cluster: relist at once.
    Relist,
    /// Connection lost or an error: relist after a backoff.
    Lost,
}

/// Hands the pending events to the consumer as one batch; `false` if it is gone.
async fn send_all<E>(tx: &Batches<E>, out: &mut Vec<E>) -> bool {
    if out.is_empty() {
        return !tx.is_closed();
    }
    tx.send(std::mem::take(out)).await.is_ok()
}

async fn run<X: Reflect, B: Backend>(
    backend: B,
    prefix: String,
    mut reflection: X,
    config: WatchConfig,
    stats: Arc<WatchStats>,
    relist: Arc<Notify>,
    tx: Batches<X::Event>,
) {
    let mut backoff = Backoff::new(config.backoff);
    let mut cluster_id: Option<u64> = None;
    let mut out = Vec::new();
    loop {
        let listed = list(
            &backend,
            &prefix,
            &config,
            &mut reflection,
            &stats,
            &tx,
            &mut out,
        )
        .await;
        let (revision, listed_cluster) = match listed {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "listing failed");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        if let Some(old) = cluster_id {
            if old != listed_cluster {
                tracing::warn!(
                    old = format_args!("{old:x}"),
                    new = format_args!("{listed_cluster:x}"),
                    "etcd cluster id changed; state relisted"
                );
            }
        }
        cluster_id = Some(listed_cluster);

        let watched = tokio::time::Instant::now();
        let end = watch(
            &backend,
            &prefix,
            revision,
            listed_cluster,
            &mut reflection,
            &stats,
            &relist,
            &tx,
            &mut out,
        )
        .await;
        // Only a watch that stayed up for a while counts as recovered: a connection that flaps
        // right after each list keeps backing off instead of relisting every 100 ms.
        if watched.elapsed() >= config.backoff.max {
            backoff.reset();
        }
        match end {
            End::Closed => return,
            End::Relist => {}
            End::Lost => {
                let delay = backoff.next_delay();
                tracing::debug!(retry_in = ?delay, "watch lost");
                tokio::time::sleep(delay).await;
            }
        }
        stats.reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

/// One full, consistent list: the first page fixes the revision, later pages read at it.
/// Returns the revision and cluster id, or `None` if the consumer is gone.
async fn list<X: Reflect, B: Backend>(
    backend: &B,
    prefix: &str,
    config: &WatchConfig,
    reflection: &mut X,
    stats: &WatchStats,
    tx: &Batches<X::Event>,
    out: &mut Vec<X::Event>,
) -> Result<Option<(i64, u64)>, KvError> {
    reflection.begin_list();
    let first = backend.range(prefix, None, 0, config.page_size).await?;
    let revision = first.header.revision;
    let cluster_id = first.header.cluster_id;
    let mut page = first;
    loop {
        // Fetch the next page while this one is decoded: the decode then hides behind etcd's
        // response time instead of adding to it.
        let next = match (page.more, page.kvs.last()) {
            (true, Some(last)) => {
                let (backend, prefix, last) =
                    (backend.clone(), prefix.to_owned(), last.key.clone());
                let limit = config.page_size;
                Some(tokio::spawn(async move {
                    backend.range(&prefix, Some(&last), revision, limit).await
                }))
            }
            _ => None,
        };
        // A page is thousands of entries to decode: off the worker, so the consumer (the
        // agent's view) applies the previous page meanwhile.
        crate::off_the_worker(|| {
            for kv in page.kvs {
                reflection.listed(kv, stats, out);
            }
        });
        if !send_all(tx, out).await {
            if let Some(next) = next {
                next.abort();
            }
            return Ok(None);
        }
        match next {
            Some(next) => {
                page = next.await.map_err(|e| KvError::Unavailable {
                    endpoints: backend.describe(),
                    op: "range",
                    key: prefix.to_owned(),
                    reason: format!("page fetch task failed: {e}"),
                })??;
            }
            None => break,
        }
    }
    reflection.finish_list(revision, out);
    stats.lists.fetch_add(1, Ordering::Relaxed);
    if !send_all(tx, out).await {
        return Ok(None);
    }
    tracing::debug!(revision, entries = reflection.len(), "listed");
    Ok(Some((revision, cluster_id)))
}

/// Watch responses handed to the consumer in one batch at most, when they arrived together.
const RESPONSES_PER_BATCH: usize = 64;

#[allow(clippy::too_many_arguments)]
async fn watch<X: Reflect, B: Backend>(
    backend: &B,
    prefix: &str,
    revision: i64,
    cluster_id: u64,
    reflection: &mut X,
    stats: &WatchStats,
    relist: &Notify,
    tx: &Batches<X::Event>,
    out: &mut Vec<X::Event>,
) -> End {
    let mut stream = match backend.watch(prefix, revision + 1).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start watch");
            return End::Lost;
        }
    };
    loop {
        let mut msg = tokio::select! {
            msg = stream.next() => msg,
            _ = relist.notified() => {
                tracing::info!("relist requested; ending the watch");
                return End::Lost;
            }
            _ = tx.closed() => return End::Closed,
        };
        // The responses already received go in the same batch: one hand-off to the consumer,
        // and one wake-up of it, for what arrived together (under churn, several responses
        // often come in one read of the connection).
        let mut taken = 1;
        let end = loop {
            if let Some(end) = take_response(msg, cluster_id, reflection, stats, out) {
                break Some(end);
            }
            if taken == RESPONSES_PER_BATCH {
                break None;
            }
            match stream.next().now_or_never() {
                Some(next) => {
                    msg = next;
                    taken += 1;
                }
                None => break None,
            }
        };
        // What was applied is handed over even when the watch ends here: the reflection
        // counts it as emitted, and a relist would not emit it again.
        if !send_all(tx, out).await {
            return End::Closed;
        }
        if let Some(end) = end {
            return end;
        }
    }
}

/// Applies one message of the watch stream to the reflection; why the watch ends, if it does.
fn take_response<X: Reflect>(
    msg: Option<Result<WatchMessage, KvError>>,
    cluster_id: u64,
    reflection: &mut X,
    stats: &WatchStats,
    out: &mut Vec<X::Event>,
) -> Option<End> {
    match msg {
        None => {
            tracing::info!("watch stream ended; relisting");
            Some(End::Lost)
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "watch failed; relisting");
            Some(End::Lost)
        }
        Some(Ok(WatchMessage::Compacted { compact_revision })) => {
            tracing::info!(compact_revision, "watch compacted; relisting");
            Some(End::Relist)
        }
        Some(Ok(WatchMessage::Events { header, events })) => {
            if header.cluster_id != 0 && header.cluster_id != cluster_id {
                tracing::warn!(
                    listed = format_args!("{cluster_id:x}"),
                    now = format_args!("{:x}", header.cluster_id),
                    "etcd cluster id changed; relisting"
                );
                return Some(End::Relist);
            }
            for ev in events {
                reflection.apply(ev, stats, out);
            }
            reflection.progress(header.revision, out);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use super::*;
    use crate::backend::{Header, LeaseId, RangePage, WatchStream};
    use crate::memory::MemoryStore;
    use meshd_state::IpcacheEntry;

    /// Counts range reads; optionally ends every watch right after it starts (a flapping
    /// connection).
    #[derive(Clone)]
    struct Counting {
        inner: MemoryStore,
        ranges: Arc<AtomicU64>,
        flap: bool,
    }

    impl Backend for Counting {
        fn describe(&self) -> String {
            "counting".into()
        }
        async fn range(
            &self,
            p: &str,
            a: Option<&str>,
            r: i64,
            l: usize,
        ) -> Result<RangePage, KvError> {
            self.ranges.fetch_add(1, Ordering::Relaxed);
            self.inner.range(p, a, r, l).await
        }
        async fn watch(&self, prefix: &str, start: i64) -> Result<WatchStream, KvError> {
            let s = self.inner.watch(prefix, start).await?;
            if self.flap {
                // The created message, then the stream ends.
                return Ok(Box::pin(s.take(1)));
            }
            Ok(s)
        }
        async fn put(&self, k: &str, v: Vec<u8>, l: Option<LeaseId>) -> Result<Header, KvError> {
            self.inner.put(k, v, l).await
        }
        async fn delete(&self, k: &str) -> Result<Header, KvError> {
            self.inner.delete(k).await
        }
        async fn txn(&self, t: crate::Txn) -> Result<crate::TxnResponse, KvError> {
            self.inner.txn(t).await
        }
        async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, KvError> {
            self.inner.grant_lease(ttl).await
        }
        async fn keep_alive(&self, l: LeaseId) -> Result<(), KvError> {
            self.inner.keep_alive(l).await
        }
        async fn revoke_lease(&self, l: LeaseId) -> Result<(), KvError> {
            self.inner.revoke_lease(l).await
        }
    }

    fn c1() -> ClusterName {
        ClusterName::new("c1").unwrap()
    }

    /// Range reads during one minute (virtual time) against `backend`.
    async fn ranges_in_a_minute(backend: Counting) -> u64 {
        let ranges = backend.ranges.clone();
        let mut w = watch_cluster::<IpcacheEntry, _>(backend, &c1(), WatchConfig::default());
        let drain = tokio::spawn(async move { while w.next().await.is_some() {} });
        tokio::time::sleep(Duration::from_secs(60)).await;
        drain.abort();
        ranges.load(Ordering::Relaxed)
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_store_is_retried_with_growing_delays() {
        let store = MemoryStore::new();
        let reader = store.new_handle();
        reader.cut();
        let n = ranges_in_a_minute(Counting {
            inner: reader,
            ranges: Arc::default(),
            flap: false,
        })
        .await;
        // 100 ms doubling to a 10 s cap (with jitter down to half): about 10-20 attempts in a
        // minute, against 600 at a fixed 100 ms.
        assert!((5..=30).contains(&n), "{n} attempts");
    }

    #[tokio::test(start_paused = true)]
    async fn a_flapping_watch_does_not_relist_in_a_tight_loop() {
        let store = MemoryStore::new();
        store
            .put("meshd/state/ip/v1/c1/10.0.0.1", b"{}".to_vec(), None)
            .await
            .unwrap();
        let n = ranges_in_a_minute(Counting {
            inner: store.new_handle(),
            ranges: Arc::default(),
            flap: true,
        })
        .await;
        assert!((5..=30).contains(&n), "{n} lists");
    }

    /// Watch responses that arrived together reach the consumer as one batch (one hand-off
    /// and one wake-up of it, not one per response), in their order.
    #[tokio::test]
    async fn responses_that_arrived_together_are_handed_over_as_one_batch() {
        let store = MemoryStore::new();
        let mut w =
            watch_cluster::<IpcacheEntry, _>(store.new_handle(), &c1(), WatchConfig::default());
        let listed = w.events.recv().await.expect("the list's batch");
        assert!(
            matches!(listed.as_slice(), [WatchEvent::Synced { .. }]),
            "{listed:?}"
        );
        // Ten puts, ten revisions, ten watch responses, all queued before the watch task runs
        // again (this test's runtime has one thread and the puts do not yield).
        let ips: Vec<std::net::IpAddr> = (1..=10)
            .map(|i| format!("10.0.0.{i}").parse().unwrap())
            .collect();
        for ip in &ips {
            let key = meshd_state::IpcacheKey::host(c1(), *ip);
            let value = IpcacheEntry {
                prefix: key.prefix,
                identity: meshd_state::NumericIdentity::new((1 << 16) | 300).unwrap(),
                host_ip: "192.168.0.1".parse().unwrap(),
                endpoint: None,
                namespace: None,
            };
            store
                .put(&key.to_string(), serde_json::to_vec(&value).unwrap(), None)
                .await
                .unwrap();
        }
        let batch = w.events.recv().await.expect("the watch's batch");
        let upserted: Vec<std::net::IpAddr> = batch
            .iter()
            .map(|e| match e {
                WatchEvent::Upsert { value, .. } => value.prefix.addr(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(upserted, ips, "one batch of the ten, in order");
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_watch_lists_once() {
        let store = MemoryStore::new();
        let n = ranges_in_a_minute(Counting {
            inner: store.new_handle(),
            ranges: Arc::default(),
            flap: false,
        })
        .await;
        assert_eq!(n, 1);
    }
}
