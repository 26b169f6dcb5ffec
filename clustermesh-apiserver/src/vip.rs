//! Service VIPs: the configured service CIDR and allocation of free addresses from it.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::allocator::first_free;

/// The range service VIPs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceCidr(IpNet);

impl ServiceCidr {
    pub fn new(net: IpNet) -> Result<Self, String> {
        if net.trunc() != net {
            return Err(format!(
                "{net} has host bits set (expected {})",
                net.trunc()
            ));
        }
        if net.max_prefix_len() - net.prefix_len() < 2 {
            return Err(format!("{net} is too small for service VIPs"));
        }
        Ok(Self(net))
    }

    pub fn net(&self) -> IpNet {
        self.0
    }

    /// Whether `ip` may be a VIP: inside the range, and neither its network nor (IPv4) its
    /// broadcast address.
    pub fn is_assignable(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip) && ip != self.0.network() && ip != self.0.broadcast()
    }

    /// The lowest assignable address not in `taken`; `None` when the range is exhausted.
    pub fn allocate(&self, taken: &BTreeSet<IpAddr>) -> Option<IpAddr> {
        self.allocate_from(taken, 0)
    }

    /// The first assignable address not in `taken`, scanning from `offset` into the range and
    /// wrapping around (see [`first_free`]).
    pub fn allocate_from(&self, taken: &BTreeSet<IpAddr>, offset: u128) -> Option<IpAddr> {
        let bits = u32::from(self.0.max_prefix_len() - self.0.prefix_len());
        let size: u128 = if bits >= 128 {
            u128::MAX
        } else {
            1u128 << bits
        };
        let base: u128 = match self.0.network() {
            IpAddr::V4(a) => u32::from(a).into(),
            IpAddr::V6(a) => u128::from(a),
        };
        first_free(size, offset, taken, |k| {
            let n = base + k;
            let ip = match self.0 {
                IpNet::V4(_) => IpAddr::V4((n as u32).into()),
                IpNet::V6(_) => IpAddr::V6(n.into()),
            };
            self.is_assignable(ip).then_some(ip)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_free_and_skips_network_and_broadcast() {
        let cidr = ServiceCidr::new("10.96.0.0/30".parse().unwrap()).unwrap();
        let mut taken = BTreeSet::new();
        let a = cidr.allocate(&taken).unwrap();
        assert_eq!(a.to_string(), "10.96.0.1");
        taken.insert(a);
        let b = cidr.allocate(&taken).unwrap();
        assert_eq!(b.to_string(), "10.96.0.2");
        taken.insert(b);
        assert_eq!(cidr.allocate(&taken), None);
        assert_eq!(cidr.allocate_from(&taken, 7), None);
        taken.remove(&a);
        assert_eq!(cidr.allocate_from(&taken, 2), Some(a), "wraps around");
        assert!(!cidr.is_assignable("10.96.0.0".parse().unwrap()));
        assert!(!cidr.is_assignable("10.96.0.3".parse().unwrap()));
        assert!(!cidr.is_assignable("10.97.0.1".parse().unwrap()));
    }

    #[test]
    fn ipv6_and_bad_ranges() {
        let cidr = ServiceCidr::new("fd00:96::/120".parse().unwrap()).unwrap();
        assert_eq!(
            cidr.allocate(&BTreeSet::new()).unwrap().to_string(),
            "fd00:96::1"
        );
        assert!(ServiceCidr::new("10.96.0.1/16".parse().unwrap()).is_err());
        assert!(ServiceCidr::new("10.96.0.0/31".parse().unwrap()).is_err());
    }
}
