//! `meshd agent` configuration errors: every problem reported at once, each naming its field,
//! exit code 64, before anything is touched.

use std::process::Command;

#[test]
fn a_bad_config_is_reported_whole_with_exit_code_64() -> anyhow::Result<()> {
    let Ok(meshd) = meshd_e2e::mesh::meshd_binary() else {
        meshd_testing::require("the meshd binary (cargo build -p meshd)", false);
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        "cluster: Not_A_Name\ncluster_id: 0\nnode_ip: ::1\npod_cidr: 10.1.1.1/24\n\
         etcd:\n  endpoints: [ftp://x]\n  ca: /nonexistent/ca.pem\ntunnel_port: 0\n",
    )?;
    let out = Command::new(&meshd)
        .args(["agent", "--config"])
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for field in [
        "cluster:",
        "cluster_id:",
        "node:",
        "node_ip:",
        "pod_cidr:",
        "etcd.endpoints[0]:",
        "etcd.ca:",
        "etcd.cert:",
        "etcd.key:",
        "tunnel_port:",
    ] {
        assert!(stderr.contains(field), "{field} not reported in:\n{stderr}");
    }
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");

    // Flags override the file: with the missing and wrong fields given as flags only the
    // file's remaining problems are left.
    let out = Command::new(&meshd)
        .args(["agent", "--config"])
        .arg(&config)
        .args([
            "--cluster",
            "c1",
            "--cluster-id",
            "1",
            "--node",
            "n1",
            "--node-ip",
            "192.168.77.11",
            "--pod-cidr",
            "10.1.1.0/24",
            "--tunnel-port",
            "8472",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for gone in ["cluster:", "node:", "node_ip:", "pod_cidr:", "tunnel_port:"] {
        assert!(
            !stderr.contains(&format!("  {gone}")),
            "{gone} still reported:\n{stderr}"
        );
    }
    assert!(stderr.contains("etcd.endpoints[0]:"), "{stderr}");

    // An unreadable file is one clear problem, too.
    let out = Command::new(&meshd)
        .args(["agent", "--config", "/nonexistent/agent.yaml"])
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.yaml"));
    Ok(())
}

/// The egress fields (issue 12, "Bad input"): overlapping and malformed
/// `non_masquerade_cidrs`, an empty `snat_port_range`, and one overlapping the node's
/// ephemeral port range are each a problem naming the field, exit 64.
#[test]
fn bad_egress_settings_name_their_field_with_exit_code_64() -> anyhow::Result<()> {
    let Ok(meshd) = meshd_e2e::mesh::meshd_binary() else {
        meshd_testing::require("the meshd binary (cargo build -p meshd)", false);
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("agent.yaml");
    let write = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "cluster: c1\ncluster_id: 1\nnode: n1\nnode_ip: 192.168.77.11\npod_cidr: 10.1.1.0/24\n\
                 etcd:\n  endpoints: [https://127.0.0.1:2379]\n  ca: /nonexistent/ca.pem\n{extra}"
            ),
        )
    };
    let run = || -> anyhow::Result<(Option<i32>, String)> {
        let out = Command::new(&meshd)
            .args(["agent", "--config"])
            .arg(&config)
            .output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };

    write("non_masquerade_cidrs: [10.0.0.0/8, 10.9.0.0/16, 172.16.0.1/12, nonsense]\nsnat_port_range: 62000-61000\n")?;
    let (code, stderr) = run()?;
    assert_eq!(code, Some(64), "{stderr}");
    for field in [
        "non_masquerade_cidrs[1]:",
        "non_masquerade_cidrs[2]:",
        "non_masquerade_cidrs[3]:",
        "snat_port_range:",
    ] {
        assert!(stderr.contains(field), "{field} not reported in:\n{stderr}");
    }
    assert!(
        !stderr.contains("non_masquerade_cidrs[0]:"),
        "the first is fine:\n{stderr}"
    );

    // A range inside this machine's ephemeral range (the agent reads it where it runs).
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let low: u16 = ephemeral
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("ip_local_port_range");
    write(&format!("snat_port_range: {low}-{}\n", low + 7))?;
    let (code, stderr) = run()?;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("snat_port_range:") && stderr.contains("ip_local_port_range"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn native_routing_without_a_covering_native_routing_cidr_exits_64_naming_the_field(
) -> anyhow::Result<()> {
    let Ok(meshd) = meshd_e2e::mesh::meshd_binary() else {
        meshd_testing::require("the meshd binary (cargo build -p meshd)", false);
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        "cluster: c1\ncluster_id: 1\nnode: n1\nnode_ip: 192.168.77.11\npod_cidr: 10.1.1.0/24\n\
         etcd:\n  endpoints: [http://127.0.0.1:2379]\nrouting_mode: native\n",
    )?;
    for extra in [&[][..], &["--native-routing-cidr", "10.2.0.0/16"]] {
        let out = Command::new(&meshd)
            .args(["agent", "--config"])
            .arg(&config)
            .args(extra)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains("  native_routing_cidr: "), "{stderr}");
    }
    let out = Command::new(&meshd)
        .args(["agent", "--config"])
        .arg(&config)
        .args(["--routing-mode", "direct"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("  routing_mode: "), "{stderr}");
    Ok(())
}

#[test]
fn dsr_in_tunnel_mode_exits_64_naming_service_lb_mode_and_applies_nothing() -> anyhow::Result<()> {
    let Ok(meshd) = meshd_e2e::mesh::meshd_binary() else {
        meshd_testing::require("the meshd binary (cargo build -p meshd)", false);
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("agent.yaml");
    let (bpffs, state) = (dir.path().join("bpf"), dir.path().join("state"));
    std::fs::write(
        &config,
        format!(
            "cluster: c1\ncluster_id: 1\nnode: n1\nnode_ip: 192.168.77.11\npod_cidr: 10.1.1.0/24\n\
             etcd:\n  endpoints: [http://127.0.0.1:2379]\nbpffs_dir: {}\nstate_dir: {}\n",
            bpffs.display(),
            state.display()
        ),
    )?;
    // From the flag and from the file, for both modes that use DSR.
    let with_line = dir.path().join("agent-hybrid.yaml");
    std::fs::write(
        &with_line,
        format!(
            "{}service_lb_mode: hybrid\n",
            std::fs::read_to_string(&config)?
        ),
    )?;
    for (file, extra) in [
        (&config, &["--service-lb-mode", "dsr"][..]),
        (&with_line, &[][..]),
    ] {
        let out = Command::new(&meshd)
            .args(["agent", "--config"])
            .arg(file)
            .args(extra)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(
            stderr.contains("  service_lb_mode: ") && stderr.contains("routing_mode: native"),
            "{stderr}"
        );
    }
    assert!(
        !bpffs.exists() && !state.exists(),
        "nothing applied: no pin or state directory"
    );
    Ok(())
}
