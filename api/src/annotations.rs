//! Global-service annotations.
//!
//! A Kubernetes Service becomes part of the mesh through annotations. Both Cilium's
//! current form (`service.cilium.io/*`) and its legacy form (`io.cilium/*`) are read so
//! existing manifests work unchanged; when both are present the current form wins. Values
//! are case-insensitive and surrounding whitespace is ignored.
//!
//! An invalid value never rejects the whole service: the setting falls back to its
//! default and an [`AnnotationWarning`] names the annotation, the value and the allowed
//! values, for the caller to log and count. Other settings are unaffected.

use std::collections::BTreeMap;
use std::fmt;

use crate::v1::Affinity;

/// `service.cilium.io/global`: `"true"` makes the service global.
pub const GLOBAL: &str = "service.cilium.io/global";
/// Legacy form of [`GLOBAL`].
pub const GLOBAL_LEGACY: &str = "io.cilium/global-service";
/// `service.cilium.io/shared`: whether this cluster's backends are offered to other
/// clusters (default `true` for a global service).
pub const SHARED: &str = "service.cilium.io/shared";
/// Legacy form of [`SHARED`].
pub const SHARED_LEGACY: &str = "io.cilium/shared-service";
/// `service.cilium.io/affinity`: `local`, `remote` or `none`.
pub const AFFINITY: &str = "service.cilium.io/affinity";
/// Legacy form of [`AFFINITY`].
pub const AFFINITY_LEGACY: &str = "io.cilium/service-affinity";
/// `service.clustermesh.io/topology-aware`: `"true"` enables same-node/same-zone
/// preference tiers for the service.
pub const TOPOLOGY_AWARE: &str = "service.clustermesh.io/topology-aware";

const BOOL_VALUES: &[&str] = &["true", "false"];
const AFFINITY_VALUES: &[&str] = &["local", "remote", "none"];

/// The mesh settings of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalServiceSettings {
    /// The service is merged with same-named services of other clusters.
    pub global: bool,
    /// This cluster's backends are exported to other clusters (only ever true for a
    /// global service).
    pub shared: bool,
    /// Backend preference.
    pub affinity: Affinity,
    /// Locality tiers (node, zone) apply.
    pub topology_aware: bool,
}

impl Default for GlobalServiceSettings {
    fn default() -> Self {
        GlobalServiceSettings {
            global: false,
            shared: false,
            affinity: Affinity::None,
            topology_aware: false,
        }
    }
}

/// An annotation whose value was not understood; the setting used its default.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}={value:?} is invalid (allowed: {allowed}); using the default {default:?} for this setting")]
pub struct AnnotationWarning {
    /// The annotation key as written on the object (new or legacy form).
    pub annotation: String,
    /// The rejected value.
    pub value: String,
    /// The allowed values, `|`-separated.
    pub allowed: AllowedValues,
    /// The value used instead.
    pub default: &'static str,
}

/// The allowed values of an annotation, displayed `a|b|c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowedValues(pub &'static [&'static str]);

impl fmt::Display for AllowedValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("|"))
    }
}

/// Result of [`parse_service_annotations`]: the settings plus one warning per invalid
/// annotation value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedAnnotations {
    /// The effective settings.
    pub settings: GlobalServiceSettings,
    /// Invalid values that were replaced by defaults.
    pub warnings: Vec<AnnotationWarning>,
}

/// Reads the global-service settings from a service's annotations.
#[must_use]
pub fn parse_service_annotations(annotations: &BTreeMap<String, String>) -> ParsedAnnotations {
    let mut warnings = Vec::new();
    let global = read_bool(annotations, GLOBAL, GLOBAL_LEGACY, false, &mut warnings);
    let shared = read_bool(annotations, SHARED, SHARED_LEGACY, true, &mut warnings);
    let affinity = match lookup(annotations, AFFINITY, AFFINITY_LEGACY) {
        None => Affinity::None,
        Some((key, raw)) => match normalize(raw).as_str() {
            "local" => Affinity::Local,
            "remote" => Affinity::Remote,
            "none" => Affinity::None,
            _ => {
                warnings.push(AnnotationWarning {
                    annotation: key.to_owned(),
                    value: raw.to_owned(),
                    allowed: AllowedValues(AFFINITY_VALUES),
                    default: "none",
                });
                Affinity::None
            }
        },
    };
    let topology_aware = read_bool(
        annotations,
        TOPOLOGY_AWARE,
        TOPOLOGY_AWARE,
        false,
        &mut warnings,
    );
    ParsedAnnotations {
        settings: GlobalServiceSettings {
            global,
            shared: global && shared,
            affinity,
            topology_aware,
        },
        warnings,
    }
}

/// The value of the new-form key if present, else of the legacy key, with the key used.
fn lookup<'a>(
    annotations: &'a BTreeMap<String, String>,
    key: &'static str,
    legacy: &'static str,
) -> Option<(&'static str, &'a str)> {
    annotations
        .get(key)
        .map(|v| (key, v.as_str()))
        .or_else(|| annotations.get(legacy).map(|v| (legacy, v.as_str())))
}

fn normalize(value: &str) -> String {
    value.trim().to_ascii_lowercase()
}

fn read_bool(
    annotations: &BTreeMap<String, String>,
    key: &'static str,
    legacy: &'static str,
    default: bool,
    warnings: &mut Vec<AnnotationWarning>,
) -> bool {
    let Some((used, raw)) = lookup(annotations, key, legacy) else {
        return default;
    };
    match normalize(raw).as_str() {
        "true" => true,
        "false" => false,
        _ => {
            warnings.push(AnnotationWarning {
                annotation: used.to_owned(),
                value: raw.to_owned(),
                allowed: AllowedValues(BOOL_VALUES),
                default: if default { "true" } else { "false" },
            });
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(pairs: &[(&str, &str)]) -> ParsedAnnotations {
        let map = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        parse_service_annotations(&map)
    }

    #[test]
    fn no_annotations_is_a_plain_local_service() {
        let p = parse(&[]);
        assert_eq!(p.settings, GlobalServiceSettings::default());
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn global_defaults_to_shared() {
        let p = parse(&[(GLOBAL, "true")]);
        assert!(p.settings.global && p.settings.shared);
        assert_eq!(p.settings.affinity, Affinity::None);
    }

    #[test]
    fn legacy_forms_are_read() {
        let p = parse(&[
            (GLOBAL_LEGACY, "TRUE"),
            (SHARED_LEGACY, "False"),
            (AFFINITY_LEGACY, " Remote "),
        ]);
        assert!(p.settings.global);
        assert!(!p.settings.shared);
        assert_eq!(p.settings.affinity, Affinity::Remote);
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn new_form_wins_over_legacy() {
        let p = parse(&[
            (GLOBAL, "false"),
            (GLOBAL_LEGACY, "true"),
            (AFFINITY, "local"),
            (AFFINITY_LEGACY, "remote"),
        ]);
        assert!(!p.settings.global);
        assert_eq!(p.settings.affinity, Affinity::Local);
    }

    #[test]
    fn new_form_invalid_value_is_not_replaced_by_legacy() {
        let p = parse(&[
            (AFFINITY, "sideways"),
            (AFFINITY_LEGACY, "local"),
            (GLOBAL, "true"),
        ]);
        assert_eq!(p.settings.affinity, Affinity::None);
        assert_eq!(p.warnings.len(), 1);
        assert_eq!(p.warnings[0].annotation, AFFINITY);
    }

    #[test]
    fn shared_is_false_for_non_global_services() {
        let p = parse(&[(SHARED, "true")]);
        assert!(!p.settings.shared);
    }

    #[test]
    fn invalid_affinity_defaults_and_warns_leaving_others_intact() {
        let p = parse(&[
            (GLOBAL, "true"),
            (AFFINITY, "sideways"),
            (TOPOLOGY_AWARE, "true"),
        ]);
        assert!(p.settings.global && p.settings.shared && p.settings.topology_aware);
        assert_eq!(p.settings.affinity, Affinity::None);
        let w = &p.warnings[0];
        assert_eq!(w.value, "sideways");
        let msg = w.to_string();
        assert!(msg.contains("service.cilium.io/affinity"), "{msg}");
        assert!(msg.contains("local|remote|none"), "{msg}");
    }

    #[test]
    fn invalid_booleans_use_their_own_defaults() {
        let p = parse(&[(GLOBAL, "yes"), (SHARED_LEGACY, "1")]);
        assert!(!p.settings.global);
        assert_eq!(p.warnings.len(), 2);
        assert_eq!(p.warnings[0].annotation, GLOBAL);
        assert_eq!(p.warnings[0].default, "false");
        assert_eq!(p.warnings[1].annotation, SHARED_LEGACY);
        assert_eq!(p.warnings[1].default, "true");

        let p = parse(&[(GLOBAL, "true"), (SHARED, "nope")]);
        assert!(
            p.settings.shared,
            "invalid shared falls back to its default (true)"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_annotations_never_panic(
            pairs in proptest::collection::vec(
                (prop_oneof![
                    Just(GLOBAL.to_owned()), Just(GLOBAL_LEGACY.to_owned()),
                    Just(SHARED.to_owned()), Just(SHARED_LEGACY.to_owned()),
                    Just(AFFINITY.to_owned()), Just(AFFINITY_LEGACY.to_owned()),
                    Just(TOPOLOGY_AWARE.to_owned()), ".{0,20}"
                ], ".{0,12}"),
                0..8)
        ) {
            let map: BTreeMap<String, String> = pairs.into_iter().collect();
            let p = parse_service_annotations(&map);
            prop_assert!(!p.settings.shared || p.settings.global);
            prop_assert!(p.warnings.len() <= 4);
            for w in &p.warnings {
                prop_assert_eq!(map.get(&w.annotation), Some(&w.value));
            }
        }
    }
}
