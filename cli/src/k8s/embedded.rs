//! The Helm chart `deploy/helm/clustermesh`, compiled into the binary.
//!
//! Kubernetes-mode `enable` installs exactly the chart this CLI was built with, so an
//! installed binary needs no chart directory next to it. A unit test checks that the
//! embedded file list matches the chart directory, so adding a template without listing
//! it here fails the build's tests instead of being silently left out.

use std::path::Path;

use crate::chart::{Chart, TemplateError};

/// Where the chart lives in the source tree (only used to name files in messages).
pub const CHART_PATH: &str = "deploy/helm/clustermesh";

const CHART_YAML: &str = include_str!("../../../deploy/helm/clustermesh/Chart.yaml");
const VALUES_YAML: &str = include_str!("../../../deploy/helm/clustermesh/values.yaml");

/// Every file of `templates/`, with its name.
pub const TEMPLATES: &[(&str, &str)] = &[
    (
        "_helpers.tpl",
        include_str!("../../../deploy/helm/clustermesh/templates/_helpers.tpl"),
    ),
    (
        "agent-config.yaml",
        include_str!("../../../deploy/helm/clustermesh/templates/agent-config.yaml"),
    ),
    (
        "agent-daemonset.yaml",
        include_str!("../../../deploy/helm/clustermesh/templates/agent-daemonset.yaml"),
    ),
    (
        "apiserver-deployment.yaml",
        include_str!("../../../deploy/helm/clustermesh/templates/apiserver-deployment.yaml"),
    ),
    (
        "apiserver-service.yaml",
        include_str!("../../../deploy/helm/clustermesh/templates/apiserver-service.yaml"),
    ),
    (
        "apiserver-statefulset.yaml",
        include_str!("../../../deploy/helm/clustermesh/templates/apiserver-statefulset.yaml"),
    ),
    (
        "rbac.yaml",
        include_str!("../../../deploy/helm/clustermesh/templates/rbac.yaml"),
    ),
    (
        "serviceaccounts.yaml",
        include_str!("../../../deploy/helm/clustermesh/templates/serviceaccounts.yaml"),
    ),
    (
        "validate.yaml",
        include_str!("../../../deploy/helm/clustermesh/templates/validate.yaml"),
    ),
];

/// Parses the embedded chart.
///
/// # Errors
/// A [`TemplateError`] if a template does not parse (caught by this module's tests).
pub fn chart() -> Result<Chart, TemplateError> {
    Chart::from_sources(Path::new(CHART_PATH), CHART_YAML, VALUES_YAML, TEMPLATES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn chart_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CHART_PATH)
    }

    #[test]
    fn embedded_templates_are_exactly_the_chart_directory() {
        let mut on_disk: Vec<String> = std::fs::read_dir(chart_dir().join("templates"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        on_disk.sort();
        let embedded: Vec<String> = TEMPLATES.iter().map(|(n, _)| (*n).to_string()).collect();
        assert_eq!(
            embedded, on_disk,
            "update cli/src/k8s/embedded.rs TEMPLATES"
        );
    }

    #[test]
    fn embedded_chart_renders_like_the_directory() {
        let release = crate::chart::Release {
            name: "clustermesh".into(),
            namespace: "mesh".into(),
        };
        let values = serde_json::json!({"cluster": {"name": "east", "id": 3}});
        let from_disk = Chart::load(&chart_dir())
            .unwrap()
            .render_documents(&release, &values)
            .unwrap();
        let embedded = chart()
            .unwrap()
            .render_documents(&release, &values)
            .unwrap();
        assert_eq!(embedded, from_disk);
        assert!(embedded.iter().any(|(_, d)| d.contains("kind: DaemonSet")));
    }
}
