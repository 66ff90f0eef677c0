//! `VaultSqlxPool`: a real `sqlx::PgPool` that never changes identity
//! while its credentials rotate underneath (feature `sqlx`).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use vaultpool::sqlx::VaultSqlxPool;
//!
//! let pool = VaultSqlxPool::new("immune-readwrite").await?;
//! // Pass `pool.pool()` to any sqlx code: it is a plain `sqlx::PgPool`.
//! use vaultpool::sqlx::sqlx; // or your own `sqlx` 0.9 dependency
//! let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
//!     .fetch_one(pool.pool())
//!     .await?;
//! # let _ = n;
//! pool.close().await;
//! # Ok(()) }
//! ```
//!
//! How rotation works here: on every new generation the pool's connect options are
//! replaced ([`PgPool::set_connect_options`](::sqlx::Pool::set_connect_options)), so new
//! connections log in with the new credentials. Connections opened before that moment
//! are retired by the pool's `before_acquire` and `after_release` hooks (an idle one is
//! closed instead of handed out, a busy one is closed when released), and idle ones are
//! cycled out at once. The old lease is revoked once PostgreSQL reports no session of
//! the old user (`pg_stat_activity`), or at the drain deadline.
//!
//! sqlx does not say which credentials a connection used. Each new connection asks
//! PostgreSQL (`SELECT session_user`, once, in `after_connect`) and is discarded — sqlx
//! logs that at ERROR and connects again with the current options — if it logged in as
//! one of the last retired users (a connect that began before the swap); a connection
//! that already existed at the swap is recognised by its age. Hooks set on the
//! `PgPoolOptions` given to [`pool_options`](pool::Builder::pool_options) are replaced by
//! these; give yours to the builder instead.
//!
//! A retired generation drains until PostgreSQL shows no session of its user, or the
//! engine revokes it at its drain deadline (just before its lease's end); `close()` waits
//! at most 30 s for connections in use (a `PgListener` holds one for ever), then revokes
//! regardless.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use secrecy::ExposeSecret;

pub use ::sqlx;

use crate::credentials::Generation;
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{self, ConnectionGuard, CredentialSource, Current, DatabaseRole, Engine};
use crate::libpq::{SslMode, read_database_url};
use crate::pool::{self, PoolStatus, diagnosis};

/// How often the sqlx flavour asks Vault whether its lease still exists, by default.
const LEASE_CHECK: Duration = Duration::from_secs(15);
/// How long `close()` waits for connections to be returned before it revokes anyway.
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// Connections whose user was checked just before a swap are recycled once.
const SWAP_GRACE: Duration = Duration::from_millis(100);
/// How many retired users a new connection is checked against.
const RETIRED_USERS_KEPT: usize = 8;
/// How often a draining generation is checked.
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// How often, by default, a login with the current credentials is tried while the pool
/// is in use and has no idle connection (it may be failing to open one), so that code
/// using `pool()` directly gets the re-lease on a refused login that `acquire()`
/// triggers at once.
const LOGIN_PROBE: Duration = Duration::from_secs(15);
/// "In use": a connection acquired, released or opened within this long.
const LOGIN_PROBE_ACTIVE: Duration = Duration::from_secs(300);
/// A pool not in use (no hook fired for `LOGIN_PROBE_ACTIVE`) is probed at most this
/// often: a refused login fires no hook, so an idle pool cannot be skipped entirely.
const LOGIN_PROBE_IDLE: Duration = Duration::from_secs(300);

/// When the last swap happened, shared with the pool's hooks.
struct Swap {
    base: Instant,
    /// Connections created before `base + stale_before_ns` may hold old credentials.
    stale_before_ns: AtomicU64,
    /// The users of the last few retired generations: a new connection logged in as one
    /// of them began before the swap, and is refused.
    retired_users: Mutex<VecDeque<String>>,
    /// When a hook last fired (a connection acquired, released or opened), since `base`.
    last_used_ns: AtomicU64,
}

impl Swap {
    /// The options now hold new credentials; `old_user` is retired.
    fn mark(&self, old_user: String) {
        {
            let mut retired = self.retired_users.lock().unwrap_or_else(|e| e.into_inner());
            if retired.len() == RETIRED_USERS_KEPT {
                retired.pop_front();
            }
            retired.push_back(old_user);
        }
        // The grace covers a connection whose user was checked just before the swap but
        // that sqlx counts as created just after it (the check comes first).
        let at = self.base.elapsed() + SWAP_GRACE;
        self.stale_before_ns
            .store(at.as_nanos() as u64, Ordering::Release);
    }

    /// Whether `user` (PostgreSQL's `session_user`, cut to 63 bytes) is a retired one.
    fn is_retired(&self, user: &str) -> bool {
        let retired = self.retired_users.lock().unwrap_or_else(|e| e.into_inner());
        retired.iter().any(|r| {
            // PostgreSQL cuts names to 63 bytes: a longer retired name matches its cut.
            r == user
                || (r.len() > 63 && user.len() == 63 && r.as_bytes().starts_with(user.as_bytes()))
        })
    }

    fn new(base: Instant) -> Self {
        Self {
            base,
            stale_before_ns: AtomicU64::new(0),
            retired_users: Mutex::new(VecDeque::new()),
            last_used_ns: AtomicU64::new(0),
        }
    }

    fn used(&self) {
        let now = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_used_ns.store(now, Ordering::Relaxed);
    }

    fn used_within(&self, d: Duration) -> bool {
        let last = Duration::from_nanos(self.last_used_ns.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last) < d
    }

    /// Whether a connection of this age was opened before the last swap (plus grace).
    fn is_stale(&self, age: Duration) -> bool {
        let stale_before = Duration::from_nanos(self.stale_before_ns.load(Ordering::Acquire));
        if stale_before.is_zero() {
            return false;
        }
        let created = self.base.elapsed().saturating_sub(age);
        created < stale_before
    }
}

/// A sqlx PostgreSQL pool on dynamic Vault credentials. Cheap to clone.
#[derive(Clone)]
pub struct VaultSqlxPool {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    engine: Engine,
    /// The generation whose credentials the pool's connect options hold.
    applied: tokio::sync::watch::Receiver<Generation>,
    auth_failure_wait: Duration,
    task: tokio::task::JoinHandle<()>,
    /// Cancels the drain tasks of retired generations.
    drains: tokio_util::sync::CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.task.abort();
        self.drains.cancel();
    }
}

impl fmt::Debug for VaultSqlxPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultSqlxPool")
            .field("source", &self.inner.engine.source())
            .field("generation", &self.inner.engine.generation())
            .field("size", &self.inner.pool.size())
            .finish()
    }
}

fn options_for(base: &PgConnectOptions, current: &Current) -> PgConnectOptions {
    base.clone()
        .username(&current.credentials.username)
        .password(current.credentials.password.expose_secret())
}

fn is_auth_failure(e: &::sqlx::Error) -> bool {
    // pg_hba's "no encryption" refusal has an auth SQLSTATE too: a TLS matter.
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| diagnosis::PG_AUTH_FAILURE.contains(&c.as_ref()))
        && tls_problem(e).is_none()
}

fn tls_problem(e: &::sqlx::Error) -> Option<&'static str> {
    let code = e.as_database_error().and_then(|d| d.code());
    diagnosis::postgres_tls_diagnosis(code.as_deref(), &diagnosis::chain_text(e))
}

impl VaultSqlxPool {
    /// A pool for `role`: Vault from the Vault CLI's environment variables, PostgreSQL from
    /// `DATABASE_URL` (no password) or the libpq variables.
    ///
    /// # Errors
    /// As [`Builder::build`].
    pub async fn new(role: impl Into<String>) -> Result<Self> {
        Self::builder(role).build().await
    }

    /// A builder for the database role `role` on the mount `database`, whose lease is
    /// looked up every 15 s ([`DatabaseRole::check_lease_every`]). Code that uses
    /// [`pool()`](Self::pool) directly bypasses [`acquire()`](Self::acquire)'s re-lease
    /// on a refused login; for it a lease revoked from outside is noticed by that lookup,
    /// and any other refusal (a password changed or a user dropped in PostgreSQL) by the
    /// [login probe](Builder::login_probe) (a login every 15 s while the pool is in
    /// use and has no idle connection). With [`builder_for`](Self::builder_for), set the
    /// lookup on the `DatabaseRole` yourself (the login probe is on by default).
    pub fn builder(role: impl Into<String>) -> Builder {
        Self::builder_for(DatabaseRole::new(role).check_lease_every(LEASE_CHECK))
    }

    /// A builder for any [`CredentialSource`].
    pub fn builder_for(source: impl Into<CredentialSource>) -> Builder {
        pool::Builder::new(
            source,
            SqlxTarget {
                connect: None,
                pool_options: PgPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(10)),
                hooks: UserHooks::default(),
                login_probe: Some(LOGIN_PROBE),
            },
        )
    }

    /// The `sqlx::PgPool`: the same pool for the whole life of this handle, whatever the
    /// rotations. Hand it to any sqlx code.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Acquire a connection, checking the lease first and re-leasing once if PostgreSQL
    /// refuses the current credentials.
    ///
    /// # Errors
    /// [`ErrorKind::LeaseExpired`] naming the role when the credentials have run out;
    /// [`ErrorKind::PoolTimeout`] when none frees up in time; [`ErrorKind::Backend`]
    /// otherwise.
    pub async fn acquire(&self) -> Result<::sqlx::pool::PoolConnection<::sqlx::Postgres>> {
        let current = self.inner.engine.usable()?;
        match self.inner.pool.acquire().await {
            Ok(c) => Ok(c),
            Err(e) if is_auth_failure(&e) => {
                self.inner.engine.report_auth_failure(current.generation);
                self.inner
                    .engine
                    .wait_newer(current.generation, self.inner.auth_failure_wait)
                    .await;
                self.inner
                    .pool
                    .acquire()
                    .await
                    .map_err(|e| self.error("acquiring a PostgreSQL connection", e))
            }
            Err(e) => Err(self.error("acquiring a PostgreSQL connection", e)),
        }
    }

    fn error(&self, what: &str, e: ::sqlx::Error) -> Error {
        let kind = match e {
            ::sqlx::Error::PoolTimedOut => ErrorKind::PoolTimeout,
            ::sqlx::Error::PoolClosed => ErrorKind::Shutdown,
            _ => ErrorKind::Backend,
        };
        Error::new(kind, format!("{what} ({})", self.inner.engine.source())).with_source(e)
    }

    /// The lease engine behind the pool.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Rotate now; returns once the new generation is serving (connect options swapped).
    ///
    /// # Errors
    /// As [`Engine::rotate`].
    pub async fn rotate(&self) -> Result<Generation> {
        let g = self.inner.engine.rotate().await?;
        // The follow task applies the new options; wait until it has.
        let mut applied = self.inner.applied.clone();
        let _ = applied.wait_for(|seen| *seen >= g).await;
        Ok(g)
    }

    /// Pool and lease status (sqlx does not report waiting callers: `waiting` is 0).
    pub fn status(&self) -> PoolStatus {
        let pool = &self.inner.pool;
        PoolStatus {
            lease: self.inner.engine.status(),
            size: pool.size() as usize,
            available: pool.num_idle(),
            waiting: 0,
            max_size: pool.options().get_max_connections() as usize,
            prepared: 0,
        }
    }

    /// Close: wait for every connection to be returned and closed (sqlx's `close`), at
    /// most 30 s — a connection held for ever (a `PgListener`) cannot hold the revocation
    /// back — then revoke every lease. Calling it twice is harmless.
    pub async fn close(&self) {
        if !self.inner.pool.is_closed()
            && tokio::time::timeout(CLOSE_WAIT, self.inner.pool.close())
                .await
                .is_err()
        {
            tracing::warn!(
                source = %self.inner.engine.label(),
                "closing the sqlx pool: connections still in use after {CLOSE_WAIT:?}; \
                 revoking the leases anyway (their sessions end if the role's revocation \
                 statements end them)"
            );
        }
        self.inner.task.abort();
        self.inner.drains.cancel();
        self.inner.engine.close().await;
    }
}

/// Builds a [`VaultSqlxPool`]: the leasing setters of [`pool::Builder`] and the sqlx
/// ones below.
pub type Builder = pool::Builder<SqlxTarget>;

/// The sqlx settings of a [`Builder`].
pub struct SqlxTarget {
    connect: Option<PgConnectOptions>,
    pool_options: PgPoolOptions,
    hooks: UserHooks,
    login_probe: Option<Duration>,
}

/// A hook like sqlx's `before_acquire`/`after_release`: `Ok(false)` closes the connection.
pub type CheckHook = Arc<
    dyn for<'c> Fn(
            &'c mut ::sqlx::PgConnection,
            ::sqlx::pool::PoolConnectionMetadata,
        ) -> lease::BoxFuture<'c, std::result::Result<bool, ::sqlx::Error>>
        + Send
        + Sync,
>;

/// A hook like sqlx's `after_connect` (e.g. `SET search_path`).
pub type ConnectHook = Arc<
    dyn for<'c> Fn(
            &'c mut ::sqlx::PgConnection,
            ::sqlx::pool::PoolConnectionMetadata,
        ) -> lease::BoxFuture<'c, std::result::Result<(), ::sqlx::Error>>
        + Send
        + Sync,
>;

/// The user's own hooks, run after the pool's.
#[derive(Default)]
struct UserHooks {
    after_connect: Option<ConnectHook>,
    before_acquire: Option<CheckHook>,
    after_release: Option<CheckHook>,
}

/// Host, port and database only: sqlx's own `Debug` of `PgConnectOptions` prints a
/// password (e.g. one picked up from `PGPASSWORD`).
impl fmt::Debug for SqlxTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = self.connect.as_ref().map(|o| {
            format!(
                "{}:{}/{}",
                o.get_host(),
                o.get_port(),
                o.get_database().unwrap_or("(default database)")
            )
        });
        f.debug_struct("SqlxTarget")
            .field("connect", &target)
            .field("max_connections", &self.pool_options.get_max_connections())
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// Host, port, database, TLS; user and password are replaced by the lease's.
    /// Default: from `DATABASE_URL` or the libpq variables.
    pub fn connect_options(mut self, options: PgConnectOptions) -> Self {
        self.target.connect = Some(options);
        self
    }

    /// sqlx pool options (size, timeouts). Default: 16 connections, acquire timeout
    /// 10 s. Hooks set here (`after_connect`, `before_acquire`, `after_release`) are
    /// replaced by the pool's own — sqlx gives no way to read them back; give yours to
    /// [`after_connect`](Self::after_connect), [`before_acquire`](Self::before_acquire)
    /// and [`after_release`](Self::after_release) instead, which compose them with the
    /// pool's.
    pub fn pool_options(mut self, options: PgPoolOptions) -> Self {
        self.target.pool_options = options;
        self
    }

    /// How often a login with the current credentials is tried while the pool has no
    /// idle connection, so that code using [`pool()`](VaultSqlxPool::pool) directly heals
    /// from a refused login (a password changed or a user dropped in PostgreSQL) as
    /// [`acquire()`](VaultSqlxPool::acquire) does. Default every 15 s while the pool is
    /// in use (a connection acquired, released or opened in the last 5 min), else at most
    /// every 5 min; each login is bounded by the verify timeout. `None` turns it off
    /// (e.g. when every caller goes through `acquire()`).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] (at [`build`](pool::Builder::build)) for an interval under 1 s
    /// or over a day.
    pub fn login_probe(mut self, every: Option<Duration>) -> Self {
        self.target.login_probe = every;
        self
    }

    /// Your `after_connect` hook (e.g. `SET search_path`), run before the pool's own
    /// check of the new connection's user (so that nothing runs after the check).
    /// Default: none.
    pub fn after_connect(mut self, hook: ConnectHook) -> Self {
        self.target.hooks.after_connect = Some(hook);
        self
    }

    /// Your `before_acquire` hook, run for connections the pool keeps (those of a
    /// retired generation are closed first). Default: none.
    pub fn before_acquire(mut self, hook: CheckHook) -> Self {
        self.target.hooks.before_acquire = Some(hook);
        self
    }

    /// Your `after_release` hook, run for connections the pool keeps. Default: none.
    pub fn after_release(mut self, hook: CheckHook) -> Self {
        self.target.hooks.after_release = Some(hook);
        self
    }

    /// Lease and verify the first credentials, start the engine, build the pool.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for missing settings; whatever leasing or the verifying
    /// connection fails with.
    pub async fn build(self) -> Result<VaultSqlxPool> {
        let (lease, target) = (self.lease, self.target);
        lease.source.validate()?;
        if matches!(
            lease.source,
            CredentialSource::Kv(_) | CredentialSource::StaticRole(_) | CredentialSource::Custom(_)
        ) {
            // The sqlx flavour tells generations apart by user (pg_stat_activity); every
            // version of a KV secret or static role has the same user (and a custom source
            // may), so a drain could never end and new logins would be taken for retired.
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "building a sqlx pool on {}: the sqlx flavour needs a new user per \
                     generation (a dynamic database role); use VaultPgPool for static \
                     credentials (KV, a static role) or a credential source of your own",
                    lease.source
                ),
            ));
        }
        let base = match target.connect {
            Some(o) => o,
            None => options_from_env()?,
        };
        refuse_weak_tls(&base)?;
        let verify = {
            let base = base.clone();
            let role = lease.source.to_string();
            Arc::new(move |creds: crate::Credentials| {
                let options = base
                    .clone()
                    .username(&creds.username)
                    .password(creds.password.expose_secret());
                let role = role.clone();
                Box::pin(async move {
                    use ::sqlx::Connection;
                    let what = || {
                        format!(
                            "verifying new credentials of {role} against PostgreSQL at {}:{}",
                            options.get_host(),
                            options.get_port()
                        )
                    };
                    let mut conn =
                        ::sqlx::PgConnection::connect_with(&options)
                            .await
                            .map_err(|e| {
                                diagnosis::verify_connect_error(
                                    what(),
                                    e,
                                    tls_problem,
                                    is_auth_failure,
                                )
                            })?;
                    let pinged = conn.ping().await;
                    let _ = conn.close().await;
                    pinged.map_err(|e| Error::new(ErrorKind::Backend, what()).with_source(e))
                }) as lease::BoxFuture<'static, Result<()>>
            }) as lease::Verifier
        };
        if target
            .login_probe
            .is_some_and(|d| d < Duration::from_secs(1) || d > Duration::from_secs(86_400))
        {
            return Err(Error::new(
                ErrorKind::Config,
                "building a sqlx pool: the login probe interval must be between 1 s (more \
                 often would load PostgreSQL) and 1 day; or None to turn it off",
            ));
        }
        let auth_failure_wait = lease.auth_failure_wait;
        let probe = target.login_probe.map(|every| LoginProbe {
            every,
            timeout: lease
                .verify_timeout
                .unwrap_or(lease::DEFAULT_VERIFY_TIMEOUT),
            verify: verify.clone(),
        });
        let vault = lease.vault()?;
        let engine = lease.engine(vault, verify.clone(), None).await?;
        let swap = Arc::new(Swap::new(Instant::now()));
        let (on_acquire, on_release, on_connect) = (swap.clone(), swap.clone(), swap.clone());
        let UserHooks {
            after_connect: user_connect,
            before_acquire: user_acquire,
            after_release: user_release,
        } = target.hooks;
        let current = engine.current();
        // `after_release` makes sqlx spawn a task per release (measured: +6% per
        // checkout), but without it a stale connection released under load goes back
        // into circulation until its next acquire, and draining takes longer than the
        // gap between two rotations (seen: three users alive at once).
        let pool = target
            .pool_options
            .after_connect(move |conn, meta| {
                // Logged in as a retired generation's user? A connect that began with the
                // options of a generation retired meanwhile is refused here (sqlx logs it
                // and connects again with the current options). The user's own hook runs
                // first, so that nothing follows the check.
                let (swap, user_hook) = (on_connect.clone(), user_connect.clone());
                swap.used();
                Box::pin(async move {
                    if let Some(hook) = user_hook {
                        hook(&mut *conn, meta).await?;
                    }
                    let user: String = ::sqlx::query_scalar("SELECT session_user::text")
                        .fetch_one(&mut *conn)
                        .await?;
                    if swap.is_retired(&user) {
                        return Err(::sqlx::Error::Configuration(
                            format!("connected as {user}, whose credentials were retired").into(),
                        ));
                    }
                    Ok(())
                })
            })
            .before_acquire(move |conn, meta| {
                on_acquire.used();
                let fresh = !on_acquire.is_stale(meta.age);
                let user_hook = user_acquire.clone();
                Box::pin(async move {
                    match user_hook {
                        Some(hook) if fresh => hook(conn, meta).await,
                        _ => Ok(fresh),
                    }
                })
            })
            .after_release(move |conn, meta| {
                on_release.used();
                let fresh = !on_release.is_stale(meta.age);
                let user_hook = user_release.clone();
                Box::pin(async move {
                    match user_hook {
                        Some(hook) if fresh => hook(conn, meta).await,
                        _ => Ok(fresh),
                    }
                })
            })
            .connect_lazy_with(options_for(&base, &current));
        let guard = current.track();
        let (applied_tx, applied) = tokio::sync::watch::channel(current.generation);
        let drains = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(follow(
            engine.clone(),
            (pool.clone(), base),
            swap,
            (guard, current),
            (applied_tx, drains.clone()),
            probe,
        ));
        Ok(VaultSqlxPool {
            inner: Arc::new(Inner {
                pool,
                engine,
                applied,
                auth_failure_wait,
                task,
                drains,
            }),
        })
    }
}

/// The login probe's settings.
struct LoginProbe {
    every: Duration,
    timeout: Duration,
    verify: lease::Verifier,
}

/// Apply every new generation to the pool and drain the old one; probe the login while
/// the pool has no idle connection.
async fn follow(
    engine: Engine,
    (pool, base): (PgPool, PgConnectOptions),
    swap: Arc<Swap>,
    (mut guard, mut current): (ConnectionGuard, Arc<Current>),
    (applied, drains): (
        tokio::sync::watch::Sender<Generation>,
        tokio_util::sync::CancellationToken,
    ),
    probe: Option<LoginProbe>,
) {
    let mut generations = engine.subscribe();
    // Without a probe the timer never fires (its branch is disabled).
    let every = probe
        .as_ref()
        .map_or(Duration::from_secs(3600), |p| p.every);
    let mut probe_at = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    probe_at.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probing: Option<lease::BoxFuture<'static, ()>> = None;
    let mut last_probe = Instant::now();
    loop {
        tokio::select! {
            changed = generations.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = probe_at.tick(), if probe.is_some() && probing.is_none() => {
                let due = swap.used_within(LOGIN_PROBE_ACTIVE)
                    || last_probe.elapsed() >= LOGIN_PROBE_IDLE;
                if let Some(p) = probe.as_ref().filter(|_| due)
                    && !pool.is_closed()
                    && pool.num_idle() == 0
                {
                    last_probe = Instant::now();
                    probing = Some(Box::pin(probe_login(
                        engine.clone(),
                        p.verify.clone(),
                        p.timeout,
                    )));
                }
                continue;
            }
            () = async {
                match probing.as_mut() {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            }, if probing.is_some() => {
                probing = None;
                continue;
            }
        }
        let next = engine.current();
        if next.generation == current.generation {
            continue;
        }
        pool.set_connect_options(options_for(&base, &next));
        swap.mark(current.credentials.username.clone());
        applied.send_replace(next.generation);
        // Hold the new generation before letting go of the old one, so the engine never
        // sees a generation of ours at zero connections while it is still in use.
        let old_guard = std::mem::replace(&mut guard, next.track());
        let old = std::mem::replace(&mut current, next);
        tokio::spawn(drain(
            (pool.clone(), engine.clone()),
            old,
            old_guard,
            drains.clone(),
        ));
    }
}

/// One login with the current credentials, as the verifier does it; a refusal is
/// reported to the engine as `acquire()` would (it re-leases, with its backoff). sqlx has
/// no hook on a failed connect, so this is how `pool()` users get the same healing.
async fn probe_login(engine: Engine, verify: lease::Verifier, timeout: Duration) {
    let Ok(current) = engine.usable() else {
        return; // expired or closed: the engine is already replacing it, or done
    };
    match tokio::time::timeout(timeout, verify(current.credentials.clone())).await {
        Ok(Err(e)) if e.kind() == ErrorKind::AuthenticationFailed => {
            engine.report_auth_failure(current.generation);
        }
        Ok(Err(e)) if e.kind() == ErrorKind::Tls => {
            // It lasts (a certificate expired, a CA changed) and every new connection of
            // the pool fails with it: said where operators look.
            tracing::warn!("probing the login of {}: {e}", engine.label());
        }
        Ok(Err(e)) => {
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            tracing::debug!(
                cause = cause.as_deref().unwrap_or(""),
                "probing the login of {}: {e}",
                engine.label()
            );
        }
        Ok(Ok(())) => {}
        Err(_) => tracing::debug!(
            "probing the login of {}: no answer within {timeout:?}",
            engine.label()
        ),
    }
}

/// Close idle connections of the old generation at once, then hold its guard until
/// PostgreSQL has no session of the old user left, the engine has revoked it (its drain
/// deadline), or the pool closes.
async fn drain(
    (pool, engine): (PgPool, Engine),
    old: Arc<Current>,
    guard: ConnectionGuard,
    cancel: tokio_util::sync::CancellationToken,
) {
    let user = old.credentials.username.clone();
    loop {
        // The engine revokes at the generation's drain deadline (just before its lease's
        // end, renewals included) whatever is still open; then there is nothing to hold.
        if cancel.is_cancelled() || !engine.is_retiring(old.generation) {
            break;
        }
        // Cycle the idle queue: `before_acquire` closes stale connections.
        for _ in 0..pool.num_idle() {
            match pool.try_acquire() {
                Some(conn) => drop(conn),
                None => break,
            }
        }
        if pool.is_closed() {
            break;
        }
        let sessions: std::result::Result<i64, _> = ::sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1::text::name",
        )
        .bind(&user)
        .fetch_one(&pool)
        .await;
        match sessions {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => tracing::debug!("checking sessions of {user}: {e}"),
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(DRAIN_POLL) => {}
        }
    }
    tracing::debug!(generation = old.generation.0, user = %user, "sqlx generation drained");
    drop(guard);
}

/// sqlx's TLS trusts the public CAs besides the root certificate given: its `verify-ca`
/// would accept any public certificate for any name, and `sslrootcert=system` means every
/// public CA; and it checks nothing below `verify-ca`, where libpq (and the deadpool
/// flavour) check the chain when a root certificate is given. All are refused rather than
/// quietly weaker than libpq's — for the options given as for the environment's.
fn refuse_weak_tls(options: &PgConnectOptions) -> Result<()> {
    use ::sqlx::postgres::PgSslMode;
    // sqlx has no getter for the root certificate; its Debug shows it (the text, which
    // holds the password too, is only searched, never shown).
    let shown = format!("{options:?}");
    let root_given = !shown.contains("ssl_root_cert: None");
    let system_root = shown.contains("ssl_root_cert: Some(File(\"system\"))");
    if matches!(options.get_ssl_mode(), PgSslMode::VerifyCa) {
        return Err(Error::new(
            ErrorKind::Tls,
            "configuring TLS for the sqlx pool: sslmode=verify-ca is refused — sqlx's TLS also \
             trusts the public CAs, so any public certificate for any name would pass; use \
             verify-full (or the deadpool flavour, VaultPgPool, whose verify-ca trusts only \
             the root certificate)",
        )
        .fix_given());
    }
    if system_root {
        return Err(Error::new(
            ErrorKind::Tls,
            "configuring TLS for the sqlx pool: sslrootcert=system is not supported by sqlx \
             (it would be read as a file named \"system\"); give the CA's PEM file",
        )
        .fix_given());
    }
    let mode = options.get_ssl_mode();
    if root_given
        && matches!(
            mode,
            PgSslMode::Allow | PgSslMode::Prefer | PgSslMode::Require
        )
    {
        return Err(Error::new(
            ErrorKind::Tls,
            format!(
                "configuring TLS for the sqlx pool: sslmode={} with a root certificate — libpq \
                 (and the deadpool flavour) would check the server's certificate against it, \
                 sqlx would not check it at all; use sslmode=verify-full, or remove the root \
                 certificate",
                SslMode::from_sqlx(mode)
            ),
        )
        .fix_given());
    }
    Ok(())
}

/// sqlx connect options from `DATABASE_URL` (without password) or the libpq variables.
fn options_from_env() -> Result<PgConnectOptions> {
    if let Ok(mode) = std::env::var("PGSSLMODE")
        && !mode.trim().is_empty()
        && SslMode::from_name(mode.trim()).is_none()
    {
        // sqlx would quietly read an unknown mode as `prefer`.
        return Err(SslMode::unknown(&mode, "PGSSLMODE"));
    }
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let mut options: PgConnectOptions = read_database_url(
            &url,
            "(no password) or unset it",
            |url| {
                url.trim().parse().map_err(|e| {
                    Error::new(
                        ErrorKind::Config,
                        "reading DATABASE_URL: not a PostgreSQL URL",
                    )
                    .with_source(e)
                })
            },
            |_| url::Url::parse(url.trim()).is_ok_and(|u| u.password().is_some()),
        )?;
        // The URL's sslmode replaced PGSSLMODE's: keep the stronger (never weakened).
        if let Some(env_mode) = std::env::var("PGSSLMODE")
            .ok()
            .and_then(|m| SslMode::from_name(m.trim()))
            && env_mode > SslMode::from_sqlx(options.get_ssl_mode())
        {
            options = options.ssl_mode(env_mode.to_sqlx());
        }
        return Ok(options);
    }
    // PGHOST, PGPORT, PGDATABASE, PGSSLMODE … as libpq reads them (no .pgpass).
    Ok(PgConnectOptions::new_without_pgpass())
}

/// The credentials behind it (e.g. for a health check).
impl AsRef<Engine> for VaultSqlxPool {
    fn as_ref(&self) -> &Engine {
        self.engine()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_debug_never_shows_a_password() {
        let b = VaultSqlxPool::builder("r").connect_options(
            PgConnectOptions::new_without_pgpass()
                .host("db.internal")
                .port(5432) // not PGPORT's, whatever the environment says
                .password("hunter2-sqlx"),
        );
        let d = format!("{b:?}");
        assert!(
            d.contains("db.internal:5432") && !d.contains("hunter2"),
            "{d}"
        );
    }

    #[tokio::test]
    async fn a_kv_source_is_refused_before_anything_is_read() {
        let e = VaultSqlxPool::builder_for(crate::lease::KvCredentials::new("pg/static"))
            .build()
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("VaultPgPool"), "{e}");
    }

    #[test]
    fn connections_older_than_the_swap_are_stale() {
        let swap = Swap::new(Instant::now() - Duration::from_secs(100));
        assert!(!swap.is_stale(Duration::from_secs(50)), "no swap yet");
        swap.mark("v-old".into());
        // Opened 10 s ago: before the swap.
        assert!(swap.is_stale(Duration::from_secs(10)));
        // Opened just now: within the grace, recycled once to be safe.
        assert!(swap.is_stale(Duration::ZERO));
        let later = Swap::new(Instant::now() - Duration::from_secs(100));
        later
            .stale_before_ns
            .store(Duration::from_secs(90).as_nanos() as u64, Ordering::Relaxed);
        // Opened 5 s ago = at 95 s, after the swap at 90 s.
        assert!(!later.is_stale(Duration::from_secs(5)));
    }

    #[test]
    fn use_is_recorded_for_the_login_probe() {
        let swap = Swap::new(Instant::now() - Duration::from_secs(1000));
        assert!(!swap.used_within(LOGIN_PROBE_ACTIVE), "never used");
        swap.used();
        assert!(swap.used_within(Duration::from_secs(1)));
    }

    #[test]
    fn retired_users_are_recognised_even_cut_to_63_bytes() {
        let swap = Swap::new(Instant::now());
        let long = "v-approle-some-very-long-role-name-that-goes-past-the-limit-1796023347";
        swap.mark(long.into());
        swap.mark("v-short".into());
        assert!(swap.is_retired("v-short"));
        assert!(swap.is_retired(&long[..63]));
        assert!(!swap.is_retired("v-current"));
        for i in 0..RETIRED_USERS_KEPT {
            swap.mark(format!("v-{i}"));
        }
        assert!(!swap.is_retired("v-short"), "only the last few are kept");
    }
}
