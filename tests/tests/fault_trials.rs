//! Randomized fault trials (issue 17, item 2): one mesh, then trial after trial of a random
//! sequence of changes and faults drawn from a seeded generator, each trial ending with every
//! fault healed and the mesh checked against the source of truth.
//!
//! Mesh: c1 (2 nodes), c2 and c3 (1 node each), single-member etcds. The steps of a trial:
//! endpoints added and deleted with `meshd endpoint add|del`; ipcache records put, rewritten and
//! deleted straight in a cluster's etcd (as its admin, the way a remote cluster's publisher
//! writes); compactions; an etcd SIGSTOPped or stopped; an agent SIGKILLed or restarted; a
//! remote-cluster file removed (c3's links only, see below). Faults stay open across later steps
//! and are healed by a later step or at the trial's end.
//!
//! After each trial: every node sees every cluster ready; each cluster's etcd holds exactly the
//! records the trial left (every live endpoint, every put record); every node's maps equal the
//! union of the etcds ([`Mesh::check_maps_match_etcd`]); and one TCP connection opened before
//! the first trial, from c1/n1 to c2/n1 (both endpoints never deleted), still echoes. Remote
//! files of c1 and c2 are never removed, since disconnecting the clusters of that connection
//! would break it by design.
//!
//! `MESHD_FAULT_TRIALS` (default 10), `MESHD_FAULT_SEED` (default 1),
//! `MESHD_FAULT_ETCD_MEMBERS` (default 1; with 3, a step may also freeze or stop one member
//! while the quorum holds) and `MESHD_FAULT_KVSTOREMESH` (default 0; with 1, every cluster runs
//! a mirror, agents read remote clusters through their local cache, and an agent-fault step may
//! instead SIGKILL a mirror, left down, or restart it) choose the run;
//! `make faults TRIALS=N SEED=S ETCD_MEMBERS=M KVSTOREMESH=K` sets them. A failure prints the seed, the trial, its steps, and the command that replays it.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meshd_e2e::mesh::{EndpointInfo, Mesh, MeshOptions};
use meshd_e2e::netns_io::{connect, echo_round_trip, spawn_echo};
use meshd_e2e::trials::{env_u64, Rng};
use meshd_e2e::wait_for;
use meshd_state::{encode, ClusterName, IpcacheEntry, IpcacheKey, NumericIdentity};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(90);
/// Steps per trial (random in this range).
const STEPS: std::ops::RangeInclusive<u64> = 4..=10;
/// Remote-file links that may be cut: (the cluster whose directory loses the file, the cluster
/// it names). None between c1 and c2, whose endpoints hold the long-lived connection.
const CUTTABLE: [(&str, &str); 4] = [("c1", "c3"), ("c3", "c1"), ("c2", "c3"), ("c3", "c2")];

/// The generator of trial `trial` of run `seed`: each trial's steps depend only on these two
/// (and on the state the earlier trials left, which the replay rebuilds).
fn trial_rng(seed: u64, trial: u64) -> Rng {
    let mut r = Rng(seed ^ trial.wrapping_mul(0xa076_1d64_78bd_642f));
    r.next_u64();
    r
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EtcdFault {
    Paused,
    Stopped,
}

/// A fault left open by a step.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fault {
    Etcd(String, EtcdFault),
    /// One member of a replicated etcd (its quorum holds).
    Member(String, usize, EtcdFault),
    AgentDown(String, String),
    RemoteFileGone(String, String),
    /// A cluster's mirror (kvstoremesh) killed: its agents' cache stops following the remotes.
    MirrorDown(String),
}

/// What the trials expect each etcd to hold, kept as the steps run.
struct Expected {
    /// Endpoints alive, by name; the two of the connection and one per node are never deleted.
    endpoints: BTreeMap<String, EndpointInfo>,
    permanent: Vec<String>,
    /// Records put straight into a cluster's etcd: (cluster, ip) -> (identity, host).
    records: BTreeMap<(String, Ipv4Addr), (u32, Ipv4Addr)>,
    /// Identity a cluster's records may carry (its first endpoint's).
    identities: BTreeMap<String, u32>,
    next_name: u64,
}

impl Expected {
    fn ipcache(&self) -> BTreeMap<ipnet::Ipv4Net, (u32, Ipv4Addr)> {
        let mut want = BTreeMap::new();
        for ((_, ip), (id, host)) in &self.records {
            want.insert(ipnet::Ipv4Net::from(*ip), (*id, *host));
        }
        want
    }
}

struct Trials {
    mesh: Mesh,
    expected: Expected,
    faults: Vec<Fault>,
    conn: std::net::TcpStream,
    /// Steps run, by kind, over the whole run.
    tally: BTreeMap<String, u64>,
    /// Members of each cluster's etcd.
    members: usize,
    /// Every cluster runs a mirror and its agents read through the cache.
    kvstoremesh: bool,
    /// Steps of the current trial, for the failure message.
    log: Vec<String>,
}

impl Trials {
    fn etcd_fault(&self, cluster: &str) -> Option<EtcdFault> {
        self.faults.iter().find_map(|f| match f {
            Fault::Etcd(c, k) if c == cluster => Some(*k),
            _ => None,
        })
    }

    fn agent_down(&self, cluster: &str, node: &str) -> bool {
        self.faults
            .contains(&Fault::AgentDown(cluster.into(), node.into()))
    }

    fn node_list(&self) -> Vec<(String, String)> {
        self.mesh.node_names()
    }

    fn cluster_names(&self) -> Vec<String> {
        self.mesh.clusters.iter().map(|c| c.name.clone()).collect()
    }

    /// Nodes whose agent runs and whose cluster's etcd answers.
    fn healthy_nodes(&self) -> Vec<(String, String)> {
        self.node_list()
            .into_iter()
            .filter(|(c, n)| self.etcd_fault(c).is_none() && !self.agent_down(c, n))
            .collect()
    }

    fn step(&mut self, rng: &mut Rng) -> anyhow::Result<()> {
        let clusters = self.cluster_names();
        let up_clusters: Vec<String> = clusters
            .iter()
            .filter(|c| self.etcd_fault(c).is_none())
            .cloned()
            .collect();
        match rng.below(12) {
            // Endpoint added.
            0 | 1 => {
                let Some((c, n)) = rng.pick(&self.healthy_nodes()).cloned() else {
                    return self.note("add: no healthy node");
                };
                let name = format!("f{}", self.expected.next_name);
                self.expected.next_name += 1;
                self.note(format!("endpoint add {c}/{n} {name}"))?;
                let ep = self.mesh.add_endpoint(&c, &n, &name, "app=fault")?;
                // An address the agent took over from a record put by hand: its record is now
                // the endpoint's.
                self.expected.records.remove(&(c.clone(), ep.ip));
                self.expected.records.insert(
                    (c.clone(), ep.ip),
                    (ep.identity, self.mesh.node(&c, &n)?.ip),
                );
                self.expected.endpoints.insert(name, ep);
            }
            // Endpoint deleted.
            2 | 3 => {
                let candidates: Vec<String> = self
                    .expected
                    .endpoints
                    .values()
                    .filter(|e| {
                        !self.expected.permanent.contains(&e.name)
                            && self.etcd_fault(&e.cluster).is_none()
                            && !self.agent_down(&e.cluster, &e.node)
                    })
                    .map(|e| e.name.clone())
                    .collect();
                let Some(name) = rng.pick(&candidates).cloned() else {
                    return self.note("delete: no deletable endpoint");
                };
                let ep = self.expected.endpoints.remove(&name).expect("listed");
                self.note(format!(
                    "endpoint del {}/{} {name} ({})",
                    ep.cluster, ep.node, ep.ip
                ))?;
                self.mesh.delete_endpoint(&ep)?;
                self.expected.records.remove(&(ep.cluster.clone(), ep.ip));
            }
            // A record put (or rewritten) straight into a cluster's etcd.
            4 | 5 => {
                let Some(c) = rng.pick(&up_clusters).cloned() else {
                    return self.note("put: every etcd is down");
                };
                let cluster = self.mesh.cluster(&c)?;
                let node = &cluster.nodes[rng.below(cluster.nodes.len() as u64) as usize];
                let (host, base) = (node.ip, node.pod_cidr.network().octets());
                let ip = Ipv4Addr::new(base[0], base[1], base[2], 200 + rng.below(50) as u8);
                if self.expected.endpoints.values().any(|e| e.ip == ip) {
                    return self.note(format!("put: {ip} is an endpoint's"));
                }
                let identity = self.expected.identities[&c];
                self.note(format!("etcd put {c} {ip} host {host}"))?;
                let key = IpcacheKey::host(ClusterName::new(c.as_str())?, ip.into());
                let entry = IpcacheEntry {
                    prefix: key.prefix,
                    identity: NumericIdentity::new(identity)?,
                    host_ip: host.into(),
                    endpoint: Some(format!("put-{}", rng.below(1000))),
                    namespace: Some("faults".into()),
                };
                let value = encode(&key, &entry)?;
                self.admin_write(&c, &["put", &key.to_string(), std::str::from_utf8(&value)?])?;
                self.expected.records.insert((c, ip), (identity, host));
            }
            // A record put by hand deleted.
            6 => {
                let endpoint_ips: Vec<Ipv4Addr> =
                    self.expected.endpoints.values().map(|e| e.ip).collect();
                let candidates: Vec<(String, Ipv4Addr)> = self
                    .expected
                    .records
                    .keys()
                    .filter(|(c, ip)| self.etcd_fault(c).is_none() && !endpoint_ips.contains(ip))
                    .cloned()
                    .collect();
                let Some((c, ip)) = rng.pick(&candidates).cloned() else {
                    return self.note("etcd del: nothing to delete");
                };
                self.note(format!("etcd del {c} {ip}"))?;
                let key = IpcacheKey::host(ClusterName::new(c.as_str())?, ip.into());
                self.admin_write(&c, &["del", &key.to_string()])?;
                self.expected.records.remove(&(c, ip));
            }
            // Compaction at the current revision.
            7 => {
                let Some(c) = rng.pick(&up_clusters).cloned() else {
                    return self.note("compact: every etcd is down");
                };
                match self.mesh.cluster(&c)?.etcd.compact_now() {
                    Ok(rev) => self.note(format!("compact {c} at {rev}"))?,
                    // Nothing written since the last compaction.
                    Err(e) if format!("{e:#}").contains("required revision has been compacted") => {
                        self.note(format!("compact {c}: already compacted"))?
                    }
                    Err(e) => return Err(e),
                }
            }
            // One member of a replicated etcd frozen or stopped.
            8 if self.members > 1 && rng.below(2) == 0 => {
                let candidates: Vec<String> = up_clusters
                    .iter()
                    .filter(|c| {
                        !self
                            .faults
                            .iter()
                            .any(|f| matches!(f, Fault::Member(o, ..) if o == *c))
                    })
                    .cloned()
                    .collect();
                let Some(c) = rng.pick(&candidates).cloned() else {
                    return self.note("member fault: no cluster with every member up");
                };
                let m = rng.below(self.members as u64) as usize;
                let member = self.mesh.cluster_mut(&c)?.etcd.member_mut(m);
                let kind = if rng.below(2) == 0 {
                    member.pause();
                    EtcdFault::Paused
                } else {
                    member.stop();
                    EtcdFault::Stopped
                };
                self.note(format!("etcd {c} member {m} {kind:?}"))?;
                self.faults.push(Fault::Member(c, m, kind));
            }
            // An etcd frozen or stopped (every member).
            8 => {
                let Some(c) = rng.pick(&up_clusters).cloned() else {
                    return self.note("etcd fault: every etcd is down already");
                };
                let etcd = &mut self.mesh.cluster_mut(&c)?.etcd;
                let kind = if rng.below(2) == 0 {
                    etcd.pause();
                    EtcdFault::Paused
                } else {
                    etcd.stop();
                    EtcdFault::Stopped
                };
                self.note(format!("etcd {c} {kind:?}"))?;
                self.faults.push(Fault::Etcd(c, kind));
            }
            // A mirror killed (left down) or restarted at once; only with mirrors, and drawn
            // from the agent-fault step so that runs without them replay as before.
            9 if self.kvstoremesh && rng.below(3) == 0 => {
                let running: Vec<String> = clusters
                    .iter()
                    .filter(|c| !self.faults.contains(&Fault::MirrorDown((*c).clone())))
                    .cloned()
                    .collect();
                let Some(c) = rng.pick(&running).cloned() else {
                    return self.note("mirror fault: every mirror is down");
                };
                if rng.below(2) == 0 || self.etcd_fault(&c).is_some() {
                    self.note(format!("mirror {c} SIGKILL"))?;
                    self.mesh.kill_mirror(&c)?;
                    self.faults.push(Fault::MirrorDown(c));
                } else {
                    self.note(format!("mirror {c} SIGTERM and start"))?;
                    self.mesh.stop_mirror(&c)?;
                    self.mesh.start_mirror(&c)?;
                }
            }
            // An agent killed (left down) or restarted at once.
            9 => {
                let running: Vec<(String, String)> = self
                    .node_list()
                    .into_iter()
                    .filter(|(c, n)| !self.agent_down(c, n))
                    .collect();
                let Some((c, n)) = rng.pick(&running).cloned() else {
                    return self.note("agent fault: every agent is down");
                };
                if rng.below(2) == 0 {
                    self.note(format!("agent {c}/{n} SIGKILL"))?;
                    self.mesh.kill_agent(&c, &n)?;
                    self.faults.push(Fault::AgentDown(c, n));
                } else if self.etcd_fault(&c).is_none() {
                    self.note(format!("agent {c}/{n} SIGTERM and start"))?;
                    self.mesh.stop_agent(&c, &n)?;
                    self.mesh.start_agent(&c, &n)?;
                } else {
                    self.note(format!("agent {c}/{n} SIGKILL (its etcd is down)"))?;
                    self.mesh.kill_agent(&c, &n)?;
                    self.faults.push(Fault::AgentDown(c, n));
                }
            }
            // A remote-cluster file removed.
            10 => {
                let (c, o) = CUTTABLE[rng.below(CUTTABLE.len() as u64) as usize];
                let fault = Fault::RemoteFileGone(c.into(), o.into());
                if self.faults.contains(&fault) {
                    return self.note(format!("remote file {c} -> {o} already gone"));
                }
                self.note(format!("remote file {c} -> {o} removed"))?;
                std::fs::remove_file(self.mesh.remotes_dir(c).join(o))?;
                self.faults.push(fault);
            }
            // A fault healed, or a pause.
            _ => {
                if !self.faults.is_empty() && rng.below(3) != 0 {
                    let i = rng.below(self.faults.len() as u64) as usize;
                    self.heal(i)?;
                } else {
                    let ms = rng.range(100..=1500);
                    self.note(format!("sleep {ms} ms"))?;
                    std::thread::sleep(Duration::from_millis(ms));
                }
            }
        }
        Ok(())
    }

    /// A write as the cluster's admin, retried as a publisher would: with a member frozen or
    /// stopped, the request may meet an election ("request timed out, possibly due to previous
    /// leader failure"). Puts and deletes of one key are safe to repeat.
    fn admin_write(&self, cluster: &str, args: &[&str]) -> anyhow::Result<()> {
        let etcd = &self.mesh.cluster(cluster)?.etcd;
        wait_for(&format!("etcdctl {} in {cluster}", args[0]), WAIT, || {
            etcd.etcdctl(args)
        })?;
        Ok(())
    }

    fn note(&mut self, what: impl Into<String>) -> anyhow::Result<()> {
        let what = what.into();
        eprintln!("  {what}");
        *self.tally.entry(step_kind(&what)).or_default() += 1;
        self.log.push(what);
        Ok(())
    }

    /// Ends fault `i`. An agent is started only once its cluster's etcd answers (an agent
    /// started without its etcd is not what this runner tests).
    fn heal(&mut self, i: usize) -> anyhow::Result<()> {
        let fault = self.faults[i].clone();
        if let Fault::AgentDown(c, _) | Fault::Member(c, ..) | Fault::MirrorDown(c) = &fault {
            // A member restarted while the others are frozen or stopped waits for a quorum
            // that cannot form.
            if self.etcd_fault(c).is_some() {
                return self.note(format!("heal {fault:?}: its etcd is still down"));
            }
        }
        self.note(format!("heal {fault:?}"))?;
        self.faults.remove(i);
        match fault {
            Fault::Etcd(c, EtcdFault::Paused) => self.mesh.cluster_mut(&c)?.etcd.resume(),
            Fault::Etcd(c, EtcdFault::Stopped) => self.mesh.cluster_mut(&c)?.etcd.restart()?,
            Fault::Member(c, m, EtcdFault::Paused) => {
                self.mesh.cluster_mut(&c)?.etcd.member_mut(m).resume()
            }
            Fault::Member(c, m, EtcdFault::Stopped) => {
                self.mesh.cluster_mut(&c)?.etcd.member_mut(m).restart()?
            }
            Fault::AgentDown(c, n) => self.mesh.start_agent(&c, &n)?,
            Fault::RemoteFileGone(c, o) => self.mesh.write_remote_file(&c, &o)?,
            Fault::MirrorDown(c) => self.mesh.start_mirror(&c)?,
        }
        Ok(())
    }

    fn heal_all(&mut self) -> anyhow::Result<()> {
        // Whole etcds first, then members (which need their quorum), so agents start against
        // an etcd that answers.
        while let Some(i) = self
            .faults
            .iter()
            .position(|f| matches!(f, Fault::Etcd(..)))
        {
            self.heal(i)?;
        }
        while let Some(i) = self
            .faults
            .iter()
            .position(|f| matches!(f, Fault::Member(..)))
        {
            self.heal(i)?;
        }
        while !self.faults.is_empty() {
            self.heal(0)?;
        }
        Ok(())
    }

    /// The checks every trial ends with.
    fn check(&mut self, trial: u64) -> anyhow::Result<()> {
        self.mesh.wait_all_ready(WAIT)?;
        // etcd holds exactly what the trial left: a record lost with a lease, or one an agent
        // failed to withdraw, shows here (the maps would follow etcd and hide it).
        let want = self.expected.ipcache();
        wait_for(
            "every etcd holds exactly the expected records",
            WAIT,
            || {
                let got = self.mesh.etcd_ipcache()?;
                if got != want {
                    let missing: Vec<_> =
                        want.iter().filter(|(p, v)| got.get(p) != Some(v)).collect();
                    let extra: Vec<_> = got.iter().filter(|(p, _)| !want.contains_key(p)).collect();
                    bail!("etcd differs: missing or different {missing:?}; not expected {extra:?}");
                }
                Ok(())
            },
        )
        .map_err(|e| e.context(self.mesh.logs()))?;
        self.mesh.wait_maps_match_etcd(WAIT)?;
        echo_round_trip(&mut self.conn, format!("after trial {trial}").as_bytes())
            .context("the connection c1/n1 -> c2/n1 opened before the first trial")?;
        Ok(())
    }
}

/// A step's description without its names and numbers: "etcd c1 Paused" -> "etcd Paused".
fn step_kind(what: &str) -> String {
    if let Some(rest) = what.strip_prefix("heal ") {
        let fault = rest.split(['(', ':']).next().unwrap_or(rest);
        return format!("heal {fault}");
    }
    if let Some(first) = what
        .split_whitespace()
        .next()
        .and_then(|w| w.strip_suffix(':'))
    {
        return format!("{first} (not possible)");
    }
    what.split_whitespace()
        .take_while(|w| !w.ends_with(':'))
        .filter(|w| {
            w.chars().all(|ch| ch.is_ascii_alphabetic())
                && !(w.len() == 2 && w.starts_with(['c', 'n']))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The run `make faults` makes (and `make test`, with its defaults).
#[test]
fn randomized_fault_trials_leave_maps_equal_to_etcd() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let trials = env_u64("MESHD_FAULT_TRIALS", 10)?;
    let kvstoremesh = env_u64("MESHD_FAULT_KVSTOREMESH", 0)? == 1;
    run_trials(trials, kvstoremesh)
}

/// A short run with mirrors in `make test` (`make faults KVSTOREMESH=1` for long ones).
#[test]
fn randomized_fault_trials_through_the_cache_leave_maps_equal_to_etcd() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let trials = env_u64("MESHD_FAULT_CACHE_TRIALS", 5)?;
    run_trials(trials, true)
}

fn run_trials(trials: u64, kvstoremesh: bool) -> anyhow::Result<()> {
    let seed = env_u64("MESHD_FAULT_SEED", 1)?;
    let members = env_u64("MESHD_FAULT_ETCD_MEMBERS", 1)? as usize;
    eprintln!(
        "fault trials: {trials} trials, seed {seed}, {members}-member etcds{}",
        if kvstoremesh {
            ", mirrors (agents read the cache)"
        } else {
            ""
        }
    );
    let mut opts = MeshOptions::clusters(3, 1).etcd_members(members);
    opts.clusters[0].2 = 2;
    if kvstoremesh {
        opts = opts.kvstoremesh();
    }
    let mesh = Mesh::start(opts)?;

    let mut expected = Expected {
        endpoints: BTreeMap::new(),
        permanent: Vec::new(),
        records: BTreeMap::new(),
        identities: BTreeMap::new(),
        next_name: 0,
    };
    for (c, n) in mesh.node_names() {
        let name = format!("base-{c}{n}");
        let ep = mesh.add_endpoint(&c, &n, &name, "app=fault")?;
        expected.identities.entry(c.clone()).or_insert(ep.identity);
        expected
            .records
            .insert((c.clone(), ep.ip), (ep.identity, mesh.node(&c, &n)?.ip));
        expected.permanent.push(name.clone());
        expected.endpoints.insert(name, ep);
    }
    let client = expected.endpoints["base-c1n1"].clone();
    let echo = expected.endpoints["base-c2n1"].clone();
    spawn_echo(&echo.netns, PORT)?;
    let echo_addr = SocketAddr::from((echo.ip, PORT));
    let mut conn = wait_for("client c1/n1 -> echo c2/n1", WAIT, || {
        connect(&client.netns, echo_addr, Duration::from_secs(60))
    })?;
    echo_round_trip(&mut conn, b"before the trials")?;

    let mut t = Trials {
        mesh,
        expected,
        faults: Vec::new(),
        conn,
        members,
        kvstoremesh,
        tally: BTreeMap::new(),
        log: Vec::new(),
    };
    t.check(0).context("before the first trial")?;
    let started = Instant::now();
    for trial in 0..trials {
        let mut rng = trial_rng(seed, trial);
        let steps = rng.range(STEPS);
        eprintln!("trial {trial} (seed {seed}): {steps} steps");
        t.log.clear();
        let result = (|| -> anyhow::Result<()> {
            for _ in 0..steps {
                t.step(&mut rng)?;
            }
            t.heal_all()?;
            t.check(trial)
        })();
        if let Err(e) = result {
            bail!(
                "fault trial {trial} of seed {seed} failed: {e:#}\nsteps of the trial:\n  {}\n\
                 replay: make faults SEED={seed} TRIALS={} ETCD_MEMBERS={members} KVSTOREMESH={}",
                t.log.join("\n  "),
                trial + 1,
                u8::from(kvstoremesh)
            );
        }
    }
    eprintln!(
        "fault trials: {trials} trials of seed {seed} passed in {:?}; steps: {:?}",
        started.elapsed(),
        t.tally
    );
    Ok(())
}
