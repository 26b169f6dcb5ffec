//! Incremental policy compilation: the content [`compile`](super::compile) would produce,
//! maintained as identities and policies come and go, so that a new identity costs the rules
//! whose selectors it matches, not a recompilation of every policy against every identity.
//!
//! Every map entry is the union of *contributions*: one per (rule, subject, peer, port) that
//! allows it, each carrying its rule's cookie, plus the built-in host entry of each enforced
//! (subject, direction) (cookie 0). An entry exists while it has a contribution, with the
//! lowest cookie among them, exactly as `compile` picks it; a marker exists while a policy
//! selecting the subject has that direction. Each policy keeps its selected subjects and
//! each rule its matching peers, so an identity's arrival or departure adds or removes only
//! its own row (as a subject) and column (as a peer).

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use meshd_state::{ClusterId, Labels, NumericIdentity};

use super::compile::{expand_ports, namespace_of};
use super::peers::{
    cidr_labels, egress_peers, ingress_peers, reserved_identities, CidrIdentities, PeerSet,
};
use super::{rule_cookie, CompiledPolicy, NetworkPolicy, BUILTIN_COOKIE};
use crate::desired::{
    diff_policy_parts, DatapathOp, Direction, IpProto, PolicyKey, PolicyValue, Verdict,
};

type PolicyName = (String, String);

/// One rule of one direction of a policy, with the peers it currently matches.
#[derive(Debug, Clone)]
struct RuleState {
    direction: Direction,
    cookie: u32,
    /// `None`: any peer.
    peer_set: Option<PeerSet>,
    ports: Vec<(Option<IpProto>, Option<u16>)>,
    peers: BTreeSet<NumericIdentity>,
}

impl RuleState {
    fn matches_peer(
        &self,
        namespace: &str,
        local: ClusterId,
        id: NumericIdentity,
        labels: &Labels,
    ) -> bool {
        self.peer_set
            .as_ref()
            .is_some_and(|set| set.matches(namespace, local, id, labels))
    }

    /// The peers of its entries: every matching identity, or any peer.
    fn peer_keys(&self) -> Vec<Option<NumericIdentity>> {
        match self.peer_set {
            None => vec![None],
            Some(_) => self.peers.iter().copied().map(Some).collect(),
        }
    }
}

#[derive(Debug, Clone)]
struct PolicyState {
    policy: NetworkPolicy,
    directions: Vec<Direction>,
    selected: BTreeSet<NumericIdentity>,
    rules: Vec<RuleState>,
}

impl PolicyState {
    fn namespace(&self) -> &str {
        &self.policy.metadata.namespace
    }

    /// Every prefix its rules name (with repeats: each is a reference).
    fn prefixes(&self) -> Vec<Ipv4Net> {
        self.rules
            .iter()
            .filter_map(|r| r.peer_set.as_ref())
            .flat_map(|set| set.prefixes())
            .collect()
    }
}

/// The maintained policy map content; see the module docs.
#[derive(Debug, Clone)]
pub struct PolicyIndex {
    local: ClusterId,
    policies: BTreeMap<PolicyName, PolicyState>,
    /// Key -> cookie -> number of contributions with that cookie.
    contributions: BTreeMap<PolicyKey, BTreeMap<u32, u32>>,
    /// (subject, direction) -> number of policies enforcing it.
    markers: BTreeMap<(NumericIdentity, Direction), u32>,
    out: CompiledPolicy,
    touched_keys: BTreeSet<PolicyKey>,
    touched_markers: BTreeSet<(NumericIdentity, Direction)>,
    /// The identities of the prefixes the policies name.
    cidrs: CidrIdentities,
    /// Prefixes whose identity came or went since the last [`Self::take_touched_cidrs`].
    touched_cidrs: Vec<Ipv4Net>,
}

fn host_key(subject: NumericIdentity, direction: Direction) -> PolicyKey {
    PolicyKey {
        subject,
        peer: Some(NumericIdentity::HOST),
        proto: None,
        dport: None,
        direction,
    }
}

impl PolicyIndex {
    pub fn new(local: ClusterId) -> Self {
        Self {
            local,
            policies: BTreeMap::new(),
            contributions: BTreeMap::new(),
            markers: BTreeMap::new(),
            out: CompiledPolicy::default(),
            touched_keys: BTreeSet::new(),
            touched_markers: BTreeSet::new(),
            cidrs: CidrIdentities::default(),
            touched_cidrs: Vec::new(),
        }
    }

    /// The identity of a prefix a policy names, if any does.
    pub fn cidr_identity(&self, prefix: &Ipv4Net) -> Option<NumericIdentity> {
        self.cidrs.get(prefix)
    }

    /// The identities of every prefix the policies name.
    pub fn cidr_identities(&self) -> &CidrIdentities {
        &self.cidrs
    }

    /// Prefixes whose identity came or went since the last call (the ipcache follows them).
    pub fn take_touched_cidrs(&mut self) -> Vec<Ipv4Net> {
        std::mem::take(&mut self.touched_cidrs)
    }

    /// The policy map content, equal to `compile` over the same policies and identities.
    pub fn compiled(&self) -> &CompiledPolicy {
        &self.out
    }

    fn is_subject(&self, p: &PolicyState, id: NumericIdentity, labels: &Labels) -> bool {
        id.cluster_id() == Some(self.local)
            && namespace_of(labels) == p.namespace()
            && p.policy.spec.endpoint_selector.matches(labels)
    }

    fn contribute(&mut self, key: PolicyKey, cookie: u32, up: bool) {
        self.touched_keys.insert(key);
        let cookies = self.contributions.entry(key).or_default();
        let n = cookies.entry(cookie).or_default();
        if up {
            *n += 1;
        } else {
            *n -= 1;
            if *n == 0 {
                cookies.remove(&cookie);
                if cookies.is_empty() {
                    self.contributions.remove(&key);
                }
            }
        }
    }

    /// Adds (or removes) everything subject `s` of policy `name` contributes: its markers,
    /// host entries and one entry per rule, peer and port.
    fn subject_row(&mut self, name: &PolicyName, s: NumericIdentity, up: bool) {
        let p = &self.policies[name];
        let mut keys = Vec::new();
        for rule in &p.rules {
            for peer in rule.peer_keys() {
                for (proto, dport) in &rule.ports {
                    let key = PolicyKey {
                        subject: s,
                        peer,
                        proto: *proto,
                        dport: *dport,
                        direction: rule.direction,
                    };
                    keys.push((key, rule.cookie));
                }
            }
        }
        let directions = p.directions.clone();
        for d in directions {
            self.touched_markers.insert((s, d));
            let n = self.markers.entry((s, d)).or_default();
            if up {
                *n += 1;
            } else {
                *n -= 1;
                if *n == 0 {
                    self.markers.remove(&(s, d));
                }
            }
            keys.push((host_key(s, d), BUILTIN_COOKIE));
        }
        for (key, cookie) in keys {
            self.contribute(key, cookie, up);
        }
    }

    /// Adds (or removes) what peer `x` of rule `r` of policy `name` contributes.
    fn peer_column(&mut self, name: &PolicyName, r: usize, x: NumericIdentity, up: bool) {
        let p = &self.policies[name];
        let rule = &p.rules[r];
        let mut keys = Vec::new();
        for s in &p.selected {
            for (proto, dport) in &rule.ports {
                keys.push(PolicyKey {
                    subject: *s,
                    peer: Some(x),
                    proto: *proto,
                    dport: *dport,
                    direction: rule.direction,
                });
            }
        }
        let cookie = rule.cookie;
        for key in keys {
            self.contribute(key, cookie, up);
        }
    }

    /// Identity `id` now has `labels` (`None`: it is gone). Costs the policies and rules it
    /// enters or leaves.
    pub fn set_identity(&mut self, id: NumericIdentity, labels: Option<&Labels>) {
        let names: Vec<PolicyName> = self.policies.keys().cloned().collect();
        for name in names {
            let p = &self.policies[&name];
            let was_subject = p.selected.contains(&id);
            let is_subject = labels.is_some_and(|l| self.is_subject(p, id, l));
            let peer_changes: Vec<(usize, bool)> = p
                .rules
                .iter()
                .enumerate()
                .filter_map(|(i, rule)| {
                    let was = rule.peers.contains(&id);
                    let is =
                        labels.is_some_and(|l| rule.matches_peer(p.namespace(), self.local, id, l));
                    (was != is).then_some((i, is))
                })
                .collect();
            // Leave as a subject first (its row includes itself as a peer, if it was one), then
            // change the peer columns (over the other subjects), then join as a subject (its
            // row includes itself as a peer, if it now is one): (id, id) is counted once.
            if was_subject && !is_subject {
                self.subject_row(&name, id, false);
                self.policies
                    .get_mut(&name)
                    .expect("listed")
                    .selected
                    .remove(&id);
            }
            for (r, joins) in peer_changes {
                if joins {
                    self.policies.get_mut(&name).expect("listed").rules[r]
                        .peers
                        .insert(id);
                    self.peer_column(&name, r, id, true);
                } else {
                    self.peer_column(&name, r, id, false);
                    self.policies.get_mut(&name).expect("listed").rules[r]
                        .peers
                        .remove(&id);
                }
            }
            if !was_subject && is_subject {
                self.policies
                    .get_mut(&name)
                    .expect("listed")
                    .selected
                    .insert(id);
                self.subject_row(&name, id, true);
            }
        }
    }

    /// Stores, replaces (`Some`) or removes (`None`) policy `name`, compiled against
    /// `identities` (every admitted identity). Policies that do not validate are skipped, as
    /// `compile` does.
    pub fn set_policy(
        &mut self,
        name: PolicyName,
        policy: Option<&NetworkPolicy>,
        identities: &BTreeMap<NumericIdentity, Labels>,
    ) {
        let mut released = Vec::new();
        if let Some(old) = self.policies.get(&name) {
            released = old.prefixes();
            let subjects: Vec<NumericIdentity> = old.selected.iter().copied().collect();
            for s in subjects {
                self.subject_row(&name, s, false);
            }
            self.policies.remove(&name);
        }
        self.add_policy(name, policy, identities);
        // Prefixes the old version named give up their identity last, after the new version
        // took its references, so a prefix named by both keeps its number.
        for prefix in released {
            if let Some(id) = self.cidrs.release(prefix) {
                self.touched_cidrs.push(prefix);
                self.set_identity(id, None);
            }
        }
    }

    fn add_policy(
        &mut self,
        name: PolicyName,
        policy: Option<&NetworkPolicy>,
        identities: &BTreeMap<NumericIdentity, Labels>,
    ) {
        let Some(policy) = policy.filter(|p| p.validate().is_ok()) else {
            return;
        };
        let ns = policy.metadata.namespace.clone();
        let mut rules = Vec::new();
        let mut directions = Vec::new();
        let sections = [
            (
                Direction::Ingress,
                policy.spec.ingress.as_ref().map(|rules| {
                    rules
                        .iter()
                        .map(|r| (ingress_peers(r), r.to_ports.as_deref()))
                        .collect::<Vec<_>>()
                }),
            ),
            (
                Direction::Egress,
                policy.spec.egress.as_ref().map(|rules| {
                    rules
                        .iter()
                        .map(|r| (egress_peers(r), r.to_ports.as_deref()))
                        .collect::<Vec<_>>()
                }),
            ),
        ];
        // New prefixes get their identity before the policy joins, so that the other
        // policies' rules (a broader prefix, `world`) take the new identity as a peer.
        let named: Vec<Ipv4Net> = sections
            .iter()
            .flat_map(|(_, section)| section.iter().flatten())
            .filter_map(|(set, _)| set.as_ref())
            .flat_map(|set| set.prefixes())
            .collect();
        for prefix in named {
            if let Some(id) = self.cidrs.acquire(prefix) {
                self.touched_cidrs.push(prefix);
                self.set_identity(id, Some(&cidr_labels(prefix)));
            }
        }
        let extra: Vec<(NumericIdentity, Labels)> = reserved_identities()
            .into_iter()
            .chain(self.cidrs.labelled())
            .collect();
        for (direction, section) in sections {
            let Some(section) = section else { continue };
            directions.push(direction);
            for (index, (peer_set, ports)) in section.into_iter().enumerate() {
                let mut rule = RuleState {
                    direction,
                    cookie: rule_cookie(&ns, &policy.metadata.name, direction, index),
                    peer_set,
                    ports: expand_ports(ports),
                    peers: BTreeSet::new(),
                };
                rule.peers = identities
                    .iter()
                    .chain(extra.iter().map(|(id, l)| (id, l)))
                    .filter(|(id, l)| rule.matches_peer(&ns, self.local, **id, l))
                    .map(|(id, _)| *id)
                    .collect();
                rules.push(rule);
            }
        }
        let mut state = PolicyState {
            policy: policy.clone(),
            directions,
            selected: BTreeSet::new(),
            rules,
        };
        state.selected = identities
            .iter()
            .filter(|(id, l)| self.is_subject(&state, **id, l))
            .map(|(id, _)| *id)
            .collect();
        let subjects: Vec<NumericIdentity> = state.selected.iter().copied().collect();
        self.policies.insert(name.clone(), state);
        for s in subjects {
            self.subject_row(&name, s, true);
        }
    }

    /// Resolves what changed since the last call into the maintained content and appends the
    /// operations to `ops` (unordered: callers sort).
    pub fn flush(&mut self, ops: &mut Vec<DatapathOp>) {
        let mut old = CompiledPolicy::default();
        let mut new = CompiledPolicy::default();
        for key in std::mem::take(&mut self.touched_keys) {
            if let Some(v) = self.out.entries.get(&key) {
                old.entries.insert(key, *v);
            }
            let value = self
                .contributions
                .get(&key)
                .and_then(|cookies| cookies.keys().next())
                .map(|cookie| PolicyValue {
                    verdict: Verdict::Allow,
                    cookie: *cookie,
                });
            match value {
                Some(v) => {
                    new.entries.insert(key, v);
                    self.out.entries.insert(key, v);
                }
                None => {
                    self.out.entries.remove(&key);
                }
            }
        }
        for marker in std::mem::take(&mut self.touched_markers) {
            if self.out.enabled.contains(&marker) {
                old.enabled.insert(marker);
            }
            if self.markers.contains_key(&marker) {
                new.enabled.insert(marker);
                self.out.enabled.insert(marker);
            } else {
                self.out.enabled.remove(&marker);
            }
        }
        diff_policy_parts(
            (&old.entries, &old.enabled),
            (&new.entries, &new.enabled),
            ops,
        );
    }
}
