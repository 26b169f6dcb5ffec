//! Policies users bring: Cilium's `CiliumNetworkPolicy` (`cilium.io/v2`) and Kubernetes'
//! `NetworkPolicy` (`networking.k8s.io/v1`), rewritten into meshd's `NetworkPolicy`
//! (`meshd.io/v1`) where meshd supports what they say, with each one's own meaning kept:
//!
//! * Cilium: a rule with neither peers nor ports (`ingress: [{}]`) allows nothing, yet its
//!   section still makes the direction default-deny; a section with no rule at all
//!   (`ingress: []`) enforces nothing.
//! * Kubernetes: `policyTypes` (by default `Ingress`, plus `Egress` when the policy has an
//!   `egress` section) says which directions are enforced; a rule without `from`/`to` allows
//!   every peer and one without `ports` every port; `namespaceSelector` may only name
//!   namespaces by `kubernetes.io/metadata.name` (meshd knows no other namespace labels).
//!
//! What meshd cannot enforce (L7 rules, `toFQDNs`, `toServices`, deny rules, port ranges, ...)
//! is refused with the field named, never dropped. The result is the document meshd stores;
//! `meshd get networkpolicies -o yaml` shows it, with the original kind in an annotation.
//!
//! Label keys take Cilium's spellings in every kind, including meshd's own: the source prefixes
//! `k8s:` and `any:` are dropped, `io.cilium.k8s.policy.cluster` is `meshd.io/cluster` and
//! `io.kubernetes.pod.namespace` is `meshd.io/namespace`.

use serde_yaml::{Mapping, Value};

use meshd_state::{CLUSTER_LABEL, NAMESPACE_LABEL};

pub const CILIUM_API_VERSION: &str = "cilium.io/v2";
pub const CILIUM_KIND: &str = "CiliumNetworkPolicy";
pub const KUBERNETES_API_VERSION: &str = "networking.k8s.io/v1";
/// Annotation naming the kind a stored policy was written as.
pub const SOURCE_ANNOTATION: &str = "meshd.io/source";

/// A refusal: the field path and why.
pub type Refusal = (String, String);

/// Fields the API server fills in on stored objects: a policy exported with `kubectl get -o
/// yaml` carries them, and they say nothing about its meaning.
const SERVER_METADATA: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
];

fn refuse(field: impl Into<String>, reason: impl Into<String>) -> Refusal {
    (field.into(), reason.into())
}

fn key(k: &str) -> Value {
    Value::String(k.to_owned())
}

/// The keys of a mapping, as strings (a non-string key is refused).
fn keys_of(map: &Mapping, at: &str) -> Result<Vec<String>, Refusal> {
    map.keys()
        .map(|k| {
            k.as_str()
                .map(str::to_owned)
                .ok_or_else(|| refuse(at, format!("key {k:?} is not a string")))
        })
        .collect()
}

fn mapping<'a>(value: &'a Value, at: &str) -> Result<&'a Mapping, Refusal> {
    value
        .as_mapping()
        .ok_or_else(|| refuse(at, "must be a mapping"))
}

fn sequence<'a>(value: &'a Value, at: &str) -> Result<&'a [Value], Refusal> {
    value
        .as_sequence()
        .map(Vec::as_slice)
        .ok_or_else(|| refuse(at, "must be a list"))
}

fn join(at: &str, field: &str) -> String {
    if at.is_empty() {
        field.to_owned()
    } else {
        format!("{at}.{field}")
    }
}

/// The one spelling meshd uses for a label key written the Cilium way.
pub fn canonical_label_key(k: &str) -> String {
    let bare = k
        .strip_prefix("k8s:")
        .or_else(|| k.strip_prefix("any:"))
        .unwrap_or(k);
    match bare {
        "io.cilium.k8s.policy.cluster" => CLUSTER_LABEL.to_owned(),
        "io.kubernetes.pod.namespace" => NAMESPACE_LABEL.to_owned(),
        other => other.to_owned(),
    }
}

/// Rewrites the label keys of a selector (`matchLabels` keys, `matchExpressions[].key`) in
/// place. Anything else in it is left for the typed parse to judge.
fn canonical_selector(selector: &mut Value) {
    let Some(map) = selector.as_mapping_mut() else {
        return;
    };
    if let Some(Value::Mapping(labels)) = map.get_mut("matchLabels") {
        let pairs: Vec<(Value, Value)> = std::mem::take(labels).into_iter().collect();
        for (k, v) in pairs {
            let k = match k {
                Value::String(s) => Value::String(canonical_label_key(&s)),
                other => other,
            };
            labels.insert(k, v);
        }
    }
    if let Some(Value::Sequence(exprs)) = map.get_mut("matchExpressions") {
        for e in exprs {
            if let Some(Value::String(k)) = e.as_mapping_mut().and_then(|m| m.get_mut("key")) {
                *k = canonical_label_key(k);
            }
        }
    }
}

/// Every selector of a meshd policy document (`spec.endpointSelector`, `fromEndpoints`,
/// `toEndpoints`) with its label keys in meshd's spelling.
pub fn canonical_policy_labels(doc: &mut Value) {
    let Some(spec) = doc.get_mut("spec") else {
        return;
    };
    if let Some(sel) = spec.get_mut("endpointSelector") {
        canonical_selector(sel);
    }
    for (section, peers) in [("ingress", "fromEndpoints"), ("egress", "toEndpoints")] {
        let Some(Value::Sequence(rules)) = spec.get_mut(section) else {
            continue;
        };
        for rule in rules {
            if let Some(Value::Sequence(sels)) = rule.get_mut(peers) {
                sels.iter_mut().for_each(canonical_selector);
            }
        }
    }
}

/// `metadata` as meshd keeps it: server-filled fields dropped, the source kind noted.
fn metadata(doc: &Mapping, source: &str) -> Result<Value, Refusal> {
    let mut meta = match doc.get("metadata") {
        Some(m) => mapping(m, "metadata")?.clone(),
        None => return Err(refuse("metadata", "missing")),
    };
    for f in SERVER_METADATA {
        meta.remove(*f);
    }
    let annotations = meta
        .entry(key("annotations"))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if let Value::Mapping(a) = annotations {
        a.insert(key(SOURCE_ANNOTATION), key(source));
    }
    Ok(Value::Mapping(meta))
}

fn meshd_document(meta: Value, spec: Mapping) -> Value {
    let mut out = Mapping::new();
    out.insert(key("apiVersion"), key(crate::API_VERSION));
    out.insert(key("kind"), key("NetworkPolicy"));
    out.insert(key("metadata"), meta);
    out.insert(key("spec"), Value::Mapping(spec));
    let mut doc = Value::Mapping(out);
    canonical_policy_labels(&mut doc);
    doc
}

/// Top-level fields other than the ones every object has and `spec`.
fn check_top_level(doc: &Mapping, extra: &[&str]) -> Result<(), Refusal> {
    for k in keys_of(doc, "")? {
        match k.as_str() {
            "apiVersion" | "kind" | "metadata" | "spec" | "status" => {}
            other if extra.contains(&other) => {}
            other => return Err(refuse(other, "unknown field")),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CiliumNetworkPolicy

/// Why a Cilium field is refused, for the fields meshd knows of and does not support.
fn cilium_unsupported(field: &str) -> Option<&'static str> {
    Some(match field {
        "ingressDeny" | "egressDeny" => "deny rules are not supported by meshd yet",
        "nodeSelector" => "host policies are not supported by meshd",
        "enableDefaultDeny" => "meshd always makes a direction with rules default-deny",
        "labels" => "policy labels are not supported (use metadata.labels)",
        "toFQDNs" => "DNS-based policy is not supported by meshd",
        "toServices" => "service-based policy is not supported by meshd (select the backends)",
        "toGroups" | "fromGroups" => "cloud provider groups are not supported by meshd",
        "toRequires" | "fromRequires" => "requirements are deprecated and not supported",
        "toNodes" | "fromNodes" => "node selectors are not supported by meshd",
        "icmps" => "ICMP type rules are not supported (use toPorts with protocol ICMP)",
        "authentication" => "mutual authentication is not supported by meshd",
        "rules" => "L7 rules are not supported by meshd",
        "listener" | "originatingTLS" | "terminatingTLS" | "serverNames" => {
            "L7 proxying is not supported by meshd"
        }
        "endPort" => "port ranges are not supported by meshd (list the ports)",
        _ => return None,
    })
}

fn cilium_check(map: &Mapping, at: &str, supported: &[&str]) -> Result<(), Refusal> {
    for k in keys_of(map, at)? {
        if supported.contains(&k.as_str()) {
            continue;
        }
        let field = join(at, &k);
        return Err(match cilium_unsupported(&k) {
            Some(reason) => refuse(field, reason),
            None => refuse(field, "unknown field"),
        });
    }
    Ok(())
}

fn cilium_rules(
    spec: &Mapping,
    section: &str,
    peer_fields: &[&str],
    out: &mut Mapping,
) -> Result<(), Refusal> {
    let Some(rules) = spec.get(section) else {
        return Ok(());
    };
    let at = format!("spec.{section}");
    let rules = sequence(rules, &at)?;
    if rules.is_empty() {
        // No rule, no enforcement (Cilium's meaning; `[{}]` is the default-deny idiom).
        return Ok(());
    }
    let mut kept = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let rat = format!("{at}[{i}]");
        let map = mapping(rule, &rat)?;
        let mut supported: Vec<&str> = peer_fields.to_vec();
        supported.push("toPorts");
        cilium_check(map, &rat, &supported)?;
        if let Some(ports) = map.get("toPorts") {
            for (j, pr) in sequence(ports, &format!("{rat}.toPorts"))?
                .iter()
                .enumerate()
            {
                let pat = format!("{rat}.toPorts[{j}]");
                let pm = mapping(pr, &pat)?;
                cilium_check(pm, &pat, &["ports"])?;
                if let Some(ports) = pm.get("ports") {
                    for (k, pp) in sequence(ports, &format!("{pat}.ports"))?.iter().enumerate() {
                        let ppat = format!("{pat}.ports[{k}]");
                        cilium_check(mapping(pp, &ppat)?, &ppat, &["port", "protocol"])?;
                        if pp.get("protocol").and_then(Value::as_str) == Some("SCTP") {
                            return Err(refuse(
                                format!("{ppat}.protocol"),
                                "SCTP is not supported by meshd",
                            ));
                        }
                    }
                }
            }
        }
        // A rule that names neither peers nor ports selects nothing.
        if !map.is_empty() {
            kept.push(rule.clone());
        }
    }
    out.insert(key(section), Value::Sequence(kept));
    Ok(())
}

/// A `CiliumNetworkPolicy` as the meshd policy document with the same meaning.
pub fn from_cilium(doc: &Value) -> Result<Value, Refusal> {
    let top = mapping(doc, "")?;
    check_top_level(top, &["specs"])?;
    let spec = match (top.get("spec"), top.get("specs")) {
        (Some(_), Some(_)) => return Err(refuse("specs", "give spec or specs, not both")),
        (Some(s), None) => s,
        (None, Some(list)) => match sequence(list, "specs")? {
            [one] => one,
            _ => {
                return Err(refuse(
                    "specs",
                    "meshd takes one rule set per policy (split the policy, one per spec)",
                ))
            }
        },
        (None, None) => return Err(refuse("spec", "missing")),
    };
    let spec = mapping(spec, "spec")?;
    cilium_check(
        spec,
        "spec",
        &["endpointSelector", "ingress", "egress", "description"],
    )?;
    let mut out = Mapping::new();
    match spec.get("endpointSelector") {
        Some(sel) => out.insert(key("endpointSelector"), sel.clone()),
        None => return Err(refuse("spec.endpointSelector", "missing")),
    };
    cilium_rules(
        spec,
        "ingress",
        &["fromEndpoints", "fromEntities", "fromCIDR", "fromCIDRSet"],
        &mut out,
    )?;
    cilium_rules(
        spec,
        "egress",
        &["toEndpoints", "toEntities", "toCIDR", "toCIDRSet"],
        &mut out,
    )?;
    let mut meta = metadata(top, &format!("{CILIUM_API_VERSION}/{CILIUM_KIND}"))?;
    if let Some(Value::String(d)) = spec.get("description") {
        if let Some(Value::Mapping(a)) = meta.get_mut("annotations") {
            a.insert(key("meshd.io/description"), key(d));
        }
    }
    Ok(meshd_document(meta, out))
}

// ---------------------------------------------------------------------------------------------
// Kubernetes NetworkPolicy

const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The namespaces a `namespaceSelector` names, as selector requirements on meshd's namespace
/// label; `None` for `{}` (every namespace).
fn namespace_requirements(sel: &Value, at: &str) -> Result<Option<Vec<Value>>, Refusal> {
    let map = mapping(sel, at)?;
    let mut reqs = Vec::new();
    for k in keys_of(map, at)? {
        match k.as_str() {
            "matchLabels" => {
                let labels = mapping(&map[k.as_str()], &join(at, "matchLabels"))?;
                for (lk, lv) in labels {
                    let lk = lk.as_str().unwrap_or_default();
                    if lk != NAMESPACE_NAME_LABEL {
                        return Err(refuse(
                            format!("{at}.matchLabels.{lk}"),
                            format!("meshd knows namespaces by name only: select them with {NAMESPACE_NAME_LABEL}"),
                        ));
                    }
                    let mut r = Mapping::new();
                    r.insert(key("key"), key(NAMESPACE_LABEL));
                    r.insert(key("operator"), key("In"));
                    r.insert(key("values"), Value::Sequence(vec![lv.clone()]));
                    reqs.push(Value::Mapping(r));
                }
            }
            "matchExpressions" => {
                let exprs = sequence(&map[k.as_str()], &join(at, "matchExpressions"))?;
                for (i, e) in exprs.iter().enumerate() {
                    let eat = format!("{at}.matchExpressions[{i}]");
                    if e.get("key").and_then(Value::as_str) != Some(NAMESPACE_NAME_LABEL) {
                        return Err(refuse(
                            format!("{eat}.key"),
                            format!("meshd knows namespaces by name only: select them with {NAMESPACE_NAME_LABEL}"),
                        ));
                    }
                    let mut r = mapping(e, &eat)?.clone();
                    r.insert(key("key"), key(NAMESPACE_LABEL));
                    reqs.push(Value::Mapping(r));
                }
            }
            other => return Err(refuse(join(at, other), "unknown field")),
        }
    }
    Ok((!reqs.is_empty()).then_some(reqs))
}

/// A pod selector limited by namespace requirements (`None`: every namespace). An identity
/// without meshd's namespace label is in `default`, so "every namespace" takes two selectors.
fn with_namespaces(pod: Option<&Value>, namespaces: Option<Vec<Value>>) -> Vec<Value> {
    let base = pod.and_then(Value::as_mapping).cloned().unwrap_or_default();
    let with_reqs = |reqs: Vec<Value>| {
        let mut sel = base.clone();
        let exprs = sel
            .entry(key("matchExpressions"))
            .or_insert_with(|| Value::Sequence(Vec::new()));
        if let Value::Sequence(list) = exprs {
            list.extend(reqs);
        }
        Value::Mapping(sel)
    };
    let requirement = |op: &str| {
        let mut r = Mapping::new();
        r.insert(key("key"), key(NAMESPACE_LABEL));
        r.insert(key("operator"), key(op));
        Value::Mapping(r)
    };
    match namespaces {
        None => vec![
            with_reqs(vec![requirement("Exists")]),
            with_reqs(vec![requirement("DoesNotExist")]),
        ],
        Some(reqs) => vec![with_reqs(reqs)],
    }
}

fn k8s_peers(
    peers: &[Value],
    at: &str,
    endpoints: &mut Vec<Value>,
    cidr_sets: &mut Vec<Value>,
) -> Result<(), Refusal> {
    for (i, peer) in peers.iter().enumerate() {
        let pat = format!("{at}[{i}]");
        let map = mapping(peer, &pat)?;
        for k in keys_of(map, &pat)? {
            if !matches!(k.as_str(), "podSelector" | "namespaceSelector" | "ipBlock") {
                return Err(refuse(join(&pat, &k), "unknown field"));
            }
        }
        if let Some(block) = map.get("ipBlock") {
            if map.len() > 1 {
                return Err(refuse(
                    join(&pat, "ipBlock"),
                    "ipBlock cannot be combined with a selector in one peer",
                ));
            }
            let bat = join(&pat, "ipBlock");
            let b = mapping(block, &bat)?;
            for k in keys_of(b, &bat)? {
                if !matches!(k.as_str(), "cidr" | "except") {
                    return Err(refuse(join(&bat, &k), "unknown field"));
                }
            }
            cidr_sets.push(block.clone());
            continue;
        }
        let pod = map.get("podSelector");
        match map.get("namespaceSelector") {
            None => endpoints.push(pod.cloned().unwrap_or(Value::Mapping(Mapping::new()))),
            Some(ns) => {
                let reqs = namespace_requirements(ns, &join(&pat, "namespaceSelector"))?;
                endpoints.extend(with_namespaces(pod, reqs));
            }
        }
    }
    Ok(())
}

fn k8s_ports(ports: &[Value], at: &str) -> Result<Value, Refusal> {
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let pat = format!("{at}[{i}]");
        let map = mapping(p, &pat)?;
        let mut pp = Mapping::new();
        for k in keys_of(map, &pat)? {
            match k.as_str() {
                "port" => {
                    pp.insert(key("port"), map["port"].clone());
                }
                "protocol" => {}
                "endPort" => {
                    return Err(refuse(
                        join(&pat, "endPort"),
                        "port ranges are not supported by meshd (list the ports)",
                    ))
                }
                other => return Err(refuse(join(&pat, other), "unknown field")),
            }
        }
        let protocol = map.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
        if !matches!(protocol, "TCP" | "UDP") {
            return Err(refuse(
                join(&pat, "protocol"),
                format!("{protocol:?} is not supported by meshd (TCP or UDP)"),
            ));
        }
        pp.insert(key("protocol"), key(protocol));
        out.push(Value::Mapping(pp));
    }
    let mut rule = Mapping::new();
    rule.insert(key("ports"), Value::Sequence(out));
    Ok(Value::Sequence(vec![Value::Mapping(rule)]))
}

/// A Kubernetes `NetworkPolicy` as the meshd policy document with the same meaning.
pub fn from_kubernetes(doc: &Value) -> Result<Value, Refusal> {
    let top = mapping(doc, "")?;
    check_top_level(top, &[])?;
    let spec = mapping(
        top.get("spec").ok_or_else(|| refuse("spec", "missing"))?,
        "spec",
    )?;
    for k in keys_of(spec, "spec")? {
        if !matches!(
            k.as_str(),
            "podSelector" | "policyTypes" | "ingress" | "egress"
        ) {
            return Err(refuse(join("spec", &k), "unknown field"));
        }
    }
    let mut out = Mapping::new();
    out.insert(
        key("endpointSelector"),
        spec.get("podSelector")
            .cloned()
            .ok_or_else(|| refuse("spec.podSelector", "missing"))?,
    );
    let types: Vec<String> = match spec.get("policyTypes") {
        Some(t) => sequence(t, "spec.policyTypes")?
            .iter()
            .enumerate()
            .map(|(i, v)| match v.as_str() {
                Some(s @ ("Ingress" | "Egress")) => Ok(s.to_owned()),
                _ => Err(refuse(
                    format!("spec.policyTypes[{i}]"),
                    format!("{v:?} is not Ingress or Egress"),
                )),
            })
            .collect::<Result<_, _>>()?,
        None => {
            let mut t = vec!["Ingress".to_owned()];
            if spec.contains_key("egress") {
                t.push("Egress".to_owned());
            }
            t
        }
    };
    for (section, ty, peers_in, peers_out, cidr_out) in [
        ("ingress", "Ingress", "from", "fromEndpoints", "fromCIDRSet"),
        ("egress", "Egress", "to", "toEndpoints", "toCIDRSet"),
    ] {
        if !types.iter().any(|t| t == ty) {
            if spec.contains_key(section) {
                return Err(refuse(
                    format!("spec.{section}"),
                    format!("policyTypes does not list {ty}, so these rules would be ignored"),
                ));
            }
            continue;
        }
        let mut rules = Vec::new();
        let at = format!("spec.{section}");
        let listed = match spec.get(section) {
            Some(Value::Null) | None => &[][..],
            Some(v) => sequence(v, &at)?,
        };
        for (i, rule) in listed.iter().enumerate() {
            let rat = format!("{at}[{i}]");
            let map = match rule {
                Value::Null => &Mapping::new(),
                r => mapping(r, &rat)?,
            };
            let mut r = Mapping::new();
            for k in keys_of(map, &rat)? {
                if k != peers_in && k != "ports" {
                    return Err(refuse(join(&rat, &k), "unknown field"));
                }
            }
            let peers = match map.get(peers_in) {
                Some(Value::Null) | None => &[][..],
                Some(v) => sequence(v, &join(&rat, peers_in))?,
            };
            // No peer listed: every peer (Kubernetes' meaning), which is meshd's rule without
            // peer fields.
            if !peers.is_empty() {
                let mut endpoints = Vec::new();
                let mut cidrs = Vec::new();
                k8s_peers(peers, &join(&rat, peers_in), &mut endpoints, &mut cidrs)?;
                if !endpoints.is_empty() {
                    r.insert(key(peers_out), Value::Sequence(endpoints));
                }
                if !cidrs.is_empty() {
                    r.insert(key(cidr_out), Value::Sequence(cidrs));
                }
            }
            match map.get("ports") {
                Some(Value::Null) | None => {}
                Some(p) => {
                    let list = sequence(p, &join(&rat, "ports"))?;
                    if !list.is_empty() {
                        r.insert(key("toPorts"), k8s_ports(list, &join(&rat, "ports"))?);
                    }
                }
            }
            rules.push(Value::Mapping(r));
        }
        out.insert(key(section), Value::Sequence(rules));
    }
    let meta = metadata(top, &format!("{KUBERNETES_API_VERSION}/NetworkPolicy"))?;
    Ok(meshd_document(meta, out))
}
