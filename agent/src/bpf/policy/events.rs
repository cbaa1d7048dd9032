//! Denied flows reported by the kernel through the `CM_POL_EVENTS` ring buffer.
//!
//! The programs write one [`PolicyEvent`] per denied connect/send or dropped packet (a
//! full ring buffer loses events, never verdicts); the agent drains them and logs both
//! identities, which is what an operator needs to find the missing rule.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use clustermesh_agent_core::policy::datapath::Direction;
use clustermesh_ebpf_common::{direction, family, PolicyEvent};

/// A flow denied by policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeniedFlow {
    /// Direction seen from the local endpoint.
    pub direction: Direction,
    /// The endpoint's owner cgroup id.
    pub owner: u64,
    /// The endpoint's security identity.
    pub owner_identity: u32,
    /// The peer's address (destination for egress, source for ingress).
    pub peer: IpAddr,
    /// The peer's security identity (`2`, world, when the IP cache has no match).
    pub peer_identity: u32,
    /// IP protocol number.
    pub protocol: u8,
    /// Destination port.
    pub port: u16,
}

fn field<const N: usize>(bytes: &[u8], offset: usize) -> Option<[u8; N]> {
    bytes.get(offset..offset + N)?.try_into().ok()
}

/// Decodes one ring buffer record; `None` for a record of another size or with unknown
/// tags (never trusted blindly).
pub(crate) fn decode(bytes: &[u8]) -> Option<DeniedFlow> {
    use std::mem::offset_of;
    if bytes.len() != std::mem::size_of::<PolicyEvent>() {
        return None;
    }
    let owner = u64::from_ne_bytes(field(bytes, offset_of!(PolicyEvent, owner))?);
    let addr: [u8; 16] = field(bytes, offset_of!(PolicyEvent, peer_addr))?;
    let owner_identity = u32::from_ne_bytes(field(bytes, offset_of!(PolicyEvent, owner_identity))?);
    let peer_identity = u32::from_ne_bytes(field(bytes, offset_of!(PolicyEvent, peer_identity))?);
    let port = u16::from_ne_bytes(field(bytes, offset_of!(PolicyEvent, port))?);
    let [protocol] = field(bytes, offset_of!(PolicyEvent, protocol))?;
    let [dir] = field(bytes, offset_of!(PolicyEvent, direction))?;
    let [fam] = field(bytes, offset_of!(PolicyEvent, family))?;
    let direction = match dir {
        direction::INGRESS => Direction::Ingress,
        direction::EGRESS => Direction::Egress,
        _ => return None,
    };
    // Address words are stored in network order, so the bytes are the address.
    let peer = match fam {
        family::V4 => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        family::V6 => IpAddr::V6(Ipv6Addr::from(addr)),
        _ => return None,
    };
    Some(DeniedFlow {
        direction,
        owner,
        owner_identity,
        peer,
        peer_identity,
        protocol,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(event: &PolicyEvent) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&event.owner.to_ne_bytes());
        for w in event.peer_addr {
            b.extend_from_slice(&w.to_ne_bytes());
        }
        b.extend_from_slice(&event.owner_identity.to_ne_bytes());
        b.extend_from_slice(&event.peer_identity.to_ne_bytes());
        b.extend_from_slice(&event.port.to_ne_bytes());
        b.extend_from_slice(&[event.protocol, event.direction, event.family]);
        b.extend_from_slice(&event.pad);
        b
    }

    #[test]
    fn decodes_what_the_program_writes() {
        let event = PolicyEvent {
            owner: 77,
            peer_addr: [u32::from_ne_bytes([127, 0, 9, 3]), 0, 0, 0],
            owner_identity: 1000,
            peer_identity: 2,
            port: 8080,
            protocol: 6,
            direction: direction::EGRESS,
            family: family::V4,
            pad: [0; 11],
        };
        let flow = decode(&record(&event)).unwrap();
        assert_eq!(flow.peer, "127.0.9.3".parse::<IpAddr>().unwrap());
        assert_eq!(flow.direction, Direction::Egress);
        assert_eq!(
            (flow.owner, flow.owner_identity, flow.peer_identity),
            (77, 1000, 2)
        );
        assert_eq!((flow.protocol, flow.port), (6, 8080));
    }

    #[test]
    fn rejects_records_of_another_shape() {
        assert_eq!(decode(&[0u8; 12]), None);
        let bad = PolicyEvent {
            direction: 9,
            family: family::V4,
            ..PolicyEvent::default()
        };
        assert_eq!(decode(&record(&bad)), None);
    }
}
