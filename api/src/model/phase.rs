//! Where an agent's watch of one cluster is in its life.

/// Phase of an agent's watcher of one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Dialling the server and checking the cluster's identity.
    Connecting,
    /// Receiving the full state; nothing applied until the Synced marker.
    Syncing,
    /// Applying live events.
    Watching,
    /// Disconnected, waiting to retry; the last-known state is kept (until the stale TTL).
    Backoff,
    /// The configuration or identity checks refuse this cluster; retrying slowly.
    Refused,
}

super::words!(Phase {
    Connecting => "connecting",
    Syncing => "syncing",
    Watching => "watching",
    Backoff => "backoff",
    Refused => "refused",
});
