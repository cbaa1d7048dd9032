//! Reading the verified peer from a `tonic::Request`.

use tonic::{Request, Status};

use super::server::MeshConnectInfo;
use crate::identity::PeerIdentity;

/// The connection info of the request's connection, if it came through
/// [`super::incoming`].
pub fn peer_info<T>(request: &Request<T>) -> Option<&MeshConnectInfo> {
    request.extensions().get::<MeshConnectInfo>()
}

/// The verified identity of the request's client, if it came through
/// [`super::incoming`].
pub fn peer_identity<T>(request: &Request<T>) -> Option<&PeerIdentity> {
    peer_info(request).map(|info| &info.peer)
}

/// The verified identity of the client, or `UNAUTHENTICATED` if the request did not come
/// over a mesh mTLS connection (a server wired without [`super::incoming`]).
pub fn require_peer<T>(request: &Request<T>) -> Result<&PeerIdentity, Status> {
    peer_identity(request).ok_or_else(|| {
        Status::unauthenticated(
            "no verified mesh identity on this connection; connect with a mesh client certificate",
        )
    })
}

/// The verified identity if it is an admin, `PERMISSION_DENIED` for cluster identities,
/// `UNAUTHENTICATED` without one.
pub fn require_admin<T>(request: &Request<T>) -> Result<&PeerIdentity, Status> {
    let peer = require_peer(request)?;
    if peer.is_admin() {
        Ok(peer)
    } else {
        Err(Status::permission_denied(format!(
            "{peer} is not an admin identity; use an admin certificate (spiffe://<trust-domain>/admin/<name>)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;

    fn request_from(peer: PeerIdentity) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut().insert(MeshConnectInfo {
            remote_addr: "127.0.0.1:1".parse().unwrap(),
            local_addr: None,
            peer,
        });
        req
    }

    #[test]
    fn request_without_connect_info_is_unauthenticated() {
        let req = Request::new(());
        assert!(peer_identity(&req).is_none());
        assert_eq!(
            require_peer(&req).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn cluster_peer_is_not_admin() {
        let td = TrustDomain::new("clustermesh.local").unwrap();
        let req = request_from(PeerIdentity::cluster(td.clone(), "east").unwrap());
        assert_eq!(require_peer(&req).unwrap().name(), "east");
        assert_eq!(
            require_admin(&req).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let req = request_from(PeerIdentity::admin(td, "alice").unwrap());
        assert_eq!(require_admin(&req).unwrap().name(), "alice");
    }
}
