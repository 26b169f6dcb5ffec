//! Leaving the mesh: the egress settings in CONFIG (world routing, masquerade and its port
//! range), the NO_MASQ destinations and a read-only view of the NAT map (see "Leaving the
//! mesh" in `meshd_abi.h`).

use std::{collections::BTreeSet, net::Ipv4Addr, ops::RangeInclusive};

use aya::maps::{lpm_trie::Key as LpmKey, MapError};
use ipnet::Ipv4Net;
use meshd_ebpf::{abi, maps as names};

use crate::{
    error::{DatapathError, Result},
    maps::{ignore_missing, op_err, DatapathMaps},
};

/// How endpoints' traffic to destinations outside the mesh leaves the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressConfig {
    /// Masquerade to the node's IP (else the endpoint's own address leaves the node).
    pub masquerade: bool,
    /// Ports (ICMP echo identifiers) masqueraded flows may take; must not overlap the node's
    /// ephemeral range (the agent's config checks it).
    pub nat_ports: RangeInclusive<u16>,
}

/// One flow's masquerade, read back from NAT (forward entries only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatMapping {
    pub proto: u8,
    pub endpoint: Ipv4Addr,
    /// The endpoint's port (ICMP echo: identifier), host byte order.
    pub endpoint_port: u16,
    pub remote: Ipv4Addr,
    pub remote_port: u16,
    pub nat_addr: Ipv4Addr,
    pub nat_port: u16,
}

fn no_masq_key(prefix: Ipv4Net) -> LpmKey<u32> {
    let prefix = prefix.trunc();
    LpmKey::new(u32::from(prefix.prefix_len()), abi::ip_to_be(prefix.addr()))
}

impl DatapathMaps {
    /// Lets endpoints reach destinations outside the mesh (world) and sets masquerade. Keeps
    /// everything else in CONFIG; bumps the forward revision.
    pub fn set_egress(&mut self, egress: &EgressConfig) -> Result<()> {
        if egress.nat_ports.is_empty() || *egress.nat_ports.start() == 0 {
            return Err(DatapathError::Invalid {
                what: "SNAT port range",
                detail: format!("{:?}", egress.nat_ports),
            });
        }
        let mut value = self.config_value()?;
        value.flags = (value.flags & !(abi::CONFIG_F_WORLD | abi::CONFIG_F_MASQUERADE))
            | abi::CONFIG_F_WORLD
            | if egress.masquerade {
                abi::CONFIG_F_MASQUERADE
            } else {
                0
            };
        value.nat_port_min = *egress.nat_ports.start();
        value.nat_port_max = *egress.nat_ports.end();
        value.forward_revision = value.forward_revision.wrapping_add(1);
        self.write_config(value)
    }

    /// Native routing on or off (CONFIG flag `MESHD_CONFIG_F_NATIVE`): traffic to remote
    /// endpoints leaves by the node's FIB, unencapsulated. Keeps everything else in CONFIG;
    /// bumps the forward revision (cached tunnel answers must not outlive a switch).
    pub fn set_native_routing(&mut self, native: bool) -> Result<()> {
        let mut value = self.config_value()?;
        value.flags &= !abi::CONFIG_F_NATIVE;
        if native {
            value.flags |= abi::CONFIG_F_NATIVE;
        }
        value.forward_revision = value.forward_revision.wrapping_add(1);
        self.write_config(value)
    }

    /// Whether CONFIG says native routing.
    pub fn native_routing(&self) -> Result<bool> {
        Ok(self.config_value()?.flags & abi::CONFIG_F_NATIVE != 0)
    }

    /// The egress settings in CONFIG, `None` while world traffic is not enabled.
    pub fn egress(&self) -> Result<Option<EgressConfig>> {
        let value = self
            .config
            .get(&0, 0)
            .map_err(op_err("get", names::CONFIG, 0))?;
        Ok(
            (value.flags & abi::CONFIG_F_WORLD != 0).then_some(EgressConfig {
                masquerade: value.flags & abi::CONFIG_F_MASQUERADE != 0,
                nat_ports: value.nat_port_min..=value.nat_port_max,
            }),
        )
    }

    /// Makes NO_MASQ hold exactly `prefixes` (destinations never masqueraded), writing the
    /// new ones before removing the stale ones.
    pub fn set_no_masquerade(&mut self, prefixes: &[Ipv4Net]) -> Result<()> {
        let want: BTreeSet<Ipv4Net> = prefixes.iter().map(Ipv4Net::trunc).collect();
        let have: BTreeSet<Ipv4Net> = self.no_masquerade()?.into_iter().collect();
        for p in want.difference(&have) {
            self.insert_no_masquerade(*p)?;
        }
        for p in have.difference(&want) {
            self.remove_no_masquerade(*p)?;
        }
        Ok(())
    }

    /// Adds `prefix` to NO_MASQ (idempotent).
    pub fn insert_no_masquerade(&mut self, prefix: Ipv4Net) -> Result<()> {
        let p = prefix.trunc();
        self.no_masq
            .insert(&no_masq_key(p), abi::NoMasqValue::default(), 0)
            .map_err(op_err("insert", names::NO_MASQ, p))
    }

    /// Removes `prefix` from NO_MASQ (idempotent).
    pub fn remove_no_masquerade(&mut self, prefix: Ipv4Net) -> Result<()> {
        let p = prefix.trunc();
        ignore_missing(self.no_masq.remove(&no_masq_key(p))).map_err(op_err(
            "remove",
            names::NO_MASQ,
            p,
        ))
    }

    /// The prefixes in NO_MASQ.
    pub fn no_masquerade(&self) -> Result<Vec<Ipv4Net>> {
        let mut out = Vec::new();
        for key in self.no_masq.keys() {
            let key = key.map_err(op_err("keys", names::NO_MASQ, "*"))?;
            let addr = abi::ip_from_be(key.data());
            let len = u8::try_from(key.prefix_len()).unwrap_or(32);
            if let Ok(net) = Ipv4Net::new(addr, len) {
                out.push(net);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every masqueraded flow (the forward half of each NAT mapping, whether or not its
    /// connection is still alive).
    pub fn nat_mappings(&self) -> Result<Vec<NatMapping>> {
        let node_ip = self
            .config
            .get(&0, 0)
            .map_err(op_err("get", names::CONFIG, 0))?
            .node_ip;
        let mut out = Vec::new();
        for item in self.nat.iter() {
            let (k, v) = item.map_err(op_err("iter", names::NAT, "*"))?;
            // Forward entries map to the node IP; reverse entries (keyed by the replies'
            // tuple, to the node IP) back to an endpoint.
            if v.addr != node_ip || k.daddr == node_ip {
                continue;
            }
            let nat_addr = abi::ip_from_be(v.addr);
            out.push(NatMapping {
                proto: k.proto,
                endpoint: abi::ip_from_be(k.saddr),
                endpoint_port: u16::from_be(k.sport),
                remote: abi::ip_from_be(k.daddr),
                remote_port: u16::from_be(k.dport),
                nat_addr,
                nat_port: u16::from_be(v.port),
            });
        }
        out.sort_by_key(|m| {
            (
                m.endpoint,
                m.endpoint_port,
                m.remote,
                m.remote_port,
                m.proto,
            )
        });
        Ok(out)
    }

    /// The reverse half of `mapping`: where replies to its node address and port go
    /// (endpoint, port), or `None` when that half is missing. The key is the replies' tuple, as
    /// the datapath writes it (`nat_key` in `meshd_abi.h`: for ICMP echo the identifier sits in
    /// `dport` of a reply).
    pub fn nat_reverse(&self, mapping: &NatMapping) -> Result<Option<(Ipv4Addr, u16)>> {
        let key = abi::NatKey {
            saddr: abi::ip_to_be(mapping.remote),
            daddr: abi::ip_to_be(mapping.nat_addr),
            sport: mapping.remote_port.to_be(),
            dport: mapping.nat_port.to_be(),
            proto: mapping.proto,
            pad: [0; 3],
        };
        match self.nat.get(&key, 0) {
            Ok(v) => Ok(Some((abi::ip_from_be(v.addr), u16::from_be(v.port)))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(op_err("get", names::NAT, mapping.nat_port)(e)),
        }
    }

    /// Number of NAT entries (two per masqueraded flow while both halves are in the LRU).
    pub fn nat_len(&self) -> usize {
        self.nat.keys().filter(|k| k.is_ok()).count()
    }
}
