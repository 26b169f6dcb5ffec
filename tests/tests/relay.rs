//! The harness's etcd relay ([`meshd_e2e::proxy::Proxy`]) behaves like the etcd behind it:
//! connections are refused while that etcd is down (not accepted and then closed, which an
//! agent sees as a different failure), and relayed again once it is back.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use meshd_e2e::netns_io;
use meshd_e2e::proxy::Proxy;
use meshd_e2e::wait_for;
use meshd_testing::etcd::Etcd;
use meshd_testing::netns::Netns;

const WAIT: Duration = Duration::from_secs(30);

/// Connects from `ns`; `Ok(true)` when the connection was refused.
fn refused(ns: &Netns, addr: SocketAddr) -> anyhow::Result<bool> {
    match netns_io::connect(&ns.path(), addr, Duration::from_secs(2)) {
        Ok(_) => Ok(false),
        Err(e) => match e.downcast_ref::<std::io::Error>() {
            Some(io) if io.kind() == ErrorKind::ConnectionRefused => Ok(true),
            _ => Err(e),
        },
    }
}

#[test]
fn the_relay_refuses_while_its_etcd_is_down() -> anyhow::Result<()> {
    if !(meshd_testing::require_root() && meshd_testing::require_etcd()) {
        return Ok(());
    }
    let ns = Netns::new("meshd-relay")?;
    let mut etcd = Etcd::start()?;
    let listen = SocketAddr::from(([127, 0, 0, 1], meshd_testing::free_port()));
    let proxy = Proxy::start(
        &ns.path(),
        listen,
        SocketAddr::from(([127, 0, 0, 1], etcd.client_url_port())),
    )?;
    assert!(!refused(&ns, proxy.addr())?, "refused while etcd runs");

    etcd.stop();
    wait_for("the relay refuses", WAIT, || {
        anyhow::ensure!(refused(&ns, proxy.addr())?, "accepted");
        Ok(())
    })?;
    // Refused for as long as etcd is down, not only once.
    for _ in 0..5 {
        assert!(refused(&ns, proxy.addr())?, "accepted while etcd is down");
        std::thread::sleep(Duration::from_millis(100));
    }

    etcd.restart()?;
    wait_for("the relay accepts again", WAIT, || {
        anyhow::ensure!(!refused(&ns, proxy.addr())?, "refused");
        Ok(())
    })?;
    // And relays: an HTTP request through it reaches etcd.
    let mut conn = netns_io::connect(&ns.path(), proxy.addr(), Duration::from_secs(5))?;
    use std::io::{Read, Write};
    conn.write_all(b"GET /version HTTP/1.0\r\n\r\n")?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    assert!(reply.contains("etcdserver"), "{reply}");
    Ok(())
}
