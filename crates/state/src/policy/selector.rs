//! Label selectors, as in Kubernetes: `matchLabels` (every pair present) and
//! `matchExpressions` (`In`, `NotIn`, `Exists`, `DoesNotExist`), all of which must hold. The
//! empty selector matches everything.

use std::collections::BTreeMap;

use crate::labels::Labels;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl EndpointSelector {
    /// A selector of exactly these labels.
    pub fn labels<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            match_labels: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            match_expressions: Vec::new(),
        }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v.as_str()))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Whether the selector says anything about label `key`.
    pub fn mentions(&self, key: &str) -> bool {
        self.match_labels.contains_key(key) || self.match_expressions.iter().any(|r| r.key == key)
    }
}

impl SelectorRequirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Operator::NotIn => value.is_none_or(|v| self.values.iter().all(|x| x != v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: &str, operator: Operator, values: &[&str]) -> SelectorRequirement {
        SelectorRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn match_labels_and_expressions() {
        let l = Labels::from_pairs([("app", "web"), ("tier", "front")]);
        assert!(EndpointSelector::default().matches(&l));
        assert!(EndpointSelector::labels([("app", "web")]).matches(&l));
        assert!(!EndpointSelector::labels([("app", "db")]).matches(&l));
        assert!(!EndpointSelector::labels([("app", "web"), ("zone", "a")]).matches(&l));
        let with = |r: SelectorRequirement| EndpointSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![r],
        };
        assert!(with(req("app", Operator::In, &["db", "web"])).matches(&l));
        assert!(!with(req("app", Operator::In, &["db"])).matches(&l));
        assert!(!with(req("zone", Operator::In, &["a"])).matches(&l));
        assert!(with(req("app", Operator::NotIn, &["db"])).matches(&l));
        assert!(!with(req("app", Operator::NotIn, &["web"])).matches(&l));
        assert!(with(req("zone", Operator::NotIn, &["a"])).matches(&l));
        assert!(with(req("tier", Operator::Exists, &[])).matches(&l));
        assert!(!with(req("zone", Operator::Exists, &[])).matches(&l));
        assert!(with(req("zone", Operator::DoesNotExist, &[])).matches(&l));
        assert!(!with(req("app", Operator::DoesNotExist, &[])).matches(&l));
        assert!(with(req("zone", Operator::Exists, &[])).mentions("zone"));
        assert!(EndpointSelector::labels([("zone", "a")]).mentions("zone"));
        assert!(!EndpointSelector::labels([("zone", "a")]).mentions("app"));
    }
}
