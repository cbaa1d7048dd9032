//! Global-service annotations.
//!
//! A Kubernetes Service becomes part of the mesh through annotations. Both Cilium's
//! current form (`service.cilium.io/*`) and its legacy form (`io.cilium/*`) are read so
//! existing manifests work unchanged; when both are present the current form wins.
//!
//! The values that decide what leaves the cluster follow Cilium exactly
//! (`pkg/annotation`: `GetAnnotationIncludeExternal`, `GetAnnotationShared`,
//! `GetAnnotationServiceAffinity`), so a manifest means the same thing here and there:
//! - a value is compared after ASCII lowercasing and is **not** trimmed: `" true "` is
//!   not `true`;
//! - `global` is true only for `true`; anything else is false;
//! - `shared` and `affinity` are read only for a global service (Cilium ignores them
//!   otherwise, silently); `shared` is true when absent and false for anything but
//!   `true`; `affinity` is `local`, `remote`, or `none` for `none`, the empty string and
//!   anything else.
//!
//! An invalid value never rejects the whole service: the setting takes the value Cilium
//! would give it and an [`AnnotationWarning`] names the annotation, the value and the
//! allowed values, for the caller to log and count. Other settings are unaffected.
//!
//! One annotation, [`WEIGHT`], is read from Pods as well: it sets the relative Maglev
//! weight of the pod's backend addresses (see [`parse_weight`] and [`read_weight`]).

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

/// `service.clustermesh.io/weight`: the relative Maglev weight of a backend, an integer
/// in [`MIN_WEIGHT`]`..=`[`MAX_WEIGHT`]. On a Pod it applies to every backend address of
/// that pod, in every service; on a Service it is the default for the service's backends
/// whose pod has no (valid) weight of its own. Unset means [`DEFAULT_WEIGHT`].
pub const WEIGHT: &str = "service.clustermesh.io/weight";
/// The weight of a backend without a weight annotation.
pub const DEFAULT_WEIGHT: u32 = 1;
/// The smallest weight accepted. 0 is refused on purpose: a backend is drained by
/// making its pod not ready or letting it terminate (terminating backends already get
/// weight 0 and keep their existing flows), not by an annotation that would outlive the
/// reason for it.
pub const MIN_WEIGHT: u32 = 1;
/// The largest weight accepted (HAProxy's server weights stop at the same value). With
/// the default Maglev table size of at least 100 slots per backend, a weight ratio far
/// above 100:1 would leave the light backends of a small service without any slot.
pub const MAX_WEIGHT: u32 = 256;

const BOOL_VALUES: &[&str] = &["true", "false"];
const AFFINITY_VALUES: &[&str] = &["local", "remote", "none"];
/// Spells out [`MIN_WEIGHT`]`..=`[`MAX_WEIGHT`] (a `const` cannot format numbers); the
/// test `weight_values_name_the_weight_bounds` keeps the two in agreement.
const WEIGHT_VALUES: &[&str] = &["an integer 1..=256"];

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
    /// Weight of the service's backends whose pod sets none ([`WEIGHT`] on the service).
    pub default_weight: u32,
}

impl Default for GlobalServiceSettings {
    fn default() -> Self {
        GlobalServiceSettings {
            global: false,
            shared: false,
            affinity: Affinity::None,
            topology_aware: false,
            default_weight: DEFAULT_WEIGHT,
        }
    }
}

/// An annotation whose value was not understood; the setting used its default.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "annotation {annotation}={value:?} is invalid{} (allowed: {allowed}); using {default:?} for this setting, as Cilium does",
    .reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
)]
pub struct AnnotationWarning {
    /// The annotation key as written on the object (new or legacy form).
    pub annotation: String,
    /// The rejected value.
    pub value: String,
    /// The allowed values, `|`-separated.
    pub allowed: AllowedValues,
    /// The value used instead (what Cilium uses for the same value: `false` for an
    /// invalid boolean, `none` for an invalid affinity).
    pub default: &'static str,
    /// Why the value was refused, when "not one of the allowed values" does not say
    /// enough (e.g. a weight of 0).
    pub reason: Option<WeightError>,
}

/// Why a [`WEIGHT`] value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightError {
    /// Empty, signed, fractional or otherwise not a plain decimal integer.
    #[error("{0:?} is not a whole decimal number")]
    NotANumber(String),
    /// Zero.
    #[error(
        "a weight of 0 is not allowed; to drain a backend, make its pod not ready or delete it (terminating backends keep their existing flows)"
    )]
    Zero,
    /// Above [`MAX_WEIGHT`].
    #[error("weight {0} is above the maximum of {max}", max = MAX_WEIGHT)]
    TooLarge(String),
}

/// Parses a [`WEIGHT`] value: a decimal integer in [`MIN_WEIGHT`]`..=`[`MAX_WEIGHT`],
/// surrounding whitespace ignored.
///
/// # Errors
/// [`WeightError`] saying what is wrong with `raw`.
pub fn parse_weight(raw: &str) -> Result<u32, WeightError> {
    let digits = raw.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(WeightError::NotANumber(raw.to_owned()));
    }
    // All digits: the only way `parse` fails is overflow.
    let value: u32 = digits
        .parse()
        .map_err(|_| WeightError::TooLarge(digits.to_owned()))?;
    match value {
        0 => Err(WeightError::Zero),
        MIN_WEIGHT..=MAX_WEIGHT => Ok(value),
        _ => Err(WeightError::TooLarge(digits.to_owned())),
    }
}

/// The [`WEIGHT`] set on an object (a Pod or a Service): `Ok(None)` when unset,
/// `Err` naming the annotation and value when it is invalid; the caller then uses what
/// applies without it, which `fallback` describes in the warning (`"1"` for a service,
/// the service's weight for a pod).
///
/// # Errors
/// An [`AnnotationWarning`] for an invalid value, for the caller to log and count.
pub fn read_weight(
    annotations: &BTreeMap<String, String>,
    fallback: &'static str,
) -> Result<Option<u32>, AnnotationWarning> {
    let Some(raw) = annotations.get(WEIGHT) else {
        return Ok(None);
    };
    parse_weight(raw)
        .map(Some)
        .map_err(|reason| AnnotationWarning {
            annotation: WEIGHT.to_owned(),
            value: raw.clone(),
            allowed: AllowedValues(WEIGHT_VALUES),
            default: fallback,
            reason: Some(reason),
        })
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
    // Cilium reads neither `shared` nor `affinity` on a service that is not global.
    let shared = global && read_bool(annotations, SHARED, SHARED_LEGACY, true, &mut warnings);
    let affinity = match lookup(annotations, AFFINITY, AFFINITY_LEGACY).filter(|_| global) {
        None => Affinity::None,
        Some((key, raw)) => match normalize(raw).as_str() {
            "local" => Affinity::Local,
            "remote" => Affinity::Remote,
            "none" | "" => Affinity::None,
            _ => {
                warnings.push(AnnotationWarning {
                    annotation: key.to_owned(),
                    value: raw.to_owned(),
                    allowed: AllowedValues(AFFINITY_VALUES),
                    default: "none",
                    reason: None,
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
    let default_weight = read_weight(annotations, "1")
        .unwrap_or_else(|warning| {
            warnings.push(warning);
            None
        })
        .unwrap_or(DEFAULT_WEIGHT);
    ParsedAnnotations {
        settings: GlobalServiceSettings {
            global,
            shared,
            affinity,
            topology_aware,
            default_weight,
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

/// Cilium's comparison form: `strings.ToLower`, no trimming. (Go lowercases Unicode too;
/// only ASCII matters here, since every accepted value is ASCII and no other character
/// lowercases to an ASCII letter except the Kelvin sign, which Go maps to `k` and no
/// accepted value contains.)
fn normalize(value: &str) -> String {
    value.to_ascii_lowercase()
}

/// A boolean annotation as Cilium reads it: `true` (any case) is true, an absent key is
/// `default`, and anything else is false. A value that is neither `true` nor `false`
/// also gets a warning, naming what was used (false).
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
                default: "false",
                reason: None,
            });
            false
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
    fn weight_values_name_the_weight_bounds() {
        assert_eq!(
            WEIGHT_VALUES,
            [format!("an integer {MIN_WEIGHT}..={MAX_WEIGHT}")]
        );
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
            (AFFINITY_LEGACY, "Remote"),
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
        let p = parse(&[
            (GLOBAL, "true"),
            (GLOBAL_LEGACY, "false"),
            (SHARED, "true"),
            (SHARED_LEGACY, "false"),
            (AFFINITY, "local"),
            (AFFINITY_LEGACY, "remote"),
        ]);
        assert!(p.settings.global && p.settings.shared);
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
    fn invalid_booleans_are_false_with_a_warning() {
        let p = parse(&[(GLOBAL, "yes")]);
        assert!(!p.settings.global);
        assert_eq!(p.warnings.len(), 1);
        assert_eq!(p.warnings[0].annotation, GLOBAL);
        assert_eq!(p.warnings[0].default, "false");

        let p = parse(&[(GLOBAL, "true"), (SHARED, "nope")]);
        assert!(p.settings.global);
        assert!(
            !p.settings.shared,
            "Cilium: shared is true only for \"true\"; anything else keeps the backends home"
        );
        assert_eq!(p.warnings.len(), 1);
        assert_eq!(p.warnings[0].annotation, SHARED);
        assert_eq!(p.warnings[0].value, "nope");
        assert_eq!(p.warnings[0].default, "false");
        let msg = p.warnings[0].to_string();
        assert!(msg.contains("using \"false\""), "{msg}");

        let p = parse(&[(GLOBAL_LEGACY, "true"), (SHARED_LEGACY, "1")]);
        assert!(p.settings.global && !p.settings.shared);
        assert_eq!(p.warnings[0].annotation, SHARED_LEGACY);
    }

    #[test]
    fn values_are_not_trimmed() {
        let p = parse(&[(GLOBAL, " true ")]);
        assert!(!p.settings.global, "Cilium compares without trimming");
        assert_eq!(p.warnings.len(), 1);
        assert_eq!(p.warnings[0].value, " true ");

        let p = parse(&[(GLOBAL, "true"), (SHARED, "true\n")]);
        assert!(!p.settings.shared);
        assert_eq!(p.warnings.len(), 1);

        let p = parse(&[(GLOBAL, "true"), (AFFINITY, " local")]);
        assert_eq!(p.settings.affinity, Affinity::None);
        assert_eq!(p.warnings.len(), 1);
        assert_eq!(p.warnings[0].default, "none");
    }

    #[test]
    fn values_are_case_insensitive_like_cilium() {
        let p = parse(&[(GLOBAL, "True"), (SHARED, "FALSE"), (AFFINITY, "LOCAL")]);
        assert!(p.settings.global && !p.settings.shared);
        assert_eq!(p.settings.affinity, Affinity::Local);
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn affinity_and_shared_are_ignored_unless_global() {
        for global in [None, Some("false"), Some("no")] {
            let mut pairs = vec![(AFFINITY, "local"), (SHARED, "true")];
            pairs.extend(global.map(|g| (GLOBAL, g)));
            let p = parse(&pairs);
            assert!(!p.settings.global && !p.settings.shared, "{global:?}");
            assert_eq!(p.settings.affinity, Affinity::None, "{global:?}");
        }
        // Cilium does not even read them, so an invalid value is not reported either.
        let p = parse(&[(AFFINITY_LEGACY, "sideways"), (SHARED_LEGACY, "maybe")]);
        assert_eq!(p.settings.affinity, Affinity::None);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn empty_affinity_is_none_without_a_warning() {
        let p = parse(&[(GLOBAL, "true"), (AFFINITY, "")]);
        assert_eq!(p.settings.affinity, Affinity::None);
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn weights_in_range_are_accepted() {
        assert_eq!(parse_weight("1"), Ok(1));
        assert_eq!(parse_weight(" 42 "), Ok(42));
        assert_eq!(parse_weight("007"), Ok(7));
        assert_eq!(parse_weight("256"), Ok(MAX_WEIGHT));
    }

    #[test]
    fn invalid_weights_say_why() {
        assert_eq!(parse_weight("0"), Err(WeightError::Zero));
        assert_eq!(parse_weight("000"), Err(WeightError::Zero));
        assert_eq!(
            parse_weight("257"),
            Err(WeightError::TooLarge("257".to_owned()))
        );
        assert_eq!(
            parse_weight("99999999999999999999"),
            Err(WeightError::TooLarge("99999999999999999999".to_owned()))
        );
        for bad in ["", " ", "-1", "+3", "1.5", "1e3", "0x10", "ten", "٣"] {
            assert_eq!(
                parse_weight(bad),
                Err(WeightError::NotANumber(bad.to_owned())),
                "{bad:?}"
            );
        }
        let zero = WeightError::Zero.to_string();
        assert!(zero.contains("drain"), "{zero}");
        assert!(WeightError::TooLarge("300".into())
            .to_string()
            .contains("maximum of 256"));
    }

    #[test]
    fn service_weight_is_the_default_for_its_backends() {
        assert_eq!(parse(&[]).settings.default_weight, DEFAULT_WEIGHT);
        let p = parse(&[(WEIGHT, "5")]);
        assert_eq!(p.settings.default_weight, 5);
        assert!(p.warnings.is_empty());

        let p = parse(&[(WEIGHT, "0"), (GLOBAL, "true")]);
        assert_eq!(p.settings.default_weight, 1);
        assert!(p.settings.global, "other settings are unaffected");
        assert_eq!(p.warnings.len(), 1);
        assert_eq!(p.warnings[0].reason, Some(WeightError::Zero));
        let msg = p.warnings[0].to_string();
        assert!(
            msg.contains("service.clustermesh.io/weight=\"0\"") && msg.contains("1..=256"),
            "{msg}"
        );
    }

    #[test]
    fn read_weight_distinguishes_unset_valid_and_invalid() {
        let map = |v: &str| BTreeMap::from([(WEIGHT.to_owned(), v.to_owned())]);
        assert_eq!(read_weight(&BTreeMap::new(), "1"), Ok(None));
        assert_eq!(read_weight(&map("3"), "1"), Ok(Some(3)));
        let w = read_weight(&map("heavy"), "the service's weight").unwrap_err();
        assert_eq!(w.annotation, WEIGHT);
        assert_eq!(w.value, "heavy");
        assert_eq!(w.default, "the service's weight");
        assert_eq!(w.reason, Some(WeightError::NotANumber("heavy".into())));
    }

    /// Cilium's reading of one annotation value: lowercased, not trimmed.
    fn cilium_is_true(value: Option<&String>) -> Option<bool> {
        value.map(|v| v.eq_ignore_ascii_case("true"))
    }

    proptest! {
        /// Global and shared are exactly what Cilium computes from the same annotations
        /// (new form first, then legacy; shared only for a global service, true when
        /// absent), whatever the values.
        #[test]
        fn global_and_shared_match_cilium(
            global in proptest::option::of(prop_oneof![Just("true".to_owned()), Just("TRUE".to_owned()), Just(" true".to_owned()), ".{0,6}"]),
            global_legacy in proptest::option::of(prop_oneof![Just("true".to_owned()), ".{0,6}"]),
            shared in proptest::option::of(prop_oneof![Just("false".to_owned()), Just("True".to_owned()), ".{0,6}"]),
            shared_legacy in proptest::option::of(prop_oneof![Just("false".to_owned()), Just("true".to_owned()), ".{0,6}"]),
        ) {
            let mut map = BTreeMap::new();
            for (key, value) in [(GLOBAL, &global), (GLOBAL_LEGACY, &global_legacy), (SHARED, &shared), (SHARED_LEGACY, &shared_legacy)] {
                if let Some(v) = value {
                    map.insert(key.to_owned(), v.clone());
                }
            }
            let want_global = cilium_is_true(map.get(GLOBAL).or(map.get(GLOBAL_LEGACY))).unwrap_or(false);
            let want_shared = want_global
                && cilium_is_true(map.get(SHARED).or(map.get(SHARED_LEGACY))).unwrap_or(true);
            let p = parse_service_annotations(&map);
            prop_assert_eq!(p.settings.global, want_global);
            prop_assert_eq!(p.settings.shared, want_shared);
        }

        /// Any string parses to a weight in range or to an error, never a panic, and
        /// exactly the plain decimal integers 1..=256 are accepted.
        #[test]
        fn weight_parser_accepts_exactly_the_range(raw in prop_oneof![
            ".{0,12}",
            "[ ]{0,2}[0-9]{1,25}[ ]{0,2}",
            (0u64..1000).prop_map(|n| n.to_string()),
        ]) {
            let expected = raw
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|_| raw.trim().bytes().all(|b| b.is_ascii_digit()))
                .filter(|n| (1..=u64::from(MAX_WEIGHT)).contains(n));
            match parse_weight(&raw) {
                Ok(w) => prop_assert_eq!(Some(u64::from(w)), expected),
                Err(WeightError::Zero) => prop_assert_eq!(raw.trim().trim_start_matches('0'), ""),
                Err(_) => prop_assert_eq!(expected, None),
            }
        }

        #[test]
        fn arbitrary_annotations_never_panic(
            pairs in proptest::collection::vec(
                (prop_oneof![
                    Just(GLOBAL.to_owned()), Just(GLOBAL_LEGACY.to_owned()),
                    Just(SHARED.to_owned()), Just(SHARED_LEGACY.to_owned()),
                    Just(AFFINITY.to_owned()), Just(AFFINITY_LEGACY.to_owned()),
                    Just(TOPOLOGY_AWARE.to_owned()), Just(WEIGHT.to_owned()), ".{0,20}"
                ], ".{0,12}"),
                0..8)
        ) {
            let map: BTreeMap<String, String> = pairs.into_iter().collect();
            let p = parse_service_annotations(&map);
            prop_assert!(!p.settings.shared || p.settings.global);
            prop_assert!(p.settings.global || p.settings.affinity == Affinity::None);
            prop_assert!(p.warnings.len() <= 5);
            prop_assert!((MIN_WEIGHT..=MAX_WEIGHT).contains(&p.settings.default_weight));
            for w in &p.warnings {
                prop_assert_eq!(map.get(&w.annotation), Some(&w.value));
            }
        }
    }
}
