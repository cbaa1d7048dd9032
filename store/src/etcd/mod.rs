//! The etcd backend: [`EtcdStore`] implements [`Store`] on an external etcd (v3 API)
//! through `etcd-client`.
//!
//! The store contract is etcd's own model, so most operations map one to one:
//! compare-and-swap is a `Txn` comparing `mod_revision` (`version == 0` for "absent"),
//! `delete_prefix` is one `DeleteRange` (one revision), leases are etcd leases (etcd's
//! minimum TTL is about 1.5 s, shorter TTLs are rounded up by the server). Watches resume
//! transparently after a broken stream (see [`watch`]), and etcd's compaction reports
//! become [`StoreError::Compacted`].
//!
//! Revisions are etcd's: a fresh etcd is at revision 1, so the first write is revision 2.
//!
//! etcd's default request limit (`--max-request-bytes`, 1.5 MiB) is the limit for the whole
//! request, so a value of exactly [`MAX_VALUE_SIZE`] needs etcd started with a slightly
//! higher limit (2 MiB is enough); oversized values are rejected here before sending.

mod config;
mod convert;
mod tls_probe;
mod watch;

pub use config::{EtcdConfig, EtcdTls};

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::proto::{PbResponseOp, PbTxnOpResponse};
use etcd_client::{
    Certificate, Client, CompactionOptions, Compare, CompareOp, ConnectOptions, DeleteOptions,
    GetOptions, Identity, KvClient, LeaseClient, PutOptions, TlsOptions, Txn, TxnOp, WatchClient,
};

use crate::{
    CasOutcome, CasWrite, Fence, FencedOp, FencedOutcome, KeyValue, LeaseId, ListResult, Result,
    Revision, Store, StoreError, WatchStream, MAX_VALUE_SIZE,
};
use config::retry_delays;
use convert::{condition, etcd_lease, etcd_revision, key_value, prefix_range, revision, Condition};

/// Largest gRPC message the client decodes (list pages, watch responses). etcd's own send
/// limit is far higher; 64 MiB leaves room for pages of large values.
const MAX_DECODING_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Keys per `Range` request when listing; the page shrinks when a page is too big to decode.
const LIST_PAGE: i64 = 5_000;

/// Why [`EtcdStore::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdConnectError {
    /// The configuration has no endpoints.
    #[error(
        "no etcd endpoints configured; give at least one client URL such as http://127.0.0.1:2379"
    )]
    NoEndpoints,
    /// A TLS file could not be read.
    #[error("cannot read etcd TLS file {path}: {source}; check the path and its permissions")]
    TlsFile {
        /// The file.
        path: String,
        /// Why reading it failed.
        #[source]
        source: std::io::Error,
    },
    /// The endpoints or TLS options were rejected by the client library.
    #[error("invalid etcd client configuration for {endpoints}: {detail}")]
    InvalidConfig {
        /// The configured endpoints.
        endpoints: String,
        /// What the client library reported.
        detail: String,
    },
    /// etcd refused the TLS handshake (its alert, e.g. `BadCertificate` for a client
    /// certificate it does not trust), or its certificate failed our verification.
    /// Retrying cannot help, so connecting stops at the first such answer.
    #[error("TLS with etcd at {endpoint} failed: {reason}")]
    TlsRefused {
        /// The endpoint that refused.
        endpoint: String,
        /// etcd's alert or our verification error, as rustls reports it.
        reason: String,
    },
    /// etcd did not answer before the connect deadline.
    #[error("etcd at {endpoints} not reachable after {attempts} attempts over {waited:?} (last error: {last_error}); check that etcd runs and the endpoints and TLS settings are right")]
    Unreachable {
        /// The configured endpoints.
        endpoints: String,
        /// Connection attempts made.
        attempts: u32,
        /// Time spent trying.
        waited: Duration,
        /// The error of the last attempt.
        last_error: String,
    },
}

/// A [`Store`] backed by an external etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
    config: EtcdConfig,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.config.endpoints)
            .field("tls", &self.config.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd, retrying with backoff (one `warn` line per failed attempt) until
    /// etcd answers or [`EtcdConfig::connect_deadline`] passes.
    pub async fn connect(config: EtcdConfig) -> Result<Self, EtcdConnectError> {
        if config.endpoints.is_empty() {
            return Err(EtcdConnectError::NoEndpoints);
        }
        let options = connect_options(&config)?;
        let probe = match &config.tls {
            Some(tls) => Some(TlsProbe {
                client: Arc::new(tls_probe::client_config(tls)?),
                server_name: tls.server_name.clone(),
            }),
            None => None,
        };
        let endpoints = config.endpoints_display();
        let started = Instant::now();
        let mut delays = retry_delays(config.initial_backoff, config.max_backoff);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let last_error = match try_connect(&config, options.clone()).await {
                Ok(client) => {
                    tracing::info!(%endpoints, attempts, "connected to etcd");
                    return Ok(Self::from_client(&client, config));
                }
                Err(TryConnect::Fatal(detail)) => {
                    return Err(EtcdConnectError::InvalidConfig { endpoints, detail });
                }
                Err(TryConnect::Retry(last_error)) => last_error,
            };
            if let Some(probe) = &probe {
                if let Some((endpoint, reason)) = probe.refusal(&config).await {
                    tracing::error!(%endpoint, %reason, "etcd refused the TLS handshake");
                    return Err(EtcdConnectError::TlsRefused { endpoint, reason });
                }
            }
            let waited = started.elapsed();
            let delay = delays.next().unwrap_or(config.max_backoff);
            if waited + delay > config.connect_deadline {
                tracing::error!(%endpoints, attempts, ?waited, error = %last_error,
                    "etcd not reachable, giving up");
                return Err(EtcdConnectError::Unreachable {
                    endpoints,
                    attempts,
                    waited,
                    last_error,
                });
            }
            tracing::warn!(%endpoints, attempts, error = %last_error,
                "etcd at {endpoints} not reachable, retrying in {delay:?}");
            tokio::time::sleep(delay).await;
        }
    }

    fn from_client(client: &Client, config: EtcdConfig) -> Self {
        Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
            lease: client.lease_client(),
            config,
        }
    }

    /// One linearizable `Range` over `[start, end)` at `revision` (0 = latest).
    async fn range_page(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        revision: i64,
        limit: i64,
    ) -> std::result::Result<etcd_client::GetResponse, etcd_client::Error> {
        let options = GetOptions::new()
            .with_range(end)
            .with_limit(limit)
            .with_revision(revision);
        self.kv.clone().get(start, Some(options)).await
    }
}

/// What [`tls_probe`] needs, built once per [`EtcdStore::connect`].
struct TlsProbe {
    client: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
}

impl TlsProbe {
    /// The first endpoint that refuses TLS and why, unless some endpoint accepts it (then
    /// the failure was not TLS) or none gives a verdict.
    async fn refusal(&self, config: &EtcdConfig) -> Option<(String, String)> {
        let timeout = config.request_timeout.min(Duration::from_secs(5));
        let mut refused = None;
        for endpoint in &config.endpoints {
            let verdict = tls_probe::probe(
                endpoint,
                Arc::clone(&self.client),
                self.server_name.as_deref(),
                timeout,
            )
            .await;
            match verdict {
                tls_probe::Probe::Accepted => return None,
                tls_probe::Probe::Refused(reason) => {
                    refused.get_or_insert((endpoint.clone(), reason));
                }
                tls_probe::Probe::Inconclusive => {}
            }
        }
        refused
    }
}

/// Outcome of one connection attempt.
enum TryConnect {
    /// Configuration problem: retrying cannot help.
    Fatal(String),
    /// etcd did not answer; retry.
    Retry(String),
}

async fn try_connect(
    config: &EtcdConfig,
    options: ConnectOptions,
) -> std::result::Result<Client, TryConnect> {
    let mut client = match Client::connect(&config.endpoints, Some(options)).await {
        Ok(client) => client,
        Err(err @ (etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_))) => {
            return Err(TryConnect::Fatal(err.to_string()))
        }
        Err(err) => return Err(TryConnect::Retry(err.to_string())),
    };
    // The channel connects lazily; a status call proves etcd answers (and TLS works).
    match tokio::time::timeout(config.request_timeout, client.status()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(err)) => Err(TryConnect::Retry(err.to_string())),
        Err(_) => Err(TryConnect::Retry(format!(
            "no answer within {:?}",
            config.request_timeout
        ))),
    }
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, EtcdConnectError> {
    std::fs::read(path).map_err(|source| EtcdConnectError::TlsFile {
        path: path.display().to_string(),
        source,
    })
}

fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions, EtcdConnectError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.request_timeout.min(Duration::from_secs(5)))
        .with_timeout(config.request_timeout)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    if let Some(tls) = &config.tls {
        let mut tls_options =
            TlsOptions::new().ca_certificate(Certificate::from_pem(read_file(&tls.ca_file)?));
        if let Some((cert, key)) = &tls.client_identity {
            tls_options =
                tls_options.identity(Identity::from_pem(read_file(cert)?, read_file(key)?));
        }
        if let Some(name) = &tls.server_name {
            tls_options = tls_options.domain_name(name.clone());
        }
        options = options.with_tls(tls_options);
    }
    Ok(options)
}

fn check_size(key: &[u8], value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_SIZE {
        return Err(StoreError::ValueTooLarge {
            key: String::from_utf8_lossy(key).into_owned(),
            size: value.len(),
            max: MAX_VALUE_SIZE,
        });
    }
    Ok(())
}

fn header_revision(header: Option<&etcd_client::proto::PbResponseHeader>) -> Revision {
    header.map_or(0, |h| revision(h.revision))
}

/// The comparison "`key`'s `mod_revision` is `expected`" (`0`: the key is absent).
fn mod_revision_is(key: &[u8], expected: Revision) -> Compare {
    if expected == 0 {
        Compare::version(key, CompareOp::Equal, 0)
    } else {
        Compare::mod_revision(key, CompareOp::Equal, etcd_revision(expected))
    }
}

/// The txn operation of a compare-and-swap's write, and the lease it binds.
fn cas_op(key: &[u8], write: CasWrite) -> Result<(TxnOp, Option<LeaseId>)> {
    Ok(match write {
        CasWrite::Put { value, lease } => {
            check_size(key, &value)?;
            let mut options = PutOptions::new();
            if let Some(id) = lease {
                options = options.with_lease(etcd_lease(id)?);
            }
            (TxnOp::put(key, value, Some(options)), lease)
        }
        CasWrite::Delete => (TxnOp::delete(key, None), None),
    })
}

/// Which write a fenced txn carries, to read its answer.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Put,
    Delete,
    DeletePrefix,
    CompareAndSwap,
}

/// The first key of a txn's `index`-th response, if it is a range response with a key.
fn txn_range_kv(responses: &[PbResponseOp], index: usize) -> Option<KeyValue> {
    match responses.get(index).and_then(|op| op.response.as_ref()) {
        Some(PbTxnOpResponse::ResponseRange(range)) => range.kvs.first().cloned().map(key_value),
        _ => None,
    }
}

/// Maps an error of an operation that used `lease`.
fn lease_error(op: &str, lease: LeaseId, err: etcd_client::Error) -> StoreError {
    if condition(&err) == Condition::LeaseNotFound {
        StoreError::LeaseNotFound(lease)
    } else {
        convert::store_error(op, err)
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        let resp = self
            .kv
            .clone()
            .get(key, None)
            .await
            .map_err(|e| convert::store_error("get", e))?;
        Ok(resp.0.kvs.into_iter().next().map(key_value))
    }

    async fn list(&self, prefix: &[u8]) -> Result<ListResult> {
        let (mut start, end) = prefix_range(prefix);
        let mut kvs = Vec::new();
        let mut at = 0i64;
        let mut limit = LIST_PAGE;
        loop {
            let resp = match self.range_page(start.clone(), end.clone(), at, limit).await {
                Ok(resp) => resp,
                Err(etcd_client::Error::GRpcStatus(status))
                    if status.code() == tonic::Code::OutOfRange
                        && status.message().contains("message length too large")
                        && limit > 1 =>
                {
                    limit = (limit / 4).max(1);
                    tracing::debug!(limit, "list page too large to decode, shrinking the page");
                    continue;
                }
                Err(err) if at != 0 && condition(&err) == Condition::Compacted => {
                    // Compacted between pages: start over at the newest revision.
                    tracing::debug!(at, "list revision compacted between pages, restarting");
                    (start, _) = prefix_range(prefix);
                    kvs.clear();
                    at = 0;
                    continue;
                }
                Err(err) => return Err(convert::store_error("list", err)),
            };
            if at == 0 {
                at = resp.0.header.as_ref().map_or(0, |h| h.revision);
            }
            let more = resp.0.more;
            let page = resp.0.kvs;
            let Some(last) = page.last() else { break };
            let mut next = last.key.clone();
            next.push(0);
            kvs.extend(page.into_iter().map(key_value));
            if !more {
                break;
            }
            start = next;
        }
        Ok(ListResult {
            kvs,
            revision: revision(at),
        })
    }

    async fn put(&self, key: &[u8], value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        check_size(key, &value)?;
        let mut options = PutOptions::new();
        if let Some(id) = lease {
            options = options.with_lease(etcd_lease(id)?);
        }
        let resp = self
            .kv
            .clone()
            .put(key, value, Some(options))
            .await
            .map_err(|e| match lease {
                Some(id) => lease_error("put", id, e),
                None => convert::store_error("put", e),
            })?;
        Ok(header_revision(resp.0.header.as_ref()))
    }

    async fn delete(&self, key: &[u8]) -> Result<Option<Revision>> {
        let resp = self
            .kv
            .clone()
            .delete(key, None)
            .await
            .map_err(|e| convert::store_error("delete", e))?;
        Ok((resp.0.deleted > 0).then(|| header_revision(resp.0.header.as_ref())))
    }

    async fn delete_prefix(&self, prefix: &[u8]) -> Result<u64> {
        let (start, end) = prefix_range(prefix);
        let resp = self
            .kv
            .clone()
            .delete(start, Some(DeleteOptions::new().with_range(end)))
            .await
            .map_err(|e| convert::store_error("delete_prefix", e))?;
        Ok(u64::try_from(resp.0.deleted).unwrap_or_default())
    }

    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected_mod_revision: Revision,
        write: CasWrite,
    ) -> Result<CasOutcome> {
        let compare = mod_revision_is(key, expected_mod_revision);
        let (op, lease) = cas_op(key, write)?;
        let txn = Txn::new()
            .when([compare])
            .and_then([op])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.kv.clone().txn(txn).await.map_err(|e| match lease {
            Some(id) => lease_error("compare_and_swap", id, e),
            None => convert::store_error("compare_and_swap", e),
        })?;
        if resp.0.succeeded {
            return Ok(CasOutcome::Succeeded {
                revision: header_revision(resp.0.header.as_ref()),
            });
        }
        let current = resp
            .0
            .responses
            .into_iter()
            .find_map(|op| match op.response {
                Some(PbTxnOpResponse::ResponseRange(range)) => Some(range.kvs),
                _ => None,
            })
            .and_then(|kvs| kvs.into_iter().next())
            .map(key_value);
        Ok(CasOutcome::Failed { current })
    }

    async fn fenced_write(&self, fence: &Fence, op: FencedOp) -> Result<FencedOutcome> {
        // when: the fence (and a CAS's own comparison); then: the write;
        // else: read the fence key (and the CAS key) to tell the two failures apart.
        let mut compares = vec![mod_revision_is(&fence.key, fence.mod_revision)];
        let mut otherwise = vec![TxnOp::get(fence.key.clone(), None)];
        let (write, lease, shape) = match op {
            FencedOp::Put { key, value, lease } => {
                check_size(&key, &value)?;
                let mut options = PutOptions::new();
                if let Some(id) = lease {
                    options = options.with_lease(etcd_lease(id)?);
                }
                (TxnOp::put(key, value, Some(options)), lease, Shape::Put)
            }
            FencedOp::Delete { key } => (TxnOp::delete(key, None), None, Shape::Delete),
            FencedOp::DeletePrefix { prefix } => {
                let (start, end) = prefix_range(&prefix);
                let options = DeleteOptions::new().with_range(end);
                (
                    TxnOp::delete(start, Some(options)),
                    None,
                    Shape::DeletePrefix,
                )
            }
            FencedOp::CompareAndSwap {
                key,
                expected_mod_revision,
                write,
            } => {
                compares.push(mod_revision_is(&key, expected_mod_revision));
                otherwise.push(TxnOp::get(key.clone(), None));
                let (op, lease) = cas_op(&key, write)?;
                (op, lease, Shape::CompareAndSwap)
            }
        };
        let txn = Txn::new()
            .when(compares)
            .and_then([write])
            .or_else(otherwise);
        let resp = self.kv.clone().txn(txn).await.map_err(|e| match lease {
            Some(id) => lease_error("fenced_write", id, e),
            None => convert::store_error("fenced_write", e),
        })?;
        let revision = header_revision(resp.0.header.as_ref());
        let responses = resp.0.responses;
        if !resp.0.succeeded {
            let fence_now = txn_range_kv(&responses, 0).map_or(0, |kv| kv.mod_revision);
            if fence_now != fence.mod_revision {
                return Err(StoreError::Fenced {
                    key: String::from_utf8_lossy(&fence.key).into_owned(),
                    expected: fence.mod_revision,
                    current: fence_now,
                });
            }
            // The fence held, so the CAS comparison failed.
            return Ok(FencedOutcome::CompareAndSwap(CasOutcome::Failed {
                current: txn_range_kv(&responses, 1),
            }));
        }
        let deleted = match responses.into_iter().next().and_then(|op| op.response) {
            Some(PbTxnOpResponse::ResponseDeleteRange(del)) => {
                u64::try_from(del.deleted).unwrap_or_default()
            }
            _ => 0,
        };
        Ok(match shape {
            Shape::Put => FencedOutcome::Put(revision),
            Shape::Delete => FencedOutcome::Delete((deleted > 0).then_some(revision)),
            Shape::DeletePrefix => FencedOutcome::DeletePrefix(deleted),
            Shape::CompareAndSwap => {
                FencedOutcome::CompareAndSwap(CasOutcome::Succeeded { revision })
            }
        })
    }

    async fn watch(&self, prefix: &[u8], from_revision: Revision) -> Result<WatchStream> {
        watch::open(self, prefix, from_revision).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        // etcd counts TTLs in whole seconds; round up so a lease never lives shorter.
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let secs = i64::try_from(secs.max(1)).unwrap_or(i64::MAX);
        let resp = self
            .lease
            .clone()
            .grant(secs, None)
            .await
            .map_err(|e| convert::store_error("lease grant", e))?;
        if !resp.0.error.is_empty() {
            return Err(StoreError::Backend(format!(
                "etcd lease grant failed: {}",
                resp.0.error
            )));
        }
        LeaseId::try_from(resp.0.id).map_err(|_| {
            StoreError::Backend(format!("etcd granted an invalid lease id {}", resp.0.id))
        })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let id = etcd_lease(lease)?;
        // `keep_alive` sends one refresh and fails if etcd answers TTL 0 (unknown lease);
        // one more round trip on the same stream reports the TTL.
        let (mut keeper, mut stream) = self
            .lease
            .clone()
            .keep_alive(id)
            .await
            .map_err(|e| lease_error("lease keep-alive", lease, e))?;
        keeper
            .keep_alive()
            .await
            .map_err(|e| lease_error("lease keep-alive", lease, e))?;
        let resp = stream
            .message()
            .await
            .map_err(|e| lease_error("lease keep-alive", lease, e))?
            .ok_or_else(|| {
                StoreError::Unavailable("etcd closed the lease keep-alive stream".to_owned())
            })?;
        match u64::try_from(resp.0.ttl) {
            Ok(ttl) if ttl > 0 => Ok(Duration::from_secs(ttl)),
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let id = etcd_lease(lease)?;
        self.lease
            .clone()
            .revoke(id)
            .await
            .map_err(|e| lease_error("lease revoke", lease, e))?;
        Ok(())
    }

    async fn current_revision(&self) -> Result<Revision> {
        let options = GetOptions::new().with_count_only();
        let resp = self
            .kv
            .clone()
            .get(vec![0], Some(options))
            .await
            .map_err(|e| convert::store_error("current revision", e))?;
        Ok(header_revision(resp.0.header.as_ref()))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let options = CompactionOptions::new().with_physical();
        match self
            .kv
            .clone()
            .compact(etcd_revision(revision), Some(options))
            .await
        {
            Ok(_) => Ok(()),
            // Already compacted at or past `revision`: nothing left to do.
            Err(err) if condition(&err) == Condition::Compacted => Ok(()),
            Err(err) => Err(convert::store_error("compact", err)),
        }
    }
}
