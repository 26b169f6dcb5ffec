//! `meshd lab up --etcd-members 3`: every cluster's etcd on three members, listed by `lab
//! status -o json`; with one member of each cluster killed, an endpoint added in c1 still
//! reaches c2's nodes and the connectivity check passes. Own prefix, underlay and run dir.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn prerequisites() -> bool {
    meshd_testing::require_root()
        && meshd_testing::require_etcd()
        && meshd_testing::require_bpffs()
        && meshd_testing::require_workspace_bins(&["meshd", "clustermesh-apiserver"])
}

fn meshd(args: &[&str]) -> Output {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    Command::new(meshd_testing::workspace_bin("meshd"))
        .args(args)
        .current_dir(repo)
        .output()
        .expect("running meshd")
}

fn ok(args: &[&str]) -> String {
    let out = meshd(args);
    assert!(
        out.status.success(),
        "meshd {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Takes the lab down however the test ends.
struct Down<'a>(&'a str);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = meshd(&["lab", "down", "--run-dir", self.0]);
    }
}

#[test]
fn three_member_etcds_are_listed_and_survive_a_dead_member() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("lab");
    let run = run_dir.to_str().unwrap();
    let _down = Down(run);
    let up = ok(&[
        "lab",
        "up",
        "--prefix",
        "mlm3",
        "--underlay",
        "10.86.0.0/24",
        "--etcd-members",
        "3",
        "--run-dir",
        run,
    ]);
    assert!(up.contains(" 0 failed"), "{up}");

    let doc: serde_json::Value =
        serde_json::from_str(&ok(&["lab", "status", "--run-dir", run, "-o", "json"])).unwrap();
    let clusters = doc["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 2);
    let mut first_members = Vec::new();
    for c in clusters {
        let endpoints: Vec<&str> = c["etcd"]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        let members = c["etcd"]["members"].as_array().unwrap();
        assert_eq!(endpoints.len(), 3, "{c}");
        assert_eq!(members.len(), 3, "{c}");
        for (m, e) in members.iter().zip(&endpoints) {
            assert_eq!(m["endpoint"].as_str(), Some(*e), "{c}");
            let pid = m["pid"].as_u64().unwrap();
            assert!(Path::new(&format!("/proc/{pid}")).exists(), "{m}");
        }
        let mut distinct = endpoints.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "{endpoints:?}");
        first_members.push(members[0]["pid"].as_u64().unwrap().to_string());
    }

    // The first member is the one every client tries first: kill it in every cluster.
    for pid in first_members {
        let killed = Command::new("kill").args(["-KILL", &pid]).status().unwrap();
        assert!(killed.success(), "kill -KILL {pid}");
    }
    let socket = |cluster: &str, node: &str| -> String {
        let c = clusters.iter().find(|c| c["name"] == cluster).unwrap();
        let n = c["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == node)
            .unwrap();
        n["api_socket"].as_str().unwrap().to_owned()
    };
    let c2_sees_c1_endpoints = || -> u64 {
        let out = meshd(&["status", "-o", "json", "--socket", &socket("c2", "n1")]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        s["clusters"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == "c1"))
            .and_then(|c| c["endpoints"].as_u64())
            .unwrap_or(0)
    };
    let before = c2_sees_c1_endpoints();
    assert!(before > 0, "c2 sees no endpoint of c1");
    ok(&[
        "endpoint",
        "add",
        "after-kill",
        "--labels",
        "app=late",
        "--socket",
        &socket("c1", "n1"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(90);
    while c2_sees_c1_endpoints() != before + 1 {
        assert!(
            Instant::now() < deadline,
            "c2 never saw the endpoint added in c1 after the kill ({} endpoints, {before} before)",
            c2_sees_c1_endpoints()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let check = ok(&["lab", "check", "--run-dir", run]);
    assert!(check.contains(" 0 failed"), "{check}");

    // `lab down` also removes what was added by hand (the endpoint above).
    ok(&["lab", "down", "--run-dir", run]);
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("mlm3-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
