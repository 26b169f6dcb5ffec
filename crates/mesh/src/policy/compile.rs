//! Compilation of policies into policy map entries for the local cluster's identities. Pure
//! and total: the same policies and identities always give the same entries, so the
//! reconciler can recompile whenever an identity appears (remote ones included) and diff.

use std::collections::{BTreeMap, BTreeSet};

use meshd_state::{ClusterId, Labels, NumericIdentity, NAMESPACE_LABEL};

use super::peers::{egress_peers, ingress_peers, reserved_identities, PeerSet};
use super::{L4Protocol, NetworkPolicy, PortRule, DEFAULT_NAMESPACE};
use crate::desired::{Direction, IpProto, PolicyKey, PolicyValue, Verdict};

/// The policy map content: allow entries and the (subject, direction) markers that make a
/// direction default-deny.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub entries: BTreeMap<PolicyKey, PolicyValue>,
    pub enabled: BTreeSet<(NumericIdentity, Direction)>,
}

/// Cookie of the entries meshd adds by itself (the host is always allowed).
pub const BUILTIN_COOKIE: u32 = 0;

/// A stable, non-zero id of rule `index` of `direction` of policy `namespace/name`, carried in
/// the entries it produced so drop and trace output can name the rule (FNV-1a).
pub fn rule_cookie(namespace: &str, name: &str, direction: Direction, index: usize) -> u32 {
    let text = format!("{namespace}/{name}/{direction}/{index}");
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

pub(super) fn namespace_of(labels: &Labels) -> &str {
    labels.get(NAMESPACE_LABEL).unwrap_or(DEFAULT_NAMESPACE)
}

/// One rule of either direction, as compilation sees it.
struct Rule<'a> {
    /// `None`: any peer.
    peers: Option<PeerSet>,
    ports: Option<&'a [PortRule]>,
}

/// Protocol and port pairs a rule allows; `(None, None)` is everything.
pub(super) fn expand_ports(rules: Option<&[PortRule]>) -> Vec<(Option<IpProto>, Option<u16>)> {
    let Some(rules) = rules else {
        return vec![(None, None)];
    };
    let mut out = BTreeSet::new();
    for pp in rules.iter().flat_map(|r| &r.ports) {
        // Invalid ports never get here through `validate`; one that does allows nothing.
        let Ok(port) = pp.port.as_ref().map_or(Ok(0), |p| p.parse()) else {
            continue;
        };
        let port = (port != 0).then_some(port);
        match pp.protocol.unwrap_or(L4Protocol::Any) {
            L4Protocol::Tcp => {
                out.insert((Some(IpProto::Tcp), port));
            }
            L4Protocol::Udp => {
                out.insert((Some(IpProto::Udp), port));
            }
            L4Protocol::Icmp => {
                out.insert((Some(IpProto::Icmp), None));
            }
            L4Protocol::Any => match port {
                None => {
                    out.insert((None, None));
                }
                Some(_) => {
                    out.insert((Some(IpProto::Tcp), port));
                    out.insert((Some(IpProto::Udp), port));
                }
            },
        }
    }
    out.into_iter().collect()
}

/// Compiles `policies` for the identities of cluster `local` among `identities` (every
/// admitted identity of every cluster, with its `meshd.io/cluster` label, and the CIDR
/// identities of the prefixes the policies name, see [`CidrIdentities`](super::CidrIdentities)).
/// The reserved identities are peers too. Policies that do not validate are skipped (the view
/// never stores one).
pub fn compile<'a>(
    policies: impl IntoIterator<Item = &'a NetworkPolicy>,
    identities: &BTreeMap<NumericIdentity, Labels>,
    local: ClusterId,
) -> CompiledPolicy {
    let mut out = CompiledPolicy::default();
    let reserved = reserved_identities();
    let subjects: Vec<(NumericIdentity, &Labels)> = identities
        .iter()
        .filter(|(id, _)| id.cluster_id() == Some(local))
        .map(|(id, l)| (*id, l))
        .collect();
    for policy in policies {
        if policy.validate().is_err() {
            continue;
        }
        let ns = policy.metadata.namespace.as_str();
        let selected: Vec<NumericIdentity> = subjects
            .iter()
            .filter(|(_, l)| namespace_of(l) == ns && policy.spec.endpoint_selector.matches(l))
            .map(|(id, _)| *id)
            .collect();
        if selected.is_empty() {
            continue;
        }
        let ingress = policy.spec.ingress.as_ref().map(|rules| {
            rules
                .iter()
                .map(|r| Rule {
                    peers: ingress_peers(r),
                    ports: r.to_ports.as_deref(),
                })
                .collect::<Vec<_>>()
        });
        let egress = policy.spec.egress.as_ref().map(|rules| {
            rules
                .iter()
                .map(|r| Rule {
                    peers: egress_peers(r),
                    ports: r.to_ports.as_deref(),
                })
                .collect::<Vec<_>>()
        });
        for (direction, rules) in [(Direction::Ingress, ingress), (Direction::Egress, egress)] {
            let Some(rules) = rules else { continue };
            out.enabled.extend(selected.iter().map(|s| (*s, direction)));
            for (index, rule) in rules.iter().enumerate() {
                let cookie = rule_cookie(ns, &policy.metadata.name, direction, index);
                let peers: Vec<Option<NumericIdentity>> = match &rule.peers {
                    None => vec![None],
                    Some(set) => identities
                        .iter()
                        .map(|(id, l)| (*id, l))
                        .chain(reserved.iter().map(|(id, l)| (*id, l)))
                        .filter(|(id, labels)| set.matches(ns, local, *id, labels))
                        .map(|(id, _)| Some(id))
                        .collect(),
                };
                let ports = expand_ports(rule.ports);
                for subject in &selected {
                    for peer in &peers {
                        for (proto, dport) in &ports {
                            let key = PolicyKey {
                                subject: *subject,
                                peer: *peer,
                                proto: *proto,
                                dport: *dport,
                                direction,
                            };
                            // Two rules allowing the same thing: the lower cookie, whatever
                            // the order of policies, so recompiling never flaps.
                            out.entries
                                .entry(key)
                                .and_modify(|v| v.cookie = v.cookie.min(cookie))
                                .or_insert(PolicyValue {
                                    verdict: Verdict::Allow,
                                    cookie,
                                });
                        }
                    }
                }
            }
        }
    }
    // The node itself (health checks, and the replies to its probes) always gets through.
    for (subject, direction) in &out.enabled {
        out.entries.insert(
            PolicyKey {
                subject: *subject,
                peer: Some(NumericIdentity::HOST),
                proto: None,
                dport: None,
                direction: *direction,
            },
            PolicyValue {
                verdict: Verdict::Allow,
                cookie: BUILTIN_COOKIE,
            },
        );
    }
    out
}
