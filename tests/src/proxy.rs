//! A TCP relay that listens inside a network namespace (the underlay bridge's) and forwards to
//! an address of the test process's own namespace (an etcd on 127.0.0.1). Nodes reach their
//! etcd over the underlay as they would in a real cluster, while the etcd itself stays a
//! `meshd_testing::etcd::Etcd` that tests can stop, kill and restart.
//!
//! The relay listens only while its target does: when the etcd is down (no listening socket on
//! its port), the relay closes its own listener, so new connections are refused (RST) exactly
//! as a stopped etcd refuses them, rather than accepted and then closed; connections already
//! relayed end with the etcd's. A frozen (SIGSTOPped) etcd keeps its socket, so the relay keeps
//! accepting and the connections hang, like a partition. The target is watched through
//! `/proc/net/tcp` every [`POLL`] rather than by connecting, which would fill the etcd's log
//! with failed handshakes; a connection made in the moment between the etcd's death and the
//! next poll is still accepted and closed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::netns_io;

/// How often the relay checks whether its target listens.
pub const POLL: Duration = Duration::from_millis(50);

/// What a relay's threads are named, followed by the port it listens on.
pub const RELAY_THREAD: &str = "relay-";

/// Runs until dropped.
pub struct Proxy {
    runtime: Option<tokio::runtime::Runtime>,
    listen: SocketAddr,
}

impl Proxy {
    pub fn start(netns: &Path, listen: SocketAddr, target: SocketAddr) -> anyhow::Result<Proxy> {
        // Bound once here so that a bad address or a taken port fails the start.
        let first = netns_io::listen(netns, listen)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            // Told apart by its port (a benchmark pins each cluster's relay to a CPU).
            .thread_name(format!("{RELAY_THREAD}{}", listen.port()))
            .enable_all()
            .build()
            .context("proxy runtime")?;
        runtime.spawn(supervise(netns.to_owned(), listen, target, first));
        Ok(Proxy {
            runtime: Some(runtime),
            listen,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.listen
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Listens while the target listens, and not otherwise.
async fn supervise(
    netns: PathBuf,
    listen: SocketAddr,
    target: SocketAddr,
    first: std::net::TcpListener,
) {
    let mut first = Some(first);
    let mut serving: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let up = target_listens(target);
        if up && serving.is_none() {
            let listener = match first.take() {
                Some(l) => Ok(l),
                // std listeners set SO_REUSEADDR, so the port is free again at once.
                None => netns_io::listen(&netns, listen),
            };
            let listener = listener.and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(tokio::net::TcpListener::from_std(l)?)
            });
            if let Ok(listener) = listener {
                serving = Some(tokio::spawn(relay(listener, target)));
            }
        } else if !up {
            // Dropping the listener (with the task that owns it) makes the kernel refuse.
            if let Some(task) = serving.take() {
                task.abort();
                let _ = task.await;
            }
            first = None;
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn relay(listener: tokio::net::TcpListener, target: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                return; // the etcd died since the last poll: close the client
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}

/// True when a socket of this thread's namespace listens on `target` (or on the wildcard
/// address with its port), as `/proc/thread-self/net/tcp` lists it.
fn target_listens(target: SocketAddr) -> bool {
    let SocketAddr::V4(target) = target else {
        return true; // only IPv4 targets are watched; others are always relayed
    };
    let Ok(table) = std::fs::read_to_string("/proc/thread-self/net/tcp") else {
        return true;
    };
    // Lines: "sl local_address rem_address st ...", addresses as hex IP:port, the IP in the
    // kernel's (little-endian) byte order; state 0A is LISTEN.
    let want_port = format!("{:04X}", target.port());
    let want_ip = format!("{:08X}", u32::from_le_bytes(target.ip().octets()));
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        let (Some(local), Some(_remote), Some(state)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        let Some((ip, port)) = local.split_once(':') else {
            return false;
        };
        state == "0A" && port == want_port && (ip == want_ip || ip == "00000000")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_is_seen_and_a_closed_one_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(target_listens(addr));
        drop(l);
        assert!(!target_listens(addr));
    }
}
