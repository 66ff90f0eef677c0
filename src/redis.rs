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
//! pooled connection has been returned, or just before its lease ends (an explicit
//! `drain_timeout` makes that sooner).
//!
//! What counts as "in use" is the pooled handle ([`Client`]) being alive. A
//! `MultiplexedConnection` cloned out of it (`(*conn).clone()`, e.g. to hand to a task)
//! is not counted: once the handle is returned, its generation may drain and be revoked,
//! and the clone's next command fails (the server closed it) — it does not reconnect.
//! Keep the handle for as long as you use the connection, or take a new one per unit of
//! work. Nothing can keep a connection past its lease's end: Redis closes it then.

use std::fmt;
use std::time::Duration;

use ::redis::IntoConnectionInfo;
use ::redis::aio::MultiplexedConnection;
use secrecy::ExposeSecret;

pub use ::redis;

use crate::credentials::Credentials;
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{BoxFuture, CredentialSource, DatabaseRole, KvCredentials};
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

/// A Redis pool on rotating Vault credentials: [`pool::VaultPool`] over
/// [`RedisConnect`]. Cheap to clone.
pub type VaultRedisPool = pool::VaultPool<RedisConnect>;

/// Builds a [`VaultRedisPool`]: the leasing setters of [`pool::Builder`], deadpool's
/// `max_size`/`timeouts`, and [`address`](Builder::address).
pub type Builder = pool::Builder<pool::Deadpool<RedisTarget>>;

/// Where the pool connects to Redis, as set on the [`Builder`].
pub struct RedisTarget {
    info: Option<std::result::Result<::redis::ConnectionInfo, ::redis::RedisError>>,
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTarget")
            .field(
                "addr",
                &self
                    .info
                    .as_ref()
                    .map(|i| i.as_ref().map(|i| i.addr().to_string()).ok()),
            )
            .finish()
    }
}

impl VaultRedisPool {
    /// A pool for `role` (a `redis-database-plugin` role on the mount `database`): Vault
    /// from the Vault CLI's variables, Redis from `REDIS_URL` (without password) or
    /// `REDIS_HOST`/`REDIS_PORT`.
    ///
    /// # Errors
    /// As [`Builder::build`](pool::Builder::build).
    pub async fn new(role: impl Into<String>) -> Result<Self> {
        Self::builder(role).build().await
    }

    /// A builder for the dynamic ACL users of `role` on the mount `database`.
    pub fn builder(role: impl Into<String>) -> Builder {
        Self::builder_for(DatabaseRole::new(role))
    }

    /// A pool on static credentials kept in KV v2 — e.g. the seed's `redis/main` with
    /// `host`, `port`, `password` and optionally `username` — re-read within 30 s of a
    /// new KV version, with no restart: connections of the old version drain, new ones
    /// use the new password. The address comes from the secret's `host`/`port` unless
    /// [`address`](pool::Builder::address) is set. For another mount or poll interval,
    /// use [`builder_for`](Self::builder_for) with a [`KvCredentials`] (and
    /// `.default_username("default")` if the secret may lack `username`).
    pub fn builder_kv(path: impl Into<String>) -> Builder {
        Self::builder_for(KvCredentials::new(path).default_username("default"))
    }

    /// A builder for any [`CredentialSource`].
    pub fn builder_for(source: impl Into<CredentialSource>) -> Builder {
        pool::Builder::new(
            source,
            pool::Deadpool::new(
                RedisTarget { info: None },
                pool::Timeouts {
                    wait: Some(Duration::from_secs(10)),
                    create: Some(Duration::from_secs(5)),
                    recycle: Some(Duration::from_secs(2)),
                },
            ),
        )
    }
}

impl Builder {
    /// Where Redis is, e.g. `"redis://127.0.0.1:6379/0"`; a username or password in it
    /// is refused (the lease supplies them). Default: from the KV secret's `host`/`port`
    /// for a KV source, else from the environment.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] (at [`build`](pool::Builder::build)) for an unparsable address.
    pub fn address(mut self, addr: impl IntoConnectionInfo) -> Self {
        self.target.backend.info = Some(addr.into_connection_info());
        self
    }

    /// Lease and verify the first ACL user (one real connection and PING), start the
    /// engine, build the pool.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a missing or invalid address; whatever leasing or the
    /// verifying connection fails with.
    pub async fn build(self) -> Result<VaultRedisPool> {
        let (lease, deadpool, target) = self.into_parts();
        lease.source.validate()?;
        let given = match target.info {
            Some(Ok(i)) => Some(i),
            Some(Err(e)) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "configuring Redis: the address given to .address(…) is not a redis:// URL",
                )
                .with_source(e));
            }
            None => None,
        };
        // The environment before Vault (as for PostgreSQL): its errors come first.
        let given = match (given, &lease.source) {
            (None, CredentialSource::Kv(_)) => None,
            (None, _) => Some(redis_info_from_lookup(|k| std::env::var(k).ok())?),
            (given, _) => given,
        };
        let vault = lease.vault()?;
        let info = match (given, &lease.source) {
            (Some(i), _) => i,
            (None, CredentialSource::Kv(kv)) => {
                // The address lives in the secret itself (`host`, `port`).
                let secret = vault.read_kv(kv.get_mount(), kv.get_path()).await?;
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
            (None, other) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "configuring Redis for {other}: no address; set REDIS_URL or .address(…)"
                    ),
                ));
            }
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
        Self::build_with(lease, deadpool, vault, connect.clone(), connect).await
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
