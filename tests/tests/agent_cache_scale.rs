//! The cache at scale (issue 15): 64 simulated remote clusters, 100k remote entries in all,
//! written the way their publishers write them (cluster config, node, ipcache entries in
//! transactions, then the sync canaries) into 4 etcd processes (16 clusters each), mirrored by
//! c1's `clustermesh-apiserver --kvstoremesh` into c1's etcd, read by one agent in cache mode.
//! Every entry must reach the agent's maps exactly as written, every cluster ready.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use etcd_client::{Txn, TxnOp};
use ipnet::IpNet;
use meshd_datapath::DatapathMaps;
use meshd_e2e::mesh::{Mesh, MeshOptions};
use meshd_e2e::wait_for;
use meshd_mesh::IpcacheTarget;
use meshd_state::{
    encode, ClusterConfig, ClusterConfigKey, ClusterId, ClusterName, IdentityRecord, IpcacheEntry,
    IpcacheKey, NodeKey, NodeRecord, NumericIdentity, Resource, ServiceRecord, SyncCanary,
    SyncCanaryKey,
};
use meshd_testing::etcd::Etcd;

const CLUSTERS: u32 = 64;
const ENTRIES: usize = 100_000;
const ETCDS: usize = 4;
const PER_TXN: usize = 128;

/// 10.100.x.y and up, skipping .0 and .255: clear of every pod CIDR of the mesh.
fn nth_ip(i: usize) -> Ipv4Addr {
    let third = i / 254;
    Ipv4Addr::new(
        10,
        100 + (third / 256) as u8,
        (third % 256) as u8,
        (i % 254 + 1) as u8,
    )
}

/// Simulated cluster `id` (2..=65): its name, node address and entries' identity.
fn name(id: u32) -> ClusterName {
    ClusterName::new(format!("s{id}")).expect("cluster name")
}

fn node_ip(id: u32) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 79, id as u8)
}

fn identity(id: u32, i: usize) -> u32 {
    (id << 16) | (300 + (i % 50) as u32)
}

/// What cluster `id`'s publishers write: its config, one node, its entries (`ips`), then the
/// canaries of every resource.
async fn publish(
    client: &mut etcd_client::Client,
    id: u32,
    ips: &[(Ipv4Addr, u32)],
) -> anyhow::Result<()> {
    let cluster = name(id);
    let mut ops = Vec::new();
    let config_key = ClusterConfigKey {
        cluster: cluster.clone(),
    };
    let config = ClusterConfig {
        name: cluster.clone(),
        id: ClusterId::new(id)?,
        capabilities: Default::default(),
        routing_mode: Default::default(),
    };
    ops.push(TxnOp::put(
        config_key.to_string(),
        encode(&config_key, &config)?,
        None,
    ));
    let node_key = NodeKey {
        cluster: cluster.clone(),
        node: "n1".into(),
    };
    let node = NodeRecord {
        name: "n1".into(),
        cluster: cluster.clone(),
        cluster_id: ClusterId::new(id)?,
        node_ip: node_ip(id).into(),
        pod_cidrs: Vec::new(),
        labels: Default::default(),
        boot_id: "boot".into(),
    };
    ops.push(TxnOp::put(
        node_key.to_string(),
        encode(&node_key, &node)?,
        None,
    ));
    for (ip, ident) in ips {
        let key = IpcacheKey::host(cluster.clone(), (*ip).into());
        let entry = IpcacheEntry {
            prefix: key.prefix,
            identity: NumericIdentity::new(*ident)?,
            host_ip: node_ip(id).into(),
            endpoint: None,
            namespace: None,
        };
        ops.push(TxnOp::put(key.to_string(), encode(&key, &entry)?, None));
    }
    for resource in [
        NodeRecord::KIND,
        IpcacheEntry::KIND,
        IdentityRecord::KIND,
        ServiceRecord::KIND,
    ] {
        let key = SyncCanaryKey {
            cluster: cluster.clone(),
            resource: resource.into(),
        };
        let canary = SyncCanary { synced_at_ms: 1 };
        ops.push(TxnOp::put(key.to_string(), encode(&key, &canary)?, None));
    }
    // The canaries go last: a reader that sees them has seen everything before.
    for chunk in ops.chunks(PER_TXN) {
        client.txn(Txn::new().and_then(chunk.to_vec())).await?;
    }
    Ok(())
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
                .map(|i| (nth_ip(i), identity(id, i)))
                .collect();
            for (ip, ident) in &ips {
                want.insert(*ip, (*ident, id));
            }
            publish(&mut clients[k % ETCDS], id, &ips).await?;
        }
        anyhow::Ok(())
    })?;
    assert_eq!(want.len(), ENTRIES);

    // The remote files, in the directory the mirror reads: plaintext (these etcds have no
    // TLS), through the relays on the bridge.
    for (k, id) in (2..2 + CLUSTERS).enumerate() {
        std::fs::write(
            mesh.remotes_dir("c1").join(name(id).as_str()),
            format!("endpoints: [http://{}]\n", relays[k % ETCDS]),
        )?;
    }

    let pin_dir = mesh.node("c1", "n1")?.pin_dir.clone();
    let mut maps = wait_for("c1/n1's maps", Duration::from_secs(30), || {
        Ok(DatapathMaps::open(&pin_dir)?)
    })?;
    let remote_entries =
        |maps: &mut DatapathMaps| -> anyhow::Result<BTreeMap<Ipv4Addr, IpcacheTarget>> {
            Ok(maps
                .read_back()?
                .ipcache
                .into_iter()
                .filter_map(|(p, t)| match p {
                    IpNet::V4(p) if p.addr().octets()[0] == 10 && p.addr().octets()[1] >= 100 => {
                        Some((p.addr(), t))
                    }
                    _ => None,
                })
                .collect())
        };
    let expected: BTreeMap<Ipv4Addr, IpcacheTarget> = want
        .iter()
        .map(|(ip, (ident, id))| {
            (
                *ip,
                IpcacheTarget {
                    identity: NumericIdentity::new(*ident).unwrap(),
                    tunnel_endpoint: Some(IpAddr::V4(node_ip(*id))),
                    local: false,
                },
            )
        })
        .collect();
    wait_for(
        "every entry of 64 clusters in c1/n1's maps",
        Duration::from_secs(600),
        || {
            let got = remote_entries(&mut maps)?;
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
