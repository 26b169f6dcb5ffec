//! Shared helpers of the datapath tests: packet building and a datapath in a scratch pin dir.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions};
use meshd_datapath::{bpffs::ScratchPinDir, Datapath, DatapathMaps, IpcacheTarget, LoadOptions};
use meshd_state::NumericIdentity;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// Offsets in `struct __sk_buff` (linux/bpf.h) of the fields BPF_PROG_RUN lets us set.
pub const SKB_INGRESS_IFINDEX: usize = 36;
pub const SKB_CB: usize = 48;
pub const SKB_SIZE: usize = 192;

/// Checks the prerequisites of datapath tests (root and bpffs); false = skip.
pub fn can_run() -> bool {
    meshd_testing::require_root() && meshd_testing::require_bpffs()
}

/// A datapath loaded (with test-run probes) into its own scratch pin directory.
pub struct TestDatapath {
    pub datapath: Datapath,
    pub maps: DatapathMaps,
    pub pin_dir: ScratchPinDir,
}

impl TestDatapath {
    pub fn new() -> TestDatapath {
        let pin_dir = ScratchPinDir::new(
            std::path::Path::new(meshd_datapath::bpffs::DEFAULT_ROOT),
            "meshd-test",
        )
        .expect("scratch pin dir");
        let datapath = Datapath::load_with(
            pin_dir.path(),
            LoadOptions {
                probes: true,
                ..LoadOptions::default()
            },
        )
        .expect("load datapath");
        let maps = DatapathMaps::open(pin_dir.path()).expect("open maps");
        TestDatapath {
            datapath,
            maps,
            pin_dir,
        }
    }

    /// Runs `program` on `packet` as if it arrived on `ingress_ifindex`, with `cb` in
    /// skb->cb. Returns (verdict, packet after the program, cb after the program).
    pub fn run(
        &self,
        program: &'static str,
        packet: &[u8],
        ingress_ifindex: u32,
        cb: [u32; 5],
    ) -> (u32, Vec<u8>, [u32; 5]) {
        self.try_run(program, packet, ingress_ifindex, cb)
            .expect("BPF_PROG_RUN")
    }

    /// Runs `program` on `packet` `times` times in one BPF_PROG_RUN (the kernel's repeat), as
    /// if it arrived on `ingress_ifindex`; returns the last verdict.
    pub fn run_times(
        &self,
        program: &'static str,
        packet: &[u8],
        ingress_ifindex: u32,
        times: u32,
    ) -> u32 {
        let mut ctx_in = [0u8; SKB_SIZE];
        ctx_in[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4]
            .copy_from_slice(&ingress_ifindex.to_ne_bytes());
        let prog = self.datapath.program(program).expect("program");
        prog.test_run(TestRunOptions {
            data_in: Some(packet),
            ctx_in: Some(&ctx_in),
            repeat: times,
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_RUN")
        .return_value
    }

    /// [`TestDatapath::run`], with BPF_PROG_RUN's refusal as an error: the kernel refuses to
    /// test-run some frames (e.g. an IPv4 ethertype with less than an IP header behind it).
    pub fn try_run(
        &self,
        program: &'static str,
        packet: &[u8],
        ingress_ifindex: u32,
        cb: [u32; 5],
    ) -> Result<(u32, Vec<u8>, [u32; 5]), aya::programs::ProgramError> {
        let mut ctx_in = [0u8; SKB_SIZE];
        ctx_in[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4]
            .copy_from_slice(&ingress_ifindex.to_ne_bytes());
        for (i, v) in cb.iter().enumerate() {
            ctx_in[SKB_CB + 4 * i..SKB_CB + 4 * i + 4].copy_from_slice(&v.to_ne_bytes());
        }
        let mut ctx_out = [0u8; SKB_SIZE];
        let mut data_out = vec![0u8; packet.len() + 256];
        let prog = self.datapath.program(program).expect("program");
        let result = prog.test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut data_out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            repeat: 1,
            ..TestRunOptions::default()
        })?;
        data_out.truncate(result.data_size_out as usize);
        let mut cb_out = [0u32; 5];
        for (i, v) in cb_out.iter_mut().enumerate() {
            *v = u32::from_ne_bytes(
                ctx_out[SKB_CB + 4 * i..SKB_CB + 4 * i + 4]
                    .try_into()
                    .unwrap(),
            );
        }
        Ok((result.return_value, data_out, cb_out))
    }
}

/// A remote cluster's prefix behind one of its nodes, as an agent writes an admitted remote:
/// the ipcache entry (identity `identity`, tunnelled to `node`) and the node (`cluster_id`).
pub fn add_remote_prefix(
    maps: &mut DatapathMaps,
    prefix: &str,
    identity: u32,
    node: Ipv4Addr,
    cluster_id: u8,
) {
    maps.upsert_ipcache(
        prefix.parse().unwrap(),
        IpcacheTarget {
            identity: NumericIdentity::new(identity).unwrap(),
            tunnel_endpoint: Some(IpAddr::from(node)),
            local: false,
        },
    )
    .unwrap();
    maps.upsert_node(node, cluster_id).unwrap();
}

/// Lets `peer` reach `subject` on any protocol and port (ingress), as one allow rule (cookie
/// 1); default-deny needs `set_policy_enabled` besides.
pub fn allow_ingress_from(maps: &mut DatapathMaps, subject: u32, peer: u32) {
    maps.upsert_policy(
        meshd_datapath::PolicyEntry {
            subject,
            peer: Some(peer),
            proto: None,
            dport: None,
            direction: meshd_datapath::Direction::Ingress,
        },
        meshd_datapath::Verdict::Allow,
        1,
    )
    .unwrap();
}

/// An IPv4 packet with Ethernet header, built field by field.
#[derive(Clone, Debug)]
pub struct Packet {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (SYN = 0x02, ACK = 0x10, ...).
    pub tcp_flags: u8,
    /// ICMP type/code (for proto ICMP); the echo identifier is `sport`.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// L4 payload (for ICMP errors: the embedded packet).
    pub payload: Vec<u8>,
    /// IPv4 identification and the flags/fragment-offset word (0x4000 = DF).
    pub ip_id: u16,
    pub frag_off: u16,
    /// Only `payload` after the IP header (a non-first fragment has no L4 header).
    pub no_l4_header: bool,
}

impl Packet {
    pub fn tcp(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16, flags: u8) -> Packet {
        Packet {
            dst_mac: [0x02, 0, 0, 0, 0, 0xfe],
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            saddr,
            daddr,
            proto: TCP,
            sport,
            dport,
            tcp_flags: flags,
            icmp_type: 0,
            icmp_code: 0,
            payload: b"hello".to_vec(),
            ip_id: 1,
            frag_off: 0x4000,
            no_l4_header: false,
        }
    }

    /// This packet as the first fragment of datagram `id` (more fragments follow).
    pub fn first_fragment(self, id: u16) -> Packet {
        Packet {
            ip_id: id,
            frag_off: 0x2000,
            ..self
        }
    }

    /// A later fragment of datagram `id` at byte offset `offset` (a multiple of 8).
    pub fn later_fragment(self, id: u16, offset: u16, last: bool) -> Packet {
        Packet {
            ip_id: id,
            frag_off: (offset / 8) | if last { 0 } else { 0x2000 },
            no_l4_header: true,
            ..self
        }
    }

    pub fn udp(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16) -> Packet {
        Packet {
            proto: UDP,
            tcp_flags: 0,
            ..Packet::tcp(saddr, sport, daddr, dport, 0)
        }
    }

    pub fn icmp_echo(saddr: Ipv4Addr, daddr: Ipv4Addr, id: u16, reply: bool) -> Packet {
        Packet {
            proto: ICMP,
            icmp_type: if reply { 0 } else { 8 },
            sport: id,
            dport: 0,
            ..Packet::tcp(saddr, 0, daddr, 0, 0)
        }
    }

    /// An ICMP error (type 3 code 3, port unreachable) from `saddr` about `original`.
    pub fn icmp_error(saddr: Ipv4Addr, daddr: Ipv4Addr, original: &Packet) -> Packet {
        let inner = original.ip_bytes();
        Packet {
            proto: ICMP,
            icmp_type: 3,
            icmp_code: 3,
            payload: inner[..28.min(inner.len())].to_vec(),
            ..Packet::tcp(saddr, 0, daddr, 0, 0)
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        if self.no_l4_header {
            return self.payload.clone();
        }
        match self.proto {
            TCP => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&1u32.to_be_bytes()); // seq
                l4.extend_from_slice(&0u32.to_be_bytes()); // ack
                l4.push(5 << 4); // data offset
                l4.push(self.tcp_flags);
                l4.extend_from_slice(&65535u16.to_be_bytes()); // window
                l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            }
            UDP => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
            ICMP => {
                l4.push(self.icmp_type);
                l4.push(self.icmp_code);
                l4.extend_from_slice(&[0, 0]);
                if self.icmp_type == 0 || self.icmp_type == 8 {
                    l4.extend_from_slice(&self.sport.to_be_bytes());
                    l4.extend_from_slice(&1u16.to_be_bytes());
                } else {
                    l4.extend_from_slice(&[0, 0, 0, 0]);
                }
            }
            _ => {}
        }
        l4.extend_from_slice(&self.payload);
        l4
    }

    /// The IPv4 packet (header with a valid checksum, L4, payload).
    pub fn ip_bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let total = (20 + l4.len()) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&self.ip_id.to_be_bytes());
        ip.extend_from_slice(&self.frag_off.to_be_bytes());
        ip.push(64);
        ip.push(self.proto);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.saddr.octets());
        ip.extend_from_slice(&self.daddr.octets());
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip.extend_from_slice(&l4);
        ip
    }

    /// The full frame.
    pub fn bytes(&self) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&self.ip_bytes());
        frame
    }
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub mod bench;
pub mod frames;
pub mod mutations;
pub mod public;
pub mod topology;
pub mod world;

/// An ARP reply frame claiming `sender_ip` is at `sender_mac`, to `target_ip`.
pub fn arp_reply(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xfe]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]); // Ethernet/IPv4, reply
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xfe]);
    f.extend_from_slice(&target_ip.octets());
    f
}
