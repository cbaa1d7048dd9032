//! The service domain model every component shares: the names, enums and validated
//! records a service passes through on its way from a cluster's mesh API server to the
//! agent's datapath and the CLI.
//!
//! A service moves through these stages, each with one type:
//!
//! | stage | type | home |
//! |---|---|---|
//! | wire (store value, Watch payload) | [`v1::Service`](crate::v1::Service) | `api` |
//! | validated record of one cluster | [`ServiceRecord`] | here |
//! | merged across clusters, per service port | `MergedService` | `agent-core` (`merge`) |
//! | desired load-balancer state with its Maglev table | `DesiredService` | `agent-core` (`datapath`) |
//! | what the eBPF maps hold | `ProgrammedService` | `agent` (`bpf`) |
//! | what the admin API reports | [`ServiceStatus`](crate::admin::ServiceStatus) | `api` (`admin`) |
//!
//! The enums here ([`Protocol`], [`Affinity`], [`Tier`], [`BackendState`], [`Phase`]) have
//! one spelling each ([`Word`]): the word the admin API's JSON bodies and the CLI's output
//! use, so the agent and the CLI cannot spell a value two ways.

mod affinity;
mod backend_state;
mod name;
mod phase;
mod protocol;
mod record;
mod tier;

pub use affinity::Affinity;
pub use backend_state::BackendState;
pub use name::{ServiceName, ServicePortId};
pub use phase::Phase;
pub use protocol::Protocol;
pub use record::{BackendRecord, PortSpec, RecordError, ServiceRecord};
pub use tier::Tier;

/// The one spelling of an enum value in JSON bodies and CLI output.
pub trait Word: Sized {
    /// The value's word, e.g. `"terminating"`.
    fn word(&self) -> &'static str;
    /// The value a word stands for; `None` for a word this version does not know.
    fn from_word(word: &str) -> Option<Self>;
}

/// Implements [`Word`] and `Display` (the word, padded as asked) for a fieldless enum.
macro_rules! words {
    ($ty:ident { $($variant:ident => $word:literal),+ $(,)? }) => {
        impl $crate::model::Word for $ty {
            fn word(&self) -> &'static str {
                match self {
                    $($ty::$variant => $word),+
                }
            }

            fn from_word(word: &str) -> Option<Self> {
                match word {
                    $($word => Some($ty::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad($crate::model::Word::word(self))
            }
        }
    };
}
pub(crate) use words;

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T: Word + PartialEq + std::fmt::Debug + std::fmt::Display>(all: &[T]) {
        for v in all {
            assert_eq!(T::from_word(v.word()).as_ref(), Some(v));
            assert_eq!(v.to_string(), v.word());
        }
        assert!(T::from_word("no-such-word").is_none());
    }

    #[test]
    fn every_word_names_its_value_and_back() {
        round_trips(&[Protocol::Tcp, Protocol::Udp]);
        round_trips(&[Affinity::None, Affinity::Local, Affinity::Remote]);
        round_trips(&[Tier::Node, Tier::Zone, Tier::Cluster, Tier::Remote]);
        round_trips(&[BackendState::Active, BackendState::Terminating]);
        round_trips(&[
            Phase::Connecting,
            Phase::Syncing,
            Phase::Watching,
            Phase::Backoff,
            Phase::Refused,
        ]);
    }

    #[test]
    fn words_are_the_admin_api_spelling() {
        assert_eq!(Protocol::Udp.word(), "UDP");
        assert_eq!(Affinity::None.word(), "none");
        assert_eq!(Tier::Cluster.word(), "cluster");
        assert_eq!(BackendState::Terminating.word(), "terminating");
        assert_eq!(Phase::Backoff.word(), "backoff");
        assert_eq!(None::<Tier>.word(), "none");
        assert_eq!(<Option<Tier>>::from_word("none"), Some(None));
        assert_eq!(<Option<Tier>>::from_word("zone"), Some(Some(Tier::Zone)));
        assert_eq!(format!("{:<6}|", Protocol::Tcp), "TCP   |");
    }
}
