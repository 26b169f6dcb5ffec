//! The datapath with real traffic: two nodes (network namespaces on a shared bridge, each
//! with a VXLAN device in external mode) in two clusters, two endpoints per node.

mod common;

use meshd_state::NumericIdentity;
use std::{
    io::{Read, Write},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::topology::*;
use common::{can_run, TCP};
use meshd_datapath::{Direction, IpcacheTarget, PolicyEntry, Verdict};
use meshd_ebpf::abi;

#[test]
fn ping_tcp_udp_across_nodes_and_on_one_node() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::new("dpc", &[1, 2], 2).expect("topology");
    // The node itself: an ipcache entry without tunnel hands packets to the node's stack.
    let node0_ip = topo.nodes[0].node_ip;
    topo.nodes[0]
        .maps
        .upsert_ipcache(
            ipnet::Ipv4Net::new(node0_ip, 32).unwrap(),
            IpcacheTarget {
                identity: NumericIdentity::new(abi::IDENTITY_HOST).unwrap(),
                tunnel_endpoint: None,
                local: false,
            },
        )
        .unwrap();
    let (a0, a1) = (topo.ep(0, 0), topo.ep(0, 1));
    let (b0, b1) = (topo.ep(1, 0), topo.ep(1, 1));

    // The endpoint MTU leaves room for VXLAN.
    let mtu = meshd_datapath::plumbing::link_info(Some(a0.netns.name()), "eth0")
        .unwrap()
        .mtu;
    assert_eq!(mtu, 1450);

    ping(a0, b0.ip, 10).expect("ping across nodes");
    ping(b1, a1.ip, 10).expect("ping across nodes, other way");
    ping(a0, a1.ip, 10).expect("ping on one node");

    let listener = tcp_listen(b0, 7001).unwrap();
    tcp_echo(a0, &listener, b0.ip, b"across").expect("tcp across nodes");
    let listener = tcp_listen(a1, 7002).unwrap();
    tcp_echo(a0, &listener, a1.ip, b"local").expect("tcp on one node");
    // A payload larger than one MTU crosses in several segments without fragmentation.
    let listener = tcp_listen(a0, 7003).unwrap();
    tcp_echo(b1, &listener, a0.ip, &[7u8; 20000]).expect("bulk tcp across nodes");

    ping(a0, node0_ip, 10).expect("ping the endpoint's own node (via the stack)");

    udp_echo(a1, b1, 7004, 64).expect("udp across nodes");
    udp_echo(b0, b1, 7005, 64).expect("udp on one node");
    udp_echo(a0, b1, 7006, 4000).expect("fragmented udp across nodes");

    let n0 = &topo.nodes[0].maps;
    assert!(n0.counter(Direction::Egress, abi::FWD_STACK).unwrap() > 0);
    assert!(n0.counter(Direction::Egress, abi::FWD_TUNNEL).unwrap() > 0);
    assert!(n0.counter(Direction::Egress, abi::FWD_LOCAL).unwrap() > 0);
    assert!(n0.counter(Direction::Ingress, abi::FWD_LOCAL).unwrap() > 0);
    topo.assert_no_drops();
}

#[test]
fn policy_allows_one_identity_and_denies_another_with_real_traffic() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::new("dpp", &[1, 2], 2).expect("topology");
    let server = topo.ep(1, 0);
    let (server_identity, server_ip) = (server.identity, server.ip);
    let allowed_identity = topo.ep(0, 0).identity;
    let denied_identity = topo.ep(0, 1).identity;
    let listener = tcp_listen(server, 8080).unwrap();

    {
        let maps = &mut topo.nodes[1].maps;
        maps.set_policy_enabled(server_identity, Direction::Ingress, true)
            .unwrap();
        maps.upsert_policy(
            PolicyEntry {
                subject: server_identity,
                peer: Some(allowed_identity),
                proto: Some(TCP),
                dport: Some(8080),
                direction: Direction::Ingress,
            },
            Verdict::Allow,
            1,
        )
        .unwrap();
        maps.drain_drop_events();
    }

    tcp_echo(topo.ep(0, 0), &listener, server_ip, b"allowed").expect("allowed identity connects");
    let denied = tcp_connect(topo.ep(0, 1), server_ip, 8080, Duration::from_secs(2));
    assert!(denied.is_err(), "denied identity connected");
    ping(topo.ep(0, 0), server_ip, 2).expect_err("ICMP is not in the policy");

    let maps = &mut topo.nodes[1].maps;
    assert!(maps.counter(Direction::Ingress, abi::DROP_POLICY).unwrap() > 0);
    let events = maps.drain_drop_events();
    assert!(
        events.iter().any(|e| e.reason == abi::DROP_POLICY
            && e.src_identity == denied_identity
            && e.dst_identity == server_identity
            && e.dport == 8080),
        "no drop event for the denied identity: {events:?}"
    );
    // The server's replies to the allowed client went out although nothing selects its egress
    // and the client's node never saw a policy: stateful in both directions.
    assert_eq!(
        topo.nodes[0]
            .maps
            .counter(Direction::Ingress, abi::DROP_POLICY)
            .unwrap(),
        0
    );
}

#[test]
fn programs_stay_attached_after_the_loader_is_gone_and_reload_breaks_no_stream() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::new("dpr", &[1, 1], 1).expect("topology");
    // The loading "agent" goes away: its program fds close, the pinned links stay.
    for node in &mut topo.nodes {
        node.datapath = None;
    }
    ping(topo.ep(0, 0), topo.ep(1, 0).ip, 10).expect("traffic after the loader is gone");

    // A TCP stream from node 0's endpoint to node 1's, running throughout.
    let listener = tcp_listen(topo.ep(1, 0), 9000).unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let received = received.clone();
        std::thread::spawn(move || -> anyhow::Result<()> {
            let (mut s, _) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut buf = vec![0u8; 65536];
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    let mut client = tcp_connect(
        topo.ep(0, 0),
        topo.ep(1, 0).ip,
        9000,
        Duration::from_secs(5),
    )
    .unwrap();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || -> anyhow::Result<u64> {
            client.set_write_timeout(Some(Duration::from_secs(10)))?;
            let chunk = vec![0x5au8; 16384];
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                client.write_all(&chunk)?;
                sent += chunk.len() as u64;
            }
            client.shutdown(std::net::Shutdown::Write)?;
            Ok(sent)
        })
    };
    wait_for_progress(&received, "before reload");

    let links_before: Vec<_> = topo
        .nodes
        .iter()
        .map(|n| link_prog_ids(n.pin_dir.path()))
        .collect();
    for round in 0..3 {
        for node in &topo.nodes {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshd-dp"))
                .args(["reload", "--pin-dir"])
                .arg(node.pin_dir.path())
                .output()
                .expect("running meshd-dp reload");
            assert!(
                out.status.success(),
                "reload round {round} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("replaced the programs of 2 link(s)")
            );
        }
        wait_for_progress(&received, "after a reload");
    }
    let links_after: Vec<_> = topo
        .nodes
        .iter()
        .map(|n| link_prog_ids(n.pin_dir.path()))
        .collect();
    for (before, after) in links_before.iter().zip(&links_after) {
        assert_eq!(before.len(), 2);
        for ((name_b, prog_b), (name_a, prog_a)) in before.iter().zip(after) {
            assert_eq!(name_b, name_a);
            assert_ne!(prog_b, prog_a, "link {name_b} still runs the first program");
        }
    }

    stop.store(true, Ordering::Relaxed);
    let sent = writer
        .join()
        .expect("writer")
        .expect("stream broke during reload");
    reader
        .join()
        .expect("reader")
        .expect("stream broke during reload");
    assert_eq!(received.load(Ordering::Relaxed), sent, "bytes lost");
    topo.assert_no_drops();
}

fn wait_for_progress(received: &AtomicU64, what: &str) {
    let start = received.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while received.load(Ordering::Relaxed) < start + 1_000_000 {
        assert!(Instant::now() < deadline, "stream stalled {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (pin name, program id) of every pinned link, via bpftool.
fn link_prog_ids(pin_dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(pin_dir.join("links"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for path in names {
        let json = std::process::Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(&path)
            .output()
            .expect("bpftool");
        let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("bpftool json");
        out.push((
            path.file_name().unwrap().to_string_lossy().into_owned(),
            v["prog_id"].as_u64().expect("prog_id"),
        ));
    }
    out
}
