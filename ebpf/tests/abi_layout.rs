//! The Rust mirror (`src/abi.rs`) against the C header as clang laid it out: sizes and field
//! offsets of every struct, and the value of every constant, read from the BTF of the
//! compiled `abi_layout` object with `bpftool btf dump -j`.

use std::{collections::BTreeMap, process::Command};

use meshd_ebpf::abi;
use serde_json::Value;

fn btf_types() -> Option<Vec<Value>> {
    if !meshd_testing::require("bpftool", meshd_testing::have_binary("bpftool")) {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let obj = dir.path().join("abi_layout.bpf.o");
    std::fs::write(&obj, meshd_ebpf::ABI_LAYOUT).expect("write object");
    let out = Command::new("bpftool")
        .args(["-j", "btf", "dump", "file"])
        .arg(&obj)
        .output()
        .expect("running bpftool (installed by scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "bpftool btf dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    Some(json["types"].as_array().expect("types array").clone())
}

#[test]
fn every_struct_matches_the_c_layout() {
    let Some(types) = btf_types() else { return };
    let structs: BTreeMap<&str, &Value> = types
        .iter()
        .filter(|t| t["kind"] == "STRUCT")
        .filter_map(|t| Some((t["name"].as_str()?, t)))
        .collect();
    let layouts = abi::layouts();

    for layout in &layouts {
        let c = structs
            .get(layout.c_name)
            .unwrap_or_else(|| panic!("struct {} is not in the header's BTF", layout.c_name));
        assert_eq!(
            c["size"].as_u64().unwrap() as usize,
            layout.size,
            "size of struct {}",
            layout.c_name
        );
        let members: Vec<(&str, usize)> = c["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap(),
                    m["bits_offset"].as_u64().unwrap() as usize / 8,
                )
            })
            .collect();
        assert_eq!(
            members, layout.fields,
            "fields (name, byte offset) of struct {} in C vs Rust",
            layout.c_name
        );
    }

    // Every struct the header defines must be mirrored (the object declares only ABI types).
    let mirrored: Vec<&str> = layouts.iter().map(|l| l.c_name).collect();
    for name in structs.keys() {
        assert!(
            mirrored.contains(name),
            "struct {name} has no Rust mirror in src/abi.rs"
        );
    }
}

#[test]
fn every_constant_matches_the_c_enums() {
    let Some(types) = btf_types() else { return };
    let mut c_values = BTreeMap::new();
    for t in types.iter().filter(|t| t["kind"] == "ENUM") {
        for v in t["values"].as_array().unwrap() {
            let name = v["name"].as_str().unwrap().to_owned();
            // Depending on clang and bpftool versions a negative member prints as a negative
            // number, as its u32 or as its sign-extended u64: all enums here are 4 bytes, so
            // the low 32 bits read as i32 are the C value.
            let raw = v["val"]
                .as_i64()
                .or_else(|| v["val"].as_u64().map(|u| u as i64))
                .unwrap();
            assert_eq!(t["size"], 4, "enum {} is not 4 bytes", t["name"]);
            c_values.insert(name, i64::from(raw as u32 as i32));
        }
    }
    let rust_values: BTreeMap<String, i64> = abi::CONSTANTS
        .iter()
        .map(|(n, v)| ((*n).to_owned(), *v))
        .collect();
    assert_eq!(c_values, rust_values, "C enum constants vs abi::CONSTANTS");
}

#[test]
fn reason_codes_have_names_and_distinct_metric_slots() {
    let mut seen = std::collections::HashSet::new();
    for (name, value) in abi::CONSTANTS {
        if name.starts_with("MESHD_DROP_") || name.starts_with("MESHD_FWD_") {
            let code = *value as i32;
            assert_ne!(
                abi::reason_name(code),
                "unknown-reason",
                "{name} has no name"
            );
            assert!(
                seen.insert(abi::metrics_index(abi::DIR_EGRESS, code)),
                "{name} shares a slot"
            );
        }
    }
}

/// The one `#define` the Rust side mirrors (BTF keeps no macros): read from the header itself.
#[test]
fn service_loopback_address_matches_the_header() {
    let header = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/bpf/include/meshd_abi.h"
    ))
    .unwrap();
    let value = header
        .lines()
        .find_map(|l| l.strip_prefix("#define MESHD_SERVICE_LOOPBACK_ADDR "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|hex| hex.strip_prefix("0x"))
        .map(|hex| u32::from_str_radix(hex, 16).unwrap())
        .expect("#define MESHD_SERVICE_LOOPBACK_ADDR 0x... in meshd_abi.h");
    assert_eq!(std::net::Ipv4Addr::from(value), abi::SERVICE_LOOPBACK_ADDR);
}
