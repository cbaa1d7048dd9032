//! Which Kubernetes API the source talks to, and with which credentials.
//!
//! Inside a pod the API server uses its service account (in-cluster config); elsewhere it
//! reads the kubeconfig (`KUBECONFIG` or `~/.kube/config`), its current context or the
//! one named by `--kube-context`. An explicit context always means the kubeconfig, even
//! in a pod, so an operator can point a pod at another cluster on purpose.

use kube::config::{InClusterError, KubeConfigOptions, Kubeconfig, KubeconfigError};

/// Errors building the Kubernetes client.
#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    /// The kubeconfig (or the context in it) could not be loaded.
    #[error(
        "cannot load {what} from the kubeconfig: {source}; check --kube-context and the \
         KUBECONFIG variable (default ~/.kube/config)",
        what = context.as_deref().map_or_else(|| "the current context".to_owned(), |c| format!("context {c:?}"))
    )]
    Kubeconfig {
        /// The requested context (`None`: the current one).
        context: Option<String>,
        /// kube's error.
        #[source]
        source: KubeconfigError,
    },
    /// Running in a pod, but the service account credentials are missing.
    #[error(
        "cannot load the in-cluster Kubernetes config: {source}; mount the service account \
         token (automountServiceAccountToken: true) or pass --kube-context"
    )]
    InCluster {
        /// kube's error.
        #[source]
        source: InClusterError,
    },
    /// The client could not be built from a loaded config.
    #[error("cannot create the Kubernetes client: {source}")]
    Client {
        /// kube's error.
        #[source]
        source: kube::Error,
    },
}

/// Where the client configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeConfigChoice {
    /// The service account of the pod we run in.
    InCluster,
    /// The kubeconfig, its current context (`None`) or a named one.
    Kubeconfig(Option<String>),
}

impl KubeConfigChoice {
    /// The choice for `--kube-context`: a named context uses the kubeconfig; otherwise
    /// in-cluster when `in_pod` (`KUBERNETES_SERVICE_HOST` is set), else the kubeconfig's
    /// current context.
    #[must_use]
    pub fn select(context: Option<&str>, in_pod: bool) -> Self {
        match context {
            Some(name) => KubeConfigChoice::Kubeconfig(Some(name.to_owned())),
            None if in_pod => KubeConfigChoice::InCluster,
            None => KubeConfigChoice::Kubeconfig(None),
        }
    }

    /// The choice for this process (reads `KUBERNETES_SERVICE_HOST`).
    #[must_use]
    pub fn from_environment(context: Option<&str>) -> Self {
        Self::select(
            context,
            std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty()),
        )
    }

    /// Loads the configuration (reading `KUBECONFIG`/`~/.kube/config` for a kubeconfig
    /// choice).
    ///
    /// # Errors
    /// [`KubeClientError`] naming what could not be loaded.
    pub async fn load(&self) -> Result<kube::Config, KubeClientError> {
        match self {
            KubeConfigChoice::InCluster => {
                kube::Config::incluster().map_err(|source| KubeClientError::InCluster { source })
            }
            KubeConfigChoice::Kubeconfig(context) => {
                kube::Config::from_kubeconfig(&options(context.as_deref()))
                    .await
                    .map_err(|source| KubeClientError::Kubeconfig {
                        context: context.clone(),
                        source,
                    })
            }
        }
    }
}

fn options(context: Option<&str>) -> KubeConfigOptions {
    KubeConfigOptions {
        context: context.map(str::to_owned),
        ..KubeConfigOptions::default()
    }
}

/// The configuration of `context` (or the current one) in an already parsed kubeconfig.
///
/// # Errors
/// [`KubeClientError::Kubeconfig`] when the context, its cluster or its user is missing.
pub async fn config_from_kubeconfig(
    kubeconfig: Kubeconfig,
    context: Option<&str>,
) -> Result<kube::Config, KubeClientError> {
    kube::Config::from_custom_kubeconfig(kubeconfig, &options(context))
        .await
        .map_err(|source| KubeClientError::Kubeconfig {
            context: context.map(str::to_owned),
            source,
        })
}

/// A client for `config`.
///
/// # Errors
/// [`KubeClientError::Client`] (bad TLS material in the config, for example).
pub fn client(config: kube::Config) -> Result<kube::Client, KubeClientError> {
    kube::Client::try_from(config).map_err(|source| KubeClientError::Client { source })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECONFIG: &str = r"
apiVersion: v1
kind: Config
current-context: east
clusters:
- name: east
  cluster: {server: 'https://127.0.0.1:6443'}
- name: west
  cluster: {server: 'https://127.0.0.2:6443'}
contexts:
- name: east
  context: {cluster: east, user: admin, namespace: mesh}
- name: west
  context: {cluster: west, user: admin}
users:
- name: admin
  user: {token: not-a-secret}
";

    #[test]
    fn a_named_context_always_means_the_kubeconfig() {
        assert_eq!(
            KubeConfigChoice::select(Some("west"), true),
            KubeConfigChoice::Kubeconfig(Some("west".to_owned()))
        );
        assert_eq!(
            KubeConfigChoice::select(None, true),
            KubeConfigChoice::InCluster
        );
        assert_eq!(
            KubeConfigChoice::select(None, false),
            KubeConfigChoice::Kubeconfig(None)
        );
    }

    #[tokio::test]
    async fn current_and_named_contexts_pick_their_cluster() {
        let parsed = || Kubeconfig::from_yaml(KUBECONFIG).unwrap();
        let current = config_from_kubeconfig(parsed(), None).await.unwrap();
        assert_eq!(current.cluster_url.to_string(), "https://127.0.0.1:6443/");
        assert_eq!(current.default_namespace, "mesh");
        let west = config_from_kubeconfig(parsed(), Some("west"))
            .await
            .unwrap();
        assert_eq!(west.cluster_url.to_string(), "https://127.0.0.2:6443/");
        assert!(client(west).is_ok());
    }

    #[tokio::test]
    async fn a_missing_context_is_named_in_the_error() {
        let kubeconfig = Kubeconfig::from_yaml(KUBECONFIG).unwrap();
        let error = config_from_kubeconfig(kubeconfig, Some("north"))
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("context \"north\""), "{text}");
        assert!(text.contains("--kube-context"), "{text}");
    }
}
