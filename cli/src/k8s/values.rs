//! Chart value overrides of Kubernetes-mode `enable`: `--values FILE` and `--set key=value`,
//! in the spirit of `helm install -f/--set`.
//!
//! The overrides are kept in ConfigMap `clustermesh-config` (key [`VALUES_KEY`]), so every
//! later render of the chart uses them: an `enable` without flags (upgrade), and
//! `connect`/`disconnect`, which re-render the agent ConfigMap. A later `enable --set`
//! merges over the stored overrides; `--set key=null` removes one (back to the chart
//! default).
//!
//! Precedence, lowest first: chart defaults (`values.yaml`), stored overrides, each
//! `--values` file in order, each `--set` in order, and last the values the CLI derives
//! from its own flags and from `connect` ([`MANAGED`]), which cannot be overridden.
//!
//! Checks, before anything is read from or written to a cluster: every top-level key must
//! be one of the chart's; a key that is a map in the chart cannot become a single value
//! (and a single value or list cannot grow keys); the keys in [`MANAGED`] are refused with
//! the flag to use instead. Below keys that are free-form maps in the chart (annotations,
//! node selectors, resources) any key is accepted. `null` is always accepted (it only
//! removes a stored override), so a stored key that is refused now can be removed.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Key of the stored overrides (YAML) in ConfigMap `clustermesh-config`.
pub const VALUES_KEY: &str = "values.yaml";

/// Chart values the CLI sets itself, and what sets them instead.
pub const MANAGED: &[(&str, &str)] = &[
    ("cluster.name", "--cluster-name"),
    ("cluster.id", "--cluster-id"),
    ("cluster.maxConnectedClusters", "--max-connected-clusters"),
    ("trustDomain", "--trust-domain"),
    ("apiserver.service.type", "--service-type"),
    (
        "agent.remoteClusters",
        "`clustermesh connect` and `disconnect`",
    ),
    (
        "tls",
        "the CLI (it writes the certificates into Secrets with these fixed names)",
    ),
];

/// An override that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValuesError {
    /// `--set` without `=` or with an empty key part.
    #[error("--set {arg:?}: {why}; write --set key.path=value, e.g. --set image.tag=v1.2.3")]
    Syntax {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `--set` with a list or map value.
    #[error("--set {arg:?}: the value is a YAML list or map; --set takes single values, put lists and maps in a --values file")]
    NotScalar {
        /// The argument as given.
        arg: String,
    },
    /// A `--values` file could not be read.
    #[error("cannot read --values file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// A `--values` file (or the stored overrides) is not a YAML map.
    #[error("{origin} is not a YAML map of chart values: {reason}")]
    NotAMap {
        /// Where the values came from.
        origin: String,
        /// Why.
        reason: String,
    },
    /// A top-level key the chart does not have.
    #[error("{origin}: unknown chart value {key}; the chart's top-level values are {known}{hint}")]
    Unknown {
        /// Where the key came from.
        origin: String,
        /// The key.
        key: String,
        /// The chart's top-level keys.
        known: String,
        /// How to get rid of a stored key (may be empty).
        hint: String,
    },
    /// A value whose shape differs from the chart's (map vs value vs list).
    #[error(
        "{origin}: chart value {key} is {chart_shape} but the override is {given_shape}; {advice}"
    )]
    Shape {
        /// Where the key came from.
        origin: String,
        /// The dotted key.
        key: String,
        /// What the chart has there ("a map", "a list", "a single value").
        chart_shape: &'static str,
        /// What the override has there.
        given_shape: &'static str,
        /// What to do (and how to get rid of a stored key).
        advice: String,
    },
    /// A value the CLI sets itself.
    #[error("{origin}: chart value {key} cannot be overridden, it is set by {by}{hint}")]
    Managed {
        /// Where the key came from.
        origin: String,
        /// The dotted key.
        key: String,
        /// What sets it.
        by: &'static str,
        /// How to get rid of a stored key (may be empty).
        hint: String,
    },
}

/// Splits a `--set` key at unescaped dots (`\.` is a literal dot, as in
/// `apiserver.service.annotations.service\.beta\.kubernetes\.io/x=y`).
fn split_key(key: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = key.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'.') => {
                cur.push('.');
                chars.next();
            }
            '.' => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    parts
}

/// The value of a `--set`: a YAML scalar (`true`, `null`, `32379`, `"quoted"`); text that
/// YAML would read as a floating-point number stays text, so a tag like `1.10` is not
/// turned into `1.1`. An empty value is the empty string.
fn parse_scalar(arg: &str, raw: &str) -> Result<Value, ValuesError> {
    if raw.is_empty() {
        return Ok(Value::String(String::new()));
    }
    match clustermesh_api::yaml::from_str::<Value>(raw) {
        Ok(Value::Array(_) | Value::Object(_)) => Err(ValuesError::NotScalar {
            arg: arg.to_string(),
        }),
        Ok(Value::Number(n)) if n.is_f64() => Ok(Value::String(raw.to_string())),
        Ok(v) => Ok(v),
        // Not YAML on its own (e.g. an unbalanced quote): the text as given.
        Err(_) => Ok(Value::String(raw.to_string())),
    }
}

/// Parses one `--set key.path=value` into a values tree holding just that key.
pub fn parse_set(arg: &str) -> Result<Value, ValuesError> {
    let syntax = |why| ValuesError::Syntax {
        arg: arg.to_string(),
        why,
    };
    let (key, raw) = arg.split_once('=').ok_or_else(|| syntax("no '='"))?;
    let parts = split_key(key.trim());
    if parts.iter().any(String::is_empty) {
        return Err(syntax("empty key or key part"));
    }
    let mut value = parse_scalar(arg, raw)?;
    for part in parts.into_iter().rev() {
        let mut map = Map::new();
        map.insert(part, value);
        value = Value::Object(map);
    }
    Ok(value)
}

/// Parses YAML values text (a `--values` file, or the stored overrides) into a map.
pub fn parse_values_text(origin: &str, text: &str) -> Result<Value, ValuesError> {
    let not_map = |reason: String| ValuesError::NotAMap {
        origin: origin.to_string(),
        reason,
    };
    if text.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    match clustermesh_api::yaml::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(Value::Null) => Ok(Value::Object(Map::new())),
        Ok(_) => Err(not_map("the document is not a map".into())),
        Err(e) => Err(not_map(e.to_string())),
    }
}

/// Reads and parses a `--values` file.
pub fn read_values_file(path: &Path) -> Result<Value, ValuesError> {
    let text = std::fs::read_to_string(path).map_err(|e| ValuesError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    parse_values_text(&format!("--values file {}", path.display()), &text)
}

/// `key` itself, or for a map the first key below it that holds a value (to name it).
fn first_leaf(key: String, v: &Value) -> String {
    match v {
        Value::Object(m) => match m.iter().next() {
            Some((k, sub)) => first_leaf(format!("{key}.{k}"), sub),
            None => key,
        },
        _ => key,
    }
}

fn shape(v: &Value) -> &'static str {
    match v {
        Value::Object(_) => "a map",
        Value::Array(_) => "a list",
        _ => "a single value",
    }
}

/// Checks an override tree against the chart's default values (see the module docs).
/// `hint` is appended to every error (e.g. how to remove a stored key).
pub fn check(
    origin: &str,
    overrides: &Value,
    defaults: &Value,
    hint: &str,
) -> Result<(), ValuesError> {
    let Value::Object(over) = overrides else {
        return Err(ValuesError::NotAMap {
            origin: origin.to_string(),
            reason: format!("it is {}", shape(overrides)),
        });
    };
    check_map(origin, over, defaults, "", hint)
}

fn check_map(
    origin: &str,
    over: &Map<String, Value>,
    defaults: &Value,
    prefix: &str,
    hint: &str,
) -> Result<(), ValuesError> {
    for (k, v) in over {
        // `null` only removes a stored override, whatever it is (even one that would be
        // refused now), so any key may be nulled.
        if v.is_null() {
            continue;
        }
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        // `cluster: {id: 3}` names cluster.id; `cluster: 3` is refused below as a map
        // replaced by a single value.
        if let Some((_, by)) = MANAGED
            .iter()
            .find(|(m, _)| key == *m || key.starts_with(&format!("{m}.")))
        {
            return Err(ValuesError::Managed {
                origin: origin.to_string(),
                key: first_leaf(key, v),
                by,
                hint: hint.to_string(),
            });
        }
        let default = defaults.get(k);
        if prefix.is_empty() && default.is_none() {
            let known: Vec<&str> = defaults
                .as_object()
                .map(|m| m.keys().map(String::as_str).collect())
                .unwrap_or_default();
            return Err(ValuesError::Unknown {
                origin: origin.to_string(),
                key,
                known: known.join(", "),
                hint: hint.to_string(),
            });
        }
        let Some(default) = default else {
            // Below a free-form map of the chart: anything goes.
            continue;
        };
        if default.is_null() {
            continue;
        }
        match (default, v) {
            (Value::Object(_), Value::Object(sub)) => {
                check_map(origin, sub, default, &key, hint)?;
            }
            (Value::Array(_), Value::Array(_)) => {}
            (Value::Object(_) | Value::Array(_), _) | (_, Value::Object(_) | Value::Array(_)) => {
                let advice = match default {
                    Value::Object(m) if m.is_empty() => format!(
                        "set keys below it (--set {key}.NAME=VALUE) or give the map in a --values file"
                    ),
                    Value::Object(m) => {
                        let managed = |sub: &str| {
                            let full = format!("{key}.{sub}");
                            MANAGED.iter().find(|(m, _)| *m == full).map(|(_, by)| *by)
                        };
                        let settable = m.iter().find(|(sub, d)| {
                            managed(sub).is_none() && !d.is_object() && !d.is_array()
                        });
                        match settable {
                            Some((sub, _)) => {
                                format!("set its keys instead, e.g. --set {key}.{sub}=...")
                            }
                            None => {
                                let by: Vec<&str> = m.keys().filter_map(|sub| managed(sub)).collect();
                                if by.is_empty() {
                                    format!("set its keys instead (--set {key}.KEY=...)")
                                } else {
                                    format!("its values are set by {}", by.join(", "))
                                }
                            }
                        }
                    }
                    Value::Array(_) => "give the list in a --values file".to_string(),
                    _ => format!("give {key} a single value"),
                };
                return Err(ValuesError::Shape {
                    origin: origin.to_string(),
                    key,
                    chart_shape: shape(default),
                    given_shape: shape(v),
                    advice: format!("{advice}{hint}"),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// Merges `over` into the overrides `base`: an RFC 7386 merge patch (maps merge key by
/// key, `null` removes the key so the chart default applies again, anything else
/// replaces), after which a map the patch left empty is dropped (an override map with
/// nothing in it overrides nothing).
pub fn merge_overrides(base: &mut Value, over: &Value) {
    json_patch::merge(base, over);
    drop_emptied_maps(base, over);
}

/// Removes from `base` the maps below the keys `over` patched that are now empty.
fn drop_emptied_maps(base: &mut Value, over: &Value) {
    let (Value::Object(b), Value::Object(o)) = (base, over) else {
        return;
    };
    for (k, patch) in o.iter().filter(|(_, patch)| patch.is_object()) {
        if let Some(entry) = b.get_mut(k) {
            drop_emptied_maps(entry, patch);
            if entry.as_object().is_some_and(Map::is_empty) {
                b.remove(k);
            }
        }
    }
}

/// The overrides as `key.path=value` lines, for people (`\.` for dots inside a key).
#[must_use]
pub fn flatten(values: &Value) -> Vec<String> {
    fn walk(v: &Value, prefix: &str, out: &mut Vec<String>) {
        match v {
            // Merging an empty map changes nothing: not an override worth listing (and the
            // stored overrides of an `enable` without --set are `{}`).
            Value::Object(m) if m.is_empty() => {}
            Value::Object(m) => {
                for (k, sub) in m {
                    let k = k.replace('.', "\\.");
                    let key = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(sub, &key, out);
                }
            }
            Value::String(s) => out.push(format!("{prefix}={s}")),
            other => out.push(format!("{prefix}={other}")),
        }
    }
    let mut out = Vec::new();
    walk(values, "", &mut out);
    out
}

/// The user's new overrides, checked against `defaults`: `--values` files in order, then
/// `--set`s in order. Needs no cluster.
pub fn user_overrides(
    values_files: &[PathBuf],
    sets: &[String],
    defaults: &Value,
) -> Result<Vec<Value>, ValuesError> {
    let mut layers = Vec::new();
    for path in values_files {
        let v = read_values_file(path)?;
        check(
            &format!("--values file {}", path.display()),
            &v,
            defaults,
            "",
        )?;
        layers.push(v);
    }
    for arg in sets {
        let v = parse_set(arg)?;
        check(&format!("--set {arg}"), &v, defaults, "")?;
        layers.push(v);
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults() -> Value {
        super::super::embedded::chart()
            .unwrap()
            .default_values()
            .clone()
    }

    #[test]
    fn set_values_are_yaml_scalars_but_versions_stay_text() {
        assert_eq!(
            parse_set("apiserver.service.nodePort=32379").unwrap(),
            json!({"apiserver": {"service": {"nodePort": 32379}}})
        );
        assert_eq!(
            parse_set("image.tag=1.10").unwrap(),
            json!({"image": {"tag": "1.10"}})
        );
        assert_eq!(parse_set("a=true").unwrap(), json!({"a": true}));
        assert_eq!(parse_set("a=null").unwrap(), json!({"a": null}));
        assert_eq!(parse_set("a=").unwrap(), json!({"a": ""}));
        assert_eq!(parse_set("a=\"007\"").unwrap(), json!({"a": "007"}));
        assert_eq!(parse_set("a=x=y").unwrap(), json!({"a": "x=y"}));
        assert_eq!(
            parse_set(r"s.annotations.example\.com/lb=internal").unwrap(),
            json!({"s": {"annotations": {"example.com/lb": "internal"}}})
        );
        assert!(matches!(
            parse_set("image.tag"),
            Err(ValuesError::Syntax { .. })
        ));
        assert!(matches!(
            parse_set("image..tag=x"),
            Err(ValuesError::Syntax { .. })
        ));
        assert!(matches!(
            parse_set("a=[1, 2]"),
            Err(ValuesError::NotScalar { .. })
        ));
    }

    #[test]
    fn checks_name_the_key_and_what_to_do() {
        let d = defaults();
        let err = |arg: &str| {
            check(&format!("--set {arg}"), &parse_set(arg).unwrap(), &d, "")
                .unwrap_err()
                .to_string()
        };
        assert!(
            err("imgae.tag=x").contains("unknown chart value imgae"),
            "{}",
            err("imgae.tag=x")
        );
        let e = err("apiserver.service=NodePort");
        assert!(e.contains("apiserver.service is a map"), "{e}");
        let e = err("image.tag.x=1");
        assert!(e.contains("image.tag is a single value"), "{e}");
        let e = err("agent.tolerations=x");
        assert!(e.contains("a list") && e.contains("--values"), "{e}");
        let e = err("cluster.name=x");
        assert!(
            e.contains("cluster.name") && e.contains("--cluster-name"),
            "{e}"
        );
        let e = err("cluster=x");
        assert!(e.contains("chart value cluster is a map"), "{e}");
        let e = err("agent.remoteClusters=x");
        assert!(e.contains("connect"), "{e}");
        let e = err("tls.serverSecret=x");
        assert!(e.contains("chart value tls.serverSecret cannot"), "{e}");
        let e = err("apiserver.service=x");
        assert!(e.contains("e.g. --set apiserver.service.nodePort="), "{e}");
        let e = err("cluster=x");
        assert!(e.contains("its values are set by --cluster-id"), "{e}");
        for ok in [
            "image.tag=dev",
            "apiserver.service.nodePort=32379",
            "agent.cgroupRoot=/sys/fs/cgroup/unified",
            "apiserver.service.annotations.a=b",
            "agent.nodeSelector.disk=ssd",
            "image.tag=null",
            "imgae=null",
            "cluster.name=null",
        ] {
            check("--set", &parse_set(ok).unwrap(), &d, "").unwrap();
        }
        let file = json!({"cluster": {"id": 4}});
        assert!(check("f", &file, &d, "")
            .unwrap_err()
            .to_string()
            .contains("cluster.id"));
        let file = json!({"agent": {"tolerations": [{"operator": "Exists"}]}});
        check("f", &file, &d, "").unwrap();
    }

    #[test]
    fn later_layers_win_and_null_removes() {
        let mut o = json!({"image": {"tag": "a", "prefix": "p"}});
        merge_overrides(&mut o, &json!({"image": {"tag": "b"}}));
        assert_eq!(o, json!({"image": {"tag": "b", "prefix": "p"}}));
        merge_overrides(&mut o, &json!({"image": {"tag": null, "prefix": null}}));
        assert_eq!(o, json!({}));
        merge_overrides(&mut o, &json!({"agent": {"x": null}}));
        assert_eq!(o, json!({}));
    }

    #[test]
    fn values_text_must_be_a_map() {
        assert_eq!(parse_values_text("f", "").unwrap(), json!({}));
        assert!(parse_values_text("f", "- a").is_err());
        assert!(parse_values_text("f", "a: [").is_err());
        assert_eq!(
            flatten(&json!({"image": {"tag": "dev"}, "x": {"a.b": 1}})),
            vec!["image.tag=dev".to_string(), "x.a\\.b=1".to_string()]
        );
    }
}
