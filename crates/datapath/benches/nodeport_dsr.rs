//! External client -> NodePort -> backend on another node, DSR against SNAT (issue 14): TCP
//! request/response latency (netperf's TCP_RR: one connection, a 1-byte request and a 1-byte
//! answer at a time, TCP_NODELAY) for the external host. One topology, native routing (the
//! only mode with DSR): node 0 receives, the backend is behind node 1. Each run measures both
//! modes on fresh connections, switching node 0's `service_lb_mode` in between (a mode
//! applies to new connections' packets), in alternating order so drift in the machine's load
//! hits both alike. With SNAT the answer comes back through node 0; with DSR node 1 sends it
//! to the router itself, one node's forwarding fewer.
//!
//! `--cpu-latency-us U` holds the CPUs out of idle states slower to leave than U us while it
//! runs (`/dev/cpu_dma_latency`, as cyclictest does): on an otherwise idle VM the halted vCPUs'
//! wake-ups, paid alike by both modes, are most of a round trip and hide the hop DSR saves.
//!
//! `cargo bench -p meshd-datapath --bench nodeport_dsr -- [--runs N] [--seconds S]
//! [--cpu-latency-us U]` (root, bpffs).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::bench::{arg, hold_cpu_latency, load_average, median, spread};
use common::public::{expose_node_port, with_outside};
use meshd_datapath::{netns::run_in, ServiceLbMode};

const TCP: u8 = 6;
const PORT: u16 = 30300;
const MODES: [ServiceLbMode; 2] = [ServiceLbMode::Snat, ServiceLbMode::Dsr];

/// Answers every byte with one byte, a thread per connection, until the process exits.
fn spawn_rr_server(listener: TcpListener) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let _ = conn.set_nodelay(true);
                let mut b = [0u8; 1];
                while conn.read_exact(&mut b).is_ok() {
                    if conn.write_all(&b).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Mean round trip of `seconds` of 1-byte transactions on one connection, in microseconds.
fn rr_latency_us(mut conn: TcpStream, seconds: u32) -> anyhow::Result<f64> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut b = [1u8; 1];
    // A few to warm up (neighbour entries, the first packet's translation).
    for _ in 0..100 {
        conn.write_all(&b)?;
        conn.read_exact(&mut b)?;
    }
    let start = Instant::now();
    let until = Duration::from_secs(u64::from(seconds));
    let mut n = 0u64;
    while start.elapsed() < until {
        conn.write_all(&b)?;
        conn.read_exact(&mut b)?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / n as f64)
}

fn main() -> anyhow::Result<()> {
    if !common::can_run() {
        return Ok(());
    }
    let runs = arg("--runs", 7);
    let seconds = arg("--seconds", 3);
    let cpu_latency = std::env::args()
        .any(|a| a == "--cpu-latency-us")
        .then(|| arg("--cpu-latency-us", 0));
    let _idle_states_held = cpu_latency
        .map(|us| hold_cpu_latency(us.try_into().unwrap_or(i32::MAX)))
        .transpose()?;

    let (mut topo, outside) = with_outside("exd", &[1, 1], true, 1024..=29999)?;
    let node_ip = topo.nodes[0].node_ip;
    let backend = topo.ep(1, 0).ip;
    expose_node_port(&mut topo.nodes[0].maps, node_ip, PORT, TCP, (backend, PORT))?;
    let listener = run_in::<_, anyhow::Error, _>(&topo.ep(1, 0).netns.path(), move || {
        Ok(TcpListener::bind((backend, PORT))?)
    })?;
    spawn_rr_server(listener);
    let to = SocketAddr::from((node_ip, PORT));
    let host = outside.host.path();

    println!(
        "TCP_RR external host -> router -> node port -> backend on another node (native routing), {runs} runs x {seconds}s per mode; idle states {}; load average {}",
        cpu_latency.map_or("as the kernel chooses".to_owned(), |us| format!(
            "slower than {us} us to leave held off"
        )),
        load_average()
    );
    let mut latency = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    for run in 0..runs {
        let mut sample = [0f64; 2];
        // Alternate which mode goes first.
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            topo.nodes[0].maps.set_service_lb_mode(MODES[i])?;
            let conn = run_in::<_, anyhow::Error, _>(&host, move || {
                Ok(TcpStream::connect_timeout(&to, Duration::from_secs(5))?)
            })?;
            sample[i] = rr_latency_us(conn, seconds)?;
        }
        println!(
            "run {run}: snat {:.1} us, dsr {:.1} us = {:.3}x",
            sample[0],
            sample[1],
            sample[1] / sample[0]
        );
        latency[0].push(sample[0]);
        latency[1].push(sample[1]);
        ratios.push(sample[1] / sample[0]);
    }
    let spreads = [spread(&latency[0]), spread(&latency[1]), spread(&ratios)];
    let [snat, dsr] = latency.map(median);
    let ratio = median(ratios);
    println!(
        "TCP_RR mean round trip through the node port: snat {snat:.1} us [{}], dsr {dsr:.1} us [{}]; dsr/snat median {ratio:.3}x [{}]",
        spreads[0], spreads[1], spreads[2]
    );
    println!(
        "RESULT nodeport-dsr-tcp-rr snat_us={snat:.1} dsr_us={dsr:.1} ratio={ratio:.3}x goal<=0.9x (issue 14)"
    );
    println!("load average at the end: {}", load_average());
    for c in topo.nodes[0].maps.counters()? {
        anyhow::ensure!(c.reason > 0, "the entry node dropped packets: {c:?}");
    }
    Ok(())
}
