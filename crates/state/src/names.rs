//! Validated names and numbers shared by every record: cluster names and ids, DNS-style names of
//! nodes, namespaces and services.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::FieldError;

/// The rule of DESIGN.md, `^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$`: at most 32 characters,
/// lowercase alphanumerics and `-`, starting and ending with an alphanumeric. Checked by hand
/// rather than by that regex: every key of every watch event names its cluster, and the regex
/// search was about 1.5% of an agent's CPU under churn (BENCHMARKS.md, issue 11, session 11).
/// A test holds the two to the same answers.
fn is_cluster_name(name: &str) -> bool {
    let b = name.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    match (b.first(), b.last()) {
        (Some(&first), Some(&last)) => {
            b.len() <= 32 && alnum(first) && alnum(last) && b.iter().all(|&c| alnum(c) || c == b'-')
        }
        _ => false,
    }
}

/// Name of a cluster, e.g. `c1`. Part of every state key, so it must never contain `/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(String);

impl ClusterName {
    pub fn new(name: impl Into<String>) -> Result<Self, FieldError> {
        let name = name.into();
        if is_cluster_name(&name) {
            Ok(Self(name))
        } else {
            Err(FieldError::new(
                "cluster",
                format!(
                    "{name:?} is not a valid cluster name (1-32 characters of a-z, 0-9 and '-', \
                     starting and ending with a letter or digit)"
                ),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ClusterName {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for ClusterName {
    type Error = FieldError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<ClusterName> for String {
    fn from(n: ClusterName) -> Self {
        n.0
    }
}

impl AsRef<str> for ClusterName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Numeric id of a cluster, 1-255: it fills bits 16-23 of every identity of the cluster, so it
/// must be unique across the mesh and 0 is never valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct ClusterId(u8);

impl ClusterId {
    pub fn new(id: u32) -> Result<Self, FieldError> {
        match u8::try_from(id) {
            Ok(id) if id != 0 => Ok(Self(id)),
            _ => Err(FieldError::new(
                "cluster_id",
                format!("{id} is not a valid cluster id (1-255)"),
            )),
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl TryFrom<u32> for ClusterId {
    type Error = FieldError;
    fn try_from(id: u32) -> Result<Self, Self::Error> {
        Self::new(id)
    }
}

impl From<ClusterId> for u32 {
    fn from(id: ClusterId) -> Self {
        id.0.into()
    }
}

/// Checks an RFC 1123 DNS label (Kubernetes namespaces and service names): 1-63 characters of
/// `a-z`, `0-9` and `-`, starting and ending with an alphanumeric.
pub fn check_dns_label(field: &str, s: &str) -> Result<(), FieldError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "{s:?} is not a valid DNS label (1-63 characters of a-z, 0-9 and '-', \
                 starting and ending with a letter or digit)"
            ),
        ))
    }
}

/// Checks an RFC 1123 DNS subdomain (node and endpoint names, label key prefixes): at most 253
/// characters, dot-separated DNS labels.
pub fn check_dns_subdomain(field: &str, s: &str) -> Result<(), FieldError> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.')
            .all(|part| check_dns_label(field, part).is_ok());
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "{s:?} is not a valid DNS subdomain (at most 253 characters, dot-separated \
                 labels of a-z, 0-9 and '-')"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written check answers as DESIGN.md's regex does, on every string of up to 3
    /// characters over an alphabet with each class the rule tells apart, and on lengths around
    /// the limit.
    #[test]
    fn the_cluster_name_check_agrees_with_the_design_regex() {
        let design = regex::Regex::new(r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$").unwrap();
        let alphabet = ['a', 'z', '0', '9', '-', 'A', '_', '/', '.', 'é'];
        let mut names = vec![String::new()];
        for len in 1..=3 {
            let mut more = Vec::new();
            for n in names.iter().filter(|n| n.chars().count() == len - 1) {
                more.extend(alphabet.iter().map(|c| format!("{n}{c}")));
            }
            names.extend(more);
        }
        for len in [30, 31, 32, 33, 40] {
            names.push("a".repeat(len));
            names.push(format!("{}-", "a".repeat(len - 1)));
            names.push(format!("a{}a", "-".repeat(len - 2)));
        }
        for name in &names {
            assert_eq!(is_cluster_name(name), design.is_match(name), "{name:?}");
        }
    }

    #[test]
    fn cluster_names_follow_the_design_rule() {
        for ok in ["c1", "a", "0", "cluster-1", &"a".repeat(32)] {
            assert!(ClusterName::new(ok).is_ok(), "{ok} should be valid");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A1",
            "c_1",
            "c/1",
            "c.1",
            &"a".repeat(33),
            "ümlaut",
        ] {
            let err = ClusterName::new(bad).unwrap_err();
            assert_eq!(err.field, "cluster");
        }
    }

    #[test]
    fn cluster_ids_are_1_to_255() {
        assert!(ClusterId::new(0).is_err());
        assert_eq!(ClusterId::new(1).unwrap().get(), 1);
        assert_eq!(ClusterId::new(255).unwrap().get(), 255);
        assert!(ClusterId::new(256).is_err());
        let e = serde_json::from_str::<ClusterId>("0").unwrap_err();
        assert!(e.to_string().contains("1-255"), "{e}");
    }

    #[test]
    fn cluster_name_round_trips_through_json_and_rejects_bad_names() {
        let n: ClusterName = serde_json::from_str("\"c1\"").unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"c1\"");
        assert!(serde_json::from_str::<ClusterName>("\"C1\"").is_err());
    }

    #[test]
    fn dns_names() {
        assert!(check_dns_label("namespace", "default").is_ok());
        assert!(check_dns_label("namespace", "kube-system").is_ok());
        assert!(check_dns_label("namespace", "Default").is_err());
        assert!(check_dns_label("namespace", "").is_err());
        assert!(check_dns_label("namespace", &"a".repeat(64)).is_err());
        assert!(check_dns_subdomain("node", "node-1.c1.example").is_ok());
        assert!(check_dns_subdomain("node", "node..1").is_err());
        assert!(check_dns_subdomain("node", "node/1").is_err());
    }
}
