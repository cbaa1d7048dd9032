//! Per-endpoint policy: for every local endpoint, which peers it may receive from and send
//! to, on which protocols and ports, computed from the policies of its cluster and the
//! security identities of every connected cluster.
//!
//! The result per endpoint and direction is `None` (not isolated: no policy of that
//! direction selects the endpoint, so everything passes, as in Kubernetes) or an allow set
//! of [`AllowEntry`]s keyed by peer (a security identity, any peer, or an address block)
//! and protocol/port span; the union over every policy that selects the endpoint.
//!
//! Incremental by design, as Cilium's selector cache is: every peer selector of every
//! policy is cached with the identities it selects. An identity change touches only the
//! selectors whose membership it changes, and only endpoints selected by policies using
//! those selectors are recomputed; a policy change recomputes the endpoints its old and new
//! subjects select; an endpoint change recomputes that endpoint. Every mutation returns
//! the endpoints whose computed policy actually changed, which is what the datapath has to
//! rewrite.
//!
//! Named ports: on ingress they resolve against the selected endpoint's own container
//! ports; on egress against the ports of local endpoints carrying the peer's identity
//! (exported endpoint records carry no port names yet, so a named egress port towards a
//! remote-only identity matches nothing — the Kubernetes reading of an unresolvable name).

pub mod datapath;
mod engine;
pub mod inputs;
pub mod lower;
pub mod memory;
pub mod plane;

pub use datapath::{
    port_blocks, Direction, EndpointRules, IpCacheValue, PolicyCounters, PolicyDatapath,
    PolicyDatapathError, PolicyOwner, RuleKey,
};
pub use engine::{
    AllowEntry, AllowPeer, EndpointId, EndpointPolicy, LocalEndpoint, PolicyEngine, PolicyKey,
    PortSpan,
};

#[cfg(test)]
mod plane_tests;
#[cfg(test)]
mod tests;
