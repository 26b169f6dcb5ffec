//! The long flood (issue 17, item 4), `make floods`: in a mesh of 3 clusters x 1 node (release
//! binaries, real etcd per cluster), c3 publishes K ipcache keys (1M by default) as fast as its
//! etcd takes them (transactions of 128, 4 in flight), while c2's changes are timed from c2's
//! etcd to c1/n1's maps (one probe entry at a time). Measured against the same probes before the
//! flood in the same run: their p50/p99 during the flood (until c1/n1 has settled: c3 held to
//! its limit, or every key in) and after it (the flood's keys still there); c1/n1's RSS before,
//! at its peak and after (and the mirror's, through the cache); how long c1/n1 took to settle.
//!
//! Usage: cargo bench -p meshd-e2e --bench floods -- [--keys K] [--limit L] [--probes P]
//! [--cache 0|1]. `--limit 0` (the default) leaves the agents' (and the mirror's) default limit;
//! `--cache 1` reads remote clusters through each cluster's mirror. Needs root, etcd, bpffs and
//! the release binaries.

use std::time::{Duration, Instant};

use meshd_e2e::bench::{arg, ms, percentile};
use meshd_e2e::flood::{flood_records, put_parallel, summary, with_admin_on_thread, Prober};
use meshd_e2e::mesh::{Mesh, MeshOptions};

const PARALLEL: usize = 4;
const GAP: Duration = Duration::from_millis(10);
const SETTLE: Duration = Duration::from_secs(1200);

fn u(v: &serde_json::Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or(0)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        meshd_e2e::mesh::prerequisites(),
        "needs root, etcd and bpffs"
    );
    let keys = arg("--keys", 1_000_000);
    let limit = arg("--limit", 0) as u64;
    let probes = arg("--probes", 200);
    let cached = arg("--cache", 0) == 1;
    let mode = if cached { "cache" } else { "direct" };
    let mut opts = MeshOptions::clusters(3, 1);
    if limit != 0 {
        opts = opts.agent_config(&format!("remote_entry_limit: {limit}"));
    }
    if cached {
        opts = opts.kvstoremesh();
        if limit != 0 {
            opts.mirror_args = vec!["--kvstoremesh-limit".into(), limit.to_string()];
        }
    }
    let mesh = Mesh::start(opts)?;
    mesh.wait_all_ready(Duration::from_secs(120))?;
    let entry_limit = u(&mesh.cluster_status("c1", "n1", "c3")?, "entry_limit");
    println!(
        "flood ({mode}): {keys} keys from c3, entry limit {entry_limit}, {} cores, load {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")?.trim()
    );
    let mut prober = Prober::new(&mesh, "c2", 2, "c1", "n1")?;
    // Measured, not a goal: a probe stuck behind a flood is waited for (a first run gave up on
    // one after 30 s).
    prober.deadline = Duration::from_secs(600);
    let rss0 = mesh.agent_rss_bytes("c1", "n1")?;
    let mirror0 = cached.then(|| mesh.mirror_rss_bytes("c1")).transpose()?;
    let before = prober.probe_while(probes, GAP, || false, |_| {})?;

    let records = flood_records("c3", 3, mesh.node("c3", "n1")?.ip, 0..keys, 0)?;
    let flooding = with_admin_on_thread(&mesh, "c3", move |rt, store| {
        rt.block_on(put_parallel(&store, &records, PARALLEL, None))
    })?;
    let start = Instant::now();
    let mut peak = rss0;
    let mut mirror_peak = mirror0.unwrap_or(0);
    let mut settled: Option<Duration> = None;
    let mut last_check = Instant::now();
    let want = if entry_limit == 0 {
        keys as u64
    } else {
        entry_limit.min(keys as u64)
    };
    let during = prober.probe_while(
        probes,
        GAP,
        || {
            if settled.is_some() {
                return false;
            }
            if !flooding.is_finished() || last_check.elapsed() < Duration::from_millis(500) {
                return start.elapsed() < SETTLE;
            }
            last_check = Instant::now();
            // Settled: c3 at its limit (held) or all of it admitted.
            let s = mesh
                .cluster_status("c1", "n1", "c3")
                .unwrap_or(serde_json::Value::Null);
            if u(&s, "entries_held") >= want || u(&s, "endpoints") >= keys as u64 {
                settled = Some(start.elapsed());
            }
            settled.is_none() && start.elapsed() < SETTLE
        },
        |_| {
            peak = peak.max(mesh.agent_rss_bytes("c1", "n1").unwrap_or(0));
            if cached {
                mirror_peak = mirror_peak.max(mesh.mirror_rss_bytes("c1").unwrap_or(0));
            }
        },
    )?;
    let (written, write_took) = flooding.join().expect("flood thread")?;
    let after = prober.probe_while(probes, GAP, || false, |_| {})?;
    let rss1 = mesh.agent_rss_bytes("c1", "n1")?;
    let s = mesh.cluster_status("c1", "n1", "c3")?;
    println!(
        "  c3 wrote {written} keys in {:.1} s ({:.0}/s); c1/n1 settled {} after the flood began",
        write_took.as_secs_f64(),
        written as f64 / write_took.as_secs_f64(),
        settled.map_or("NOT (deadline)".into(), |d| format!(
            "{:.1} s",
            d.as_secs_f64()
        ))
    );
    println!(
        "  c1/n1 sees c3: state {}, entries held {}, over limit {}, endpoints {}, rejected {}",
        s["state"],
        u(&s, "entries_held"),
        u(&s, "over_limit"),
        u(&s, "endpoints"),
        u(&s, "rejected")
    );
    if let Some(cache) = s.get("cache").filter(|c| !c.is_null()) {
        println!(
            "  c1's mirror holds {} of c3, over limit {}",
            u(cache, "entries"),
            u(cache, "over_limit")
        );
    }
    println!(
        "  c1/n1 RSS before {:.1} MiB, peak {:.1} MiB, after {:.1} MiB",
        mib(rss0),
        mib(peak),
        mib(rss1)
    );
    if let Some(m0) = mirror0 {
        println!(
            "  c1's mirror RSS before {:.1} MiB, peak {:.1} MiB, after {:.1} MiB",
            mib(m0),
            mib(mirror_peak),
            mib(mesh.mirror_rss_bytes("c1")?)
        );
    }
    println!("  c2 -> c1/n1 propagation:");
    println!("    {}", summary("before the flood", &before));
    println!("    {}", summary("during the flood", &during));
    println!("    {}", summary("after the flood", &after));
    let ratio = |v: &[Duration], p: f64| ms(percentile(v, p)) / ms(percentile(&before, p));
    println!(
        "    during/before: p50 {:.2}x, p99 {:.2}x; after/before: p50 {:.2}x, p99 {:.2}x",
        ratio(&during, 0.5),
        ratio(&during, 0.99),
        ratio(&after, 0.5),
        ratio(&after, 0.99)
    );
    Ok(())
}
