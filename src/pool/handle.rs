//! [`VaultPool`], the handle every deadpool-based backend shares, and [`Deadpool`], the
//! size and timeouts its [`Builder`] adds.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::inner::{self, Connect, Pooled};
use super::{Builder, LeaseOptions, PoolStatus, Timeouts};
use crate::credentials::Generation;
use crate::error::Result;
use crate::lease::{CredentialSource, Engine};
use crate::vault::Client;

/// The settings of a deadpool-based pool around a backend's own settings `X`.
#[derive(Debug)]
pub struct Deadpool<X> {
    settings: PoolSettings,
    pub(crate) backend: X,
}

/// The pool's own settings (not the backend's).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolSettings {
    pub(crate) max_size: usize,
    pub(crate) timeouts: Timeouts,
    /// Pre-warm on rotation.
    pub(crate) prewarm: bool,
    /// Connections a pre-warm opens at once.
    pub(crate) prewarm_concurrency: usize,
    /// Close a connection once it is this old (less up to 20 %, per connection).
    pub(crate) max_lifetime: Option<Duration>,
}

/// Connections opened at once by a pre-warm, by default.
const PREWARM_CONCURRENCY: usize = 4;

impl<X> Deadpool<X> {
    pub(crate) fn new(backend: X, timeouts: Timeouts) -> Self {
        Self {
            settings: PoolSettings {
                max_size: 16,
                timeouts,
                prewarm: true,
                prewarm_concurrency: PREWARM_CONCURRENCY,
                max_lifetime: None,
            },
            backend,
        }
    }
}

impl<X> Builder<Deadpool<X>> {
    /// The most connections open at once (all generations together). Default 16.
    pub fn max_size(mut self, max_size: usize) -> Self {
        self.target.settings.max_size = max_size;
        self
    }

    /// Pre-warm on rotation (default on): once new credentials are verified, and before
    /// they are swapped in, open as many connections with them as the pool holds
    /// (`concurrency` at a time, bounded by the verify timeout) while the old generation
    /// keeps serving; after the swap, connections that replace the retired ones are
    /// taken from those, so no checkout waits on a connect (a TLS and SCRAM handshake)
    /// because of a rotation. The rotation's `warm` time says how long it took.
    /// `prewarm(false)` opens replacements on demand, as checkouts need them.
    ///
    /// While it runs, the database sees up to twice the pool's size in sessions (the
    /// serving generation's and the prepared ones): leave room for that in
    /// `max_connections` (and a role's `CONNECTION LIMIT`). Prepared connections no
    /// checkout took are closed 30 s after the swap. Only scheduled and forced rotations
    /// pre-warm: after a refused login or a changed secret the old generation may not
    /// serve, and the swap does not wait.
    pub fn prewarm(mut self, on: bool) -> Self {
        self.target.settings.prewarm = on;
        self
    }

    /// How many connections a pre-warm opens at once (default 4; 1 to 64). Higher warms
    /// faster; each connect costs the database a handshake.
    pub fn prewarm_concurrency(mut self, concurrency: usize) -> Self {
        self.target.settings.prewarm_concurrency = concurrency.clamp(1, 64);
        self
    }

    /// Close connections once they are this old (each one less up to 20 %, chosen when
    /// it opens, so a fleet of pools does not reconnect in step), checked before an
    /// idle connection is reused. Default `None`: connections live until a rotation
    /// retires them (rotation already renews every connection once per lease); a zero
    /// lifetime is read as `None` (it would reconnect at every checkout).
    pub fn max_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.target.settings.max_lifetime = lifetime.filter(|l| !l.is_zero());
        self
    }

    /// deadpool's timeouts: waiting for a free connection, creating one, checking an
    /// idle one before reuse. Defaults per backend (PostgreSQL: wait 10 s, create 10 s,
    /// recycle 5 s; Redis: wait 10 s, create 5 s, recycle 2 s).
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.target.settings.timeouts = timeouts;
        self
    }

    /// Lease and verify the first credentials (one real connection through `connect`),
    /// start the engine and build the pool. What a backend's `build()` ends with.
    pub(crate) async fn build_with<C: Connect + Clone>(
        lease: LeaseOptions,
        settings: PoolSettings,
        vault: Option<Client>,
        verify: C,
        connect: C,
    ) -> Result<VaultPool<C>> {
        let auth_failure_wait = lease.auth_failure_wait;
        let warm = Arc::new(inner::Warm::new(settings));
        let prewarm = settings
            .prewarm
            .then(|| inner::prewarmer(warm.clone(), connect.clone()));
        let engine = lease
            .engine(vault, inner::verifier(verify), prewarm)
            .await?;
        let state = inner::PoolState::build(engine, connect, settings, warm, auth_failure_wait)?;
        Ok(VaultPool {
            inner: Arc::new(state),
        })
    }

    /// Split into the leasing settings, the pool's and the backend's.
    pub(crate) fn into_parts(self) -> (LeaseOptions, PoolSettings, X) {
        let Deadpool { settings, backend } = self.target;
        (self.lease, settings, backend)
    }
}

/// A backend of your own: the [`Connect`] given to [`VaultPool::custom`], as a builder's
/// target.
#[derive(Debug)]
pub struct Custom<C>(C);

impl<C: Connect + Clone> Builder<Deadpool<Custom<C>>> {
    /// Lease the first credentials (verified with one connection through the
    /// [`Connect`]), start the engine and build the pool.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) for an invalid source or policy;
    /// whatever leasing or the verifying connection fails with.
    pub async fn build(self) -> Result<VaultPool<C>> {
        let (lease, settings, Custom(connect)) = self.into_parts();
        lease.source.validate()?;
        let vault = lease.vault()?;
        Self::build_with(lease, settings, vault, connect.clone(), connect).await
    }
}

/// A pool on rotating Vault credentials over a backend's [`Connect`]: cheap to clone,
/// not generic in use (`VaultPgPool`, `VaultRedisPool` are aliases), so it drops straight
/// into axum state.
///
/// On rotation: idle connections of the old generation are closed at once; a connection
/// that is checked out finishes its work and is closed when it is returned; a connection
/// of an old generation is never handed out again. The engine revokes the old lease
/// once its last connection is gone.
pub struct VaultPool<C: Connect> {
    inner: Arc<inner::PoolState<C>>,
}

impl<C: Connect> Clone for VaultPool<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<C: Connect> fmt::Debug for VaultPool<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultPool")
            .field("source", &self.inner.engine.source())
            .field("target", &self.inner.pool.manager().target())
            .field("generation", &self.inner.engine.generation())
            .field("pool", &self.inner.pool.status())
            .finish()
    }
}

impl<C: Connect + Clone> VaultPool<C> {
    /// A pool over a backend of your own (a driver this crate has no feature for): your
    /// [`Connect`] opens and checks one connection with given credentials; the pool does
    /// the rest — generations, draining, pre-warm, revocation — as for PostgreSQL and
    /// Redis. Defaults as the PostgreSQL pool's: 16 connections, waits and connects
    /// bounded by 10 s, a recycle check by 5 s. New credentials are verified by opening
    /// one connection and running your `check` on it: make it a round trip (a ping), or
    /// a rotation proves only the login. (Built on deadpool: needs the `postgres` or
    /// `redis` feature.)
    ///
    /// ```no_run
    /// # async fn f(connect: impl vaultpool::pool::Connect + Clone) -> vaultpool::Result<()> {
    /// use vaultpool::lease::DatabaseRole;
    /// use vaultpool::pool::VaultPool;
    ///
    /// let pool = VaultPool::custom(DatabaseRole::new("app"), connect)
    ///     .max_size(8)
    ///     .build()
    ///     .await?;
    /// let conn = pool.get().await?;
    /// # Ok(()) }
    /// ```
    pub fn custom(source: impl Into<CredentialSource>, connect: C) -> Builder<Deadpool<Custom<C>>> {
        Builder::new(
            source,
            Deadpool::new(
                Custom(connect),
                Timeouts {
                    wait: Some(Duration::from_secs(10)),
                    create: Some(Duration::from_secs(10)),
                    recycle: Some(Duration::from_secs(5)),
                },
            ),
        )
    }
}

impl<C: Connect> VaultPool<C> {
    /// A connection: an idle one of the current generation, or a new one opened with
    /// the current credentials.
    ///
    /// # Errors
    /// [`ErrorKind::LeaseExpired`](crate::ErrorKind::LeaseExpired) naming the source when
    /// the credentials have run out and Vault cannot give new ones;
    /// [`ErrorKind::PoolTimeout`](crate::ErrorKind::PoolTimeout) when no connection frees
    /// up within the wait timeout; [`ErrorKind::Backend`](crate::ErrorKind::Backend) when
    /// the server refuses or is down; [`ErrorKind::Shutdown`](crate::ErrorKind::Shutdown)
    /// after [`close`](Self::close).
    pub async fn get(&self) -> Result<Pooled<C>> {
        self.inner.get().await
    }

    /// The lease engine behind the pool (generation, status, subscribe).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Rotate now; returns once the new generation is serving.
    ///
    /// # Errors
    /// As [`Engine::rotate`]; the pool keeps the current credentials.
    pub async fn rotate(&self) -> Result<Generation> {
        self.inner.engine.rotate().await
    }

    /// Pool and lease status.
    pub fn status(&self) -> PoolStatus {
        self.inner.status()
    }

    /// Close the pool: no new checkouts, idle connections closed, then wait for the
    /// connections in use (up to the drain timeout) and revoke every lease. Calling it
    /// twice is harmless.
    pub async fn close(&self) {
        self.inner.close().await;
    }
}

/// The credentials behind it (e.g. for a health check).
impl<C: Connect> AsRef<Engine> for VaultPool<C> {
    fn as_ref(&self) -> &Engine {
        self.engine()
    }
}
