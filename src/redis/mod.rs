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
//! ## TLS
//!
//! With the `tls` feature, a `rediss://` address connects over TLS (rustls): the server's
//! certificate is checked against the CA in `REDIS_TLS_CA_FILE` (or
//! [`RedisTls::root_cert`](crate::tls::RedisTls::root_cert); default: the operating
//! system's store), its host name included; a client certificate comes from
//! `REDIS_TLS_CERT_FILE`/`REDIS_TLS_KEY_FILE` (or
//! [`RedisTls::client_cert`](crate::tls::RedisTls::client_cert)) for a server with
//! `tls-auth-clients yes`. Settings on the builder ([`Builder::tls`]) replace the
//! variables. The verifying connection of each rotation uses the same settings. Refused
//! at build: `rediss://` without the feature, redis' `#insecure` (no certificate check),
//! and TLS settings with a plaintext `redis://` address (TLS was meant; it is never
//! dropped silently). A KV secret's address uses TLS when its `tls` field is `true`, or
//! when it has no `tls` field and TLS settings are given.
//!
//! ## Not supported
//!
//! Redis Cluster and Sentinel are not supported (one server address); pub/sub
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

mod address;

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
use crate::pool::diagnosis::{self, TlsSymptom};
pub use address::redis_info_from_lookup;
use address::{NO_TLS_FEATURE, address_from_kv, check_tls_address};

/// How vaultpool opens Redis connections: the address and database, no credentials.
#[derive(Clone)]
pub struct RedisConnect {
    info: ::redis::ConnectionInfo,
    /// Take `host`/`port` from each version's KV secret (a KV source without an address
    /// set on the builder).
    address_from_kv: bool,
    config: ::redis::AsyncConnectionConfig,
    /// The certificates for `rediss://` addresses (read at build, and again when their
    /// files change).
    #[cfg(feature = "tls")]
    tls: Option<crate::watched::Watched<::redis::TlsCertificates>>,
    /// A KV secret's address uses TLS unless it says `tls: false` (refused then): TLS
    /// settings were given, or the first version's address used TLS. A pool never moves
    /// to plaintext.
    kv_tls: bool,
}

impl fmt::Debug for RedisConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnect")
            .field("addr", &self.info.addr().to_string())
            .field("db", &self.info.redis_settings().db())
            .field("address_from_kv", &self.address_from_kv)
            .field("kv_tls", &self.kv_tls)
            .finish()
    }
}

impl RedisConnect {
    /// A redis client for `creds` at the current address, over TLS for `rediss://`.
    fn client_for(&self, creds: &Credentials) -> Result<::redis::Client, ::redis::RedisError> {
        let info = self.info_for(creds)?;
        #[cfg(feature = "tls")]
        if matches!(info.addr(), ::redis::ConnectionAddr::TcpTls { .. }) {
            crate::tls::ensure_default_provider();
            let certificates = match &self.tls {
                Some(tls) => (*tls.get()).clone(),
                None => ::redis::TlsCertificates {
                    client_tls: None,
                    root_cert: None,
                },
            };
            return ::redis::Client::build_with_tls(info, certificates);
        }
        ::redis::Client::open(info)
    }

    /// The address to connect to with `creds`: the KV secret's, or the fixed one.
    fn info_for(
        &self,
        creds: &Credentials,
    ) -> Result<::redis::ConnectionInfo, ::redis::RedisError> {
        let info = match (self.address_from_kv, creds.kv_secret()) {
            (true, Some(kv)) => address_from_kv(kv, self.kv_tls).map_err(|e| {
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

impl pool::Connect for RedisConnect {
    type Conn = RedisConnection;
    type Error = ::redis::RedisError;

    fn open<'a>(
        &'a self,
        creds: &'a Credentials,
    ) -> BoxFuture<'a, Result<RedisConnection, ::redis::RedisError>> {
        Box::pin(async move {
            self.client_for(creds)?
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
                .map(RedisConnection)
        })
    }

    fn is_auth_failure(&self, e: &::redis::RedisError) -> bool {
        e.kind() == ::redis::ErrorKind::AuthenticationFailed
            || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
    }

    fn reason(&self, e: &::redis::RedisError) -> Option<String> {
        Some(diagnosis::reason(e))
    }

    fn tls_problem(&self, e: &::redis::RedisError) -> Option<&'static str> {
        // Only a failed connection or handshake: an answer from the server (NOPERM,
        // WRONGPASS) carries the user's name, which may contain any word.
        if e.code().is_some() || self.is_auth_failure(e) {
            return None;
        }
        diagnosis::tls_diagnosis(&REDIS_TLS, &diagnosis::chain_text(e))
    }

    #[cfg(feature = "tls")]
    fn tls_detail(&self, e: &::redis::RedisError) -> Option<String> {
        let tls = self.tls.as_ref()?;
        let text = diagnosis::chain_text(e).to_ascii_lowercase();
        (crate::watched::peer_refused_our_certificate(&text) && tls.watches_files())
            .then(|| tls.describe())
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
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::RedisTls>,
}

/// The TLS failures of a Redis connection, in the order they are looked for (rustls'
/// words and the alerts the server sends).
const REDIS_TLS: [TlsSymptom; 7] = [
    TlsSymptom {
        seen: diagnosis::names_another_host,
        fix: "the server's certificate does not name the host connected to: connect by a name \
              the certificate holds",
    },
    TlsSymptom {
        seen: diagnosis::unknown_issuer,
        fix: "the server's certificate is not signed by a trusted CA: set REDIS_TLS_CA_FILE (or \
              RedisTls::root_cert) to the CA that signed it",
    },
    TlsSymptom {
        seen: |t| t.contains("certificaterequired") || t.contains("certificate required"),
        fix: "the server requires a client certificate (tls-auth-clients): set \
              REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE (or RedisTls::client_cert)",
    },
    TlsSymptom {
        seen: diagnosis::client_certificate_expired,
        fix: "the server refused the client certificate as expired: REDIS_TLS_CERT_FILE / \
              REDIS_TLS_KEY_FILE are read again when they change, and no newer usable pair was \
              found there; check that whatever renews them (cert-manager) writes it to these \
              paths",
    },
    TlsSymptom {
        seen: diagnosis::client_certificate_refused,
        fix: "the server refused the client certificate: use one signed by a CA the server \
              trusts (its tls-ca-cert-file); REDIS_TLS_CERT_FILE / REDIS_TLS_KEY_FILE are read \
              again when they change",
    },
    TlsSymptom {
        seen: |t| t.contains("invalidcontenttype") || t.contains("corrupt message"),
        fix: "the server does not speak TLS on this port: use redis://, or the server's TLS port",
    },
    TlsSymptom {
        seen: diagnosis::certificate_expired,
        fix: diagnosis::SERVER_CERTIFICATE_EXPIRED,
    },
];

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
                    #[cfg(feature = "tls")]
                    tls: None,
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

    /// TLS settings for a `rediss://` address (feature `tls`), replacing
    /// `REDIS_TLS_CA_FILE`, `REDIS_TLS_CERT_FILE` and `REDIS_TLS_KEY_FILE`.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::tls::RedisTls) -> Self {
        self.target.backend.tls = Some(tls);
        self
    }

    /// Lease and verify the first ACL user (one real connection and PING), start the
    /// engine, build the pool.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a missing or invalid address (a KV secret without
    /// `host` among them), a zero timeout, or TLS settings that cannot be used (see
    /// [TLS](crate::redis#tls)); [`ErrorKind::Tls`] when the verifying connection fails
    /// for a TLS reason (the message says what to fix); whatever leasing or the
    /// verifying connection fails with otherwise.
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
                    NO_TLS_FEATURE
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
        #[cfg(feature = "tls")]
        let tls = match target.tls {
            Some(tls) => Some(tls),
            None => crate::tls::RedisTls::from_lookup(|k| std::env::var(k).ok())?,
        };
        #[cfg(feature = "tls")]
        let certificates = tls.as_ref().map(|t| t.watched_certificates()).transpose()?;
        #[cfg(feature = "tls")]
        let tls_given = certificates.is_some();
        #[cfg(not(feature = "tls"))]
        let tls_given = false;
        if let Some(info) = &given {
            check_tls_address(info, tls_given)?;
        }
        let vault = lease.vault()?;
        let info = match (given, &lease.source) {
            (Some(i), _) => i,
            (None, CredentialSource::Kv(kv)) => {
                // The address lives in the secret itself (`host`, `port`), version by
                // version; this first read names a missing one before anything is leased.
                let vault = vault.as_ref().ok_or_else(|| {
                    Error::new(ErrorKind::Config, "reading a KV secret: no Vault client")
                })?;
                address_from_kv(
                    &vault.read_kv(kv.get_mount(), kv.get_path()).await?,
                    tls_given,
                )?
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
        check_tls_address(&info, tls_given)?;
        let settings = info.redis_settings();
        if settings.username().is_some() || settings.password().is_some() {
            return Err(Error::new(
                ErrorKind::Config,
                "configuring Redis: the address carries a username or password; remove them — \
                 vaultpool authenticates with the ACL user leased from Vault",
            ));
        }
        let kv_tls = tls_given || matches!(info.addr(), ::redis::ConnectionAddr::TcpTls { .. });
        let connect = RedisConnect {
            info,
            address_from_kv: from_kv,
            kv_tls,
            config: ::redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(target.connect_timeout))
                .set_response_timeout(target.response_timeout),
            #[cfg(feature = "tls")]
            tls: certificates,
        };
        Self::build_with(lease, deadpool, vault, connect.clone(), connect).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[cfg(not(feature = "tls"))]
    #[tokio::test]
    async fn a_tls_address_is_refused_saying_why() {
        let err = VaultRedisPool::builder("r")
            .address("rediss://cache:6380/0")
            .build()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("`tls` feature"), "{err}");
        let err = redis_info_from_lookup(|k| (k == "REDIS_URL").then(|| "rediss://c:1".into()))
            .unwrap_err();
        assert!(err.to_string().contains("`tls` feature"), "{err}");
    }

    /// What would connect with less protection than asked is refused before anything
    /// is leased: `#insecure`, TLS settings with a plaintext address, a certificate
    /// without its key, a CA file that is not there.
    #[cfg(feature = "tls")]
    #[tokio::test]
    async fn weaker_tls_than_asked_is_refused_at_build() {
        use crate::tls::RedisTls;
        let refused = |b: Builder, says: &'static str| async move {
            let err = b.build().await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{err}");
            assert!(err.to_string().contains(says), "{says}: {err}");
        };
        let b = || VaultRedisPool::builder("r");
        refused(b().address("rediss://cache:6380/0#insecure"), "#insecure").await;
        refused(
            b().address("redis://cache:6379/0")
                .tls(RedisTls::new().root_cert("/nonexistent/ca.pem")),
            "/nonexistent/ca.pem",
        )
        .await;
        let ca = std::env::temp_dir().join(format!("vaultpool-ca-{}.pem", std::process::id()));
        std::fs::write(&ca, "not a certificate").unwrap();
        refused(
            b().address("rediss://cache:6380/0")
                .tls(RedisTls::new().root_cert(&ca)),
            "PEM",
        )
        .await;
        std::fs::remove_file(&ca).unwrap();
        let err = RedisTls::from_lookup(|k| (k == "REDIS_TLS_CERT_FILE").then(|| "c.pem".into()))
            .unwrap_err();
        assert!(err.to_string().contains("REDIS_TLS_KEY_FILE"), "{err}");
        assert_eq!(RedisTls::from_lookup(|_| None).unwrap(), None);
        let info =
            redis_info_from_lookup(|k| (k == "REDIS_URL").then(|| "rediss://c:1".into())).unwrap();
        assert!(check_tls_address(&info, false).is_ok());
        let info =
            redis_info_from_lookup(|k| (k == "REDIS_URL").then(|| "redis://c:1".into())).unwrap();
        let err = check_tls_address(&info, true).unwrap_err();
        assert!(err.to_string().contains("use rediss://"), "{err}");
    }

    #[test]
    fn tls_failures_are_explained() {
        let tls_diagnosis = |text| diagnosis::tls_diagnosis(&REDIS_TLS, text);
        for (text, says) in [
            (
                "invalid peer certificate: NotValidForName",
                "does not name the host",
            ),
            (
                "invalid peer certificate: UnknownIssuer",
                "REDIS_TLS_CA_FILE",
            ),
            (
                "received fatal alert: CertificateRequired",
                "REDIS_TLS_CERT_FILE",
            ),
            (
                "received fatal alert: UnknownCA",
                "refused the client certificate",
            ),
            (
                "received fatal alert: CertificateExpired",
                "client certificate as expired",
            ),
            (
                "received corrupt message of type InvalidContentType",
                "does not speak TLS",
            ),
        ] {
            assert!(
                tls_diagnosis(text).is_some_and(|f| f.contains(says)),
                "{text}"
            );
        }
        assert_eq!(
            tls_diagnosis("WRONGPASS invalid username-password pair"),
            None
        );
        assert_eq!(tls_diagnosis("Connection refused (os error 111)"), None);
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
}
