//! Transport protocols the datapath balances.

/// Transport protocol of a frontend or backend port. SCTP is not balanced, so records
/// carrying it are refused when validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

super::words!(Protocol { Tcp => "TCP", Udp => "UDP" });
