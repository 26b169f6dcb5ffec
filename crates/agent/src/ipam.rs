//! Endpoint address allocation from the node's pod CIDR. Pure; the endpoint store persists the
//! allocations (each endpoint record holds its address, plus the cursor) so they survive agent
//! restarts.
//!
//! Addresses are handed out round-robin from a cursor rather than lowest-free: an address just
//! freed is the last to be reused, so remote nodes that still hold the old endpoint's ipcache
//! entry or conntrack state for a moment do not apply it to a new endpoint.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("pod CIDR {cidr} is exhausted ({used} addresses in use)")]
    Exhausted { cidr: Ipv4Net, used: usize },
    #[error("{ip} is not in the pod CIDR {cidr}")]
    OutOfRange { ip: Ipv4Addr, cidr: Ipv4Net },
    #[error("{ip} is already allocated to {owner}")]
    InUse { ip: Ipv4Addr, owner: String },
}

#[derive(Debug, Clone)]
pub struct Ipam {
    cidr: Ipv4Net,
    used: BTreeMap<Ipv4Addr, String>,
    /// The next address to try.
    cursor: u32,
}

impl Ipam {
    pub fn new(cidr: Ipv4Net) -> Self {
        let first = first_host(cidr);
        Self {
            cidr,
            used: BTreeMap::new(),
            cursor: first,
        }
    }

    /// Where round-robin allocation continues (persisted with the allocations).
    pub fn cursor(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.cursor)
    }

    /// Continues round-robin from `cursor` (ignored if outside the usable range).
    pub fn set_cursor(&mut self, cursor: Ipv4Addr) {
        let c = u32::from(cursor);
        if (first_host(self.cidr)..=last_host(self.cidr)).contains(&c) {
            self.cursor = c;
        }
    }

    /// Records an existing allocation (recovery after a restart).
    pub fn reserve(&mut self, ip: Ipv4Addr, owner: &str) -> Result<(), IpamError> {
        let n = u32::from(ip);
        if !(first_host(self.cidr)..=last_host(self.cidr)).contains(&n) {
            return Err(IpamError::OutOfRange {
                ip,
                cidr: self.cidr,
            });
        }
        match self.used.get(&ip) {
            Some(o) if o != owner => Err(IpamError::InUse {
                ip,
                owner: o.clone(),
            }),
            _ => {
                self.used.insert(ip, owner.to_owned());
                Ok(())
            }
        }
    }

    /// Allocates the next free address for `owner`.
    pub fn allocate(&mut self, owner: &str) -> Result<Ipv4Addr, IpamError> {
        let (first, last) = (first_host(self.cidr), last_host(self.cidr));
        let size = last - first + 1;
        for i in 0..size {
            let n = first + (self.cursor - first + i) % size;
            let ip = Ipv4Addr::from(n);
            if let std::collections::btree_map::Entry::Vacant(slot) = self.used.entry(ip) {
                slot.insert(owner.to_owned());
                self.cursor = if n == last { first } else { n + 1 };
                return Ok(ip);
            }
        }
        Err(IpamError::Exhausted {
            cidr: self.cidr,
            used: self.used.len(),
        })
    }

    /// Frees `ip` (a no-op if it was free).
    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }
}

/// Network and broadcast addresses are never handed out.
fn first_host(cidr: Ipv4Net) -> u32 {
    u32::from(cidr.network()) + 1
}

fn last_host(cidr: Ipv4Net) -> u32 {
    u32::from(cidr.broadcast()) - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn ipam(cidr: &str) -> Ipam {
        Ipam::new(cidr.parse().unwrap())
    }

    #[test]
    fn never_hands_out_an_address_twice_and_skips_network_and_broadcast() {
        let mut ipam = ipam("10.1.1.0/29");
        let mut seen = BTreeSet::new();
        for i in 0..6 {
            let ip = ipam.allocate(&format!("ep{i}")).unwrap();
            assert!(seen.insert(ip), "{ip} twice");
            assert_ne!(ip, "10.1.1.0".parse::<Ipv4Addr>().unwrap());
            assert_ne!(ip, "10.1.1.7".parse::<Ipv4Addr>().unwrap());
        }
        assert!(matches!(
            ipam.allocate("one-too-many"),
            Err(IpamError::Exhausted { .. })
        ));
    }

    #[test]
    fn freed_addresses_are_reused_last() {
        let mut ipam = ipam("10.1.1.0/29");
        let a = ipam.allocate("a").unwrap();
        let b = ipam.allocate("b").unwrap();
        ipam.release(a);
        let c = ipam.allocate("c").unwrap();
        assert_ne!(c, a);
        assert_ne!(c, b);
        // Exhaust the rest: only then does `a` come back.
        let mut last = c;
        for i in 0..4 {
            last = ipam.allocate(&format!("x{i}")).unwrap();
        }
        assert_eq!(last, a);
    }

    #[test]
    fn recovery_reserves_and_refuses_conflicts() {
        let mut ipam = ipam("10.1.1.0/24");
        let ip: Ipv4Addr = "10.1.1.1".parse().unwrap();
        ipam.reserve(ip, "a").unwrap();
        ipam.reserve(ip, "a").unwrap();
        assert!(matches!(
            ipam.reserve(ip, "b"),
            Err(IpamError::InUse { .. })
        ));
        assert!(matches!(
            ipam.reserve("10.2.0.1".parse().unwrap(), "c"),
            Err(IpamError::OutOfRange { .. })
        ));
        assert_ne!(ipam.allocate("d").unwrap(), ip);
    }

    #[test]
    fn cursor_round_trips() {
        let mut a = ipam("10.1.1.0/24");
        a.allocate("x").unwrap();
        let mut b = ipam("10.1.1.0/24");
        b.set_cursor(a.cursor());
        assert_eq!(
            b.allocate("y").unwrap(),
            "10.1.1.2".parse::<Ipv4Addr>().unwrap()
        );
    }
}
