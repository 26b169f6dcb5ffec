//! Service annotations that make a service global, shared and affine, with Cilium's names as
//! aliases so users can bring their ClusterMesh manifests unchanged.
//!
//! | meaning | meshd | Cilium aliases | values (default) |
//! |---|---|---|---|
//! | merge backends of all clusters | `service.meshd.io/global` | `service.cilium.io/global`, `io.cilium/global-service` | `true`/`false` (false) |
//! | export this cluster's backends | `service.meshd.io/shared` | `service.cilium.io/shared`, `io.cilium/shared-service` | `true`/`false` (true) |
//! | prefer local or remote backends | `service.meshd.io/affinity` | `service.cilium.io/affinity` | `local`/`remote`/`none` (none) |
//!
//! An unknown value is refused naming the annotation; so is an unknown `service.meshd.io/` key
//! (a typo would otherwise silently leave a service local). Cilium has more `service.cilium.io/`
//! annotations than these; they are ignored, not refused, so Cilium manifests still apply.

use std::collections::BTreeMap;

use meshd_state::{Affinity, FieldError};

pub const GLOBAL: &str = "service.meshd.io/global";
pub const SHARED: &str = "service.meshd.io/shared";
pub const AFFINITY: &str = "service.meshd.io/affinity";
/// Annotation prefix owned by meshd: every key under it must be known.
pub const MESHD_PREFIX: &str = "service.meshd.io/";

const GLOBAL_NAMES: [&str; 3] = [
    GLOBAL,
    "service.cilium.io/global",
    "io.cilium/global-service",
];
const SHARED_NAMES: [&str; 3] = [
    SHARED,
    "service.cilium.io/shared",
    "io.cilium/shared-service",
];
const AFFINITY_NAMES: [&str; 2] = [AFFINITY, "service.cilium.io/affinity"];

/// What the annotations of a service ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceOptions {
    pub global: bool,
    /// This cluster exports its backends. Only meaningful for global services: a non-global
    /// service is never shared, so remote clusters ignore it.
    pub shared: bool,
    pub affinity: Affinity,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            global: false,
            shared: false,
            affinity: Affinity::None,
        }
    }
}

fn field(name: &str) -> String {
    format!("metadata.annotations[{name:?}]")
}

/// The one value given under any of `names`; aliases that disagree are an error naming both.
fn lookup<'a>(
    annotations: &'a BTreeMap<String, String>,
    names: &[&'a str],
) -> Result<Option<(&'a str, String)>, FieldError> {
    let mut found: Option<(&str, String)> = None;
    for name in names {
        let Some(value) = annotations.get(*name) else {
            continue;
        };
        let value = value.trim().to_ascii_lowercase();
        if let Some((first, v)) = &found {
            if *v != value {
                return Err(FieldError::new(
                    field(name),
                    format!("{value:?} contradicts {first:?}: {v:?} (the two are aliases)"),
                ));
            }
        } else {
            found = Some((name, value));
        }
    }
    Ok(found)
}

fn boolean(name: &str, value: &str) -> Result<bool, FieldError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(FieldError::new(
            field(name),
            format!("{other:?} is not a valid value (\"true\" or \"false\")"),
        )),
    }
}

impl ServiceOptions {
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<Self, FieldError> {
        for key in annotations.keys() {
            if key.starts_with(MESHD_PREFIX) && ![GLOBAL, SHARED, AFFINITY].contains(&key.as_str())
            {
                return Err(FieldError::new(
                    field(key),
                    format!("unknown annotation (known: {GLOBAL}, {SHARED}, {AFFINITY})"),
                ));
            }
        }
        let global = match lookup(annotations, &GLOBAL_NAMES)? {
            Some((name, v)) => boolean(name, &v)?,
            None => false,
        };
        let shared = match lookup(annotations, &SHARED_NAMES)? {
            Some((name, v)) => boolean(name, &v)?,
            None => true,
        };
        let affinity = match lookup(annotations, &AFFINITY_NAMES)? {
            Some((_, v)) if v == "local" => Affinity::Local,
            Some((_, v)) if v == "remote" => Affinity::Remote,
            Some((_, v)) if v == "none" => Affinity::None,
            Some((name, v)) => {
                return Err(FieldError::new(
                    field(name),
                    format!("{v:?} is not a valid value (\"local\", \"remote\" or \"none\")"),
                ))
            }
            None => Affinity::None,
        };
        Ok(Self {
            global,
            shared: global && shared,
            affinity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Result<ServiceOptions, FieldError> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ServiceOptions::from_annotations(&map)
    }

    #[test]
    fn defaults_are_local_only() {
        assert_eq!(opts(&[]).unwrap(), ServiceOptions::default());
        // `shared` alone does not export a non-global service.
        assert!(!opts(&[(SHARED, "true")]).unwrap().shared);
    }

    #[test]
    fn global_is_shared_unless_said_otherwise() {
        let o = opts(&[(GLOBAL, "true"), (AFFINITY, "local")]).unwrap();
        assert_eq!(
            o,
            ServiceOptions {
                global: true,
                shared: true,
                affinity: Affinity::Local
            }
        );
        assert!(!opts(&[(GLOBAL, "true"), (SHARED, "false")]).unwrap().shared);
    }

    #[test]
    fn cilium_aliases() {
        for g in GLOBAL_NAMES {
            assert!(opts(&[(g, "true")]).unwrap().global, "{g}");
        }
        let o = opts(&[
            ("io.cilium/global-service", "True"),
            ("service.cilium.io/shared", "false"),
            ("service.cilium.io/affinity", "remote"),
        ])
        .unwrap();
        assert!(o.global && !o.shared && o.affinity == Affinity::Remote);
        // Other Cilium annotations are ignored.
        assert!(opts(&[("service.cilium.io/lb-l7", "enabled")]).is_ok());
    }

    #[test]
    fn bad_values_name_the_annotation() {
        let e = opts(&[("service.cilium.io/global", "yes")]).unwrap_err();
        assert_eq!(
            e.field,
            "metadata.annotations[\"service.cilium.io/global\"]"
        );
        let e = opts(&[(AFFINITY, "nearest")]).unwrap_err();
        assert_eq!(e.field, format!("metadata.annotations[{AFFINITY:?}]"));
        let e = opts(&[("service.meshd.io/globl", "true")]).unwrap_err();
        assert!(e.reason.contains("unknown annotation"), "{e}");
        let e = opts(&[(GLOBAL, "true"), ("io.cilium/global-service", "false")]).unwrap_err();
        assert!(e.reason.contains("contradicts"), "{e}");
    }
}
