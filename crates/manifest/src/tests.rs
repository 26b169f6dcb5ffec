use std::path::PathBuf;

use meshd_state::{Affinity, Protocol};

use crate::*;

const ECHO: &str = r#"
apiVersion: meshd.io/v1
kind: Service
metadata:
  name: echo
  namespace: default
  annotations:
    service.meshd.io/global: "true"
    service.meshd.io/affinity: "local"
spec:
  selector: { app: echo }
  ports: [ { name: http, port: 80, targetPort: 8080, protocol: TCP } ]
"#;

fn service_with(spec_and_meta: &str) -> String {
    format!("apiVersion: meshd.io/v1\nkind: Service\n{spec_and_meta}")
}

fn one_error(text: &str) -> DocumentError {
    let errs = parse_str("f.yaml", text).unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    errs.0[0].clone()
}

#[test]
fn parses_the_design_example() {
    let docs = parse_str("echo.yaml", ECHO).unwrap();
    assert_eq!(docs.len(), 1);
    let Document::Service(svc) = &docs[0].document else {
        panic!("not a service")
    };
    assert_eq!(svc.name(), "echo");
    assert_eq!(svc.spec.ports[0].target_port(), 8080);
    assert_eq!(svc.spec.ports[0].protocol(), Protocol::Tcp);
    let o = svc.options().unwrap();
    assert!(o.global && o.shared && o.affinity == Affinity::Local);
    // The text sent to the server parses to the same document.
    assert_eq!(
        parse_document("echo.yaml", 1, &docs[0].text).unwrap(),
        docs[0].document
    );
}

#[test]
fn defaults_and_kubernetes_forms() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: { name: web, uid: abc }\n\
                spec: { type: ClusterIP, selector: { app: web }, ports: [ { port: 53, targetPort: \"5353\", protocol: UDP } ] }\n";
    let docs = parse_str("web.yaml", text).unwrap();
    let Document::Service(svc) = &docs[0].document else {
        panic!()
    };
    assert_eq!(svc.namespace(), DEFAULT_NAMESPACE);
    assert_eq!(svc.spec.ports[0].target_port(), 5353);
    assert_eq!(svc.spec.ports[0].protocol(), Protocol::Udp);
    assert!(!svc.options().unwrap().global);
}

#[test]
fn errors_name_file_document_and_field() {
    let cases: &[(&str, &str)] = &[
        (
            "metadata: { name: a, annotations: { service.meshd.io/global: maybe } }\nspec: { selector: { app: a }, ports: [ { port: 80 } ] }",
            "metadata.annotations[\"service.meshd.io/global\"]",
        ),
        (
            "metadata: { name: a }\nspec: { selector: { app: a }, ports: [ { port: 70000 } ] }",
            "spec.ports[0].port",
        ),
        (
            "metadata: { name: a }\nspec: { selector: { app: a }, ports: [ { port: 80, targetPort: http } ] }",
            "spec.ports[0].targetPort",
        ),
        (
            "metadata: { name: a }\nspec: { selector: { \"bad key!\": a }, ports: [ { port: 80 } ] }",
            "spec.selector[\"bad key!\"]",
        ),
        (
            "metadata: { name: a }\nspec: { selector: { app: -a }, ports: [ { port: 80 } ] }",
            "spec.selector[\"app\"]",
        ),
        (
            "metadata: { name: a }\nspec: { selector: { app: a }, ports: [ { port: 80, protocol: ICMP } ] }",
            "spec.ports[0].protocol",
        ),
        (
            "metadata: { name: A_b }\nspec: { selector: { app: a }, ports: [ { port: 80 } ] }",
            "metadata.name",
        ),
        (
            "metadata: { name: a }\nspec: { selector: { app: a }, ports: [ { port: 80 }, { port: 81 } ] }",
            "spec.ports[0].name",
        ),
        (
            "metadata: { name: a }\nspec: { selector: { app: a }, ports: [ { port: 80 } ], clusterIP: 10.0.0.300 }",
            "spec.clusterIP",
        ),
        (
            "metadata: { name: a }\nspec: { selector: { app: a }, ports: [ { port: 80 } ], nodePort: 3 }",
            "spec.nodePort",
        ),
        (
            "metadata: { name: a }\nspec: { selector: { app: a }, ports: [ { port: 80 } ], sessionAffinity: ClientIP }",
            "spec.sessionAffinity",
        ),
        (
            "metadata: { name: a }\nspec: { selector: { app: a }, ports: [ { port: 80, nodePort: 30080 } ] }",
            "spec.ports[0].nodePort",
        ),
    ];
    for (body, field) in cases {
        let e = one_error(&service_with(body));
        assert_eq!(e.file, "f.yaml");
        assert_eq!(e.document, 1);
        assert!(
            e.field == *field || (field == &"spec" && e.field.starts_with("spec")),
            "{body}: expected field {field}, got {e}"
        );
        assert!(e.to_string().contains(field), "{e}");
    }
}

#[test]
fn unknown_kind_and_api_version() {
    let e = one_error("apiVersion: meshd.io/v1\nkind: Deployment\nmetadata: { name: a }\n");
    assert_eq!(e.field, "kind");
    assert!(e.reason.contains("Deployment"), "{e}");
    let e = one_error(
        "apiVersion: apps/v1\nkind: Service\nmetadata: { name: a }\nspec: { selector: { app: a }, ports: [ { port: 80 } ] }",
    );
    assert_eq!(e.field, "apiVersion");
    assert_eq!(e.object.as_deref(), Some("Service default/a"));
}

#[test]
fn multi_document_errors_are_numbered_and_all_reported() {
    let text = format!(
        "{ECHO}---\n---\n{}\n---\n{}",
        service_with(
            "metadata: { name: b }\nspec: { selector: { app: b }, ports: [ { port: 0 } ] }"
        ),
        "apiVersion: meshd.io/v1\nkind: Nope\n"
    );
    let errs = parse_str("m.yaml", &text).unwrap_err();
    let docs: Vec<usize> = errs.0.iter().map(|e| e.document).collect();
    assert_eq!(docs, vec![3, 4], "{errs}");
}

#[test]
fn directories_load_in_order_and_duplicates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b.yaml"), ECHO).unwrap();
    std::fs::write(
        dir.path().join("a.yml"),
        service_with(
            "metadata: { name: web }\nspec: { selector: { app: web }, ports: [ { port: 80 } ] }",
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
    let docs = load_paths(&[dir.path().to_path_buf()]).unwrap();
    let names: Vec<String> = docs.iter().map(|d| d.document.object_ref().name).collect();
    assert_eq!(names, ["web", "echo"]);

    let again = dir.path().join("b.yaml");
    let errs = load_paths(&[dir.path().to_path_buf(), again]).unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    assert!(errs.to_string().contains("also declared"), "{errs}");

    let missing = load_paths(&[PathBuf::from("/nonexistent/x.yaml")]).unwrap_err();
    assert!(
        missing.to_string().contains("/nonexistent/x.yaml"),
        "{missing}"
    );
}

#[test]
fn syntax_errors_name_the_document() {
    let text = format!("{ECHO}---\nkind: Service\n  bad: [indent\n");
    let errs = parse_str("s.yaml", &text).unwrap_err();
    assert_eq!(errs.0[0].document, 2, "{errs}");
    assert!(errs.0[0].reason.contains("YAML"), "{errs}");
}

const POLICY: &str = r#"
apiVersion: meshd.io/v1
kind: NetworkPolicy
metadata: { name: echo-from-c1-clients, namespace: default }
spec:
  endpointSelector: { matchLabels: { app: echo } }
  ingress:
    - fromEndpoints: [ { matchLabels: { app: client, meshd.io/cluster: c1 } } ]
      toPorts: [ { ports: [ { port: "8080", protocol: TCP } ] } ]
"#;

#[test]
fn policies_use_the_mesh_type_and_report_every_problem() {
    let docs = parse_str("p.yaml", &format!("{ECHO}---{POLICY}")).unwrap();
    assert_eq!(docs[1].document.kind(), Kind::NetworkPolicy);
    assert_eq!(
        docs[1].document.object_ref().to_string(),
        "NetworkPolicy default/echo-from-c1-clients"
    );
    let bad = POLICY
        .replace("\"8080\"", "\"http\"")
        .replace("app: echo", "\"bad key!\": echo");
    let errs = parse_str("p.yaml", &bad).unwrap_err();
    let fields: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.endpointSelector.matchLabels[\"bad key!\"]",
            "spec.ingress[0].toPorts[0].ports[0].port"
        ],
        "{errs}"
    );
    assert!(errs.0.iter().all(|e| e.document == 1 && e.file == "p.yaml"));
    let e = one_error(&POLICY.replace("toPorts", "toPortz"));
    assert!(e.field.starts_with("spec.ingress[0]"), "{e}");
}

/// Cilium's documentation example of a global service, a Kubernetes `v1` Service with
/// `service.cilium.io/global`, is meshd's global service; what meshd does not implement of a
/// Kubernetes Service is refused with its field named.
#[test]
fn cilium_global_service_example_is_a_global_service() {
    let text = include_str!("../../../examples/services/cilium-global-service.yaml");
    let docs = parse_str("rebel-base.yaml", text).unwrap();
    let Document::Service(svc) = &docs[0].document else {
        panic!("not a service")
    };
    assert_eq!(
        (svc.namespace(), svc.name()),
        (DEFAULT_NAMESPACE, "rebel-base")
    );
    let o = svc.options().unwrap();
    assert!(
        o.global && o.shared && o.affinity == Affinity::None,
        "{o:?}"
    );
    assert_eq!(svc.spec.ports[0].target_port(), 80);
    assert_eq!(svc.selector().to_string(), "name=rebel-base");

    for (change, field) in [
        ("type: ClusterIP", "type: ExternalName"),
        (
            "  type: ClusterIP",
            "  type: ClusterIP\n  externalTrafficPolicy: Local",
        ),
        ("  - port: 80", "  - port: 80\n    nodePort: 30080"),
    ]
    .map(|(from, to)| (text.replace(from, to), to))
    {
        let e = one_error(&change);
        let named = match field {
            "type: ExternalName" => "spec.type",
            f if f.contains("externalTrafficPolicy") => "spec.externalTrafficPolicy",
            _ => "spec.ports[0].nodePort",
        };
        assert_eq!(e.field, named, "{e}");
    }
}

/// A Kubernetes `type: NodePort` / `LoadBalancer` service with every exposure field.
const PUBLIC: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: web }
spec:
  type: LoadBalancer
  selector: { app: web }
  ports:
  - { name: http, port: 80, targetPort: 8080, nodePort: 30080 }
  - { name: dns, port: 53, protocol: UDP }
  externalIPs: [ 203.0.113.10, 203.0.113.11 ]
  loadBalancerIP: 198.51.100.7
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
"#;

fn public_service(text: &str) -> Service {
    let docs = parse_str("web.yaml", text).unwrap();
    let Document::Service(svc) = docs[0].document.clone() else {
        panic!("not a service")
    };
    // What is sent to the server parses to the same document.
    assert_eq!(
        parse_document("web.yaml", 1, &docs[0].text).unwrap(),
        docs[0].document
    );
    svc
}

#[test]
fn public_endpoint_fields_have_kubernetes_names_and_meanings() {
    use meshd_state::{ServiceType, TrafficPolicy};
    let svc = public_service(PUBLIC);
    assert_eq!(svc.spec.service_type(), ServiceType::LoadBalancer);
    assert_eq!(svc.spec.ports[0].node_port, Some(30080));
    assert_eq!(
        svc.spec.ports[1].node_port, None,
        "allocated by the apiserver"
    );
    assert_eq!(
        svc.spec.external_ips,
        [
            "203.0.113.10".parse::<std::net::IpAddr>().unwrap(),
            "203.0.113.11".parse().unwrap()
        ]
    );
    assert_eq!(
        svc.spec.load_balancer_ip,
        Some("198.51.100.7".parse().unwrap())
    );
    assert_eq!(svc.spec.external_traffic_policy(), TrafficPolicy::Local);
    assert_eq!(svc.spec.health_check_node_port, Some(32000));
    assert!(svc.spec.wants_health_check_node_port());
    assert_eq!(svc.node_ports().collect::<Vec<_>>(), [30080, 32000]);
    // The JSON stored keeps Kubernetes' names.
    let json = Document::Service(svc).to_json();
    let text = String::from_utf8(json).unwrap();
    for name in [
        "\"type\":\"LoadBalancer\"",
        "\"nodePort\":30080",
        "\"externalIPs\"",
        "\"loadBalancerIP\"",
        "\"externalTrafficPolicy\":\"Local\"",
        "\"healthCheckNodePort\":32000",
    ] {
        assert!(text.contains(name), "{name} not in {text}");
    }

    // Defaults: ClusterIP, Cluster policy, no health check port.
    let plain = public_service(
        "apiVersion: v1\nkind: Service\nmetadata: { name: web }\n\
         spec: { selector: { app: web }, ports: [ { port: 80 } ] }\n",
    );
    assert_eq!(plain.spec.service_type(), ServiceType::ClusterIp);
    assert_eq!(plain.spec.external_traffic_policy(), TrafficPolicy::Cluster);
    assert!(!plain.spec.wants_health_check_node_port());
    // A NodePort service with Cluster policy has node ports but no health check port; external
    // IPs are allowed on any type, as in Kubernetes.
    let np = public_service(
        "apiVersion: v1\nkind: Service\nmetadata: { name: web }\n\
         spec: { type: NodePort, externalIPs: [ 203.0.113.10 ], selector: { app: web }, \
         ports: [ { port: 80, nodePort: 30001 } ] }\n",
    );
    assert_eq!(np.spec.service_type(), ServiceType::NodePort);
    assert!(!np.spec.wants_health_check_node_port());
    let cip = public_service(
        "apiVersion: v1\nkind: Service\nmetadata: { name: web }\n\
         spec: { externalIPs: [ 203.0.113.10 ], selector: { app: web }, ports: [ { port: 80 } ] }\n",
    );
    assert_eq!(cip.spec.external_ips.len(), 1);
}

#[test]
fn public_endpoint_refusals_name_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("type: LoadBalancer", "type: Public", "spec.type"),
        (
            "{ name: http, port: 80, targetPort: 8080, nodePort: 30080 }",
            "{ name: http, port: 80, targetPort: 8080, nodePort: 0 }",
            "spec.ports[0].nodePort",
        ),
        (
            "{ name: http, port: 80, targetPort: 8080, nodePort: 30080 }",
            "{ name: http, port: 80, targetPort: 8080, nodePort: 70000 }",
            "spec.ports[0].nodePort",
        ),
        // Two ports of one protocol on one node port.
        (
            "{ name: dns, port: 53, protocol: UDP }",
            "{ name: dns, port: 53, nodePort: 30080 }",
            "spec.ports[1].nodePort",
        ),
        (
            "healthCheckNodePort: 32000",
            "healthCheckNodePort: 30080",
            "spec.healthCheckNodePort",
        ),
        (
            "healthCheckNodePort: 32000",
            "healthCheckNodePort: 0",
            "spec.healthCheckNodePort",
        ),
        ("203.0.113.11 ]", "2001:db8::1 ]", "spec.externalIPs[1]"),
        ("203.0.113.11 ]", "not-an-ip ]", "spec.externalIPs[1]"),
        ("203.0.113.11 ]", "203.0.113.10 ]", "spec.externalIPs[1]"),
        ("203.0.113.11 ]", "0.0.0.0 ]", "spec.externalIPs[1]"),
        ("203.0.113.11 ]", "127.0.0.1 ]", "spec.externalIPs[1]"),
        ("198.51.100.7", "2001:db8::7", "spec.loadBalancerIP"),
        ("198.51.100.7", "224.0.0.7", "spec.loadBalancerIP"),
        (
            "externalTrafficPolicy: Local",
            "externalTrafficPolicy: Global",
            "spec.externalTrafficPolicy",
        ),
    ];
    for (from, to, field) in cases {
        assert!(PUBLIC.contains(from), "{from}");
        let e = one_error(&PUBLIC.replace(from, to));
        assert_eq!((e.file.as_str(), e.document), ("f.yaml", 1));
        assert_eq!(e.field, *field, "{to}: {e}");
        assert!(e.to_string().contains("Service default/web"), "{e}");
    }

    // What a ClusterIP service may not have; NodePort may not have a load balancer address;
    // Cluster policy has no health check port.
    let as_type = |t: &str| PUBLIC.replace("type: LoadBalancer", t);
    let cluster_ip = |extra_from: &str, extra_to: &str| {
        as_type("type: ClusterIP")
            .replace("  loadBalancerIP: 198.51.100.7\n", "")
            .replace("  healthCheckNodePort: 32000\n", "")
            .replace("  externalTrafficPolicy: Local\n", "")
            .replace(", nodePort: 30080", "")
            .replace(extra_from, extra_to)
    };
    assert!(parse_str("f.yaml", &cluster_ip("", "")).is_ok());
    for (text, field) in [
        (
            cluster_ip("targetPort: 8080 }", "targetPort: 8080, nodePort: 30080 }"),
            "spec.ports[0].nodePort",
        ),
        (
            cluster_ip("  selector:", "  externalTrafficPolicy: Local\n  selector:"),
            "spec.externalTrafficPolicy",
        ),
        (
            cluster_ip("  selector:", "  healthCheckNodePort: 32000\n  selector:"),
            "spec.healthCheckNodePort",
        ),
        (as_type("type: NodePort"), "spec.loadBalancerIP"),
        (
            PUBLIC.replace(
                "externalTrafficPolicy: Local",
                "externalTrafficPolicy: Cluster",
            ),
            "spec.healthCheckNodePort",
        ),
    ] {
        let e = one_error(&text);
        assert_eq!(e.field, field, "{text}: {e}");
    }
    // Kubernetes lets TCP and UDP of one service share a node port.
    let shared = PUBLIC.replace(
        "{ name: dns, port: 53, protocol: UDP }",
        "{ name: dns, port: 80, protocol: UDP, nodePort: 30080 }",
    );
    assert!(parse_str("f.yaml", &shared).is_ok());
}
