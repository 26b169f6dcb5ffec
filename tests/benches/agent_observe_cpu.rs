//! Issue 16: what watching the agent costs it. One cluster of 2 nodes (release `meshd agent`),
//! a client endpoint on n1 opening and closing TCP connections to a server endpoint on n2 at a
//! steady rate (default 1,000/s); each node's agent CPU time (user + system) over a window,
//! alternately without observers and with a Prometheus-style scrape of both agents every second
//! and `meshd observe` attached to both. Medians over rounds; the figure is the agents' CPU with
//! observers against the same load without them, in the same run.
//!
//! Usage: cargo bench -p meshd-e2e --bench agent_observe_cpu -- [--rate N] [--secs S]
//! [--rounds K] (needs root, etcd, bpffs and the release `meshd` binary).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use meshd_e2e::bench::{arg, cpu_time, median};
use meshd_e2e::mesh::{Mesh, MeshOptions};
use meshd_e2e::netns_io::{in_netns, spawn_echo};

const PORT: u16 = 8080;
const METRICS_PORT: u16 = 9962;

/// Both agents' CPU time.
fn agents_cpu(mesh: &Mesh) -> anyhow::Result<Duration> {
    let mut total = Duration::ZERO;
    for n in ["n1", "n2"] {
        total += cpu_time(mesh.agent_pid("c1", n).context("agent pid")?)?;
    }
    Ok(total)
}

/// Opens and closes connections from `netns` to `to` at `rate` per second for `secs`; the
/// number made.
fn connections(
    netns: &std::path::Path,
    to: SocketAddr,
    rate: usize,
    secs: u64,
) -> anyhow::Result<usize> {
    in_netns(netns, || {
        let start = Instant::now();
        let mut made = 0usize;
        while start.elapsed() < Duration::from_secs(secs) {
            // Paced: connection k goes out at k / rate seconds.
            let due = Duration::from_secs_f64(made as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
            drop(std::net::TcpStream::connect_timeout(
                &to,
                Duration::from_secs(2),
            )?);
            made += 1;
        }
        Ok(made)
    })
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo test --benches` asks for a list of tests; there are none
    }
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let rate = arg("--rate", 1000);
    let secs = arg("--secs", 10) as u64;
    let rounds = arg("--rounds", 3);
    let mut opts = MeshOptions::clusters(1, 2);
    opts.metrics_port = Some(METRICS_PORT);
    let mesh = Mesh::start(opts)?;
    let client = mesh.add_endpoint("c1", "n1", "client", "app=client")?;
    let server = mesh.add_endpoint("c1", "n2", "server", "app=server")?;
    spawn_echo(&server.netns, PORT)?;
    // Tens of thousands of connections a minute from one address: the client's closed ones
    // wait in TIME_WAIT, so let new ones reuse them and use the whole port range.
    for key in [
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65000",
    ] {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", client.netns.display()))
            .args(["sysctl", "-qw", key])
            .output()?;
        anyhow::ensure!(out.status.success(), "sysctl {key}: {out:?}");
    }
    let to = SocketAddr::from((server.ip, PORT));
    connections(&client.netns, to, 50, 1)?;

    let (mut plain, mut watched) = (Vec::new(), Vec::new());
    let mut observed_lines = 0usize;
    for round in 0..rounds {
        for with_observers in [false, true] {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut streams = Vec::new();
            let mut scrapes = 0usize;
            std::thread::scope(|scope| -> anyhow::Result<()> {
                let scraper = with_observers.then(|| {
                    let stop = stop.clone();
                    let mesh = &mesh;
                    scope.spawn(move || {
                        let mut n = 0usize;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            for node in ["n1", "n2"] {
                                if mesh.metrics("c1", node).is_ok() {
                                    n += 1;
                                }
                            }
                            std::thread::sleep(Duration::from_secs(1));
                        }
                        n
                    })
                });
                if with_observers {
                    for node in ["n1", "n2"] {
                        streams.push(mesh.meshd_stream("c1", node, &["observe", "-o", "json"])?);
                    }
                }
                let before = agents_cpu(&mesh)?;
                let t0 = Instant::now();
                let made = connections(&client.netns, to, rate, secs)?;
                let cpu = agents_cpu(&mesh)? - before;
                let wall = t0.elapsed();
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                if let Some(s) = scraper {
                    scrapes = s.join().expect("scraper");
                }
                // CPU of both agents, per second of load, in ms.
                let per_sec = cpu.as_secs_f64() * 1e3 / wall.as_secs_f64();
                println!(
                    "round {round} {}: {made} connections in {:.1} s ({:.0}/s); both agents {per_sec:.1} ms CPU per s",
                    if with_observers { "with scrape + observe" } else { "without observers" },
                    wall.as_secs_f64(),
                    made as f64 / wall.as_secs_f64(),
                );
                if with_observers {
                    watched.push(per_sec);
                } else {
                    plain.push(per_sec);
                }
                Ok(())
            })?;
            for s in streams {
                observed_lines += s.finish().len();
            }
            if with_observers {
                println!("  scrapes answered {scrapes}");
            }
        }
    }
    let (p, w) = (median(plain), median(watched));
    println!(
        "agent CPU during {rate} new connections/s: without observers {p:.1} ms/s, with a scrape \
         of both agents every second and `meshd observe` on both {w:.1} ms/s ({:+.0}%); flows \
         observed {observed_lines} (median of {rounds} rounds)",
        (w / p.max(1e-9) - 1.0) * 100.0
    );
    Ok(())
}
