//! [`Backend`] over a real etcd, through etcd-client.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{CompareOp, EventType, GetOptions, PutOptions, WatchOptions};

use crate::backend::{
    prefix_end, Backend, Compare, EventKind, Header, KeyValue, LeaseId, RangePage, RawEvent, Txn,
    TxnOp, TxnResponse, WatchMessage, WatchStream,
};
use crate::connect::EtcdConfig;
use crate::error::KvError;
use crate::retry::retry_transient;

static WATCH_EVENTS: AtomicU64 = AtomicU64::new(0);

/// Watch events received from etcd by every store of the process so far (admitted or not later
/// on). The agent's wake-up moderation reads how many a wake-up of its worker brought.
pub fn watch_events_received() -> u64 {
    WATCH_EVENTS.load(Ordering::Relaxed)
}

/// A connected etcd client (see [`crate::connect`]). Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct EtcdStore {
    client: etcd_client::Client,
    config: Arc<EtcdConfig>,
    describe: Arc<str>,
}

/// Responses of a paginated read are bounded by the page size, but values can be large (a
/// service with many backends); a generous decode limit keeps one big page from failing.
const MAX_DECODE: usize = 64 << 20;

/// How long a read waits out transient refusals: an election takes about one election timeout
/// (1 s by default), a failover one reconnect.
const TRANSIENT_BUDGET: Duration = Duration::from_secs(5);

fn header(h: Option<&etcd_client::ResponseHeader>) -> Header {
    h.map(|h| Header {
        revision: h.revision(),
        cluster_id: h.cluster_id(),
    })
    .unwrap_or_default()
}

fn kv(kv: etcd_client::KeyValue) -> KeyValue {
    let mod_revision = kv.mod_revision();
    let lease = kv.lease();
    let (key, value) = kv.into_key_value();
    KeyValue {
        // Keys meshd writes are ASCII; anything else cannot parse as one of ours and is
        // reported by the decoder with its lossy rendering.
        key: String::from_utf8(key)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        value,
        mod_revision,
        lease,
    }
}

impl EtcdStore {
    pub(crate) fn new(client: etcd_client::Client, config: EtcdConfig) -> Self {
        Self {
            describe: config.describe().into(),
            client,
            config: Arc::new(config),
        }
    }

    /// The underlying etcd-client, for operations the kvstore does not wrap (auth, members).
    pub fn client(&self) -> etcd_client::Client {
        self.client.clone()
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    fn etcd_err(&self, op: &'static str, key: &str, source: etcd_client::Error) -> KvError {
        let text = source.to_string();
        if text.contains("required revision has been compacted") {
            return KvError::Compacted {
                endpoints: self.describe.to_string(),
                op,
                key: key.to_owned(),
                revision: 0,
                compact_revision: 0,
            };
        }
        KvError::Etcd {
            endpoints: self.describe.to_string(),
            op,
            key: key.to_owned(),
            source,
        }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        key: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, KvError> {
        let timeout = self.config.request_timeout;
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r.map_err(|e| self.etcd_err(op, key, e)),
            Err(_) => Err(KvError::Timeout {
                endpoints: self.describe.to_string(),
                op,
                key: key.to_owned(),
                timeout,
            }),
        }
    }

    /// Asks the member for its status; works for every authenticated user.
    pub async fn status(&self) -> Result<Header, KvError> {
        // Not retried: callers use it to learn whether etcd answers now.
        let mut m = self.client.maintenance_client();
        let resp = self.timed("status", "", m.status()).await?;
        Ok(header(resp.header()))
    }

    /// Whether this client may read `prefix` now: one key-only read of at most one key. Not
    /// retried, like `status`, and unlike it also an authorization check: etcd checks
    /// permissions when a request or watch starts, never while a watch runs, so this is how a
    /// watcher learns that its access was revoked (`meshd clustermesh disconnect`).
    pub async fn check_read(&self, prefix: &str) -> Result<Header, KvError> {
        let opts = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_limit(1)
            .with_keys_only();
        let mut kv = self.client.kv_client();
        let resp = self
            .timed("range", prefix, kv.get(prefix, Some(opts)))
            .await?;
        Ok(header(resp.header()))
    }

    fn lease_gone(&self, e: &KvError, lease: LeaseId) -> Option<KvError> {
        let text = match e {
            KvError::Etcd { source, .. } => source.to_string(),
            _ => return None,
        };
        text.contains("lease not found")
            .then(|| KvError::LeaseNotFound {
                endpoints: self.describe.to_string(),
                lease,
            })
    }
}

impl Backend for EtcdStore {
    fn describe(&self) -> String {
        self.describe.to_string()
    }

    async fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        revision: i64,
        limit: usize,
    ) -> Result<RangePage, KvError> {
        let start: Vec<u8> = match after {
            // The smallest key strictly greater than `after`.
            Some(after) => [after.as_bytes(), &[0]].concat(),
            None => prefix.as_bytes().to_vec(),
        };
        let mut opts = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_limit(limit as i64);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let kv_client = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_DECODE);
        let attempt = || {
            let (mut kv, start, opts) = (kv_client.clone(), start.clone(), opts.clone());
            async move { kv.get(start, Some(opts)).await }
        };
        // Reads are safe to repeat: a leader election or the loss of the member this client
        // talks to is waited out, for a while. Not for long: with every member down, the
        // caller should hear it soon.
        let budget = self.config.request_timeout.min(TRANSIENT_BUDGET);
        let mut resp = self
            .timed("range", prefix, retry_transient(budget, attempt))
            .await?;
        let header = header(resp.header());
        let more = resp.more();
        let kvs = resp.take_kvs().into_iter().map(kv).collect();
        Ok(RangePage { header, kvs, more })
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, KvError> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision)
            // Progress notifications carry headers (revision, cluster id) on quiet prefixes.
            .with_progress_notify();
        let mut client = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_DECODE);
        let stream = self
            .timed(
                "watch",
                prefix,
                client.watch(prefix.as_bytes().to_vec(), Some(opts)),
            )
            .await?;
        // The store and prefix travel in the state (needed only for an error): no clone of
        // the store's gRPC clients per message.
        let state = (stream, self.clone(), prefix.to_owned());
        let s = futures::stream::unfold(Some(state), |state| async move {
            let (mut stream, me, prefix) = state?;
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            let msg = WatchMessage::Compacted {
                                compact_revision: resp.compact_revision(),
                            };
                            return Some((Ok(msg), None));
                        }
                        let err = KvError::Unavailable {
                            endpoints: me.describe(),
                            op: "watch",
                            key: prefix,
                            reason: format!("watch canceled: {}", resp.cancel_reason()),
                        };
                        return Some((Err(err), None));
                    }
                    WATCH_EVENTS.fetch_add(resp.events().len() as u64, Ordering::Relaxed);
                    let header = header(resp.header());
                    let events = resp
                        .events()
                        .iter()
                        .filter_map(|e| {
                            let kind = match e.event_type() {
                                EventType::Put => EventKind::Put,
                                EventType::Delete => EventKind::Delete,
                            };
                            e.kv().map(|k| RawEvent {
                                kind,
                                kv: kv(k.clone()),
                            })
                        })
                        .collect();
                    Some((
                        Ok(WatchMessage::Events { header, events }),
                        Some((stream, me, prefix)),
                    ))
                }
                Ok(None) => None,
                Err(e) => Some((Err(me.etcd_err("watch", &prefix, e)), None)),
            }
        });
        Ok(Box::pin(s))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Header, KvError> {
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        let mut kv_client = self.client.kv_client();
        let r = self
            .timed("put", key, kv_client.put(key, value, opts))
            .await;
        match r {
            Ok(resp) => Ok(header(resp.header())),
            Err(e) => Err(lease.and_then(|l| self.lease_gone(&e, l)).unwrap_or(e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<Header, KvError> {
        let mut kv_client = self.client.kv_client();
        let resp = self
            .timed("delete", key, kv_client.delete(key, None))
            .await?;
        Ok(header(resp.header()))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, KvError> {
        let key = txn.first_key().to_owned();
        let compare = |c: &Compare| match c {
            // etcd gives a key that does not exist create revision 0.
            Compare::Absent { key } => {
                etcd_client::Compare::create_revision(key.as_str(), CompareOp::Equal, 0)
            }
            Compare::ModRevision { key, revision } => {
                etcd_client::Compare::mod_revision(key.as_str(), CompareOp::Equal, *revision)
            }
        };
        let op = |o: &TxnOp| match o {
            TxnOp::Put { key, value, lease } => etcd_client::TxnOp::put(
                key.as_str(),
                value.clone(),
                lease.map(|l| PutOptions::new().with_lease(l)),
            ),
            TxnOp::Delete { key } => etcd_client::TxnOp::delete(key.as_str(), None),
        };
        let request = etcd_client::Txn::new()
            .when(txn.when.iter().map(compare).collect::<Vec<_>>())
            .and_then(txn.then.iter().map(op).collect::<Vec<_>>())
            .or_else(txn.otherwise.iter().map(op).collect::<Vec<_>>());
        let kv_client = self.client.kv_client();
        let attempt = || {
            let (mut kv, request) = (kv_client.clone(), request.clone());
            async move { kv.txn(request).await }
        };
        // Safe to repeat (see the trait): a transient refusal is waited out, like a read's.
        let budget = self.config.request_timeout.min(TRANSIENT_BUDGET);
        let resp = self
            .timed("txn", &key, retry_transient(budget, attempt))
            .await?;
        Ok(TxnResponse {
            header: header(resp.header()),
            succeeded: resp.succeeded(),
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        let mut lease = self.client.lease_client();
        let ttl = ttl.as_secs().max(1) as i64;
        let resp = self
            .timed("lease grant", "", lease.grant(ttl, None))
            .await?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<(), KvError> {
        let mut lease = self.client.lease_client();
        // etcd-client sends one keep-alive and reads its answer before returning the stream;
        // an unknown lease is answered with TTL 0, which it reports as "lease not found".
        match self
            .timed("lease keep-alive", "", lease.keep_alive(id))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(self.lease_gone(&e, id).unwrap_or(e)),
        }
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<(), KvError> {
        let mut lease = self.client.lease_client();
        match self.timed("lease revoke", "", lease.revoke(id)).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.lease_gone(&e, id).unwrap_or(e)),
        }
    }
}
