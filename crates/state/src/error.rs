//! Errors of the state model. Every error names the etcd key it is about and, for values, the
//! field (a JSON path such as `backends[2].port`), so a log line is enough to find the culprit.

/// A problem with one field of a record or one segment of a key, before the key is known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// Path of the field, e.g. `labels["app"]` or `pod_cidrs[1]`.
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Prefixes the field path with its parent, e.g. `port` inside `backends[2]`.
    pub fn within(self, parent: impl AsRef<str>) -> Self {
        Self {
            field: format!("{}.{}", parent.as_ref(), self.field),
            reason: self.reason,
        }
    }
}

/// Errors about a stored key or value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The key does not belong to the schema (wrong prefix, missing or invalid segment).
    #[error("key {key:?}: {reason}")]
    Key { key: String, reason: String },
    /// The value is not JSON of the expected shape (bad syntax, wrong types, missing fields).
    #[error("key {key:?}: value is not a valid {kind} record: {reason}")]
    Json {
        key: String,
        kind: &'static str,
        reason: String,
    },
    /// The value decoded but one of its fields is invalid or disagrees with the key.
    #[error("key {key:?}: field {field}: {reason}")]
    Field {
        key: String,
        field: String,
        reason: String,
    },
}

impl StateError {
    pub fn key(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Key {
            key: key.into(),
            reason: reason.into(),
        }
    }

    pub fn field(key: impl Into<String>, err: FieldError) -> Self {
        Self::Field {
            key: key.into(),
            field: err.field,
            reason: err.reason,
        }
    }

    /// The key this error is about.
    pub fn key_str(&self) -> &str {
        match self {
            Self::Key { key, .. } | Self::Json { key, .. } | Self::Field { key, .. } => key,
        }
    }
}
