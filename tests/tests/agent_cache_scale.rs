//! The cache at scale (issue 15): 64 simulated remote clusters, 100k remote entries in all,
//! written the way their publishers write them (cluster config, node, ipcache entries in
//! transactions, then the sync canaries) into 4 etcd processes (16 clusters each), mirrored by
//! c1's `clustermesh-apiserver --kvstoremesh` into c1's etcd, read by one agent in cache mode.
//! Every entry must reach the agent's maps exactly as written, every cluster ready.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use meshd_datapath::DatapathMaps;
use meshd_e2e::mesh::{Mesh, MeshOptions};
use meshd_e2e::sim::{nth_ip, put_all, simulated_entries, SimulatedCluster};
use meshd_e2e::wait_for;
use meshd_mesh::IpcacheTarget;
use meshd_state::NumericIdentity;
use meshd_testing::etcd::Etcd;

const CLUSTERS: u32 = 64;
const ENTRIES: usize = 100_000;
const ETCDS: usize = 4;

fn cluster(id: u32) -> anyhow::Result<SimulatedCluster> {
    SimulatedCluster::new(&format!("s{id}"), id, Ipv4Addr::new(192, 168, 79, id as u8))
}

fn identity(id: u32, i: usize) -> u32 {
    (id << 16) | (300 + (i % 50) as u32)
}

#[test]
fn one_agent_reads_64_clusters_and_100k_entries_through_the_cache() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites()
        || !meshd_testing::require_workspace_bins(&["clustermesh-apiserver"])
    {
        return Ok(());
    }
    let mut mesh = Mesh::start(MeshOptions::clusters(1, 1).kvstoremesh())?;
    let etcds = (0..ETCDS)
        .map(|_| Etcd::start())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let relays = etcds
        .iter()
        .map(|e| {
            let target = SocketAddr::from(([127, 0, 0, 1], e.client_url_port()));
            mesh.relay(target)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let per_cluster = ENTRIES.div_ceil(CLUSTERS as usize);
    let mut want: BTreeMap<Ipv4Addr, (u32, u32)> = BTreeMap::new();
    rt.block_on(async {
        let mut clients = Vec::new();
        for e in &etcds {
            clients.push(etcd_client::Client::connect([e.endpoint()], None).await?);
        }
        for (k, id) in (2..2 + CLUSTERS).enumerate() {
            let ips: Vec<(Ipv4Addr, u32)> = (k * per_cluster..((k + 1) * per_cluster).min(ENTRIES))
                .map(|i| (nth_ip(100, i), identity(id, i)))
                .collect();
            for (ip, ident) in &ips {
                want.insert(*ip, (*ident, id));
            }
            put_all(&mut clients[k % ETCDS], &cluster(id)?.records(&ips)?).await?;
        }
        anyhow::Ok(())
    })?;
    assert_eq!(want.len(), ENTRIES);

    // The remote files, in the directory the mirror reads: plaintext (these etcds have no
    // TLS), through the relays on the bridge.
    for (k, id) in (2..2 + CLUSTERS).enumerate() {
        std::fs::write(
            mesh.remotes_dir("c1").join(cluster(id)?.name.as_str()),
            format!("endpoints: [http://{}]\n", relays[k % ETCDS]),
        )?;
    }

    let pin_dir = mesh.node("c1", "n1")?.pin_dir.clone();
    let mut maps = wait_for("c1/n1's maps", Duration::from_secs(30), || {
        Ok(DatapathMaps::open(&pin_dir)?)
    })?;
    let expected: BTreeMap<Ipv4Addr, IpcacheTarget> = want
        .iter()
        .map(|(ip, (ident, id))| {
            (
                *ip,
                IpcacheTarget {
                    identity: NumericIdentity::new(*ident).unwrap(),
                    tunnel_endpoint: Some(IpAddr::V4(cluster(*id).unwrap().node_ip)),
                    local: false,
                },
            )
        })
        .collect();
    wait_for(
        "every entry of 64 clusters in c1/n1's maps",
        Duration::from_secs(600),
        || {
            let got = simulated_entries(&mut maps, 100)?;
            anyhow::ensure!(
                got == expected,
                "{} entries, {} wanted",
                got.len(),
                expected.len()
            );
            Ok(())
        },
    )
    .map_err(|e| e.context(mesh.logs()))?;

    wait_for(
        "64 remote clusters ready, read from the cache",
        Duration::from_secs(120),
        || {
            let status = mesh.status("c1", "n1")?;
            let remotes: Vec<&serde_json::Value> = status["clusters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["local"] != true)
                .collect();
            anyhow::ensure!(
                remotes.len() == CLUSTERS as usize,
                "{} remotes",
                remotes.len()
            );
            for c in remotes {
                anyhow::ensure!(c["state"] == "ready" && c["source"] == "cache", "{c}");
            }
            Ok(())
        },
    )
    .map_err(|e| e.context(mesh.logs()))?;
    drop(etcds);
    Ok(())
}
