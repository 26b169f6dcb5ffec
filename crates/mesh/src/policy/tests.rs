//! Policy parsing, validation (errors name the field path) and compilation semantics.

use std::collections::BTreeMap;

use meshd_state::{ClusterId, Labels, NumericIdentity, CLUSTER_LABEL, NAMESPACE_LABEL};

use super::*;
use crate::desired::{Direction, IpProto, PolicyKey, Verdict};

const DESIGN_EXAMPLE: &str = r#"
apiVersion: meshd.io/v1
kind: NetworkPolicy
metadata: { name: echo-from-c1-clients, namespace: default }
spec:
  endpointSelector: { matchLabels: { app: echo } }
  ingress:
    - fromEndpoints: [ { matchLabels: { app: client, meshd.io/cluster: c1 } } ]
      toPorts: [ { ports: [ { port: "8080", protocol: TCP } ] } ]
"#;

fn errors_of(yaml: &str) -> PolicyErrors {
    NetworkPolicy::from_yaml(yaml).expect_err("should be refused")
}

fn with_spec(spec: &str) -> String {
    format!(
        "apiVersion: meshd.io/v1\nkind: NetworkPolicy\nmetadata: {{ name: p, namespace: default }}\nspec:\n{spec}"
    )
}

#[test]
fn the_design_example_parses() {
    let p = NetworkPolicy::from_yaml(DESIGN_EXAMPLE).unwrap();
    assert_eq!(p.id(), "default/echo-from-c1-clients");
    let rule = &p.spec.ingress.as_ref().unwrap()[0];
    assert_eq!(
        rule.from_endpoints.as_ref().unwrap()[0].match_labels[CLUSTER_LABEL],
        "c1"
    );
    assert_eq!(
        rule.to_ports.as_ref().unwrap()[0].ports[0].protocol,
        Some(L4Protocol::Tcp)
    );
    assert!(p.spec.egress.is_none());
    // JSON (the form stored in etcd) round-trips.
    assert_eq!(NetworkPolicy::from_json(&p.to_json()).unwrap(), p);
}

#[test]
fn namespace_defaults_and_numeric_ports_are_accepted() {
    let p = NetworkPolicy::from_yaml(
        "apiVersion: meshd.io/v1\nkind: NetworkPolicy\nmetadata: { name: p }\nspec:\n  endpointSelector: {}\n  egress:\n    - toPorts: [ { ports: [ { port: 53, protocol: UDP }, { protocol: ICMP } ] } ]\n",
    )
    .unwrap();
    assert_eq!(p.metadata.namespace, "default");
}

#[test]
fn a_bad_port_names_its_field() {
    let e = errors_of(&with_spec(
        "  endpointSelector: {}\n  ingress:\n    - toPorts: [ { ports: [ { port: \"80a\", protocol: TCP } ] } ]\n",
    ));
    assert_eq!(e.fields(), vec!["spec.ingress[0].toPorts[0].ports[0].port"]);
    let text = e.to_string();
    assert!(
        text.contains(r#"spec.ingress[0].toPorts[0].ports[0].port: "80a" is not a port"#),
        "{text}"
    );
    let e = errors_of(&with_spec(
        "  endpointSelector: {}\n  egress:\n    - toPorts: [ { ports: [ { port: 70000 } ] } ]\n",
    ));
    assert_eq!(e.fields(), vec!["spec.egress[0].toPorts[0].ports[0].port"]);
    let e = errors_of(&with_spec(
        "  endpointSelector: {}\n  egress:\n    - toPorts: [ { ports: [ { port: 8, protocol: ICMP } ] } ]\n",
    ));
    assert!(e.to_string().contains("ICMP has no ports"), "{e}");
}

#[test]
fn unknown_fields_and_values_are_refused_with_their_path() {
    // A typo in a section name must not silently drop the section.
    let e = errors_of(&with_spec("  endpointSelector: {}\n  ingres: []\n"));
    assert_eq!(e.fields(), vec!["spec.ingres"]);
    assert!(e.to_string().contains("ingres"), "{e}");
    let e = errors_of(&with_spec(
        "  endpointSelector: { matchLabel: { app: x } }\n  ingress: []\n",
    ));
    assert_eq!(e.fields(), vec!["spec.endpointSelector.matchLabel"]);
    let e = errors_of(&with_spec(
        "  endpointSelector: {}\n  ingress:\n    - toPorts: [ { ports: [ { port: \"1\", protocol: SCTP } ] } ]\n",
    ));
    assert_eq!(
        e.fields(),
        vec!["spec.ingress[0].toPorts[0].ports[0].protocol"]
    );
    let e = errors_of(
        "apiVersion: meshd.io/v1\nkind: NetworkPolicy\nmetadata: { name: p, uid: x }\nspec: { endpointSelector: {}, ingress: [] }\n",
    );
    assert_eq!(e.fields(), vec!["metadata.uid"]);
    // Not a mapping at all.
    let e = errors_of("- 1\n- 2\n");
    assert_eq!(e.fields(), vec![""]);
    // JSON errors carry paths too.
    let e = NetworkPolicy::from_json(
        r#"{"apiVersion":"meshd.io/v1","kind":"NetworkPolicy","metadata":{"name":"p"},"spec":{"endpointSelector":{"matchLabels":{"app":5}},"ingress":[]}}"#,
    )
    .unwrap_err();
    assert_eq!(e.fields(), vec!["spec.endpointSelector.matchLabels.app"]);
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let e = errors_of(
        r#"
apiVersion: meshd.io/v2
kind: Policy
metadata: { name: Bad_Name, namespace: "my ns" }
spec:
  endpointSelector:
    matchLabels: { "bad key!": x }
    matchExpressions:
      - { key: app, operator: In }
      - { key: tier, operator: Exists, values: [a] }
  ingress:
    - fromEndpoints: []
      toPorts: []
    - toPorts: [ { ports: [] } ]
"#,
    );
    assert_eq!(
        e.fields(),
        vec![
            "apiVersion",
            "kind",
            "metadata.name",
            "metadata.namespace",
            r#"spec.endpointSelector.matchLabels["bad key!"]"#,
            "spec.endpointSelector.matchExpressions[0].values",
            "spec.endpointSelector.matchExpressions[1].values",
            "spec.ingress[0].fromEndpoints",
            "spec.ingress[0].toPorts",
            "spec.ingress[1].toPorts[0].ports",
        ],
        "{e}"
    );
    assert!(e
        .0
        .iter()
        .all(|x| x.policy.as_deref() == Some("my ns/Bad_Name")));
}

#[test]
fn a_policy_needs_a_direction() {
    let e = errors_of(&with_spec("  endpointSelector: {}\n"));
    assert_eq!(e.fields(), vec!["spec"]);
}

// ---- compilation ----

fn id(cluster: u32, local: u16) -> NumericIdentity {
    NumericIdentity::allocated(ClusterId::new(cluster).unwrap(), local).unwrap()
}

/// Identities as the view holds them: cluster label always there.
fn identities(list: &[(NumericIdentity, &[(&str, &str)])]) -> BTreeMap<NumericIdentity, Labels> {
    list.iter()
        .map(|(i, labels)| {
            let mut l = Labels::from_pairs(labels.iter().copied());
            let c = format!("c{}", i.cluster_id().unwrap().get());
            l.insert(CLUSTER_LABEL, c);
            (*i, l)
        })
        .collect()
}

fn key(
    subject: NumericIdentity,
    peer: Option<NumericIdentity>,
    proto: Option<IpProto>,
    dport: Option<u16>,
    direction: Direction,
) -> PolicyKey {
    PolicyKey {
        subject,
        peer,
        proto,
        dport,
        direction,
    }
}

fn local_c2() -> ClusterId {
    ClusterId::new(2).unwrap()
}

/// The acceptance scenario of the issue: c2's echo admits only c1's clients on TCP 8080.
fn scenario() -> BTreeMap<NumericIdentity, Labels> {
    let d = (NAMESPACE_LABEL, "default");
    identities(&[
        (id(2, 300), &[("app", "echo"), d]),
        (id(2, 301), &[("app", "client"), d]),
        (id(2, 302), &[("app", "other"), d]),
        (id(1, 300), &[("app", "client"), d]),
        (id(1, 301), &[("app", "other"), d]),
        (id(1, 302), &[("app", "client"), (NAMESPACE_LABEL, "prod")]),
    ])
}

fn policy(yaml: &str) -> NetworkPolicy {
    NetworkPolicy::from_yaml(yaml).unwrap()
}

#[test]
fn no_policy_means_no_entries_and_no_markers() {
    let c = compile(std::iter::empty(), &scenario(), local_c2());
    assert_eq!(c, CompiledPolicy::default());
}

#[test]
fn the_acceptance_policy_admits_only_c1_clients_on_tcp_8080() {
    let c = compile([&policy(DESIGN_EXAMPLE)], &scenario(), local_c2());
    let echo = id(2, 300);
    let want_cookie = rule_cookie("default", "echo-from-c1-clients", Direction::Ingress, 0);
    let entries: Vec<(PolicyKey, u32)> = c.entries.iter().map(|(k, v)| (*k, v.cookie)).collect();
    assert_eq!(
        entries,
        vec![
            (
                key(
                    echo,
                    Some(NumericIdentity::HOST),
                    None,
                    None,
                    Direction::Ingress
                ),
                BUILTIN_COOKIE
            ),
            (
                key(
                    echo,
                    Some(id(1, 300)),
                    Some(IpProto::Tcp),
                    Some(8080),
                    Direction::Ingress
                ),
                want_cookie
            ),
        ],
        "c2 clients, c1 others and c1 clients of another namespace get nothing"
    );
    assert!(c.entries.values().all(|v| v.verdict == Verdict::Allow));
    assert_eq!(
        c.enabled.iter().copied().collect::<Vec<_>>(),
        vec![(echo, Direction::Ingress)],
        "only echo's ingress is enforced; egress and every other endpoint stay open"
    );
}

#[test]
fn subjects_are_only_local_identities_of_the_policy_namespace() {
    let mut ids = scenario();
    ids.extend(identities(&[(
        id(2, 310),
        &[("app", "echo"), (NAMESPACE_LABEL, "prod")],
    )]));
    let c = compile([&policy(DESIGN_EXAMPLE)], &ids, local_c2());
    let subjects: Vec<NumericIdentity> = c.enabled.iter().map(|(s, _)| *s).collect();
    assert_eq!(subjects, vec![id(2, 300)]);
    // Compiled for c1 instead, the same policy selects nothing (c1 has no echo).
    let c = compile([&policy(DESIGN_EXAMPLE)], &ids, ClusterId::new(1).unwrap());
    assert_eq!(c, CompiledPolicy::default());
}

#[test]
fn l3_only_l4_only_and_empty_rules() {
    let p = policy(&with_spec(
        r#"  endpointSelector: { matchLabels: { app: echo } }
  ingress:
    - fromEndpoints: [ { matchLabels: { app: client } } ]
    - toPorts: [ { ports: [ { port: "53" } ] } ]
  egress: []
"#,
    ));
    let c = compile([&p], &scenario(), local_c2());
    let echo = id(2, 300);
    let ingress: Vec<PolicyKey> = c
        .entries
        .keys()
        .filter(|k| k.direction == Direction::Ingress)
        .copied()
        .collect();
    assert_eq!(
        ingress,
        vec![
            // L4 only: any peer (world included), TCP and UDP.
            key(echo, None, Some(IpProto::Tcp), Some(53), Direction::Ingress),
            key(echo, None, Some(IpProto::Udp), Some(53), Direction::Ingress),
            key(
                echo,
                Some(NumericIdentity::HOST),
                None,
                None,
                Direction::Ingress
            ),
            // L3 only: clients of the namespace in every cluster, every port.
            key(echo, Some(id(1, 300)), None, None, Direction::Ingress),
            key(echo, Some(id(2, 301)), None, None, Direction::Ingress),
        ]
    );
    // `egress: []` denies all egress but the host.
    let egress: Vec<PolicyKey> = c
        .entries
        .keys()
        .filter(|k| k.direction == Direction::Egress)
        .copied()
        .collect();
    assert_eq!(
        egress,
        vec![key(
            echo,
            Some(NumericIdentity::HOST),
            None,
            None,
            Direction::Egress
        )]
    );
    assert!(c.enabled.contains(&(echo, Direction::Egress)));
}

#[test]
fn peers_of_other_namespaces_need_the_namespace_label() {
    let p = policy(&with_spec(
        r#"  endpointSelector: { matchLabels: { app: echo } }
  ingress:
    - fromEndpoints:
        - matchLabels: { app: client }
          matchExpressions: [ { key: meshd.io/namespace, operator: Exists } ]
"#,
    ));
    let c = compile([&p], &scenario(), local_c2());
    let peers: Vec<Option<NumericIdentity>> = c
        .entries
        .keys()
        .map(|k| k.peer)
        .filter(|p| *p != Some(NumericIdentity::HOST))
        .collect();
    assert_eq!(
        peers,
        vec![Some(id(1, 300)), Some(id(1, 302)), Some(id(2, 301))]
    );
}

#[test]
fn selection_by_cluster_and_expressions() {
    let p = policy(&with_spec(
        r#"  endpointSelector: { matchExpressions: [ { key: app, operator: In, values: [echo, other] } ] }
  egress:
    - toEndpoints: [ { matchExpressions: [ { key: meshd.io/cluster, operator: NotIn, values: [c2] } ] } ]
      toPorts: [ { ports: [ { protocol: ICMP }, { port: "0", protocol: UDP } ] } ]
"#,
    ));
    let c = compile([&p], &scenario(), local_c2());
    let subjects: std::collections::BTreeSet<NumericIdentity> =
        c.enabled.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        subjects.into_iter().collect::<Vec<_>>(),
        vec![id(2, 300), id(2, 302)]
    );
    for s in [id(2, 300), id(2, 302)] {
        for peer in [id(1, 300), id(1, 301)] {
            assert!(c.entries.contains_key(&key(
                s,
                Some(peer),
                Some(IpProto::Icmp),
                None,
                Direction::Egress
            )));
            assert!(c.entries.contains_key(&key(
                s,
                Some(peer),
                Some(IpProto::Udp),
                None,
                Direction::Egress
            )));
        }
        assert!(!c
            .entries
            .keys()
            .any(|k| k.subject == s && k.peer.and_then(|p| p.cluster_id()) == Some(local_c2())));
    }
}

#[test]
fn several_policies_add_up_and_recompiling_is_stable() {
    let a = policy(DESIGN_EXAMPLE);
    let b = policy(
        r#"
apiVersion: meshd.io/v1
kind: NetworkPolicy
metadata: { name: also-8080, namespace: default }
spec:
  endpointSelector: { matchLabels: { app: echo } }
  ingress:
    - fromEndpoints: [ { matchLabels: { app: client } } ]
      toPorts: [ { ports: [ { port: "8080", protocol: TCP } ] } ]
"#,
    );
    let ab = compile([&a, &b], &scenario(), local_c2());
    let ba = compile([&b, &a], &scenario(), local_c2());
    assert_eq!(ab, ba, "order of policies does not matter");
    let k = key(
        id(2, 300),
        Some(id(1, 300)),
        Some(IpProto::Tcp),
        Some(8080),
        Direction::Ingress,
    );
    let ca = rule_cookie("default", "echo-from-c1-clients", Direction::Ingress, 0);
    let cb = rule_cookie("default", "also-8080", Direction::Ingress, 0);
    assert_ne!(ca, cb);
    assert_eq!(
        ab.entries[&k].cookie,
        ca.min(cb),
        "shared entry keeps the lower cookie"
    );
    assert!(ab.entries.contains_key(&key(
        id(2, 300),
        Some(id(2, 301)),
        Some(IpProto::Tcp),
        Some(8080),
        Direction::Ingress
    )));
}

#[test]
fn a_remote_identity_that_appears_later_is_picked_up_by_recompiling() {
    let p = policy(DESIGN_EXAMPLE);
    let mut ids = scenario();
    let before = compile([&p], &ids, local_c2());
    ids.extend(identities(&[(
        id(1, 400),
        &[
            ("app", "client"),
            ("version", "2"),
            (NAMESPACE_LABEL, "default"),
        ],
    )]));
    let after = compile([&p], &ids, local_c2());
    let k = key(
        id(2, 300),
        Some(id(1, 400)),
        Some(IpProto::Tcp),
        Some(8080),
        Direction::Ingress,
    );
    assert!(!before.entries.contains_key(&k));
    assert!(after.entries.contains_key(&k));
    assert_eq!(after.entries.len(), before.entries.len() + 1);
}

#[test]
fn identities_without_a_namespace_label_are_in_default() {
    let ids = identities(&[
        (id(2, 300), &[("app", "echo")]),
        (id(1, 300), &[("app", "client")]),
    ]);
    let c = compile([&policy(DESIGN_EXAMPLE)], &ids, local_c2());
    assert!(c.entries.contains_key(&key(
        id(2, 300),
        Some(id(1, 300)),
        Some(IpProto::Tcp),
        Some(8080),
        Direction::Ingress
    )));
}

/// The datapath's lookup (ebpf/bpf/lib/policy.h), over compiled entries.
fn datapath_allows(
    c: &CompiledPolicy,
    subject: NumericIdentity,
    peer: NumericIdentity,
    proto: IpProto,
    port: u16,
    direction: Direction,
) -> bool {
    if !c.enabled.contains(&(subject, direction)) {
        return true;
    }
    let dport = matches!(proto, IpProto::Tcp | IpProto::Udp).then_some(port);
    for p in [Some(peer), None] {
        let mut keys = Vec::new();
        if dport.is_some() {
            keys.push(key(subject, p, Some(proto), dport, direction));
        }
        keys.push(key(subject, p, Some(proto), None, direction));
        keys.push(key(subject, p, None, None, direction));
        for k in keys {
            if let Some(v) = c.entries.get(&k) {
                return v.verdict == Verdict::Allow;
            }
        }
    }
    false
}

/// Peers and ports of one rule of either direction.
type RuleRef<'a> = (Option<&'a Vec<EndpointSelector>>, Option<&'a Vec<PortRule>>);

/// The semantics of the module docs, straight from the manifests.
fn policy_allows(
    policies: &[NetworkPolicy],
    ids: &BTreeMap<NumericIdentity, Labels>,
    subject: NumericIdentity,
    peer: NumericIdentity,
    proto: IpProto,
    port: u16,
    direction: Direction,
) -> bool {
    let ns_of = |l: &Labels| l.get(NAMESPACE_LABEL).unwrap_or("default").to_owned();
    let subject_labels = &ids[&subject];
    let mut enforced = false;
    for p in policies {
        if ns_of(subject_labels) != p.metadata.namespace
            || !p.spec.endpoint_selector.matches(subject_labels)
        {
            continue;
        }
        let rules: Option<Vec<RuleRef<'_>>> = match direction {
            Direction::Ingress => p.spec.ingress.as_ref().map(|rs| {
                rs.iter()
                    .map(|r| (r.from_endpoints.as_ref(), r.to_ports.as_ref()))
                    .collect()
            }),
            Direction::Egress => p.spec.egress.as_ref().map(|rs| {
                rs.iter()
                    .map(|r| (r.to_endpoints.as_ref(), r.to_ports.as_ref()))
                    .collect()
            }),
        };
        let Some(rules) = rules else { continue };
        enforced = true;
        for (peers, ports) in rules {
            let peer_ok = match peers {
                None => true,
                Some(sels) => ids.get(&peer).is_some_and(|pl| {
                    sels.iter().any(|s| {
                        s.matches(pl)
                            && (s.mentions(NAMESPACE_LABEL) || ns_of(pl) == p.metadata.namespace)
                    })
                }),
            };
            let port_ok = match ports {
                None => true,
                Some(prs) => prs.iter().flat_map(|r| &r.ports).any(|pp| {
                    let want = pp.port.as_ref().map_or(0, |x| x.parse().unwrap());
                    let proto_ok = match pp.protocol.unwrap_or(L4Protocol::Any) {
                        L4Protocol::Tcp => proto == IpProto::Tcp,
                        L4Protocol::Udp => proto == IpProto::Udp,
                        L4Protocol::Icmp => proto == IpProto::Icmp,
                        L4Protocol::Any => want == 0 || proto != IpProto::Icmp,
                    };
                    let port_ok = want == 0 || (proto != IpProto::Icmp && want == port);
                    proto_ok && port_ok
                }),
            };
            if peer_ok && port_ok {
                return true;
            }
        }
    }
    !enforced || peer == NumericIdentity::HOST
}

#[test]
fn compiled_entries_under_the_datapath_lookup_match_the_manifest_semantics() {
    let apps = ["echo", "client", "db"];
    let nss = ["default", "prod"];
    let mut seed: u64 = 42;
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    // [denied, allowed]: the generated policies must exercise both.
    let mut outcomes = [0usize; 2];
    for round in 0..40 {
        // Identities: every app in every namespace, in clusters 1 and 2.
        let mut list = Vec::new();
        let mut local = 300u16;
        for c in [1u32, 2] {
            for app in apps {
                for ns in nss {
                    list.push((id(c, local), vec![("app", app), (NAMESPACE_LABEL, ns)]));
                    local += 1;
                }
            }
        }
        let ids: BTreeMap<NumericIdentity, Labels> = list
            .iter()
            .map(|(i, l)| {
                let mut labels = Labels::from_pairs(l.iter().copied());
                labels.insert(CLUSTER_LABEL, format!("c{}", i.cluster_id().unwrap().get()));
                (*i, labels)
            })
            .collect();
        // A few random policies, built as values (every combination the types allow).
        let mut policies = Vec::new();
        for n in 0..1 + next(3) {
            let sel = |next: &mut dyn FnMut(u64) -> u64| -> EndpointSelector {
                match next(5) {
                    0 => EndpointSelector::default(),
                    1 => EndpointSelector::labels([("app", apps[next(3) as usize])]),
                    2 => EndpointSelector::labels([
                        ("app", apps[next(3) as usize].to_owned()),
                        (CLUSTER_LABEL, format!("c{}", 1 + next(2))),
                    ]),
                    3 => EndpointSelector::labels([(NAMESPACE_LABEL, nss[next(2) as usize])]),
                    _ => EndpointSelector {
                        match_labels: BTreeMap::new(),
                        match_expressions: vec![SelectorRequirement {
                            key: "app".into(),
                            operator: Operator::NotIn,
                            values: vec![apps[next(3) as usize].into()],
                        }],
                    },
                }
            };
            let subject = sel(&mut next);
            let mut rules = Vec::new();
            for _ in 0..next(3) {
                let n_peers = next(3);
                let peers =
                    (n_peers > 0).then(|| (0..n_peers).map(|_| sel(&mut next)).collect::<Vec<_>>());
                let pp = |port: Option<&str>, protocol| PortProtocol {
                    port: port.map(|p| PortSpec::Text(p.into())),
                    protocol,
                };
                let ports = match next(4) {
                    0 => Some(vec![pp(Some("80"), Some(L4Protocol::Tcp))]),
                    1 => Some(vec![pp(Some("53"), None), pp(None, Some(L4Protocol::Icmp))]),
                    2 => Some(vec![pp(None, Some(L4Protocol::Udp))]),
                    _ => None,
                };
                rules.push((peers, ports.map(|ports| vec![PortRule { ports }])));
            }
            let ingress = next(2) == 0;
            let spec = PolicySpec {
                endpoint_selector: subject,
                ingress: ingress.then(|| {
                    rules
                        .iter()
                        .map(|(peers, ports)| IngressRule {
                            from_endpoints: peers.clone(),
                            to_ports: ports.clone(),
                            ..IngressRule::default()
                        })
                        .collect()
                }),
                egress: (!ingress).then(|| {
                    rules
                        .iter()
                        .map(|(peers, ports)| EgressRule {
                            to_endpoints: peers.clone(),
                            to_ports: ports.clone(),
                            ..EgressRule::default()
                        })
                        .collect()
                }),
            };
            let p = NetworkPolicy {
                api_version: API_VERSION.into(),
                kind: KIND.into(),
                metadata: PolicyMetadata {
                    name: format!("p{n}"),
                    namespace: nss[next(2) as usize].into(),
                    labels: BTreeMap::new(),
                    annotations: BTreeMap::new(),
                },
                spec,
            };
            if let Err(e) = p.validate() {
                panic!("round {round}: generated policy refused: {e}");
            }
            policies.push(p);
        }
        let compiled = compile(&policies, &ids, ClusterId::new(1).unwrap());
        let peers: Vec<NumericIdentity> = ids
            .keys()
            .copied()
            .chain([NumericIdentity::HOST, NumericIdentity::WORLD])
            .collect();
        for subject in ids
            .keys()
            .filter(|i| i.cluster_id() == ClusterId::new(1).ok())
        {
            for peer in &peers {
                for (proto, port) in [
                    (IpProto::Tcp, 80),
                    (IpProto::Tcp, 53),
                    (IpProto::Udp, 53),
                    (IpProto::Udp, 9),
                    (IpProto::Icmp, 0),
                ] {
                    for direction in [Direction::Ingress, Direction::Egress] {
                        let allowed =
                            datapath_allows(&compiled, *subject, *peer, proto, port, direction);
                        outcomes[usize::from(allowed)] += 1;
                        assert_eq!(
                            allowed,
                            policy_allows(&policies, &ids, *subject, *peer, proto, port, direction),
                            "round {round}: {subject} {direction} peer {peer} {proto:?}/{port}\n{policies:#?}"
                        );
                    }
                }
            }
        }
    }
    assert!(
        outcomes[0] > 1000 && outcomes[1] > 1000,
        "denied/allowed: {outcomes:?}"
    );
}

/// The scenario's identities, the CIDR identities of `prefixes` (numbered as an index would)
/// and the compiled `yaml`.
fn compile_with_prefixes(
    yaml: &str,
    prefixes: &[&str],
) -> (CompiledPolicy, BTreeMap<String, NumericIdentity>) {
    let mut cidrs = CidrIdentities::default();
    let mut ids = scenario();
    let mut by_prefix = BTreeMap::new();
    for p in prefixes {
        let net: ipnet::Ipv4Net = p.parse().unwrap();
        let id = cidrs.acquire(net).unwrap();
        ids.insert(id, cidr_labels(net));
        by_prefix.insert((*p).to_owned(), id);
    }
    (compile([&policy(yaml)], &ids, local_c2()), by_prefix)
}

#[test]
fn entities_name_the_host_the_world_the_cluster_and_everything() {
    let echo = id(2, 300);
    let egress = |entities: &str| {
        compile_with_prefixes(
            &with_spec(&format!(
                "  endpointSelector: {{ matchLabels: {{ app: echo }} }}\n  egress:\n    - toEntities: [ {entities} ]\n"
            )),
            &["198.51.100.0/24"],
        )
    };
    let cidr = NumericIdentity::local_scope(1);
    let peers_of = |c: &CompiledPolicy| -> Vec<Option<NumericIdentity>> {
        c.entries
            .keys()
            .filter(|k| k.subject == echo && k.direction == Direction::Egress)
            .map(|k| k.peer)
            .collect()
    };
    let (host, _) = egress("host");
    assert_eq!(peers_of(&host), vec![Some(NumericIdentity::HOST)]);
    let (world, _) = egress("world");
    assert!(datapath_allows(
        &world,
        echo,
        NumericIdentity::WORLD,
        IpProto::Tcp,
        443,
        Direction::Egress
    ));
    assert!(
        datapath_allows(&world, echo, cidr, IpProto::Tcp, 443, Direction::Egress),
        "a named prefix is part of the world"
    );
    assert!(!datapath_allows(
        &world,
        echo,
        id(1, 300),
        IpProto::Tcp,
        443,
        Direction::Egress
    ));
    assert!(!datapath_allows(
        &world,
        echo,
        NumericIdentity::REMOTE_NODE,
        IpProto::Tcp,
        443,
        Direction::Egress
    ));
    let (cluster, _) = egress("cluster");
    for (peer, allowed) in [
        (id(2, 301), true),
        (id(2, 302), true),
        (NumericIdentity::REMOTE_NODE, true),
        (NumericIdentity::HOST, true),
        (id(1, 300), false),
        (NumericIdentity::WORLD, false),
        (cidr, false),
    ] {
        assert_eq!(
            datapath_allows(&cluster, echo, peer, IpProto::Udp, 53, Direction::Egress),
            allowed,
            "cluster entity, peer {peer}"
        );
    }
    let (all, _) = egress("all, host");
    assert_eq!(
        peers_of(&all),
        vec![None, Some(NumericIdentity::HOST)],
        "all is any peer (the host entry is the built-in one)"
    );
}

#[test]
fn cidr_rules_match_the_prefixes_inside_them_minus_the_exceptions() {
    let echo = id(2, 300);
    let (c, ids) = compile_with_prefixes(
        &with_spec(
            "  endpointSelector: { matchLabels: { app: echo } }\n  egress:\n    - toCIDRSet: [ { cidr: 10.0.0.0/8, except: [ 10.1.0.0/16 ] } ]\n      toCIDR: [ 192.0.2.7 ]\n      toPorts: [ { ports: [ { port: \"5432\", protocol: TCP } ] } ]\n",
        ),
        &["10.0.0.0/8", "10.1.0.0/16", "10.2.3.0/24", "10.1.2.0/24", "192.0.2.7/32", "0.0.0.0/0"],
    );
    let allows = |peer: NumericIdentity| {
        datapath_allows(&c, echo, peer, IpProto::Tcp, 5432, Direction::Egress)
    };
    assert!(allows(ids["10.0.0.0/8"]));
    assert!(
        allows(ids["10.2.3.0/24"]),
        "a more specific prefix inside the rule's"
    );
    assert!(!allows(ids["10.1.0.0/16"]), "the exception");
    assert!(!allows(ids["10.1.2.0/24"]), "inside the exception");
    assert!(allows(ids["192.0.2.7/32"]), "a bare address is its /32");
    assert!(!allows(ids["0.0.0.0/0"]), "a broader prefix");
    assert!(!allows(NumericIdentity::WORLD));
    assert!(
        !allows(id(2, 301)),
        "the mesh's endpoints are matched by identity, never by CIDR"
    );
    assert!(!datapath_allows(
        &c,
        echo,
        ids["10.0.0.0/8"],
        IpProto::Tcp,
        80,
        Direction::Egress
    ));

    // 0.0.0.0/0 is the world: the unnamed rest of it as well.
    let (c, ids) = compile_with_prefixes(
        &with_spec("  endpointSelector: { matchLabels: { app: echo } }\n  ingress:\n    - fromCIDR: [ 0.0.0.0/0 ]\n"),
        &["0.0.0.0/0"],
    );
    for peer in [NumericIdentity::WORLD, ids["0.0.0.0/0"]] {
        assert!(datapath_allows(
            &c,
            echo,
            peer,
            IpProto::Udp,
            9,
            Direction::Ingress
        ));
    }
    assert!(!datapath_allows(
        &c,
        echo,
        id(1, 300),
        IpProto::Udp,
        9,
        Direction::Ingress
    ));
}

#[test]
fn bad_cidrs_and_entities_name_their_field() {
    let spec = |rule: &str| {
        with_spec(&format!(
            "  endpointSelector: {{}}\n  egress:\n    - {rule}\n"
        ))
    };
    for (rule, field, reason) in [
        (
            "toCIDR: [ 10.0.0.1/8 ]",
            "spec.egress[0].toCIDR",
            "host bits set (did you mean 10.0.0.0/8?)",
        ),
        (
            "toCIDR: [ \"fd00::/8\" ]",
            "spec.egress[0].toCIDR",
            "IPv6 is not supported",
        ),
        (
            "toCIDR: [ 10.0.0.0/33 ]",
            "spec.egress[0].toCIDR",
            "is not an IPv4 CIDR",
        ),
        (
            "toEntities: [ kube-apiserver ]",
            "spec.egress[0].toEntities[0]",
            "unknown variant `kube-apiserver`",
        ),
        (
            "toCIDRSet: [ { cidr: 10.0.0.0/8, except: [ 11.0.0.0/16 ] } ]",
            "spec.egress[0].toCIDRSet[0].except[0]",
            "11.0.0.0/16 is not a prefix inside 10.0.0.0/8",
        ),
        (
            "toCIDRSet: [ { cidr: 10.0.0.0/8, except: [ 10.0.0.0/8 ] } ]",
            "spec.egress[0].toCIDRSet[0].except[0]",
            "is not a prefix inside",
        ),
        ("toCIDRSet: []", "spec.egress[0].toCIDRSet", "at least one"),
        (
            "toEntities: []",
            "spec.egress[0].toEntities",
            "at least one",
        ),
    ] {
        let e = errors_of(&spec(rule));
        assert_eq!(e.0.len(), 1, "{rule}: {e}");
        assert!(
            e.0[0].field.starts_with(field) && e.0[0].reason.contains(reason),
            "{rule}: got {:?}: {:?}",
            e.0[0].field,
            e.0[0].reason
        );
    }
    // The stored form round-trips, bare addresses written as /32.
    let p = policy(&spec("toCIDR: [ 192.0.2.7, 10.0.0.0/8 ]\n      toCIDRSet: [ { cidr: 0.0.0.0/0, except: [ 10.0.0.0/8 ] } ]\n      toEntities: [ world, remote-node ]"));
    let json = p.to_json();
    assert!(
        json.contains(r#""toCIDR":["192.0.2.7/32","10.0.0.0/8"]"#),
        "{json}"
    );
    assert!(
        json.contains(r#""toEntities":["world","remote-node"]"#),
        "{json}"
    );
    assert_eq!(NetworkPolicy::from_json(&json).unwrap(), p);
}
