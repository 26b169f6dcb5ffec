//! Real etcd server processes for tests.
//!
//! Each [`Etcd`] runs `/usr/bin/etcd` (Debian's etcd-server, v3.4) on free loopback ports with a
//! temporary data directory, optionally with TLS and client-certificate auth. It can be stopped,
//! killed, paused, restarted on the same data dir and port, and compacted, which is what the
//! kvstore and agent tests need to reproduce etcd's real failure modes. Several of them form a
//! replicated cluster in [`crate::etcd_cluster`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meshd_topology::etcd::{EtcdMember, EtcdServerTls, READY_LINES};

/// TLS settings of the client listener.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    /// CA that signs both the server certificate and the accepted client certificates.
    pub ca: PathBuf,
    /// Server certificate (must carry IP SAN 127.0.0.1 and serverAuth).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `--client-cert-auth`: require a client certificate signed by `ca`; its CN is the etcd user.
    pub client_cert_auth: bool,
    /// Client certificate and key `etcdctl` uses for harness operations (compact, revision).
    /// Needed when `client_cert_auth` is on; with auth enabled it should be the root user's.
    pub etcdctl_client: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    pub tls: Option<EtcdTls>,
    /// Extra command-line flags for etcd (e.g. `--auto-compaction-retention`).
    pub extra_args: Vec<String>,
}

/// A running (or stopped) etcd server owned by a test. Killed on drop.
pub struct Etcd {
    opts: EtcdOptions,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    paused: bool,
    /// `--name`, and this member's entry in `initial_cluster`.
    name: String,
    /// `--initial-cluster`: every member's `name=peer URL` (only read on the first start;
    /// a restart finds the membership in the data dir).
    initial_cluster: String,
    /// `--initial-cluster-token`: unique per cluster, so members of two tests never join.
    cluster_token: String,
}

const START_DEADLINE: Duration = Duration::from_secs(30);

impl Etcd {
    /// Starts a plaintext etcd.
    pub fn start() -> anyhow::Result<Etcd> {
        Self::start_with(EtcdOptions::default())
    }

    pub fn start_with(opts: EtcdOptions) -> anyhow::Result<Etcd> {
        crate::which("etcd").context("etcd not found on PATH (apt-get install etcd-server)")?;
        let mut last_err = None;
        // Free ports can be taken by a parallel test between probing and binding: retry.
        for _ in 0..5 {
            let mut etcd = Etcd::unstarted(&opts, "test")?;
            etcd.initial_cluster =
                meshd_topology::etcd::initial_cluster([("test", etcd.peer_url().as_str())]);
            match etcd.spawn() {
                Ok(()) => return Ok(etcd),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    /// A member with fresh ports and data dir, not running yet; `initial_cluster` is left for
    /// the caller, who knows every member's peer URL.
    pub(crate) fn unstarted(opts: &EtcdOptions, name: &str) -> anyhow::Result<Etcd> {
        let prefix = match crate::run_tag()? {
            Some(tag) => format!("meshd-etcd-{tag}-"),
            None => "meshd-etcd-".to_owned(),
        };
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir()
            .context("creating etcd temp dir")?;
        let cluster_token = dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "meshd-test".into());
        Ok(Etcd {
            opts: opts.clone(),
            dir,
            client_port: crate::free_port(),
            peer_port: crate::free_port(),
            child: None,
            paused: false,
            name: name.to_owned(),
            initial_cluster: String::new(),
            cluster_token,
        })
    }

    /// Makes this member part of a cluster of `initial_cluster` (`name=peer URL,...`).
    pub(crate) fn join(&mut self, initial_cluster: &str, cluster_token: &str) {
        self.initial_cluster = initial_cluster.to_owned();
        self.cluster_token = cluster_token.to_owned();
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Peer URL (plaintext, loopback), e.g. `http://127.0.0.1:23800`.
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn scheme(&self) -> &'static str {
        if self.opts.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Client URL, e.g. `http://127.0.0.1:23790`.
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    pub fn client_url_port(&self) -> u16 {
        self.client_port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The server's log so far (for test failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Running and not frozen: it answers requests.
    pub fn is_live(&self) -> bool {
        self.child.is_some() && !self.paused
    }

    /// This member as the lab launches its etcd too (same flags).
    fn member(&self) -> EtcdMember {
        EtcdMember {
            name: self.name.clone(),
            data_dir: self.data_dir(),
            client_url: self.endpoint(),
            peer_url: self.peer_url(),
            initial_cluster: self.initial_cluster.clone(),
            cluster_token: self.cluster_token.clone(),
            tls: self.opts.tls.as_ref().map(|tls| EtcdServerTls {
                ca: tls.ca.clone(),
                cert: tls.cert.clone(),
                key: tls.key.clone(),
                client_cert_auth: tls.client_cert_auth,
            }),
            extra_args: self.opts.extra_args.clone(),
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let offset = self.launch()?;
        self.wait_ready(offset)
    }

    /// Starts the process without waiting; returns where its log of this start begins. A
    /// member of a replicated cluster is only ready once a quorum runs, so a cluster launches
    /// every member before it waits for any.
    pub(crate) fn launch(&mut self) -> anyhow::Result<u64> {
        let log_path = self.log_path();
        // Each start appends to the same log; remember where this start begins.
        let log_offset = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = self.member().command(None);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().context("dup etcd log fd")?)
            .stderr(log);
        let child = cmd.spawn().context("spawning etcd")?;
        self.child = Some(child);
        self.paused = false;
        Ok(log_offset)
    }

    /// Waits until the start that logs from `log_offset` serves clients.
    pub(crate) fn wait_ready(&mut self, log_offset: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "etcd {} exited during start-up ({status}); log:\n{}",
                    self.name,
                    tail(&self.log_since(log_offset), 30)
                );
            }
            let log = self.log_since(log_offset);
            if READY_LINES.iter().any(|l| log.contains(l)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                bail!(
                    "etcd {} not ready within {START_DEADLINE:?}; log:\n{}",
                    self.name,
                    tail(&self.log_since(log_offset), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_since(&self, offset: u64) -> String {
        let log = fs::read(self.log_path()).unwrap_or_default();
        String::from_utf8_lossy(log.get(offset as usize..).unwrap_or_default()).into_owned()
    }

    /// Graceful stop (SIGTERM, then wait). The data dir is kept for [`Etcd::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused {
                signal(child.id(), "CONT");
            }
            signal(child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Crash stop (SIGKILL). The data dir is kept.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the process (SIGSTOP): connections stay open but nothing answers, like a
    /// partition. [`Etcd::resume`] undoes it.
    pub fn pause(&mut self) {
        if let Some(child) = &self.child {
            signal(child.id(), "STOP");
            self.paused = true;
        }
    }

    pub fn resume(&mut self) {
        if let Some(child) = &self.child {
            signal(child.id(), "CONT");
            self.paused = false;
        }
    }

    /// Starts again on the same data dir and port (stops first if running).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        relaunch(|| self.spawn())
    }

    /// Restarts on the same data dir and port with other extra flags (what an operator does
    /// to raise the space quota, say).
    pub fn restart_with_args(&mut self, extra_args: Vec<String>) -> anyhow::Result<()> {
        self.opts.extra_args = extra_args;
        self.restart()
    }

    /// Runs `etcdctl` against this server (with the harness client certificate under TLS).
    pub fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        etcdctl(&self.opts, &self.endpoint(), args)
    }

    /// The server's current revision.
    pub fn revision(&self) -> anyhow::Result<i64> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"])?;
        scan_number(&out, "revision")?
            .parse()
            .with_context(|| format!("bad revision in etcdctl output: {out}"))
    }

    /// This member's id and the id of the leader it follows (decimal, as etcdctl prints them).
    pub fn member_and_leader(&self) -> anyhow::Result<(String, String)> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"])?;
        Ok((
            scan_number(&out, "member_id")?,
            scan_number(&out, "leader")?,
        ))
    }

    /// Compacts the history up to `revision` (physically, so old revisions are gone).
    pub fn compact(&self, revision: i64) -> anyhow::Result<()> {
        self.etcdctl(&["compact", &revision.to_string(), "--physical"])?;
        Ok(())
    }

    /// Compacts up to the current revision.
    pub fn compact_now(&self) -> anyhow::Result<i64> {
        let rev = self.revision()?;
        self.compact(rev)?;
        Ok(rev)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs `etcdctl` against `endpoints` (comma separated), with the harness client certificate
/// under TLS.
pub(crate) fn etcdctl(
    opts: &EtcdOptions,
    endpoints: &str,
    args: &[&str],
) -> anyhow::Result<String> {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoints)
        .arg("--command-timeout=10s");
    if let Some(tls) = &opts.tls {
        cmd.arg("--cacert").arg(&tls.ca);
        if let Some((cert, key)) = &tls.etcdctl_client {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
    }
    cmd.args(args);
    let out = cmd.output().context("running etcdctl")?;
    if !out.status.success() {
        bail!(
            "etcdctl {:?} failed ({}): {}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The first unsigned number after `"field":` in etcdctl's JSON. Member ids use all 64 bits,
/// more than a JSON parser that reads numbers as f64 keeps; a tiny scan also avoids a JSON
/// dependency in the harness.
fn scan_number(json: &str, field: &str) -> anyhow::Result<String> {
    let pat = format!("\"{field}\":");
    let at = json
        .find(&pat)
        .with_context(|| format!("no {field} in etcdctl output: {json}"))?;
    let digits: String = json[at + pat.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    anyhow::ensure!(!digits.is_empty(), "bad {field} in etcdctl output: {json}");
    Ok(digits)
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            if self.paused {
                signal(child.id(), "CONT");
            }
        }
        self.kill();
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts a stopped etcd again on the ports it had. They were just released by it, but a
/// parallel test may grab one in theory, so a failed start is retried a few times.
pub(crate) fn relaunch(mut launch: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..20 {
        match launch() {
            Ok(()) => return Ok(()),
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_restarts_and_compacts() {
        if !crate::require_etcd() {
            return;
        }
        let mut etcd = Etcd::start().unwrap();
        etcd.etcdctl(&["put", "meshd/a", "1"]).unwrap();
        etcd.etcdctl(&["put", "meshd/a", "2"]).unwrap();
        let rev = etcd.revision().unwrap();
        assert!(rev >= 3, "revision {rev}");
        etcd.restart().unwrap();
        let got = etcd
            .etcdctl(&["get", "meshd/a", "--print-value-only"])
            .unwrap();
        assert_eq!(got.trim(), "2", "data survives restart");
        etcd.compact(rev).unwrap();
        let err = etcd
            .etcdctl(&["get", "meshd/a", &format!("--rev={}", rev - 1)])
            .unwrap_err();
        assert!(err.to_string().contains("compacted"), "{err}");
    }

    #[test]
    fn stop_makes_it_unreachable() {
        if !crate::require_etcd() {
            return;
        }
        let mut etcd = Etcd::start().unwrap();
        etcd.stop();
        assert!(!etcd.is_running());
        assert!(etcd.etcdctl(&["get", "x", "--dial-timeout=1s"]).is_err());
    }
}
