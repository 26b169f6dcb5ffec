//! The long flood (issue 17, item 4), `make floods`: in a mesh of 3 clusters x 1 node (release
//! binaries, real etcd per cluster), c3 publishes K ipcache keys (1M by default) as fast as its
//! etcd takes them (transactions of 128, 4 in flight), while c2's changes are timed from c2's
//! etcd to c1/n1's maps (one probe entry at a time). Measured against the same probes before the
//! flood in the same run: their p50/p99 during the flood (until c1/n1 has settled: c3 held to
//! its limit, or every key in) and after it (the flood's keys still there); c1/n1's RSS before,
//! at its peak and after (and the mirror's, through the cache); how long c1/n1 took to settle.
//!
//! Where the time goes (session 10): a second baseline in the same run, the same K keys written
//! by the same writer into an etcd that no agent watches (`--machine 1`, the default): what
//! the flood costs the other clusters through the machine alone (its etcd's commits and the
//! writer's CPU on the shared cores); every `--split`th probe split at c1/n1's watcher of c2
//! (etcd and the wire, then the agent's queue, view task and reconciler); the flood's probes
//! apart while c3 is under its limit (admitted keys, work for the agent) and once it is over
//! (refused keys); and for each phase the CPU of every process of the run and how long their
//! runnable threads waited for a core (`/proc/*/schedstat`).
//!
//! The node under test on a core of its own (session 11, `--isolate 1`): in a real mesh c2/n1's
//! and c3/n1's agents, c3's etcd and the writer run on other machines, so they must not take
//! c1/n1's CPU here either. Every thread of each process is pinned (`sched_setaffinity`; threads
//! started later inherit it):
//! - CPU 0, the node under test and the probe's path: c1/n1's agent, c1's and c2's etcd, the
//!   relays of c1's and c2's etcd (threads `relay-2380`, `relay-2381` of this process; c2's
//!   carries the probes to c1/n1), and this process's other threads (the prober, the status
//!   reads and the `meshd status` they run);
//! - CPU 1, the flood and the other machines: c2/n1's and c3/n1's agents, c3's etcd, the relay of
//!   c3's etcd (`relay-2382`: the flood's path to both agents, the network in a real mesh), the
//!   writer's thread, the unwatched etcd of the second baseline and, through the cache, every
//!   cluster's mirror (a pod of its own, elsewhere, c1's too).
//!
//! Other sessions' processes still run on both.
//!
//! Usage: cargo bench -p meshd-e2e --bench floods -- [--keys K] [--limit L] [--probes P]
//! [--cache 0|1] [--machine 0|1] [--split N] [--isolate 0|1] [--poll-us U] [--from-request
//! 0|1]. `--limit 0` (the default) leaves
//! the agents' (and the mirror's) default limit; `--cache 1` reads remote clusters through each
//! cluster's mirror. Needs root, etcd, bpffs and the release binaries (and 2 CPUs or more for
//! `--isolate 1`). `--poll-us` (500 by default) is how often the prober looks at the map,
//! `--from-request 1` times each probe from the put's request, not its answer (see
//! `meshd_e2e::flood::Prober::from_request`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshd_certs::LeafKind;
use meshd_e2e::affinity;
use meshd_e2e::bench::{arg, ms, percentile};
use meshd_e2e::flood::{
    admin_config, cpu_report, cpu_snapshot, flood_records, spawn_writer, split_summary, summary,
    CpuSnapshot, Prober, Split, Watched, Writer,
};
use meshd_e2e::mesh::{Mesh, MeshOptions};
use meshd_e2e::proxy::RELAY_THREAD;
use meshd_kvstore::EtcdConfig;
use meshd_testing::etcd::{EtcdOptions, EtcdTls};
use meshd_testing::etcd_cluster::EtcdCluster;

const PARALLEL: usize = 4;
const GAP: Duration = Duration::from_millis(10);
const SETTLE: Duration = Duration::from_secs(1200);
/// How often c3's status is read during the flood (when it went over its limit, whether the
/// node settled).
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// `--isolate 1`: the node under test's CPU, and the flood's (see the module's doc).
const NODE_CPU: usize = 0;
const FLOOD_CPU: usize = 1;

fn u(v: &serde_json::Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or(0)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Probe samples of one phase, with the splits and the CPU between its two snapshots.
struct Phase {
    name: &'static str,
    probes: Vec<Duration>,
    splits: Vec<Split>,
    cpu: Vec<String>,
}

impl Phase {
    fn new(
        name: &'static str,
        mut probes: Vec<Duration>,
        splits: Vec<Split>,
        tasks: &[Watched],
        a: &CpuSnapshot,
        b: &CpuSnapshot,
    ) -> Self {
        probes.sort();
        Self {
            name,
            probes,
            splits,
            cpu: cpu_report(tasks, a, b),
        }
    }

    fn print(&self, before: &[Duration]) {
        println!("  {}", summary(self.name, &self.probes));
        if !self.probes.is_empty() && !before.is_empty() {
            let r = |p: f64| ms(percentile(&self.probes, p)) / ms(percentile(before, p));
            println!(
                "    against before the flood: p50 {:.2}x, p99 {:.2}x",
                r(0.5),
                r(0.99)
            );
        }
        println!("    {}", split_summary("split", &self.splits));
        for line in &self.cpu {
            println!("    {line}");
        }
    }
}

/// The processes whose CPU is reported: the three nodes' agents, the clusters' etcds (and
/// mirrors), this process (the relays every node's etcd traffic goes through, the prober, the
/// writer) and the prober's thread. The writer's own thread reports itself ([`Writer`]).
fn watched(mesh: &Mesh, cached: bool) -> anyhow::Result<Vec<Watched>> {
    let mut tasks = Vec::new();
    for c in ["c1", "c2", "c3"] {
        let pid = mesh.agent_pid(c, "n1");
        tasks.push(Watched {
            name: format!("{c}/n1 agent"),
            pid: pid.ok_or_else(|| anyhow::anyhow!("no agent of {c}"))?,
            tid: None,
        });
    }
    for c in ["c1", "c2", "c3"] {
        if let Some(pid) = mesh.cluster(c)?.etcd.member(0).pid() {
            tasks.push(Watched {
                name: format!("{c} etcd"),
                pid,
                tid: None,
            });
        }
        if cached {
            if let Some(pid) = mesh.mirror_pid(c) {
                tasks.push(Watched {
                    name: format!("{c} mirror"),
                    pid,
                    tid: None,
                });
            }
        }
    }
    let me = std::process::id();
    for c in ["c1", "c2", "c3"] {
        for tid in relay_threads(mesh, c)? {
            tasks.push(Watched {
                name: format!("bench: {c}'s etcd relay"),
                pid: me,
                tid: Some(tid),
            });
        }
    }
    tasks.push(Watched {
        name: "bench process (all)".into(),
        pid: me,
        tid: None,
    });
    tasks.push(Watched {
        name: "bench: prober thread".into(),
        pid: me,
        tid: Some(me),
    });
    Ok(tasks)
}

/// The port `cluster`'s (first) etcd relay listens on, which names its threads.
fn relay_port(mesh: &Mesh, cluster: &str) -> anyhow::Result<u16> {
    let urls = mesh.cluster(cluster)?.etcd_urls();
    let url = urls
        .first()
        .ok_or_else(|| anyhow::anyhow!("{cluster} has no etcd relay"))?;
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no port in {cluster}'s relay address {url}"))
}

/// This process's threads of `cluster`'s etcd relay.
fn relay_threads(mesh: &Mesh, cluster: &str) -> anyhow::Result<Vec<u32>> {
    let name = format!("{RELAY_THREAD}{}", relay_port(mesh, cluster)?);
    Ok(affinity::threads(std::process::id())?
        .into_iter()
        .filter(|(_, comm)| *comm == name)
        .map(|(tid, _)| tid)
        .collect())
}

/// `--isolate 1`: pins everything as the module's doc says; a line per placement, checked by
/// reading each process's (or thread's) allowed CPUs back.
fn isolate(mesh: &Mesh, cached: bool) -> anyhow::Result<Vec<String>> {
    let me = std::process::id();
    let mut placed: Vec<(String, u32, u32, usize)> = Vec::new();
    // This process first (every relay and the prober), then what goes elsewhere.
    affinity::pin_process(me, NODE_CPU)?;
    placed.push((
        "bench: prober, c1's and c2's relays".into(),
        me,
        me,
        NODE_CPU,
    ));
    for (c, cpu) in [("c1", NODE_CPU), ("c2", FLOOD_CPU), ("c3", FLOOD_CPU)] {
        let pid = mesh
            .agent_pid(c, "n1")
            .ok_or_else(|| anyhow::anyhow!("no agent of {c}"))?;
        affinity::pin_process(pid, cpu)?;
        placed.push((format!("{c}/n1 agent"), pid, pid, cpu));
    }
    for (c, cpu) in [("c1", NODE_CPU), ("c2", NODE_CPU), ("c3", FLOOD_CPU)] {
        let pid = mesh
            .cluster(c)?
            .etcd
            .member(0)
            .pid()
            .ok_or_else(|| anyhow::anyhow!("{c}'s etcd is not running"))?;
        affinity::pin_process(pid, cpu)?;
        placed.push((format!("{c} etcd"), pid, pid, cpu));
        if cached {
            let pid = mesh
                .mirror_pid(c)
                .ok_or_else(|| anyhow::anyhow!("no mirror of {c}"))?;
            affinity::pin_process(pid, FLOOD_CPU)?;
            placed.push((format!("{c} mirror"), pid, pid, FLOOD_CPU));
        }
    }
    let c3_relay = relay_threads(mesh, "c3")?;
    anyhow::ensure!(!c3_relay.is_empty(), "no thread of c3's etcd relay found");
    for tid in c3_relay {
        affinity::pin_thread(tid, FLOOD_CPU)?;
        placed.push(("c3's etcd relay".into(), me, tid, FLOOD_CPU));
    }
    placed
        .into_iter()
        .map(|(what, pid, tid, cpu)| {
            let allowed = affinity::allowed_cpus(pid, tid)?;
            anyhow::ensure!(
                allowed == cpu.to_string(),
                "{what} (pid {pid}, thread {tid}) may run on CPUs {allowed}, not {cpu} alone"
            );
            Ok(format!("{what} (pid {pid}, thread {tid}): CPU {allowed}"))
        })
        .collect()
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
    let machine = arg("--machine", 1) == 1;
    let split_every = arg("--split", 8);
    let isolated = arg("--isolate", 0) == 1;
    if isolated {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        anyhow::ensure!(
            cpus > FLOOD_CPU,
            "--isolate 1 needs 2 CPUs, this machine has {cpus}"
        );
    }
    let writer_cpu = isolated.then_some(FLOOD_CPU);
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
    if isolated {
        println!("  isolated: c1/n1 and the probe's path on CPU {NODE_CPU}, the flood on CPU {FLOOD_CPU}:");
        for line in isolate(&mesh, cached)? {
            println!("    {line}");
        }
    }
    let tasks = watched(&mesh, cached)?;
    let mut prober = Prober::new(&mesh, "c2", 2, "c1", "n1")?;
    // Measured, not a goal: a probe stuck behind a flood is waited for (a first run gave up on
    // one after 30 s).
    prober.deadline = Duration::from_secs(600);
    prober.split_every = split_every;
    prober.poll = Duration::from_micros(arg("--poll-us", 500) as u64);
    prober.from_request = arg("--from-request", 0) == 1;
    let rss0 = mesh.agent_rss_bytes("c1", "n1")?;
    let mirror0 = cached.then(|| mesh.mirror_rss_bytes("c1")).transpose()?;
    let s0 = cpu_snapshot(&tasks);
    let before = prober.probe_while(probes, GAP, || false, |_| {})?;
    let s1 = cpu_snapshot(&tasks);
    let before = Phase::new(
        "before the flood",
        before,
        std::mem::take(&mut prober.splits),
        &tasks,
        &s0,
        &s1,
    );

    let records = Arc::new(flood_records(
        "c3",
        3,
        mesh.node("c3", "n1")?.ip,
        0..keys,
        0,
    )?);

    // The second baseline: the same keys, the same writer, into an etcd nobody watches (with
    // c3's server certificate and client certificate checks, as c3's etcd).
    let unwatched = if machine {
        let server = mesh.pki.files("c3", LeafKind::Server);
        let admin = mesh.pki.files("c3", LeafKind::Admin);
        let mut spare = EtcdCluster::start(
            1,
            EtcdOptions {
                tls: Some(EtcdTls {
                    ca: server.ca.clone(),
                    cert: server.cert.clone(),
                    key: server.key.clone(),
                    client_cert_auth: true,
                    etcdctl_client: Some((admin.cert.clone(), admin.key.clone())),
                }),
                extra_args: Vec::new(),
            },
        )?;
        let config = EtcdConfig::new([spare.endpoint()]).with_tls(admin.clone());
        if isolated {
            if let Some(pid) = spare.member(0).pid() {
                affinity::pin_process(pid, FLOOD_CPU)?;
            }
        }
        let writer = spawn_writer(config, records.clone(), PARALLEL, writer_cpu)?;
        let mut t = tasks.clone();
        if let Some(pid) = spare.member(0).pid() {
            t.push(Watched {
                name: "unwatched etcd".into(),
                pid,
                tid: None,
            });
        }
        let a = cpu_snapshot(&t);
        let mut got = Vec::new();
        while got.len() < probes || !writer.handle.is_finished() {
            got.push(prober.probe()?);
            std::thread::sleep(GAP);
        }
        let b = cpu_snapshot(&t);
        let wrote = writer.handle.join().expect("writer thread")?;
        println!("  {}", Writer::report("unwatched etcd", wrote));
        let phase = Phase::new(
            "flood into an etcd no agent watches",
            got,
            std::mem::take(&mut prober.splits),
            &t,
            &a,
            &b,
        );
        spare.member_mut(0).stop();
        Some(phase)
    } else {
        None
    };

    let writer = spawn_writer(
        admin_config(&mesh, "c3")?,
        records.clone(),
        PARALLEL,
        writer_cpu,
    )?;
    let t = tasks.clone();
    let start = Instant::now();
    let c_start = cpu_snapshot(&t);
    let mut peak = rss0;
    let mut mirror_peak = mirror0.unwrap_or(0);
    let mut settled: Option<Duration> = None;
    let mut over_since: Option<(Duration, CpuSnapshot, Vec<Split>)> = None;
    let mut last_check = Instant::now();
    let want = if entry_limit == 0 {
        keys as u64
    } else {
        entry_limit.min(keys as u64)
    };
    let (mut under, mut over) = (Vec::new(), Vec::new());
    loop {
        if last_check.elapsed() >= STATUS_EVERY {
            last_check = Instant::now();
            let s = mesh
                .cluster_status("c1", "n1", "c3")
                .unwrap_or(serde_json::Value::Null);
            let refused = u(&s, "over_limit") + u(&s["cache"], "over_limit");
            if over_since.is_none() && refused > 0 {
                over_since = Some((
                    start.elapsed(),
                    cpu_snapshot(&t),
                    std::mem::take(&mut prober.splits),
                ));
            }
            // Settled: c3 at its limit (held) or all of it admitted.
            if writer.handle.is_finished()
                && (u(&s, "entries_held") >= want || u(&s, "endpoints") >= keys as u64)
            {
                settled = Some(start.elapsed());
            }
        }
        let enough = under.len() + over.len() >= probes;
        if enough && (settled.is_some() || start.elapsed() >= SETTLE) {
            break;
        }
        let d = prober.probe()?;
        if over_since.is_some() {
            over.push(d);
        } else {
            under.push(d);
        }
        peak = peak.max(mesh.agent_rss_bytes("c1", "n1").unwrap_or(0));
        if cached {
            mirror_peak = mirror_peak.max(mesh.mirror_rss_bytes("c1").unwrap_or(0));
        }
        std::thread::sleep(GAP);
    }
    let c_end = cpu_snapshot(&t);
    let wrote = writer.handle.join().expect("flood thread")?;
    let during_all: Vec<Duration> = under.iter().chain(over.iter()).copied().collect();
    let (over_at, under_phase, over_phase) = match over_since {
        Some((at, snap, under_splits)) => (
            Some(at),
            Phase::new(
                "during: c3 under its limit (keys admitted)",
                under,
                under_splits,
                &t,
                &c_start,
                &snap,
            ),
            Some(Phase::new(
                "during: c3 over its limit (keys refused)",
                over,
                std::mem::take(&mut prober.splits),
                &t,
                &snap,
                &c_end,
            )),
        ),
        None => (
            None,
            Phase::new(
                "during: c3 under its limit (keys admitted)",
                under,
                std::mem::take(&mut prober.splits),
                &t,
                &c_start,
                &c_end,
            ),
            None,
        ),
    };
    let s2 = cpu_snapshot(&tasks);
    let after = prober.probe_while(probes, GAP, || false, |_| {})?;
    let s3 = cpu_snapshot(&tasks);
    let after = Phase::new(
        "after the flood",
        after,
        std::mem::take(&mut prober.splits),
        &tasks,
        &s2,
        &s3,
    );
    let rss1 = mesh.agent_rss_bytes("c1", "n1")?;
    let s = mesh.cluster_status("c1", "n1", "c3")?;
    println!("  {}", Writer::report("c3", wrote));
    println!(
        "  c3 over its limit (at c1/n1) from {}; c1/n1 settled {} after the flood began",
        over_at.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64())),
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
    let b = before.probes.clone();
    before.print(&b);
    if let Some(p) = &unwatched {
        p.print(&b);
    }
    let mut all = during_all;
    all.sort();
    println!("  {}", summary("during the flood (all)", &all));
    let ratio = |v: &[Duration], p: f64| ms(percentile(v, p)) / ms(percentile(&b, p));
    if !all.is_empty() {
        println!(
            "    against before the flood: p50 {:.2}x, p99 {:.2}x",
            ratio(&all, 0.5),
            ratio(&all, 0.99)
        );
    }
    under_phase.print(&b);
    if let Some(p) = &over_phase {
        p.print(&b);
    }
    after.print(&b);
    Ok(())
}
