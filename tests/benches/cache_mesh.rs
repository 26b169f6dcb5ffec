//! Issue 15's benchmarks of the cache (`clustermesh-apiserver --kvstoremesh` + agents with
//! `remote_source: cache`), each against a baseline measured in the same run, in a mesh of
//! 2 clusters x 2 nodes whose clusters run a mirror (release binaries, real etcd per cluster):
//!
//! 1. End to end through the cache: an ipcache record put into c2's etcd -> the entry in the map
//!    of c1/n1 (cache mode) and of c1/n2 (switched to direct mode), the same put timed on both
//!    nodes; p50/p99 over N records one at a time, medians over rounds. Goal: cache p99 <= 2x
//!    direct and <= 10 ms.
//! 2. At scale: K simulated clusters x E endpoints (default 253 x 2,016 = 510k entries: with c1
//!    and c2, 255 clusters, the identity layout's limit) written
//!    the way their publishers write them into 4 extra etcds, mirrored into c1's etcd; then
//!    c1/n1's agent restarted from nothing: initial sync time from spawn to every entry in its
//!    map, against a raw paginated range read of the same cache keys from c1's etcd (the
//!    baseline); its RSS and bytes per entry (against its RSS with an empty remote view); and
//!    propagation p99 through the cache while the simulated clusters change 1,000 entries per
//!    second.
//!
//! Usage: cargo bench -p meshd-e2e --bench cache_mesh -- [--records N] [--rounds K]
//! [--clusters K] [--per-cluster E] [--churn-secs S] (needs root, etcd, bpffs and the release
//! `meshd` and `clustermesh-apiserver` binaries).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use meshd_certs::LeafKind;
use meshd_e2e::bench::{arg, median, ms, percentile};
use meshd_e2e::mesh::{Mesh, MeshOptions};
use meshd_e2e::sim::{self, ipcache_record, nth_ip, put_all, SimulatedCluster};
use meshd_kvstore::{Backend, EtcdConfig, EtcdStore};
use meshd_state::{ClusterName, IpcacheEntry};
use meshd_testing::etcd::Etcd;

async fn admin_store(mesh: &Mesh, cluster: &str) -> anyhow::Result<EtcdStore> {
    let etcd = &mesh.cluster(cluster)?.etcd;
    let config =
        EtcdConfig::new([etcd.endpoint()]).with_tls(mesh.pki.files(cluster, LeafKind::Admin));
    Ok(meshd_kvstore::connect(&config).await?)
}

/// Records put into c2's etcd one at a time, each timed until it is in c1/n1's map (cache) and
/// in c1/n2's map (direct): (cache p50, p99, direct p50, p99) in ms.
async fn both_modes(
    mesh: &Mesh,
    store: &EtcdStore,
    n: usize,
    base: u8,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let cache = meshd_datapath::DatapathMaps::open(&mesh.node("c1", "n1")?.pin_dir)?;
    let direct = meshd_datapath::DatapathMaps::open(&mesh.node("c1", "n2")?.pin_dir)?;
    let host = mesh.node("c2", "n1")?.ip;
    let c2 = ClusterName::new("c2")?;
    let (mut lc, mut ld) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let ip = nth_ip(base, i);
        let (key, value) = ipcache_record(&c2, ip, (2 << 16) | 400, host)?;
        let t0 = Instant::now();
        store.put(&key, value, None).await?;
        let (mut tc, mut td) = (None, None);
        let deadline = t0 + Duration::from_secs(10);
        while tc.is_none() || td.is_none() {
            if tc.is_none() && cache.ipcache_entry(Ipv4Net::from(ip))?.is_some() {
                tc = Some(t0.elapsed());
            }
            if td.is_none() && direct.ipcache_entry(Ipv4Net::from(ip))?.is_some() {
                td = Some(t0.elapsed());
            }
            anyhow::ensure!(Instant::now() < deadline, "{ip} never reached both maps");
            std::thread::sleep(Duration::from_micros(100));
        }
        lc.push(tc.expect("seen"));
        ld.push(td.expect("seen"));
    }
    lc.sort();
    ld.sort();
    Ok((
        ms(percentile(&lc, 0.5)),
        ms(percentile(&lc, 0.99)),
        ms(percentile(&ld, 0.5)),
        ms(percentile(&ld, 0.99)),
    ))
}

fn sim_cluster(id: u32) -> SimulatedCluster {
    let node_ip = Ipv4Addr::new(192, 168, 80 + (id / 250) as u8, (id % 250 + 1) as u8);
    SimulatedCluster::new(&format!("s{id}"), id, node_ip).expect("cluster name")
}

/// Entry `i` of simulated cluster `k` (0-based): 10.100.x.y and up.
fn sim_ip(k: usize, per: usize, i: usize) -> Ipv4Addr {
    nth_ip(100, k * per + i)
}

/// Raw baseline of the initial sync: a paginated range read of every cache key of c1's etcd,
/// decoded (what the agent has to read before it can write its maps).
async fn raw_cache_read(store: &EtcdStore) -> anyhow::Result<(Duration, usize)> {
    let t0 = Instant::now();
    let mut after: Option<String> = None;
    let mut count = 0;
    loop {
        let page = store
            .range(meshd_state::keys::CACHE_PREFIX, after.as_deref(), 0, 5000)
            .await?;
        for kv in &page.kvs {
            if let Some((_, remote)) = meshd_state::keys::remote_key_of_cache(&kv.key) {
                if remote.starts_with(meshd_state::keys::IPCACHE_PREFIX) {
                    meshd_state::decode::<IpcacheEntry>(&remote, &kv.value)?;
                    count += 1;
                }
            }
        }
        after = page.kvs.last().map(|kv| kv.key.clone());
        if !page.more || after.is_none() {
            break;
        }
    }
    Ok((t0.elapsed(), count))
}

fn wait_map_count(mesh: &Mesh, at_least: usize, deadline: Duration) -> anyhow::Result<Duration> {
    let pin_dir = mesh.node("c1", "n1")?.pin_dir.clone();
    let t0 = Instant::now();
    let maps = loop {
        match meshd_datapath::DatapathMaps::open(&pin_dir) {
            Ok(m) => break m,
            Err(_) if t0.elapsed() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.into()),
        }
    };
    loop {
        let n = maps.ipcache_prefixes()?.len();
        if n >= at_least {
            return Ok(t0.elapsed());
        }
        anyhow::ensure!(
            t0.elapsed() < deadline,
            "{n} of {at_least} entries in the map"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn run(mesh: &mut Mesh) -> anyhow::Result<()> {
    let n = arg("--records", 200);
    let rounds = arg("--rounds", 3);
    let clusters = arg("--clusters", 253);
    let per = arg("--per-cluster", 2016);
    let churn_secs = arg("--churn-secs", 20) as u64;

    // 1. Cache against direct, the same puts timed on both nodes.
    mesh.set_remote_source("c1", "n2", "direct")?;
    mesh.wait_all_ready(Duration::from_secs(60))?;
    let c2 = admin_store(mesh, "c2").await?;
    let (mut c50, mut c99, mut d50, mut d99) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let (a, b, c, d) = both_modes(mesh, &c2, n, 20 + round as u8).await?;
        c50.push(a);
        c99.push(b);
        d50.push(c);
        d99.push(d);
    }
    let (c50, c99, d50, d99) = (median(c50), median(c99.clone()), median(d50), median(d99));
    println!(
        "cache propagation ({n} records one at a time, median of {rounds} rounds): c2 etcd put -> \
         c1 node map through the cache p50 {c50:.2} ms, p99 {c99:.2} ms; direct p50 {d50:.2} ms, \
         p99 {d99:.2} ms; p99 ratio cache/direct {:.2}x (goal <= 2x and <= 10 ms)",
        c99 / d99.max(1e-9)
    );
    if clusters == 0 {
        return Ok(());
    }

    // 2. At scale. c1/n2 (direct) would open a watch on every simulated cluster: stopped.
    mesh.kill_agent("c1", "n2")?;
    let empty_rss = mesh.agent_rss_bytes("c1", "n1")?;
    let etcds = (0..4)
        .map(|_| Etcd::start())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut relays = Vec::new();
    for e in &etcds {
        relays.push(mesh.relay(SocketAddr::from(([127, 0, 0, 1], e.client_url_port())))?);
    }
    let mut clients = Vec::new();
    for e in &etcds {
        clients.push(etcd_client::Client::connect([e.endpoint()], None).await?);
    }
    // Ids 1 and 2 are the mesh's own clusters: the simulated ones take 3..=255 (the identity
    // layout's limit), so the mesh as a whole has clusters + 2 of them.
    anyhow::ensure!(
        clusters <= 253,
        "--clusters {clusters}: at most 253 beside c1 and c2"
    );
    let ids: Vec<u32> = (0..clusters as u32).map(|k| k + 3).collect();
    let total = clusters * per;
    let t0 = Instant::now();
    for (k, id) in ids.iter().enumerate() {
        let ips: Vec<(Ipv4Addr, u32)> = (0..per)
            .map(|i| (sim_ip(k, per, i), (*id << 16) | (300 + (i % 50) as u32)))
            .collect();
        put_all(&mut clients[k % 4], &sim_cluster(*id).records(&ips)?).await?;
    }
    println!(
        "scale: {clusters} simulated clusters x {per} entries = {total} written into 4 etcds in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let t0 = Instant::now();
    for (k, id) in ids.iter().enumerate() {
        std::fs::write(
            mesh.remotes_dir("c1").join(format!("s{id}")),
            format!("endpoints: [http://{}]\n", relays[k % 4]),
        )?;
    }
    let through = wait_map_count(mesh, total, Duration::from_secs(1200))?;
    println!(
        "scale: remote files written -> all {total} entries mirrored and in c1/n1's map: {:.1} s",
        (t0.elapsed().max(through)).as_secs_f64()
    );
    let rss = mesh.agent_rss_bytes("c1", "n1")?;

    // Initial sync of a fresh agent from the cache, against the raw read of the same keys.
    let c1 = admin_store(mesh, "c1").await?;
    let (mut agent_t, mut raw_t) = (vec![], vec![]);
    for _ in 0..rounds.max(1) {
        let (raw, count) = raw_cache_read(&c1).await?;
        anyhow::ensure!(count >= total, "the raw read saw {count} of {total}");
        raw_t.push(raw.as_secs_f64());
        mesh.kill_agent("c1", "n1")?;
        let pin_dir = mesh.node("c1", "n1")?.pin_dir.clone();
        let _ = std::fs::remove_dir_all(&pin_dir);
        let t0 = Instant::now();
        mesh.start_agent("c1", "n1")?;
        wait_map_count(mesh, total, Duration::from_secs(1200))?;
        agent_t.push(t0.elapsed().as_secs_f64());
    }
    let (a, r) = (median(agent_t), median(raw_t));
    println!(
        "scale: initial sync of {total} cached entries into a fresh agent {a:.1} s; raw range read \
         + decode of the same keys {r:.1} s; ratio {:.2}x",
        a / r.max(1e-9)
    );
    let after = mesh.agent_rss_bytes("c1", "n1")?;
    println!(
        "scale: agent RSS {:.0} MB after the mirror's sync, {:.0} MB after a fresh start; empty \
         view {:.0} MB; {:.0} bytes per remote entry (fresh start)",
        rss as f64 / 1e6,
        after as f64 / 1e6,
        empty_rss as f64 / 1e6,
        after.saturating_sub(empty_rss) as f64 / total as f64
    );

    // Propagation through the cache while the simulated clusters change 1,000 entries/s.
    let maps = meshd_datapath::DatapathMaps::open(&mesh.node("c1", "n1")?.pin_dir)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, e) in etcds.iter().enumerate() {
        let mut client = etcd_client::Client::connect([e.endpoint()], None).await?;
        let stop = stop.clone();
        let ids: Vec<(usize, u32)> = ids
            .iter()
            .enumerate()
            .filter(|(k, _)| k % 4 == w)
            .map(|(k, id)| (k, *id))
            .collect();
        writers.push(tokio::spawn(async move {
            // 250 changes/s per etcd: an entry of one of its clusters moves identity. The
            // changes due since the last write go out in one transaction: with one put at a
            // time a writer's rate was 1 / put latency, which a loaded machine held to about
            // 120/s. (Each change is still one watch event of its own cluster's prefix, which
            // is what the mirror sees; only the remote revisions are fewer.)
            let began = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(4));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut i = 0usize;
            let mut done = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let due = (began.elapsed().as_secs_f64() * 250.0) as usize;
                let n = due.saturating_sub(i).clamp(1, sim::PER_TXN);
                let ops: Vec<etcd_client::TxnOp> = (i..i + n)
                    .map(|j| {
                        let (k, id) = ids[j % ids.len()];
                        let e = (j / ids.len()) % per;
                        let cluster = sim_cluster(id);
                        let (key, value) = ipcache_record(
                            &cluster.name,
                            sim_ip(k, per, e),
                            (id << 16) | (300 + ((j + 7) % 50) as u32),
                            cluster.node_ip,
                        )
                        .expect("record");
                        etcd_client::TxnOp::put(key, value, None)
                    })
                    .collect();
                if client
                    .txn(etcd_client::Txn::new().and_then(ops))
                    .await
                    .is_ok()
                {
                    done += n as u64;
                }
                i += n;
            }
            done
        }));
    }
    let probe_cluster = sim_cluster(ids[0]);
    let mut probe_client = etcd_client::Client::connect([etcds[0].endpoint()], None).await?;
    // The probe cluster's cache in c1's etcd, watched: each probe key stamped as it arrives
    // (polling c1's etcd instead would load the very store being measured).
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        Instant,
    >::new()));
    let mut cache_watch = c1
        .watch(
            &meshd_state::keys::cache_prefix(probe_cluster.name.as_str()),
            c1.range("meshd/", None, 0, 1).await?.header.revision + 1,
        )
        .await?;
    let watcher = {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(Ok(meshd_kvstore::WatchMessage::Events { events, .. })) =
                cache_watch.next().await
            {
                let now = Instant::now();
                let mut a = arrivals.lock().expect("arrivals");
                for e in events {
                    a.entry(e.kv.key).or_insert(now);
                }
            }
        })
    };
    let (mut lat, mut mirror_lat) = (Vec::new(), Vec::new());
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(churn_secs) {
        let ip = nth_ip(220, i);
        let (key, value) = ipcache_record(
            &probe_cluster.name,
            ip,
            (ids[0] << 16) | 400,
            probe_cluster.node_ip,
        )?;
        let cache_key =
            meshd_state::keys::cache_key(probe_cluster.name.as_str(), &key).expect("a meshd/ key");
        let t0 = Instant::now();
        probe_client.put(key, value, None).await?;
        let deadline = t0 + Duration::from_secs(10);
        // When the agent wrote it into its map (polled), and when the mirror wrote it into
        // c1's etcd (stamped by the watch task below as the event arrived).
        while maps.ipcache_entry(Ipv4Net::from(ip))?.is_none() {
            anyhow::ensure!(Instant::now() < deadline, "probe {ip} never arrived");
            std::thread::sleep(Duration::from_micros(200));
        }
        let in_cache = arrivals
            .lock()
            .expect("arrivals")
            .remove(&cache_key)
            .map(|at: Instant| at.saturating_duration_since(t0));
        let total = t0.elapsed();
        lat.push(total);
        mirror_lat.push(in_cache.unwrap_or(total));
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.abort();
    let mut changes = 0;
    for w in writers {
        changes += w.await?;
    }
    lat.sort();
    mirror_lat.sort();
    println!(
        "scale: propagation through the cache under {:.0} changes/s ({} probes): remote put -> \
         node map p50 {:.2} ms, p99 {:.2} ms; of which remote put -> in the local cache (the \
         mirror, seen by a watch on c1's etcd) p50 {:.2} ms, p99 {:.2} ms",
        changes as f64 / start.elapsed().as_secs_f64(),
        lat.len(),
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(percentile(&mirror_lat, 0.5)),
        ms(percentile(&mirror_lat, 0.99)),
    );
    drop(etcds);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo test --benches` asks for a list of tests; there are none
    }
    if !meshd_e2e::mesh::prerequisites()
        || !meshd_testing::require_workspace_bins(&["clustermesh-apiserver"])
    {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut mesh = Mesh::start(MeshOptions::clusters(2, 2).kvstoremesh())?;
    rt.block_on(run(&mut mesh))
}
