//! The NetworkPolicy document (DESIGN.md "Policy"): a Kubernetes-style manifest, stored by the
//! apiserver as JSON under `meshd/config/policies/v1/<namespace>/<name>`
//! ([`crate::NetworkPolicyKey`]) and read by the agents of the cluster. This module holds the
//! document, its label selectors and its validation (every problem reported with its field
//! path); what it means for the datapath (subjects, peers, default-deny, ports) is the policy
//! engine's, `meshd_mesh::policy`, which compiles it.
//!
//! ```yaml
//! apiVersion: meshd.io/v1
//! kind: NetworkPolicy
//! metadata: { name: echo-from-c1-clients, namespace: default }
//! spec:
//!   endpointSelector: { matchLabels: { app: echo } }
//!   ingress:
//!     - fromEndpoints: [ { matchLabels: { app: client, meshd.io/cluster: c1 } } ]
//!       toPorts: [ { ports: [ { port: "8080", protocol: TCP } ] } ]
//! ```

mod selector;

use std::collections::BTreeMap;
use std::fmt;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::labels::Labels;
use crate::names::{check_dns_label, check_dns_subdomain};
pub use selector::{EndpointSelector, Operator, SelectorRequirement};

pub const API_VERSION: &str = "meshd.io/v1";
pub const KIND: &str = "NetworkPolicy";
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: PolicyMetadata,
    pub spec: PolicySpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyMetadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySpec {
    pub endpoint_selector: EndpointSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IngressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_endpoints: Option<Vec<EndpointSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_entities: Option<Vec<Entity>>,
    #[serde(
        default,
        rename = "fromCIDR",
        skip_serializing_if = "Option::is_none",
        with = "cidr_list"
    )]
    pub from_cidr: Option<Vec<Ipv4Net>>,
    #[serde(
        default,
        rename = "fromCIDRSet",
        skip_serializing_if = "Option::is_none"
    )]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<EndpointSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_entities: Option<Vec<Entity>>,
    #[serde(
        default,
        rename = "toCIDR",
        skip_serializing_if = "Option::is_none",
        with = "cidr_list"
    )]
    pub to_cidr: Option<Vec<Ipv4Net>>,
    #[serde(default, rename = "toCIDRSet", skip_serializing_if = "Option::is_none")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
}

/// A group of peers named by what it is rather than by labels (Cilium's entities).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Entity {
    /// Everything outside the mesh: addresses in no cluster's ipcache, CIDR rules' prefixes
    /// included.
    World,
    /// The node the endpoint runs on.
    Host,
    /// The other nodes of the mesh (their own addresses, not their endpoints).
    RemoteNode,
    /// The local cluster: its endpoints, its nodes and the host.
    Cluster,
    /// Any peer at all.
    All,
}

/// A prefix, minus the prefixes of `except`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CidrRule {
    #[serde(with = "cidr")]
    pub cidr: Ipv4Net,
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "cidr_vec")]
    pub except: Vec<Ipv4Net>,
}

/// CIDRs as written in policies: `10.0.0.0/8`, or a bare address for its /32. IPv6 is refused
/// (the datapath is IPv4 only), as is a prefix with host bits set, whose meaning is unclear.
mod cidr {
    use ipnet::Ipv4Net;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn parse(text: &str) -> Result<Ipv4Net, String> {
        let text = text.trim();
        let net = if text.contains('/') {
            text.parse::<Ipv4Net>().ok()
        } else {
            text.parse::<std::net::Ipv4Addr>()
                .ok()
                .map(|a| Ipv4Net::new(a, 32).expect("/32 is a valid length"))
        };
        let net = net.ok_or_else(|| {
            if text.contains(':') {
                format!("{text:?}: IPv6 is not supported yet")
            } else {
                format!("{text:?} is not an IPv4 CIDR (such as 192.0.2.0/24) or address")
            }
        })?;
        if net.trunc() != net {
            return Err(format!(
                "{text:?} has host bits set (did you mean {}?)",
                net.trunc()
            ));
        }
        Ok(net)
    }

    pub fn serialize<S: Serializer>(net: &Ipv4Net, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(net)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv4Net, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

mod cidr_vec {
    use ipnet::Ipv4Net;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(nets: &[Ipv4Net], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(nets.iter().map(|n| n.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Ipv4Net>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| super::cidr::parse(t).map_err(serde::de::Error::custom))
            .collect()
    }
}

mod cidr_list {
    use ipnet::Ipv4Net;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(nets: &Option<Vec<Ipv4Net>>, s: S) -> Result<S::Ok, S::Error> {
        super::cidr_vec::serialize(nets.as_deref().unwrap_or_default(), s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Ipv4Net>>, D::Error> {
        super::cidr_vec::deserialize(d).map(Some)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRule {
    pub ports: Vec<PortProtocol>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortProtocol {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<L4Protocol>,
}

/// A port as written: Kubernetes manifests quote it (`"8080"`), hand-written ones often don't.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    Number(i64),
    Text(String),
}

impl PortSpec {
    /// The port, 0 meaning every port.
    pub fn parse(&self) -> Result<u16, String> {
        match self {
            PortSpec::Number(n) => u16::try_from(*n)
                .map_err(|_| format!("{n} is not a port (0-65535, 0 = every port)")),
            PortSpec::Text(s) => s
                .trim()
                .parse::<u16>()
                .map_err(|_| format!("{s:?} is not a port (a number 0-65535, 0 = every port; named ports are not supported)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum L4Protocol {
    Tcp,
    Udp,
    Icmp,
    Any,
}

/// One problem with one field of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// `namespace/name`, once known.
    pub policy: Option<String>,
    /// Path of the field in the manifest, e.g. `spec.ingress[0].toPorts[0].ports[0].port`;
    /// empty for the document as a whole.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.policy {
            write!(f, "policy {p}: ")?;
        }
        if self.field.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

impl std::error::Error for PolicyError {}

/// Every problem found in a policy, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            e.fmt(f)?;
        }
        Ok(())
    }
}

impl PolicyErrors {
    /// The field paths, in order (handy in tests and status output).
    pub fn fields(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.field.as_str()).collect()
    }
}

fn deserialize_error<E: fmt::Display>(err: serde_path_to_error::Error<E>) -> PolicyErrors {
    let path = err.path().to_string();
    let field = if path == "." { String::new() } else { path };
    PolicyErrors(vec![PolicyError {
        policy: None,
        field,
        reason: err.inner().to_string(),
    }])
}

/// Collects errors with their paths while walking a policy.
struct Checker {
    policy: String,
    errors: Vec<PolicyError>,
}

impl Checker {
    fn error(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(PolicyError {
            policy: Some(self.policy.clone()),
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn selector(&mut self, path: &str, sel: &EndpointSelector) {
        let labels = Labels::from_pairs(
            sel.match_labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        if let Err(e) = labels.validate("matchLabels") {
            self.error(format!("{path}.{}", e.field), e.reason);
        }
        for (i, req) in sel.match_expressions.iter().enumerate() {
            let at = format!("{path}.matchExpressions[{i}]");
            if let Err(e) = Labels::from_pairs([(req.key.as_str(), "")]).validate("key") {
                self.error(format!("{at}.key"), e.reason);
            }
            match req.operator {
                Operator::In | Operator::NotIn => {
                    if req.values.is_empty() {
                        self.error(
                            format!("{at}.values"),
                            format!("operator {:?} needs at least one value", req.operator),
                        );
                    }
                    for (j, v) in req.values.iter().enumerate() {
                        if let Err(e) = Labels::from_pairs([("k", v.as_str())]).validate("v") {
                            self.error(format!("{at}.values[{j}]"), e.reason);
                        }
                    }
                }
                Operator::Exists | Operator::DoesNotExist => {
                    if !req.values.is_empty() {
                        self.error(
                            format!("{at}.values"),
                            format!("operator {:?} takes no values", req.operator),
                        );
                    }
                }
            }
        }
    }

    fn peers(&mut self, path: &str, peers: Option<&[EndpointSelector]>) {
        let Some(peers) = peers else { return };
        if peers.is_empty() {
            self.error(
                path,
                "must list at least one selector (omit the field to allow any peer, or use [{}] for every endpoint of the namespace)",
            );
        }
        for (i, sel) in peers.iter().enumerate() {
            self.selector(&format!("{path}[{i}]"), sel);
        }
    }

    fn non_empty<T>(&mut self, path: &str, list: Option<&[T]>) {
        if list.is_some_and(|l| l.is_empty()) {
            self.error(
                path,
                "must list at least one entry (omit the field instead)",
            );
        }
    }

    fn cidr_set(&mut self, path: &str, rules: Option<&[CidrRule]>) {
        self.non_empty(path, rules);
        for (i, rule) in rules.into_iter().flatten().enumerate() {
            for (j, e) in rule.except.iter().enumerate() {
                if e.prefix_len() <= rule.cidr.prefix_len() || !rule.cidr.contains(&e.network()) {
                    self.error(
                        format!("{path}[{i}].except[{j}]"),
                        format!("{e} is not a prefix inside {}", rule.cidr),
                    );
                }
            }
        }
    }

    fn ports(&mut self, path: &str, rules: Option<&[PortRule]>) {
        let Some(rules) = rules else { return };
        if rules.is_empty() {
            self.error(
                path,
                "must list at least one port rule (omit the field to allow every port)",
            );
        }
        for (i, rule) in rules.iter().enumerate() {
            let at = format!("{path}[{i}].ports");
            if rule.ports.is_empty() {
                self.error(&at, "must list at least one port");
            }
            for (j, pp) in rule.ports.iter().enumerate() {
                let port = match &pp.port {
                    None => Ok(0),
                    Some(spec) => spec.parse(),
                };
                match port {
                    Err(reason) => self.error(format!("{at}[{j}].port"), reason),
                    Ok(p) if p != 0 && pp.protocol == Some(L4Protocol::Icmp) => self.error(
                        format!("{at}[{j}].port"),
                        format!("{p}: ICMP has no ports (omit the port)"),
                    ),
                    Ok(_) => {}
                }
            }
        }
    }
}

impl NetworkPolicy {
    /// Parses one policy from JSON (as stored in etcd) and validates it.
    pub fn from_json(text: &str) -> Result<Self, PolicyErrors> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let policy: Self = serde_path_to_error::deserialize(de).map_err(deserialize_error)?;
        policy.validate()?;
        Ok(policy)
    }

    /// Parses one policy from a YAML document and validates it.
    pub fn from_yaml(text: &str) -> Result<Self, PolicyErrors> {
        let de = serde_yaml::Deserializer::from_str(text);
        let policy: Self = serde_path_to_error::deserialize(de).map_err(deserialize_error)?;
        policy.validate()?;
        Ok(policy)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a policy always serializes")
    }

    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// Checks everything serde cannot: names, labels, selectors, ports. Reports every problem.
    pub fn validate(&self) -> Result<(), PolicyErrors> {
        let mut c = Checker {
            policy: self.id(),
            errors: Vec::new(),
        };
        if self.api_version != API_VERSION {
            c.error(
                "apiVersion",
                format!(
                    "{:?} is not supported (expected {API_VERSION:?})",
                    self.api_version
                ),
            );
        }
        if self.kind != KIND {
            c.error("kind", format!("{:?} is not {KIND:?}", self.kind));
        }
        if let Err(e) = check_dns_subdomain("metadata.name", &self.metadata.name) {
            c.error(e.field, e.reason);
        }
        if let Err(e) = check_dns_label("metadata.namespace", &self.metadata.namespace) {
            c.error(e.field, e.reason);
        }
        let spec = &self.spec;
        c.selector("spec.endpointSelector", &spec.endpoint_selector);
        if spec.ingress.is_none() && spec.egress.is_none() {
            c.error(
                "spec",
                "needs an ingress or an egress section (an empty list denies that direction)",
            );
        }
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            let at = format!("spec.ingress[{i}]");
            c.peers(&format!("{at}.fromEndpoints"), r.from_endpoints.as_deref());
            c.non_empty(&format!("{at}.fromEntities"), r.from_entities.as_deref());
            c.non_empty(&format!("{at}.fromCIDR"), r.from_cidr.as_deref());
            c.cidr_set(&format!("{at}.fromCIDRSet"), r.from_cidr_set.as_deref());
            c.ports(&format!("{at}.toPorts"), r.to_ports.as_deref());
        }
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            let at = format!("spec.egress[{i}]");
            c.peers(&format!("{at}.toEndpoints"), r.to_endpoints.as_deref());
            c.non_empty(&format!("{at}.toEntities"), r.to_entities.as_deref());
            c.non_empty(&format!("{at}.toCIDR"), r.to_cidr.as_deref());
            c.cidr_set(&format!("{at}.toCIDRSet"), r.to_cidr_set.as_deref());
            c.ports(&format!("{at}.toPorts"), r.to_ports.as_deref());
        }
        if c.errors.is_empty() {
            Ok(())
        } else {
            Err(PolicyErrors(c.errors))
        }
    }
}
