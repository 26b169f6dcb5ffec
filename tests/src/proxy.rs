//! A TCP relay that listens inside a network namespace (the underlay bridge's) and forwards to
//! an address of the test process's own namespace (an etcd on 127.0.0.1). Nodes reach their
//! etcd over the underlay as they would in a real cluster, while the etcd itself stays a
//! `meshd_testing::etcd::Etcd` that tests can stop, kill and restart: when it is down, new
//! connections are refused and open ones are closed, like a real outage.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;

use crate::netns_io;

/// Runs until dropped.
pub struct Proxy {
    runtime: Option<tokio::runtime::Runtime>,
    listen: SocketAddr,
}

impl Proxy {
    pub fn start(netns: &Path, listen: SocketAddr, target: SocketAddr) -> anyhow::Result<Proxy> {
        let std_listener = netns_io::listen(netns, listen)?;
        std_listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("proxy runtime")?;
        runtime.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(_) => return,
            };
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return; // dropping `inbound` refuses the client
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
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
