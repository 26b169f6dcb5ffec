//! Agent benchmarks of issues 5 and 11, each against a baseline measured in the same run, in a
//! mesh of 2 clusters x 1 node (release `meshd agent` processes, real etcd per cluster):
//!
//! 1. Propagation: an ipcache record put into c2's etcd -> the entry in c1/n1's ipcache map,
//!    p50/p99 over N records put one at a time, measured twice: with c1's view empty, and with
//!    R remote entries present. Baseline for both: raw etcd put -> watch event on the same
//!    etcd in the same state. Issue 11's goal: p99 with R present <= 5 ms and <= 1.5x the
//!    empty-view p99. Each is measured in several rounds (raw and agent alternating); medians
//!    of the rounds' p50 and p99 are printed.
//! 2. Initial sync: R remote ipcache records in c2's etcd -> all in a freshly started c1 agent's
//!    maps (timed from spawning the agent). Baseline: a raw paginated range read of the same
//!    keys plus decoding and writing each into a scratch datapath's ipcache map. Goal <= 1.3x.
//! 3. Memory per remote endpoint: (agent RSS with R entries - RSS of a fresh agent with an
//!    empty view) / R. Goal <= 250 bytes.
//! 4. Churn on top of R entries: 1,000 ipcache puts/deletes per second in c2's etcd for 30 s,
//!    while a probe record every 100 ms measures put -> map (goal p99 <= 10 ms), alternating with
//!    a raw put -> watch probe on the same etcd (the baseline under the same load); then how long
//!    the last changes take to land (a growing backlog would show here), and the agent's CPU
//!    time per event (goal <= 50 us).
//!
//! Usage: cargo bench -p meshd-e2e --bench agent_mesh -- [--endpoints N] [--records R]
//! [--rounds K] [--churn-secs S] [--churn-rate N] [--memory-only 1 (the initial sync and the
//! memory only)] [--churn-only 1 (no propagation rounds)] (needs root, etcd, bpffs and the
//! release `meshd` binary).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::{Txn, TxnOp};
use futures::StreamExt;
use ipnet::Ipv4Net;
use meshd_certs::LeafKind;
use meshd_e2e::bench::{arg, cpu_time, median, ms, percentile};
use meshd_e2e::mesh::{Mesh, MeshOptions};
use meshd_e2e::sim::{ipcache_record as record, nth_ip};
use meshd_kvstore::{Backend, EtcdConfig, EtcdStore, WatchMessage};
use meshd_state::{ClusterName, IpcacheEntry};

fn c2_name() -> ClusterName {
    ClusterName::new("c2").expect("cluster name")
}

async fn admin_store(mesh: &Mesh, cluster: &str) -> anyhow::Result<EtcdStore> {
    let etcd = &mesh.cluster(cluster)?.etcd;
    let config =
        EtcdConfig::new([etcd.endpoint()]).with_tls(mesh.pki.files(cluster, LeafKind::Admin));
    Ok(meshd_kvstore::connect(&config).await?)
}

/// Raw etcd put -> watch event on `store`, `n` keys one at a time: (p50, p99).
async fn raw_round_trip(store: &EtcdStore, n: usize, round: usize) -> anyhow::Result<(f64, f64)> {
    let base = format!("bench/raw/{round}/");
    let rev = store
        .put(&format!("{base}start"), b"x".to_vec(), None)
        .await?
        .revision;
    let mut watch = store.watch(&base, rev + 1).await?;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("{base}{i:06}");
        let t0 = Instant::now();
        store.put(&key, b"{}".to_vec(), None).await?;
        'seen: loop {
            match watch.next().await.context("watch ended")?? {
                WatchMessage::Events { events, .. } => {
                    if events.iter().any(|e| e.kv.key == key) {
                        break 'seen;
                    }
                }
                WatchMessage::Compacted { .. } => anyhow::bail!("compacted"),
            }
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    Ok((ms(percentile(&lat, 0.5)), ms(percentile(&lat, 0.99))))
}

/// Records put into c2's etcd one at a time -> each entry in c1/n1's map: (p50, p99).
async fn mesh_round_trip(
    mesh: &Mesh,
    store: &EtcdStore,
    n: usize,
    base: u8,
    identity: u32,
    host: Ipv4Addr,
) -> anyhow::Result<(f64, f64)> {
    let maps = meshd_datapath::DatapathMaps::open(&mesh.node("c1", "n1")?.pin_dir)?;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let ip = nth_ip(base, i);
        let (key, value) = record(&c2_name(), ip, identity, host)?;
        let t0 = Instant::now();
        store.put(&key, value, None).await?;
        let deadline = t0 + Duration::from_secs(10);
        while maps.ipcache_entry(Ipv4Net::from(ip))?.is_none() {
            anyhow::ensure!(Instant::now() < deadline, "{ip} never reached c1's map");
            std::thread::sleep(Duration::from_micros(100));
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    Ok((ms(percentile(&lat, 0.5)), ms(percentile(&lat, 0.99))))
}

/// Propagation in `rounds` rounds, raw and agent alternating; prints the medians of the
/// rounds and returns the agent's median p99.
#[allow(clippy::too_many_arguments)]
async fn propagation(
    mesh: &Mesh,
    store: &EtcdStore,
    label: &str,
    n: usize,
    rounds: usize,
    first_base: u8,
    identity: u32,
    host: Ipv4Addr,
) -> anyhow::Result<(f64, f64)> {
    let (mut raw50, mut raw99, mut m50, mut m99) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let (a, b) = raw_round_trip(store, n, round + first_base as usize).await?;
        raw50.push(a);
        raw99.push(b);
        let (a, b) =
            mesh_round_trip(mesh, store, n, first_base + round as u8, identity, host).await?;
        m50.push(a);
        m99.push(b);
    }
    let (r50, r99, p50, p99) = (
        median(raw50),
        median(raw99),
        median(m50),
        median(m99.clone()),
    );
    println!(
        "propagation, {label} ({n} records one at a time, median of {rounds} rounds): \
         c2 etcd put -> c1 node map p50 {p50:.2} ms, p99 {p99:.2} ms; raw put -> watch event \
         p50 {r50:.2} ms, p99 {r99:.2} ms; p99 ratio to raw {:.2}x; rounds' p99 {m99:?}",
        p99 / r99.max(1e-9),
    );
    Ok((p50, p99))
}

/// Writes `records` remote entries into c2's etcd, 128 puts per transaction (etcd's default
/// limit).
async fn load(
    store: &EtcdStore,
    records: usize,
    identity: u32,
    host: Ipv4Addr,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let chunks: Vec<Vec<usize>> = (0..records)
        .collect::<Vec<_>>()
        .chunks(128)
        .map(<[usize]>::to_vec)
        .collect();
    let writes = futures::stream::iter(chunks)
        .map(|chunk| {
            let mut client = store.client();
            async move {
                let mut ops = Vec::with_capacity(chunk.len());
                for i in chunk {
                    let (key, value) = record(&c2_name(), nth_ip(200, i), identity, host)?;
                    ops.push(TxnOp::put(key, value, None));
                }
                client.txn(Txn::new().and_then(ops)).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(8);
    let results: Vec<_> = writes.collect().await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    eprintln!(
        "(wrote {records} records into c2's etcd in {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The raw baseline of the initial sync: paginated range read + decode + one map write each.
async fn raw_sync(store: &EtcdStore, records: usize) -> anyhow::Result<Duration> {
    let scratch = meshd_datapath::bpffs::ScratchPinDir::new(
        std::path::Path::new("/sys/fs/bpf"),
        "meshd-bench-sync",
    )?;
    let _dp = meshd_datapath::Datapath::load(scratch.path())?;
    let mut scratch_maps = meshd_datapath::DatapathMaps::open(scratch.path())?;
    // One forward revision bump for the batch, as the agent's reconciler does per round: the
    // baseline stays one map write per record.
    scratch_maps.defer_forward_revision();
    let prefix = "meshd/state/ip/v1/c2/";
    let t0 = Instant::now();
    let mut after: Option<String> = None;
    let mut count = 0usize;
    loop {
        let page = store.range(prefix, after.as_deref(), 0, 5000).await?;
        for kv in &page.kvs {
            let (_, e) = meshd_state::decode::<IpcacheEntry>(&kv.key, &kv.value)?;
            if let (ipnet::IpNet::V4(p), std::net::IpAddr::V4(h)) = (e.prefix, e.host_ip) {
                scratch_maps.upsert_ipcache(
                    p,
                    meshd_datapath::IpcacheTarget {
                        identity: e.identity,
                        tunnel_endpoint: Some(h.into()),
                        local: false,
                    },
                )?;
                count += 1;
            }
        }
        after = page.kvs.last().map(|kv| kv.key.clone());
        if !page.more || after.is_none() {
            break;
        }
    }
    scratch_maps.flush_forward_revision()?;
    let raw = t0.elapsed();
    anyhow::ensure!(count >= records, "raw read saw {count} records");
    Ok(raw)
}

/// Restarts c1's agent from nothing and times it until every record is in its maps.
fn agent_sync(mesh: &mut Mesh, records: usize) -> anyhow::Result<Duration> {
    mesh.kill_agent("c1", "n1")?;
    let pin_dir = mesh.node("c1", "n1")?.pin_dir.clone();
    let _ = std::fs::remove_dir_all(&pin_dir);
    let t0 = Instant::now();
    mesh.start_agent("c1", "n1")?;
    let maps = loop {
        match meshd_datapath::DatapathMaps::open(&pin_dir) {
            Ok(m) => break m,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let last = Ipv4Net::from(nth_ip(200, records - 1));
    let first = Ipv4Net::from(nth_ip(200, 0));
    let deadline = t0 + Duration::from_secs(600);
    loop {
        if maps.ipcache_entry(last)?.is_some() && maps.ipcache_entry(first)?.is_some() {
            let n = maps.ipcache_prefixes()?.len();
            if n >= records {
                break;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "initial sync not done in 600 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(t0.elapsed())
}

async fn churn(
    mesh: &Mesh,
    store: &EtcdStore,
    records: usize,
    identity: u32,
    host: Ipv4Addr,
    secs: u64,
    rate: u64,
) -> anyhow::Result<()> {
    let pid = mesh.agent_pid("c1", "n1").context("agent pid")?;
    let cpu0 = cpu_time(pid)?;
    let events = secs * rate;
    // Puts of new records alternating with deletes of ones put 500 events earlier, paced.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            for k in 0..events as usize {
                tick.tick().await;
                let ip = nth_ip(220, k / 2);
                if k % 2 == 0 {
                    let (key, value) = record(&c2_name(), ip, identity, host)?;
                    store.put(&key, value, None).await?;
                } else if k >= 1000 {
                    let (key, _) = record(&c2_name(), nth_ip(220, k / 2 - 250), identity, host)?;
                    store.delete(&key).await?;
                }
            }
            anyhow::Ok(())
        })
    };
    let maps = meshd_datapath::DatapathMaps::open(&mesh.node("c1", "n1")?.pin_dir)?;
    // Baseline under the same churn: raw put -> watch event on the same etcd, probes
    // alternating with the agent's.
    let raw_prefix = "bench/churn-raw/";
    let rev = store
        .put(&format!("{raw_prefix}start"), b"x".to_vec(), None)
        .await?
        .revision;
    let mut watch = store.watch(raw_prefix, rev + 1).await?;
    let mut raw = Vec::new();
    let mut lat = Vec::new();
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        let key = format!("{raw_prefix}{i:06}");
        let t0 = Instant::now();
        store.put(&key, b"{}".to_vec(), None).await?;
        'seen: loop {
            match watch.next().await.context("watch ended")?? {
                WatchMessage::Events { events, .. } => {
                    if events.iter().any(|e| e.kv.key == key) {
                        break 'seen;
                    }
                }
                WatchMessage::Compacted { .. } => anyhow::bail!("compacted"),
            }
        }
        raw.push(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;

        let ip = nth_ip(240, i);
        i += 1;
        let (key, value) = record(&c2_name(), ip, identity, host)?;
        let t0 = Instant::now();
        store.put(&key, value, None).await?;
        let deadline = t0 + Duration::from_secs(10);
        while maps.ipcache_entry(Ipv4Net::from(ip))?.is_none() {
            anyhow::ensure!(Instant::now() < deadline, "{ip} never reached c1's map");
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        lat.push(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer.await??;
    let written = started.elapsed();
    // The last put of the churn, and the last delete, in the maps: how far behind the agent is.
    let last_put = Ipv4Net::from(nth_ip(220, (events as usize - 2) / 2));
    let last_deleted = Ipv4Net::from(nth_ip(220, (events as usize - 1) / 2 - 250));
    let t0 = Instant::now();
    while maps.ipcache_entry(last_put)?.is_none() || maps.ipcache_entry(last_deleted)?.is_some() {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "churn never drained"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let drain = t0.elapsed();
    let cpu = cpu_time(pid)? - cpu0;
    lat.sort();
    raw.sort();
    println!(
        "churn on top of {records} entries ({rate} puts/deletes per second for {:.1} s, {} probes): \
         probe put -> map p50 {:.2} ms, p99 {:.2} ms (goal p99 <= 10 ms), raw put -> watch \
         event p50 {:.2} ms, p99 {:.2} ms; last change in the maps \
         {:.1} ms after the writer finished; agent CPU {:.2} s = {:.1} us per event (goal <= 50 us)",
        written.as_secs_f64(),
        lat.len(),
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(percentile(&raw, 0.5)),
        ms(percentile(&raw, 0.99)),
        ms(drain),
        cpu.as_secs_f64(),
        // Raw probes are not the agent's events (its watch does not cover their prefix).
        cpu.as_secs_f64() * 1e6 / (events as f64 + lat.len() as f64)
    );
    Ok(())
}

/// Loads `records` into c2's etcd, times a fresh agent's initial sync of them against the raw
/// baseline and prints its memory against `rss_empty` (a fresh agent's with an empty view).
async fn memory(
    mesh: &mut Mesh,
    c2: &EtcdStore,
    records: usize,
    identity: u32,
    host: Ipv4Addr,
    rss_empty: u64,
    parts_empty: (u64, u64, u64),
) -> anyhow::Result<()> {
    load(c2, records, identity, host).await?;
    let raw = raw_sync(c2, records).await?;
    let sync = agent_sync(mesh, records)?;
    println!(
        "initial sync ({records} remote records): agent start -> all in maps {:.2} s; raw range \
         read + decode + map writes {:.2} s; ratio {:.2}x (goal <= 1.3x)",
        sync.as_secs_f64(),
        raw.as_secs_f64(),
        sync.as_secs_f64() / raw.as_secs_f64()
    );
    mesh.wait_all_ready(Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(2));
    let rss_full = mesh.agent_rss_bytes("c1", "n1")?;
    let parts_full = mesh.agent_rss_parts("c1", "n1")?;
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "agent memory: {:.1} MiB with an empty view (fresh agent), {:.1} MiB with {records} \
         remote endpoints: {:.0} bytes per remote endpoint (goal <= 250); anonymous {:.1} -> \
         {:.1} MiB ({:.0} bytes per endpoint), file-backed {:.1} -> {:.1} MiB, shared {:.1} -> \
         {:.1} MiB",
        mib(rss_empty),
        mib(rss_full),
        (rss_full as f64 - rss_empty as f64) / records as f64,
        mib(parts_empty.0),
        mib(parts_full.0),
        (parts_full.0 as f64 - parts_empty.0 as f64) / records as f64,
        mib(parts_empty.1),
        mib(parts_full.1),
        mib(parts_empty.2),
        mib(parts_full.2),
    );
    Ok(())
}

async fn run(mesh: &mut Mesh, n: usize, records: usize, rounds: usize) -> anyhow::Result<()> {
    let c2 = admin_store(mesh, "c2").await?;
    let identity = mesh
        .add_endpoint("c2", "n1", "bench-identity", "app=bench")?
        .identity;
    let host = mesh.node("c2", "n1")?.ip;

    // A fresh agent with an empty view: its memory, then propagation.
    mesh.kill_agent("c1", "n1")?;
    mesh.start_agent("c1", "n1")?;
    mesh.wait_all_ready(Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(2));
    let rss_empty = mesh.agent_rss_bytes("c1", "n1")?;
    let parts_empty = mesh.agent_rss_parts("c1", "n1")?;
    // `--memory-only 1`: the initial sync and the memory after it, nothing else (for measuring
    // memory changes without the latency rounds and the churn).
    let memory_only = arg("--memory-only", 0) != 0;
    if memory_only {
        memory(mesh, &c2, records, identity, host, rss_empty, parts_empty).await?;
        return Ok(());
    }
    // `--churn-only 1`: no propagation rounds (the memory and the churn only).
    let churn_only = arg("--churn-only", 0) != 0;
    let empty99 = if churn_only {
        0.0
    } else {
        propagation(mesh, &c2, "empty view", n, rounds, 100, identity, host)
            .await?
            .1
    };

    memory(mesh, &c2, records, identity, host, rss_empty, parts_empty).await?;

    // Propagation with R entries present.
    let full99 = if churn_only {
        0.0
    } else {
        propagation(
            mesh,
            &c2,
            &format!("{records} remote entries present"),
            n,
            rounds,
            100 + rounds as u8,
            identity,
            host,
        )
        .await?
        .1
    };
    if !churn_only {
        println!(
        "propagation p99 with {records} entries / with an empty view: {:.2}x (goal <= 1.5x, and \
         p99 <= 5 ms)",
        full99 / empty99.max(1e-9)
    );
    }
    churn(
        mesh,
        &c2,
        records,
        identity,
        host,
        arg("--churn-secs", 30) as u64,
        arg("--churn-rate", 1000) as u64,
    )
    .await?;
    let status = mesh.status("c1", "n1")?;
    println!(
        "c1/n1 datapath status: {} ipcache entries, {} full diffs, {} corrections, {} failed writes",
        status["datapath"]["ipcache_entries"],
        status["datapath"]["full_diffs"],
        status["datapath"]["corrections"],
        status["datapath"]["failed_writes"]
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo test --benches` asks for a list of tests; there are none
    }
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let n = arg("--endpoints", 200);
    let records = arg("--records", 500_000);
    let rounds = arg("--rounds", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut mesh = Mesh::start(MeshOptions::clusters(2, 1))?;
    rt.block_on(run(&mut mesh, n, records, rounds))
}
