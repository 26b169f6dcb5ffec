//! What the flood test and the flood benchmark share (issue 17, item 4): a flooding cluster's
//! keys, written many transactions at a time, and a probe that times another cluster's changes
//! from its etcd to a node's maps while the flood runs.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
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
    /// Every `split_every`th probe (0: none) is also split at the node's watcher of the
    /// cluster (see [`Split`]), into `splits`.
    pub split_every: usize,
    pub splits: Vec<Split>,
    /// `meshd` and the node's API socket: how the watcher's time is read.
    status: (PathBuf, PathBuf),
    /// How often the map is looked at (0.5 ms by default: a probe's time is a multiple of it,
    /// near enough, which hides what is under a millisecond).
    pub poll: Duration,
    /// Timed from the put's request (etcd's commit included) instead of from its answer. From
    /// the answer, a prober that waits for a core after the answer while the node is quicker
    /// times 0: on a busy core the median fell under the idle baseline (session 11).
    pub from_request: bool,
}

/// Where one probe's time went, split at the moment the node's watcher of the probed cluster
/// handled the change (its `last_sync_ms` in `meshd status`: set by the watcher per event,
/// after etcd sent it and the kvstore decoded it, before the view task and the reconciler).
/// Milliseconds of the wall clock (the agent's resolution); the first part can be negative by
/// a little, since etcd may send the watch event before the put's answer reaches the prober.
#[derive(Debug, Clone, Copy)]
pub struct Split {
    /// The put answered -> the node's watcher had the change: etcd, the wire (the relay), the
    /// agent's connection task and its decoding.
    pub to_watcher_ms: i64,
    /// The watcher -> the entry is in the maps: the cluster's queue, the view task, the
    /// reconciler (and the prober's poll, 0.5 ms).
    pub in_agent_ms: i64,
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
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
            split_every: 0,
            splits: Vec::new(),
            poll: Duration::from_micros(500),
            from_request: false,
            status: (
                crate::mesh::meshd_binary()?,
                mesh.node(cluster, node)?.socket.clone(),
            ),
            rt,
        })
    }

    /// When the node's watcher of the probed cluster last handled an event (unix ms).
    fn watcher_ms(&self) -> anyhow::Result<i64> {
        let out = std::process::Command::new(&self.status.0)
            .args(["status", "-o", "json", "--socket"])
            .arg(&self.status.1)
            .output()?;
        anyhow::ensure!(out.status.success(), "meshd status: {:?}", out.status);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v["clusters"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == self.cluster.as_str()))
            .and_then(|c| c["last_sync_ms"].as_i64())
            .ok_or_else(|| anyhow::anyhow!("no last_sync_ms of {} in {v}", self.cluster))
    }

    /// One probe: put -> in the map.
    pub fn probe(&mut self) -> anyhow::Result<Duration> {
        let ip = nth_ip(PROBE_BASE, self.next);
        self.next += 1;
        let (key, value) = ipcache_record(&self.cluster, ip, self.identity, self.host)?;
        let mut client = self.source.client();
        let requested = Instant::now();
        self.rt.block_on(client.put(key.as_str(), value, None))?;
        let put_ms = unix_ms();
        let start = if self.from_request {
            requested
        } else {
            Instant::now()
        };
        while self.maps.ipcache_entry(Ipv4Net::from(ip))?.is_none() {
            anyhow::ensure!(
                start.elapsed() < self.deadline,
                "{}'s entry {ip} did not reach the maps within {:?}",
                self.cluster,
                self.deadline
            );
            std::thread::sleep(self.poll);
        }
        let took = start.elapsed();
        let seen_ms = unix_ms();
        // Read before the delete, whose event moves the watcher's time on.
        if self.split_every > 0 && (self.next - 1) % self.split_every == 0 {
            let watcher = self.watcher_ms()?;
            self.splits.push(Split {
                to_watcher_ms: watcher - put_ms,
                in_agent_ms: seen_ms - watcher,
            });
        }
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

/// `what: p50 / p99 of the probes' split` (see [`Split`]).
pub fn split_summary(what: &str, splits: &[Split]) -> String {
    if splits.is_empty() {
        return format!("{what}: no split probes");
    }
    let pct = |mut v: Vec<i64>, p: f64| {
        v.sort();
        v[(((v.len() - 1) as f64) * p).round() as usize]
    };
    let to: Vec<i64> = splits.iter().map(|s| s.to_watcher_ms).collect();
    let inside: Vec<i64> = splits.iter().map(|s| s.in_agent_ms).collect();
    format!(
        "{what} ({} probes split): put -> c1/n1's watcher p50 {} / p99 {} ms; watcher -> maps p50 {} / p99 {} ms",
        splits.len(),
        pct(to.clone(), 0.5),
        pct(to, 0.99),
        pct(inside.clone(), 0.5),
        pct(inside, 0.99)
    )
}

/// A flood writer on a thread of its own (its own runtime and client): `records` into the etcd
/// of `config`, [`put_parallel`]. Its result: the keys written, the time taken, and the
/// thread's own [`Sched`] at its end (read by the thread, which is gone when it is joined).
pub struct Writer {
    pub handle: std::thread::JoinHandle<anyhow::Result<(usize, Duration, Sched)>>,
}

impl Writer {
    /// `written N keys in T s (R/s); writer thread C cores, waited W ms/s for a core`.
    pub fn report(what: &str, (written, took, sched): (usize, Duration, Sched)) -> String {
        let secs = took.as_secs_f64().max(1e-9);
        format!(
            "{what}: {written} keys in {secs:.1} s ({:.0}/s); writer thread {:.2} cores, waited {:.0} ms/s for a core",
            written as f64 / secs,
            sched.run_ns as f64 / 1e9 / secs,
            sched.wait_ns as f64 / 1e6 / secs
        )
    }
}

/// With `cpu`, the writer's thread (and so its runtime) runs on that CPU alone
/// ([`crate::affinity`]).
pub fn spawn_writer(
    config: EtcdConfig,
    records: Arc<Vec<Kv>>,
    parallel: usize,
    cpu: Option<usize>,
) -> anyhow::Result<Writer> {
    let handle = std::thread::spawn(move || {
        // Before the runtime: threads it starts inherit the mask.
        if let Some(cpu) = cpu {
            crate::affinity::pin_thread(0, cpu)?;
        }
        let rt = runtime()?;
        let store = rt.block_on(meshd_kvstore::connect(&config))?;
        let (written, took) = rt.block_on(put_parallel(&store, &records, parallel, None))?;
        let me = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
        Ok((written, took, Sched::parse(&me)))
    });
    Ok(Writer { handle })
}

/// CPU time and run-queue wait of a process (its threads summed) or of one thread, from
/// `/proc/.../schedstat`: which part of a flood run takes the cores, and how long its runnable
/// threads wait for one. Threads that ended are not counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sched {
    pub run_ns: u64,
    pub wait_ns: u64,
    pub slices: u64,
}

impl Sched {
    fn parse(text: &str) -> Sched {
        let mut f = text
            .split_whitespace()
            .map(|v| v.parse::<u64>().unwrap_or(0));
        Sched {
            run_ns: f.next().unwrap_or(0),
            wait_ns: f.next().unwrap_or(0),
            slices: f.next().unwrap_or(0),
        }
    }

    pub fn read(pid: u32, tid: Option<u32>) -> Sched {
        if let Some(tid) = tid {
            return std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
                .map(|t| Sched::parse(&t))
                .unwrap_or_default();
        }
        let mut sum = Sched::default();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(t) = std::fs::read_to_string(task.path().join("schedstat")) {
                let s = Sched::parse(&t);
                sum.run_ns += s.run_ns;
                sum.wait_ns += s.wait_ns;
                sum.slices += s.slices;
            }
        }
        sum
    }
}

/// A process (or thread) whose CPU a flood run reports.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
    pub tid: Option<u32>,
}

/// Every watched process's [`Sched`] and the machine's busy and total CPU ticks, at one time.
#[derive(Debug, Clone)]
pub struct CpuSnapshot {
    at: Instant,
    tasks: Vec<Sched>,
    /// All CPUs, then each CPU (`cpu0`, `cpu1`, ...): (busy, total) ticks.
    machine: Vec<(u64, u64)>,
}

/// Busy and total ticks of all CPUs together, then of each (`/proc/stat`): every process of
/// the machine, other sessions' included.
fn machine_ticks() -> Vec<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .take_while(|l| l.starts_with("cpu"))
        .map(|line| {
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            let total: u64 = v.iter().take(8).sum();
            // idle and iowait
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

pub fn cpu_snapshot(tasks: &[Watched]) -> CpuSnapshot {
    CpuSnapshot {
        at: Instant::now(),
        tasks: tasks.iter().map(|t| Sched::read(t.pid, t.tid)).collect(),
        machine: machine_ticks(),
    }
}

/// One line per watched process between two snapshots: cores used, and how long its runnable
/// threads waited for a core (ms per second of the phase, and per time slice).
pub fn cpu_report(tasks: &[Watched], a: &CpuSnapshot, b: &CpuSnapshot) -> Vec<String> {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    // The machine's CPUs, not this process's (pinned, it may run on one of them).
    let cores = a.machine.len().saturating_sub(1).max(1) as f64;
    let busy = |i: usize| {
        let (Some(x), Some(y)) = (a.machine.get(i), b.machine.get(i)) else {
            return 0.0;
        };
        let total = y.1.saturating_sub(x.1).max(1) as f64;
        y.0.saturating_sub(x.0) as f64 / total
    };
    let per_cpu: Vec<String> = (1..a.machine.len().min(b.machine.len()))
        .map(|i| format!("cpu{} {:.2}", i - 1, busy(i)))
        .collect();
    let mut out = vec![format!(
        "machine: {:.2} of {cores} cores busy ({}; every process, other sessions' too), {secs:.1} s",
        busy(0) * cores,
        per_cpu.join(", ")
    )];
    for (i, t) in tasks.iter().enumerate() {
        let (x, y) = (a.tasks[i], b.tasks[i]);
        let run = y.run_ns.saturating_sub(x.run_ns) as f64;
        let wait = y.wait_ns.saturating_sub(x.wait_ns) as f64;
        let slices = y.slices.saturating_sub(x.slices).max(1) as f64;
        out.push(format!(
            "{:<22} {:.2} cores; waited for a core {:>6.0} ms/s, {:>6.0} us a slice",
            t.name,
            run / 1e9 / secs,
            wait / 1e6 / secs,
            wait / 1e3 / slices
        ));
    }
    out
}
