//! Label sets (`app=web`, `meshd.io/cluster=c1`), validated with the Kubernetes rules so users can
//! bring their manifests. Kept sorted (a `BTreeMap`), which makes the JSON form canonical: equal
//! label sets encode to equal bytes, which identity allocation relies on.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::names::check_dns_subdomain;

/// Label carrying the cluster name of every endpoint, so policy can select by cluster.
pub const CLUSTER_LABEL: &str = "meshd.io/cluster";
/// Label carrying the namespace of an endpoint.
pub const NAMESPACE_LABEL: &str = "meshd.io/namespace";

/// A sorted set of labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a label set from pairs; later duplicates win.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.insert(key.into(), value.into());
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks every key and value; `field` is the name of the label set in its record.
    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        for (k, v) in &self.0 {
            check_label_key(k)
                .map_err(|reason| FieldError::new(format!("{field}[{k:?}]"), reason))?;
            check_label_value(v)
                .map_err(|reason| FieldError::new(format!("{field}[{k:?}]"), reason))?;
        }
        Ok(())
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Labels {
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Self {
        Self::from_pairs(iter)
    }
}

/// A label name (the part after an optional prefix, or a value): at most 63 characters of
/// alphanumerics, `-`, `_` and `.`, starting and ending with an alphanumeric.
fn is_qualified_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        check_dns_subdomain("prefix", prefix)
            .map_err(|_| format!("label key {key:?}: prefix {prefix:?} is not a DNS subdomain"))?;
    }
    if !is_qualified_name_part(name) {
        return Err(format!(
            "label key {key:?}: name {name:?} must be 1-63 characters of alphanumerics, '-', '_' \
             and '.', starting and ending with an alphanumeric"
        ));
    }
    Ok(())
}

fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_qualified_name_part(value) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?} must be empty or 1-63 characters of alphanumerics, '-', '_' \
             and '.', starting and ending with an alphanumeric"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_labels() {
        let l = Labels::from_pairs([
            ("app", "web"),
            ("meshd.io/cluster", "c1"),
            ("k8s.io/empty", ""),
            ("a_b.c-d", "X.y_z-1"),
        ]);
        l.validate("labels").unwrap();
    }

    #[test]
    fn invalid_labels_name_the_label() {
        for (k, v) in [
            ("", "x"),
            ("-app", "x"),
            ("app", "-x"),
            ("app", "a b"),
            ("Bad_Prefix/app", "x"),
            ("a/b/c", "x"),
            ("app", &*"v".repeat(64)),
            (&*"k".repeat(64), "v"),
        ] {
            let err = Labels::from_pairs([(k, v)]).validate("labels").unwrap_err();
            assert_eq!(err.field, format!("labels[{k:?}]"), "{err}");
        }
    }

    #[test]
    fn json_is_sorted_and_canonical() {
        let a = Labels::from_pairs([("z", "1"), ("a", "2")]);
        let b = Labels::from_pairs([("a", "2"), ("z", "1")]);
        assert_eq!(serde_json::to_string(&a).unwrap(), r#"{"a":"2","z":"1"}"#);
        assert_eq!(
            serde_json::to_vec(&a).unwrap(),
            serde_json::to_vec(&b).unwrap()
        );
        assert_eq!(a.to_string(), "a=2,z=1");
    }
}
