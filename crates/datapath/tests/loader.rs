//! Loading, pinning and attaching: what survives a reload and what a reload cleans up.

mod common;

use meshd_state::NumericIdentity;
use std::net::IpAddr;
use std::{net::Ipv4Addr, process::Command};

use aya::programs::{SchedClassifier, TcAttachType};
use common::can_run;
use meshd_datapath::{
    bpffs::{ScratchPinDir, DEFAULT_ROOT},
    loader::pinned_links,
    netns::run_in,
    AttachPoint, Datapath, DatapathError, DatapathMaps, IpcacheTarget, LoadOptions, LocalEndpoint,
};
use meshd_testing::netns::Netns;

fn scratch() -> ScratchPinDir {
    ScratchPinDir::new(std::path::Path::new(DEFAULT_ROOT), "meshd-ldtest").unwrap()
}

#[test]
fn maps_keep_their_contents_across_loads() {
    if !can_run() {
        return;
    }
    let dir = scratch();
    {
        let _datapath = Datapath::load(dir.path()).unwrap();
        let mut maps = DatapathMaps::open(dir.path()).unwrap();
        maps.upsert_ipcache(
            "10.7.0.0/16".parse().unwrap(),
            IpcacheTarget {
                identity: NumericIdentity::new((3 << 16) | 300).unwrap(),
                tunnel_endpoint: Some(IpAddr::from(Ipv4Addr::new(192, 168, 1, 9))),
                local: false,
            },
        )
        .unwrap();
        maps.upsert_endpoint(
            Ipv4Addr::new(10, 1, 0, 2),
            LocalEndpoint {
                ifindex: 5,
                identity: (1 << 16) | 1000,
                mac: [2, 0, 0, 0, 0, 2],
                node_mac: [2, 0, 0, 0, 0, 1],
            },
        )
        .unwrap();
        maps.bump_policy_revision().unwrap();
    }
    let _datapath = Datapath::load(dir.path()).unwrap();
    let maps = DatapathMaps::open(dir.path()).unwrap();
    assert_eq!(
        maps.ipcache_entry("10.7.0.0/16".parse().unwrap()).unwrap(),
        Some(IpcacheTarget {
            identity: NumericIdentity::new((3 << 16) | 300).unwrap(),
            tunnel_endpoint: Some(IpAddr::from(Ipv4Addr::new(192, 168, 1, 9))),
            local: false,
        })
    );
    assert_eq!(
        maps.endpoint_addrs().unwrap(),
        vec![Ipv4Addr::new(10, 1, 0, 2)]
    );
    assert_eq!(maps.policy_revision().unwrap(), 1);
}

#[test]
fn a_pinned_map_with_another_layout_is_refused_or_replaced() {
    if !can_run() || !meshd_testing::require("bpftool", meshd_testing::have_binary("bpftool")) {
        return;
    }
    let dir = scratch();
    std::fs::create_dir_all(dir.path().join("maps")).unwrap();
    let ct = dir.path().join("maps/CT");
    let status = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&ct)
        .args([
            "type", "lru_hash", "key", "16", "value", "16", "entries", "16", "name", "CT",
        ])
        .status()
        .unwrap();
    assert!(status.success());

    let err = Datapath::load(dir.path()).unwrap_err();
    assert!(
        matches!(err, DatapathError::IncompatibleMap { map: "CT", .. }),
        "unexpected: {err}"
    );
    assert!(err.to_string().contains("this build needs"), "{err}");

    Datapath::load_with(
        dir.path(),
        LoadOptions {
            replace_incompatible_maps: true,
            ..LoadOptions::default()
        },
    )
    .expect("load replacing the old CT");
    let info = aya::maps::MapInfo::from_pin(&ct).unwrap();
    assert_eq!(
        info.value_size() as usize,
        std::mem::size_of::<meshd_ebpf::abi::CtValue>()
    );
}

fn tcx_programs(ns: &Netns, ifname: &str) -> usize {
    run_in(&ns.path(), || -> anyhow::Result<usize> {
        let (_, programs) = SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)?;
        Ok(programs.len())
    })
    .unwrap()
}

#[test]
fn links_survive_the_loader_detach_on_request_and_stale_pins_are_cleaned() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("dpl").unwrap();
    for dev in ["lxca", "lxcb"] {
        ns.ip(&[
            "link",
            "add",
            dev,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{dev}p"),
        ])
        .unwrap();
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    let dir = scratch();
    {
        let mut datapath = Datapath::load(dir.path()).unwrap();
        run_in(&ns.path(), || -> meshd_datapath::Result<()> {
            datapath.attach_endpoint("lxca")?;
            datapath.attach_endpoint("lxcb")?;
            // Attaching again is idempotent: it replaces the program in the pinned link.
            datapath.attach_endpoint("lxca")
        })
        .unwrap();
    }
    // The loader is gone; the pins keep both programs attached, exactly once each.
    assert_eq!(tcx_programs(&ns, "lxca"), 1);
    assert_eq!(tcx_programs(&ns, "lxcb"), 1);

    let mut datapath = Datapath::load(dir.path()).unwrap();
    assert_eq!(datapath.replaced_at_load().len(), 2);
    datapath.detach_endpoint("lxcb").unwrap();
    assert_eq!(tcx_programs(&ns, "lxcb"), 0, "detach removes the program");
    assert_eq!(
        pinned_links(dir.path()).unwrap(),
        vec![(AttachPoint::Endpoint, "lxca".to_owned())]
    );

    // The endpoint goes away without a detach: the next load drops its stale pin.
    ns.ip(&["link", "del", "lxca"]).unwrap();
    drop(datapath);
    let datapath = Datapath::load(dir.path()).unwrap();
    assert!(datapath.replaced_at_load().is_empty());
    assert!(pinned_links(dir.path()).unwrap().is_empty());
}

/// The agent's map owner declares itself CONFIG's only writer and then bumps the forward
/// revision from the value it last wrote, without reading CONFIG back: what another reader
/// sees is every bump, with the settings written before it (by another instance) kept.
#[test]
fn the_config_owner_bumps_without_reading_back_and_keeps_the_settings() {
    if !can_run() {
        return;
    }
    let dir = scratch();
    let _datapath = Datapath::load(dir.path()).unwrap();
    let mut setup = DatapathMaps::open(dir.path()).unwrap();
    setup
        .set_config(meshd_datapath::NodeConfig {
            vxlan_ifindex: 7,
            node_ip: Ipv4Addr::new(192, 168, 1, 2),
            cluster_id: 3,
        })
        .unwrap();
    setup.set_native_routing(true).unwrap();
    let mut owner = DatapathMaps::open(dir.path()).unwrap();
    owner.own_config();
    let start = owner.forward_revision().unwrap();
    let policy = owner.policy_revision().unwrap();
    for i in 0..3u8 {
        owner.defer_forward_revision();
        owner
            .upsert_ipcache(
                format!("10.9.0.{i}/32").parse().unwrap(),
                IpcacheTarget {
                    identity: NumericIdentity::new((3 << 16) | 300).unwrap(),
                    tunnel_endpoint: Some(IpAddr::from(Ipv4Addr::new(192, 168, 1, 9))),
                    local: false,
                },
            )
            .unwrap();
        owner.flush_forward_revision().unwrap();
    }
    owner.bump_policy_revision().unwrap();
    let reader = DatapathMaps::open(dir.path()).unwrap();
    assert_eq!(reader.forward_revision().unwrap(), start.wrapping_add(3));
    assert_eq!(reader.policy_revision().unwrap(), policy.wrapping_add(1));
    assert!(reader.native_routing().unwrap());
}
