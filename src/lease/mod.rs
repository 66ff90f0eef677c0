//! The lease lifecycle engine: one set of credentials at a time, kept alive and replaced
//! before it can die.
//!
//! [`Engine`] holds the current credentials in an [`ArcSwap`] together with a
//! [`Generation`]. A background task renews the lease at about two thirds of its TTL
//! (jittered; a new lease's first renewal anywhere from 1/15 to 2/3, so leases issued
//! together spread out), rotates — issue, verify, swap, bump the generation — when the lease cannot
//! be renewed any further, and revokes a retired generation's lease once its connections
//! are gone (or at the drain deadline: by default just before that lease's own end). Adapters (the pools) read [`current`] when they
//! open a connection, count their connections per generation with [`Current::track`],
//! and watch [`subscribe`] to retire old connections. The engine never knows what a
//! connection is.
//!
//! ## Timeline of one lease
//!
//! ```text
//! issue ── renew@≤⅔ ──── renew@⅔ ── … ── renew (capped by max_ttl) ── rotate@end-margin ── end
//!                                                                        │
//!                        new generation serving ◄────────────────────────┘
//!                        old generation: idle connections closed, busy ones closed on
//!                        return; its lease revoked once drained or at the drain deadline
//! ```
//!
//! ## Shutdown
//!
//! [`close`](Engine::close) stops the worker, waits (up to the drain
//! timeout) for connections to be returned, and revokes every lease it holds. Dropping
//! every handle stops the worker too, but nothing can be awaited in `Drop`: the leases
//! are then left to expire by their TTL.
//!
//! ## Where things are
//!
//! `mod.rs`: the [`Engine`] handle and its [`Builder`]; `status.rs`: what it reports
//! ([`Status`]); `policy.rs`: the schedule, a pure function ([`Policy`]); `source/`: what
//! is leased, one file per source; `worker.rs`: the background loop; `issue.rs`: issuing,
//! verifying and rotating; `drain.rs`: retiring old generations and revoking their
//! leases.
//!
//! [`current`]: Engine::current
//! [`subscribe`]: Engine::subscribe

mod drain;
mod events;
mod issue;
mod journal;
mod policy;
mod source;
mod status;
#[cfg(test)]
mod tests;
mod worker;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use events::{LeaseEvent, RotationReason};
pub use policy::Policy;
pub use source::{CredentialProvider, CredentialSource, DatabaseRole, KvCredentials, StaticRole};
pub use status::{GenerationStatus, Health, RotationTiming, Status};

use crate::credentials::{Credentials, Generation, Lease};
use crate::error::{Error, ErrorKind, Result};
use crate::vault::Client;
use source::Source;

pub use crate::BoxFuture;

/// How long verifying new credentials may take by default.
pub(crate) const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks new credentials before they are swapped in (e.g. one real connection).
pub type Verifier = Arc<dyn Fn(Credentials) -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// Prepares for new credentials after they are verified and before they are swapped in
/// (pools open connections with them: a pre-warm); returns how many it prepared. Cut
/// at the verify timeout (or sooner, near the serving lease's end); what it prepared by
/// then counts. Only for scheduled and forced rotations, while the old credentials serve.
pub type Prewarm = Arc<dyn Fn(Prepare) -> BoxFuture<'static, usize> + Send + Sync>;

/// What a [`Prewarm`] prepares for: new credentials and the lease they belong to.
#[derive(Clone)]
#[non_exhaustive]
pub struct Prepare {
    /// The new lease's id (what [`Current::lease`] will say once they serve).
    pub lease_id: String,
    /// The new credentials.
    pub credentials: Credentials,
}

/// The credentials serving now.
#[non_exhaustive]
pub struct Current {
    /// Which generation these are (1 for the first credentials).
    pub generation: Generation,
    /// Username and password.
    pub credentials: Credentials,
    /// The lease, as last issued or renewed.
    pub lease: Lease,
    connections: Arc<AtomicUsize>,
}

impl Current {
    /// Count one connection opened with these credentials; the count drops when the guard
    /// does. The engine revokes a retired generation's lease once its count is zero.
    pub fn track(&self) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard {
            generation: self.generation,
            counter: self.connections.clone(),
        }
    }

    /// Open connections of this generation.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Whether the lease has ended at `now`.
    pub fn expired_at(&self, now: Instant) -> bool {
        self.lease.expires_at().is_some_and(|end| now >= end)
    }
}

impl fmt::Debug for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Current")
            .field("generation", &self.generation)
            .field("credentials", &self.credentials)
            .field("lease", &self.lease)
            .field("connections", &self.connections())
            .finish()
    }
}

/// Counts one open connection of a generation; see [`Current::track`].
#[derive(Debug)]
pub struct ConnectionGuard {
    generation: Generation,
    counter: Arc<AtomicUsize>,
}

impl ConnectionGuard {
    /// The generation of the credentials the connection was opened with.
    pub fn generation(&self) -> Generation {
        self.generation
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a handle asks of the worker.
pub(crate) enum Command {
    /// Rotate now ([`Engine::rotate`]); the answer is the generation then serving.
    Rotate(oneshot::Sender<Result<Generation>>),
    /// A login with this generation's credentials was refused: re-lease.
    AuthFailure(Generation),
    /// Poll a polled source now; `Ok(true)` when it rotated to a new version.
    Check(oneshot::Sender<Result<bool>>),
}

/// The counters and findings [`Engine::status`] reports, kept by the worker.
#[derive(Default)]
struct Stats {
    last_error: Option<String>,
    degraded: bool,
    rotations: u64,
    renewals: u64,
    polls: u64,
    failures: u64,
    revocations: u64,
    revocations_refused: u64,
    revoke_refused: Option<String>,
    last_rotation: Option<RotationTiming>,
    retiring: Vec<(Generation, String, Arc<AtomicUsize>)>,
}

/// What the handles and the worker share: the serving credentials, the settings, the
/// channel to the worker and its counters. The handles hold it in an `Arc`, the worker a
/// `Weak`.
pub(crate) struct EngineState {
    /// What is leased, for messages: "database role app", "KV secret secret/redis/main".
    source_name: String,
    /// A short name for metrics labels and log fields: the role or the KV path.
    label: String,
    source: Arc<dyn Source>,
    /// How the engine treats the source.
    settings: Settings,
    current: ArcSwap<Current>,
    /// The current generation, mirrored for the cheapest possible read.
    generation: AtomicU64,
    generation_tx: watch::Sender<Generation>,
    commands: mpsc::UnboundedSender<Command>,
    re_lease_requested: AtomicU64,
    stats: Mutex<Stats>,
    closed: AtomicBool,
    /// False once the worker has stopped (by `close`, or unexpectedly).
    worker_alive: AtomicBool,
    cancel: CancellationToken,
    worker: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Where lease events go ([`Engine::events`]).
    events: tokio::sync::broadcast::Sender<LeaseEvent>,
}

impl EngineState {
    /// The counters, locked (a panic elsewhere does not poison them for good).
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tell whoever listens ([`Engine::events`]); nobody listening is fine.
    fn emit(&self, event: LeaseEvent) {
        let _ = self.events.send(event);
    }
}

/// The lease engine: a handle on the rotating credentials of one [`CredentialSource`].
/// Cheap to clone; not generic.
///
/// Build one with [`Engine::builder`]; pools do this for you and hand it out as
/// `pool.engine()`.
#[derive(Clone)]
pub struct Engine {
    state: Arc<EngineState>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("source", &self.state.source_name)
            .field("generation", &self.state.current.load().generation)
            .finish_non_exhaustive()
    }
}

/// Builds an [`Engine`].
#[must_use]
pub struct Builder {
    client: Option<Client>,
    source: CredentialSource,
    settings: Settings,
}

/// How the engine treats its source: what [`Builder`] collects besides the source, with
/// its defaults.
struct Settings {
    /// Renewal and rotation timing.
    policy: Policy,
    /// A cap on how long a retired generation may drain; `None`: until its lease's end.
    drain_timeout: Option<Duration>,
    /// Checks new credentials before they are swapped in.
    verify: Option<Verifier>,
    /// How long a verification may take before it counts as failed (and the bound of
    /// a pre-warm).
    verify_timeout: Duration,
    /// Prepares for new credentials before they are swapped in.
    prewarm: Option<Prewarm>,
    /// Where the lease journal is kept; `None`: `VAULTPOOL_LEASE_JOURNAL`, else none.
    journal: Option<std::path::PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            drain_timeout: None,
            verify: None,
            verify_timeout: DEFAULT_VERIFY_TIMEOUT,
            prewarm: None,
            journal: None,
        }
    }
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("source", &self.source)
            .field("policy", &self.settings.policy)
            .field("drain_timeout", &self.settings.drain_timeout)
            .field("verify", &self.settings.verify.is_some())
            .finish()
    }
}

impl Builder {
    /// Renewal and rotation timing. Default [`Policy::default`].
    pub fn policy(mut self, policy: Policy) -> Self {
        self.settings.policy = policy;
        self
    }

    /// How long a retired generation may keep connections before its lease is revoked
    /// anyway, cutting them (revocation ends the user's sessions), and how long
    /// [`close`](Engine::close) waits for connections in use. Default: no cap — a
    /// retired generation drains until its lease's end (less [`Policy::min_margin`], at
    /// most half the time left), so a long transaction across a rotation completes;
    /// `close()` then waits up to 20 s (inside Kubernetes' default 30 s grace period,
    /// with time left to revoke).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.settings.drain_timeout = Some(timeout);
        self
    }

    /// Check new credentials before they are swapped in (pools pass "open one
    /// connection"). A failed check revokes them and retries later. Default: none.
    pub fn verify_with(mut self, verify: Verifier) -> Self {
        self.settings.verify = Some(verify);
        self
    }

    /// Prepare for new credentials once verified, before the swap (pools pass "open
    /// connections with them"); bounded by the verify timeout. Default: none.
    pub fn prewarm_with(mut self, prewarm: Prewarm) -> Self {
        self.settings.prewarm = Some(prewarm);
        self
    }

    /// How long that check may take before it counts as failed (a server that accepts
    /// connections but never answers the login). Default 10 s; a whole step of the engine
    /// is cut at 30 s anyway.
    pub fn verify_timeout(mut self, timeout: Duration) -> Self {
        self.settings.verify_timeout = timeout;
        self
    }

    /// Keep a lease journal in `dir`: the ids and ends of the leases this engine holds
    /// (never a secret), written as they change (0600, fsync, atomic rename), so that a
    /// process killed without [`close`](Engine::close) — SIGKILL, the OOM killer, a crash
    /// loop — leaves nothing behind for long: the next engine on the same source and
    /// directory revokes what the dead one held before it issues its own. Each engine
    /// holds an OS lock on its journal while it lives, so engines beside it (other
    /// processes on a shared volume) never touch each other's leases. Use a directory
    /// that survives a container restart (a Kubernetes `emptyDir`). Default: the
    /// directory in `VAULTPOOL_LEASE_JOURNAL`, else no journal (a path must be chosen).
    pub fn lease_journal(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.settings.journal = Some(dir.into());
        self
    }

    /// Issue (and verify) the first credentials, then start the background worker.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for an invalid role, mount or poll interval; whatever
    /// issuing or verifying the first credentials fails with, e.g.
    /// [`ErrorKind::PermissionDenied`] for a role the token may not use.
    pub async fn build(self) -> Result<Engine> {
        self.settings.policy.validate()?;
        start(Setup {
            source_name: self.source.to_string(),
            label: self.source.name().to_owned(),
            source: self.source.into_source(self.client)?,
            settings: self.settings,
        })
        .await
    }
}

/// What [`start`] needs: the source, ready to call, under its names, and how the engine
/// treats it.
struct Setup {
    /// What is leased, for messages: "database role app", "KV secret secret/redis/main".
    source_name: String,
    /// A short name for metrics labels and log fields: the role or the KV path.
    label: String,
    /// The source the engine calls.
    source: Arc<dyn Source>,
    /// How the engine treats it.
    settings: Settings,
}

/// Issue and verify the first credentials from the setup's source, then start the
/// worker.
async fn start(setup: Setup) -> Result<Engine> {
    let Setup {
        source_name,
        label,
        mut source,
        settings,
    } = setup;
    let journal_dir = settings.journal.clone().or_else(|| {
        std::env::var_os(journal::JOURNAL_ENV)
            .filter(|d| !d.is_empty())
            .map(Into::into)
    });
    // Only for sources whose every issue is a lease of its own to revoke (a database
    // role): a static role or a KV secret has nothing to revoke, and a custom provider's
    // leases are its own to clean up.
    if let Some(dir) = journal_dir.filter(|_| source.issues_unique_leases()) {
        // What a killed earlier run left behind is revoked before anything is issued.
        let journal = journal::Journal::open(&dir, &source_name, source.as_ref())
            .await
            .map_err(|e| e.context(format!("opening the lease journal of {source_name}")))?;
        source = Arc::new(journal::Journaled {
            inner: source,
            journal,
            off: std::sync::atomic::AtomicBool::new(false),
        });
    }
    // Before the issue, as for every rotation (see `issue::rotate`).
    let issuing_token = source.issuing_token();
    let first = issue::issue_verified(
        &source,
        settings.verify.as_ref(),
        settings.verify_timeout,
        &source_name,
        &[],
    )
    .await
    .map_err(|e| e.context(format!("obtaining the first credentials of {source_name}")))?
    .leased;
    // After the first issue, so that a token that cannot read at all says so there.
    if let Err(e) = source.preflight().await {
        let _ = source.revoke(&first.lease).await;
        return Err(e);
    }
    let worker_state = worker::WorkerState::new(
        &first.lease,
        issuing_token.or_else(|| source.issuing_token()),
    );
    let current = Current {
        generation: Generation(1),
        credentials: first.value,
        lease: first.lease,
        connections: Arc::new(AtomicUsize::new(0)),
    };
    let (generation_tx, _) = watch::channel(Generation(1));
    let (commands, rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let state = Arc::new(EngineState {
        source_name,
        label,
        source,
        settings,
        current: ArcSwap::from_pointee(current),
        generation: AtomicU64::new(1),
        generation_tx,
        commands,
        re_lease_requested: AtomicU64::new(0),
        stats: Mutex::new(Stats::default()),
        closed: AtomicBool::new(false),
        worker_alive: AtomicBool::new(true),
        cancel: cancel.clone(),
        worker: tokio::sync::Mutex::new(None),
        events: tokio::sync::broadcast::channel(events::EVENTS_KEPT).0,
    });
    let handle = tokio::spawn(worker::run(
        Arc::downgrade(&state),
        rx,
        cancel,
        worker_state,
    ));
    *state.worker.lock().await = Some(handle);
    Ok(Engine { state })
}

impl Engine {
    /// A builder for the credentials of `source`, e.g. a [`DatabaseRole`] or
    /// [`KvCredentials`], leased through `client`.
    pub fn builder(client: Client, source: impl Into<CredentialSource>) -> Builder {
        Self::builder_with(Some(client), source)
    }

    /// A builder for a source that needs no Vault client: a
    /// [`CredentialSource::custom`] one (a Vault-backed source fails at build).
    pub fn builder_without_vault(source: impl Into<CredentialSource>) -> Builder {
        Self::builder_with(None, source)
    }

    pub(crate) fn builder_with(
        client: Option<Client>,
        source: impl Into<CredentialSource>,
    ) -> Builder {
        Builder {
            client,
            source: source.into(),
            settings: Settings::default(),
        }
    }

    /// What is leased, for messages: "database role app", "KV secret secret/redis/main".
    pub fn source(&self) -> &str {
        &self.state.source_name
    }

    /// A short name for metrics labels and log fields: the role, or the KV path.
    pub fn label(&self) -> &str {
        &self.state.label
    }

    /// The credentials serving now: one atomic load and a reference count. They may have
    /// expired if Vault has been unreachable; [`usable`](Self::usable) checks.
    pub fn current(&self) -> Arc<Current> {
        self.state.current.load_full()
    }

    /// The current generation: one relaxed-cost atomic load.
    pub fn generation(&self) -> Generation {
        Generation(self.state.generation.load(Ordering::Acquire))
    }

    /// The current credentials if their lease has not ended.
    ///
    /// # Errors
    /// [`ErrorKind::LeaseExpired`] naming the role (and the last Vault error) once the
    /// lease has ended and no new credentials could be obtained;
    /// [`ErrorKind::Shutdown`] after [`close`](Self::close).
    pub fn usable(&self) -> Result<Arc<Current>> {
        if self.state.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Shutdown,
                format!(
                    "using credentials of {}: closed (close() was called)",
                    self.state.source_name
                ),
            ));
        }
        if !self.state.worker_alive.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::CredentialsUnavailable,
                format!(
                    "using credentials of {}: the lease engine's background task stopped \
                     unexpectedly, so nothing renews or rotates them (see the log for why); \
                     restart the service",
                    self.state.source_name
                ),
            ));
        }
        let current = self.current();
        if current.expired_at(worker::now()) {
            let last = self.state.stats().last_error.clone();
            return Err(Error::new(
                ErrorKind::LeaseExpired,
                format!(
                    "using credentials of {}: the lease of generation {} has ended and \
                     no new credentials could be obtained from Vault{}; retrying in the \
                     background",
                    self.state.source_name,
                    current.generation.0,
                    last.map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                ),
            ));
        }
        Ok(current)
    }

    /// Whether a connection of `generation` may be reused: `Ok(true)` while it is the
    /// current generation, `Ok(false)` once it is retired; the errors of
    /// [`usable`](Self::usable) when no credentials are usable. What every checkout of a
    /// pooled connection asks, so it takes no reference count (an `arc-swap` guard).
    #[cfg(any(feature = "postgres", feature = "redis"))]
    pub(crate) fn generation_may_serve(&self, generation: Generation) -> Result<bool> {
        let current = self.state.current.load();
        if self.state.closed.load(Ordering::Acquire)
            || !self.state.worker_alive.load(Ordering::Acquire)
            || current.expired_at(worker::now())
        {
            // Not on the hot path: build the error.
            drop(current);
            return self.usable().map(|_| false);
        }
        Ok(current.generation == generation)
    }

    /// Whether `generation` is retired but its lease not yet revoked (it is draining).
    #[cfg(feature = "sqlx")]
    pub(crate) fn is_retiring(&self, generation: Generation) -> bool {
        self.state
            .stats()
            .retiring
            .iter()
            .any(|(g, _, _)| *g == generation)
    }

    /// A receiver that sees every new generation.
    pub fn subscribe(&self) -> watch::Receiver<Generation> {
        self.state.generation_tx.subscribe()
    }

    /// What happens to the leases from now on, as [`LeaseEvent`]s: rotations (with their
    /// reason), renewals, revocations, failures, an expiry. Each call gets a receiver of
    /// its own; one that falls more than 256 events behind misses the oldest and is told
    /// (`RecvError::Lagged`). The first credentials (issued at build) come before any
    /// receiver, so they have no event.
    ///
    /// ```no_run
    /// # async fn run(engine: vaultpool::lease::Engine) {
    /// use vaultpool::lease::LeaseEvent;
    /// use tokio::sync::broadcast::error::RecvError;
    /// let mut events = engine.events();
    /// loop {
    ///     match events.recv().await {
    ///         Ok(LeaseEvent::Rotated { to, reason, .. }) => {
    ///             println!("now serving {to} ({reason})"); // reload what holds the old login
    ///         }
    ///         Ok(_) | Err(RecvError::Lagged(_)) => {} // fell behind: go on
    ///         Err(RecvError::Closed) => break,         // the engine is gone
    ///     }
    /// }
    /// # }
    /// ```
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<LeaseEvent> {
        self.state.events.subscribe()
    }

    /// Rotate now: issue new credentials, verify, swap. Returns the new generation once
    /// it is serving (for a KV source whose secret has no newer version: the current
    /// one — there is nothing new to swap in). Calls made at once share one rotation:
    /// those waiting when it starts get its generation (one new user, not one per call);
    /// a call made while it runs gets the next one.
    ///
    /// # Errors
    /// Whatever issuing or verifying failed with (the current credentials stay);
    /// [`ErrorKind::Shutdown`] after [`close`](Self::close).
    pub async fn rotate(&self) -> Result<Generation> {
        self.ask("rotating credentials", Command::Rotate).await
    }

    /// Send the worker a command carrying a reply channel, and wait for its answer.
    async fn ask<T>(
        &self,
        what: &str,
        command: impl FnOnce(oneshot::Sender<Result<T>>) -> Command,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let shut = || {
            Error::new(
                ErrorKind::Shutdown,
                format!("{what} of {}: closed", self.state.source_name),
            )
        };
        self.state.commands.send(command(tx)).map_err(|_| shut())?;
        rx.await.map_err(|_| shut())?
    }

    /// For a polled source (a KV secret): check for a new version now instead of at the
    /// next poll, and rotate to it. `Ok(true)` when a new version is serving.
    ///
    /// # Errors
    /// Whatever reading or verifying the new version failed with (the current
    /// credentials stay); [`ErrorKind::Shutdown`] after [`close`](Self::close).
    pub async fn check_now(&self) -> Result<bool> {
        self.ask("checking for a new version", Command::Check).await
    }

    /// Report that logging in with `generation`'s credentials was refused (e.g. the lease
    /// was revoked from outside). The first report for a generation triggers a re-lease;
    /// later ones are coalesced into it.
    pub fn report_auth_failure(&self, generation: Generation) {
        if generation != self.generation() {
            return; // already replaced
        }
        let previous = self
            .state
            .re_lease_requested
            .fetch_max(generation.0, Ordering::AcqRel);
        if previous < generation.0 {
            tracing::warn!(
                source = %self.state.label,
                generation = generation.0,
                "login refused with current credentials; re-leasing"
            );
            let _ = self.state.commands.send(Command::AuthFailure(generation));
        }
    }

    /// Wait until the generation is newer than `than`, at most `timeout`. Returns the
    /// generation then current.
    pub async fn wait_newer(&self, than: Generation, timeout: Duration) -> Generation {
        let mut rx = self.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|g| *g > than)).await;
        self.generation()
    }

    /// A snapshot for health endpoints: generation, lease, TTL left, connections per
    /// generation, counters, last error.
    pub fn status(&self) -> Status {
        let state = &self.state;
        let current = self.current();
        let now = worker::now();
        let stats = state.stats();
        let health = if state.closed.load(Ordering::Acquire) {
            Health::Closed
        } else if !state.worker_alive.load(Ordering::Acquire) {
            Health::Failed
        } else if current.expired_at(now) {
            Health::Expired
        } else if stats.degraded {
            Health::Degraded
        } else {
            Health::Serving
        };
        let mut generations = vec![GenerationStatus {
            generation: current.generation,
            lease_id: current.lease.id.clone(),
            connections: current.connections(),
            retiring: false,
        }];
        // (A rotation lists the old generation as retiring just before it swaps: skip it
        // if this snapshot still holds it as current.)
        generations.extend(
            stats
                .retiring
                .iter()
                .filter(|(g, _, _)| *g != current.generation)
                .map(|(generation, lease_id, conns)| GenerationStatus {
                    generation: *generation,
                    lease_id: lease_id.clone(),
                    connections: conns.load(Ordering::Acquire),
                    retiring: true,
                }),
        );
        Status {
            source: state.source_name.clone(),
            health,
            generation: current.generation,
            lease_id: current.lease.id.clone(),
            ttl_remaining: current.lease.remaining_at(now),
            renewable: current.lease.renewable,
            generations,
            last_error: stats.last_error.clone(),
            rotations: stats.rotations,
            renewals: stats.renewals,
            polls: stats.polls,
            failures: stats.failures,
            revocations: stats.revocations,
            revocations_refused: stats.revocations_refused,
            revoke_refused: stats.revoke_refused.clone(),
            last_rotation: stats.last_rotation,
        }
    }

    /// Stop the worker, wait for connections to be returned (up to the drain timeout),
    /// and revoke every lease this engine holds. Calling it again is harmless.
    pub async fn close(&self) {
        self.state.closed.store(true, Ordering::Release);
        self.state.cancel.cancel();
        // The lock is held until the worker has finished: a second close() waits for the
        // first one's revocations instead of returning before them; and if the caller
        // that awaits the worker is dropped, the handle stays for the next close().
        let mut worker = self.state.worker.lock().await;
        if let Some(handle) = worker.as_mut() {
            let _ = handle.await;
            *worker = None;
        }
    }
}
