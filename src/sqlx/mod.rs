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
//!
//! Here: the handle and its builder. The pool's hooks are in `hooks.rs`, what tells a
//! stale connection in `stale.rs`, the task that applies each generation, drains the old
//! one and probes the login in `follow.rs`, the connect options from the environment in
//! `options.rs`.

mod follow;
mod hooks;
mod options;
mod stale;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use secrecy::ExposeSecret;

pub use ::sqlx;
pub use hooks::{CheckHook, ConnectHook};

use crate::credentials::Generation;
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{self, CredentialSource, Current, DatabaseRole, Engine};
use crate::pool::{self, PoolStatus, diagnosis};
use follow::LoginProbe;
use hooks::UserHooks;
use stale::StaleTracker;

/// How often the sqlx flavour asks Vault whether its lease still exists, by default.
const LEASE_CHECK: Duration = Duration::from_secs(15);
/// How long `close()` waits for connections to be returned before it revokes anyway:
/// 20 s, inside Kubernetes' default grace period (30 s) with time left to revoke.
const CLOSE_WAIT: Duration = Duration::from_secs(20);
/// How often, by default, a login with the current credentials is tried while the pool
/// is in use and has no idle connection (it may be failing to open one), so that code
/// using `pool()` directly gets the re-lease on a refused login that `acquire()`
/// triggers at once.
const LOGIN_PROBE: Duration = Duration::from_secs(15);

/// A sqlx PostgreSQL pool on dynamic Vault credentials. Cheap to clone.
#[derive(Clone)]
pub struct VaultSqlxPool {
    inner: Arc<PoolState>,
}

/// What the clones of a [`VaultSqlxPool`] share: the sqlx pool, the engine, and the
/// follow task that applies each generation to the pool.
struct PoolState {
    pool: PgPool,
    engine: Engine,
    /// The generation whose credentials the pool's connect options hold.
    applied: tokio::sync::watch::Receiver<Generation>,
    auth_failure_wait: Duration,
    /// The follow task ([`follow::follow`]).
    task: tokio::task::JoinHandle<()>,
    /// Cancels the drain tasks of retired generations.
    drains: tokio_util::sync::CancellationToken,
}

impl Drop for PoolState {
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

/// `base` with the credentials of `current`.
fn options_for(base: &PgConnectOptions, current: &Current) -> PgConnectOptions {
    base.clone()
        .username(&current.credentials.username)
        .password(current.credentials.password.expose_secret())
}

/// Whether PostgreSQL refused the credentials.
fn is_auth_failure(e: &::sqlx::Error) -> bool {
    // pg_hba's "no encryption" refusal has an auth SQLSTATE too: a TLS matter.
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| diagnosis::PG_AUTH_FAILURE.contains(&c.as_ref()))
        && tls_problem(e).is_none()
}

/// What to fix when `e` is a TLS problem.
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
    /// most 20 s — a connection held for ever (a `PgListener`) cannot hold the revocation
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
            Some(o) => options::at_least_the_environments_mode(o, |k| std::env::var(k).ok())?,
            None => options::from_env()?,
        };
        options::refuse_weak_tls(&base)?;
        let verify = verifier(base.clone(), lease.source.to_string());
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
        let tracker = Arc::new(StaleTracker::new(Instant::now()));
        let current = engine.current();
        let pool = hooks::install(target.pool_options, &tracker, target.hooks)
            .connect_lazy_with(options_for(&base, &current));
        let guard = current.track();
        let (applied_tx, applied) = tokio::sync::watch::channel(current.generation);
        let drains = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(follow::follow(
            engine.clone(),
            (pool.clone(), base),
            tracker,
            (guard, current),
            (applied_tx, drains.clone()),
            probe,
        ));
        Ok(VaultSqlxPool {
            inner: Arc::new(PoolState {
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

/// The engine's verifier: one login to `base` with the new credentials, and a ping;
/// `role` names the source in messages.
fn verifier(base: PgConnectOptions, role: String) -> lease::Verifier {
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
            let mut conn = ::sqlx::PgConnection::connect_with(&options)
                .await
                .map_err(|e| {
                    let why = Some(diagnosis::reason(&e));
                    diagnosis::verify_connect_error(
                        what(),
                        e,
                        why,
                        |e| tls_problem(e).map(str::to_owned),
                        is_auth_failure,
                    )
                })?;
            let pinged = conn.ping().await;
            let _ = conn.close().await;
            pinged.map_err(|e| Error::new(ErrorKind::Backend, what()).with_source(e))
        }) as lease::BoxFuture<'static, Result<()>>
    })
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
}
