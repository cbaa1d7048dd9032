//! Renders the Helm chart in `deploy/helm/clustermesh` without `helm`.
//!
//! The CLI's Kubernetes mode applies the chart's manifests itself (server-side apply), and
//! CI validates the chart on machines where `helm` cannot be installed. Both need the
//! chart rendered, so this module implements the subset of Go's `text/template` and
//! Helm's functions the chart uses (see [`eval`] for the list). Anything outside that
//! subset is a clear error, so a template change that needs more is caught by the chart
//! tests rather than rendered wrongly.

mod eval;
mod lex;
mod libyaml;
mod parse;
mod to_yaml;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Errors from loading or rendering a chart.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template text is malformed.
    #[error("{template}:{line}: template syntax error: {message}")]
    Syntax {
        /// Template file name.
        template: String,
        /// 1-based line of the action.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Evaluating the template failed (missing value, wrong type, unknown function).
    #[error("{template}:{line}: {message}")]
    Render {
        /// Template file name.
        template: String,
        /// 1-based line of the action.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The chart refused the values (`required` or `fail`): the message says what to set.
    #[error("{0}")]
    Fail(String),
    /// A chart file could not be read.
    #[error("cannot read chart file {path}: {source}; check that the chart directory is complete")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `Chart.yaml` or `values.yaml` is not valid YAML.
    #[error("{path} is not valid YAML: {message}")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
}

/// A loaded chart: metadata, default values and parsed templates.
#[derive(Debug)]
pub struct Chart {
    meta: Value,
    values: Value,
    templates: Vec<(String, parse::Parsed)>,
    defines: BTreeMap<String, Vec<parse::Node>>,
}

/// Release information passed to templates as `.Release`.
#[derive(Debug, Clone)]
pub struct Release {
    /// Release name (`.Release.Name`).
    pub name: String,
    /// Target namespace (`.Release.Namespace`).
    pub namespace: String,
}

/// One rendered file of the chart.
#[derive(Debug, Clone)]
pub struct RenderedFile {
    /// Template file name, e.g. `agent-daemonset.yaml`.
    pub template: String,
    /// Rendered text (may hold several YAML documents).
    pub text: String,
}

fn read(path: &Path) -> Result<String, TemplateError> {
    std::fs::read_to_string(path).map_err(|source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Deep-merges `over` into `base` the way Helm coalesces values: an RFC 7386 merge patch
/// (maps merge key by key, `null` removes a key, anything else replaces).
pub fn merge_values(base: &mut Value, over: &Value) {
    json_patch::merge(base, over);
}

/// Sets one dotted key (`a.b.c`) in a values tree, like `helm --set a.b.c=value`.
pub fn set_value(values: &mut Value, dotted: &str, value: Value) {
    let mut cur = values;
    let parts: Vec<&str> = dotted.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Value::Object(map) = cur else { return };
        if i + 1 == parts.len() {
            map.insert((*part).to_string(), value);
            return;
        }
        cur = map
            .entry((*part).to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

impl Chart {
    /// Loads a chart directory (`Chart.yaml`, `values.yaml`, `templates/*`).
    pub fn load(dir: &Path) -> Result<Self, TemplateError> {
        let meta = read(&dir.join("Chart.yaml"))?;
        let values = read(&dir.join("values.yaml"))?;
        let tdir = dir.join("templates");
        let mut names: Vec<String> = std::fs::read_dir(&tdir)
            .map_err(|source| TemplateError::Io {
                path: tdir.clone(),
                source,
            })?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        let mut templates = Vec::new();
        for name in names {
            let src = read(&tdir.join(&name))?;
            templates.push((name, src));
        }
        let borrowed: Vec<(&str, &str)> = templates
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_str()))
            .collect();
        Self::from_sources(dir, &meta, &values, &borrowed)
    }

    /// Builds a chart from file contents (e.g. embedded in the binary): `Chart.yaml` and
    /// `values.yaml` text and `(file name, template text)` pairs; `dir` only names the
    /// files in error messages.
    pub fn from_sources(
        dir: &Path,
        chart_yaml: &str,
        values_yaml: &str,
        templates: &[(&str, &str)],
    ) -> Result<Self, TemplateError> {
        let parse_yaml = |file: &str, text: &str| {
            clustermesh_api::yaml::from_str::<Value>(text).map_err(|e| TemplateError::Yaml {
                path: dir.join(file),
                message: e.to_string(),
            })
        };
        let meta = parse_yaml("Chart.yaml", chart_yaml)?;
        let values = parse_yaml("values.yaml", values_yaml)?;
        let mut sorted: Vec<(&str, &str)> = templates.to_vec();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let mut parsed_templates = Vec::new();
        let mut defines = BTreeMap::new();
        for (name, src) in sorted {
            let parsed = parse::parse(name, lex::lex(name, src)?)?;
            defines.extend(parsed.defines.clone());
            if !name.starts_with('_') {
                parsed_templates.push((name.to_string(), parsed));
            }
        }
        Ok(Self {
            meta,
            values,
            templates: parsed_templates,
            defines,
        })
    }

    /// The chart's default values (`values.yaml`).
    pub fn default_values(&self) -> &Value {
        &self.values
    }

    /// Renders every template with the default values deep-merged with `overrides`.
    pub fn render(
        &self,
        release: &Release,
        overrides: &Value,
    ) -> Result<Vec<RenderedFile>, TemplateError> {
        let mut values = self.values.clone();
        merge_values(&mut values, overrides);
        let field = |k: &str| self.meta.get(k).cloned().unwrap_or(Value::Null);
        let root = serde_json::json!({
            "Values": values,
            "Release": {
                "Name": release.name,
                "Namespace": release.namespace,
                "Service": "clustermesh",
            },
            "Chart": {
                "Name": field("name"),
                "Version": field("version"),
                "AppVersion": field("appVersion"),
            },
        });
        let mut out = Vec::new();
        for (name, parsed) in &self.templates {
            let text = eval::Evaluator::new(name, &self.defines).render(&parsed.body, &root)?;
            out.push(RenderedFile {
                template: name.clone(),
                text,
            });
        }
        Ok(out)
    }

    /// Renders and splits into YAML documents, dropping empty ones (comments only).
    pub fn render_documents(
        &self,
        release: &Release,
        overrides: &Value,
    ) -> Result<Vec<(String, String)>, TemplateError> {
        let mut docs = Vec::new();
        for file in self.render(release, overrides)? {
            for doc in split_documents(&file.text) {
                docs.push((file.template.clone(), doc));
            }
        }
        Ok(docs)
    }
}

/// Splits multi-document YAML text at `---` lines, dropping documents with no content.
pub fn split_documents(text: &str) -> Vec<String> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(std::mem::take(&mut cur));
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs.push(cur);
    docs.into_iter()
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_replaces_leaves_and_keeps_siblings() {
        let mut base = json!({"a": {"b": 1, "c": 2}, "l": [1]});
        merge_values(&mut base, &json!({"a": {"b": 5}, "l": [2, 3]}));
        assert_eq!(base, json!({"a": {"b": 5, "c": 2}, "l": [2, 3]}));
    }

    #[test]
    fn null_removes_a_default_like_helm() {
        let mut base = json!({"a": {"b": 1, "c": 2}});
        merge_values(&mut base, &json!({"a": {"b": null}}));
        assert_eq!(base, json!({"a": {"c": 2}}));
    }

    #[test]
    fn set_value_creates_intermediate_maps() {
        let mut v = json!({});
        set_value(&mut v, "cluster.name", json!("c1"));
        assert_eq!(v, json!({"cluster": {"name": "c1"}}));
    }

    #[test]
    fn split_drops_comment_only_documents() {
        let docs = split_documents("# c\n---\na: 1\n---\n\n---\nb: 2\n");
        assert_eq!(docs, vec!["a: 1\n".to_string(), "b: 2\n".to_string()]);
    }
}
