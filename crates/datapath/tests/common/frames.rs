//! Reading and checking built frames: addresses, ports and checksums (IPv4 header, TCP/UDP
//! with pseudo-header, ICMP with a quoted packet).

use std::net::Ipv4Addr;

use super::{Packet, TCP, UDP};

/// One's complement sum of 16-bit words.
pub fn sum16(bytes: &[u8], mut sum: u32) -> u32 {
    for chunk in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    sum
}

pub fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

pub const ETH: usize = 14;

/// Offset of the L4 checksum field in a frame built by `Packet`.
pub fn l4_csum_off(frame: &[u8]) -> usize {
    ETH + 20 + if frame[ETH + 9] == TCP { 16 } else { 6 }
}

/// The TCP/UDP checksum over pseudo-header and segment, with the checksum field as it is:
/// 0xffff (all ones folded) when the field is right.
pub fn l4_sum(frame: &[u8]) -> u16 {
    let ip = &frame[ETH..];
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let l4 = &ip[20..total];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, ip[9]]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    fold(sum16(l4, sum16(&pseudo, 0)))
}

/// The frame with a correct TCP/UDP checksum.
pub fn with_l4_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let off = l4_csum_off(&frame);
    frame[off..off + 2].copy_from_slice(&[0, 0]);
    let mut csum = !l4_sum(&frame);
    if csum == 0 && frame[ETH + 9] == UDP {
        csum = 0xffff;
    }
    frame[off..off + 2].copy_from_slice(&csum.to_be_bytes());
    frame
}

pub fn assert_checksums_valid(frame: &[u8], what: &str) {
    assert_eq!(
        fold(sum16(&frame[ETH..ETH + 20], 0)),
        0xffff,
        "{what}: IPv4 header checksum"
    );
    assert_eq!(l4_sum(frame), 0xffff, "{what}: L4 checksum");
}

pub fn daddr(frame: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33])
}

pub fn saddr(frame: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29])
}

pub fn sport(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

pub fn dport(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[36], frame[37]])
}

pub fn tcp(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    with_l4_checksum(Packet::tcp(saddr, sport, daddr, dport, flags).bytes())
}

pub fn udp(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16) -> Vec<u8> {
    with_l4_checksum(Packet::udp(saddr, sport, daddr, dport).bytes())
}

/// The ICMP checksum (no pseudo-header) over everything after the outer IP header, with the
/// field as it is: 0xffff when right.
pub fn icmp_sum(frame: &[u8]) -> u16 {
    let ip = &frame[ETH..];
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    fold(sum16(&ip[20..total], 0))
}

pub fn with_icmp_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let off = ETH + 20 + 2;
    frame[off..off + 2].copy_from_slice(&[0, 0]);
    let csum = !icmp_sum(&frame);
    frame[off..off + 2].copy_from_slice(&csum.to_be_bytes());
    frame
}

/// Port unreachable from `saddr` to `daddr` about `original`, with a correct ICMP checksum.
pub fn icmp_error(saddr: Ipv4Addr, daddr: Ipv4Addr, original: &Packet) -> Vec<u8> {
    with_icmp_checksum(Packet::icmp_error(saddr, daddr, original).bytes())
}

/// The packet an ICMP error quotes (after the outer IP and ICMP headers): source and
/// destination address and port.
pub fn quoted(frame: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let q = ETH + 20 + 8;
    let addr = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    ((addr(q + 12), port(q + 20)), (addr(q + 16), port(q + 22)))
}

pub fn assert_icmp_error_valid(frame: &[u8], what: &str) {
    assert_eq!(
        fold(sum16(&frame[ETH..ETH + 20], 0)),
        0xffff,
        "{what}: outer IPv4 checksum"
    );
    let q = ETH + 20 + 8;
    assert_eq!(
        fold(sum16(&frame[q..q + 20], 0)),
        0xffff,
        "{what}: quoted IPv4 checksum"
    );
    assert_eq!(icmp_sum(frame), 0xffff, "{what}: ICMP checksum");
}
