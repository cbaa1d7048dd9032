//! Costs of the PKI paths: issuing leaves, extracting identities, building configs and
//! a full mTLS handshake (over an in-memory duplex pipe, so no network is involved).

#![allow(clippy::unwrap_used)] // benchmark setup: a failure is a broken benchmark

use std::sync::Arc;

use clustermesh_certs::issue::DEFAULT_LEAF_VALIDITY;
use clustermesh_certs::{
    MeshCa, MeshTls, PeerIdentity, ServerNames, TlsSource, TrustDomain, Validity,
};
use criterion::{criterion_group, criterion_main, Criterion};
use rustls::pki_types::ServerName;

fn td() -> TrustDomain {
    TrustDomain::new("clustermesh.local").unwrap()
}

fn names() -> ServerNames {
    ServerNames::new(["localhost".to_owned()], ["127.0.0.1".parse().unwrap()])
}

fn issue(c: &mut Criterion) {
    let ca = MeshCa::generate(td()).unwrap();
    let validity = Validity::from_now(DEFAULT_LEAF_VALIDITY);
    c.bench_function("issue_server_leaf", |b| {
        b.iter(|| ca.issue_server("east", &names(), validity).unwrap());
    });
}

fn identity(c: &mut Criterion) {
    let ca = MeshCa::generate(td()).unwrap();
    let leaf = ca
        .issue_agent("east", Validity::from_now(DEFAULT_LEAF_VALIDITY))
        .unwrap();
    let der = clustermesh_certs::pem::parse_certs(leaf.cert_pem.as_bytes())
        .unwrap()
        .remove(0);
    let td = td();
    c.bench_function("identity_from_certificate", |b| {
        b.iter(|| PeerIdentity::from_certificate(der.as_ref(), &td).unwrap());
    });
    c.bench_function("identity_parse_uri", |b| {
        b.iter(|| PeerIdentity::parse("spiffe://clustermesh.local/cluster/east-1").unwrap());
    });
}

fn configs(c: &mut Criterion) {
    let ca = MeshCa::generate(td()).unwrap();
    let leaf = ca
        .issue_server("east", &names(), Validity::from_now(DEFAULT_LEAF_VALIDITY))
        .unwrap();
    c.bench_function("mesh_tls_from_pem", |b| {
        b.iter(|| {
            MeshTls::from_pem(
                td(),
                ca.cert_pem().as_bytes(),
                leaf.cert_pem.as_bytes(),
                leaf.key_pem.as_bytes(),
            )
            .unwrap()
        });
    });
}

fn handshake(c: &mut Criterion) {
    let ca = MeshCa::generate(td()).unwrap();
    let validity = Validity::from_now(DEFAULT_LEAF_VALIDITY);
    let load = |leaf: clustermesh_certs::IssuedCert| {
        Arc::new(
            MeshTls::from_pem(
                td(),
                ca.cert_pem().as_bytes(),
                leaf.cert_pem.as_bytes(),
                leaf.key_pem.as_bytes(),
            )
            .unwrap(),
        )
    };
    let server = load(ca.issue_server("east", &names(), validity).unwrap());
    let client = load(ca.issue_agent("west", validity).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    c.bench_function("mtls_handshake_duplex", |b| {
        b.to_async(&runtime).iter(|| async {
            let (client_io, server_io) = tokio::io::duplex(64 * 1024);
            let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
            let connector = tokio_rustls::TlsConnector::from(client.client_config());
            let name = ServerName::try_from("localhost").unwrap();
            let (accepted, connected) = tokio::join!(
                acceptor.accept(server_io),
                connector.connect(name, client_io)
            );
            let accepted = accepted.unwrap();
            connected.unwrap();
            PeerIdentity::from_chain(accepted.get_ref().1.peer_certificates(), &td()).unwrap()
        });
    });
}

criterion_group!(benches, issue, identity, configs, handshake);
criterion_main!(benches);
