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
//! What counts as "in use" is the pooled handle ([`Client`]) being alive. The connection
//! inside it ([`RedisConnection`]) cannot be cloned out of the handle (redis'
//! `MultiplexedConnection` is `Clone`; ours is not), so no connection escapes that count:
//! while you hold the handle, its generation is not revoked before its lease's end. Keep
//! the handle for as long as you use the connection, or take a new one per unit of work
//! (cheap: connections are reused). Nothing can keep a connection past its lease's end:
//! Redis closes it then.
//!
//! ## Timeouts
//!
//! Connections are opened with a connect timeout of 5 s (TCP, `HELLO`/`AUTH`; set
//! [`connect_timeout`](pool::Builder::connect_timeout)) and **no response timeout**, so a
//! blocking command — `BLPOP key 3`, `XREAD BLOCK`, `WAIT`, a slow script — waits as
//! long as it asks to (redis' own default of 500 ms would cut them). Set
//! [`response_timeout`](pool::Builder::response_timeout) for a ceiling on every command;
//! it must exceed your longest blocking command. The pool's own checks do not depend on
//! it: the PING before an idle connection is reused is bounded (2 s; a connection
//! returned while the server is still blocked in a command you cut short fails it and is
//! closed), and verifying new credentials by the verify timeout (10 s).
//!
//! ## Not supported
//!
//! TLS (`rediss://`) is not built in yet (an address with it is refused with a message
//! saying so); Redis Cluster and Sentinel are not supported (one server address); pub/sub
//! needs a dedicated connection, which a pool does not give: use `XREAD BLOCK` on a
//! pooled connection, or open one yourself with
//! [`Engine::current`](crate::lease::Engine::current)'s credentials — knowing that it is
//! outside the drain count: its user is deleted when that generation is revoked, so
//! follow [`Engine::subscribe`](crate::lease::Engine::subscribe) and reconnect with the
//! new credentials on each change.
//!
//! ## Credentials kept in KV
//!
//! With a KV source ([`VaultRedisPool::builder_kv`]) the address is part of the secret:
//! `host` (required) and `port` (default 6379). A new version with another host or port
//! moves the pool there: the new address is verified with the new credentials, new
//! connections go to it, connections to the old one drain.

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
    /// Take `host`/`port` from each version's KV secret (a KV source without an address
    /// set on the builder).
    address_from_kv: bool,
    config: ::redis::AsyncConnectionConfig,
}

impl fmt::Debug for RedisConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnect")
            .field("addr", &self.info.addr().to_string())
            .field("db", &self.info.redis_settings().db())
            .field("address_from_kv", &self.address_from_kv)
            .finish()
    }
}

impl RedisConnect {
    /// The address to connect to with `creds`: the KV secret's, or the fixed one.
    fn info_for(
        &self,
        creds: &Credentials,
    ) -> Result<::redis::ConnectionInfo, ::redis::RedisError> {
        let info = match (self.address_from_kv, creds.kv_secret()) {
            (true, Some(kv)) => address_from_kv(kv).map_err(|e| {
                ::redis::RedisError::from((
                    ::redis::ErrorKind::InvalidClientConfig,
                    "no usable Redis address in the KV secret",
                    e.to_string(),
                ))
            })?,
            _ => self.info.clone(),
        };
        let settings = info
            .redis_settings()
            .clone()
            .set_username(&creds.username)
            .set_password(creds.password.expose_secret());
        Ok(info.set_redis_settings(settings))
    }
}

/// The address in a KV secret: `host` (required) and `port` (default 6379).
fn address_from_kv(kv: &crate::vault::KvSecret) -> Result<::redis::ConnectionInfo> {
    let field = |k: &str| {
        kv.get(k)
            .map(|v| secrecy::ExposeSecret::expose_secret(v).trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let Some(host) = field("host") else {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "reading the Redis address from KV {} (version {}): no `host`; add `host` \
                 (and `port`, default 6379) to the secret, or set .address(…) on the builder",
                kv.path(),
                kv.version()
            ),
        ));
    };
    let port = field("port").unwrap_or_else(|| "6379".into());
    redis_info_from_lookup(|k| match k {
        "REDIS_HOST" => Some(host.clone()),
        "REDIS_PORT" => Some(port.clone()),
        _ => None,
    })
    .map_err(|e| {
        e.context(format!(
            "reading the Redis address from KV {} (version {})",
            kv.path(),
            kv.version()
        ))
    })
}

impl pool::Connect for RedisConnect {
    type Conn = RedisConnection;
    type Error = ::redis::RedisError;

    fn open<'a>(
        &'a self,
        creds: &'a Credentials,
    ) -> BoxFuture<'a, Result<RedisConnection, ::redis::RedisError>> {
        Box::pin(async move {
            let info = self.info_for(creds)?;
            ::redis::Client::open(info)?
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
                .map(RedisConnection)
        })
    }

    fn is_auth_failure(&self, e: &::redis::RedisError) -> bool {
        e.kind() == ::redis::ErrorKind::AuthenticationFailed
            || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
    }

    fn check<'a>(&'a self, conn: &'a mut RedisConnection) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            // Bounded by itself too: the recycle timeout can be unset, and a connection
            // may come back with the server still blocked in a command that was cut.
            match tokio::time::timeout(
                CHECK_TIMEOUT,
                ::redis::cmd("PING").query_async::<String>(&mut conn.0),
            )
            .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("PING failed: {e}")),
                Err(_) => Err(format!("PING: no answer within {CHECK_TIMEOUT:?}")),
            }
        })
    }

    fn target(&self) -> String {
        format!("Redis at {}", self.info.addr())
    }
}

/// One pooled Redis connection (a redis `MultiplexedConnection` inside): every
/// `redis::AsyncCommands` works on it. Unlike `MultiplexedConnection` it is not `Clone`,
/// so it cannot leave the pooled handle that counts it for the drain:
///
/// ```compile_fail,E0599
/// # async fn f(pool: vaultpool::redis::VaultRedisPool) {
/// let conn = pool.get().await.unwrap();
/// let escaped = (*conn).clone(); // does not compile: not Clone
/// # }
/// ```
pub struct RedisConnection(MultiplexedConnection);

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnection")
            .field("db", &::redis::aio::ConnectionLike::get_db(&self.0))
            .finish_non_exhaustive()
    }
}

impl ::redis::aio::ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a ::redis::Cmd,
    ) -> ::redis::RedisFuture<'a, ::redis::Value> {
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a ::redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> ::redis::RedisFuture<'a, Vec<::redis::Value>> {
        self.0.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

/// A pooled Redis connection: derefs to [`RedisConnection`], so `redis::AsyncCommands`
/// work on `&mut *conn` (or on `conn` directly).
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

/// Where and how the pool connects to Redis, as set on the [`Builder`].
pub struct RedisTarget {
    info: Option<std::result::Result<::redis::ConnectionInfo, ::redis::RedisError>>,
    connect_timeout: Duration,
    response_timeout: Option<Duration>,
}

/// What a TLS address is told (until TLS to Redis is built in).
const NO_TLS_YET: &str = "TLS (rediss://) is not supported by vaultpool yet; use redis:// on \
                          a trusted network, or a TLS-terminating sidecar";

/// Default connect timeout (TCP connect and the `HELLO`/`AUTH` handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The PING before an idle connection is reused answers within this, or the connection
/// is closed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

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
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
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
    /// use the new password (and the new `host`/`port`, if they changed). The address
    /// comes from the secret unless [`address`](pool::Builder::address) is set; a secret
    /// without `host` is refused. For another mount or poll interval,
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
                RedisTarget {
                    info: None,
                    connect_timeout: CONNECT_TIMEOUT,
                    response_timeout: None,
                },
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

    /// The connect timeout: TCP connect plus the `HELLO`/`AUTH` handshake of each new
    /// connection. Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.target.backend.connect_timeout = timeout;
        self
    }

    /// A ceiling on every command's response, or `None` (the default) for none. Blocking
    /// commands (`BLPOP key 3`, `XREAD BLOCK`, `WAIT`) need it longer than what they ask
    /// for; redis' own default of 500 ms would cut them.
    pub fn response_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.target.backend.response_timeout = timeout;
        self
    }

    /// Lease and verify the first ACL user (one real connection and PING), start the
    /// engine, build the pool.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a missing or invalid address (a KV secret without
    /// `host` among them) or a zero timeout; whatever leasing or the verifying connection
    /// fails with.
    pub async fn build(self) -> Result<VaultRedisPool> {
        let (lease, deadpool, target) = self.into_parts();
        lease.source.validate()?;
        if target.connect_timeout.is_zero() || target.response_timeout.is_some_and(|t| t.is_zero())
        {
            return Err(Error::new(
                ErrorKind::Config,
                "configuring Redis: a zero connect or response timeout would fail every \
                 command; give a positive duration (or None for no response timeout)",
            ));
        }
        let given = match target.info {
            Some(Ok(i)) => Some(i),
            Some(Err(e)) => {
                let why = if e.to_string().contains("TLS") {
                    NO_TLS_YET
                } else {
                    "not a usable redis:// URL"
                };
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("configuring Redis: the address given to .address(…): {why}"),
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
        let from_kv = given.is_none();
        let vault = lease.vault()?;
        let info = match (given, &lease.source) {
            (Some(i), _) => i,
            (None, CredentialSource::Kv(kv)) => {
                // The address lives in the secret itself (`host`, `port`), version by
                // version; this first read names a missing one before anything is leased.
                let vault = vault.as_ref().ok_or_else(|| {
                    Error::new(ErrorKind::Config, "reading a KV secret: no Vault client")
                })?;
                address_from_kv(&vault.read_kv(kv.get_mount(), kv.get_path()).await?)?
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
        if matches!(info.addr(), ::redis::ConnectionAddr::TcpTls { .. }) {
            // Parsed only when an application enabled redis' TLS feature itself.
            return Err(Error::new(
                ErrorKind::Config,
                format!("configuring Redis at {}: {NO_TLS_YET}", info.addr()),
            ));
        }
        let settings = info.redis_settings();
        if settings.username().is_some() || settings.password().is_some() {
            return Err(Error::new(
                ErrorKind::Config,
                "configuring Redis: the address carries a username or password; remove them — \
                 vaultpool authenticates with the ACL user leased from Vault",
            ));
        }
        let connect = RedisConnect {
            info,
            address_from_kv: from_kv,
            config: ::redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(target.connect_timeout))
                .set_response_timeout(target.response_timeout),
        };
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
    let url = url.trim();
    if url.starts_with("rediss://") || url.starts_with("valkeys://") {
        return Err(Error::new(
            ErrorKind::Config,
            format!("reading the Redis address (REDIS_URL or REDIS_HOST/REDIS_PORT): {NO_TLS_YET}"),
        ));
    }
    url.into_connection_info().map_err(|e| {
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

    #[tokio::test]
    async fn a_tls_address_is_refused_saying_why() {
        let err = VaultRedisPool::builder("r")
            .address("rediss://cache:6380/0")
            .build()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("TLS (rediss://)"), "{err}");
        let err = redis_info_from_lookup(|k| (k == "REDIS_URL").then(|| "rediss://c:1".into()))
            .unwrap_err();
        assert!(err.to_string().contains("TLS (rediss://)"), "{err}");
    }

    #[tokio::test]
    async fn zero_timeouts_are_refused() {
        let err = VaultRedisPool::builder("r")
            .address("redis://cache:6379/0")
            .response_timeout(Some(Duration::ZERO))
            .build()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("zero"), "{err}");
    }

    #[test]
    fn kv_address_needs_a_host_and_defaults_the_port() {
        let kv = crate::vault::KvSecret::for_test("secret", "redis/main", 2, &[("port", "6380")]);
        let err = address_from_kv(&kv).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let msg = err.to_string();
        assert!(
            msg.contains("no `host`") && msg.contains("redis/main"),
            "{msg}"
        );
        let kv = crate::vault::KvSecret::for_test("secret", "redis/main", 3, &[("host", "cache")]);
        assert_eq!(
            address_from_kv(&kv).unwrap().addr().to_string(),
            "cache:6379"
        );
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
