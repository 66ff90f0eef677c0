//! One pool handle for every backend, and one builder.
//!
//! - [`VaultPool<C>`](VaultPool) is the handle: `get`, `engine`, `rotate`, `status`,
//!   `close`, written once. `postgres::VaultPgPool` and `redis::VaultRedisPool` are
//!   this type over their backend's [`Connect`]; a new deadpool-based backend is a
//!   `Connect` impl and a few lines (deadpool-postgres does the same with its
//!   `Manager`). A driver this crate has no feature for is a `Connect` of your own given
//!   to [`VaultPool::custom`].
//! - [`Builder<T>`](Builder) holds what every pool sets about leasing — the
//!   [`CredentialSource`], the Vault client, the [`Policy`], the drain timeout — with its
//!   setters written once here; `T` is the backend's own settings (its target, and for
//!   deadpool pools [`Deadpool`]'s size and timeouts), whose setters live in the
//!   backend's module.
//! - [`PoolStatus`] is what every pool's `status()` returns, the sqlx flavour included.
//!
//! The machinery (the deadpool manager, the generation-tagged connection, the task that
//! retires idle connections) is in `inner.rs`; the deadpool handle in `handle.rs`; what
//! a failed connection means (TLS advice per backend, a refused login) in
//! `diagnosis.rs`, which the sqlx flavour shares.

pub(crate) mod diagnosis;
#[cfg(any(feature = "postgres", feature = "redis"))]
mod handle;
#[cfg(any(feature = "postgres", feature = "redis"))]
mod inner;
#[cfg(any(feature = "postgres", feature = "redis"))]
mod metrics;

use std::fmt;
use std::time::Duration;

use crate::error::Result;
use crate::lease::{self, CredentialSource, Engine, Policy, Verifier};
use crate::vault::Client;

#[cfg(any(feature = "postgres", feature = "redis"))]
pub use ::deadpool::managed::Timeouts;
#[cfg(any(feature = "postgres", feature = "redis"))]
pub use handle::{Custom, Deadpool, VaultPool};
#[cfg(any(feature = "postgres", feature = "redis"))]
pub use inner::{Connect, Pooled, RotatingManager, Tagged};

/// Pool and lease status together; every pool's `status()` returns it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PoolStatus {
    /// The lease engine's status (source, generation, lease, TTL left, connections per
    /// generation, last error).
    pub lease: lease::Status,
    /// Connections open (idle and in use).
    pub size: usize,
    /// Idle connections.
    pub available: usize,
    /// Callers waiting for a connection (the sqlx flavour cannot tell: 0).
    pub waiting: usize,
    /// The pool's maximum size.
    pub max_size: usize,
    /// Connections opened by a pre-warm and not yet taken (outside `size`; at most the
    /// pool's size, closed 30 s after the swap if unused). Always 0 for sqlx.
    pub prepared: usize,
}

/// Builds a pool: the leasing settings shared by every backend, plus the backend's own
/// settings `T` (see each backend's `Builder` alias).
#[must_use]
pub struct Builder<T> {
    pub(crate) lease: LeaseOptions,
    pub(crate) target: T,
}

impl<T: fmt::Debug> fmt::Debug for Builder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("source", &self.lease.source)
            .field("vault", &self.lease.vault)
            .field("policy", &self.lease.policy)
            .field("drain_timeout", &self.lease.drain_timeout)
            .field("auth_failure_wait", &self.lease.auth_failure_wait)
            .field("target", &self.target)
            .finish()
    }
}

/// What every pool builder sets about leasing, with its defaults.
#[derive(Debug, Clone)]
pub(crate) struct LeaseOptions {
    /// What is leased.
    pub(crate) source: CredentialSource,
    /// Default: `Client::from_env()` at build.
    pub(crate) vault: Option<Client>,
    /// Default `Policy::default()`.
    pub(crate) policy: Policy,
    /// Default `None`: until the old lease's end.
    pub(crate) drain_timeout: Option<Duration>,
    /// Default 5 s.
    pub(crate) auth_failure_wait: Duration,
    /// Default `None`: the engine's (10 s).
    pub(crate) verify_timeout: Option<Duration>,
    /// Default `None`: `VAULTPOOL_LEASE_JOURNAL`, else none.
    pub(crate) journal: Option<std::path::PathBuf>,
}

impl LeaseOptions {
    /// The given Vault client, or one from the Vault CLI's environment variables.
    /// The Vault client: the one given, else from the environment — unless the source
    /// needs none (a custom one).
    pub(crate) fn vault(&self) -> Result<Option<Client>> {
        match (&self.vault, &self.source) {
            (Some(v), _) => Ok(Some(v.clone())),
            (None, CredentialSource::Custom(_)) => Ok(None),
            (None, _) => Client::from_env().map(Some),
        }
    }

    /// Lease and verify the first credentials and start the engine.
    pub(crate) async fn engine(
        self,
        vault: Option<Client>,
        verify: Verifier,
        prewarm: Option<crate::lease::Prewarm>,
    ) -> Result<Engine> {
        let mut engine = Engine::builder_with(vault, self.source)
            .policy(self.policy)
            .verify_with(verify);
        if let Some(prewarm) = prewarm {
            engine = engine.prewarm_with(prewarm);
        }
        if let Some(timeout) = self.drain_timeout {
            engine = engine.drain_timeout(timeout);
        }
        if let Some(timeout) = self.verify_timeout {
            engine = engine.verify_timeout(timeout);
        }
        if let Some(dir) = self.journal {
            engine = engine.lease_journal(dir);
        }
        engine.build().await
    }
}

impl<T> Builder<T> {
    pub(crate) fn new(source: impl Into<CredentialSource>, target: T) -> Self {
        Self {
            lease: LeaseOptions {
                source: source.into(),
                vault: None,
                policy: Policy::default(),
                drain_timeout: None,
                auth_failure_wait: Duration::from_secs(5),
                verify_timeout: None,
                journal: None,
            },
            target,
        }
    }

    /// What the pool leases.
    pub fn credential_source(&self) -> &CredentialSource {
        &self.lease.source
    }

    /// The Vault client. Default: [`Client::from_env`], made at build.
    pub fn vault(mut self, client: Client) -> Self {
        self.lease.vault = Some(client);
        self
    }

    /// Renewal and rotation timing. Default [`Policy::default`].
    pub fn policy(mut self, policy: Policy) -> Self {
        self.lease.policy = policy;
        self
    }

    /// How long a retired generation's connections may stay in use before its lease is
    /// revoked anyway (which ends their sessions); also how long `close()` waits.
    /// Default: no cap — they drain until the old lease's end, so a long transaction
    /// across a rotation completes; `close()` waits up to 20 s (inside Kubernetes' 30 s
    /// grace period, with time left to revoke). See
    /// [`lease::Builder::drain_timeout`].
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.lease.drain_timeout = Some(timeout);
        self
    }

    /// How long the connection that checks new credentials may take to log in and
    /// answer before the rotation counts as failed (and is retried later). Default 10 s.
    /// It also bounds each login of the sqlx flavour's login probe.
    pub fn verify_timeout(mut self, timeout: Duration) -> Self {
        self.lease.verify_timeout = Some(timeout);
        self
    }

    /// Keep a lease journal in `dir`, so that leases a killed process held are revoked by
    /// the next one; see [`lease::Builder::lease_journal`](crate::lease::Builder::lease_journal).
    /// Default: `VAULTPOOL_LEASE_JOURNAL`, else none.
    pub fn lease_journal(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.lease.journal = Some(dir.into());
        self
    }

    /// After the server refuses credentials whose lease should be valid (revoked from
    /// outside), how long a connect waits for the re-lease. Default 5 s.
    pub fn auth_failure_wait(mut self, wait: Duration) -> Self {
        self.lease.auth_failure_wait = wait;
        self
    }
}
