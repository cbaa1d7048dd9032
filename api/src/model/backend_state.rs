//! Whether a backend takes new connections.

/// Whether a backend takes new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Takes new connections (appears in the Maglev table).
    Active,
    /// Terminating: no new connections, existing flows kept (weight 0, not in the table).
    Terminating,
}

super::words!(BackendState { Active => "active", Terminating => "terminating" });
