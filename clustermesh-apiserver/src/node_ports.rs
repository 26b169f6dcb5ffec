//! Node ports: the configured range (`--node-port-range`, Kubernetes' default 30000-32767)
//! and allocation of free ports from it, unique in the cluster, with the VIPs' scan.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use crate::allocator::first_free;

/// The range node ports come from, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePortRange {
    first: u16,
    last: u16,
}

impl Default for NodePortRange {
    /// Kubernetes' default (`--service-node-port-range`).
    fn default() -> Self {
        Self {
            first: 30000,
            last: 32767,
        }
    }
}

impl NodePortRange {
    pub fn new(first: u16, last: u16) -> Result<Self, String> {
        if first == 0 {
            return Err(format!("{first}-{last}: port 0 is not a port"));
        }
        if first > last {
            return Err(format!("{first}-{last}: the first port is above the last"));
        }
        Ok(Self { first, last })
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// The first port not in `taken`, scanning from `offset` into the range and wrapping
    /// around; `None` when every port of the range is taken.
    pub fn allocate_from(&self, taken: &BTreeSet<u16>, offset: u128) -> Option<u16> {
        let size = u128::from(self.last - self.first) + 1;
        first_free(size, offset, taken, |k| {
            u16::try_from(k).ok().map(|k| self.first + k)
        })
    }
}

impl fmt::Display for NodePortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for NodePortRange {
    type Err = String;

    /// `FIRST-LAST`, as Kubernetes writes it (`30000-32767`).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port range (FIRST-LAST, e.g. 30000-32767)");
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let first = a.trim().parse::<u16>().map_err(|_| bad())?;
        let last = b.trim().parse::<u16>().map_err(|_| bad())?;
        Self::new(first, last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_ranges() {
        assert_eq!(NodePortRange::default().to_string(), "30000-32767");
        let r: NodePortRange = "30000-30002".parse().unwrap();
        assert!(r.contains(30000) && r.contains(30002) && !r.contains(30003));
        for bad in ["30000", "x-y", "0-10", "32767-30000", "30000-70000", ""] {
            assert!(bad.parse::<NodePortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn allocates_every_port_once() {
        let r: NodePortRange = "30000-30002".parse().unwrap();
        let mut taken = BTreeSet::new();
        for want in [30000, 30001, 30002] {
            let p = r.allocate_from(&taken, 0).unwrap();
            assert_eq!(p, want);
            taken.insert(p);
        }
        assert_eq!(r.allocate_from(&taken, 0), None);
        taken.remove(&30001);
        assert_eq!(r.allocate_from(&taken, 2), Some(30001), "wraps around");
        // The whole u16 range works (no overflow at 65535).
        let all = NodePortRange::new(1, u16::MAX).unwrap();
        assert_eq!(all.allocate_from(&BTreeSet::new(), 65534), Some(u16::MAX));
    }
}
