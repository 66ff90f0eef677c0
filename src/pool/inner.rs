//! The machinery under [`VaultPool`](super::VaultPool): a deadpool [`Manager`] that opens
//! connections with the engine's current credentials and tags them with their
//! generation, the pooled handle that closes a retired connection instead of returning
//! it, and the task that closes idle connections of retired generations.
//!
//! [`Manager`]: deadpool::managed::Manager

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;

use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult};

use super::metrics::{Closed, PoolMetrics};
use crate::credentials::{Credentials, Generation};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{BoxFuture, ConnectionGuard, Current, Engine};

/// How a backend opens and checks one connection.
pub trait Connect: Send + Sync + 'static {
    /// The connection type.
    type Conn: Send + 'static;
    /// The driver's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Open a connection logged in with `creds`.
    fn open<'a>(&'a self, creds: &'a Credentials)
    -> BoxFuture<'a, Result<Self::Conn, Self::Error>>;

    /// Whether the server refused the credentials (as opposed to being unreachable).
    fn is_auth_failure(&self, e: &Self::Error) -> bool;

    /// What to fix when `e` is a TLS problem (a certificate refused, TLS required or not
    /// offered); `None` otherwise.
    fn tls_problem(&self, _e: &Self::Error) -> Option<&'static str> {
        None
    }

    /// What the backend said, for messages (`FATAL: too many connections for role …`),
    /// when the driver's own text hides it ("db error"). Default `None`: a driver of
    /// your own may echo its connection string (with a password) in its errors, and
    /// its error stays reachable through `source()` only.
    fn reason(&self, _e: &Self::Error) -> Option<String> {
        None
    }

    /// More about a TLS problem, added to its message: e.g. what the certificate files
    /// held when last read, when the server refused the client certificate. Default:
    /// nothing.
    fn tls_detail(&self, _e: &Self::Error) -> Option<String> {
        None
    }

    /// A check before an idle connection is reused; `Err` closes it.
    fn check<'a>(&'a self, conn: &'a mut Self::Conn) -> BoxFuture<'a, Result<(), String>>;

    /// What the connections go to, for messages: "PostgreSQL at db:5432/app".
    fn target(&self) -> String;
}

/// One connection, opened with one generation's credentials.
pub struct Tagged<C: Connect> {
    conn: C::Conn,
    generation: Generation,
    engine: Engine,
    /// Closed when it is reused past this moment (the pool's max lifetime, jittered).
    retire_after: Option<Instant>,
    _guard: ConnectionGuard,
}

/// The deadpool manager over a [`Connect`].
pub struct RotatingManager<C: Connect> {
    engine: Engine,
    connect: C,
    auth_failure_wait: Duration,
    warm: Arc<Warm<C>>,
    metrics: PoolMetrics,
}

/// Connections opened with new credentials before they were swapped in (a pre-warm),
/// waiting to replace the retired generation's: `create` takes one before it connects.
/// Bounded: at most the pool's size per rotation, closed [`PREPARED_FOR`] after the swap
/// if no checkout took them, at the next generation, and when the pool closes.
pub(crate) struct Warm<C: Connect> {
    conns: Mutex<Vec<Prepared<C>>>,
    /// The pool, to know how many connections a pre-warm should open (set once built).
    pool: OnceLock<managed::WeakPool<RotatingManager<C>>>,
    settings: super::handle::PoolSettings,
}

/// How long prepared connections nobody took are kept after the swap.
const PREPARED_FOR: Duration = Duration::from_secs(30);

/// A connection opened for one lease's credentials (never shown: no Debug).
struct Prepared<C: Connect> {
    lease_id: String,
    username: String,
    password: secrecy::SecretString,
    conn: C::Conn,
}

impl<C: Connect> Prepared<C> {
    fn is_for(&self, current: &Current) -> bool {
        self.lease_id == current.lease.id
            && self.username == current.credentials.username
            && self.password.expose_secret() == current.credentials.password.expose_secret()
    }
}

impl<C: Connect> Warm<C> {
    pub(crate) fn new(settings: super::handle::PoolSettings) -> Self {
        Self {
            conns: Mutex::new(Vec::new()),
            pool: OnceLock::new(),
            settings,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Prepared<C>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A prepared connection for `current`, if any. Others are left alone: during a
    /// pre-warm, the ones being prepared are for credentials not yet serving.
    fn take(&self, current: &Current) -> Option<C::Conn> {
        let mut conns = self.lock();
        let at = conns.iter().rposition(|p| p.is_for(current))?;
        Some(conns.swap_remove(at).conn)
    }

    /// Close the prepared connections that are not for `serving` (all, for `None`).
    fn close_except_for(&self, serving: Option<&Current>) {
        self.lock()
            .retain(|p| serving.is_some_and(|current| p.is_for(current)));
    }

    /// Close the prepared connections for `serving` that no checkout took; those being
    /// prepared for a rotation under way (other credentials) are left to it.
    fn close_untaken_for(&self, serving: &Current) {
        self.lock().retain(|p| !p.is_for(serving));
    }

    /// How many prepared connections there are.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// How many to open: as many as the pool holds now (each will be replaced), less
    /// what is already prepared (for any credentials: the database's connection limit
    /// counts them all), never more than the pool's maximum.
    fn wanted(&self) -> usize {
        let size = self
            .pool
            .get()
            .and_then(managed::WeakPool::upgrade)
            .map_or(0, |p| p.status().size);
        size.min(self.settings.max_size).saturating_sub(self.len())
    }
}

/// The engine's pre-warm for a pool: open [`Warm::wanted`] connections with the new
/// credentials, `concurrency` at a time, each bounded by the pool's create timeout; each
/// is kept as soon as it is open (a pre-warm cut by its bound keeps what it opened). A
/// connection that fails to open is skipped: the verification already proved the
/// credentials, and a replacement is opened on demand anyway.
pub(crate) fn prewarmer<C: Connect + Clone>(
    warm: Arc<Warm<C>>,
    connect: C,
) -> crate::lease::Prewarm {
    Arc::new(move |leased: crate::lease::Prepare| {
        let (warm, connect) = (warm.clone(), connect.clone());
        Box::pin(async move {
            let want = warm.wanted();
            let concurrency = warm.settings.prewarm_concurrency.max(1);
            let per_connect = warm
                .settings
                .timeouts
                .create
                .unwrap_or(Duration::from_secs(10));
            let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..want {
                let (warm, connect, leased, permits) = (
                    warm.clone(),
                    connect.clone(),
                    leased.clone(),
                    permits.clone(),
                );
                tasks.spawn(async move {
                    let _permit = permits.acquire_owned().await.ok()?;
                    let conn = tokio::time::timeout(per_connect, connect.open(&leased.credentials))
                        .await
                        .ok()?
                        .ok()?;
                    warm.lock().push(Prepared {
                        lease_id: leased.lease_id.clone(),
                        username: leased.credentials.username.clone(),
                        password: leased.credentials.password.clone(),
                        conn,
                    });
                    Some(())
                });
            }
            // Dropping the set (the engine's bound cut this future) aborts the rest.
            let mut opened: usize = 0;
            while let Some(done) = tasks.join_next().await {
                if matches!(done, Ok(Some(()))) {
                    opened += 1;
                }
            }
            opened
        }) as BoxFuture<'static, usize>
    })
}

impl<C: Connect> fmt::Debug for RotatingManager<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingManager")
            .field("source", &self.engine.source())
            .field("target", &self.connect.target())
            .finish()
    }
}

impl<C: Connect> RotatingManager<C> {
    pub(crate) fn new(
        engine: Engine,
        connect: C,
        auth_failure_wait: Duration,
        warm: Arc<Warm<C>>,
    ) -> Self {
        let metrics = PoolMetrics::new(engine.label());
        Self {
            engine,
            connect,
            auth_failure_wait,
            warm,
            metrics,
        }
    }

    /// When a connection opened now should be closed: the max lifetime, less up to 20 %
    /// chosen here (so a fleet of pools does not reconnect in step).
    fn retire_after(&self) -> Option<Instant> {
        // At most ~100 years: the product below cannot overflow.
        let lifetime = self
            .warm
            .settings
            .max_lifetime?
            .min(Duration::from_secs(100 * 365 * 86_400));
        Instant::now().checked_add(lifetime.mul_f64(1.0 - 0.2 * fastrand::f64()))
    }

    /// What the connections go to, for messages.
    pub(crate) fn target(&self) -> String {
        self.connect.target()
    }

    async fn open(&self, current: &Current) -> Result<Tagged<C>, C::Error> {
        // Counted from the moment it starts opening: a generation retired while one of its
        // connections is still in its handshake must not be revoked under it (revocation
        // drops the user, and ends its sessions).
        let guard = current.track();
        let conn = self.connect.open(&current.credentials).await?;
        Ok(Tagged {
            conn,
            generation: current.generation,
            engine: self.engine.clone(),
            retire_after: self.retire_after(),
            _guard: guard,
        })
    }

    /// [`open`](Self::open), counted in the metrics when it opened.
    async fn open_counted(&self, current: &Current) -> Result<Tagged<C>, C::Error> {
        let opened = self.open(current).await;
        if opened.is_ok() {
            self.metrics.opened();
        }
        opened
    }

    fn connect_error(&self, generation: Generation, e: C::Error) -> Error {
        let what = format!(
            "connecting to {} with {} (generation {})",
            self.connect.target(),
            self.engine.source(),
            generation.0
        );
        match tls_fix(&self.connect, &e) {
            Some(fix) => Error::new(ErrorKind::Tls, format!("{what}: {fix}"))
                .with_source(e)
                .fix_given(),
            None => {
                let what = match self.connect.reason(&e) {
                    Some(why) => format!("{what}: {why}"),
                    None => what,
                };
                Error::new(ErrorKind::Backend, what).with_source(e)
            }
        }
    }
}

impl<C: Connect> managed::Manager for RotatingManager<C> {
    type Type = Tagged<C>;
    type Error = Error;

    async fn create(&self) -> Result<Tagged<C>> {
        let current = self.engine.usable()?;
        // One opened before the swap with these credentials: no connect on this path.
        // Counted first (as `open` does), then checked (it waited unused; a server or a
        // middlebox may have closed it); still the serving generation after that.
        let guard = current.track();
        if let Some(mut conn) = self.warm.take(&current)
            && self.connect.check(&mut conn).await.is_ok()
            && self.engine.generation() == current.generation
        {
            self.metrics.opened(); // opened by the pre-warm, in the pool from now on
            return Ok(Tagged {
                conn,
                generation: current.generation,
                engine: self.engine.clone(),
                retire_after: self.retire_after(),
                _guard: guard,
            });
        }
        drop(guard);
        let opened = self.open_counted(&current).await;
        match opened {
            Ok(conn) => Ok(conn),
            Err(e) if self.connect.is_auth_failure(&e) => {
                // Refused although the lease should be valid (revoked from outside?):
                // re-lease once, shared by every caller that saw the same refusal.
                self.engine.report_auth_failure(current.generation);
                let now = self
                    .engine
                    .wait_newer(current.generation, self.auth_failure_wait)
                    .await;
                if now == current.generation {
                    return Err(Error::new(
                        ErrorKind::CredentialsUnavailable,
                        format!(
                            "{} refused the credentials of {} (generation {}) and no new ones \
                             could be leased within {:?}",
                            self.connect.target(),
                            self.engine.source(),
                            current.generation.0,
                            self.auth_failure_wait
                        ),
                    )
                    .with_source(e));
                }
                let current = self.engine.usable()?;
                self.open_counted(&current)
                    .await
                    .map_err(|e| self.connect_error(current.generation, e))
            }
            Err(e) => Err(self.connect_error(current.generation, e)),
        }
    }

    async fn recycle(&self, conn: &mut Tagged<C>, _: &Metrics) -> RecycleResult<Error> {
        if !self.engine.generation_may_serve(conn.generation)? {
            self.metrics.closed(Closed::Rotated, 1);
            return Err(RecycleError::message("credentials rotated"));
        }
        if conn.retire_after.is_some_and(|at| Instant::now() >= at) {
            self.metrics.closed(Closed::MaxLifetime, 1);
            return Err(RecycleError::message("max lifetime reached"));
        }
        self.connect.check(&mut conn.conn).await.map_err(|e| {
            self.metrics.closed(Closed::Broken, 1);
            RecycleError::message(e)
        })
    }
}

/// A pooled connection: derefs to the driver's connection. Returned to the pool on drop —
/// or closed, if its generation was retired while it was checked out.
pub struct Pooled<C: Connect> {
    obj: Option<Object<RotatingManager<C>>>,
}

impl<C: Connect> From<Object<RotatingManager<C>>> for Pooled<C> {
    fn from(obj: Object<RotatingManager<C>>) -> Self {
        Self { obj: Some(obj) }
    }
}

impl<C: Connect> Pooled<C> {
    /// The credentials generation this connection logged in with.
    pub fn generation(&self) -> Generation {
        self.tagged().generation
    }

    fn tagged(&self) -> &Tagged<C> {
        self.obj.as_ref().expect("present until drop")
    }
}

impl<C: Connect> Deref for Pooled<C> {
    type Target = C::Conn;
    fn deref(&self) -> &C::Conn {
        &self.tagged().conn
    }
}

impl<C: Connect> DerefMut for Pooled<C> {
    fn deref_mut(&mut self) -> &mut C::Conn {
        &mut self.obj.as_mut().expect("present until drop").conn
    }
}

impl<C: Connect> Drop for Pooled<C> {
    fn drop(&mut self) {
        if let Some(obj) = self.obj.take()
            && obj.generation != obj.engine.generation()
        {
            // Retired while checked out: close it instead of returning it.
            if let Some(pool) = Object::pool(&obj) {
                pool.manager().metrics.closed(Closed::Rotated, 1);
            }
            drop(Object::take(obj));
        }
    }
}

impl<C: Connect> fmt::Debug for Pooled<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pooled")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

/// A verifier for the lease engine: open one connection with the new credentials and
/// check it, through the same [`Connect`] the pool uses.
pub(crate) fn verifier<C: Connect + Clone>(connect: C) -> crate::lease::Verifier {
    std::sync::Arc::new(move |creds: Credentials| {
        let connect = connect.clone();
        Box::pin(async move {
            let what = || format!("verifying new credentials against {}", connect.target());
            let mut conn = connect.open(&creds).await.map_err(|e| {
                let why = connect.reason(&e);
                super::diagnosis::verify_connect_error(
                    format!("{} as {}", what(), creds.username),
                    e,
                    why,
                    |e| tls_fix(&connect, e),
                    |e| connect.is_auth_failure(e),
                )
            })?;
            connect
                .check(&mut conn)
                .await
                .map_err(|e| Error::new(ErrorKind::Backend, format!("{}: {e}", what())))
        }) as BoxFuture<'static, Result<()>>
    })
}

/// What to fix for a TLS problem `e`, with the backend's detail (what the certificate
/// files held) after it.
fn tls_fix<C: Connect>(connect: &C, e: &C::Error) -> Option<String> {
    let fix = connect.tls_problem(e)?;
    Some(match connect.tls_detail(e) {
        Some(detail) => format!("{fix}; {detail}"),
        None => fix.to_owned(),
    })
}

/// The pool type of an adapter.
pub(crate) type Pool<C> = managed::Pool<RotatingManager<C>, Pooled<C>>;

/// A pool plus the task retiring idle connections: what the clones of a
/// [`VaultPool`](super::VaultPool) share.
pub(crate) struct PoolState<C: Connect> {
    pub(crate) pool: Pool<C>,
    pub(crate) engine: Engine,
    retire_task: tokio::task::JoinHandle<()>,
    sample_task: tokio::task::JoinHandle<()>,
}

impl<C: Connect> Drop for PoolState<C> {
    fn drop(&mut self) {
        self.retire_task.abort();
        self.sample_task.abort();
    }
}

/// How often the pool's sizes are sampled into its gauges.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Sample the pool's sizes into its gauges, once a second, while it exists.
async fn sample_sizes<C: Connect>(pool: managed::WeakPool<RotatingManager<C>>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.manager().metrics.sample(&pool.status());
    }
}

impl<C: Connect> PoolState<C> {
    /// Build the deadpool pool over `connect` and start retiring idle connections of old
    /// generations.
    pub(crate) fn build(
        engine: Engine,
        connect: C,
        settings: super::handle::PoolSettings,
        warm: Arc<Warm<C>>,
        auth_failure_wait: Duration,
    ) -> Result<Self> {
        let source = engine.source().to_owned();
        let manager =
            RotatingManager::new(engine.clone(), connect, auth_failure_wait, warm.clone());
        let pool = Pool::<C>::builder(manager)
            .max_size(settings.max_size)
            .timeouts(settings.timeouts)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| {
                Error::new(ErrorKind::Config, format!("building the pool for {source}"))
                    .with_source(e)
            })?;
        let _ = warm.pool.set(pool.weak());
        let retire_task = tokio::spawn(retire_idle(engine.subscribe(), pool.weak()));
        let sample_task = tokio::spawn(sample_sizes(pool.weak()));
        Ok(Self {
            sample_task,
            pool,
            engine,
            retire_task,
        })
    }

    pub(crate) async fn get(&self) -> Result<Pooled<C>> {
        let started = Instant::now();
        let got = self.pool.get().await;
        let timed_out = matches!(got, Err(PoolError::Timeout(_)));
        self.pool
            .manager()
            .metrics
            .checkout(started.elapsed(), timed_out);
        got.map_err(|e| self.pool_error(e))
    }

    pub(crate) fn status(&self) -> super::PoolStatus {
        let pool = self.pool.status();
        super::PoolStatus {
            lease: self.engine.status(),
            size: pool.size,
            available: pool.available,
            waiting: pool.waiting,
            max_size: pool.max_size,
            prepared: self.pool.manager().warm.len(),
        }
    }

    pub(crate) async fn close(&self) {
        self.pool.close();
        self.pool.manager().warm.close_except_for(None);
        self.engine.close().await;
        // A rotation cut by the close may have prepared some meanwhile.
        self.pool.manager().warm.close_except_for(None);
    }

    fn pool_error(&self, e: PoolError<Error>) -> Error {
        let role = self.engine.source();
        let target = self.pool.manager().connect.target();
        match e {
            PoolError::Backend(e) => e,
            PoolError::Timeout(managed::TimeoutType::Wait) => Error::new(
                ErrorKind::PoolTimeout,
                format!(
                    "waiting for a connection to {target} ({role}): all {} connections \
                     stayed busy for the wait timeout; raise max_size or the wait timeout",
                    self.pool.status().max_size
                ),
            ),
            PoolError::Timeout(t) => Error::new(
                ErrorKind::PoolTimeout,
                format!("{t:?} a connection to {target} ({role}) timed out"),
            ),
            PoolError::Closed => Error::new(
                ErrorKind::Shutdown,
                format!("getting a connection to {target} ({role}): the pool was closed"),
            ),
            PoolError::NoRuntimeSpecified => {
                Error::new(ErrorKind::Config, "getting a connection: no async runtime")
            }
            PoolError::PostCreateHook(h) => Error::new(
                ErrorKind::Backend,
                format!("getting a connection to {target} ({role}): post-create hook: {h}"),
            ),
        }
    }
}

/// On every new generation, close the idle connections of older ones (and prepared
/// connections not for the serving credentials); [`PREPARED_FOR`] after it, the
/// prepared connections no checkout took.
async fn retire_idle<C: Connect>(
    mut generations: tokio::sync::watch::Receiver<Generation>,
    pool: managed::WeakPool<RotatingManager<C>>,
) {
    let mut purge_at: Option<tokio::time::Instant> = None;
    loop {
        let changed = match purge_at {
            Some(at) => tokio::select! {
                changed = generations.changed() => changed,
                () = tokio::time::sleep_until(at) => {
                    purge_at = None;
                    let Some(pool) = pool.upgrade() else { return };
                    if let Ok(serving) = pool.manager().engine.usable() {
                        pool.manager().warm.close_untaken_for(&serving);
                    }
                    continue;
                }
            },
            None => generations.changed().await,
        };
        if changed.is_err() {
            return;
        }
        let current = *generations.borrow_and_update();
        let Some(pool) = pool.upgrade() else { return };
        let serving = pool.manager().engine.usable().ok();
        pool.manager().warm.close_except_for(serving.as_deref());
        purge_at = Some(tokio::time::Instant::now() + PREPARED_FOR);
        let retired = pool.retain(|conn, _| conn.generation >= current);
        pool.manager()
            .metrics
            .closed(Closed::Rotated, retired.removed.len() as u64);
        if !retired.removed.is_empty() {
            tracing::debug!(
                generation = current.0,
                closed = retired.removed.len(),
                "closed idle connections of retired credentials"
            );
        }
    }
}
