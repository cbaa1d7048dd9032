//! Conversions between the control plane's types and the kernel map layouts.
//!
//! The kernel hands sock_addr programs addresses and ports in network byte order inside
//! native-endian integers; keys are built the same way so no conversion happens in the
//! datapath.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use clustermesh_ebpf_common::{family, proto, ServiceKey};

use clustermesh_agent_core::datapath::Frontend;
use clustermesh_api::model::Protocol;

/// Address words as the kernel stores them (network byte order in memory).
#[must_use]
pub fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], family::V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut w = [0u32; 4];
            for (i, chunk) in o.chunks_exact(4).enumerate() {
                w[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            (w, family::V6)
        }
    }
}

/// The inverse of [`addr_words`]; `None` for an unknown family tag.
#[must_use]
pub fn words_addr(words: [u32; 4], fam: u8) -> Option<IpAddr> {
    match fam {
        family::V4 => Some(IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))),
        family::V6 => {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

/// Port in network byte order, as stored in keys.
#[must_use]
pub(crate) fn port_be(port: u16) -> u16 {
    port.to_be()
}

/// Host-order port from a stored network-order port.
#[must_use]
pub(crate) fn port_host(port: u16) -> u16 {
    u16::from_be(port)
}

/// Protocol number.
#[must_use]
pub(crate) fn proto_num(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => proto::TCP,
        Protocol::Udp => proto::UDP,
    }
}

/// Protocol from its number.
#[must_use]
pub(crate) fn proto_from(n: u8) -> Option<Protocol> {
    match n {
        proto::TCP => Some(Protocol::Tcp),
        proto::UDP => Some(Protocol::Udp),
        _ => None,
    }
}

/// The services-map key of a frontend.
#[must_use]
pub fn service_key(f: &Frontend) -> ServiceKey {
    let (addr, fam) = addr_words(f.ip);
    ServiceKey {
        addr,
        port: port_be(f.port),
        proto: proto_num(f.protocol),
        family: fam,
    }
}

/// The frontend of a services-map key; `None` if the key is malformed.
#[must_use]
pub(crate) fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        ip: words_addr(key.addr, key.family)?,
        port: port_host(key.port),
        protocol: proto_from(key.proto)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ipv4_words_hold_network_order_bytes() {
        let (w, fam) = addr_words("10.96.0.1".parse().unwrap());
        assert_eq!(fam, family::V4);
        assert_eq!(w[0].to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(port_be(80).to_ne_bytes(), [0, 80]);
    }

    proptest! {
        #[test]
        fn frontend_keys_round_trip(v6 in any::<bool>(), a in any::<u128>(), port in any::<u16>(), udp in any::<bool>()) {
            let ip = if v6 { IpAddr::V6(Ipv6Addr::from(a)) } else { IpAddr::V4(Ipv4Addr::from(a as u32)) };
            let f = Frontend { ip, port, protocol: if udp { Protocol::Udp } else { Protocol::Tcp } };
            prop_assert_eq!(frontend_of(&service_key(&f)), Some(f));
        }
    }
}
