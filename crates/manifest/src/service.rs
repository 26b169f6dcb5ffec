//! The Service manifest: a stable virtual IP (VIP) and ports in front of the endpoints its
//! selector matches, optionally merged across clusters (see `annotations`).
//!
//! ```yaml
//! apiVersion: meshd.io/v1
//! kind: Service
//! metadata:
//!   name: echo
//!   namespace: default
//!   annotations: { service.meshd.io/global: "true" }
//! spec:
//!   selector: { app: echo }
//!   ports: [ { name: http, port: 80, targetPort: 8080, protocol: TCP } ]
//!   clusterIP: 10.96.0.10   # optional: allocated from the service CIDR when absent
//! ```
//!
//! Public endpoints use Kubernetes' fields with their meanings: `spec.type` (`ClusterIP`,
//! the default, `NodePort` or `LoadBalancer`), `spec.ports[].nodePort` (allocated by the
//! apiserver from its node port range when absent), `spec.externalIPs`,
//! `spec.loadBalancerIP`, `spec.externalTrafficPolicy` (`Cluster`, the default, or `Local`)
//! and `spec.healthCheckNodePort` (`Local` policy only; allocated when absent). What needs
//! the cluster to check (the range, ports taken by other services, pod CIDRs and node IPs) is
//! checked by the apiserver; the rest here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use meshd_state::{check_dns_label, FieldError, Labels, Protocol, ServiceType, TrafficPolicy};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::annotations::ServiceOptions;
use crate::meta::ObjectMeta;

/// `kind: Service`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// Endpoints whose labels include all of these back the service (in its namespace).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
    /// The VIP; allocated by the apiserver when absent, and kept from then on.
    #[serde(rename = "clusterIP", default, skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<IpAddr>,
    /// `ClusterIP` when absent.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub service_type: Option<ServiceType>,
    /// Addresses (IPv4) a router sends to the nodes; every service port answers on them.
    #[serde(rename = "externalIPs", default, skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<IpAddr>,
    /// `LoadBalancer` services: the address the load balancer (or a router) sends to the nodes.
    #[serde(
        rename = "loadBalancerIP",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub load_balancer_ip: Option<IpAddr>,
    /// `Cluster` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<TrafficPolicy>,
    /// `Local` policy: a node port answering 200 on nodes with a local backend, 503 on others,
    /// for an external load balancer's health check. Allocated by the apiserver when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
}

impl ServiceSpec {
    pub fn service_type(&self) -> ServiceType {
        self.service_type.unwrap_or_default()
    }

    pub fn external_traffic_policy(&self) -> TrafficPolicy {
        self.external_traffic_policy.unwrap_or_default()
    }

    /// Whether the apiserver gives this service a health check node port.
    pub fn wants_health_check_node_port(&self) -> bool {
        self.service_type().has_node_ports()
            && self.external_traffic_policy() == TrafficPolicy::Local
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// Port on the backends; the service port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<TargetPort>,
    /// TCP when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Informational in Kubernetes (`http`, `grpc`); kept so manifests round-trip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    /// NodePort and LoadBalancer services: the port this service port answers on every
    /// node's IP. Allocated by the apiserver when absent, and kept from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

impl ServicePort {
    pub fn protocol(&self) -> Protocol {
        self.protocol.unwrap_or(Protocol::Tcp)
    }

    /// The backend port: `targetPort` if numeric, else the service port. Named target ports are
    /// refused by validation, so after `Service::validate` this is always the right number.
    pub fn target_port(&self) -> u16 {
        match &self.target_port {
            Some(TargetPort::Number(n)) => *n,
            _ => self.port,
        }
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }
}

/// Kubernetes' int-or-string `targetPort`. Numbers written as strings (`"8080"`) are numbers;
/// names are kept so validation can refuse them with a clear reason rather than a type error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl Serialize for TargetPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TargetPort::Number(n) => s.serialize_u16(*n),
            TargetPort::Name(name) => s.serialize_str(name),
        }
    }
}

impl<'de> Deserialize<'de> for TargetPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TargetPort;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1-65535) or a port name")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<TargetPort, E> {
                u16::try_from(n)
                    .map(TargetPort::Number)
                    .map_err(|_| E::custom(format!("{n} is not a port number (1-65535)")))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<TargetPort, E> {
                u64::try_from(n)
                    .map_err(|_| E::custom(format!("{n} is not a port number (1-65535)")))
                    .and_then(|n| self.visit_u64(n))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TargetPort, E> {
                match s.parse::<u64>() {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Ok(TargetPort::Name(s.to_owned())),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The fields of `spec` and of `spec.ports[]` a Service may have; Kubernetes has more.
const SPEC_FIELDS: [&str; 8] = [
    "selector",
    "ports",
    "clusterIP",
    "type",
    "externalIPs",
    "loadBalancerIP",
    "externalTrafficPolicy",
    "healthCheckNodePort",
];
const PORT_FIELDS: [&str; 6] = [
    "name",
    "port",
    "targetPort",
    "protocol",
    "appProtocol",
    "nodePort",
];

/// The first field of a Service document (a Kubernetes `v1` one, typically) that meshd does
/// not implement, named with its path (`spec.sessionAffinity`, `spec.externalName`), so
/// a manifest brought from Kubernetes is refused for what it says, never half applied.
pub(crate) fn unsupported_field(doc: &serde_yaml::Value) -> Option<(String, String)> {
    let spec = doc.get("spec")?.as_mapping()?;
    let refuse = |at: String, part: &str, supported: &[&str]| {
        let reason = format!(
            "not supported by meshd (a Service {part} has {})",
            supported.join(", ")
        );
        (at, reason)
    };
    for key in spec.keys() {
        let name = key.as_str().unwrap_or_default();
        if !SPEC_FIELDS.contains(&name) {
            return Some(refuse(format!("spec.{name}"), "spec", &SPEC_FIELDS));
        }
    }
    let ports = spec.get("ports").and_then(|p| p.as_sequence())?;
    for (i, port) in ports.iter().enumerate() {
        for key in port.as_mapping().map(|m| m.keys()).into_iter().flatten() {
            let name = key.as_str().unwrap_or_default();
            if !PORT_FIELDS.contains(&name) {
                return Some(refuse(
                    format!("spec.ports[{i}].{name}"),
                    "port",
                    &PORT_FIELDS,
                ));
            }
        }
    }
    None
}

impl Service {
    pub fn namespace(&self) -> &str {
        &self.metadata.namespace
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// The selector as a validated-label type.
    pub fn selector(&self) -> Labels {
        Labels::from_pairs(self.spec.selector.clone())
    }

    /// Global, shared and affinity from the annotations (validated by `validate`).
    pub fn options(&self) -> Result<ServiceOptions, FieldError> {
        ServiceOptions::from_annotations(&self.metadata.annotations)
    }

    /// Every rule a Service must satisfy; the error names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        self.metadata.validate()?;
        self.options()?;
        self.validate_exposure()?;
        if self.spec.selector.is_empty() {
            return Err(FieldError::new(
                "spec.selector",
                "must select at least one label (backends are the endpoints it matches)",
            ));
        }
        self.selector().validate("spec.selector")?;
        if self.spec.ports.is_empty() {
            return Err(FieldError::new("spec.ports", "at least one port is needed"));
        }
        let mut names = BTreeSet::new();
        let mut numbers = BTreeSet::new();
        let many = self.spec.ports.len() > 1;
        for (i, p) in self.spec.ports.iter().enumerate() {
            let at = |field: &str| format!("spec.ports[{i}].{field}");
            if p.port == 0 {
                return Err(FieldError::new(at("port"), "must be 1-65535"));
            }
            match &p.target_port {
                Some(TargetPort::Number(0)) => {
                    return Err(FieldError::new(at("targetPort"), "must be 1-65535"))
                }
                Some(TargetPort::Name(name)) => {
                    return Err(FieldError::new(
                        at("targetPort"),
                        format!(
                            "named target port {name:?} is not supported: endpoints carry no \
                             port names, give the number"
                        ),
                    ))
                }
                _ => {}
            }
            if p.protocol() == Protocol::Sctp {
                return Err(FieldError::new(
                    at("protocol"),
                    "SCTP is not supported by the datapath (TCP or UDP)",
                ));
            }
            match &p.name {
                Some(name) => {
                    check_dns_label(&at("name"), name)?;
                    if !names.insert(name.clone()) {
                        return Err(FieldError::new(
                            at("name"),
                            format!("duplicate port name {name:?}"),
                        ));
                    }
                }
                // As in Kubernetes: with several ports, each needs a name so backends of other
                // clusters can be matched to the right one.
                None if many => {
                    return Err(FieldError::new(
                        at("name"),
                        "required when the service has more than one port",
                    ))
                }
                None => {}
            }
            if p.node_port.is_some() && !self.spec.service_type().has_node_ports() {
                return Err(FieldError::new(
                    at("nodePort"),
                    format!(
                        "a {} service has no node ports (type NodePort or LoadBalancer has)",
                        self.spec.service_type()
                    ),
                ));
            }
            if p.node_port == Some(0) {
                return Err(FieldError::new(
                    at("nodePort"),
                    "must be 1-65535 (leave it out to have one allocated)",
                ));
            }
            if !numbers.insert((p.port, p.protocol())) {
                return Err(FieldError::new(
                    at("port"),
                    format!("duplicate port {}/{:?}", p.port, p.protocol()),
                ));
            }
        }
        self.validate_node_ports()
    }

    /// External addresses, the traffic policy and the health check port: what Kubernetes
    /// allows with each service type.
    fn validate_exposure(&self) -> Result<(), FieldError> {
        let spec = &self.spec;
        let kind = spec.service_type();
        let mut seen = BTreeSet::new();
        for (i, ip) in spec.external_ips.iter().enumerate() {
            let at = format!("spec.externalIPs[{i}]");
            check_external_address(&at, *ip)?;
            if !seen.insert(*ip) {
                return Err(FieldError::new(at, format!("duplicate address {ip}")));
            }
        }
        if let Some(ip) = spec.load_balancer_ip {
            if kind != ServiceType::LoadBalancer {
                return Err(FieldError::new(
                    "spec.loadBalancerIP",
                    format!("only a LoadBalancer service has one (this one is {kind})"),
                ));
            }
            check_external_address("spec.loadBalancerIP", ip)?;
        }
        if spec.external_traffic_policy() == TrafficPolicy::Local && !kind.has_node_ports() {
            return Err(FieldError::new(
                "spec.externalTrafficPolicy",
                format!(
                    "Local applies to traffic from outside the mesh, which a {kind} service \
                     does not take (type NodePort or LoadBalancer does)"
                ),
            ));
        }
        match spec.health_check_node_port {
            Some(_) if !spec.wants_health_check_node_port() => Err(FieldError::new(
                "spec.healthCheckNodePort",
                "only a NodePort or LoadBalancer service with externalTrafficPolicy Local has one",
            )),
            Some(0) => Err(FieldError::new(
                "spec.healthCheckNodePort",
                "must be 1-65535 (leave it out to have one allocated)",
            )),
            _ => Ok(()),
        }
    }

    /// A node port serves one service port (per protocol, as in Kubernetes), and the health
    /// check port none.
    fn validate_node_ports(&self) -> Result<(), FieldError> {
        let mut used = BTreeMap::new();
        for (i, p) in self.spec.ports.iter().enumerate() {
            let Some(np) = p.node_port else { continue };
            if let Some(j) = used.insert((np, p.protocol()), i) {
                return Err(FieldError::new(
                    format!("spec.ports[{i}].nodePort"),
                    format!("{np} is also the node port of spec.ports[{j}]"),
                ));
            }
        }
        if let Some(hc) = self.spec.health_check_node_port {
            if let Some(((_, _), i)) = used.iter().find(|((np, _), _)| *np == hc) {
                return Err(FieldError::new(
                    "spec.healthCheckNodePort",
                    format!("{hc} is the node port of spec.ports[{i}]"),
                ));
            }
        }
        Ok(())
    }

    /// Every node port the service holds: its ports', then the health check's.
    pub fn node_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.spec
            .ports
            .iter()
            .filter_map(|p| p.node_port)
            .chain(self.spec.health_check_node_port)
    }
}

/// An external or load balancer address: an IPv4 unicast address (the datapath is IPv4) that
/// a router can send to the nodes.
fn check_external_address(at: &str, ip: IpAddr) -> Result<(), FieldError> {
    let IpAddr::V4(v4) = ip else {
        return Err(FieldError::new(
            at,
            format!("{ip} is not an IPv4 address (the datapath serves IPv4)"),
        ));
    };
    if v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast() {
        return Err(FieldError::new(
            at,
            format!("{ip} is not a unicast address a router could send to the nodes"),
        ));
    }
    Ok(())
}
