//! NetworkPolicy documents: the type and its validation belong to the state model
//! (`meshd_state::NetworkPolicy`, stored as is under its key); this adapts its errors to the
//! manifest's.

use meshd_state::FieldError;

pub use meshd_state::NetworkPolicy;

pub(crate) fn namespace(p: &NetworkPolicy) -> &str {
    &p.metadata.namespace
}

pub(crate) fn name(p: &NetworkPolicy) -> &str {
    &p.metadata.name
}

/// Every problem the policy engine finds, each with its field path.
pub(crate) fn validate(p: &NetworkPolicy) -> Result<(), Vec<FieldError>> {
    p.validate().map_err(|errors| {
        errors
            .0
            .into_iter()
            .map(|e| FieldError::new(e.field, e.reason))
            .collect()
    })
}
