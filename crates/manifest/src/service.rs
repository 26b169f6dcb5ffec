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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use meshd_state::{check_dns_label, FieldError, Labels, Protocol};
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
    /// Kubernetes' service type; only `ClusterIP` exists in meshd.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub service_type: Option<String>,
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
const SPEC_FIELDS: [&str; 4] = ["selector", "ports", "clusterIP", "type"];
const PORT_FIELDS: [&str; 5] = ["name", "port", "targetPort", "protocol", "appProtocol"];

/// The first field of a Service document (a Kubernetes `v1` one, typically) that meshd does
/// not implement, named with its path (`spec.sessionAffinity`, `spec.ports[0].nodePort`), so
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
        if let Some(t) = &self.spec.service_type {
            if t != "ClusterIP" {
                return Err(FieldError::new(
                    "spec.type",
                    format!("{t:?} is not supported (meshd services are ClusterIP services)"),
                ));
            }
        }
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
            if !numbers.insert((p.port, p.protocol())) {
                return Err(FieldError::new(
                    at("port"),
                    format!("duplicate port {}/{:?}", p.port, p.protocol()),
                ));
            }
        }
        Ok(())
    }
}
