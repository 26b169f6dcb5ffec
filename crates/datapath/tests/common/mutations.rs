//! Packet mutations for the seeded trials of the datapath's parsers (prog_run_mutations.rs and
//! the in-program VXLAN trials): bits, bytes, lengths, header fields, addresses the maps know,
//! truncation and trailing junk.

use std::net::Ipv4Addr;

use meshd_testing::trials::Rng;

use super::frames::{fold, icmp_sum, l4_sum, sum16, ETH};
use super::{ICMP, TCP, UDP};

pub const IPV4: u16 = 0x0800;

/// One mutation of `frame`, drawn from `rng`; `known`: addresses the maps know, put in the
/// IPv4 header so mutated packets reach the deep paths.
pub fn mutate(rng: &mut Rng, frame: &mut Vec<u8>, known: &[Ipv4Addr]) {
    let len = frame.len() as u64;
    match rng.below(10) {
        0 => {
            for _ in 0..rng.range(1..=4) {
                let bit = rng.below(len * 8) as usize;
                frame[bit / 8] ^= 1 << (bit % 8);
            }
        }
        1 => {
            let at = rng.below(len) as usize;
            frame[at] = *rng
                .pick(&[0, 0xff, 0x45, 0x46, 0x4f, 0x60, 0x80, 0x7f])
                .unwrap();
        }
        // BPF_PROG_RUN refuses a frame shorter than an Ethernet header (EINVAL): the kernel
        // never hands a tc program one either.
        2 => frame.truncate(rng.range(ETH as u64..=len.max(ETH as u64)) as usize),
        3 => {
            for _ in 0..rng.range(1..=64) {
                frame.push(rng.next_u64() as u8);
            }
        }
        // IPv4 header fields: version/IHL, total length, flags/fragment offset, protocol.
        4 if frame.len() > ETH + 20 => frame[ETH] = 0x40 | rng.below(16) as u8,
        5 if frame.len() > ETH + 20 => {
            let total = rng.below(len + 64) as u16;
            frame[ETH + 2..ETH + 4].copy_from_slice(&total.to_be_bytes());
        }
        6 if frame.len() > ETH + 20 => {
            let frag = *rng
                .pick(&[0x2000u16, 0x0001, 0x2001, 0x1fff, 0x4000, 0x8000])
                .unwrap();
            frame[ETH + 6..ETH + 8].copy_from_slice(&frag.to_be_bytes());
        }
        7 if frame.len() > ETH + 20 => {
            frame[ETH + 9] = *rng.pick(&[1u8, 6, 17, 47, 58, 132, 0, 255]).unwrap()
        }
        // An address the maps know, so mutated packets reach the deep paths.
        8 if frame.len() >= ETH + 20 => {
            let at = ETH + if rng.below(2) == 0 { 12 } else { 16 };
            frame[at..at + 4].copy_from_slice(&rng.pick(known).unwrap().octets());
        }
        _ => {
            let ethertype = *rng.pick(&[IPV4, 0x86dd, 0x0806, 0x8100, 0x88a8]).unwrap();
            if frame.len() >= ETH {
                frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
            }
        }
    }
}

/// An unfragmented IPv4 TCP, UDP or ICMP frame whose lengths add up and whose checksums are
/// all valid: what the program must not leave with a broken checksum.
pub fn checksums_valid(frame: &[u8]) -> bool {
    if frame.len() < ETH + 20 || frame[12..14] != IPV4.to_be_bytes() || frame[ETH] != 0x45 {
        return false;
    }
    let total = u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]]) as usize;
    let frag = u16::from_be_bytes([frame[ETH + 6], frame[ETH + 7]]);
    if total != frame.len() - ETH
        || frag & 0x3fff != 0
        || fold(sum16(&frame[ETH..ETH + 20], 0)) != 0xffff
    {
        return false;
    }
    let l4 = total - 20;
    match frame[ETH + 9] {
        // A UDP checksum of 0 means "none": nothing to keep valid.
        UDP => l4 >= 8 && frame[ETH + 26..ETH + 28] != [0, 0] && l4_sum(frame) == 0xffff,
        TCP => l4 >= 20 && l4_sum(frame) == 0xffff,
        ICMP => l4 >= 8 && icmp_sum(frame) == 0xffff,
        _ => false,
    }
}
