//! One etcd member's command line, shared by the lab (a daemon in a control-plane namespace)
//! and the test harness (a child process it owns): the same flags everywhere, so what the tests
//! run is what the lab runs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The TLS of the client listener.
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    /// CA that signs the server certificate and the accepted client certificates.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `--client-cert-auth`: a client certificate signed by `ca` is required; its CN is the
    /// etcd user.
    pub client_cert_auth: bool,
}

/// One member of an etcd cluster (a single server is a cluster of one).
#[derive(Debug, Clone)]
pub struct EtcdMember {
    /// `--name`, and this member's entry in `initial_cluster`.
    pub name: String,
    pub data_dir: PathBuf,
    /// Listened on and advertised (`https://` with [`EtcdMember::tls`]).
    pub client_url: String,
    pub peer_url: String,
    /// Every member's `name=peer URL`, comma separated (read on the first start only; a
    /// restart finds the membership in the data dir).
    pub initial_cluster: String,
    /// Unique per cluster, so members of two clusters never join each other.
    pub cluster_token: String,
    pub tls: Option<EtcdServerTls>,
    /// Further flags (e.g. `--auto-compaction-retention`).
    pub extra_args: Vec<String>,
}

/// What etcd 3.4 logs (zap logger) once its client listener accepts requests: "serving client
/// traffic insecurely" or "... securely". The capnslog wording is "ready to serve client
/// requests".
pub const READY_LINES: [&str; 2] = ["serving client traffic", "ready to serve client requests"];

/// The etcd binary, looked up on PATH (Debian's etcd-server).
pub const ETCD_PROGRAM: &str = "etcd";

impl EtcdMember {
    /// The member's flags. Logs go to stderr (zap), for the caller to redirect to a file.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--name",
            &self.name,
            "--data-dir",
            &self.data_dir.display().to_string(),
            "--listen-client-urls",
            &self.client_url,
            "--advertise-client-urls",
            &self.client_url,
            "--listen-peer-urls",
            &self.peer_url,
            "--initial-advertise-peer-urls",
            &self.peer_url,
            "--initial-cluster",
            &self.initial_cluster,
            "--initial-cluster-token",
            &self.cluster_token,
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--cert-file", &tls.cert),
                ("--key-file", &tls.key),
                ("--trusted-ca-file", &tls.ca),
            ] {
                args.push(flag.into());
                args.push(path.display().to_string());
            }
            if tls.client_cert_auth {
                args.push("--client-cert-auth".into());
            }
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// A `Command` that runs the member, inside the network namespace at `netns` when given
    /// (through `nsenter --net`, which keeps /sys/fs/bpf visible, unlike `ip netns exec`).
    /// The caller sets up its stdio, environment and process group.
    pub fn command(&self, netns: Option<&Path>) -> Command {
        match netns {
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(ETCD_PROGRAM)
                    .args(self.args());
                cmd
            }
            None => {
                let mut cmd = Command::new(ETCD_PROGRAM);
                cmd.args(self.args());
                cmd
            }
        }
    }
}

/// `name=peer URL,...` of every member, for [`EtcdMember::initial_cluster`].
pub fn initial_cluster<'a>(members: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    members
        .into_iter()
        .map(|(name, peer)| format!("{name}={peer}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_and_client_cert_auth_flags_follow_the_options() {
        let mut member = EtcdMember {
            name: "m0".into(),
            data_dir: "/tmp/d".into(),
            client_url: "https://127.0.0.1:2379".into(),
            peer_url: "http://127.0.0.1:2380".into(),
            initial_cluster: initial_cluster([("m0", "http://127.0.0.1:2380")]),
            cluster_token: "t".into(),
            tls: None,
            extra_args: vec!["--auto-compaction-retention".into(), "1".into()],
        };
        let plain = member.args();
        assert!(!plain.iter().any(|a| a.contains("cert")), "{plain:?}");
        assert_eq!(plain.last().map(String::as_str), Some("1"));
        let at = plain.iter().position(|a| a == "--initial-cluster").unwrap();
        assert_eq!(plain[at + 1], "m0=http://127.0.0.1:2380");
        member.tls = Some(EtcdServerTls {
            ca: "/c/ca.pem".into(),
            cert: "/c/server.pem".into(),
            key: "/c/server-key.pem".into(),
            client_cert_auth: true,
        });
        let tls = member.args();
        let at = tls.iter().position(|a| a == "--trusted-ca-file").unwrap();
        assert_eq!(tls[at + 1], "/c/ca.pem");
        assert!(tls.contains(&"--client-cert-auth".to_string()));
    }
}
