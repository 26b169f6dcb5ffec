//! Overlap queries over sets of canonical prefixes, without scanning: two prefixes overlap iff
//! one contains the other. Contained prefixes are a range of the sorted map (canonical keys
//! order by network address, then length); containing ones are found by truncating the query
//! to each prefix length present in the set, of which there are few.

use std::collections::BTreeMap;

use ipnet::IpNet;

/// How many prefixes of each length a set holds, per address family.
#[derive(Debug, Clone)]
pub(crate) struct Lengths {
    v4: [u32; 33],
    v6: [u32; 129],
}

impl Default for Lengths {
    fn default() -> Self {
        Self {
            v4: [0; 33],
            v6: [0; 129],
        }
    }
}

impl Lengths {
    fn slot(&mut self, p: &IpNet) -> &mut u32 {
        match p {
            IpNet::V4(n) => &mut self.v4[usize::from(n.prefix_len())],
            IpNet::V6(n) => &mut self.v6[usize::from(n.prefix_len())],
        }
    }

    pub(crate) fn add(&mut self, p: &IpNet) {
        *self.slot(p) += 1;
    }

    pub(crate) fn remove(&mut self, p: &IpNet) {
        let s = self.slot(p);
        *s = s.saturating_sub(1);
    }

    /// The prefixes of `p`'s family that contain `p` (shorter or equal length, present in the
    /// set's lengths), including `p` itself when its length is present.
    fn containing(&self, p: &IpNet) -> impl Iterator<Item = IpNet> + '_ {
        let counts: &[u32] = match p {
            IpNet::V4(_) => &self.v4,
            IpNet::V6(_) => &self.v6,
        };
        let p = *p;
        (0..=p.prefix_len())
            .filter(move |&len| counts[usize::from(len)] > 0)
            .map(move |len| {
                IpNet::new(p.addr(), len)
                    .expect("length within the family's maximum")
                    .trunc()
            })
    }
}

/// The keys of `map` that overlap `p` (contain it, equal it or lie inside it). `lengths` must
/// count exactly the keys of `map`; keys must be canonical.
pub(crate) fn overlapping<'a, V>(
    map: &'a BTreeMap<IpNet, V>,
    lengths: &'a Lengths,
    p: &IpNet,
) -> impl Iterator<Item = IpNet> + 'a {
    let end = IpNet::new(p.broadcast(), p.max_prefix_len()).expect("maximum length is valid");
    let start = p.trunc();
    let containing = lengths
        .containing(&start)
        .filter(move |c| c.prefix_len() < start.prefix_len() && map.contains_key(c));
    let inside = map.range(start..=end).map(|(k, _)| *k);
    containing.chain(inside)
}

/// A reference-counted set of prefixes: several sources (a pod CIDR of two nodes, an endpoint
/// and a node with the same address) may add the same prefix.
#[derive(Debug, Clone, Default)]
pub(crate) struct PrefixSet {
    refs: BTreeMap<IpNet, u32>,
    lengths: Lengths,
}

impl PrefixSet {
    /// Returns true if `p` was not in the set before.
    pub(crate) fn add(&mut self, p: IpNet) -> bool {
        let n = self.refs.entry(p).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.lengths.add(&p);
            true
        } else {
            false
        }
    }

    /// Returns true if `p` left the set.
    pub(crate) fn remove(&mut self, p: &IpNet) -> bool {
        match self.refs.get_mut(p) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.refs.remove(p);
                self.lengths.remove(p);
                true
            }
            None => false,
        }
    }

    /// One member overlapping `p`, if any.
    pub(crate) fn first_overlap(&self, p: &IpNet) -> Option<IpNet> {
        overlapping(&self.refs, &self.lengths, p).next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn overlap_finds_containing_equal_and_contained() {
        let mut set = PrefixSet::default();
        set.add(net("10.1.0.0/16"));
        set.add(net("10.2.3.4/32"));
        set.add(net("fd00::/64"));
        assert_eq!(
            set.first_overlap(&net("10.1.5.0/24")),
            Some(net("10.1.0.0/16"))
        );
        assert_eq!(
            set.first_overlap(&net("10.1.0.0/16")),
            Some(net("10.1.0.0/16"))
        );
        assert_eq!(
            set.first_overlap(&net("10.0.0.0/8")),
            Some(net("10.1.0.0/16"))
        );
        assert_eq!(
            set.first_overlap(&net("10.2.0.0/16")),
            Some(net("10.2.3.4/32"))
        );
        assert_eq!(
            set.first_overlap(&net("10.2.3.4/32")),
            Some(net("10.2.3.4/32"))
        );
        assert_eq!(set.first_overlap(&net("10.2.3.5/32")), None);
        assert_eq!(set.first_overlap(&net("10.3.0.0/16")), None);
        assert_eq!(
            set.first_overlap(&net("fd00::1/128")),
            Some(net("fd00::/64"))
        );
        assert_eq!(set.first_overlap(&net("fd01::1/128")), None);
        // Families never overlap, even where the bits would.
        assert_eq!(set.first_overlap(&net("::a01:0/112")), None);
        assert_eq!(
            set.first_overlap(&net("0.0.0.0/0")),
            Some(net("10.1.0.0/16"))
        );
    }

    #[test]
    fn reference_counts() {
        let mut set = PrefixSet::default();
        assert!(set.add(net("10.1.0.0/16")));
        assert!(!set.add(net("10.1.0.0/16")));
        assert!(!set.remove(&net("10.1.0.0/16")));
        assert!(set.first_overlap(&net("10.1.1.1/32")).is_some());
        assert!(set.remove(&net("10.1.0.0/16")));
        assert!(set.first_overlap(&net("10.1.1.1/32")).is_none());
        assert!(!set.remove(&net("10.1.0.0/16")));
    }

    #[test]
    fn overlap_matches_brute_force() {
        let members: Vec<IpNet> = (0..200u32)
            .map(|i| {
                let len = [8u8, 16, 20, 24, 28, 32][(i % 6) as usize];
                IpNet::new(
                    format!("10.{}.{}.{}", i % 3, (i * 7) % 256, (i * 13) % 256)
                        .parse()
                        .unwrap(),
                    len,
                )
                .unwrap()
                .trunc()
            })
            .collect();
        let mut map = BTreeMap::new();
        let mut lengths = Lengths::default();
        for m in &members {
            if map.insert(*m, ()).is_none() {
                lengths.add(m);
            }
        }
        for i in 0..300u32 {
            let len = [12u8, 16, 24, 30, 32][(i % 5) as usize];
            let q = IpNet::new(
                format!("10.{}.{}.{}", i % 4, (i * 11) % 256, (i * 29) % 256)
                    .parse()
                    .unwrap(),
                len,
            )
            .unwrap()
            .trunc();
            let mut got: Vec<IpNet> = overlapping(&map, &lengths, &q).collect();
            got.sort();
            let want: Vec<IpNet> = map
                .keys()
                .filter(|m| m.contains(&q) || q.contains(*m))
                .copied()
                .collect();
            assert_eq!(got, want, "query {q}");
        }
    }
}
