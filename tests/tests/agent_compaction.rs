//! Relist on compaction, at agent level: c2's etcd is compacted past the revision an agent of c1
//! is watching it from, and the changes made before, during and after reach its maps.
//!
//! A watch that keeps up is never compacted (etcd only cancels watchers behind the compacted
//! revision), so the test makes one fall behind: it freezes the agent (SIGSTOP), so it stops
//! reading, and floods the watched prefix with more events than HTTP/2 flow control and etcd's
//! watch buffers hold for it. etcd then parks that watcher, and when it is resumed after the
//! compaction, answers with "compacted" instead of the lost events; the agent must list again.

use std::time::Duration;

use meshd_certs::LeafKind;
use meshd_e2e::mesh::{Mesh, MeshOptions};
use meshd_e2e::wait_for;
use meshd_kvstore::{Backend, EtcdConfig};
use meshd_state::{encode, ClusterName, IpcacheEntry, IpcacheKey, NumericIdentity};

const WAIT: Duration = Duration::from_secs(90);
/// Rewrites of one record while the agent is frozen: about 8 MB of watch events, beyond the
/// HTTP/2 windows (a few MB) and etcd's per-watch buffers.
const FLOOD: usize = 20_000;

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on an agent this test started.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Writes `FLOOD` versions of one valid ipcache record of c2, as c2's admin, 32 at a time.
fn flood(mesh: &Mesh, key: &IpcacheKey, entry: &IpcacheEntry) -> anyhow::Result<()> {
    let config = EtcdConfig::new(mesh.cluster("c2")?.etcd.endpoints())
        .with_tls(mesh.pki.files("c2", LeafKind::Admin));
    let value = encode(key, entry)?;
    let key = key.to_string();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async move {
            let store = meshd_kvstore::connect(&config).await?;
            let mut tasks = Vec::new();
            for _ in 0..32 {
                let (store, key, value) = (store.clone(), key.clone(), value.clone());
                tasks.push(tokio::spawn(async move {
                    for _ in 0..FLOOD / 32 {
                        store.put(&key, value.clone(), None).await?;
                    }
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            anyhow::Ok(())
        })
}

#[test]
fn compaction_past_a_lagging_agent_relists_and_loses_nothing() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mut opts = MeshOptions::clusters(2, 1);
    // c1/n1 is frozen for longer than the default lease: keep its own records alive, so this
    // test is about its watch of c2 only.
    opts.lease_ttl_secs = 120;
    let mesh = Mesh::start(opts)?;
    let doomed = mesh.add_endpoint("c2", "n1", "doomed", "app=web")?;
    let kept = mesh.add_endpoint("c2", "n1", "kept", "app=web")?;
    mesh.wait_maps_match_etcd(WAIT)?;

    let c2n1 = mesh.node("c2", "n1")?;
    let flooded_ip = std::net::Ipv4Addr::new(10, 2, 1, 250);
    let key = IpcacheKey::host(ClusterName::new("c2")?, flooded_ip.into());
    let entry = IpcacheEntry {
        prefix: key.prefix,
        identity: NumericIdentity::new(kept.identity)?,
        host_ip: c2n1.ip.into(),
        // A long (valid) name makes each event big, so fewer writes fill the buffers.
        endpoint: Some(format!("flood.{}", vec!["x".repeat(60); 3].join("."))),
        namespace: Some("default".into()),
    };

    let pid = mesh.agent_pid("c1", "n1").expect("agent runs");
    signal(pid, libc::SIGSTOP);
    let changes = (|| -> anyhow::Result<_> {
        // Before the compaction: one endpoint goes, one comes, one record is rewritten often.
        mesh.delete_endpoint(&doomed)?;
        let before = mesh.add_endpoint("c2", "n1", "before-compaction", "app=web")?;
        flood(&mesh, &key, &entry)?;
        let compacted = mesh.cluster("c2")?.etcd.compact_now()?;
        // After it, while c1/n1 is still frozen.
        let after = mesh.add_endpoint("c2", "n1", "after-compaction", "app=web")?;
        Ok((before, after, compacted))
    })();
    signal(pid, libc::SIGCONT);
    let (_before, _after, compacted) = changes?;

    mesh.wait_maps_match_etcd(WAIT)?;
    // The maps are right because the agent listed again: its watch was refused as compacted
    // (were it not, this test would not have tested the relist).
    wait_for("c1/n1 logs a compacted watch", WAIT, || {
        let log = std::fs::read_to_string(&mesh.node("c1", "n1")?.log)?;
        anyhow::ensure!(
            log.contains("watch compacted; relisting"),
            "no compacted watch in c1/n1's log (compacted at revision {compacted})"
        );
        Ok(())
    })
    .map_err(|e| e.context(mesh.log_tail("c1", "n1", 40)))?;
    // Still right after more changes.
    mesh.add_endpoint("c2", "n1", "later", "app=web")?;
    mesh.wait_maps_match_etcd(WAIT)?;
    Ok(())
}
