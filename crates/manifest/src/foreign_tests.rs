//! Policies users bring: Cilium's documentation examples and Kubernetes' own, rewritten into
//! meshd's policy with their meaning kept, and what meshd cannot enforce refused by field.

use meshd_state::policy::{Entity, L4Protocol};

use crate::*;

fn policy(text: &str) -> NetworkPolicy {
    let docs = parse_str("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    let Document::NetworkPolicy(p) = docs.into_iter().next().unwrap().document else {
        panic!("not a policy")
    };
    p
}

fn refusal(text: &str) -> DocumentError {
    let errs = parse_str("p.yaml", text).unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    errs.0[0].clone()
}

/// Cilium's documentation: "Ingress Default Deny" with an empty rule.
const CILIUM_DEFAULT_DENY: &str =
    include_str!("../../../examples/policies/cilium-default-deny.yaml");

/// Cilium's cluster mesh documentation: allow x-wing of cluster1 to reach rebel-base of
/// cluster2.
const CILIUM_CROSS_CLUSTER: &str =
    include_str!("../../../examples/policies/cilium-cross-cluster.yaml");

#[test]
fn cilium_empty_rule_denies_everything_in_its_direction() {
    let p = policy(CILIUM_DEFAULT_DENY);
    assert_eq!(p.api_version, "meshd.io/v1");
    assert_eq!(p.metadata.name, "deny-all-ingress");
    assert_eq!(p.metadata.namespace, "default");
    assert_eq!(p.spec.ingress, Some(vec![]), "enforced, nothing allowed");
    assert_eq!(p.spec.egress, None, "egress stays open");
    assert_eq!(
        p.metadata.annotations[SOURCE_ANNOTATION],
        "cilium.io/v2/CiliumNetworkPolicy"
    );
    // A section without rules enforces nothing in Cilium: nothing is left to store.
    let e = refusal(
        &CILIUM_DEFAULT_DENY
            .replace("  - {}\n", "")
            .replace("ingress:", "ingress: []"),
    );
    assert_eq!(e.field, "spec");
}

#[test]
fn cilium_label_names_are_meshd_label_names() {
    let p = policy(CILIUM_CROSS_CLUSTER);
    assert_eq!(
        p.spec.endpoint_selector.match_labels["meshd.io/cluster"],
        "cluster1"
    );
    let peer = &p.spec.egress.as_ref().unwrap()[0]
        .to_endpoints
        .as_ref()
        .unwrap()[0];
    assert_eq!(peer.match_labels["meshd.io/cluster"], "cluster2");
    assert_eq!(peer.match_labels["name"], "rebel-base");
    assert_eq!(
        p.metadata.annotations["meshd.io/description"],
        "Allow x-wing in cluster1 to contact rebel-base in cluster2"
    );
    // `k8s:` prefixes and the namespace label, in meshd's own kind as well.
    let p = policy(
        r#"
apiVersion: meshd.io/v1
kind: NetworkPolicy
metadata: { name: p }
spec:
  endpointSelector: { matchLabels: { "k8s:role": backend } }
  ingress:
    - fromEndpoints:
        - matchLabels: { "k8s:io.kubernetes.pod.namespace": prod, "any:role": frontend }
"#,
    );
    assert_eq!(p.spec.endpoint_selector.match_labels["role"], "backend");
    let peer = &p.spec.ingress.as_ref().unwrap()[0]
        .from_endpoints
        .as_ref()
        .unwrap()[0];
    assert_eq!(peer.match_labels["meshd.io/namespace"], "prod");
    assert_eq!(peer.match_labels["role"], "frontend");
}

#[test]
fn cilium_cidr_and_entity_rules_carry_over() {
    let p = policy(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: { name: cidr-rule, namespace: prod }
spec:
  endpointSelector: { matchLabels: { app: myService } }
  egress:
  - toCIDR: [ 20.1.1.1/32 ]
  - toCIDRSet:
    - cidr: 10.0.0.0/8
      except: [ 10.96.0.0/12 ]
  - toEntities: [ host, world ]
    toPorts: [ { ports: [ { port: "53", protocol: ANY } ] } ]
"#,
    );
    let egress = p.spec.egress.as_ref().unwrap();
    assert_eq!(egress.len(), 3);
    assert_eq!(
        egress[0].to_cidr.as_ref().unwrap()[0].to_string(),
        "20.1.1.1/32"
    );
    let set = &egress[1].to_cidr_set.as_ref().unwrap()[0];
    assert_eq!(set.cidr.to_string(), "10.0.0.0/8");
    assert_eq!(set.except[0].to_string(), "10.96.0.0/12");
    assert_eq!(
        egress[2].to_entities.as_deref(),
        Some(&[Entity::Host, Entity::World][..])
    );
}

#[test]
fn what_meshd_cannot_enforce_is_refused_by_field() {
    let cnp = |spec: &str| {
        format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{ name: p }}\nspec:\n  endpointSelector: {{}}\n{spec}")
    };
    for (spec, field, reason) in [
        (
            "  egress:\n  - toFQDNs: [ { matchName: example.com } ]\n",
            "spec.egress[0].toFQDNs",
            "DNS",
        ),
        (
            "  egress:\n  - toServices: [ { k8sService: { serviceName: db } } ]\n",
            "spec.egress[0].toServices",
            "service-based",
        ),
        (
            "  ingress:\n  - toPorts: [ { ports: [ { port: \"80\" } ], rules: { http: [ { method: GET } ] } } ]\n",
            "spec.ingress[0].toPorts[0].rules",
            "L7",
        ),
        (
            "  ingressDeny:\n  - fromEntities: [ world ]\n",
            "spec.ingressDeny",
            "deny rules",
        ),
        (
            "  ingress:\n  - fromEndpoints: [ {} ]\n    toPorts: [ { ports: [ { port: \"80\", endPort: 90 } ] } ]\n",
            "spec.ingress[0].toPorts[0].ports[0].endPort",
            "ranges",
        ),
        (
            "  ingress:\n  - fromEntities: [ kube-apiserver ]\n",
            "spec.ingress[0].fromEntities",
            "kube-apiserver",
        ),
        (
            "  ingress:\n  - fromEndpoints: [ {} ]\n    madeUp: 1\n",
            "spec.ingress[0].madeUp",
            "unknown field",
        ),
    ] {
        let e = refusal(&cnp(spec));
        assert!(
            e.field.starts_with(field) && e.reason.contains(reason),
            "{spec}: got {}: {}",
            e.field,
            e.reason
        );
        assert_eq!(e.object.as_deref(), Some("CiliumNetworkPolicy default/p"), "{e}");
    }
    let e = refusal("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: { name: p }\nspecs: [ { endpointSelector: {}, ingress: [ {} ] }, { endpointSelector: {}, egress: [ {} ] } ]\n");
    assert_eq!(e.field, "specs");
    let e = refusal("apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: { name: p }\nspec: { endpointSelector: {} }\n");
    assert_eq!(e.field, "apiVersion");
}

/// Kubernetes' documentation example, with the namespace named the way meshd knows
/// namespaces (by `kubernetes.io/metadata.name`).
const K8S_EXAMPLE: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: test-network-policy
  namespace: default
  uid: 0d4e3b9c-0000-4000-8000-000000000000
  resourceVersion: "4711"
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
  - Ingress
  - Egress
  ingress:
  - from:
    - ipBlock:
        cidr: 172.17.0.0/16
        except:
        - 172.17.1.0/24
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: myproject
    - podSelector:
        matchLabels:
          role: frontend
    ports:
    - protocol: TCP
      port: 6379
  egress:
  - to:
    - ipBlock:
        cidr: 10.0.0.0/24
    ports:
    - protocol: TCP
      port: 5978
"#;

#[test]
fn kubernetes_network_policy_keeps_its_meaning() {
    let p = policy(K8S_EXAMPLE);
    assert_eq!(p.metadata.name, "test-network-policy");
    assert!(!p.metadata.annotations.is_empty());
    assert_eq!(
        p.metadata.annotations[SOURCE_ANNOTATION],
        "networking.k8s.io/v1/NetworkPolicy"
    );
    assert_eq!(p.spec.endpoint_selector.match_labels["role"], "db");
    let ingress = &p.spec.ingress.as_ref().unwrap()[0];
    let peers = ingress.from_endpoints.as_ref().unwrap();
    assert_eq!(peers.len(), 2, "{peers:?}");
    // The namespace selector: every endpoint of namespace myproject.
    assert!(peers[0].match_labels.is_empty());
    assert_eq!(peers[0].match_expressions[0].key, "meshd.io/namespace");
    assert_eq!(peers[0].match_expressions[0].values, vec!["myproject"]);
    // The pod selector: the policy's own namespace.
    assert_eq!(peers[1].match_labels["role"], "frontend");
    assert_eq!(
        ingress.from_cidr_set.as_ref().unwrap()[0].except[0].to_string(),
        "172.17.1.0/24"
    );
    let ports = &ingress.to_ports.as_ref().unwrap()[0].ports[0];
    assert_eq!(ports.protocol, Some(L4Protocol::Tcp));
    let egress = &p.spec.egress.as_ref().unwrap()[0];
    assert_eq!(
        egress.to_cidr_set.as_ref().unwrap()[0].cidr.to_string(),
        "10.0.0.0/24"
    );
    assert!(egress.to_endpoints.is_none());

    // policyTypes defaults: Ingress, and Egress only when there is an egress section; an
    // empty rule allows everything (unlike Cilium's).
    let p = policy(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: { name: allow-all }\nspec:\n  podSelector: {}\n  ingress:\n  - {}\n",
    );
    assert_eq!(p.spec.ingress.as_ref().unwrap().len(), 1);
    let rule = &p.spec.ingress.as_ref().unwrap()[0];
    assert!(
        rule.from_endpoints.is_none()
            && rule.from_entities.is_none()
            && rule.from_cidr.is_none()
            && rule.from_cidr_set.is_none()
            && rule.to_ports.is_none(),
        "any peer, any port"
    );
    assert!(p.spec.egress.is_none());
    let p = policy(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: { name: default-deny }\nspec:\n  podSelector: {}\n  policyTypes: [ Ingress, Egress ]\n",
    );
    assert_eq!(p.spec.ingress, Some(vec![]));
    assert_eq!(p.spec.egress, Some(vec![]));
    // A namespaceSelector of every namespace reaches identities with or without the label.
    let p = policy(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: { name: any-ns }\nspec:\n  podSelector: {}\n  ingress:\n  - from: [ { namespaceSelector: {}, podSelector: { matchLabels: { app: mon } } } ]\n",
    );
    let peers = p.spec.ingress.as_ref().unwrap()[0]
        .from_endpoints
        .clone()
        .unwrap();
    assert_eq!(peers.len(), 2);
    assert!(peers.iter().all(|s| s.match_labels["app"] == "mon"));
}

#[test]
fn kubernetes_fields_meshd_cannot_follow_are_refused() {
    let np = |spec: &str| {
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{ name: p }}\nspec:\n  podSelector: {{}}\n{spec}")
    };
    for (spec, field, reason) in [
        (
            "  ingress:\n  - from: [ { namespaceSelector: { matchLabels: { project: myproject } } } ]\n",
            "spec.ingress[0].from[0].namespaceSelector.matchLabels.project",
            "by name only",
        ),
        (
            "  ingress:\n  - ports: [ { port: 32000, endPort: 32768 } ]\n",
            "spec.ingress[0].ports[0].endPort",
            "ranges",
        ),
        (
            "  ingress:\n  - ports: [ { port: 80, protocol: SCTP } ]\n",
            "spec.ingress[0].ports[0].protocol",
            "SCTP",
        ),
        (
            "  policyTypes: [ Ingress ]\n  egress:\n  - {}\n",
            "spec.egress",
            "policyTypes",
        ),
        (
            "  ingress:\n  - ports: [ { port: http } ]\n",
            "spec.ingress[0].toPorts[0].ports[0].port",
            "named ports",
        ),
    ] {
        let e = refusal(&np(spec));
        assert!(
            e.field.starts_with(field) && e.reason.contains(reason),
            "{spec}: got {}: {}",
            e.field,
            e.reason
        );
    }
}
