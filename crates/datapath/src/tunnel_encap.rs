//! Who encapsulates tunnel-mode traffic (`tunnel_encap`, the CONFIG flag
//! `MESHD_CONFIG_F_TUNNEL_PROGRAM` and `tunnel_port`; see `ebpf/bpf/lib/vxlan.h`).

use std::{fmt, str::FromStr};

use meshd_ebpf::abi;

use crate::{error::Result, maps::DatapathMaps};

/// Where VXLAN headers are written and taken off in tunnel mode. Both put the same bytes on
/// the wire, so nodes of either kind talk to each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TunnelEncap {
    /// The node's VXLAN device (external mode), fed by the tunnel key from_endpoint sets.
    #[default]
    Device,
    /// from_endpoint encapsulates and hands the packet to the underlay device; from_netdev
    /// decapsulates on the uplink and delivers to the endpoint. What the program leaves (a
    /// packet over the route's MTU, say) still goes through the device.
    Program,
}

impl FromStr for TunnelEncap {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "device" => Ok(Self::Device),
            "program" => Ok(Self::Program),
            other => Err(format!("{other:?}: expected device or program")),
        }
    }
}

impl fmt::Display for TunnelEncap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Device => "device",
            Self::Program => "program",
        })
    }
}

impl DatapathMaps {
    /// Sets who encapsulates, and the VXLAN UDP port (the device's `dstport`) the program
    /// writes and accepts. Keeps everything else in CONFIG. Takes effect with the next packet:
    /// the forwarding cache holds where a connection goes, not how.
    pub fn set_tunnel_encap(&mut self, encap: TunnelEncap, port: u16) -> Result<()> {
        let mut value = self.config_value()?;
        value.flags &= !abi::CONFIG_F_TUNNEL_PROGRAM;
        if encap == TunnelEncap::Program {
            value.flags |= abi::CONFIG_F_TUNNEL_PROGRAM;
        }
        value.tunnel_port = port.to_be();
        self.write_config(value)
    }

    /// Who encapsulates, and the VXLAN port, as CONFIG says.
    pub fn tunnel_encap(&self) -> Result<(TunnelEncap, u16)> {
        let value = self.config_value()?;
        let encap = if value.flags & abi::CONFIG_F_TUNNEL_PROGRAM != 0 {
            TunnelEncap::Program
        } else {
            TunnelEncap::Device
        };
        Ok((encap, u16::from_be(value.tunnel_port)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print_as_the_config_spells_them() {
        for (s, mode) in [
            ("device", TunnelEncap::Device),
            ("program", TunnelEncap::Program),
        ] {
            assert_eq!(s.parse::<TunnelEncap>(), Ok(mode));
            assert_eq!(mode.to_string(), s);
        }
        assert_eq!(TunnelEncap::default(), TunnelEncap::Device);
        assert!("kernel"
            .parse::<TunnelEncap>()
            .unwrap_err()
            .contains("device or program"));
    }
}
