//! Remote state written the way a cluster's publishers write it, for tests and benchmarks that
//! need more remote entries or clusters than real agents would publish quickly: ipcache
//! records, whole simulated clusters (config, one node, entries, sync canaries), and the
//! addresses they use.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::IpNet;
use meshd_datapath::{DatapathMaps, IpcacheTarget};
use meshd_state::{
    encode, ClusterConfig, ClusterConfigKey, ClusterId, ClusterName, IdentityRecord, IpcacheEntry,
    IpcacheKey, NodeKey, NodeRecord, NumericIdentity, Resource, ServiceRecord, SyncCanary,
    SyncCanaryKey,
};

/// A key and its encoded value.
pub type Kv = (String, Vec<u8>);

/// The `i`th address of 10.<base>.0.1 and up, skipping .0 and .255 (base 100 and up stays
/// clear of every pod CIDR the harness gives nodes).
pub fn nth_ip(base: u8, i: usize) -> Ipv4Addr {
    let third = i / 254;
    Ipv4Addr::new(
        10,
        base + (third / 256) as u8,
        (third % 256) as u8,
        (i % 254 + 1) as u8,
    )
}

/// etcd's default limit of operations in one transaction.
pub const PER_TXN: usize = 128;

/// Puts `records` in transactions of [`PER_TXN`] (the way a busy cluster's publishers look
/// from a watcher: bursts of events).
pub async fn put_all(client: &mut etcd_client::Client, records: &[Kv]) -> anyhow::Result<()> {
    use etcd_client::{Txn, TxnOp};
    for chunk in records.chunks(PER_TXN) {
        let ops = chunk
            .iter()
            .map(|(k, v)| TxnOp::put(k.as_str(), v.clone(), None))
            .collect::<Vec<_>>();
        client.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

/// `cluster`'s ipcache record of host `ip` with `identity`, behind node `host`.
pub fn ipcache_record(
    cluster: &ClusterName,
    ip: Ipv4Addr,
    identity: u32,
    host: Ipv4Addr,
) -> anyhow::Result<Kv> {
    let key = IpcacheKey::host(cluster.clone(), ip.into());
    let entry = IpcacheEntry {
        prefix: key.prefix,
        identity: NumericIdentity::new(identity)?,
        host_ip: host.into(),
        endpoint: None,
        namespace: None,
    };
    Ok((key.to_string(), encode(&key, &entry)?))
}

/// A simulated cluster: a name, an id and one node at `node_ip`.
#[derive(Debug, Clone)]
pub struct SimulatedCluster {
    pub name: ClusterName,
    pub id: u32,
    pub node_ip: Ipv4Addr,
}

impl SimulatedCluster {
    pub fn new(name: &str, id: u32, node_ip: Ipv4Addr) -> anyhow::Result<Self> {
        Ok(Self {
            name: ClusterName::new(name)?,
            id,
            node_ip,
        })
    }

    /// Everything its publishers write, in their order: its config, its node, `entries`
    /// (address, identity), then the sync canary of every resource (a reader that sees them
    /// has seen all the rest).
    pub fn records(&self, entries: &[(Ipv4Addr, u32)]) -> anyhow::Result<Vec<Kv>> {
        let mut out = Vec::with_capacity(entries.len() + 6);
        let ck = ClusterConfigKey {
            cluster: self.name.clone(),
        };
        let config = ClusterConfig {
            name: self.name.clone(),
            id: ClusterId::new(self.id)?,
            capabilities: Default::default(),
            routing_mode: Default::default(),
        };
        out.push((ck.to_string(), encode(&ck, &config)?));
        let nk = NodeKey {
            cluster: self.name.clone(),
            node: "n1".into(),
        };
        let node = NodeRecord {
            name: "n1".into(),
            cluster: self.name.clone(),
            cluster_id: ClusterId::new(self.id)?,
            node_ip: self.node_ip.into(),
            pod_cidrs: Vec::new(),
            labels: Default::default(),
            boot_id: "boot".into(),
        };
        out.push((nk.to_string(), encode(&nk, &node)?));
        for (ip, identity) in entries {
            out.push(ipcache_record(&self.name, *ip, *identity, self.node_ip)?);
        }
        for resource in [
            NodeRecord::KIND,
            IpcacheEntry::KIND,
            IdentityRecord::KIND,
            ServiceRecord::KIND,
        ] {
            let key = SyncCanaryKey {
                cluster: self.name.clone(),
                resource: resource.into(),
            };
            out.push((
                key.to_string(),
                encode(&key, &SyncCanary { synced_at_ms: 1 })?,
            ));
        }
        Ok(out)
    }
}

/// The ipcache entries of `maps` at 10.<base>.0.0 and up (the simulated ones of [`nth_ip`]).
pub fn simulated_entries(
    maps: &mut DatapathMaps,
    base: u8,
) -> anyhow::Result<BTreeMap<Ipv4Addr, IpcacheTarget>> {
    Ok(maps
        .read_back()?
        .ipcache
        .into_iter()
        .filter_map(|(p, t)| match p {
            IpNet::V4(p) if p.addr().octets()[0] == 10 && p.addr().octets()[1] >= base => {
                Some((p.addr(), t))
            }
            _ => None,
        })
        .collect())
}
