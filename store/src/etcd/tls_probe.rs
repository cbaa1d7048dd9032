//! Why etcd refuses our TLS connection, in etcd's own words.
//!
//! With TLS 1.3 a client finishes its side of the handshake before the server has checked
//! the client certificate; when etcd then refuses the certificate, its alert reaches the
//! gRPC connection task, and the request only sees "operation was canceled: connection
//! closed". Retrying cannot fix a certificate, so [`super::EtcdStore::connect`] would retry
//! until its deadline and then report that useless line. After a failed attempt the
//! connect loop therefore runs this probe: one TLS connection with the same CA and client
//! identity that sends the HTTP/2 preface and reads etcd's answer, so a refusal surfaces
//! as the alert etcd sent ("received fatal alert: BadCertificate") or as our own verdict
//! on etcd's certificate ("invalid peer certificate: UnknownIssuer").

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::config::EtcdTls;
use super::read_file;
use super::EtcdConnectError;

/// The HTTP/2 client connection preface; etcd answers it with a SETTINGS frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What one probe found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    /// The TLS session works: whatever failed, it was not TLS.
    Accepted,
    /// TLS failed: etcd's alert or our verification error.
    Refused(String),
    /// No TLS verdict (endpoint unreachable, no answer, bad URL): retrying may help.
    Inconclusive,
}

/// A rustls client configuration equivalent to the one the etcd client uses.
pub(crate) fn client_config(tls: &EtcdTls) -> Result<rustls::ClientConfig, EtcdConnectError> {
    let invalid = |detail: String| EtcdConnectError::InvalidConfig {
        endpoints: String::new(),
        detail,
    };
    let ca_pem = read_file(&tls.ca_file)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca_pem) {
        let cert = cert.map_err(|e| invalid(format!("{}: {e}", tls.ca_file.display())))?;
        roots
            .add(cert)
            .map_err(|e| invalid(format!("{}: {e}", tls.ca_file.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match &tls.client_identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let cert_pem = read_file(cert)?;
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(format!("{}: {e}", cert.display())))?;
            let key_pem = read_file(key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| invalid(format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| invalid(e.to_string()))?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// `host` and `port` of an `https://host:port` endpoint (port 2379 when absent).
fn host_port(endpoint: &str) -> Option<(String, u16)> {
    let uri: http::Uri = endpoint.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_owned(), uri.port_u16().unwrap_or(2379)))
}

/// Connects to `endpoint` over TLS with `config` and reads etcd's first answer.
pub(crate) async fn probe(
    endpoint: &str,
    config: Arc<rustls::ClientConfig>,
    server_name: Option<&str>,
    timeout: Duration,
) -> Probe {
    let Some((host, port)) = host_port(endpoint) else {
        return Probe::Inconclusive;
    };
    let name = server_name.unwrap_or(&host).to_owned();
    let name = match name.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => match ServerName::try_from(name) {
            Ok(name) => name,
            Err(_) => return Probe::Inconclusive,
        },
    };
    let attempt = async {
        let Ok(tcp) = tokio::net::TcpStream::connect((host.as_str(), port)).await else {
            return Probe::Inconclusive;
        };
        let connector = tokio_rustls::TlsConnector::from(config);
        let mut stream = match connector.connect(name, tcp).await {
            Ok(stream) => stream,
            Err(e) => return tls_verdict(&e),
        };
        if let Err(e) = stream.write_all(PREFACE).await {
            return tls_verdict(&e);
        }
        let _ = stream.flush().await;
        let mut buf = [0u8; 64];
        match stream.read(&mut buf).await {
            Ok(0) => Probe::Inconclusive,
            Ok(_) => Probe::Accepted,
            Err(e) => tls_verdict(&e),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Probe::Inconclusive)
}

/// A TLS error (alert, certificate verdict) is a refusal; any other I/O error is not.
fn tls_verdict(error: &std::io::Error) -> Probe {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => Probe::Refused(tls.to_string()),
        None => Probe::Inconclusive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_split_into_host_and_port() {
        assert_eq!(
            host_port("https://127.0.0.1:2379"),
            Some(("127.0.0.1".to_owned(), 2379))
        );
        assert_eq!(host_port("https://[::1]:23"), Some(("::1".to_owned(), 23)));
        assert_eq!(
            host_port("https://etcd.local"),
            Some(("etcd.local".to_owned(), 2379))
        );
        assert_eq!(host_port("not a url"), None);
    }

    #[test]
    fn only_tls_errors_are_refusals() {
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
        );
        assert_eq!(
            tls_verdict(&alert),
            Probe::Refused("received fatal alert: BadCertificate".to_owned())
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(tls_verdict(&reset), Probe::Inconclusive);
    }
}
