//! The mesh on replicated etcds (three members per cluster, as production runs them): agents
//! list every member and move to another one when the member they use dies or hangs. Each test
//! ends with every node's maps equal to the source of truth, the union of the clusters' etcd
//! contents ([`Mesh::check_maps_match_etcd`]).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context;
use meshd_e2e::mesh::{EndpointInfo, Mesh, MeshOptions};
use meshd_e2e::wait_for;

const WAIT: Duration = Duration::from_secs(90);

/// The endpoints a test expects in etcd are exactly the ones etcd holds: no publication was
/// lost, and no deleted endpoint came back.
fn etcd_holds_exactly(mesh: &Mesh, live: &[EndpointInfo]) -> anyhow::Result<()> {
    let want: BTreeSet<Ipv4Addr> = live.iter().map(|e| e.ip).collect();
    wait_for("etcd holds exactly the live endpoints", WAIT, || {
        let got: BTreeSet<Ipv4Addr> = mesh.etcd_ipcache()?.keys().map(|p| p.addr()).collect();
        anyhow::ensure!(
            got == want,
            "etcd has {got:?}, the endpoints alive are {want:?}"
        );
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))
}

/// Endpoints added and deleted in both clusters without a pause, while the leader of c1's and
/// then of c2's etcd is SIGKILLed (agents publish through and watch the dying member); the
/// killed members come back at the end.
#[test]
fn killing_the_leader_during_a_burst_of_endpoint_changes_loses_nothing() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mut mesh = Mesh::start(MeshOptions::clusters(2, 2).etcd_members(3))?;
    // One endpoint per cluster first, so the burst's label set has its identity on every node
    // and no add waits for an identity allocation.
    let mut live = vec![
        mesh.add_endpoint("c1", "n1", "first-c1", "app=burst")?,
        mesh.add_endpoint("c2", "n1", "first-c2", "app=burst")?,
    ];
    mesh.wait_maps_match_etcd(WAIT)?;

    let mut killed = Vec::new();
    for i in 0..18 {
        let cluster = if i % 2 == 0 { "c1" } else { "c2" };
        let node = if i % 4 < 2 { "n1" } else { "n2" };
        let ep = mesh
            .add_endpoint(cluster, node, &format!("burst-{i}"), "app=burst")
            .with_context(|| format!("adding burst-{i}"))?;
        if i % 3 == 2 {
            mesh.delete_endpoint(&ep)
                .with_context(|| format!("deleting burst-{i}"))?;
        } else {
            live.push(ep);
        }
        if i == 5 || i == 11 {
            let victim = if i == 5 { "c1" } else { "c2" };
            let etcd = &mut mesh.cluster_mut(victim)?.etcd;
            let leader = etcd.wait_leader(WAIT)?;
            etcd.member_mut(leader).kill();
            killed.push((victim, leader));
        }
    }
    etcd_holds_exactly(&mesh, &live)?;
    mesh.wait_maps_match_etcd(WAIT)?;

    // The killed members rejoin; a change made after that still reaches every node.
    for (victim, member) in killed {
        mesh.cluster_mut(victim)?
            .etcd
            .member_mut(member)
            .restart()?;
    }
    live.push(mesh.add_endpoint("c1", "n2", "after-rejoin", "app=burst")?);
    etcd_holds_exactly(&mesh, &live)?;
    mesh.wait_maps_match_etcd(WAIT)?;
    for (c, n) in mesh.node_names() {
        let s = mesh.status(&c, &n)?;
        for cl in s["clusters"].as_array().into_iter().flatten() {
            anyhow::ensure!(cl["state"] == "ready", "{c}/{n}: {cl}");
        }
    }
    Ok(())
}

/// SIGSTOP of the c2 member that c1's agent watches c2 through: the connection stays open and
/// nothing answers. The agent must notice (keepalives), move to another member, re-list, and
/// receive what c2 changes meanwhile; c2's own agents, which may use the same member, must keep
/// publishing.
#[test]
fn a_frozen_member_an_agent_watches_through_is_left_for_another() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mut mesh = Mesh::start(MeshOptions::clusters(2, 2).etcd_members(3))?;
    let mut live = vec![
        mesh.add_endpoint("c2", "n1", "before", "app=web")?,
        mesh.add_endpoint("c2", "n2", "doomed", "app=web")?,
    ];
    mesh.wait_maps_match_etcd(WAIT)?;

    let used = wait_for("c1/n1 connected to one member of c2", WAIT, || {
        let used = mesh.etcd_members_in_use("c1", "n1", "c2")?;
        anyhow::ensure!(used.len() == 1, "c1/n1 uses members {used:?} of c2");
        Ok(used[0])
    })?;
    mesh.cluster_mut("c2")?.etcd.member_mut(used).pause();

    let result = (|| -> anyhow::Result<()> {
        // Changes in c2 while the member is frozen: one endpoint deleted, two added.
        let doomed = live.pop().expect("doomed");
        mesh.delete_endpoint(&doomed)?;
        live.push(mesh.add_endpoint("c2", "n1", "while-frozen", "app=web")?);
        live.push(mesh.add_endpoint("c2", "n2", "while-frozen-2", "app=web")?);
        etcd_holds_exactly(&mesh, &live)?;
        mesh.wait_maps_match_etcd(WAIT)?;
        // c1/n1 now reads c2 through a member that answers.
        let now = mesh.etcd_members_in_use("c1", "n1", "c2")?;
        anyhow::ensure!(
            !now.is_empty() && !now.contains(&used),
            "c1/n1 still uses frozen member {used} of c2 (connections to {now:?})"
        );
        Ok(())
    })();
    mesh.cluster_mut("c2")?.etcd.member_mut(used).resume();
    result.map_err(|e| {
        let etcd = mesh
            .cluster("c2")
            .map(|c| c.etcd.logs(15))
            .unwrap_or_default();
        e.context(etcd)
    })?;

    // Back in service: what changes next still reaches every node.
    live.push(mesh.add_endpoint("c2", "n1", "after", "app=web")?);
    etcd_holds_exactly(&mesh, &live)?;
    mesh.wait_maps_match_etcd(WAIT)?;
    Ok(())
}
