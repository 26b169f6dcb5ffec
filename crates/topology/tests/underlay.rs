//! The builder for real: hosts on one underlay reach each other and the bridge, a name that
//! exists is refused, and teardown (or drop) leaves nothing behind. Needs root.

use std::process::Command;

use meshd_topology::{netns, HostSpec, Topology, TopologyError, UnderlaySpec};

fn prerequisites() -> bool {
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    });
    let ok = root && Command::new("ping").arg("-V").output().is_ok();
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("prerequisite missing under CI=true: root and ping");
        }
        eprintln!("SKIPPED: needs root and ping");
    }
    ok
}

fn ping(from: &str, to: &str) -> bool {
    Command::new("nsenter")
        .arg(format!("--net={}", netns::path(from).display()))
        .args(["--", "ping", "-c1", "-W2", to])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn hosts_reach_each_other_and_the_bridge_and_teardown_removes_everything() {
    if !prerequisites() {
        return;
    }
    let tag = format!("mtp{}", std::process::id());
    let ul = format!("{tag}-ul");
    let (a, b) = (format!("{tag}-a"), format!("{tag}-b"));
    let mut topo = Topology::create(UnderlaySpec {
        netns: ul.clone(),
        bridge_address: Some("10.231.0.254/24".parse().unwrap()),
        mtu: 1400,
    })
    .unwrap();
    for (name, port, addr) in [(&a, "pa", "10.231.0.1/24"), (&b, "pb", "10.231.0.2/24")] {
        topo.add_host(&HostSpec {
            netns: name.clone(),
            bridge_port: port.into(),
            address: addr.parse().unwrap(),
        })
        .unwrap();
    }
    assert_eq!(topo.namespaces(), [ul.clone(), a.clone(), b.clone()]);
    assert!(ping(&a, "10.231.0.2"), "host to host");
    assert!(ping(&b, "10.231.0.254"), "host to bridge");

    let again = topo.add_host(&HostSpec {
        netns: a.clone(),
        bridge_port: "pc".into(),
        address: "10.231.0.3/24".parse().unwrap(),
    });
    let err = again.unwrap_err();
    assert!(matches!(err, TopologyError::Netlink(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("network namespace {a} already exists")
    );
    // The refused name is not the topology's: it stays listed once.
    assert_eq!(topo.namespaces().len(), 3);

    // A process inside does not keep a namespace alive.
    let sleeper = Command::new("nsenter")
        .arg(format!("--net={}", netns::path(&b).display()))
        .args(["--", "sleep", "60"])
        .spawn()
        .unwrap();
    topo.teardown().unwrap();
    for ns in [&ul, &a, &b] {
        assert!(!netns::exists(ns), "{ns} left behind");
    }
    let mut sleeper = sleeper;
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "the process inside was killed");
}

#[test]
fn a_half_built_topology_is_removed_on_drop() {
    if !prerequisites() {
        return;
    }
    let tag = format!("mtq{}", std::process::id());
    let ul = format!("{tag}-ul");
    let host = format!("{tag}-h");
    {
        let mut topo = Topology::create(UnderlaySpec {
            netns: ul.clone(),
            bridge_address: None,
            mtu: 1500,
        })
        .unwrap();
        // A bridge port name longer than 15 bytes: the veth is refused after the host's
        // namespace was made.
        let err = topo
            .add_host(&HostSpec {
                netns: host.clone(),
                bridge_port: "a-much-too-long-port-name".into(),
                address: "10.232.0.1/24".parse().unwrap(),
            })
            .unwrap_err();
        assert!(err.to_string().contains(&host), "{err}");
        assert!(netns::exists(&host));
    }
    assert!(!netns::exists(&ul) && !netns::exists(&host));
}
