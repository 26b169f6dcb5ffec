//! Loading manifests: files and directories of `---`-separated YAML (or JSON) documents into
//! typed, validated documents. Every problem of every document is collected, so the caller can
//! refuse the whole set at once and report everything in one go.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::document::{Document, Kind, ObjectRef};
use crate::error::{DocumentError, ManifestErrors};
use crate::foreign;

/// A document and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SourcedDocument {
    pub file: String,
    /// 1-based position in the file.
    pub index: usize,
    pub document: Document,
    /// The document alone, as YAML: what is sent to the apiserver, which parses and validates
    /// it again with the same code (so errors name the same file and document).
    pub text: String,
}

/// Parses one document's text (YAML or JSON) as sent over the API.
pub fn parse_document(file: &str, index: usize, text: &str) -> Result<Document, ManifestErrors> {
    let one =
        |reason: String| ManifestErrors(vec![DocumentError::document(file, index, "", reason)]);
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| one(format!("not valid YAML: {e}")))?;
    if value.is_null() {
        return Err(one("empty document".into()));
    }
    parse_value(file, index, value)
}

/// Every non-empty document of a file's text. Empty documents (a trailing `---`) are skipped
/// but still counted, so numbers match what the user sees.
pub fn parse_str(file: &str, text: &str) -> Result<Vec<SourcedDocument>, ManifestErrors> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                errors.push(DocumentError::document(
                    file,
                    index,
                    "",
                    format!("not valid YAML: {e}"),
                ));
                // The stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        let text = match serde_yaml::to_string(&value) {
            Ok(t) => t,
            Err(e) => {
                errors.push(DocumentError::document(file, index, "", e.to_string()));
                continue;
            }
        };
        match parse_value(file, index, value) {
            Ok(document) => docs.push(SourcedDocument {
                file: file.to_owned(),
                index,
                document,
                text,
            }),
            Err(e) => errors.extend(e.0),
        }
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(ManifestErrors(errors))
    }
}

fn field_of(path: &serde_path_to_error::Path) -> String {
    let p = path.to_string();
    if p == "." {
        String::new()
    } else {
        p
    }
}

fn object_of(value: &serde_yaml::Value, kind: &str) -> Option<String> {
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    let ns = meta
        .get("namespace")
        .and_then(|n| n.as_str())
        .unwrap_or(crate::meta::DEFAULT_NAMESPACE);
    Some(format!("{kind} {ns}/{name}"))
}

/// Types, then validates one document; every problem found is reported.
pub fn parse_value(
    file: &str,
    index: usize,
    value: serde_yaml::Value,
) -> Result<Document, ManifestErrors> {
    let document = type_document(file, index, value).map_err(|e| ManifestErrors(vec![e]))?;
    let object = document.object_ref().to_string();
    document.validate().map_err(|errors| {
        ManifestErrors(
            errors
                .into_iter()
                .map(|e| {
                    DocumentError::document(file, index, e.field, e.reason).with_object(&object)
                })
                .collect(),
        )
    })?;
    Ok(document)
}

/// The document as its kind's type; serde's errors carry the field path.
fn type_document(
    file: &str,
    index: usize,
    value: serde_yaml::Value,
) -> Result<Document, DocumentError> {
    let err = |field: &str, reason: String| DocumentError::document(file, index, field, reason);
    if !value.is_mapping() {
        return Err(err(
            "",
            "a document must be a mapping (apiVersion, kind, metadata, spec)".into(),
        ));
    }
    let mut kind_text = match value.get("kind") {
        Some(serde_yaml::Value::String(k)) => k.clone(),
        Some(_) => return Err(err("kind", "must be a string".into())),
        None => return Err(err("kind", "missing".into())),
    };
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_owned();
    // Policies users bring from Cilium or Kubernetes become meshd's own document first.
    let foreign = match (kind_text.as_str(), api_version.as_str()) {
        (foreign::CILIUM_KIND, foreign::CILIUM_API_VERSION) => Some(foreign::from_cilium(&value)),
        (foreign::CILIUM_KIND, _) => {
            return Err(err(
                "apiVersion",
                format!(
                    "{api_version:?} is not supported for {} (use {})",
                    foreign::CILIUM_KIND,
                    foreign::CILIUM_API_VERSION
                ),
            ))
        }
        ("NetworkPolicy", foreign::KUBERNETES_API_VERSION) => {
            Some(foreign::from_kubernetes(&value))
        }
        _ => None,
    };
    let mut value = value;
    if let Some(translated) = foreign {
        let object = object_of(&value, &kind_text);
        value = translated.map_err(|(field, reason)| {
            let e = err(&field, reason);
            match &object {
                Some(o) => e.with_object(o.clone()),
                None => e,
            }
        })?;
    } else if kind_text == "NetworkPolicy" {
        foreign::canonical_policy_labels(&mut value);
    }
    // Errors name the object as the user wrote it.
    let object = object_of(&value, &kind_text);
    if kind_text == foreign::CILIUM_KIND {
        kind_text = Kind::NetworkPolicy.as_str().to_owned();
    }
    let kind: Kind = kind_text.parse().map_err(|reason| err("kind", reason))?;
    let with_object = |e: DocumentError| match &object {
        Some(o) => e.with_object(o.clone()),
        None => e,
    };
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if !kind.api_versions().contains(&api_version) {
        return Err(with_object(err(
            "apiVersion",
            format!(
                "{api_version:?} is not supported for {} (use {})",
                kind.as_str(),
                kind.api_versions()[0]
            ),
        )));
    }
    let document = match kind {
        Kind::Service => {
            if let Some((field, reason)) = crate::service::unsupported_field(&value) {
                return Err(with_object(err(&field, reason)));
            }
            let svc: crate::Service = serde_path_to_error::deserialize(value)
                .map_err(|e| with_object(err(&field_of(e.path()), e.inner().to_string())))?;
            Document::Service(svc)
        }
        Kind::NetworkPolicy => {
            let policy: crate::NetworkPolicy = serde_path_to_error::deserialize(value)
                .map_err(|e| with_object(err(&field_of(e.path()), e.inner().to_string())))?;
            Document::NetworkPolicy(policy)
        }
    };
    Ok(document)
}

/// Files to read for `-f PATH`: a file as given; a directory's `*.yaml`, `*.yml` and `*.json`
/// files in name order (not recursive, like kubectl).
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ManifestErrors> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        let shown = path.display().to_string();
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> = entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| is_manifest_file(p))
                        .collect();
                    found.sort();
                    if found.is_empty() {
                        errors.push(DocumentError::file(
                            shown,
                            "directory holds no .yaml, .yml or .json file",
                        ));
                    }
                    files.extend(found);
                }
                Err(e) => errors.push(DocumentError::file(shown, format!("cannot list: {e}"))),
            },
            Ok(_) => files.push(path.clone()),
            Err(e) => errors.push(DocumentError::file(shown, format!("cannot read: {e}"))),
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(ManifestErrors(errors))
    }
}

fn is_manifest_file(p: &Path) -> bool {
    p.is_file()
        && matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        )
}

/// Loads every document of every file (directories expanded). Fails, with every problem, if any
/// document is bad or if two documents name the same object: a batch is applied whole or not at
/// all, so it must be valid whole.
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<SourcedDocument>, ManifestErrors> {
    let files = expand_paths(paths)?;
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for file in &files {
        let shown = file.display().to_string();
        match std::fs::read_to_string(file) {
            Ok(text) => match parse_str(&shown, &text) {
                Ok(d) => {
                    if d.is_empty() {
                        errors.push(DocumentError::file(shown, "holds no document"));
                    }
                    docs.extend(d);
                }
                Err(e) => errors.extend(e.0),
            },
            Err(e) => errors.push(DocumentError::file(shown, format!("cannot read: {e}"))),
        }
    }
    if let Err(e) = check_unique(&docs) {
        errors.extend(e.0);
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(ManifestErrors(errors))
    }
}

/// Refuses a batch naming one object twice: which of the two would win is not obvious.
pub fn check_unique(docs: &[SourcedDocument]) -> Result<(), ManifestErrors> {
    let mut seen: BTreeMap<ObjectRef, (&str, usize)> = BTreeMap::new();
    let mut errors = Vec::new();
    for d in docs {
        let r = d.document.object_ref();
        if let Some((file, index)) = seen.get(&r) {
            errors.push(
                DocumentError::document(
                    &d.file,
                    d.index,
                    "metadata.name",
                    format!("{r} is also declared in {file} document {index}"),
                )
                .with_object(r.to_string()),
            );
        } else {
            seen.insert(r, (&d.file, d.index));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ManifestErrors(errors))
    }
}
