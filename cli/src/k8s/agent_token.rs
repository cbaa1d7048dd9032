//! The token that opens the agents' admin routes over TCP.
//!
//! In Kubernetes the agents serve `/v1/status`, `/v1/services` and `/v1/bpf/lb` on a port
//! of every node (they use the host network), so they answer only requests carrying the
//! token of Secret [`AGENT_TOKEN_SECRET`] in the `X-Clustermesh-Token` header (the chart
//! mounts that Secret into the agents). `enable` creates it once with a random token and
//! keeps it across upgrades; `status`, `service list` and `bpf lb list` read it and send it
//! through the API server's pod proxy. A header of its own is needed because the API
//! server authenticates the proxy request with `Authorization` and strips that header
//! before forwarding (kubernetes/kubernetes#34076).

use k8s_openapi::api::core::v1::Secret;
use rand::RngCore;

use super::error::KubeModeError;
use super::objects::{new_secret, secret_text, Objects};

/// Secret holding the agents' admin token (chart value `tls.agentAdminTokenSecret`).
pub const AGENT_TOKEN_SECRET: &str = "clustermesh-agent-admin-token";
/// Key of the token in [`AGENT_TOKEN_SECRET`].
pub const AGENT_TOKEN_KEY: &str = "token";
/// Request header carrying the token (the agent's `http::TOKEN_HEADER`).
pub const TOKEN_HEADER: &str = "X-Clustermesh-Token";

/// A new random token: 32 bytes from the operating system's generator, hex-encoded.
fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The token stored in `secret`, if it holds a usable one.
fn token_of(secret: &Secret) -> Option<String> {
    secret_text(secret, AGENT_TOKEN_KEY)
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Creates [`AGENT_TOKEN_SECRET`] with a new token unless it already holds one (agents
/// and scripts keep working across upgrades).
///
/// # Errors
/// An API error reading or writing the Secret.
pub(crate) async fn ensure(objs: &Objects<'_>, cluster: &str) -> Result<(), KubeModeError> {
    if let Some(existing) = objs.secret(AGENT_TOKEN_SECRET).await? {
        if token_of(&existing).is_some() {
            return Ok(());
        }
    }
    let token = generate();
    let secret = new_secret(
        AGENT_TOKEN_SECRET,
        objs.namespace(),
        cluster,
        "Opaque",
        &[(AGENT_TOKEN_KEY, &token)],
    );
    objs.apply::<Secret>("Secret", &secret).await?;
    Ok(())
}

/// The token to send to the agents, or why there is none (said next to an agent's refusal).
pub(crate) async fn read(objs: &Objects<'_>) -> Result<String, String> {
    match objs.secret(AGENT_TOKEN_SECRET).await {
        Ok(Some(secret)) => token_of(&secret).ok_or_else(|| {
            format!(
                "Secret {AGENT_TOKEN_SECRET} has no {AGENT_TOKEN_KEY}; run `clustermesh enable` again to create one"
            )
        }),
        Ok(None) => Err(format!(
            "Secret {AGENT_TOKEN_SECRET} does not exist; run `clustermesh enable` again to create it"
        )),
        Err(e) => Err(format!("cannot read the agents' token: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_printable() {
        let (a, b) = (generate(), generate());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn the_secret_name_is_the_chart_default() {
        let chart = super::super::embedded::chart().unwrap();
        assert_eq!(
            chart.default_values()["tls"]["agentAdminTokenSecret"],
            AGENT_TOKEN_SECRET
        );
    }
}
