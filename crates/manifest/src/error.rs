//! Errors of manifest loading. Each one names the file, the document inside it (1-based, in
//! the order of the `---`-separated stream), the object when it is known, and the field path
//! (`spec.ports[0].port`), so a user can go straight to the line to fix.

use std::fmt;

/// One problem with one document of a manifest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentError {
    /// The file as the user named it (or another source name, e.g. an etcd key).
    pub file: String,
    /// 1-based position of the document in its file; 0 when the file itself failed (unreadable).
    pub document: usize,
    /// `Service default/echo`, once kind and name are known.
    pub object: Option<String>,
    /// Path of the field, empty when the problem is the document as a whole (syntax).
    pub field: String,
    pub reason: String,
}

impl DocumentError {
    pub fn file(file: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            document: 0,
            object: None,
            field: String::new(),
            reason: reason.into(),
        }
    }

    pub fn document(
        file: impl Into<String>,
        document: usize,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            document,
            object: None,
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn with_object(mut self, object: impl Into<String>) -> Self {
        self.object = Some(object.into());
        self
    }
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.document > 0 {
            write!(f, ": document {}", self.document)?;
        }
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        if !self.field.is_empty() {
            write!(f, ": field {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for DocumentError {}

/// Every problem found in a set of manifests: loading reports them all at once rather than
/// stopping at the first, so one round of fixes is enough.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestErrors(pub Vec<DocumentError>);

impl ManifestErrors {
    pub fn errors(&self) -> &[DocumentError] {
        &self.0
    }
}

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            all => {
                write!(f, "{} invalid manifests:", all.len())?;
                for e in all {
                    write!(f, "\n  {e}")?;
                }
                Ok(())
            }
        }
    }
}
