//! Namespaces, links, addresses, routes and neighbours made through netlink, checked with
//! iproute2's own view of them. Needs root; under CI=true its absence is a failure.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use ipnet::Ipv4Net;
use meshd_netlink::{netns, with_netlink, NetlinkError, Route};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

/// Root and iproute2 (to look at the result); a skip only outside CI.
fn prerequisites() -> bool {
    let ok = is_root() && Command::new("ip").arg("-V").output().is_ok();
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("prerequisite missing under CI=true: root and iproute2");
        }
        eprintln!("SKIPPED: needs root and iproute2");
    }
    ok
}

/// A namespace removed on drop, named uniquely for this test process.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!(
            "mnl{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        netns::create(&name).unwrap();
        Ns(name)
    }

    fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new("ip")
            .args(["-j", "-n", &self.0])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        netns::kill_processes(&self.0);
        let _ = netns::delete(&self.0);
    }
}

#[test]
fn namespaces_are_made_once_seen_by_iproute2_and_removed() {
    if !prerequisites() {
        return;
    }
    let ns = Ns::new("a");
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&ns.0));
    let lo = &ns.ip_json(&["link", "show", "lo"])[0];
    assert!(
        lo["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "{lo}"
    );
    assert!(matches!(
        netns::create(&ns.0),
        Err(NetlinkError::NetnsExists { .. })
    ));
    netns::delete(&ns.0).unwrap();
    assert!(!netns::exists(&ns.0));
    netns::delete(&ns.0).unwrap();
}

#[test]
fn a_veth_into_another_namespace_with_addresses_routes_and_a_neighbour() {
    if !prerequisites() {
        return;
    }
    let node = Ns::new("n");
    let ep = Ns::new("e");
    let gw = Ipv4Addr::new(169, 254, 1, 1);
    let host = with_netlink(Some(&node.0), |nl| {
        nl.add_veth("hostv", "eth0", Some(&ep.0), Some(1450))?;
        nl.set_no_ipv6_addrgen("hostv")?;
        nl.set_up("hostv")?;
        nl.add_route(
            &Route {
                destination: "10.9.0.2/32".parse().unwrap(),
                dev: "hostv",
                gateway: None,
                link_scope: true,
            },
            true,
        )?;
        Ok(nl.link("hostv")?.unwrap())
    })
    .unwrap();
    assert_eq!(host.mtu, 1450);
    let inside = with_netlink(Some(&ep.0), |nl| {
        nl.set_no_ipv6_addrgen("eth0")?;
        nl.add_address("eth0", "10.9.0.2/32".parse().unwrap())?;
        nl.set_up("eth0")?;
        nl.add_route(
            &Route {
                destination: Ipv4Net::from(gw),
                dev: "eth0",
                gateway: None,
                link_scope: true,
            },
            false,
        )?;
        nl.add_route(
            &Route {
                destination: Ipv4Net::default(),
                dev: "eth0",
                gateway: Some(gw),
                link_scope: false,
            },
            false,
        )?;
        nl.replace_permanent_neighbour("eth0", gw, host.mac)?;
        // Twice: a replace is idempotent.
        nl.replace_permanent_neighbour("eth0", gw, host.mac)?;
        Ok(nl.link("eth0")?.unwrap())
    })
    .unwrap();
    assert_eq!(inside.mtu, 1450);
    assert_ne!(inside.mac, host.mac);

    let addrs = ep.ip_json(&["addr", "show", "dev", "eth0"]);
    let infos: Vec<String> = addrs[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    // addrgenmode none: the IPv4 address only, no IPv6 link-local one.
    assert_eq!(infos, vec!["10.9.0.2/32".to_string()], "{addrs}");
    let routes = ep.ip_json(&["route", "show"]);
    let default = routes
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["dst"] == "default")
        .unwrap_or_else(|| panic!("no default route: {routes}"));
    assert_eq!(default["gateway"], gw.to_string());
    assert_eq!(default["dev"], "eth0");
    let neigh = ep.ip_json(&["neigh", "show", "dev", "eth0"]);
    let entry = &neigh[0];
    assert_eq!(entry["dst"], gw.to_string(), "{neigh}");
    assert_eq!(
        entry["lladdr"],
        host.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    );
    assert!(entry["state"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s == "PERMANENT"));
    let node_routes = node.ip_json(&["route", "show", "10.9.0.2/32"]);
    assert_eq!(node_routes[0]["scope"], "link", "{node_routes}");

    // A missing link is named, with its namespace, and deleting the host side removes both.
    let err = with_netlink(Some(&node.0), |nl| nl.set_up("nosuch0")).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("nosuch0") && text.contains(&node.0), "{text}");
    with_netlink(Some(&node.0), |nl| nl.delete_link("hostv")).unwrap();
    assert!(with_netlink(Some(&ep.0), |nl| nl.link("eth0"))
        .unwrap()
        .is_none());
}

#[test]
fn a_vxlan_device_in_external_mode_on_its_port() {
    if !prerequisites() {
        return;
    }
    let node = Ns::new("v");
    with_netlink(Some(&node.0), |nl| {
        nl.add_vxlan_external("vx0", 8472)?;
        nl.set_no_ipv6_addrgen("vx0")?;
        nl.set_up("vx0")
    })
    .unwrap();
    let link = &node.ip_json(&["-d", "link", "show", "vx0"])[0];
    let data = &link["linkinfo"]["info_data"];
    assert_eq!(link["linkinfo"]["info_kind"], "vxlan", "{link}");
    assert_eq!(data["port"], 8472, "{link}");
    assert_eq!(data["external"], true, "{link}");
    assert_eq!(data["learning"], false, "{link}");
}
