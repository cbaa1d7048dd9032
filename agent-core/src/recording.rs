//! A [`Datapath`] that records what it is asked to do, for tests and dry runs.
//!
//! It keeps every batch it received and the resulting programmed state, so a test can
//! ask both "what changed in the last step" and "what would the kernel enforce now". It can
//! be told to refuse the next batches, or one service only, to exercise the control plane's
//! retry path.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use clustermesh_api::model::ServicePortId;

use crate::datapath::{ApplyReport, Datapath, DatapathError, DesiredChanges, DesiredService};

#[derive(Debug, Default)]
struct Inner {
    batches: Vec<DesiredChanges>,
    programmed: BTreeMap<ServicePortId, DesiredService>,
    fail_next: usize,
    /// Services to refuse, with how many more times.
    fail_service: BTreeMap<ServicePortId, usize>,
}

impl Inner {
    /// Whether `id` is to be refused this time (counts the refusal).
    fn refuses(&mut self, id: &ServicePortId) -> bool {
        match self.fail_service.get_mut(id) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Applies `removals` and `upserts` except the refused services; records what was
    /// applied.
    fn apply(&mut self, upserts: &[DesiredService], removals: &[ServicePortId]) -> ApplyReport {
        let mut report = ApplyReport::default();
        if self.fail_next > 0 {
            self.fail_next -= 1;
            let ids = removals.iter().chain(upserts.iter().map(|s| &s.id));
            for id in ids {
                report.failed.insert(id.clone(), refused(id, "batch"));
            }
            return report;
        }
        let mut applied = DesiredChanges::default();
        for id in removals {
            if self.refuses(id) {
                report.failed.insert(id.clone(), refused(id, "service"));
            } else {
                self.programmed.remove(id);
                applied.removals.push(id.clone());
            }
        }
        for svc in upserts {
            if self.refuses(&svc.id) {
                report
                    .failed
                    .insert(svc.id.clone(), refused(&svc.id, "service"));
            } else {
                self.programmed.insert(svc.id.clone(), svc.clone());
                applied.upserts.push(svc.clone());
            }
        }
        report.applied = applied.upserts.len() + applied.removals.len();
        if !applied.is_empty() {
            self.batches.push(applied);
        }
        report
    }
}

fn refused(id: &ServicePortId, what: &str) -> DatapathError {
    DatapathError {
        service: format!("{}/{}/{}", id.namespace, id.name, id.port_name),
        reason: format!("recording datapath told to refuse this {what}"),
    }
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

    /// Every batch applied so far, without the services it refused (a batch that applied
    /// nothing is not recorded). A reconcile is recorded as the batch it amounted to.
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

    /// Refuses every service of the next `n` batches.
    pub fn fail_next(&self, n: usize) {
        self.lock().fail_next = n;
    }

    /// Refuses service `id` the next `n` times it is sent; the other services of those
    /// batches are applied.
    pub fn fail_service(&self, id: &ServicePortId, n: usize) {
        self.lock().fail_service.insert(id.clone(), n);
    }
}

impl Datapath for RecordingDatapath {
    fn apply(&self, changes: &DesiredChanges) -> ApplyReport {
        self.lock().apply(&changes.upserts, &changes.removals)
    }

    fn reconcile(&self, desired: &[DesiredService]) -> ApplyReport {
        let mut inner = self.lock();
        let keep: BTreeSet<&ServicePortId> = desired.iter().map(|s| &s.id).collect();
        let removals: Vec<ServicePortId> = inner
            .programmed
            .keys()
            .filter(|id| !keep.contains(id))
            .cloned()
            .collect();
        inner.apply(desired, &removals)
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
            global: false,
            shared: false,
        }
    }

    #[test]
    fn records_upserts_and_removals() {
        let dp = RecordingDatapath::new();
        dp.apply(&DesiredChanges {
            upserts: vec![svc("a"), svc("b")],
            removals: vec![],
        })
        .into_result()
        .unwrap();
        dp.apply(&DesiredChanges {
            upserts: vec![],
            removals: vec![svc("a").id],
        })
        .into_result()
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
        assert!(dp.apply(&batch).into_result().is_err());
        assert!(dp.programmed().is_empty());
        assert!(dp.apply(&batch).into_result().is_ok());
        assert_eq!(dp.programmed().len(), 1);
    }

    #[test]
    fn refuses_one_service_and_applies_the_others() {
        let dp = RecordingDatapath::new();
        dp.fail_service(&svc("a").id, 1);
        let batch = DesiredChanges {
            upserts: vec![svc("a"), svc("b")],
            removals: vec![],
        };
        let report = dp.apply(&batch);
        assert_eq!(report.applied, 1);
        assert!(report.failed.contains_key(&svc("a").id));
        assert_eq!(dp.batches()[0].upserts, vec![svc("b")]);
        assert!(dp.apply(&batch).is_complete());
        assert_eq!(dp.programmed().len(), 2);
    }

    #[test]
    fn reconcile_replaces_the_programmed_state() {
        let dp = RecordingDatapath::new();
        dp.apply(&DesiredChanges {
            upserts: vec![svc("a"), svc("b")],
            removals: vec![],
        })
        .into_result()
        .unwrap();
        let report = dp.reconcile(&[svc("b"), svc("c")]);
        assert_eq!(report.applied, 3);
        assert_eq!(
            dp.programmed().into_keys().collect::<Vec<_>>(),
            [svc("b").id, svc("c").id]
        );
        assert_eq!(dp.batches()[1].removals, vec![svc("a").id]);
    }
}
