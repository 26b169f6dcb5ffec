//! Decoding and validation of whole records, as the kvstore sees them.

use crate::*;

fn c1() -> ClusterName {
    ClusterName::new("c1").unwrap()
}

fn node() -> (NodeKey, NodeRecord) {
    (
        NodeKey {
            cluster: c1(),
            node: "n1".into(),
        },
        NodeRecord {
            name: "n1".into(),
            cluster: c1(),
            cluster_id: ClusterId::new(1).unwrap(),
            node_ip: "192.168.10.1".parse().unwrap(),
            pod_cidrs: vec!["10.1.1.0/24".parse().unwrap()],
            labels: Labels::from_pairs([("zone", "a")]),
            boot_id: "6f1c".into(),
        },
    )
}

fn service() -> (ServiceKey, ServiceRecord) {
    (
        ServiceKey {
            cluster: c1(),
            namespace: "default".into(),
            name: "echo".into(),
        },
        ServiceRecord {
            namespace: "default".into(),
            name: "echo".into(),
            frontends: vec![ServiceFrontend {
                ip: "10.96.0.10".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                port_name: "http".into(),
                node_port: None,
            }],
            backends: vec![ServiceBackend {
                ip: "10.1.1.5".parse().unwrap(),
                port: 8080,
                protocol: Protocol::Tcp,
                ready: true,
                port_name: "http".into(),
            }],
            global: true,
            shared: true,
            affinity: Affinity::Local,
            service_type: Default::default(),
            external_ips: Vec::new(),
            load_balancer_ip: None,
            external_traffic_policy: Default::default(),
            health_check_node_port: None,
        },
    )
}

fn round_trip<R: Resource>(key: &R::Key, record: &R) {
    let bytes = encode(key, record).unwrap();
    let (k, r) = decode::<R>(&key.to_string(), &bytes).unwrap();
    assert_eq!(&k, key);
    assert_eq!(&r, record);
}

#[test]
fn every_record_round_trips() {
    let (k, n) = node();
    round_trip(&k, &n);
    let (k, s) = service();
    round_trip(&k, &s);
    round_trip(
        &ClusterConfigKey { cluster: c1() },
        &ClusterConfig {
            name: c1(),
            id: ClusterId::new(7).unwrap(),
            capabilities: Capabilities::default(),
            routing_mode: Default::default(),
        },
    );
    round_trip(
        &IpcacheKey::host(c1(), "10.1.1.5".parse().unwrap()),
        &IpcacheEntry {
            prefix: "10.1.1.5/32".parse().unwrap(),
            identity: NumericIdentity::new((1 << 16) | 300).unwrap(),
            host_ip: "192.168.10.1".parse().unwrap(),
            endpoint: Some("web-1".into()),
            namespace: Some("default".into()),
        },
    );
    round_trip(
        &IdentityKey {
            cluster: c1(),
            id: NumericIdentity::new((1 << 16) | 300).unwrap(),
        },
        &IdentityRecord {
            labels: Labels::from_pairs([("app", "web"), (CLUSTER_LABEL, "c1")]),
        },
    );
    round_trip(
        &SyncCanaryKey {
            cluster: c1(),
            resource: "nodes".into(),
        },
        &SyncCanary { synced_at_ms: 1 },
    );
}

/// The service record is a public contract: a record written before public endpoints parses
/// as a ClusterIP service, and one with them round-trips with Kubernetes' type names.
#[test]
fn service_records_gain_exposure_compatibly() {
    let (k, old) = service();
    let old_json = br#"{"namespace":"default","name":"echo","frontends":[{"ip":"10.96.0.10","port":80,"protocol":"TCP","port_name":"http"}],"backends":[{"ip":"10.1.1.5","port":8080,"protocol":"TCP","ready":true,"port_name":"http"}],"global":true,"shared":true,"affinity":"local"}"#;
    let (_, parsed) = decode::<ServiceRecord>(&k.to_string(), old_json).unwrap();
    assert_eq!(parsed, old);
    assert_eq!(parsed.service_type, ServiceType::ClusterIp);
    assert_eq!(parsed.external_traffic_policy, TrafficPolicy::Cluster);
    // An unchanged ClusterIP record encodes as before (nothing new is written).
    assert_eq!(
        serde_json::to_value(&old).unwrap(),
        serde_json::from_slice::<serde_json::Value>(old_json).unwrap()
    );

    let mut public = old.clone();
    public.service_type = ServiceType::LoadBalancer;
    public.frontends[0].node_port = Some(30080);
    public.external_ips = vec!["203.0.113.5".parse().unwrap()];
    public.load_balancer_ip = Some("198.51.100.5".parse().unwrap());
    public.external_traffic_policy = TrafficPolicy::Local;
    public.health_check_node_port = Some(32000);
    round_trip(&k, &public);
    let json = serde_json::to_string(&public).unwrap();
    for field in [
        r#""type":"LoadBalancer""#,
        r#""node_port":30080"#,
        r#""external_ips":["203.0.113.5"]"#,
        r#""load_balancer_ip":"198.51.100.5""#,
        r#""external_traffic_policy":"Local""#,
        r#""health_check_node_port":32000"#,
    ] {
        assert!(json.contains(field), "{field} not in {json}");
    }
    assert_eq!(
        public.external_addresses(),
        [
            "203.0.113.5".parse::<std::net::IpAddr>().unwrap(),
            "198.51.100.5".parse().unwrap()
        ]
    );
    let mut bad = public;
    bad.frontends[0].node_port = Some(0);
    assert!(encode(&k, &bad).is_err(), "node port 0 is refused");
}

#[test]
fn json_errors_name_key_and_kind() {
    let key = "meshd/state/nodes/v1/c1/n1";
    for bad in [&b"{"[..], b"[]", br#"{"name":"n1"}"#, br#"{"name":5}"#] {
        let err = decode::<NodeRecord>(key, bad).unwrap_err();
        match &err {
            StateError::Json { key: k, kind, .. } => {
                assert_eq!(k, key);
                assert_eq!(*kind, "nodes");
            }
            other => panic!("expected a JSON error, got {other}"),
        }
        assert!(err.to_string().contains(key));
    }
}

#[test]
fn wrong_types_inside_values_are_json_errors() {
    // Cluster id out of range and a bad cluster name are caught while decoding.
    let (k, n) = node();
    let mut v = serde_json::to_value(&n).unwrap();
    v["cluster_id"] = 300.into();
    let err = decode::<NodeRecord>(&k.to_string(), v.to_string().as_bytes()).unwrap_err();
    assert!(err.to_string().contains("1-255"), "{err}");
    v["cluster_id"] = 1.into();
    v["cluster"] = "Bad_Name".into();
    assert!(decode::<NodeRecord>(&k.to_string(), v.to_string().as_bytes()).is_err());
}

#[test]
fn field_errors_name_key_and_field() {
    let (k, mut n) = node();
    n.name = "n2".into();
    let err = decode::<NodeRecord>(&k.to_string(), &serde_json::to_vec(&n).unwrap()).unwrap_err();
    assert_eq!(
        err,
        StateError::Field {
            key: k.to_string(),
            field: "name".into(),
            reason: "n2 differs from n1 in the key".into()
        }
    );

    let (k, mut n) = node();
    n.pod_cidrs.push("10.2.0.1/16".parse().unwrap());
    let err = encode(&k, &n).unwrap_err();
    assert!(
        matches!(&err, StateError::Field { field, .. } if field == "pod_cidrs[1]"),
        "{err}"
    );

    let (k, mut n) = node();
    n.labels.insert("bad key!", "x");
    let err = encode(&k, &n).unwrap_err();
    assert!(
        matches!(&err, StateError::Field { field, .. } if field.starts_with("labels[")),
        "{err}"
    );

    let (k, mut s) = service();
    s.backends[0].port = 0;
    let err = encode(&k, &s).unwrap_err();
    assert!(
        matches!(&err, StateError::Field { field, .. } if field == "backends[0].port"),
        "{err}"
    );

    let ip = IpcacheKey::host(c1(), "10.1.1.5".parse().unwrap());
    let entry = IpcacheEntry {
        prefix: "10.1.1.6/32".parse().unwrap(),
        identity: NumericIdentity::WORLD,
        host_ip: "192.168.10.1".parse().unwrap(),
        endpoint: None,
        namespace: None,
    };
    let err = encode(&ip, &entry).unwrap_err();
    assert!(
        matches!(&err, StateError::Field { field, .. } if field == "prefix"),
        "{err}"
    );
}

#[test]
fn unknown_fields_are_tolerated_for_forward_compatibility() {
    let (k, n) = node();
    let mut v = serde_json::to_value(&n).unwrap();
    v["added_in_a_later_release"] = true.into();
    let (_, decoded) = decode::<NodeRecord>(&k.to_string(), v.to_string().as_bytes()).unwrap();
    assert_eq!(decoded, n);
}

#[test]
fn service_json_shape() {
    let (_, s) = service();
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(v["affinity"], "local");
    assert_eq!(v["frontends"][0]["protocol"], "TCP");
    assert_eq!(v["backends"][0]["ready"], true);
}

#[test]
fn cluster_prefixes() {
    assert_eq!(
        NodeRecord::cluster_prefix(&c1()),
        "meshd/state/nodes/v1/c1/"
    );
    assert_eq!(IpcacheEntry::cluster_prefix(&c1()), "meshd/state/ip/v1/c1/");
    assert_eq!(SyncCanary::cluster_prefix(&c1()), "meshd/synced/c1/");
    assert_eq!(
        ClusterConfig::cluster_prefix(&c1()),
        "meshd/cluster-config/c1"
    );
}

#[test]
fn the_shared_state_prefixes_are_the_remote_kinds_in_key_order() {
    let mut kinds = [
        NodeRecord::PREFIX,
        IpcacheEntry::PREFIX,
        IdentityRecord::PREFIX,
        ServiceRecord::PREFIX,
    ];
    kinds.sort();
    // Sorted, so that reading them one after the other admits keys in the order one range
    // over `meshd/state/` would (the mirror's per-cluster limit depends on that order).
    assert_eq!(crate::keys::SHARED_STATE_PREFIXES, kinds);
}

#[test]
fn a_policy_must_match_its_key() {
    let json = r#"{"apiVersion":"meshd.io/v1","kind":"NetworkPolicy",
          "metadata":{"name":"p","namespace":"default"},
          "spec":{"endpointSelector":{"matchLabels":{"app":"echo"}},"ingress":[]}}"#;
    let (_, p) =
        crate::decode::<NetworkPolicy>("meshd/config/policies/v1/default/p", json.as_bytes())
            .unwrap();
    assert_eq!(p.metadata.name, "p");
    assert!(crate::decode::<NetworkPolicy>(
        "meshd/config/policies/v1/default/other",
        json.as_bytes()
    )
    .is_err());
}
