//! Remote clusters at runtime: files added and removed in the remote-clusters directory,
//! a conflicting remote refused, malformed or hostile remote data rejected and counted.

use std::time::Duration;

use meshd_e2e::mesh::{Mesh, MeshOptions};
use meshd_e2e::wait_for;

const WAIT: Duration = Duration::from_secs(30);

fn in_maps(mesh: &Mesh, c: &str, n: &str, ip: std::net::Ipv4Addr) -> anyhow::Result<bool> {
    Ok(mesh.ipcache_entry(c, n, ip)?.is_some())
}

#[test]
fn remote_cluster_files_connect_and_disconnect_at_runtime() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mesh = Mesh::start(MeshOptions::clusters(2, 2))?;
    let ep = mesh.add_endpoint("c2", "n2", "remote-web", "app=web")?;
    wait_for("c2 endpoint in c1's maps", WAIT, || {
        anyhow::ensure!(in_maps(&mesh, "c1", "n1", ep.ip)?);
        Ok(())
    })?;

    // Removing the file disconnects c2 and drains everything of it.
    std::fs::remove_file(mesh.remotes_dir("c1").join("c2"))?;
    wait_for("c2 drained from c1", WAIT, || {
        for n in ["n1", "n2"] {
            anyhow::ensure!(!in_maps(&mesh, "c1", n, ep.ip)?, "still in c1/{n}");
            let s = mesh.status("c1", n)?;
            let names: Vec<_> = s["clusters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["name"].as_str())
                .collect();
            anyhow::ensure!(names == ["c1"], "c1/{n} still lists {names:?}");
        }
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;
    // c2 still sees c1 (its own file is untouched).
    assert_eq!(mesh.cluster_status("c2", "n1", "c1")?["state"], "ready");

    // Adding it back connects again.
    mesh.write_remote_file("c1", "c2")?;
    wait_for("c2 back in c1", WAIT, || {
        anyhow::ensure!(in_maps(&mesh, "c1", "n1", ep.ip)?);
        let c2 = mesh.cluster_status("c1", "n1", "c2")?;
        anyhow::ensure!(c2["state"] == "ready", "{c2}");
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;

    // A file named c3 that points at c2's etcd: c2's config names it c2, so it is refused
    // and nothing of it enters the datapath twice; c2 itself stays fine.
    let text = std::fs::read_to_string(mesh.remotes_dir("c1").join("c2"))?;
    std::fs::write(mesh.remotes_dir("c1").join("c3"), text)?;
    wait_for("c3 refused", WAIT, || {
        let c3 = mesh.cluster_status("c1", "n1", "c3")?;
        anyhow::ensure!(c3["state"] == "refused", "{c3}");
        anyhow::ensure!(c3["refused"].as_str().unwrap_or("").contains("c2"), "{c3}");
        Ok(())
    })?;
    assert_eq!(mesh.cluster_status("c1", "n1", "c2")?["state"], "ready");
    let table = mesh.meshd("c1", "n1", &["clustermesh", "status"])?;
    assert!(table.contains("refused") && table.contains("c2"), "{table}");
    assert!(in_maps(&mesh, "c1", "n1", ep.ip)?);
    Ok(())
}

#[test]
fn malformed_and_hostile_remote_entries_are_rejected_and_counted() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mesh = Mesh::start(MeshOptions::clusters(2, 2))?;
    let good = mesh.add_endpoint("c2", "n1", "good", "app=web")?;
    let local = mesh.add_endpoint("c1", "n1", "local", "app=web")?;
    wait_for("good c2 endpoint in c1's maps", WAIT, || {
        anyhow::ensure!(in_maps(&mesh, "c1", "n1", good.ip)?);
        Ok(())
    })?;
    // The local endpoint's entry on both c1 nodes, as c1 made it: the hostile claim below must
    // leave exactly this.
    let local_entry = |n: &str| -> anyhow::Result<_> {
        let node = if n == "n1" {
            None
        } else {
            Some(std::net::IpAddr::from(mesh.node("c1", "n1")?.ip))
        };
        Ok((local.identity, node))
    };
    for n in ["n1", "n2"] {
        let want = local_entry(n)?;
        wait_for(
            &format!("c1's local endpoint in c1/{n}'s maps"),
            WAIT,
            || {
                let got = mesh
                    .ipcache_entry("c1", n, local.ip)?
                    .map(|e| (e.identity.get(), e.tunnel_endpoint));
                anyhow::ensure!(got == Some(want), "c1/{n}: {got:?}, want {want:?}");
                Ok(())
            },
        )?;
    }
    let before = mesh.cluster_status("c1", "n1", "c2")?["rejected"]
        .as_u64()
        .unwrap_or(0);
    let c2_node = mesh.node("c2", "n1")?.ip;
    let etcd = &mesh.cluster("c2")?.etcd;
    // Not JSON at all.
    etcd.etcdctl(&["put", "meshd/state/ip/v1/c2/10.2.1.200", "{not json"])?;
    // An identity of cluster 1 (65836 = 1 << 16 | 300) claimed by c2.
    etcd.etcdctl(&[
        "put",
        "meshd/state/ip/v1/c2/10.2.1.201",
        &format!(r#"{{"prefix":"10.2.1.201/32","identity":65836,"host_ip":"{c2_node}"}}"#),
    ])?;
    // A prefix over c1's local endpoint, with a valid c2 identity.
    etcd.etcdctl(&[
        "put",
        &format!("meshd/state/ip/v1/c2/{}", local.ip),
        &format!(
            r#"{{"prefix":"{}/32","identity":{},"host_ip":"{c2_node}"}}"#,
            local.ip, good.identity
        ),
    ])?;
    // A tunnel endpoint that is no node of c2.
    etcd.etcdctl(&[
        "put",
        "meshd/state/ip/v1/c2/10.2.1.202",
        &format!(
            r#"{{"prefix":"10.2.1.202/32","identity":{},"host_ip":"192.168.77.99"}}"#,
            good.identity
        ),
    ])?;
    wait_for("rejections counted", WAIT, || {
        let c2 = mesh.cluster_status("c1", "n1", "c2")?;
        let rejected = c2["rejected"].as_u64().unwrap_or(0);
        // Every hostile write is accounted for: three rejected (the undecodable value, the
        // foreign identity, the claim on a local address), and the entry whose tunnel endpoint
        // is no node of c2 held back (it would be admitted if such a node appeared).
        anyhow::ensure!(rejected >= before + 3, "{c2}");
        anyhow::ensure!(c2["pending"] == 1, "{c2}");
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;
    for n in ["n1", "n2"] {
        for ip in ["10.2.1.200", "10.2.1.201", "10.2.1.202"] {
            assert!(
                !in_maps(&mesh, "c1", n, ip.parse()?)?,
                "{ip} reached c1/{n}"
            );
        }
        // The local endpoint's entry is still there and this cluster's, not c2's claim.
        let got = mesh
            .ipcache_entry("c1", n, local.ip)?
            .map(|e| (e.identity.get(), e.tunnel_endpoint));
        assert_eq!(
            got,
            Some(local_entry(n)?),
            "c1/{n}: the local entry changed"
        );
        assert!(
            in_maps(&mesh, "c1", n, good.ip)?,
            "the good entry was disturbed"
        );
    }
    Ok(())
}

/// `meshd clustermesh disconnect c2` run in c1 cuts c2's agents off c1 — they say so and keep
/// c1's last state (fail-static) — while c3 still reads c1; `connect` restores it.
#[test]
fn a_disconnected_cluster_can_no_longer_read_and_says_so() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mesh = Mesh::start(MeshOptions::clusters(3, 1))?;
    let before = mesh.add_endpoint("c1", "n1", "before", "app=web")?;
    wait_for("c1's endpoint in c2 and c3", WAIT, || {
        anyhow::ensure!(in_maps(&mesh, "c2", "n1", before.ip)?, "not in c2");
        anyhow::ensure!(in_maps(&mesh, "c3", "n1", before.ip)?, "not in c3");
        Ok(())
    })?;

    mesh.clustermesh("c1", "disconnect", "c2")?;
    wait_for("c2 sees c1 refuse it", WAIT, || {
        let c1 = mesh.cluster_status("c2", "n1", "c1")?;
        anyhow::ensure!(c1["access_denied"] == true, "{c1}");
        anyhow::ensure!(c1["connected"] == false, "{c1}");
        let err = c1["last_error"].as_str().unwrap_or("");
        anyhow::ensure!(
            err.contains("permission denied") && err.contains("meshd clustermesh connect"),
            "{c1}"
        );
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;
    let table = mesh.meshd("c2", "n1", &["clustermesh", "status"])?;
    assert!(table.contains("access denied"), "{table}");
    // Scripts waiting for the mesh hear which cluster is not ready.
    let waited = mesh
        .meshd(
            "c2",
            "n1",
            &["clustermesh", "status", "--wait", "--timeout", "2"],
        )
        .expect_err("c1 is not ready for c2");
    assert!(
        format!("{waited:#}").contains("not ready when the timeout passed: c1"),
        "{waited:#}"
    );
    // The watches c2 opened before are ended, not trusted: give c2's watcher a moment to act on
    // the refusal before c1 changes.
    std::thread::sleep(Duration::from_secs(2));

    let after = mesh.add_endpoint("c1", "n1", "after", "app=web")?;
    wait_for("c3 still reads c1", WAIT, || {
        anyhow::ensure!(in_maps(&mesh, "c3", "n1", after.ip)?);
        Ok(())
    })?;
    // c3 has it, so c1 published it; give c2 the same time again.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !in_maps(&mesh, "c2", "n1", after.ip)?,
        "c2 still reads c1 after the disconnect"
    );
    assert!(
        in_maps(&mesh, "c2", "n1", before.ip)?,
        "c2 keeps c1's last state (fail-static)"
    );
    assert_eq!(mesh.cluster_status("c3", "n1", "c1")?["state"], "ready");

    mesh.clustermesh("c1", "connect", "c2")?;
    mesh.meshd(
        "c2",
        "n1",
        &["clustermesh", "status", "--wait", "--timeout", "90"],
    )?;
    wait_for("c2 reads c1 again", Duration::from_secs(90), || {
        anyhow::ensure!(in_maps(&mesh, "c2", "n1", after.ip)?);
        let c1 = mesh.cluster_status("c2", "n1", "c1")?;
        anyhow::ensure!(
            c1["state"] == "ready" && c1["access_denied"] == false,
            "{c1}"
        );
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;
    Ok(())
}

/// Two remote clusters claiming one cluster id, end to end: c3's apiserver (here: its admin)
/// publishes c2's id; c1 admits the first and refuses the other by name, shows it in
/// `clustermesh status`, and keeps the refused cluster's endpoints out of its maps.
#[test]
fn a_duplicate_cluster_id_is_refused_and_shown() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mesh = Mesh::start(MeshOptions::clusters(3, 1))?;
    let in_c2 = mesh.add_endpoint("c2", "n1", "in-c2", "app=web")?;
    wait_for("c2's endpoint in c1", WAIT, || {
        anyhow::ensure!(in_maps(&mesh, "c1", "n1", in_c2.ip)?);
        Ok(())
    })?;
    // c3 now claims id 2, which c1 already admitted for c2.
    mesh.cluster("c3")?.etcd.etcdctl(&[
        "put",
        "meshd/cluster-config/c3",
        r#"{"name":"c3","id":2}"#,
    ])?;
    let in_c3 = mesh.add_endpoint("c3", "n1", "in-c3", "app=web")?;
    wait_for("c3 refused by c1 for its id", WAIT, || {
        let c3 = mesh.cluster_status("c1", "n1", "c3")?;
        anyhow::ensure!(c3["state"] == "refused", "{c3}");
        let why = c3["refused"].as_str().unwrap_or("");
        anyhow::ensure!(why.contains("cluster id 2") && why.contains("c2"), "{c3}");
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;
    let table = mesh.meshd("c1", "n1", &["clustermesh", "status"])?;
    assert!(
        table.contains("refused") && table.contains("cluster id 2"),
        "{table}"
    );
    // The incumbent stays; nothing of the refused cluster is in the datapath.
    assert_eq!(mesh.cluster_status("c1", "n1", "c2")?["state"], "ready");
    assert!(in_maps(&mesh, "c1", "n1", in_c2.ip)?);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !in_maps(&mesh, "c1", "n1", in_c3.ip)?,
        "an endpoint of the refused cluster entered c1's maps"
    );
    Ok(())
}
