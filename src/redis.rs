//! `VaultRedisPool`: a pool of multiplexed Redis connections, each authenticated as the
//! current dynamic ACL user from Vault's `redis-database-plugin` (feature `redis`).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use vaultpool::redis::{VaultRedisPool, redis::AsyncCommands};
//!
//! // Vault from the Vault CLI's variables; Redis from REDIS_URL (no password) or
//! // REDIS_HOST/REDIS_PORT.
//! let pool = VaultRedisPool::new("redis-app").await?;
//! let mut conn = pool.get().await?;
//! let _: () = conn.set("app:greeting", "hello").await?;
//! let v: String = conn.get("app:greeting").await?;
//! # let _ = v;
//! drop(conn);
//! pool.close().await;
//! # Ok(()) }
//! ```
//!
//! Redis differs from PostgreSQL in one way that matters: revoking a lease runs
//! `ACL DELUSER`, which closes every connection of that user at once, and so does the
//! lease's expiry. The engine therefore revokes a retired generation only once its last
//! connection is gone (or at the drain deadline), and rotates at least the rotation
//! margin before the lease ends — so neither revocation nor expiry cuts a connection in
//! use.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::redis::IntoConnectionInfo;
use ::redis::aio::MultiplexedConnection;
use secrecy::ExposeSecret;

pub use ::redis;

use crate::credentials::{Credentials, Generation};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{BoxFuture, LeaseOptions, RotatingCredentials};
use crate::pool;
pub use crate::pool::PoolStatus;

/// How vaultpool opens Redis connections: the address and database, no credentials.
#[derive(Clone)]
pub struct RedisConnect {
    info: ::redis::ConnectionInfo,
}

impl fmt::Debug for RedisConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnect")
            .field("addr", &self.info.addr().to_string())
            .field("db", &self.info.redis_settings().db())
            .finish()
    }
}

impl pool::Connect for RedisConnect {
    type Conn = MultiplexedConnection;
    type Error = ::redis::RedisError;

    fn open<'a>(
        &'a self,
        creds: &'a Credentials,
    ) -> BoxFuture<'a, Result<MultiplexedConnection, ::redis::RedisError>> {
        Box::pin(async move {
            let settings = self
                .info
                .redis_settings()
                .clone()
                .set_username(&creds.username)
                .set_password(creds.password.expose_secret());
            let info = self.info.clone().set_redis_settings(settings);
            ::redis::Client::open(info)?
                .get_multiplexed_async_connection()
                .await
        })
    }

    fn is_auth_failure(&self, e: &::redis::RedisError) -> bool {
        e.kind() == ::redis::ErrorKind::AuthenticationFailed
            || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
    }

    fn check<'a>(
        &'a self,
        conn: &'a mut MultiplexedConnection,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            ::redis::cmd("PING")
                .query_async::<String>(conn)
                .await
                .map(|_| ())
                .map_err(|e| format!("PING failed: {e}"))
        })
    }

    fn target(&self) -> String {
        format!("Redis at {}", self.info.addr())
    }
}

/// A pooled Redis connection: derefs to [`MultiplexedConnection`], so
/// `redis::AsyncCommands` work on `&mut *conn` (or on `conn` directly).
pub type Client = pool::Pooled<RedisConnect>;

impl ::redis::aio::ConnectionLike for Client {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a ::redis::Cmd,
    ) -> ::redis::RedisFuture<'a, ::redis::Value> {
        (**self).req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a ::redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> ::redis::RedisFuture<'a, Vec<::redis::Value>> {
        (**self).req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        (**self).get_db()
    }
}

/// A Redis pool on dynamic Vault credentials. Cheap to clone.
#[derive(Clone)]
pub struct VaultRedisPool {
    inner: Arc<pool::Shared<RedisConnect>>,
}

impl fmt::Debug for VaultRedisPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultRedisPool")
            .field("role", &self.inner.engine.role())
            .field("generation", &self.inner.engine.generation())
            .field("pool", &self.inner.pool.status())
            .finish()
    }
}

impl VaultRedisPool {
    /// A pool for `role` (a `redis-database-plugin` role): Vault from the Vault CLI's
    /// variables, Redis from `REDIS_URL` (without password) or `REDIS_HOST`/`REDIS_PORT`.
    ///
    /// # Errors
    /// As [`Builder::build`].
    pub async fn new(role: impl Into<String>) -> Result<Self> {
        Self::builder(role).build().await
    }

    /// A pool on static credentials kept in KV v2 — e.g. the seed's `redis/main` with
    /// `host`, `port`, `password` and optionally `username` — re-read within 30 s of a
    /// new KV version (`.kv_poll(…)` changes that), with no restart: connections of the
    /// old version drain, new ones use the new password. The address comes from the
    /// secret's `host`/`port` unless [`Builder::address`] is set.
    pub fn builder_kv(path: impl Into<String>) -> Builder {
        Builder {
            kv: Some(KvSource {
                mount: "secret".into(),
                path: path.into(),
                poll: Duration::from_secs(30),
            }),
            ..Self::builder("")
        }
    }

    /// A builder for everything explicit.
    pub fn builder(role: impl Into<String>) -> Builder {
        Builder {
            kv: None,
            role: role.into(),
            lease: LeaseOptions::default(),
            info: None,
            max_size: 16,
            timeouts: deadpool::managed::Timeouts {
                wait: Some(Duration::from_secs(10)),
                create: Some(Duration::from_secs(5)),
                recycle: Some(Duration::from_secs(2)),
            },
        }
    }

    /// A connection, opened as the current ACL user if none is idle.
    ///
    /// # Errors
    /// [`ErrorKind::LeaseExpired`] naming the role when the credentials have run out;
    /// [`ErrorKind::PoolTimeout`]; [`ErrorKind::Backend`] when Redis refuses or is down;
    /// [`ErrorKind::Shutdown`] after [`close`](Self::close).
    pub async fn get(&self) -> Result<Client> {
        self.inner.get().await
    }

    /// The lease engine behind the pool.
    pub fn credentials(&self) -> &RotatingCredentials {
        &self.inner.engine
    }

    /// Rotate now; returns once the new generation is serving.
    ///
    /// # Errors
    /// As [`RotatingCredentials::rotate`].
    pub async fn rotate(&self) -> Result<Generation> {
        self.inner.engine.rotate().await
    }

    /// Pool and lease status.
    pub fn status(&self) -> PoolStatus {
        self.inner.status()
    }

    /// Close: no new checkouts, then wait for connections in use (up to the drain
    /// timeout) and revoke every lease (which deletes the ACL users).
    pub async fn close(&self) {
        self.inner.close().await;
    }
}

/// Where static credentials live in KV v2.
#[derive(Debug, Clone)]
struct KvSource {
    mount: String,
    path: String,
    poll: Duration,
}

/// Builds a [`VaultRedisPool`].
#[must_use]
pub struct Builder {
    kv: Option<KvSource>,
    role: String,
    lease: LeaseOptions,
    info: Option<std::result::Result<::redis::ConnectionInfo, ::redis::RedisError>>,
    max_size: usize,
    timeouts: deadpool::managed::Timeouts,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("role", &self.role)
            .field(
                "addr",
                &self
                    .info
                    .as_ref()
                    .map(|i| i.as_ref().map(|i| i.addr().to_string()).ok()),
            )
            .field("max_size", &self.max_size)
            .finish_non_exhaustive()
    }
}

impl Builder {
    crate::lease::lease_setters!();

    /// Where Redis is, e.g. `"redis://127.0.0.1:6379/0"`; a username or password in it
    /// is refused (the lease supplies them). Default: from the environment.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] (at [`build`](Self::build)) for an unparsable address.
    pub fn address(mut self, addr: impl IntoConnectionInfo) -> Self {
        self.info = Some(addr.into_connection_info());
        self
    }

    /// For [`VaultRedisPool::builder_kv`]: the KV v2 mount (default `secret`) and how
    /// often its version is checked (default 30 s, jittered ±10%).
    pub fn kv_poll(mut self, mount: impl Into<String>, every: Duration) -> Self {
        if let Some(kv) = &mut self.kv {
            kv.mount = mount.into();
            kv.poll = every;
        }
        self
    }

    /// The most connections open at once. Default 16 (each is multiplexed).
    pub fn max_size(mut self, max_size: usize) -> Self {
        self.max_size = max_size;
        self
    }

    /// Lease and verify the first ACL user (one real connection and PING), start the
    /// engine, build the pool.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a missing or invalid address; whatever leasing or the
    /// verifying connection fails with.
    pub async fn build(self) -> Result<VaultRedisPool> {
        let info = match (self.info, &self.kv) {
            (Some(Ok(i)), _) => i,
            (Some(Err(e)), _) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "configuring Redis: the address given to .address(…) is not a redis:// URL",
                )
                .with_source(e));
            }
            (None, Some(kv)) => {
                let secret = self.lease.vault()?.read_kv(&kv.mount, &kv.path).await?;
                let field = |k: &str| {
                    secret
                        .get(k)
                        .map(|v| secrecy::ExposeSecret::expose_secret(v).to_owned())
                };
                redis_info_from_lookup(|k| match k {
                    "REDIS_HOST" => field("host"),
                    "REDIS_PORT" => field("port"),
                    _ => None,
                })?
            }
            (None, None) => redis_info_from_lookup(|k| std::env::var(k).ok())?,
        };
        let settings = info.redis_settings();
        if settings.username().is_some() || settings.password().is_some() {
            return Err(Error::new(
                ErrorKind::Config,
                "configuring Redis: the address carries a username or password; remove them — \
                 vaultpool authenticates with the ACL user leased from Vault",
            ));
        }
        let connect = RedisConnect { info };
        let auth_failure_wait = self.lease.auth_failure_wait;
        let engine = match self.kv {
            Some(kv) => {
                RotatingCredentials::kv_static(self.lease.vault()?, kv.mount, kv.path, kv.poll)
                    .policy(self.lease.policy)
                    .drain_timeout(self.lease.drain_timeout)
                    .verify_with(pool::verifier(connect.clone()))
                    .build()
                    .await?
            }
            None => {
                self.lease
                    .engine(self.role, pool::verifier(connect.clone()))
                    .await?
            }
        };
        let shared = pool::Shared::build(
            engine,
            connect,
            self.max_size,
            self.timeouts,
            auth_failure_wait,
        )?;
        Ok(VaultRedisPool {
            inner: Arc::new(shared),
        })
    }
}

/// Redis address from `REDIS_URL` (without credentials) or `REDIS_HOST` (default
/// `127.0.0.1`) and `REDIS_PORT` (default 6379).
///
/// # Errors
/// [`ErrorKind::Config`] when `REDIS_URL` is empty or unparsable.
pub fn redis_info_from_lookup(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<::redis::ConnectionInfo> {
    let url = match lookup("REDIS_URL") {
        Some(url) if url.trim().is_empty() => {
            return Err(Error::new(
                ErrorKind::Config,
                "reading REDIS_URL: it is set but empty; set it to e.g. redis://cache:6379/0 \
                 or unset it and use REDIS_HOST/REDIS_PORT",
            ));
        }
        Some(url) => url,
        None => format!(
            "redis://{}:{}/0",
            lookup("REDIS_HOST").unwrap_or_else(|| "127.0.0.1".into()),
            lookup("REDIS_PORT").unwrap_or_else(|| "6379".into())
        ),
    };
    url.trim().into_connection_info().map_err(|e| {
        Error::new(
            ErrorKind::Config,
            "reading the Redis address (REDIS_URL or REDIS_HOST/REDIS_PORT): not a redis:// URL",
        )
        .with_source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_from_host_and_port() {
        let info = redis_info_from_lookup(|k| match k {
            "REDIS_HOST" => Some("cache".into()),
            "REDIS_PORT" => Some("6380".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(info.addr().to_string(), "cache:6380");
    }

    #[tokio::test]
    async fn a_bad_address_is_reported_at_build() {
        let err = VaultRedisPool::builder("r")
            .address("http://not-redis")
            .build()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains(".address"), "{err}");
    }

    #[test]
    fn empty_or_bad_url_is_a_config_error() {
        let err = redis_info_from_lookup(|k| (k == "REDIS_URL").then(|| " ".into())).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let err = redis_info_from_lookup(|k| (k == "REDIS_URL").then(|| "http://nope".into()))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
    }
}
