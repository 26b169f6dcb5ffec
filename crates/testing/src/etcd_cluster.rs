//! A replicated etcd: N members of [`Etcd`] on loopback peer URLs, as production clusters run
//! (three or five members), so tests can kill, stop, freeze or restart one member while the
//! others keep a quorum, and find the leader to aim at it.
//!
//! With one member it behaves like a single [`Etcd`]; the whole-cluster operations (`stop`,
//! `restart`, `pause`, ...) act on every member, so a test written for one server runs
//! unchanged on three.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::etcd::{etcdctl, Etcd, EtcdOptions};

/// Members of one etcd cluster, each with its own ports and data dir. Killed on drop.
pub struct EtcdCluster {
    opts: EtcdOptions,
    members: Vec<Etcd>,
}

impl EtcdCluster {
    /// Starts `members` members (1, 3 or 5 make sense) and waits until each serves clients,
    /// which etcd does only once a quorum has formed.
    pub fn start(members: usize, opts: EtcdOptions) -> anyhow::Result<EtcdCluster> {
        anyhow::ensure!(members >= 1, "an etcd cluster needs at least one member");
        crate::which("etcd").context("etcd not found on PATH (apt-get install etcd-server)")?;
        let mut last_err = None;
        // Free ports can be taken by a parallel test between probing and binding: retry with
        // fresh ports and directories.
        for _ in 0..5 {
            match Self::try_start(members, &opts) {
                Ok(cluster) => return Ok(cluster),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn try_start(members: usize, opts: &EtcdOptions) -> anyhow::Result<EtcdCluster> {
        let mut etcds = (0..members)
            .map(|i| Etcd::unstarted(opts, &format!("m{i}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let peers: Vec<(String, String)> = etcds
            .iter()
            .map(|e| (e.name().to_owned(), e.peer_url()))
            .collect();
        let initial_cluster = meshd_topology::etcd::initial_cluster(
            peers.iter().map(|(n, p)| (n.as_str(), p.as_str())),
        );
        let token = format!("meshd-{}", etcds[0].dir().display()).replace('/', "-");
        for e in &mut etcds {
            e.join(&initial_cluster, &token);
        }
        let mut cluster = EtcdCluster {
            opts: opts.clone(),
            members: etcds,
        };
        cluster.launch_all()?;
        Ok(cluster)
    }

    /// Launches every stopped member, then waits for each: members wait for each other.
    fn launch_all(&mut self) -> anyhow::Result<()> {
        let mut offsets = Vec::new();
        for (i, m) in self.members.iter_mut().enumerate() {
            if !m.is_running() {
                offsets.push((i, m.launch()?));
            }
        }
        for (i, offset) in offsets {
            if let Err(e) = self.members[i].wait_ready(offset) {
                for m in &mut self.members {
                    m.kill();
                }
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn member(&self, i: usize) -> &Etcd {
        &self.members[i]
    }

    pub fn member_mut(&mut self, i: usize) -> &mut Etcd {
        &mut self.members[i]
    }

    pub fn members(&self) -> &[Etcd] {
        &self.members
    }

    /// Every member's client URL, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Etcd::endpoint).collect()
    }

    /// The first member's client URL (the only one with a single member).
    pub fn endpoint(&self) -> String {
        self.members[0].endpoint()
    }

    /// Client URLs of the members that answer (running, not frozen), comma separated.
    fn live_endpoints(&self) -> anyhow::Result<String> {
        let live: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.is_live())
            .map(Etcd::endpoint)
            .collect();
        if live.is_empty() {
            bail!("no etcd member is running");
        }
        Ok(live.join(","))
    }

    /// Runs `etcdctl` against the members that answer (so a killed or frozen member does not
    /// make harness operations hang).
    pub fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        etcdctl(&self.opts, &self.live_endpoints()?, args)
    }

    /// The index of the leader, as the members that answer agree on it.
    pub fn leader(&self) -> anyhow::Result<usize> {
        let mut ids = Vec::new();
        let mut leaders = Vec::new();
        for (i, m) in self.members.iter().enumerate().filter(|(_, m)| m.is_live()) {
            let (id, leader) = m
                .member_and_leader()
                .with_context(|| format!("status of member {}", m.name()))?;
            ids.push((i, id));
            leaders.push(leader);
        }
        let Some(first) = leaders.first() else {
            bail!("no etcd member is running");
        };
        if leaders.iter().any(|l| l != first) {
            bail!("members disagree on the leader: {leaders:?}");
        }
        ids.iter()
            .find(|(_, id)| id == first)
            .map(|(i, _)| *i)
            .with_context(|| format!("leader {first} is not among the members that answer"))
    }

    /// Waits until a leader is elected among the members that answer.
    pub fn wait_leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.leader() {
                Ok(i) => return Ok(i),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("no leader within {timeout:?}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The current revision, as the members that answer see it.
    pub fn revision(&self) -> anyhow::Result<i64> {
        let i = self
            .members
            .iter()
            .position(Etcd::is_live)
            .context("no etcd member is running")?;
        self.members[i].revision()
    }

    /// Compacts the cluster's history up to `revision` (a replicated operation).
    pub fn compact(&self, revision: i64) -> anyhow::Result<()> {
        self.etcdctl(&["compact", &revision.to_string(), "--physical"])?;
        Ok(())
    }

    /// Compacts up to the current revision.
    pub fn compact_now(&self) -> anyhow::Result<i64> {
        let rev = self.revision()?;
        self.compact(rev)?;
        Ok(rev)
    }

    /// Gracefully stops every member.
    pub fn stop(&mut self) {
        for m in &mut self.members {
            m.stop();
        }
    }

    /// SIGKILLs every member.
    pub fn kill(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }

    /// Freezes every member (SIGSTOP).
    pub fn pause(&mut self) {
        for m in &mut self.members {
            m.pause();
        }
    }

    pub fn resume(&mut self) {
        for m in &mut self.members {
            m.resume();
        }
    }

    /// Starts every member again on its data dir and ports (stopping running ones first).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        crate::etcd::relaunch(|| self.launch_all())
    }

    /// Every member's log, for test failure messages.
    pub fn logs(&self, lines: usize) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = m.log();
                let all: Vec<&str> = log.lines().collect();
                format!(
                    "--- etcd {} ---\n{}",
                    m.name(),
                    all[all.len().saturating_sub(lines)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_members_replicate_survive_a_dead_leader_and_rejoin() {
        if !crate::require_etcd() {
            return;
        }
        let mut etcd = EtcdCluster::start(3, EtcdOptions::default()).unwrap();
        assert_eq!(etcd.endpoints().len(), 3);
        etcd.etcdctl(&["put", "meshd/a", "1"]).unwrap();
        // Written through the cluster, readable from every member on its own.
        for m in etcd.members() {
            let got = m
                .etcdctl(&["get", "meshd/a", "--print-value-only"])
                .unwrap();
            assert_eq!(got.trim(), "1", "member {}", m.name());
        }
        let leader = etcd.wait_leader(Duration::from_secs(30)).unwrap();
        etcd.member_mut(leader).kill();
        let next = etcd.wait_leader(Duration::from_secs(30)).unwrap();
        assert_ne!(next, leader, "a killed member cannot lead");
        etcd.etcdctl(&["put", "meshd/a", "2"]).unwrap();
        etcd.member_mut(leader).restart().unwrap();
        // The restarted member catches up with what was written without it.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = etcd
                .member(leader)
                .etcdctl(&["get", "meshd/a", "--print-value-only"])
                .unwrap_or_default();
            if got.trim() == "2" {
                break;
            }
            assert!(Instant::now() < deadline, "member did not catch up: {got}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    fn a_frozen_member_is_left_out_and_the_rest_keeps_serving() {
        if !crate::require_etcd() {
            return;
        }
        let mut etcd = EtcdCluster::start(3, EtcdOptions::default()).unwrap();
        let leader = etcd.wait_leader(Duration::from_secs(30)).unwrap();
        let frozen = (leader + 1) % 3;
        etcd.member_mut(frozen).pause();
        etcd.etcdctl(&["put", "meshd/b", "x"]).unwrap();
        assert_eq!(etcd.wait_leader(Duration::from_secs(30)).unwrap(), leader);
        etcd.member_mut(frozen).resume();
        etcd.stop();
        etcd.restart().unwrap();
        let got = etcd
            .etcdctl(&["get", "meshd/b", "--print-value-only"])
            .unwrap();
        assert_eq!(got.trim(), "x", "data survives a whole-cluster restart");
    }
}
