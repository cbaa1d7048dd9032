//! Locality tiers: how close a backend is to the node that balances to it.

use super::Word;

/// Locality tier of a backend relative to this node (lower is closer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Same node.
    Node,
    /// Same zone.
    Zone,
    /// Same cluster.
    Cluster,
    /// Another cluster.
    Remote,
}

super::words!(Tier { Node => "node", Zone => "zone", Cluster => "cluster", Remote => "remote" });

/// The tier serving a service, `none` when no backend is usable.
impl Word for Option<Tier> {
    fn word(&self) -> &'static str {
        self.as_ref().map_or("none", Word::word)
    }

    fn from_word(word: &str) -> Option<Self> {
        match word {
            "none" => Some(None),
            w => Tier::from_word(w).map(Some),
        }
    }
}
