//! The peers of one rule: label selectors over the mesh's identities, entities (Cilium's names
//! for groups outside the reach of labels) and CIDR prefixes, which stand for addresses outside
//! the mesh.
//!
//! Every peer is an identity. Besides the identities clusters allocate, a rule can match the
//! reserved `host`, `world` and `remote-node`, and the local-scope identities this node gives the
//! prefixes its policies name (see [`CidrIdentities`]). An address outside the mesh resolves, in
//! the datapath's ipcache, to the most specific named prefix containing it, or to `world` when no
//! named prefix does. A CIDR identity of prefix `P` is matched by a rule naming `C` when `P` lies
//! within `C` and within none of the rule's `except` prefixes; `world` is matched by `0.0.0.0/0`.
//! Because every prefix a rule names (its `except`s included) has an identity of its own, the
//! identity an address resolves to is always at least as specific as any prefix a rule names, so
//! the containment test is exact.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use meshd_state::{ClusterId, Labels, NumericIdentity, NAMESPACE_LABEL};

use super::compile::namespace_of;
use super::{CidrRule, EgressRule, EndpointSelector, Entity, IngressRule};

/// Label carrying the prefix of a CIDR identity (never stored; only the node's policy engine
/// sees it).
pub const CIDR_LABEL: &str = "meshd.io/cidr";

/// The reserved identities a rule can name through entities, with their (empty) labels.
pub fn reserved_identities() -> [(NumericIdentity, Labels); 3] {
    [
        (NumericIdentity::HOST, Labels::new()),
        (NumericIdentity::WORLD, Labels::new()),
        (NumericIdentity::REMOTE_NODE, Labels::new()),
    ]
}

/// The labels of the CIDR identity of `prefix`.
pub fn cidr_labels(prefix: Ipv4Net) -> Labels {
    Labels::from_pairs([(CIDR_LABEL, prefix.to_string())])
}

/// The peers of an ingress rule; `None`: any peer.
pub fn ingress_peers(r: &IngressRule) -> Option<PeerSet> {
    PeerSet::of_rule(
        r.from_endpoints.as_deref(),
        r.from_entities.as_deref(),
        r.from_cidr.as_deref(),
        r.from_cidr_set.as_deref(),
    )
}

/// The peers of an egress rule; `None`: any peer.
pub fn egress_peers(r: &EgressRule) -> Option<PeerSet> {
    PeerSet::of_rule(
        r.to_endpoints.as_deref(),
        r.to_entities.as_deref(),
        r.to_cidr.as_deref(),
        r.to_cidr_set.as_deref(),
    )
}

/// What one rule's peer fields allow, other than any peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSet {
    selectors: Vec<EndpointSelector>,
    entities: BTreeSet<Entity>,
    cidrs: Vec<CidrRule>,
}

impl PeerSet {
    /// The peers of a rule's fields; `None` when they allow any peer: no peer field at all, or
    /// the entity `all`.
    pub fn of_rule(
        endpoints: Option<&[EndpointSelector]>,
        entities: Option<&[Entity]>,
        cidr: Option<&[Ipv4Net]>,
        cidr_set: Option<&[CidrRule]>,
    ) -> Option<Self> {
        if endpoints.is_none() && entities.is_none() && cidr.is_none() && cidr_set.is_none() {
            return None;
        }
        let entities: BTreeSet<Entity> = entities.into_iter().flatten().copied().collect();
        if entities.contains(&Entity::All) {
            return None;
        }
        let cidrs = cidr
            .into_iter()
            .flatten()
            .map(|c| CidrRule {
                cidr: *c,
                except: Vec::new(),
            })
            .chain(cidr_set.into_iter().flatten().cloned())
            .collect();
        Some(Self {
            selectors: endpoints.map(<[_]>::to_vec).unwrap_or_default(),
            entities,
            cidrs,
        })
    }

    /// Whether identity `id` with `labels` is a peer of a rule of a policy in `namespace` of
    /// cluster `local`.
    pub fn matches(
        &self,
        namespace: &str,
        local: ClusterId,
        id: NumericIdentity,
        labels: &Labels,
    ) -> bool {
        // Label selectors reach the identities clusters allocate, nothing reserved or local.
        let allocated = id.cluster_id().is_some();
        if allocated
            && self.selectors.iter().any(|sel| {
                sel.matches(labels)
                    && (sel.mentions(NAMESPACE_LABEL) || namespace_of(labels) == namespace)
            })
        {
            return true;
        }
        let world = id == NumericIdentity::WORLD || id.is_local_scope();
        let entity = self.entities.iter().any(|e| match e {
            Entity::World => world,
            Entity::Host => id == NumericIdentity::HOST,
            Entity::RemoteNode => id == NumericIdentity::REMOTE_NODE,
            Entity::Cluster => {
                id.cluster_id() == Some(local)
                    || id == NumericIdentity::HOST
                    || id == NumericIdentity::REMOTE_NODE
            }
            Entity::All => true,
        });
        if entity {
            return true;
        }
        let prefix = if id == NumericIdentity::WORLD {
            Some(Ipv4Net::default())
        } else if id.is_local_scope() {
            labels
                .get(CIDR_LABEL)
                .and_then(|p| p.parse::<Ipv4Net>().ok())
        } else {
            None
        };
        prefix.is_some_and(|p| {
            self.cidrs
                .iter()
                .any(|r| within(p, r.cidr) && !r.except.iter().any(|e| within(p, *e)))
        })
    }

    /// Every prefix the rule names, `except`s included: each needs an identity of its own.
    pub fn prefixes(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        self.cidrs
            .iter()
            .flat_map(|r| std::iter::once(r.cidr).chain(r.except.iter().copied()))
    }
}

/// `inner` lies within `outer`.
fn within(inner: Ipv4Net, outer: Ipv4Net) -> bool {
    inner.prefix_len() >= outer.prefix_len() && outer.contains(&inner.network())
}

/// The local-scope identities of the prefixes named by policies, each held while some policy
/// names it. Released numbers are reused lowest first, and none is reused while held, so an
/// identity keeps its number as long as its prefix is named.
#[derive(Debug, Clone, Default)]
pub struct CidrIdentities {
    by_prefix: BTreeMap<Ipv4Net, (NumericIdentity, u32)>,
    /// Numbers released below `next`, reused lowest first.
    free: BTreeSet<u16>,
    /// The lowest number never handed out (0: none yet, as 0 is not used).
    next: u32,
    /// Prefixes that found no free number (65,535 are named already).
    pub exhausted: u64,
}

impl CidrIdentities {
    /// Takes a reference on `prefix`; `Some(identity)` when it is new.
    pub fn acquire(&mut self, prefix: Ipv4Net) -> Option<NumericIdentity> {
        if let Some((_, refs)) = self.by_prefix.get_mut(&prefix) {
            *refs += 1;
            return None;
        }
        let n = match self.free.pop_first() {
            Some(n) => n,
            None => {
                let n = self.next.max(1);
                let Ok(n16) = u16::try_from(n) else {
                    self.exhausted += 1;
                    return None;
                };
                self.next = n + 1;
                n16
            }
        };
        let id = NumericIdentity::local_scope(n);
        self.by_prefix.insert(prefix, (id, 1));
        Some(id)
    }

    /// Drops a reference on `prefix`; `Some(identity)` when it was the last.
    pub fn release(&mut self, prefix: Ipv4Net) -> Option<NumericIdentity> {
        let (id, refs) = self.by_prefix.get_mut(&prefix)?;
        *refs -= 1;
        if *refs > 0 {
            return None;
        }
        let id = *id;
        self.by_prefix.remove(&prefix);
        self.free.insert(id.local());
        Some(id)
    }

    /// The identity of `prefix`, if a policy names it.
    pub fn get(&self, prefix: &Ipv4Net) -> Option<NumericIdentity> {
        self.by_prefix.get(prefix).map(|(id, _)| *id)
    }

    /// Prefix and identity of every named prefix, in prefix order.
    pub fn iter(&self) -> impl Iterator<Item = (Ipv4Net, NumericIdentity)> + '_ {
        self.by_prefix.iter().map(|(p, (id, _))| (*p, *id))
    }

    pub fn len(&self) -> usize {
        self.by_prefix.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    /// The identities with their labels, as [`compile`](super::compile) takes them.
    pub fn labelled(&self) -> BTreeMap<NumericIdentity, Labels> {
        self.iter().map(|(p, id)| (id, cidr_labels(p))).collect()
    }
}
