//! The agent's routing settings (`routing_mode`, `native_routing_cidr`,
//! `auto_direct_node_routes`, `service_lb_mode`), checked like every other field of the config
//! (see `config.rs`).
//!
//! ```yaml
//! routing_mode: native                 # default tunnel (VXLAN)
//! native_routing_cidr: 10.0.0.0/8      # routable without masquerade; must cover pod_cidr
//! auto_direct_node_routes: true        # <pod CIDR> via <node IP> for nodes on the uplink's segment
//! service_lb_mode: dsr                 # snat (default) | dsr | hybrid (DSR for TCP, SNAT for UDP)
//! ```
//!
//! `service_lb_mode` decides how a NodePort / external IP connection reaches a backend on
//! another node: SNATed to this node (replies come back through it), or by direct server
//! return (the client's address kept, the frontend carried in an IPv4 option, the backend's
//! node answering the client itself). DSR needs the client's address routable to the backend's
//! node unencapsulated, and that node to route the replies out: native routing only.

use ipnet::Ipv4Net;
use meshd_datapath::ServiceLbMode;
use meshd_state::RoutingMode;

use super::config::ConfigProblem;

/// Checked routing settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingSettings {
    pub mode: RoutingMode,
    /// Native mode: the prefix the underlay routes as it is (pod addresses), never masqueraded.
    pub native_routing_cidr: Option<Ipv4Net>,
    /// Native mode: the agent routes every directly reachable node's pod CIDR to it.
    pub auto_direct_node_routes: bool,
    /// Public frontends to remote backends: SNAT, DSR or DSR for TCP only.
    pub service_lb_mode: ServiceLbMode,
}

impl RoutingSettings {
    pub fn native(&self) -> bool {
        self.mode == RoutingMode::Native
    }
}

/// Checks the routing fields against the node's pod CIDR (None: invalid, reported elsewhere).
/// Problems are pushed with their field's name.
pub fn resolve(
    mode: Option<String>,
    native_routing_cidr: Option<String>,
    auto_direct_node_routes: Option<bool>,
    service_lb_mode: Option<String>,
    pod_cidr: Option<Ipv4Net>,
    problems: &mut Vec<ConfigProblem>,
) -> RoutingSettings {
    let mut problem = |field: &str, reason: String| {
        problems.push(ConfigProblem {
            field: field.to_owned(),
            reason,
        })
    };
    let mode = match mode.as_deref().map(str::parse::<RoutingMode>) {
        None => RoutingMode::default(),
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            problem("routing_mode", e);
            RoutingMode::default()
        }
    };
    let cidr = match native_routing_cidr.as_deref().map(str::parse::<Ipv4Net>) {
        None => None,
        Some(Ok(net)) if net.trunc() != net => {
            problem(
                "native_routing_cidr",
                format!("{net} has host bits set (expected {})", net.trunc()),
            );
            None
        }
        Some(Ok(net)) => Some(net),
        Some(Err(e)) => {
            problem(
                "native_routing_cidr",
                format!(
                    "{:?} is not an IPv4 prefix: {e}",
                    native_routing_cidr.as_deref().unwrap_or_default()
                ),
            );
            None
        }
    };
    let auto = auto_direct_node_routes.unwrap_or(false);
    let service_lb_mode = match service_lb_mode.as_deref().map(str::parse::<ServiceLbMode>) {
        None => ServiceLbMode::default(),
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            problem("service_lb_mode", e);
            ServiceLbMode::default()
        }
    };
    if service_lb_mode.uses_dsr() && mode != RoutingMode::Native {
        problem(
            "service_lb_mode",
            format!("{service_lb_mode} needs routing_mode: native (in tunnel mode the client's address cannot reach the backend's node unencapsulated, nor its replies the client); use snat"),
        );
    }
    if mode == RoutingMode::Native {
        match (cidr, pod_cidr) {
            (None, _) if native_routing_cidr.is_none() => problem(
                "native_routing_cidr",
                "required with routing_mode: native (the prefix the underlay routes without masquerade; it must cover pod_cidr)".into(),
            ),
            (Some(net), Some(pod)) if !net.contains(&pod) => problem(
                "native_routing_cidr",
                format!("{net} does not cover pod_cidr {pod}: this node's endpoints would be masqueraded and lose their identity"),
            ),
            _ => {}
        }
    } else if auto {
        problem(
            "auto_direct_node_routes",
            "only with routing_mode: native (in tunnel mode node traffic is encapsulated)".into(),
        );
    }
    RoutingSettings {
        mode,
        native_routing_cidr: cidr,
        auto_direct_node_routes: auto,
        service_lb_mode,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        mode: Option<&str>,
        cidr: Option<&str>,
        auto: Option<bool>,
    ) -> (RoutingSettings, Vec<String>) {
        check_lb(mode, cidr, auto, None)
    }

    fn check_lb(
        mode: Option<&str>,
        cidr: Option<&str>,
        auto: Option<bool>,
        lb: Option<&str>,
    ) -> (RoutingSettings, Vec<String>) {
        let mut problems = Vec::new();
        let s = resolve(
            mode.map(Into::into),
            cidr.map(Into::into),
            auto,
            lb.map(Into::into),
            Some("10.1.1.0/24".parse().unwrap()),
            &mut problems,
        );
        (s, problems.iter().map(|p| p.to_string()).collect())
    }

    #[test]
    fn dsr_needs_native_routing_and_names_the_field() {
        let (s, p) = check_lb(None, None, None, None);
        assert!(p.is_empty());
        assert_eq!(s.service_lb_mode, ServiceLbMode::Snat);
        for lb in ["dsr", "hybrid"] {
            let (_, p) = check_lb(None, None, None, Some(lb));
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(
                p[0].starts_with(&format!("service_lb_mode: {lb} needs routing_mode: native")),
                "{p:?}"
            );
        }
        let (_, p) = check_lb(None, None, None, Some("snat"));
        assert!(p.is_empty(), "{p:?}");
        let (s, p) = check_lb(Some("native"), Some("10.0.0.0/8"), None, Some("hybrid"));
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(s.service_lb_mode, ServiceLbMode::Hybrid);
        let (_, p) = check_lb(Some("native"), Some("10.0.0.0/8"), None, Some("direct"));
        assert!(p[0].starts_with("service_lb_mode: \"direct\""), "{p:?}");
    }

    #[test]
    fn tunnel_is_the_default() {
        let (s, problems) = check(None, None, None);
        assert!(problems.is_empty());
        assert_eq!(s, RoutingSettings::default());
    }

    #[test]
    fn native_needs_a_native_routing_cidr_covering_the_pod_cidr() {
        let (_, p) = check(Some("native"), None, None);
        assert!(p[0].starts_with("native_routing_cidr: required"), "{p:?}");
        let (_, p) = check(Some("native"), Some("10.2.0.0/16"), None);
        assert!(
            p[0].contains("does not cover pod_cidr 10.1.1.0/24"),
            "{p:?}"
        );
        let (_, p) = check(Some("native"), Some("10.0.0.1/8"), None);
        assert!(p[0].contains("host bits"), "{p:?}");
        let (s, p) = check(Some("native"), Some("10.0.0.0/8"), Some(true));
        assert!(p.is_empty(), "{p:?}");
        assert!(s.native() && s.auto_direct_node_routes);
        assert_eq!(s.native_routing_cidr, Some("10.0.0.0/8".parse().unwrap()));
    }

    #[test]
    fn bad_modes_and_tunnel_mode_direct_routes_are_refused() {
        let (_, p) = check(Some("direct"), None, None);
        assert!(p[0].starts_with("routing_mode:"), "{p:?}");
        let (_, p) = check(None, None, Some(true));
        assert!(p[0].starts_with("auto_direct_node_routes:"), "{p:?}");
    }
}
