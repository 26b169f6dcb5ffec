//! Benchmark (issue 2's first figure): list + decode of 100k ipcache records through the
//! kvstore watcher (paginated range reads, JSON decode, validation, mark-and-sweep, typed events
//! until `Synced`) versus a raw etcd-client paginated range read of the same keys, each the
//! median of 5 runs on a local etcd started for the purpose. Prints both and their ratio.
//!
//! Run: `cargo run --release -p meshd-kvstore --example kvstore-list [-- RECORDS]`.

use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::{GetOptions, Txn, TxnOp};
use futures::StreamExt;
use meshd_kvstore::{connect, watch_cluster, EtcdConfig, WatchConfig, WatchEvent};
use meshd_state::{
    encode, ClusterId, ClusterName, IpcacheEntry, IpcacheKey, NumericIdentity, Resource,
};

const RUNS: usize = 5;
const PAGE: usize = 5000;

fn record(cluster: &ClusterName, n: u32) -> (IpcacheKey, IpcacheEntry) {
    let key = IpcacheKey::host(
        cluster.clone(),
        std::net::Ipv4Addr::from(0x0a00_0000 | n).into(),
    );
    let entry = IpcacheEntry {
        prefix: key.prefix,
        identity: NumericIdentity::allocated(ClusterId::new(1).unwrap(), 256 + (n % 60000) as u16)
            .unwrap(),
        host_ip: std::net::Ipv4Addr::from(0xc0a8_0000 | (n / 110)).into(),
        endpoint: Some(format!("workload-{n}-7f9c4d5b8-x2k4p")),
        namespace: Some("default".into()),
    };
    (key, entry)
}

/// CPU time (user + system) of this process so far, from /proc (clock ticks of 10 ms). Less
/// sensitive than wall time to other load on a shared machine.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let records: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("RECORDS must be a number")?
        .unwrap_or(100_000);
    let etcd = meshd_testing::etcd::Etcd::start()
        .context("starting etcd (is /usr/bin/etcd installed? scripts/install-deps.sh)")?;
    let store = connect(&EtcdConfig::new([etcd.endpoint()])).await?;
    let cluster = ClusterName::new("c1").unwrap();
    let prefix = IpcacheEntry::cluster_prefix(&cluster);

    // Load: transactions of 128 puts (etcd's default --max-txn-ops), 8 in flight.
    let started = Instant::now();
    let mut bytes = 0usize;
    let mut txns = Vec::new();
    for chunk in (0..records).collect::<Vec<_>>().chunks(128) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|&n| {
                let (k, v) = record(&cluster, n);
                let value = encode(&k, &v).expect("valid record");
                bytes += value.len() + k.to_string().len();
                TxnOp::put(k.to_string(), value, None)
            })
            .collect();
        txns.push(Txn::new().and_then(ops));
    }
    let client = store.client();
    futures::stream::iter(txns)
        .map(|txn| {
            let mut c = client.clone();
            async move { c.txn(txn).await }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    println!(
        "loaded {records} ipcache records ({:.1} MB of keys and values) in {}",
        bytes as f64 / 1e6,
        ms(started.elapsed())
    );

    let mut raw_times = Vec::new();
    let mut kv_times = Vec::new();
    let mut raw_cpu = Vec::new();
    let mut kv_cpu = Vec::new();
    // One warm-up of each, then alternate so both see the same machine conditions.
    for run in 0..=RUNS {
        let (t, c) = (Instant::now(), process_cpu());
        let n = tokio::time::timeout(Duration::from_secs(60), raw_list(&client, &prefix))
            .await
            .context("raw range read stalled for 60 s")??;
        let raw = t.elapsed();
        let raw_c = process_cpu() - c;
        anyhow::ensure!(n == records as usize, "raw read saw {n} keys");

        let (t, c) = (Instant::now(), process_cpu());
        let mut watch = watch_cluster::<IpcacheEntry, _>(
            store.clone(),
            &cluster,
            WatchConfig {
                page_size: PAGE,
                ..WatchConfig::default()
            },
        );
        let mut upserts = 0usize;
        while let Some(ev) = tokio::time::timeout(Duration::from_secs(60), watch.next())
            .await
            .context("kvstore list stalled for 60 s")?
        {
            match ev {
                WatchEvent::Upsert { .. } => upserts += 1,
                WatchEvent::Synced { .. } => break,
                WatchEvent::Delete { .. } => anyhow::bail!("unexpected delete"),
            }
        }
        let typed = t.elapsed();
        let typed_c = process_cpu() - c;
        anyhow::ensure!(upserts == records as usize, "kvstore saw {upserts} records");
        anyhow::ensure!(watch.stats().malformed() == 0, "malformed records");
        drop(watch);
        eprintln!("run {run}: raw {}, kvstore {}", ms(raw), ms(typed));
        if run > 0 {
            raw_times.push(raw);
            kv_times.push(typed);
            raw_cpu.push(raw_c);
            kv_cpu.push(typed_c);
        }
    }
    let raw = median(raw_times.clone());
    let typed = median(kv_times.clone());
    println!(
        "raw etcd-client paginated range ({PAGE}/page): median {} of {RUNS} (runs: {})",
        ms(raw),
        raw_times
            .iter()
            .map(|d| ms(*d))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "kvstore list + decode to typed events:   median {} of {RUNS} (runs: {})",
        ms(typed),
        kv_times
            .iter()
            .map(|d| ms(*d))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (rc, kc) = (median(raw_cpu), median(kv_cpu));
    println!(
        "client CPU (this process, 10 ms ticks): raw median {}, kvstore median {}",
        ms(rc),
        ms(kc)
    );
    println!(
        "kvstore-list: {records} ipcache records, kvstore / raw = {:.2}x (wall time, medians)",
        typed.as_secs_f64() / raw.as_secs_f64()
    );
    Ok(())
}

/// The baseline: what any reader must do at least, a paginated range read at one revision.
async fn raw_list(client: &etcd_client::Client, prefix: &str) -> anyhow::Result<usize> {
    let end = meshd_kvstore::prefix_end(prefix);
    let mut kv = client.kv_client();
    let mut start = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut n = 0;
    loop {
        let mut opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(PAGE as i64);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = kv.get(start.clone(), Some(opts)).await?;
        if revision == 0 {
            revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        n += resp.kvs().len();
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                start = [last.key(), &[0]].concat();
            }
            _ => return Ok(n),
        }
    }
}
