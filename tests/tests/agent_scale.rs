//! The agent at scale (issue 11): started with 100k remote ipcache entries in a remote
//! cluster's etcd, then 10k more changes (new entries, deletions, moved identities). Checks
//! that the pinned maps hold exactly what the merged view wants, and that the safety-net full
//! diff, run after the churn, had nothing to correct: the incremental operations alone kept
//! the maps right.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use etcd_client::{Txn, TxnOp};
use meshd_certs::LeafKind;
use meshd_datapath::DatapathMaps;
use meshd_e2e::mesh::{Mesh, MeshOptions};
use meshd_e2e::sim::{ipcache_record, nth_ip, simulated_entries};
use meshd_e2e::wait_for;
use meshd_kvstore::{EtcdConfig, EtcdStore};
use meshd_mesh::IpcacheTarget;
use meshd_state::{ClusterName, IpcacheKey, NumericIdentity};

const INITIAL: usize = 100_000;
const CHURN: usize = 10_000;

enum Change {
    Put(Ipv4Addr, u32),
    Delete(Ipv4Addr),
}

/// Writes changes into c2's etcd, many per transaction (the way a busy cluster's publishers
/// look from a watcher: bursts of events).
async fn write(etcd: &EtcdStore, host: Ipv4Addr, changes: &[Change]) -> anyhow::Result<()> {
    let c2 = ClusterName::new("c2")?;
    let mut client = etcd.client();
    for chunk in changes.chunks(meshd_e2e::sim::PER_TXN) {
        let mut ops = Vec::with_capacity(chunk.len());
        for change in chunk {
            match change {
                Change::Put(ip, identity) => {
                    let (key, value) = ipcache_record(&c2, *ip, *identity, host)?;
                    ops.push(TxnOp::put(key, value, None));
                }
                Change::Delete(ip) => {
                    let key = IpcacheKey::host(c2.clone(), (*ip).into());
                    ops.push(TxnOp::delete(key.to_string(), None));
                }
            }
        }
        client.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

fn datapath_status(mesh: &Mesh) -> anyhow::Result<serde_json::Value> {
    Ok(mesh.status("c1", "n1")?["datapath"].clone())
}

fn field(v: &serde_json::Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no {name}: {v}"))
}

#[test]
fn maps_equal_the_view_after_100k_entries_and_10k_changes() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mut opts = MeshOptions::clusters(2, 1);
    // The safety net runs often here, so the test sees it run after the churn.
    opts.resync_interval_secs = Some(3);
    let mut mesh = Mesh::start(opts)?;
    mesh.wait_all_ready(Duration::from_secs(60))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let etcd = &mesh.cluster("c2")?.etcd;
    let config = EtcdConfig::new([etcd.endpoint()]).with_tls(mesh.pki.files("c2", LeafKind::Admin));
    let c2 = rt.block_on(meshd_kvstore::connect(&config))?;
    let host = mesh.node("c2", "n1")?.ip;
    let identity = |n: usize| (2 << 16) | (300 + (n % 50) as u32);

    // The agent starts with 100k remote entries present.
    mesh.kill_agent("c1", "n1")?;
    let mut want: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
    let initial: Vec<Change> = (0..INITIAL)
        .map(|i| {
            want.insert(nth_ip(100, i), identity(i));
            Change::Put(nth_ip(100, i), identity(i))
        })
        .collect();
    rt.block_on(write(&c2, host, &initial))?;
    mesh.start_agent("c1", "n1")?;
    let pin_dir = mesh.node("c1", "n1")?.pin_dir.clone();
    let mut maps = wait_for("c1/n1's maps", Duration::from_secs(30), || {
        Ok(DatapathMaps::open(&pin_dir)?)
    })?;
    wait_for(
        "the initial 100k in c1/n1's maps",
        Duration::from_secs(300),
        || {
            let n = simulated_entries(&mut maps, 100)?.len();
            anyhow::ensure!(n == INITIAL, "{n} of {INITIAL}");
            Ok(())
        },
    )?;

    // 10k changes: new entries, deletions and entries moving to another identity.
    let mut churn = Vec::with_capacity(CHURN);
    for i in 0..CHURN {
        match i % 3 {
            0 => {
                let ip = nth_ip(100, INITIAL + i);
                want.insert(ip, identity(i + 7));
                churn.push(Change::Put(ip, identity(i + 7)));
            }
            1 => {
                let ip = nth_ip(100, i * 7);
                want.remove(&ip);
                churn.push(Change::Delete(ip));
            }
            _ => {
                let ip = nth_ip(100, i * 5 + 1);
                // An entry moves to another identity; one deleted above is deleted again
                // (a no-op event).
                match want.get_mut(&ip) {
                    Some(id) => {
                        *id = identity(i + 13);
                        churn.push(Change::Put(ip, identity(i + 13)));
                    }
                    None => churn.push(Change::Delete(ip)),
                }
            }
        }
    }
    rt.block_on(write(&c2, host, &churn))?;
    let expected: BTreeMap<Ipv4Addr, IpcacheTarget> = want
        .iter()
        .map(|(ip, id)| {
            (
                *ip,
                IpcacheTarget {
                    identity: NumericIdentity::new(*id).unwrap(),
                    tunnel_endpoint: Some(IpAddr::V4(host)),
                    local: false,
                },
            )
        })
        .collect();
    wait_for(
        "the churn in c1/n1's maps",
        Duration::from_secs(120),
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
    )?;

    // A safety-net diff that starts after the churn is in finds nothing to correct; the
    // maps as a whole hold exactly as many entries as the view wants.
    let before = field(&datapath_status(&mesh)?, "full_diffs");
    let status = wait_for(
        "a safety-net diff after the churn",
        Duration::from_secs(60),
        || {
            let s = datapath_status(&mesh)?;
            anyhow::ensure!(field(&s, "full_diffs") >= before + 2, "{s}");
            Ok(s)
        },
    )?;
    assert_eq!(field(&status, "corrections"), 0, "{status}");
    assert_eq!(field(&status, "failed_writes"), 0, "{status}");
    assert_eq!(simulated_entries(&mut maps, 100)?, expected);
    let all = maps.read_back()?;
    assert_eq!(
        field(&status, "ipcache_entries") as usize,
        all.ipcache.len(),
        "{status}"
    );
    assert_eq!(field(&status, "node_entries") as usize, all.nodes.len());
    let log = mesh.log_tail("c1", "n1", 200);
    assert!(!log.contains("incremental write went missing"), "{log}");
    drop(mesh);
    Ok(())
}
