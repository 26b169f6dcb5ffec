//! End-to-end test harness: a multi-cluster mesh on one machine, as DESIGN.md's "Test
//! topology" describes it, with real processes and a real kernel datapath.
//!
//! - [`affinity`]: processes and threads pinned to CPUs (a node measured on a core of its own);
//! - [`pki`]: a mesh CA and each cluster's etcd server, admin and remote certificates;
//! - [`netns_io`]: sockets opened inside a network namespace (a socket keeps the namespace it
//!   was created in, so tests talk from endpoints without spawning processes);
//! - [`proxy`]: a TCP relay from the underlay to an etcd on the host's loopback;
//! - [`sim`]: remote state written as publishers write it (simulated clusters, bulk entries);
//! - [`bench`]: the benchmarks' arguments and sample summaries;
//! - [`flood`]: a flooding cluster's writes and a probe of another cluster's propagation;
//! - [`mesh`]: clusters (etcd with TLS, client-certificate auth and RBAC), nodes (namespaces on
//!   one underlay bridge, each running the built `meshd agent`), endpoints, and the checks the
//!   tests make (ping, TCP, the pinned maps, `meshd status`).
//!
//! Everything is named uniquely per test and torn down on drop.

pub mod affinity;
pub mod bench;
pub mod capture;
pub mod exposition;
pub mod flood;
pub mod mesh;
pub mod netns_io;
pub mod pki;
pub mod proxy;
pub mod sim;
pub use meshd_testing::trials;

use std::time::{Duration, Instant};

/// Polls `f` until it returns `Ok`, or fails with its last error after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{what}: not true within {timeout:?}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
