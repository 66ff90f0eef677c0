//! One configured database, a *route*: the lease engine on its Vault role (built with a
//! verifier that logs in with each new lease), the server connections logged in with
//! its credentials — idle ones kept for the next session, retired generations closed —
//! and the limit on how many there are.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::config;
use super::server::{LoginError, Server, Target, login};
use crate::credentials::{Credentials, Generation};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{CredentialSource, DatabaseRole, Engine, StaticRole};
use crate::vault::Client;

/// Counters of one route, for `/metrics` and `/health`.
#[derive(Debug, Default)]
pub(crate) struct RouteStats {
    pub(crate) sessions_active: AtomicU64,
    pub(crate) sessions_total: AtomicU64,
    pub(crate) server_logins: AtomicU64,
    pub(crate) server_login_failures: AtomicU64,
    pub(crate) server_reused: AtomicU64,
    pub(crate) waits: AtomicU64,
    pub(crate) wait_ns: AtomicU64,
    pub(crate) wait_timeouts: AtomicU64,
    pub(crate) handovers: AtomicU64,
    pub(crate) handovers_refused: AtomicU64,
}

/// One configured database: what clients ask for, the lease behind it, the server
/// connections it keeps.
pub(crate) struct Route {
    pub(crate) name: String,
    pub(crate) users: Vec<String>,
    pub(crate) engine: Engine,
    pub(crate) target: Arc<Target>,
    idle: Mutex<Vec<Server>>,
    permits: Arc<Semaphore>,
    pub(crate) max_connections: usize,
    pub(crate) wait_timeout: Duration,
    pub(crate) stats: RouteStats,
}

/// An idle server connection unused for longer than this is checked before reuse.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(30);

/// Why no server connection could be had.
pub(crate) enum CheckoutError {
    /// All `max_connections` in use for the whole wait.
    Timeout,
    /// The credentials are unusable (lease expired, engine closed).
    Credentials(Error),
    /// The server refused or could not be reached.
    Login(LoginError),
}

impl Route {
    /// Lease the first credentials of `db` (verified with one login to `target`).
    ///
    /// # Errors
    /// Whatever leasing or the verifying login fails with, naming the database.
    pub(crate) async fn start(
        db: &config::Database,
        target: Target,
        vault: Client,
    ) -> Result<Self> {
        let target = Arc::new(target);
        let source: CredentialSource = if db.static_role {
            StaticRole::new(&db.role).mount(&db.mount).into()
        } else {
            DatabaseRole::new(&db.role).mount(&db.mount).into()
        };
        let engine = Engine::builder(vault, source)
            .verify_with(verifier(target.clone()))
            .build()
            .await
            .map_err(|e| {
                Error::new(
                    e.kind(),
                    format!("starting database \"{}\" of the proxy", db.name),
                )
                .with_source(e)
            })?;
        Ok(Self {
            name: db.name.clone(),
            users: db.users.clone(),
            engine,
            target,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(db.max_connections)),
            max_connections: db.max_connections,
            wait_timeout: Duration::from_secs(db.wait_timeout_secs.clamp(0, 3600)),
            stats: RouteStats::default(),
        })
    }

    /// Until `stop`: at every rotation, close the idle connections of retired
    /// generations, so old leases drain.
    pub(crate) fn follow_rotations(self: Arc<Self>, stop: CancellationToken) {
        tokio::spawn(async move {
            let mut generations = self.engine.subscribe();
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = generations.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        self.close_idle(false);
                    }
                }
            }
        });
    }

    /// A server connection for one client session, with its slot.
    pub(crate) async fn checkout(
        &self,
    ) -> std::result::Result<(OwnedSemaphorePermit, Server), CheckoutError> {
        let started = Instant::now();
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.stats.waits.fetch_add(1, Ordering::Relaxed);
                let got =
                    tokio::time::timeout(self.wait_timeout, self.permits.clone().acquire_owned())
                        .await;
                self.stats
                    .wait_ns
                    .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                match got {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) | Err(_) => {
                        self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                        return Err(CheckoutError::Timeout);
                    }
                }
            }
        };
        self.connection().await.map(|server| (permit, server))
    }

    /// A server connection of the serving generation, outside the limit (the caller holds
    /// a slot already: a checkout, or a session handed over to a new generation).
    pub(crate) async fn connection(&self) -> std::result::Result<Server, CheckoutError> {
        loop {
            let candidate = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some(mut server) = candidate else { break };
            if server.generation != self.engine.generation() {
                tokio::spawn(server.terminate());
                continue;
            }
            if server.idle_since.elapsed() > CHECK_IDLE_AFTER {
                let alive = tokio::time::timeout(Duration::from_secs(5), server.simple("")).await;
                if !matches!(alive, Ok(Ok(_))) {
                    continue;
                }
            }
            self.stats.server_reused.fetch_add(1, Ordering::Relaxed);
            return Ok(server);
        }
        self.open().await
    }

    /// Log in with the current credentials; after a refusal (revoked behind our back),
    /// once more with new ones.
    async fn open(&self) -> std::result::Result<Server, CheckoutError> {
        let current = self.engine.usable().map_err(CheckoutError::Credentials)?;
        self.stats.server_logins.fetch_add(1, Ordering::Relaxed);
        match login(
            &self.target,
            &current.credentials,
            current.generation,
            Some(current.track()),
        )
        .await
        {
            Ok(server) => Ok(server),
            Err(e) if e.is_auth_failure() => {
                self.engine.report_auth_failure(current.generation);
                let now = self
                    .engine
                    .wait_newer(current.generation, Duration::from_secs(5))
                    .await;
                if now == current.generation {
                    self.stats
                        .server_login_failures
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(CheckoutError::Login(e));
                }
                let current = self.engine.usable().map_err(CheckoutError::Credentials)?;
                login(
                    &self.target,
                    &current.credentials,
                    current.generation,
                    Some(current.track()),
                )
                .await
                .map_err(|e| {
                    self.stats
                        .server_login_failures
                        .fetch_add(1, Ordering::Relaxed);
                    CheckoutError::Login(e)
                })
            }
            Err(e) => {
                self.stats
                    .server_login_failures
                    .fetch_add(1, Ordering::Relaxed);
                Err(CheckoutError::Login(e))
            }
        }
    }

    /// A session ended cleanly with this connection: keep it for the next one if it is
    /// of the serving generation, else close it (its lease drains).
    pub(crate) fn checkin(&self, mut server: Server) {
        if server.generation != self.engine.generation() || !server.pending.is_empty() {
            tokio::spawn(server.terminate());
            return;
        }
        server.idle_since = Instant::now();
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(server);
    }

    /// Close idle connections of retired generations (at every rotation), or all.
    pub(crate) fn close_idle(&self, all: bool) {
        let current = self.engine.generation();
        let closing: Vec<Server> = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let (keep, close) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|u| !all && u.generation == current);
            *idle = keep;
            close
        };
        for server in closing {
            tokio::spawn(server.terminate());
        }
    }

    /// Idle server connections.
    pub(crate) fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A verifier for the route's engine: log in with the new credentials and leave.
fn verifier(target: Arc<Target>) -> crate::lease::Verifier {
    Arc::new(move |creds: Credentials| {
        let target = target.clone();
        Box::pin(async move {
            // Not counted in any generation: it closes before the swap.
            match login(&target, &creds, Generation(0), None).await {
                Ok(server) => {
                    server.terminate().await;
                    Ok(())
                }
                Err(e) => {
                    let kind = match &e {
                        e if e.is_auth_failure() => ErrorKind::AuthenticationFailed,
                        LoginError::Tls(_) => ErrorKind::Tls,
                        _ => ErrorKind::Backend,
                    };
                    Err(Error::new(
                        kind,
                        format!(
                            "verifying new credentials against PostgreSQL at {}: {e}",
                            target.describe()
                        ),
                    ))
                }
            }
        }) as crate::lease::BoxFuture<'static, Result<()>>
    })
}
