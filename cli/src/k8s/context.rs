//! Kubeconfig context resolution.
//!
//! Exists so that a mistyped context name or an unreachable API server is reported once,
//! up front, with the context named, instead of as a transport error deep inside a verb.

use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

/// Namespace the mesh components live in unless `--namespace` says otherwise.
pub const DEFAULT_NAMESPACE: &str = "kube-system";

/// Failure to turn a kubeconfig context into a working client.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No kubeconfig could be read.
    #[error(
        "cannot read the kubeconfig: {0}; set KUBECONFIG or create ~/.kube/config (or use --state-dir for standalone mode)"
    )]
    Kubeconfig(String),
    /// The context is not in the kubeconfig.
    #[error(
        "context \"{context}\" not found in kubeconfig: known contexts are [{known}]; check `kubectl config get-contexts`"
    )]
    ContextNotFound {
        /// The requested context.
        context: String,
        /// Context names the kubeconfig does hold.
        known: String,
    },
    /// The context exists but its cluster/user entries cannot form a client.
    #[error("context \"{context}\" in kubeconfig is unusable: {reason}; fix its cluster and user entries")]
    InvalidContext {
        /// The context.
        context: String,
        /// What kube-rs reported.
        reason: String,
    },
    /// The kubeconfig user's exec credential plugin cannot be started.
    #[error(
        "context \"{context}\": the kubeconfig's credential plugin \"{command}\" (user {user}) cannot be started: {reason}; install it or fix users[].user.exec.command in the kubeconfig"
    )]
    ExecPlugin {
        /// The context.
        context: String,
        /// The kubeconfig user entry.
        user: String,
        /// The plugin command as the kubeconfig names it.
        command: String,
        /// Why it cannot start.
        reason: String,
    },
    /// The API server of the context did not answer.
    #[error("cannot reach the Kubernetes API of context {context}: {reason}; check the context and network")]
    Unreachable {
        /// The context.
        context: String,
        /// What failed (transport error or timeout).
        reason: String,
    },
}

/// A reachable Kubernetes cluster and the namespace the mesh lives in.
#[derive(Clone)]
pub struct KubeTarget {
    /// Client for the context's API server.
    pub client: Client,
    /// Client for the same API server that does not retry, for the pod proxy: kube-rs
    /// retries 503 (what the API server answers for a pod that refuses the connection)
    /// with a long backoff by default, and status wants the first answer.
    pub proxy: Client,
    /// The kubeconfig context name.
    pub context: String,
    /// Namespace of the mesh components.
    pub namespace: String,
}

impl std::fmt::Debug for KubeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTarget")
            .field("context", &self.context)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// Every distinct message along `e`'s source chain, joined by ": " (a message already
/// contained in the one before it is not repeated). kube-rs' own `Display` of a transport
/// error stops at "ServiceError: client error (Connect)", without the cause.
#[must_use]
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let msg = err.to_string();
        if !parts.last().is_some_and(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// Whether an I/O error of kind `kind` is in `e`'s source chain.
fn has_io_error(e: &(dyn std::error::Error + 'static), kind: std::io::ErrorKind) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == kind)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The cause, when `e` failed because the exec credential plugin could not be started.
fn exec_start_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(kube::client::AuthError::AuthExecStart(io)) =
            err.downcast_ref::<kube::client::AuthError>()
        {
            return Some(io.to_string());
        }
        cur = err.source();
    }
    None
}

/// Why the API server at `url` did not answer: "connection refused by HOST:PORT" when it
/// refused, else the whole cause chain.
fn unreachable_reason(url: &http::Uri, e: &(dyn std::error::Error + 'static)) -> String {
    if has_io_error(e, std::io::ErrorKind::ConnectionRefused) {
        let host = url.host().unwrap_or("?");
        let port = url
            .port_u16()
            .unwrap_or(if url.scheme_str() == Some("http") {
                80
            } else {
                443
            });
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        return format!("connection refused by {host}:{port} (server {url})");
    }
    format!("{url}: {}", error_chain(e))
}

/// Reads the kubeconfig from `KUBECONFIG` or `~/.kube/config`.
///
/// # Errors
/// [`KubeError::Kubeconfig`] when no file exists or it does not parse.
pub fn read_kubeconfig() -> Result<Kubeconfig, KubeError> {
    Kubeconfig::read().map_err(|e| KubeError::Kubeconfig(e.to_string()))
}

/// Builds a client for `context` of `kubeconfig` and checks that its API server answers
/// a version request within `timeout`.
///
/// # Errors
/// [`KubeError::ContextNotFound`], [`KubeError::InvalidContext`] or
/// [`KubeError::Unreachable`], each naming the context.
pub async fn connect(
    kubeconfig: Kubeconfig,
    context: &str,
    namespace: &str,
    timeout: Duration,
) -> Result<KubeTarget, KubeError> {
    if !kubeconfig.contexts.iter().any(|c| c.name == context) {
        let known: Vec<&str> = kubeconfig
            .contexts
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        return Err(KubeError::ContextNotFound {
            context: context.to_owned(),
            known: known.join(", "),
        });
    }
    let options = KubeConfigOptions {
        context: Some(context.to_owned()),
        ..KubeConfigOptions::default()
    };
    // The user entry's exec plugin, named when it cannot be started.
    let user = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .and_then(|c| c.user.clone())
        .unwrap_or_default();
    let exec_command = kubeconfig
        .auth_infos
        .iter()
        .find(|a| a.name == user)
        .and_then(|a| a.auth_info.as_ref())
        .and_then(|a| a.exec.as_ref())
        .and_then(|x| x.command.clone());
    let failed =
        |e: &(dyn std::error::Error + 'static),
         otherwise: &dyn Fn(&(dyn std::error::Error + 'static)) -> KubeError| {
            match (exec_start_failure(e), &exec_command) {
                (Some(reason), Some(command)) => KubeError::ExecPlugin {
                    context: context.to_owned(),
                    user: user.clone(),
                    command: command.clone(),
                    reason,
                },
                _ => otherwise(e),
            }
        };
    let invalid = |e: &(dyn std::error::Error + 'static)| KubeError::InvalidContext {
        context: context.to_owned(),
        reason: error_chain(e),
    };
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| failed(&e, &invalid))?;
    config.default_namespace = namespace.to_owned();
    let mut proxy_config = config.clone();
    proxy_config.default_retry = false;
    let proxy = Client::try_from(proxy_config).map_err(|e| failed(&e, &invalid))?;
    config.connect_timeout = Some(timeout);
    let uri = config.cluster_url.clone();
    let url = uri.to_string();
    let client = Client::try_from(config).map_err(|e| failed(&e, &invalid))?;
    let unreachable = |reason: String| KubeError::Unreachable {
        context: context.to_owned(),
        reason,
    };
    match tokio::time::timeout(timeout, client.apiserver_version()).await {
        Ok(Ok(info)) => {
            tracing::debug!(context, %url, version = %info.git_version, "Kubernetes API reachable");
        }
        Ok(Err(e)) => {
            return Err(failed(&e, &|e| unreachable(unreachable_reason(&uri, e))));
        }
        Err(_) => {
            return Err(unreachable(format!(
                "{url}: no answer within {}",
                humantime::format_duration(timeout)
            )));
        }
    }
    Ok(KubeTarget {
        client,
        proxy,
        context: context.to_owned(),
        namespace: namespace.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubeconfig(server: &str) -> Kubeconfig {
        Kubeconfig::from_yaml(&format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\ncontexts:\n- name: east\n  context:\n    cluster: c\n    user: u\nusers:\n- name: u\n  user:\n    token: t\ncurrent-context: east\n"
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn unknown_context_lists_the_known_ones() {
        let err = connect(
            kubeconfig("https://127.0.0.1:1"),
            "west",
            "kube-system",
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "context \"west\" not found in kubeconfig: known contexts are [east]; check `kubectl config get-contexts`"
        );
    }
}
