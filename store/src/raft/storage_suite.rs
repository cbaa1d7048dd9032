//! openraft's own storage conformance suite (`openraft::testing::Suite`) run against our
//! durable log and state machine, each check in a fresh temporary directory.

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;

use super::keyspace::HistoryLimits;
use super::log_store::LogStore;
use super::state_machine::StateMachine;
use super::TypeConfig;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let log = LogStore::open(&dir.path().join("log"), 4096).expect("open log");
        let sm = StateMachine::open(
            &dir.path().join("snapshot"),
            HistoryLimits {
                max_events: 1000,
                max_bytes: 1 << 20,
            },
        )
        .expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(Builder).expect("openraft storage suite");
}
