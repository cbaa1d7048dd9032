//! Hot reload of CA, certificate and key files.
//!
//! Certificates are rotated by rewriting files (a Kubernetes secret update, `clustermesh`
//! re-issuing a bundle, cert-manager). [`ReloadingTls`] polls the three files and, when
//! their content changes and the new material validates, swaps in new rustls configs.
//! Only connections made after the swap use them: the transport asks for the config per
//! handshake, and an established connection holds its own `Arc` of the old one, so
//! nothing is dropped. Bad new material (corrupt PEM, a key that does not match its
//! certificate, a foreign trust domain) is logged once per distinct content and the last
//! good material stays in use; the next change is tried again. Polling by content, not
//! mtime, catches same-second rewrites and symlink swaps (Kubernetes `..data`). New
//! material must name the same identity as the material loaded at start.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{MaterialError, MeshTls, TlsError, TlsSource};
use crate::files;
use crate::identity::TrustDomain;
use crate::layout::TlsPaths;

/// Default interval between polls of the files.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// Our certificate expiring within this window is logged as a warning by the watcher.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);
/// The expiry warning is repeated at most this often.
const EXPIRY_WARNING_REPEAT: Duration = Duration::from_secs(3600);

/// What a reload attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The files are unchanged since the last good or last rejected load.
    Unchanged,
    /// New material was loaded and is used for new connections.
    Reloaded,
}

#[derive(Debug, PartialEq, Eq)]
struct Contents {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

#[derive(Debug)]
struct State {
    current: Arc<MeshTls>,
    good: Contents,
    rejected: Option<Contents>,
    /// The last read error logged, so a persistently missing file is warned about once.
    read_error: Option<String>,
}

/// TLS configs backed by files that are re-read when they change.
#[derive(Debug)]
pub struct ReloadingTls {
    paths: TlsPaths,
    trust_domain: TrustDomain,
    state: RwLock<State>,
    generation: watch::Sender<u64>,
}

impl ReloadingTls {
    /// Loads the files once; fails if the initial material is unusable (there is no
    /// last good material to fall back to).
    pub fn load(trust_domain: TrustDomain, paths: TlsPaths) -> Result<Arc<Self>, TlsError> {
        files::warn_if_exposed(&paths.key);
        let contents = read_contents(&paths)?;
        let tls = build(&trust_domain, &paths, &contents)?;
        tracing::info!(
            identity = %tls.identity(),
            cert = %paths.cert.display(),
            "loaded mesh TLS material"
        );
        Ok(Arc::new(Self {
            paths,
            trust_domain,
            state: RwLock::new(State {
                current: Arc::new(tls),
                good: contents,
                rejected: None,
                read_error: None,
            }),
            generation: watch::Sender::new(0),
        }))
    }

    /// The material in use for new connections.
    pub fn current(&self) -> Arc<MeshTls> {
        self.read_state(|s| s.current.clone())
    }

    /// How many times new material has been swapped in (0 after [`Self::load`]).
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// A receiver notified with the new generation on every successful reload (e.g. to
    /// re-dial clients when the CA bundle changes).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The watched files.
    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// Re-reads the files now. On error the previous material stays in use and the error
    /// is returned (and logged once per distinct bad content).
    pub fn reload(&self) -> Result<ReloadOutcome, TlsError> {
        let contents = match read_contents(&self.paths) {
            Ok(c) => c,
            Err(e) => {
                let message = e.to_string();
                let repeated = self.read_state(|s| s.read_error.as_deref() == Some(&message));
                if repeated {
                    tracing::debug!(error = %e, "mesh TLS files still unreadable");
                } else {
                    tracing::warn!(error = %e, "cannot read mesh TLS files; keeping the current material");
                    self.write_state(|s| s.read_error = Some(message));
                }
                return Err(e);
            }
        };
        self.write_state(|s| s.read_error = None);
        let unchanged =
            self.read_state(|s| s.good == contents || s.rejected.as_ref() == Some(&contents));
        if unchanged {
            return Ok(ReloadOutcome::Unchanged);
        }
        let current_identity = self.read_state(|s| s.current.identity().clone());
        let built = build(&self.trust_domain, &self.paths, &contents).and_then(|tls| {
            // A process is one principal for its whole life: a rotated certificate that
            // names another identity (another cluster's files copied over ours) is refused.
            if tls.identity() == &current_identity {
                Ok(tls)
            } else {
                Err(TlsError::Material {
                    origin: self.paths.describe(),
                    source: MaterialError::IdentityChanged {
                        was: Box::new(current_identity),
                        now: Box::new(tls.identity().clone()),
                    },
                })
            }
        });
        match built {
            Ok(tls) => {
                let identity = tls.identity().to_string();
                self.write_state(|s| {
                    s.current = Arc::new(tls);
                    s.good = contents;
                    s.rejected = None;
                });
                self.generation.send_modify(|g| *g += 1);
                tracing::info!(
                    %identity,
                    cert = %self.paths.cert.display(),
                    generation = self.generation(),
                    "reloaded mesh TLS material; new connections use it"
                );
                Ok(ReloadOutcome::Reloaded)
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "rejected new mesh TLS material; keeping the last good material"
                );
                self.write_state(|s| s.rejected = Some(contents));
                Err(e)
            }
        }
    }

    /// Polls the files every `interval` until the returned handle is dropped, and warns
    /// (at most hourly) when our certificate is within [`EXPIRY_WARNING`] of expiry.
    /// Must be called inside a tokio runtime.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> WatcherHandle {
        let this = Arc::clone(self);
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_expiry_warning: Option<tokio::time::Instant> = None;
            loop {
                ticker.tick().await;
                let reloader = Arc::clone(&this);
                // Errors were logged by `reload`; the next tick retries.
                if let Err(e) = tokio::task::spawn_blocking(move || reloader.reload()).await {
                    tracing::error!(error = %e, "mesh TLS reload task failed");
                }
                let due = last_expiry_warning.is_none_or(|t| t.elapsed() >= EXPIRY_WARNING_REPEAT);
                if due && this.warn_if_expiring(SystemTime::now()) {
                    last_expiry_warning = Some(tokio::time::Instant::now());
                }
            }
        });
        WatcherHandle { task }
    }

    /// Logs a warning if our certificate expires within [`EXPIRY_WARNING`] of `now`;
    /// returns whether it did.
    fn warn_if_expiring(&self, now: SystemTime) -> bool {
        let current = self.current();
        let Some(not_after) = current.not_after() else {
            return false;
        };
        let left = not_after.duration_since(now).unwrap_or(Duration::ZERO);
        if left > EXPIRY_WARNING {
            return false;
        }
        tracing::warn!(
            identity = %current.identity(),
            cert = %self.paths.cert.display(),
            remaining_secs = left.as_secs(),
            "mesh certificate expires soon (or has expired); rotate it: new connections will fail once it is invalid"
        );
        true
    }

    fn read_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        match self.state.read() {
            Ok(guard) => f(&guard),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    fn write_state(&self, f: impl FnOnce(&mut State)) {
        match self.state.write() {
            Ok(mut guard) => f(&mut guard),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}

impl TlsSource for ReloadingTls {
    fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server_config()
    }
    fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client_config()
    }
    fn trust_domain(&self) -> TrustDomain {
        self.trust_domain.clone()
    }
}

/// Stops the file watcher when dropped.
#[derive(Debug)]
pub struct WatcherHandle {
    task: JoinHandle<()>,
}

impl Drop for WatcherHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn read_contents(paths: &TlsPaths) -> Result<Contents, TlsError> {
    Ok(Contents {
        ca: files::read_file(&paths.ca)?,
        cert: files::read_file(&paths.cert)?,
        key: files::read_file(&paths.key)?,
    })
}

fn build(trust_domain: &TrustDomain, paths: &TlsPaths, c: &Contents) -> Result<MeshTls, TlsError> {
    MeshTls::from_pem(trust_domain.clone(), &c.ca, &c.cert, &c.key).map_err(|e| match e {
        TlsError::Material { source, .. } => TlsError::Material {
            origin: paths.describe(),
            source,
        },
        other => other,
    })
}
