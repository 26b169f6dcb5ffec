//! Mutated packets through the attached programs under BPF_PROG_RUN (issue 17, item 3: the
//! datapath's packet parsers). The verifier already proves that no program reads out of
//! bounds; what it cannot prove is that a program answers every input sensibly and leaves its
//! maps consistent. So each trial takes a well-formed packet of one program's paths (local,
//! tunnelled, world-bound and masqueraded, host, replies to masqueraded flows, ICMP errors
//! quoting them, fragments, overlay arrivals), mutates it a few times (bits, bytes, lengths,
//! header fields, addresses and ports swapped for ones the maps know, truncation, trailing
//! junk) or leaves it intact, and checks:
//! - the verdict is one a tc program may give here (OK, SHOT or REDIRECT);
//! - a packet that came in with valid IPv4 and L4 checksums leaves with valid ones, whatever
//!   the program rewrote;
//! - after the run, every masquerade mapping is whole: node address, a port of the configured
//!   range, and a reverse half that leads back to it (or to another mapping that reused the
//!   same reply tuple once its connection ended).
//!
//! Not coverage-guided (libFuzzer cannot see inside a BPF program); seeded instead, so a
//! failure names the seed and the trial and replays: `MESHD_PACKET_SEED=S
//! MESHD_PACKET_TRIALS=N cargo test -p meshd-datapath --test prog_run_mutations`. CI runs the
//! default (a few seconds); long runs are recorded in RELIABILITY.md.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use common::{frames::*, mutations::*, world::*, *};
use meshd_datapath::NatMapping;
use meshd_ebpf::{abi, programs};
use meshd_testing::trials::{env_u64, Rng};

/// The range masqueraded flows take: wide enough that exhaustion is rare but reachable.
const NAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=61063;
/// A remote prefix behind NODE2 (cluster 2), so from_endpoint has a tunnelled path and
/// from_overlay a known sender.
const R: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 5);
const NODE2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const REMOTE: u32 = (2 << 16) | 600;
const VXLAN_IF: u32 = 0;

/// Addresses the maps know, which mutations put in packets so they reach the deep paths.
const KNOWN: [Ipv4Addr; 7] = [A, B, R, X, NODE, NODE2, GATEWAY];

/// Where a frame enters: the program, its ingress ifindex, and skb->cb (the overlay probe
/// takes the outer source and the VNI there).
#[derive(Clone, Copy, Debug)]
struct Entry {
    program: &'static str,
    ifindex: u32,
    cb: [u32; 5],
}

fn setup() -> Option<World> {
    let mut w = world(NAT_PORTS)?;
    let m = &mut w.dp.maps;
    add_remote_prefix(m, "10.2.0.0/24", REMOTE, NODE2, 2);
    Some(w)
}

/// Well-formed frames of every path, with the entry point each arrives at.
fn templates(w: &World) -> Vec<(Entry, Vec<u8>)> {
    let from_a = Entry {
        program: programs::FROM_ENDPOINT,
        ifindex: w.a_if,
        cb: [0; 5],
    };
    let from_b = Entry {
        ifindex: w.b_if,
        ..from_a
    };
    let uplink = Entry {
        program: programs::FROM_NETDEV,
        ifindex: w.up_if,
        cb: [0; 5],
    };
    let overlay = Entry {
        program: programs::FROM_OVERLAY_PROBE,
        ifindex: VXLAN_IF,
        cb: [abi::ip_to_be(NODE2), REMOTE, 0, 0, 0],
    };
    let echo = |s, d, id, reply| with_icmp_checksum(Packet::icmp_echo(s, d, id, reply).bytes());
    let masqueraded = Packet::udp(NODE, 61003, X, 53);
    vec![
        (from_a, tcp(A, 40000, B, 8080, 0x02)),
        (from_a, tcp(A, 40001, X, 80, 0x02)),
        (from_a, tcp(A, 40001, X, 80, 0x10)),
        (from_a, tcp(A, 40001, X, 80, 0x11)),
        (from_b, tcp(B, 40000, X, 80, 0x02)),
        (from_a, udp(A, 5353, X, 53)),
        (from_b, udp(B, 5353, X, 53)),
        (from_a, udp(A, 5000, R, 53)),
        (from_a, tcp(A, 40002, NODE, 22, 0x02)),
        (from_a, echo(A, X, 7, false)),
        (from_a, echo(A, R, 8, false)),
        (
            from_a,
            with_l4_checksum(Packet::udp(A, 6000, X, 53).first_fragment(9).bytes()),
        ),
        (
            from_a,
            Packet::udp(A, 6000, X, 53)
                .later_fragment(9, 8, true)
                .bytes(),
        ),
        (uplink, tcp(X, 80, NODE, 61000, 0x12)),
        (uplink, tcp(X, 80, NODE, 40001, 0x12)),
        (uplink, udp(X, 53, NODE, 61001)),
        (uplink, echo(X, NODE, 61002, true)),
        (uplink, icmp_error(GATEWAY, NODE, &masqueraded)),
        (uplink, tcp(X, 5555, A, 8080, 0x02)),
        (uplink, udp(GATEWAY, 53, NODE, 33000)),
        (overlay, tcp(R, 33000, B, 8080, 0x02)),
        (overlay, udp(R, 53, A, 5000)),
        (overlay, echo(R, A, 8, true)),
    ]
}

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every masquerade mapping is whole (see the module doc); the problems, one line each.
fn nat_problems(w: &World) -> Vec<String> {
    let mappings = w.dp.maps.nat_mappings().unwrap();
    // Mappings that share a reply tuple: a port reused after the first's connection ended.
    let mut by_reply: BTreeMap<(u8, Ipv4Addr, u16, u16), Vec<&NatMapping>> = BTreeMap::new();
    for m in &mappings {
        by_reply
            .entry((m.proto, m.remote, m.remote_port, m.nat_port))
            .or_default()
            .push(m);
    }
    let mut problems = Vec::new();
    for m in &mappings {
        if m.nat_addr != NODE {
            problems.push(format!("{m:?}: not the node address"));
        }
        if !NAT_PORTS.contains(&m.nat_port) {
            problems.push(format!("{m:?}: port outside {NAT_PORTS:?}"));
        }
        match w.dp.maps.nat_reverse(m).unwrap() {
            None => problems.push(format!("{m:?}: no reverse half")),
            Some(back) => {
                let sharing = &by_reply[&(m.proto, m.remote, m.remote_port, m.nat_port)];
                if !sharing
                    .iter()
                    .any(|o| (o.endpoint, o.endpoint_port) == back)
                {
                    problems.push(format!(
                        "{m:?}: the reverse half leads to {back:?}, which no mapping is"
                    ));
                }
            }
        }
    }
    problems
}

#[test]
fn mutated_packets_get_a_sane_verdict_keep_checksums_and_leave_nat_whole() {
    let Some(w) = setup() else { return };
    let seed = env_u64("MESHD_PACKET_SEED", 1).unwrap();
    let trials = env_u64("MESHD_PACKET_TRIALS", 20_000).unwrap();
    let replay = format!(
        "replay: MESHD_PACKET_SEED={seed} MESHD_PACKET_TRIALS={trials} cargo test -p meshd-datapath --test prog_run_mutations"
    );
    let templates = templates(&w);
    let mut rng = Rng(seed);
    let mut verdicts: BTreeMap<u32, u64> = BTreeMap::new();
    let mut kept_valid = 0u64;
    let mut refused = 0u64;
    for trial in 0..trials {
        let (entry, template) = rng.pick(&templates).unwrap();
        let mut frame = template.clone();
        // One packet in five goes in intact, so flows (and their NAT mappings) get made.
        if rng.below(5) != 0 {
            for _ in 0..rng.range(1..=3) {
                mutate(&mut rng, &mut frame, &KNOWN);
            }
        }
        let valid_in = checksums_valid(&frame);
        let Ok((verdict, out, _)) = w.dp.try_run(entry.program, &frame, entry.ifindex, entry.cb)
        else {
            refused += 1;
            continue;
        };
        let what = || {
            format!(
                "trial {trial} of seed {seed}: {} on ifindex {} with {}\n{replay}",
                entry.program,
                entry.ifindex,
                hex(&frame)
            )
        };
        assert!(
            [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&verdict),
            "verdict {verdict}: {}",
            what()
        );
        *verdicts.entry(verdict).or_default() += 1;
        if valid_in && verdict != TC_ACT_SHOT {
            assert!(
                checksums_valid(&out),
                "a packet with valid checksums left with a broken one: {}\nout {}",
                what(),
                hex(&out)
            );
            kept_valid += 1;
        }
    }
    let problems = nat_problems(&w);
    assert!(
        problems.is_empty(),
        "NAT after the run:\n{}\n{replay}",
        problems.join("\n")
    );
    // The trials reached what they are meant to: every verdict, rewrites checked, and
    // masquerade mappings made (else the checks above checked nothing).
    let mappings = w.dp.maps.nat_mappings().unwrap().len();
    eprintln!(
        "{trials} packets (seed {seed}): verdicts {verdicts:?} ({refused} refused by BPF_PROG_RUN itself), {kept_valid} checked for checksums, {mappings} masquerade mappings"
    );
    assert_eq!(verdicts.len(), 3, "every verdict given: {verdicts:?}");
    assert!(
        refused < trials / 4,
        "{refused} of {trials} refused by the kernel"
    );
    assert!(kept_valid > trials / 10, "{kept_valid} checked of {trials}");
    assert!(mappings > 0, "no masquerade mapping made");
}
