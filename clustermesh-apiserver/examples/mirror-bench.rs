//! Benchmark of the mirror (`--kvstoremesh`): records per second mirrored from a remote etcd
//! into the local one, against raw etcd writes of the same records into the same local etcd in
//! the same run (transactions of the mirror's batch size, one at a time as the mirror writes).
//!
//! - list: the mirror starts on an empty cache and lists RECORDS ipcache-sized records; timed
//!   until its status says ready with every entry (seen through a watch of the status key).
//!   Baseline: writing the same records with raw etcd-client transactions.
//! - watch: every record is rewritten on the remote (raw transactions, one at a time);
//!   timed from the first write until the cache has the last one. Baseline: the remote's own
//!   writes (the source's rate: the mirror cannot go faster than the remote changes).
//!
//! Median of RUNS alternating runs (after a warm-up); prints both rates and their ratio.
//! Run: `cargo run --release -p clustermesh-apiserver --example mirror-bench [-- RECORDS]`.

use std::time::{Duration, Instant};

use anyhow::Context;
use clustermesh_apiserver::mirror::{self, MirrorConfig, MirrorMetrics, MAX_BATCH};
use etcd_client::{EventType, GetOptions, Txn, TxnOp, WatchOptions};
use meshd_kvstore::{connect, EtcdConfig};
use meshd_state::keys::{cache_prefix, cache_status_key};
use meshd_state::{CacheStatus, ClusterId, ClusterName};

const RUNS: usize = 3;

fn key(n: u32) -> String {
    let ip = std::net::Ipv4Addr::from(0x0a02_0000 | n);
    format!("meshd/state/ip/v1/c2/{ip}")
}

fn value(n: u32, generation: u32) -> Vec<u8> {
    let ip = std::net::Ipv4Addr::from(0x0a02_0000 | n);
    format!(
        r#"{{"prefix":"{ip}/32","identity":{},"host_ip":"192.168.0.{}","endpoint":"workload-{n}-7f9c4d5b8-x2k4p","namespace":"default","generation":{generation}}}"#,
        (2 << 16) | (256 + n % 60000),
        n % 250
    )
    .into_bytes()
}

/// Writes `records` under `prefix` (the remote's keys, or a raw copy) in transactions of
/// `MAX_BATCH` puts, one at a time.
async fn write_all(
    client: &etcd_client::Client,
    records: u32,
    generation: u32,
    rename: impl Fn(String) -> String,
) -> anyhow::Result<Duration> {
    let mut kv = client.kv_client();
    let start = Instant::now();
    let all: Vec<u32> = (0..records).collect();
    for chunk in all.chunks(MAX_BATCH) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|&n| TxnOp::put(rename(key(n)), value(n, generation), None))
            .collect();
        kv.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(start.elapsed())
}

async fn delete_prefix(client: &etcd_client::Client, prefix: &str) -> anyhow::Result<()> {
    client
        .kv_client()
        .delete(
            prefix,
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?;
    Ok(())
}

fn rate(records: u32, d: Duration) -> f64 {
    records as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let records: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("RECORDS must be a number")?
        .unwrap_or(50_000);
    let start_etcd = || {
        meshd_testing::etcd::Etcd::start()
            .context("starting etcd (is /usr/bin/etcd installed? scripts/install-deps.sh)")
    };
    let remote_etcd = start_etcd()?;
    let local_etcd = start_etcd()?;
    let remote = connect(&EtcdConfig::new([remote_etcd.endpoint()])).await?;
    let local = connect(&EtcdConfig::new([local_etcd.endpoint()])).await?;
    let (rc, lc) = (remote.client(), local.client());
    rc.kv_client()
        .put("meshd/cluster-config/c2", r#"{"name":"c2","id":2}"#, None)
        .await?;
    write_all(&rc, records, 0, |k| k).await?;
    rc.kv_client()
        .put("meshd/synced/c2/ip", r#"{"synced_at_ms":1}"#, None)
        .await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("c2.yaml"),
        format!("endpoints: [{}]\n", remote_etcd.endpoint()),
    )?;
    let config = MirrorConfig {
        rescan: Duration::from_millis(50),
        ..MirrorConfig::new(
            dir.path().to_owned(),
            ClusterName::new("c1").unwrap(),
            ClusterId::new(1).unwrap(),
        )
    };
    let entries = records as u64 + 2;
    let status_key = cache_status_key("c2");
    let last_key = format!("{}state/ip/v1/c2/", cache_prefix("c2"));

    let (mut list_raw, mut list_mirror, mut watch_raw, mut watch_mirror) =
        (vec![], vec![], vec![], vec![]);
    for run in 0..=RUNS {
        // Baseline: the same records written raw into the local etcd.
        let raw = write_all(&lc, records, run as u32, |k| format!("bench/raw/{k}")).await?;
        delete_prefix(&lc, "bench/raw/").await?;

        // The mirror's list into an empty cache, until its status says ready with everything.
        delete_prefix(&lc, "meshd/cache").await?;
        let mut statuses = lc.watch_client().watch(status_key.as_str(), None).await?;
        let t = Instant::now();
        let task = tokio::spawn(mirror::run(
            local.clone(),
            config.clone(),
            MirrorMetrics::default(),
        ));
        let listed = tokio::time::timeout(Duration::from_secs(300), async {
            while let Some(resp) = statuses.message().await? {
                for ev in resp.events() {
                    if let Some(kv) = ev.kv() {
                        if let Ok(s) = serde_json::from_slice::<CacheStatus>(kv.value()) {
                            if s.ready && s.entries == entries {
                                return anyhow::Ok(t.elapsed());
                            }
                        }
                    }
                }
            }
            anyhow::bail!("status watch ended")
        })
        .await
        .context("the mirror's list took over 300 s")??;

        // Watch: every record rewritten on the remote; done when the cache has the last one.
        let last = format!(
            "{last_key}{}",
            std::net::Ipv4Addr::from(0x0a02_0000 | (records - 1))
        );
        let want = value(records - 1, 1000 + run as u32);
        let mut cached = lc
            .watch_client()
            .watch(last.as_str(), Some(WatchOptions::new()))
            .await?;
        let t = Instant::now();
        let source = write_all(&rc, records, 1000 + run as u32, |k| k).await?;
        tokio::time::timeout(Duration::from_secs(300), async {
            while let Some(resp) = cached.message().await? {
                if resp.events().iter().any(|e| {
                    e.event_type() == EventType::Put
                        && e.kv().is_some_and(|kv| kv.value() == want.as_slice())
                }) {
                    return anyhow::Ok(());
                }
            }
            anyhow::bail!("cache watch ended")
        })
        .await
        .context("the mirror's watch took over 300 s")??;
        let mirrored = t.elapsed();
        task.abort();
        let n = lc
            .kv_client()
            .get(
                cache_prefix("c2"),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?
            .count();
        anyhow::ensure!(
            n as u64 == entries,
            "the cache holds {n} keys, not {entries}"
        );
        eprintln!(
            "run {run}: list: raw {:.0}/s, mirror {:.0}/s; watch: source {:.0}/s, mirror {:.0}/s",
            rate(records, raw),
            rate(records, listed),
            rate(records, source),
            rate(records, mirrored)
        );
        if run > 0 {
            list_raw.push(rate(records, raw));
            list_mirror.push(rate(records, listed));
            watch_raw.push(rate(records, source));
            watch_mirror.push(rate(records, mirrored));
        }
    }
    let (lr, lm, wr, wm) = (
        median(list_raw),
        median(list_mirror),
        median(watch_raw),
        median(watch_mirror),
    );
    println!(
        "raw etcd writes into the local etcd ({MAX_BATCH} puts/txn): median {lr:.0} records/s"
    );
    println!("mirror list into an empty cache:                 median {lm:.0} records/s");
    println!("remote rewrites (the source, {MAX_BATCH} puts/txn):      median {wr:.0} records/s");
    println!("mirror watch, first write to last mirrored:      median {wm:.0} records/s");
    println!(
        "mirror: {records} records, list mirror / raw = {:.2}x, watch mirror / source = {:.2}x (medians of {RUNS})",
        lm / lr,
        wm / wr
    );
    Ok(())
}
