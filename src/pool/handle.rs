//! [`VaultPool`], the handle every deadpool-based backend shares, and [`Deadpool`], the
//! size and timeouts its [`Builder`] adds.

use std::fmt;
use std::sync::Arc;

use super::inner::{self, Connect, Pooled};
use super::{Builder, LeaseOptions, PoolStatus, Timeouts};
use crate::credentials::Generation;
use crate::error::Result;
use crate::lease::Engine;
use crate::vault::Client;

/// The settings of a deadpool-based pool around a backend's own settings `X`.
#[derive(Debug)]
pub struct Deadpool<X> {
    max_size: usize,
    timeouts: Timeouts,
    pub(crate) backend: X,
}

impl<X> Deadpool<X> {
    pub(crate) fn new(backend: X, timeouts: Timeouts) -> Self {
        Self {
            max_size: 16,
            timeouts,
            backend,
        }
    }
}

impl<X> Builder<Deadpool<X>> {
    /// The most connections open at once (all generations together). Default 16.
    pub fn max_size(mut self, max_size: usize) -> Self {
        self.target.max_size = max_size;
        self
    }

    /// deadpool's timeouts: waiting for a free connection, creating one, checking an
    /// idle one before reuse. Defaults per backend (PostgreSQL: wait 10 s, create 10 s,
    /// recycle 5 s; Redis: wait 10 s, create 5 s, recycle 2 s).
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.target.timeouts = timeouts;
        self
    }

    /// Lease and verify the first credentials (one real connection through `connect`),
    /// start the engine and build the pool. What a backend's `build()` ends with.
    pub(crate) async fn build_with<C: Connect + Clone>(
        lease: LeaseOptions,
        (max_size, timeouts): (usize, Timeouts),
        vault: Option<Client>,
        verify: C,
        connect: C,
    ) -> Result<VaultPool<C>> {
        let auth_failure_wait = lease.auth_failure_wait;
        let engine = lease.engine(vault, inner::verifier(verify)).await?;
        let shared = inner::Shared::build(engine, connect, max_size, timeouts, auth_failure_wait)?;
        Ok(VaultPool {
            inner: Arc::new(shared),
        })
    }

    /// Split into the leasing settings, deadpool's and the backend's.
    pub(crate) fn into_parts(self) -> (LeaseOptions, (usize, Timeouts), X) {
        let Deadpool {
            max_size,
            timeouts,
            backend,
        } = self.target;
        (self.lease, (max_size, timeouts), backend)
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
    inner: Arc<inner::Shared<C>>,
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
