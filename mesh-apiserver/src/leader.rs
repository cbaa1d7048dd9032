//! Leader election among a cluster's mesh API server replicas, with fencing: one writer
//! per cluster.
//!
//! Several replicas of a cluster's API server may run for availability. All of them serve
//! Watch from their own caches, but only one at a time may run the writers of the
//! cluster's records (the exporter and the peer mirror): two exporters working from
//! sources read at different moments would overwrite each other's records with older
//! versions, and delete what the other just wrote.
//!
//! The election works on any [`Store`] (raft or etcd), with the store's own primitives:
//! - **session**: every replica holds a store lease of `lease_ttl`, refreshed every third
//!   of it ([`ElectionConfig`]);
//! - **campaign**: a replica creates [`leader_key`] (`clustermesh/leader/<cluster>`,
//!   outside the record prefix, so no cache or watcher sees it) holding its name, bound to
//!   its lease, by compare-and-swap on "absent". The winner's **fencing token** is the
//!   key's `mod_revision` after that write;
//! - **leading**: the writers get a [`FencedStore`], which turns every write into a
//!   [`Store::fenced_write`] on the leader key at the token. Once the key is gone (lease
//!   expired, leader resigned) or rewritten by a newer term, a deposed leader's writes —
//!   even ones still in flight from before it noticed — fail in the store, atomically;
//! - **stepping down**: the leader ends its term (cancels its writers) at once when a write
//!   is fenced, when the key changes, or when its lease may have expired: the last
//!   successful refresh was sent longer ago than the TTL minus a margin, so the writers
//!   are stopped before any other replica could win;
//! - **following**: the other replicas watch the key and campaign as soon as it is
//!   deleted: by lease expiry after a crash (within `lease_ttl`), or at once when the
//!   leader resigns on a graceful stop (it stops its writers, then revokes its lease).
//!
//! A replica that finds the key holding its own name under another lease when it starts
//! takes it over at once: that is its own previous process, which crashed (names are
//! unique per replica), so a restarted single replica does not wait for its old lease to
//! expire. It does so once per process: two replicas configured with the same name would
//! otherwise take the key from each other forever; the second one says so in the log and
//! follows.
//!
//! Safety does not depend on clocks: timing only decides how soon a replica steps down;
//! fencing alone keeps a deposed leader's writes out of the store.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clustermesh_store::{
    CasOutcome, CasWrite, EventKind, Fence, FencedOp, FencedOutcome, KeyValue, LeaseId, ListResult,
    Result as StoreResult, Revision, Store, StoreError, WatchStream,
};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, StepDown};

/// Prefix of the election keys (one per cluster), outside the record prefix `mesh/v1/`.
pub const LEADER_PREFIX: &str = "clustermesh/leader/";

/// Default lease TTL: a crashed leader is replaced within about this long.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

/// The election key of `cluster`.
#[must_use]
pub fn leader_key(cluster: &str) -> String {
    format!("{LEADER_PREFIX}{cluster}")
}

/// How a replica takes part in the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionConfig {
    /// The cluster whose writer is elected.
    pub cluster: String,
    /// This replica's name, unique among the cluster's replicas (shown as the holder).
    pub replica: String,
    /// TTL of the replica's lease: how long a crashed leader keeps the role.
    pub lease_ttl: Duration,
}

impl ElectionConfig {
    /// An election for `cluster` as `replica`, with [`DEFAULT_LEASE_TTL`].
    #[must_use]
    pub fn new(cluster: impl Into<String>, replica: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            replica: replica.into(),
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }

    /// Uses `ttl` for the lease instead.
    #[must_use]
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How often the lease is refreshed.
    fn refresh_interval(&self) -> Duration {
        self.lease_ttl / 3
    }

    /// How long before the lease might expire in the store the leader steps down.
    fn step_down_margin(&self) -> Duration {
        self.lease_ttl / 4
    }
}

/// What a replica knows about the election.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderState {
    /// This replica leads: its writers run.
    pub is_leader: bool,
    /// The replica holding the leader key, if any is known.
    pub holder: Option<String>,
    /// Fencing token of the holder's term (the leader key's `mod_revision`; 0: none).
    pub token: Revision,
    /// Terms this replica has won since it started.
    pub terms_won: u64,
    /// Why the replica cannot take part right now (the store does not answer), if so.
    pub problem: Option<String>,
}

/// A cheap, cloneable view of one replica's [`LeaderState`].
#[derive(Debug, Clone)]
pub struct LeaderStatus {
    rx: watch::Receiver<LeaderState>,
}

impl LeaderStatus {
    /// The state now.
    #[must_use]
    pub fn current(&self) -> LeaderState {
        self.rx.borrow().clone()
    }

    /// A receiver that sees every change.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<LeaderState> {
        self.rx.clone()
    }
}

/// One won term: the fencing token its writes carry and the signal that ends it.
#[derive(Debug, Clone)]
pub struct Term {
    fence: Fence,
    ended: CancellationToken,
    fenced: Arc<AtomicBool>,
}

impl Term {
    /// A term fenced on `key` at `token`.
    #[must_use]
    pub fn new(key: impl Into<Vec<u8>>, token: Revision) -> Self {
        Self {
            fence: Fence {
                key: key.into(),
                mod_revision: token,
            },
            ended: CancellationToken::new(),
            fenced: Arc::default(),
        }
    }

    /// The fence every write of the term carries.
    #[must_use]
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// The fencing token (the leader key's `mod_revision` when the term was won).
    #[must_use]
    pub fn token(&self) -> Revision {
        self.fence.mod_revision
    }

    /// Cancelled when the term ends: the writers must stop.
    #[must_use]
    pub fn ended(&self) -> &CancellationToken {
        &self.ended
    }

    /// Whether a write of the term was fenced off (another replica won since).
    #[must_use]
    pub fn was_fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }

    fn depose(&self) {
        self.fenced.store(true, Ordering::Relaxed);
        self.ended.cancel();
    }
}

/// A [`Store`] whose writes only land while a [`Term`] is current.
///
/// Puts, deletes, prefix deletes and compare-and-swaps become [`Store::fenced_write`]s on
/// the term's fence; the first one the store refuses ([`StoreError::Fenced`]) ends the
/// term. Reads and watches pass through. Lease operations and compaction pass through
/// unfenced: they are housekeeping, not record writes, and the writers do not use them.
pub struct FencedStore {
    inner: Arc<dyn Store>,
    term: Term,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for FencedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FencedStore")
            .field("fence", &String::from_utf8_lossy(&self.term.fence.key))
            .field("token", &self.term.token())
            .finish_non_exhaustive()
    }
}

impl FencedStore {
    /// Writes to `inner` fenced by `term`.
    #[must_use]
    pub fn new(inner: Arc<dyn Store>, term: Term, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            term,
            metrics,
        }
    }

    async fn write(&self, op: FencedOp) -> StoreResult<FencedOutcome> {
        let result = self.inner.fenced_write(&self.term.fence, op).await;
        if let Err(StoreError::Fenced { current, .. }) = &result {
            self.metrics.fenced_write();
            if !self.term.was_fenced() {
                tracing::warn!(
                    token = self.term.token(),
                    leader_key_revision = current,
                    "a write was fenced off: another replica leads now; stopping this replica's writers"
                );
            }
            self.term.depose();
        }
        result
    }
}

/// The answer of a fenced write that is not the shape its operation gives.
fn mismatch(op: &str, outcome: &FencedOutcome) -> StoreError {
    StoreError::Backend(format!("the store answered a fenced {op} with {outcome:?}"))
}

#[async_trait::async_trait]
impl Store for FencedStore {
    async fn get(&self, key: &[u8]) -> StoreResult<Option<KeyValue>> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &[u8]) -> StoreResult<ListResult> {
        self.inner.list(prefix).await
    }

    async fn put(
        &self,
        key: &[u8],
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> StoreResult<Revision> {
        let op = FencedOp::Put {
            key: key.to_vec(),
            value,
            lease,
        };
        match self.write(op).await? {
            FencedOutcome::Put(revision) => Ok(revision),
            other => Err(mismatch("put", &other)),
        }
    }

    async fn delete(&self, key: &[u8]) -> StoreResult<Option<Revision>> {
        match self.write(FencedOp::Delete { key: key.to_vec() }).await? {
            FencedOutcome::Delete(revision) => Ok(revision),
            other => Err(mismatch("delete", &other)),
        }
    }

    async fn delete_prefix(&self, prefix: &[u8]) -> StoreResult<u64> {
        let op = FencedOp::DeletePrefix {
            prefix: prefix.to_vec(),
        };
        match self.write(op).await? {
            FencedOutcome::DeletePrefix(count) => Ok(count),
            other => Err(mismatch("delete_prefix", &other)),
        }
    }

    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected_mod_revision: Revision,
        write: CasWrite,
    ) -> StoreResult<CasOutcome> {
        let op = FencedOp::CompareAndSwap {
            key: key.to_vec(),
            expected_mod_revision,
            write,
        };
        match self.write(op).await? {
            FencedOutcome::CompareAndSwap(outcome) => Ok(outcome),
            other => Err(mismatch("compare_and_swap", &other)),
        }
    }

    /// Only the term's own fence can be combined with the term: a write guarded by another
    /// fence as well cannot be expressed as one fenced write, and is refused.
    async fn fenced_write(&self, fence: &Fence, op: FencedOp) -> StoreResult<FencedOutcome> {
        if *fence != self.term.fence {
            return Err(StoreError::Backend(
                "a fenced store's writes carry the term's fence only; another fence cannot be added"
                    .to_owned(),
            ));
        }
        self.write(op).await
    }

    async fn watch(&self, prefix: &[u8], from_revision: Revision) -> StoreResult<WatchStream> {
        self.inner.watch(prefix, from_revision).await
    }

    async fn grant_lease(&self, ttl: Duration) -> StoreResult<LeaseId> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> StoreResult<Duration> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> StoreResult<()> {
        self.inner.revoke_lease(lease).await
    }

    async fn current_revision(&self) -> StoreResult<Revision> {
        self.inner.current_revision().await
    }

    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        self.inner.compact(revision).await
    }
}

/// The lease as its refresher last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseHealth {
    /// The store holds the lease at least until then (the last successful refresh was
    /// sent at `until - ttl`).
    ValidUntil(Instant),
    /// The store answered that the lease is gone.
    Expired,
}

/// A replica's lease and the task refreshing it.
struct Session {
    lease: LeaseId,
    health: watch::Receiver<LeaseHealth>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

impl Session {
    async fn open(store: &Arc<dyn Store>, config: &ElectionConfig) -> StoreResult<Session> {
        let sent = Instant::now();
        let lease = store.grant_lease(config.lease_ttl).await?;
        let (tx, health) = watch::channel(LeaseHealth::ValidUntil(sent + config.lease_ttl));
        let refresher = tokio::spawn(refresh(
            Arc::clone(store),
            lease,
            config.refresh_interval(),
            tx,
        ));
        Ok(Session {
            lease,
            health,
            refresher,
        })
    }

    fn expired(&self) -> bool {
        *self.health.borrow() == LeaseHealth::Expired
    }

    /// When a leader holding this lease must have stepped down: the margin before the
    /// earliest moment the store may expire the lease.
    fn step_down_at(&self, config: &ElectionConfig) -> Instant {
        match *self.health.borrow() {
            LeaseHealth::ValidUntil(until) => until
                .checked_sub(config.step_down_margin())
                .unwrap_or(until),
            LeaseHealth::Expired => Instant::now(),
        }
    }
}

/// Refreshes `lease` every `interval` (sooner after a failure) until the store says it is
/// gone, publishing how long it is known to live.
async fn refresh(
    store: Arc<dyn Store>,
    lease: LeaseId,
    interval: Duration,
    health: watch::Sender<LeaseHealth>,
) {
    let mut next = Instant::now() + interval;
    let mut failing = false;
    loop {
        tokio::time::sleep_until(next).await;
        let sent = Instant::now();
        match tokio::time::timeout(interval, store.keep_alive(lease)).await {
            Ok(Ok(ttl)) => {
                if failing {
                    tracing::info!(lease, "lease refresh works again");
                    failing = false;
                }
                health.send_replace(LeaseHealth::ValidUntil(sent + ttl));
                next = sent + interval;
            }
            Ok(Err(StoreError::LeaseNotFound(_))) => {
                tracing::warn!(lease, "the election lease expired in the store");
                health.send_replace(LeaseHealth::Expired);
                return;
            }
            outcome => {
                if !failing {
                    let error = match outcome {
                        Ok(Err(error)) => error.to_string(),
                        _ => format!("no answer within {interval:?}"),
                    };
                    tracing::warn!(lease, %error, "refreshing the election lease failed; retrying");
                    failing = true;
                }
                next = Instant::now() + interval / 3;
            }
        }
    }
}

/// Result of one campaign.
enum Campaign {
    /// This replica holds the key; the term's token.
    Won(Revision),
    /// Another replica holds it (as listed at `revision`).
    Lost {
        holder: KeyValue,
        revision: Revision,
    },
}

/// Why a term or a follow phase ended.
enum PhaseEnd {
    /// The server is stopping.
    Shutdown,
    /// The session's lease is gone: a new one is needed.
    SessionLost,
    /// Campaign (again): the key may be free.
    Campaign,
    /// The writers stopped by themselves: campaign again after a pause, so that writers
    /// that keep ending do not restart in a tight loop.
    CampaignLater,
}

/// One replica's participation in the election. Build with [`Election::new`], watch with
/// [`Election::status`], drive with [`Election::run`].
pub struct Election {
    store: Arc<dyn Store>,
    config: ElectionConfig,
    key: String,
    metrics: Arc<Metrics>,
    state: watch::Sender<LeaderState>,
    /// The once-per-process takeover of a key holding our own name is spent.
    took_over_own_name: bool,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election")
            .field("config", &self.config)
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Election {
    /// An election over `store` as `config` says.
    #[must_use]
    pub fn new(store: Arc<dyn Store>, config: ElectionConfig, metrics: Arc<Metrics>) -> Self {
        let (state, _) = watch::channel(LeaderState::default());
        metrics.set_leader(false);
        Self {
            store,
            key: leader_key(&config.cluster),
            config,
            metrics,
            state,
            took_over_own_name: false,
        }
    }

    /// A view of this replica's election state.
    #[must_use]
    pub fn status(&self) -> LeaderStatus {
        LeaderStatus {
            rx: self.state.subscribe(),
        }
    }

    /// Takes part in the election until `shutdown`. Each time this replica wins, `lead` is
    /// called with the new [`Term`] and its future runs (spawned) until it returns; it
    /// must stop its writers when [`Term::ended`] is cancelled. A term ends on shutdown,
    /// when the replica is deposed or may have lost its lease, or when `lead`'s future
    /// returns by itself. On shutdown the writers are stopped first, then the lease is
    /// revoked, so that another replica takes over at once.
    pub async fn run<F, Fut>(mut self, shutdown: CancellationToken, mut lead: F)
    where
        F: FnMut(Term) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut session: Option<Session> = None;
        let mut pause = Duration::from_millis(100);
        let max_pause = self.config.lease_ttl.min(Duration::from_secs(5));
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if session.as_ref().is_some_and(Session::expired) {
                session = None;
            }
            if session.is_none() {
                let opened = tokio::select! {
                    () = shutdown.cancelled() => break,
                    opened = Session::open(&self.store, &self.config) => opened,
                };
                match opened {
                    Ok(s) => {
                        tracing::debug!(lease = s.lease, "election lease granted");
                        session = Some(s);
                    }
                    Err(error) => {
                        self.problem(&error, pause);
                        if !sleep_or_shutdown(pause, &shutdown).await {
                            break;
                        }
                        pause = (pause * 2).min(max_pause);
                        continue;
                    }
                }
            }
            let Some(current) = session.as_ref() else {
                continue;
            };
            let campaign = tokio::select! {
                () = shutdown.cancelled() => break,
                campaign = self.campaign(current.lease) => campaign,
            };
            let end = match campaign {
                Ok(Campaign::Won(token)) => {
                    pause = Duration::from_millis(100);
                    self.lead(current, token, &shutdown, &mut lead).await
                }
                Ok(Campaign::Lost { holder, revision }) => {
                    pause = Duration::from_millis(100);
                    self.follow(current, holder, revision, &shutdown).await
                }
                Err(StoreError::LeaseNotFound(_)) => PhaseEnd::SessionLost,
                Err(error) => {
                    self.problem(&error, pause);
                    if !sleep_or_shutdown(pause, &shutdown).await {
                        break;
                    }
                    pause = (pause * 2).min(max_pause);
                    PhaseEnd::Campaign
                }
            };
            match end {
                PhaseEnd::Shutdown => break,
                PhaseEnd::SessionLost => session = None,
                PhaseEnd::Campaign => {}
                PhaseEnd::CampaignLater => {
                    if !sleep_or_shutdown(self.config.refresh_interval(), &shutdown).await {
                        break;
                    }
                }
            }
        }
        if let Some(session) = session.take() {
            // Resign: the key goes with the lease, and a follower campaigns at once.
            match tokio::time::timeout(
                self.config.lease_ttl,
                self.store.revoke_lease(session.lease),
            )
            .await
            {
                Ok(Ok(())) | Ok(Err(StoreError::LeaseNotFound(_))) => {
                    tracing::info!(replica = %self.config.replica, "left the election (lease revoked)");
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "revoking the election lease failed; it expires by itself");
                }
                Err(_) => {
                    tracing::warn!("revoking the election lease timed out; it expires by itself");
                }
            }
        }
        self.state.send_modify(|s| {
            s.is_leader = false;
        });
    }

    /// Records that the store cannot be used right now.
    fn problem(&self, error: &StoreError, retry_in: Duration) {
        let text = error.to_string();
        let news = self.state.borrow().problem.as_deref() != Some(text.as_str());
        if news {
            tracing::warn!(%error, ?retry_in, "leader election: the store does not answer; retrying");
        }
        self.state.send_modify(|s| s.problem = Some(text));
    }

    /// Tries to take the leader key; who holds it otherwise.
    async fn campaign(&mut self, lease: LeaseId) -> StoreResult<Campaign> {
        let me = self.config.replica.as_bytes();
        loop {
            let list = self.store.list(self.key.as_bytes()).await?;
            let current = list
                .kvs
                .into_iter()
                .find(|kv| kv.key == self.key.as_bytes());
            let expected = match &current {
                None => 0,
                // Ours from an earlier term of this process (we stepped down while the
                // lease lived on): rewritten, which starts a new term and fences the old.
                Some(kv) if kv.value == me && kv.lease == Some(lease) => kv.mod_revision,
                Some(kv) if kv.value == me && !self.took_over_own_name => {
                    tracing::info!(
                        replica = %self.config.replica,
                        "the leader key holds this replica's name from a previous process; taking it over"
                    );
                    kv.mod_revision
                }
                Some(kv) => {
                    if kv.value == me {
                        tracing::error!(
                            replica = %self.config.replica,
                            "another replica uses this replica's name and holds the leader key; \
                             replica names must be unique (--replica-name); following it"
                        );
                    }
                    self.took_over_own_name = true;
                    return Ok(Campaign::Lost {
                        holder: kv.clone(),
                        revision: list.revision,
                    });
                }
            };
            let write = CasWrite::Put {
                value: me.to_vec(),
                lease: Some(lease),
            };
            match self
                .store
                .compare_and_swap(self.key.as_bytes(), expected, write)
                .await?
            {
                CasOutcome::Succeeded { revision } => {
                    self.took_over_own_name = true;
                    return Ok(Campaign::Won(revision));
                }
                // Someone else moved first: look again.
                CasOutcome::Failed { .. } => {}
            }
        }
    }

    /// Leads one term: runs `lead` until the term ends, then stops the writers.
    async fn lead<F, Fut>(
        &self,
        session: &Session,
        token: Revision,
        shutdown: &CancellationToken,
        lead: &mut F,
    ) -> PhaseEnd
    where
        F: FnMut(Term) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let term = Term::new(self.key.as_bytes(), token);
        self.state.send_modify(|s| {
            s.is_leader = true;
            s.holder = Some(self.config.replica.clone());
            s.token = token;
            s.terms_won += 1;
            s.problem = None;
        });
        self.metrics.leader_term_won();
        self.metrics.set_leader(true);
        tracing::info!(replica = %self.config.replica, token, "won the leader election; starting the writers");
        let mut running = RunningTerm {
            term: term.clone(),
            writers: tokio::spawn(lead(term.clone())),
        };
        let writers = &mut running.writers;
        let mut key_watch = self.store.watch(self.key.as_bytes(), token + 1).await.ok();
        let mut health = session.health.clone();
        let (reason, end) = loop {
            let step_down_at = session.step_down_at(&self.config);
            tokio::select! {
                () = shutdown.cancelled() => break (StepDown::Shutdown, PhaseEnd::Shutdown),
                () = term.ended().cancelled() => {
                    break if term.was_fenced() {
                        (StepDown::Fenced, PhaseEnd::Campaign)
                    } else {
                        (StepDown::WritersStopped, PhaseEnd::CampaignLater)
                    };
                }
                _ = &mut *writers => break (StepDown::WritersStopped, PhaseEnd::CampaignLater),
                () = tokio::time::sleep_until(step_down_at) => {
                    break if session.expired() {
                        (StepDown::LeaseExpired, PhaseEnd::SessionLost)
                    } else {
                        (StepDown::LostContact, PhaseEnd::Campaign)
                    };
                }
                changed = health.changed() => {
                    if changed.is_err() || session.expired() {
                        break (StepDown::LeaseExpired, PhaseEnd::SessionLost);
                    }
                }
                event = next_key_event(&self.key, &mut key_watch) => match event {
                    KeyEvent::Changed(kv) if kv.mod_revision != token => {
                        break (StepDown::Deposed, PhaseEnd::Campaign);
                    }
                    KeyEvent::Changed(_) => {}
                    KeyEvent::Deleted => break (StepDown::Deposed, PhaseEnd::Campaign),
                    KeyEvent::Broken => {
                        // Reopen from the token: a change meanwhile is seen then (or,
                        // if compacted, the term is checked by the next campaign).
                        key_watch = match self.store.watch(self.key.as_bytes(), token + 1).await {
                            Ok(stream) => Some(stream),
                            Err(_) => break (StepDown::LostContact, PhaseEnd::Campaign),
                        };
                    }
                    KeyEvent::Other => {}
                },
            }
        };
        term.ended().cancel();
        if !writers.is_finished() {
            // The writers stop at their next await point. Writers cut off from the store
            // are aborted at once; others get half the margin to finish what they are
            // doing, so the role is given up well before the lease can expire. A write
            // already sent is fenced if it arrives after another replica won.
            let grace = match reason {
                StepDown::LostContact | StepDown::LeaseExpired => Duration::ZERO,
                _ => self.config.step_down_margin() / 2,
            };
            if tokio::time::timeout(grace, &mut *writers).await.is_err() {
                writers.abort();
                let _ = writers.await;
            }
        }
        self.metrics.set_leader(false);
        self.metrics.leader_step_down(reason);
        self.state.send_modify(|s| {
            s.is_leader = false;
        });
        tracing::info!(replica = %self.config.replica, token, reason = reason.as_str(), "left the leader role; writers stopped");
        end
    }

    /// Follows `holder` until the key is free (or changes hands), the session is lost,
    /// or shutdown.
    async fn follow(
        &self,
        session: &Session,
        holder: KeyValue,
        revision: Revision,
        shutdown: &CancellationToken,
    ) -> PhaseEnd {
        let name = String::from_utf8_lossy(&holder.value).into_owned();
        tracing::info!(replica = %self.config.replica, leader = %name, token = holder.mod_revision, "following");
        self.state.send_modify(|s| {
            s.is_leader = false;
            s.holder = Some(name);
            s.token = holder.mod_revision;
            s.problem = None;
        });
        let opened = tokio::select! {
            () = shutdown.cancelled() => return PhaseEnd::Shutdown,
            opened = self.store.watch(self.key.as_bytes(), revision + 1) => opened,
        };
        let Ok(stream) = opened else {
            return PhaseEnd::Campaign;
        };
        let mut key_watch = Some(stream);
        let mut health = session.health.clone();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return PhaseEnd::Shutdown,
                changed = health.changed() => {
                    if changed.is_err() || session.expired() {
                        return PhaseEnd::SessionLost;
                    }
                }
                event = next_key_event(&self.key, &mut key_watch) => match event {
                    KeyEvent::Deleted => {
                        self.state.send_modify(|s| {
                            s.holder = None;
                            s.token = 0;
                        });
                        return PhaseEnd::Campaign;
                    }
                    KeyEvent::Changed(kv) => {
                        let name = String::from_utf8_lossy(&kv.value).into_owned();
                        tracing::info!(leader = %name, token = kv.mod_revision, "the leader changed");
                        self.state.send_modify(|s| {
                            s.holder = Some(name);
                            s.token = kv.mod_revision;
                        });
                    }
                    KeyEvent::Broken => return PhaseEnd::Campaign,
                    KeyEvent::Other => {}
                },
            }
        }
    }
}

/// A term and its writers: if the election is dropped mid-term (its task aborted, the
/// process going away) the term ends and the writers are aborted with it.
struct RunningTerm {
    term: Term,
    writers: tokio::task::JoinHandle<()>,
}

impl Drop for RunningTerm {
    fn drop(&mut self) {
        self.term.ended.cancel();
        self.writers.abort();
    }
}

/// What the watch of the leader key reported.
enum KeyEvent {
    /// The key was written.
    Changed(KeyValue),
    /// The key was deleted.
    Deleted,
    /// The watch failed or ended.
    Broken,
    /// An event of another key under the same prefix (a cluster whose name extends ours).
    Other,
}

/// The next event of `watch` for `key` (pending forever without a watch).
async fn next_key_event(key: &str, watch: &mut Option<WatchStream>) -> KeyEvent {
    let Some(stream) = watch.as_mut() else {
        return std::future::pending().await;
    };
    match stream.next().await {
        // The watch is a prefix watch: another cluster's key may match too.
        Some(Ok(event)) if event.kv.key != key.as_bytes() => KeyEvent::Other,
        Some(Ok(event)) => match event.kind {
            EventKind::Put => KeyEvent::Changed(event.kv),
            EventKind::Delete => KeyEvent::Deleted,
        },
        Some(Err(_)) | None => {
            *watch = None;
            KeyEvent::Broken
        }
    }
}

/// Sleeps `pause`; false when `shutdown` came first.
async fn sleep_or_shutdown(pause: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(pause) => true,
    }
}
