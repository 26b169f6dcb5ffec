//! What the flood test and the flood benchmark share (issue 17, item 4): a flooding cluster's
//! keys, written many transactions at a time, and a probe that times another cluster's changes
//! from its etcd to a node's maps while the flood runs.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use etcd_client::{Txn, TxnOp};
use ipnet::Ipv4Net;
use meshd_certs::LeafKind;
use meshd_datapath::DatapathMaps;
use meshd_kvstore::{EtcdConfig, EtcdStore};
use meshd_state::ClusterName;

use crate::bench::{ms, percentile};
use crate::mesh::Mesh;
use crate::sim::{ipcache_record, nth_ip, Kv, PER_TXN};

/// Flood entries live at 10.100.x.x and up, probes at 10.150.x.x and up (clear of every pod
/// CIDR the harness gives nodes, and of each other up to 1.2M flood entries).
pub const FLOOD_BASE: u8 = 100;
pub const PROBE_BASE: u8 = 150;

/// A single-threaded runtime for a test's or a thread's etcd calls.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// How `cluster`'s etcd is reached with its admin certificate.
pub fn admin_config(mesh: &Mesh, cluster: &str) -> anyhow::Result<EtcdConfig> {
    let etcd = &mesh.cluster(cluster)?.etcd;
    Ok(EtcdConfig::new([etcd.endpoint()]).with_tls(mesh.pki.files(cluster, LeafKind::Admin)))
}

/// Identity `i` of the 50 a flooding cluster `id` uses.
pub fn flood_identity(id: u32, i: usize) -> u32 {
    (id << 16) | (300 + (i % 50) as u32)
}

/// `cluster`'s flood keys `range` (valid entries of its own, behind its node `host`); `shift`
/// moves each to another identity.
pub fn flood_records(
    cluster: &str,
    id: u32,
    host: Ipv4Addr,
    range: std::ops::Range<usize>,
    shift: usize,
) -> anyhow::Result<Vec<Kv>> {
    let c = ClusterName::new(cluster)?;
    range
        .map(|i| {
            ipcache_record(
                &c,
                nth_ip(FLOOD_BASE, i),
                flood_identity(id, i + shift),
                host,
            )
        })
        .collect()
}

/// Puts `records`, [`PER_TXN`] to a transaction and `parallel` transactions in flight (one at
/// a time, a loaded etcd's commit latency holds the rate well under what a hostile writer
/// reaches). With `rate` (changes a second), paced to it. The changes made and the time taken.
pub async fn put_parallel(
    store: &EtcdStore,
    records: &[Kv],
    parallel: usize,
    rate: Option<usize>,
) -> anyhow::Result<(usize, Duration)> {
    let client = store.client();
    let start = tokio::time::Instant::now();
    let txns: Vec<&[Kv]> = records.chunks(PER_TXN).collect();
    let mut done = 0;
    for (n, round) in txns.chunks(parallel.max(1)).enumerate() {
        let writes = round.iter().map(|chunk| {
            let mut client = client.clone();
            let ops = chunk
                .iter()
                .map(|(k, v)| TxnOp::put(k.as_str(), v.clone(), None))
                .collect::<Vec<_>>();
            async move { client.txn(Txn::new().and_then(ops)).await }
        });
        futures::future::try_join_all(writes).await?;
        done += round.iter().map(|c| c.len()).sum::<usize>();
        if let Some(rate) = rate {
            let per_round = Duration::from_secs_f64((PER_TXN * parallel) as f64 / rate as f64);
            tokio::time::sleep_until(start + per_round * (n as u32 + 1)).await;
        }
    }
    Ok((done, start.elapsed()))
}

/// Runs `f` on a thread of its own with `cluster`'s admin client (its own runtime, so it
/// writes while the caller probes).
pub fn with_admin_on_thread<T: Send + 'static>(
    mesh: &Mesh,
    cluster: &str,
    f: impl FnOnce(&tokio::runtime::Runtime, EtcdStore) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<T>>> {
    let config = admin_config(mesh, cluster)?;
    Ok(std::thread::spawn(move || {
        let rt = runtime()?;
        let store = rt.block_on(meshd_kvstore::connect(&config))?;
        f(&rt, store)
    }))
}

/// A well-behaved cluster's changes timed from its etcd to one node's maps: an ipcache entry
/// put, polled for in the pinned map (every 0.5 ms), then deleted.
pub struct Prober {
    rt: tokio::runtime::Runtime,
    source: EtcdStore,
    cluster: ClusterName,
    identity: u32,
    host: Ipv4Addr,
    maps: DatapathMaps,
    next: usize,
    /// A probe that has not arrived by then failed (a generous deadline, not a timing goal).
    pub deadline: Duration,
}

impl Prober {
    /// Probes `source`'s changes (cluster id `id`, behind its node n1) into `cluster/node`'s
    /// maps.
    pub fn new(
        mesh: &Mesh,
        source: &str,
        id: u32,
        cluster: &str,
        node: &str,
    ) -> anyhow::Result<Self> {
        let rt = runtime()?;
        let store = rt.block_on(meshd_kvstore::connect(&admin_config(mesh, source)?))?;
        Ok(Self {
            source: store,
            cluster: ClusterName::new(source)?,
            identity: (id << 16) | 300,
            host: mesh.node(source, "n1")?.ip,
            maps: DatapathMaps::open(&mesh.node(cluster, node)?.pin_dir)?,
            next: 0,
            deadline: Duration::from_secs(30),
            rt,
        })
    }

    /// One probe: put -> in the map.
    pub fn probe(&mut self) -> anyhow::Result<Duration> {
        let ip = nth_ip(PROBE_BASE, self.next);
        self.next += 1;
        let (key, value) = ipcache_record(&self.cluster, ip, self.identity, self.host)?;
        let mut client = self.source.client();
        self.rt.block_on(client.put(key.as_str(), value, None))?;
        let start = Instant::now();
        while self.maps.ipcache_entry(Ipv4Net::from(ip))?.is_none() {
            anyhow::ensure!(
                start.elapsed() < self.deadline,
                "{}'s entry {ip} did not reach the maps within {:?}",
                self.cluster,
                self.deadline
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        let took = start.elapsed();
        self.rt.block_on(client.delete(key.as_str(), None))?;
        Ok(took)
    }

    /// Probes one after another, `gap` apart, while `busy` says so and at least `min` times;
    /// sorted. `each` sees every sample (e.g. to sample memory meanwhile).
    pub fn probe_while(
        &mut self,
        min: usize,
        gap: Duration,
        mut busy: impl FnMut() -> bool,
        mut each: impl FnMut(Duration),
    ) -> anyhow::Result<Vec<Duration>> {
        let mut out = Vec::new();
        while out.len() < min || busy() {
            let d = self.probe()?;
            each(d);
            out.push(d);
            std::thread::sleep(gap);
        }
        out.sort();
        Ok(out)
    }
}

/// `what: N probes, p50, p99, max` of sorted samples.
pub fn summary(what: &str, sorted: &[Duration]) -> String {
    match sorted.last() {
        None => format!("{what}: no probes"),
        Some(max) => format!(
            "{what}: {} probes, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            sorted.len(),
            ms(percentile(sorted, 0.50)),
            ms(percentile(sorted, 0.99)),
            ms(*max)
        ),
    }
}
