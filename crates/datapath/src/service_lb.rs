//! How public frontends reach backends on other nodes (`service_lb_mode`, the CONFIG flags
//! `MESHD_CONFIG_F_DSR_*`; see DSR in `meshd_abi.h`).

use std::{fmt, str::FromStr};

use meshd_ebpf::abi;

use crate::{error::Result, maps::DatapathMaps};

/// Load-balancing mode of NodePort / external IP connections to a backend on another node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ServiceLbMode {
    /// The request leaves SNATed to the entry node's IP; replies come back through it.
    #[default]
    Snat,
    /// The client's address is kept and the frontend travels in an IPv4 option; the backend's
    /// node answers the client directly (native routing only).
    Dsr,
    /// DSR for TCP, SNAT for UDP.
    Hybrid,
}

impl ServiceLbMode {
    /// The CONFIG flags of this mode.
    pub fn config_flags(self) -> u32 {
        match self {
            Self::Snat => 0,
            Self::Dsr => abi::CONFIG_F_DSR_TCP | abi::CONFIG_F_DSR_UDP,
            Self::Hybrid => abi::CONFIG_F_DSR_TCP,
        }
    }

    /// Whether the mode uses DSR for any protocol (and so needs native routing).
    pub fn uses_dsr(self) -> bool {
        self != Self::Snat
    }
}

impl FromStr for ServiceLbMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "snat" => Ok(Self::Snat),
            "dsr" => Ok(Self::Dsr),
            "hybrid" => Ok(Self::Hybrid),
            other => Err(format!("{other:?}: expected snat, dsr or hybrid")),
        }
    }
}

impl fmt::Display for ServiceLbMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Snat => "snat",
            Self::Dsr => "dsr",
            Self::Hybrid => "hybrid",
        })
    }
}

const DSR_FLAGS: u32 = abi::CONFIG_F_DSR_TCP | abi::CONFIG_F_DSR_UDP;

impl DatapathMaps {
    /// Sets the service load-balancing mode in CONFIG, keeping everything else. The datapath
    /// honours DSR only with native routing on (the agent's config refuses it otherwise). New
    /// connections follow the new mode; established ones keep theirs (`MESHD_CT_F_DSR`).
    pub fn set_service_lb_mode(&mut self, mode: ServiceLbMode) -> Result<()> {
        let mut value = self.config_value()?;
        value.flags = (value.flags & !DSR_FLAGS) | mode.config_flags();
        self.write_config(value)
    }

    /// The mode CONFIG holds.
    pub fn service_lb_mode(&self) -> Result<ServiceLbMode> {
        Ok(match self.config_value()?.flags & DSR_FLAGS {
            0 => ServiceLbMode::Snat,
            abi::CONFIG_F_DSR_TCP => ServiceLbMode::Hybrid,
            _ => ServiceLbMode::Dsr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_print_and_map_to_flags() {
        for (text, mode, flags) in [
            ("snat", ServiceLbMode::Snat, 0),
            (
                "dsr",
                ServiceLbMode::Dsr,
                abi::CONFIG_F_DSR_TCP | abi::CONFIG_F_DSR_UDP,
            ),
            ("hybrid", ServiceLbMode::Hybrid, abi::CONFIG_F_DSR_TCP),
        ] {
            assert_eq!(text.parse::<ServiceLbMode>().unwrap(), mode);
            assert_eq!(mode.to_string(), text);
            assert_eq!(mode.config_flags(), flags);
        }
        assert!("DSR".parse::<ServiceLbMode>().is_err());
        assert!(!ServiceLbMode::Snat.uses_dsr() && ServiceLbMode::Hybrid.uses_dsr());
    }
}
