//! Fixtures shared by the kvstore suite: the same test bodies run against the in-memory store
//! and against a real etcd. Each fixture has a writer client and a reader client; the reader
//! can be partitioned (`cut`) while the writer keeps working, which is how "a key deleted
//! while the watcher was disconnected" is produced.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshd_kvstore::{
    connect, Backend, EtcdConfig, EtcdStore, Header, KvError, LeaseId, MemoryStore, RangePage, Txn,
    TxnResponse, WatchEvent, WatchHandle, WatchStream,
};
use meshd_state::{
    encode, ClusterName, IpcacheEntry, IpcacheKey, NumericIdentity, Resource, ResourceKey,
};
use meshd_testing::etcd::Etcd;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Generous: a deadline for conditions, never a timing assertion.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub trait Fixture: Sized + Send {
    type B: Backend;
    /// `None`: prerequisites missing (reported by `meshd_testing::require`).
    fn new() -> impl Future<Output = Option<Self>> + Send;
    fn writer(&self) -> Self::B;
    fn reader(&self) -> Self::B;
    /// Partitions the reader from the store; the writer is unaffected.
    fn cut(&self);
    fn heal(&self);
    /// Restarts the server: every connection drops, data and leases stay.
    fn restart(&mut self) -> impl Future<Output = ()> + Send;
    /// Compacts history up to the current revision.
    fn compact_now(&self) -> impl Future<Output = ()> + Send;
}

pub struct MemoryFixture {
    store: MemoryStore,
    writer: MemoryStore,
    reader: MemoryStore,
}

impl Fixture for MemoryFixture {
    type B = MemoryStore;
    async fn new() -> Option<Self> {
        let store = MemoryStore::new();
        Some(Self {
            writer: store.new_handle(),
            reader: store.new_handle(),
            store,
        })
    }
    fn writer(&self) -> MemoryStore {
        self.writer.clone()
    }
    fn reader(&self) -> MemoryStore {
        self.reader.clone()
    }
    fn cut(&self) {
        self.reader.cut();
    }
    fn heal(&self) {
        self.reader.heal();
    }
    async fn restart(&mut self) {
        self.store.restart();
    }
    async fn compact_now(&self) {
        self.store.compact(self.store.revision());
    }
}

pub struct EtcdFixture {
    etcd: Etcd,
    proxy: Proxy,
    writer: EtcdStore,
    reader: EtcdStore,
}

fn etcd_config(endpoint: String) -> EtcdConfig {
    EtcdConfig {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        ..EtcdConfig::new([endpoint])
    }
}

impl Fixture for EtcdFixture {
    type B = EtcdStore;
    async fn new() -> Option<Self> {
        if !meshd_testing::require_etcd() {
            return None;
        }
        let etcd = tokio::task::block_in_place(Etcd::start).expect("starting etcd");
        let proxy = Proxy::start(etcd.client_url_port()).await;
        let writer = connect(&etcd_config(etcd.endpoint()))
            .await
            .expect("writer connects");
        let reader = connect(&etcd_config(format!("http://127.0.0.1:{}", proxy.port)))
            .await
            .expect("reader connects through the proxy");
        Some(Self {
            etcd,
            proxy,
            writer,
            reader,
        })
    }
    fn writer(&self) -> EtcdStore {
        self.writer.clone()
    }
    fn reader(&self) -> EtcdStore {
        self.reader.clone()
    }
    fn cut(&self) {
        self.proxy.cut();
    }
    fn heal(&self) {
        self.proxy.heal();
    }
    async fn restart(&mut self) {
        tokio::task::block_in_place(|| self.etcd.restart()).expect("restarting etcd");
    }
    async fn compact_now(&self) {
        tokio::task::block_in_place(|| self.etcd.compact_now()).expect("compacting");
    }
}

/// A TCP proxy in front of etcd that can be cut: open connections are dropped and new ones are
/// refused until healed. This is a partition of one client, with etcd itself still serving.
pub struct Proxy {
    pub port: u16,
    target: Arc<AtomicU16>,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let target = Arc::new(AtomicU16::new(target_port));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (c, cs, t) = (cut.clone(), conns.clone(), target.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if c.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target_port = t.load(Ordering::SeqCst);
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target_port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                cs.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy {
            port,
            target,
            cut,
            conns,
            accept,
        }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Points new connections at another server (open ones are left alone).
    pub fn retarget(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A backend that runs a hook once, right before the first watch is started: the moment
/// between a list and its watch, where a compaction makes the watch fail.
pub type Hook = Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Clone)]
pub struct BeforeFirstWatch<B: Backend> {
    pub inner: B,
    pub hook: Arc<Mutex<Option<Hook>>>,
}

impl<B: Backend> Backend for BeforeFirstWatch<B> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        revision: i64,
        limit: usize,
    ) -> Result<RangePage, KvError> {
        self.inner.range(prefix, after, revision, limit).await
    }
    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, KvError> {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook.await;
        }
        self.inner.watch(prefix, start_revision).await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Header, KvError> {
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, key: &str) -> Result<Header, KvError> {
        self.inner.delete(key).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, KvError> {
        self.inner.txn(txn).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), KvError> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), KvError> {
        self.inner.revoke_lease(lease).await
    }
}

pub fn c1() -> ClusterName {
    ClusterName::new("c1").unwrap()
}

/// The ipcache entry of `10.<n/65536>.<n/256>.<n%256>` with local identity `256 + id`.
pub fn ip(n: u32, id: u16) -> (IpcacheKey, IpcacheEntry) {
    let addr = std::net::Ipv4Addr::from(0x0a00_0000 | n);
    let key = IpcacheKey::host(c1(), addr.into());
    let entry = IpcacheEntry {
        prefix: key.prefix,
        identity: NumericIdentity::allocated(meshd_state::ClusterId::new(1).unwrap(), 256 + id)
            .unwrap(),
        host_ip: "192.168.0.1".parse().unwrap(),
        endpoint: Some(format!("ep-{n}")),
        namespace: Some("default".into()),
    };
    (key, entry)
}

/// Writes a record directly (no lease), retrying while the store is unavailable.
pub async fn put<B: Backend, R: Resource>(b: &B, key: &R::Key, value: &R) {
    put_raw(b, &key.to_string(), encode(key, value).unwrap()).await
}

pub async fn put_raw<B: Backend>(b: &B, key: &str, value: Vec<u8>) {
    retry(|| b.put(key, value.clone(), None)).await;
}

pub async fn delete<B: Backend>(b: &B, key: &str) {
    retry(|| b.delete(key)).await;
}

pub async fn retry<T, F: Future<Output = Result<T, KvError>>>(mut op: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("retrying: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("still failing at the deadline: {e}"),
        }
    }
}

/// A consumer's view built from watch events, as the merged view would build it.
pub struct Model<R: Resource> {
    pub state: BTreeMap<String, R>,
    pub log: Vec<WatchEvent<R>>,
    pub synced: usize,
}

impl<R: Resource> Default for Model<R> {
    fn default() -> Self {
        Self {
            state: BTreeMap::new(),
            log: Vec::new(),
            synced: 0,
        }
    }
}

impl<R: Resource> Model<R> {
    pub fn apply(&mut self, ev: WatchEvent<R>) {
        match &ev {
            WatchEvent::Upsert { key, value } => {
                self.state.insert(key.to_string(), value.clone());
            }
            WatchEvent::Delete { key } => {
                assert!(
                    self.state.remove(&key.to_string()).is_some(),
                    "delete of a key never upserted: {key}"
                );
            }
            WatchEvent::Synced { .. } => self.synced += 1,
        }
        self.log.push(ev);
    }

    /// Applies events until `done` holds; panics at the deadline with the state it reached.
    pub async fn until(
        &mut self,
        w: &mut WatchHandle<R>,
        what: &str,
        done: impl Fn(&Self) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !done(self) {
            match tokio::time::timeout_at(deadline, w.next()).await {
                Ok(Some(ev)) => self.apply(ev),
                Ok(None) => panic!("watch ended while waiting for {what}"),
                Err(_) => panic!(
                    "timed out waiting for {what}; have {} entries: {:?}",
                    self.state.len(),
                    self.state.keys().take(10).collect::<Vec<_>>()
                ),
            }
        }
    }

    pub fn keys(&self) -> Vec<String> {
        self.state.keys().cloned().collect()
    }

    pub fn deleted(&self, key: &str) -> bool {
        self.log
            .iter()
            .any(|e| matches!(e, WatchEvent::Delete { key: k } if k.to_string() == key))
    }
}

pub fn keys_of<K: ResourceKey>(keys: &[K]) -> Vec<String> {
    let mut v: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    v.sort();
    v
}
