//! A [`Datapath`] that records what it is asked to do, for tests and dry runs.
//!
//! It keeps every batch it received and the resulting programmed state, so a test can
//! ask both "what changed in the last step" and "what would the kernel enforce now". It can
//! be told to refuse the next batches, to exercise the control plane's retry path.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use clustermesh_api::model::ServicePortId;

use crate::datapath::{Datapath, DatapathError, DesiredChanges, DesiredService};

#[derive(Debug, Default)]
struct Inner {
    batches: Vec<DesiredChanges>,
    programmed: BTreeMap<ServicePortId, DesiredService>,
    fail_next: usize,
}

/// Records applied batches and the programmed state.
#[derive(Debug, Default)]
pub struct RecordingDatapath {
    inner: Mutex<Inner>,
}

impl RecordingDatapath {
    /// An empty recorder.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated in a way that
        // matters to a recorder; keep going with whatever is there.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every batch applied so far (refused ones are not recorded).
    #[must_use]
    pub fn batches(&self) -> Vec<DesiredChanges> {
        self.lock().batches.clone()
    }

    /// Number of batches applied so far.
    #[must_use]
    pub fn batch_count(&self) -> usize {
        self.lock().batches.len()
    }

    /// The programmed state of one service.
    #[must_use]
    pub fn service(&self, id: &ServicePortId) -> Option<DesiredService> {
        self.lock().programmed.get(id).cloned()
    }

    /// The whole programmed state.
    #[must_use]
    pub fn programmed(&self) -> BTreeMap<ServicePortId, DesiredService> {
        self.lock().programmed.clone()
    }

    /// Refuses the next `n` batches with an error.
    pub fn fail_next(&self, n: usize) {
        self.lock().fail_next = n;
    }
}

impl Datapath for RecordingDatapath {
    fn apply(&self, changes: &DesiredChanges) -> Result<(), DatapathError> {
        let mut inner = self.lock();
        if inner.fail_next > 0 {
            inner.fail_next -= 1;
            return Err(DatapathError {
                service: "*".into(),
                reason: "recording datapath told to refuse this batch".into(),
            });
        }
        for id in &changes.removals {
            inner.programmed.remove(id);
        }
        for svc in &changes.upserts {
            inner.programmed.insert(svc.id.clone(), svc.clone());
        }
        inner.batches.push(changes.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn svc(name: &str) -> DesiredService {
        DesiredService {
            id: ServicePortId {
                namespace: "default".into(),
                name: name.into(),
                port_name: String::new(),
            },
            frontends: Vec::new(),
            backends: Vec::new(),
            table: Arc::from(Vec::new()),
            active_tier: None,
            affinity: clustermesh_api::model::Affinity::None,
        }
    }

    #[test]
    fn records_upserts_and_removals() {
        let dp = RecordingDatapath::new();
        dp.apply(&DesiredChanges {
            upserts: vec![svc("a"), svc("b")],
            removals: vec![],
        })
        .unwrap();
        dp.apply(&DesiredChanges {
            upserts: vec![],
            removals: vec![svc("a").id],
        })
        .unwrap();
        assert_eq!(dp.batch_count(), 2);
        assert!(dp.service(&svc("a").id).is_none());
        assert!(dp.service(&svc("b").id).is_some());
    }

    #[test]
    fn refuses_when_told() {
        let dp = RecordingDatapath::new();
        dp.fail_next(1);
        let batch = DesiredChanges {
            upserts: vec![svc("a")],
            removals: vec![],
        };
        assert!(dp.apply(&batch).is_err());
        assert!(dp.programmed().is_empty());
        assert!(dp.apply(&batch).is_ok());
        assert_eq!(dp.programmed().len(), 1);
    }
}
