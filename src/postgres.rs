//! `VaultPgPool`: a deadpool-postgres pool whose connections always log in with the
//! current dynamic credentials (feature `postgres`).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use vaultpool::postgres::VaultPgPool;
//!
//! // Vault from VAULT_ADDR/VAULT_ROLE_ID/VAULT_SECRET_ID (or VAULT_TOKEN);
//! // PostgreSQL from PGHOST/PGPORT/PGDATABASE/PGSSLMODE or DATABASE_URL (no password).
//! let pool = VaultPgPool::new("immune-readwrite").await?;
//! let client = pool.get().await?;
//! let row = client.query_one("SELECT count(*) FROM items", &[]).await?;
//! let n: i64 = row.get(0);
//! # let _ = n;
//! pool.close().await; // revoke the leases
//! # Ok(()) }
//! ```
//!
//! What [`VaultPgPool::get`](pool::VaultPool::get) hands out derefs to [`deadpool_postgres::ClientWrapper`]
//! and from there to [`tokio_postgres::Client`], exactly like a deadpool-postgres
//! object: `prepare_cached`, `transaction`, `query` all work.
//!
//! On rotation: idle connections of the old generation are closed at once; a connection
//! that is checked out finishes its work and is closed when it is returned; a connection
//! of an old generation is never handed out again. The engine revokes the old lease once
//! its last connection is gone.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;

pub use deadpool_postgres;
pub use deadpool_postgres::{ClientWrapper, RecyclingMethod};
pub use tokio_postgres;

use crate::credentials::Credentials;
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{BoxFuture, CredentialSource, DatabaseRole};
use crate::pool;
pub use crate::pool::PoolStatus;

/// How vaultpool opens PostgreSQL connections: the target (host, port, database,
/// options), TLS, and the check made before an idle connection is reused.
#[derive(Clone)]
pub struct PgConnect {
    config: tokio_postgres::Config,
    connect: Arc<dyn deadpool_postgres::Connect>,
    recycling: RecyclingMethod,
}

impl fmt::Debug for PgConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConnect")
            .field("target", &target(&self.config))
            .field("recycling", &self.recycling)
            .finish()
    }
}

impl pool::Connect for PgConnect {
    type Conn = ClientWrapper;
    type Error = tokio_postgres::Error;

    fn open<'a>(
        &'a self,
        creds: &'a Credentials,
    ) -> BoxFuture<'a, Result<ClientWrapper, tokio_postgres::Error>> {
        Box::pin(async move {
            let mut config = self.config.clone();
            config
                .user(&creds.username)
                .password(creds.password.expose_secret());
            let (client, task) = self.connect.connect(&config).await?;
            Ok(ClientWrapper::new(client, task))
        })
    }

    fn is_auth_failure(&self, e: &tokio_postgres::Error) -> bool {
        // pg_hba's "no encryption" refusal has an auth SQLSTATE too; it is a TLS matter,
        // and no new credentials would help.
        e.code()
            .is_some_and(|c| pool::PG_AUTH_FAILURE.contains(&c.code()))
            && self.tls_problem(e).is_none()
    }

    fn tls_problem(&self, e: &tokio_postgres::Error) -> Option<&'static str> {
        pool::tls_diagnosis(&pool::chain_text(e))
    }

    fn check<'a>(&'a self, conn: &'a mut ClientWrapper) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if conn.is_closed() {
                return Err("connection closed".into());
            }
            match self.recycling.query() {
                Some(sql) => conn
                    .simple_query(sql)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("checking a pooled PostgreSQL connection: {e}")),
                None => Ok(()),
            }
        })
    }

    fn target(&self) -> String {
        format!("PostgreSQL at {}", target(&self.config))
    }
}

fn target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        config.get_dbname().unwrap_or("(default database)")
    )
}

/// The deadpool manager behind [`VaultPgPool`].
pub type Manager = pool::RotatingManager<PgConnect>;

/// A pooled connection. Derefs to [`ClientWrapper`] (and on to
/// [`tokio_postgres::Client`]). Returned to the pool on drop — or closed, if its
/// generation was retired while it was out.
pub type Client = pool::Pooled<PgConnect>;

/// A PostgreSQL pool on rotating Vault credentials: [`pool::VaultPool`] over
/// [`PgConnect`]. Cheap to clone; drop it into axum state as it is.
pub type VaultPgPool = pool::VaultPool<PgConnect>;

/// Builds a [`VaultPgPool`]: the leasing setters of [`pool::Builder`], deadpool's
/// `max_size`/`timeouts`, and the PostgreSQL ones below.
pub type Builder = pool::Builder<pool::Deadpool<PgTarget>>;

/// Where and how the pool connects to PostgreSQL, as set on the [`Builder`].
pub struct PgTarget {
    pg: Option<tokio_postgres::Config>,
    connect: Option<Arc<dyn deadpool_postgres::Connect>>,
    recycling: RecyclingMethod,
    #[cfg(feature = "tls")]
    ssl: Option<crate::tls::PgTls>,
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTarget")
            .field("pg", &self.pg) // tokio-postgres redacts a password
            .field("tls", &self.connect.is_some())
            .field("recycling", &self.recycling)
            .finish()
    }
}

impl VaultPgPool {
    /// A pool for the database role `role`, configured from the environment: Vault from
    /// the Vault CLI's variables ([`ClientBuilder::from_env`](crate::vault::ClientBuilder::from_env)),
    /// PostgreSQL from `DATABASE_URL` (without password) or `PGHOST`, `PGPORT`,
    /// `PGDATABASE`, `PGSSLMODE`.
    ///
    /// # Errors
    /// As [`Builder::build`](pool::Builder::build).
    pub async fn new(role: impl Into<String>) -> Result<Self> {
        Self::builder(role).build().await
    }

    /// A builder for the database role `role` on the mount `database`.
    pub fn builder(role: impl Into<String>) -> Builder {
        Self::builder_for(DatabaseRole::new(role))
    }

    /// A builder for any [`CredentialSource`]: a [`DatabaseRole`] on another mount, or
    /// static credentials in KV v2 ([`KvCredentials`](crate::lease::KvCredentials)).
    pub fn builder_for(source: impl Into<CredentialSource>) -> Builder {
        pool::Builder::new(
            source,
            pool::Deadpool::new(
                PgTarget {
                    pg: None,
                    connect: None,
                    recycling: RecyclingMethod::Fast,
                    #[cfg(feature = "tls")]
                    ssl: None,
                },
                pool::Timeouts {
                    wait: Some(Duration::from_secs(10)),
                    create: Some(Duration::from_secs(10)),
                    recycle: Some(Duration::from_secs(5)),
                },
            ),
        )
    }
}

impl Builder {
    /// The PostgreSQL target (host, port, database, options); user and password are
    /// ignored — the lease supplies them. Default: from the environment.
    pub fn pg_config(mut self, config: tokio_postgres::Config) -> Self {
        self.target.backend.pg = Some(config);
        self
    }

    /// TLS settings with libpq's meaning ([`PgTls`](crate::tls::PgTls): sslmode, root
    /// and client certificates). Default: from `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`,
    /// `PGSSLKEY` and `DATABASE_URL`'s parameters; without them, `prefer`.
    #[cfg(feature = "tls")]
    pub fn ssl(mut self, tls: crate::tls::PgTls) -> Self {
        self.target.backend.ssl = Some(tls);
        self
    }

    /// A TLS connector of your own (e.g. a `tokio-postgres-rustls` connector), used as
    /// it is with the `ssl_mode` of the [`pg_config`](Self::pg_config). Default: with
    /// the `tls` feature, one made from [`ssl`](Self::ssl)'s settings; without it, no TLS.
    pub fn tls<T>(mut self, tls: T) -> Self
    where
        T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>
            + Clone
            + Sync
            + Send
            + 'static,
        T::Stream: Sync + Send,
        T::TlsConnect: Sync + Send,
        <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
    {
        self.target.backend.connect = Some(Arc::new(deadpool_postgres::ConfigConnectImpl { tls }));
        self
    }

    /// How an idle connection is checked before reuse. Default
    /// [`RecyclingMethod::Fast`] (is it still open?).
    pub fn recycling_method(mut self, method: RecyclingMethod) -> Self {
        self.target.backend.recycling = method;
        self
    }

    /// Lease the first credentials (verified with one real connection), start the
    /// engine and build the pool.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for missing settings; whatever leasing or the verifying
    /// connection fails with.
    pub async fn build(self) -> Result<VaultPgPool> {
        let (lease, deadpool, target) = self.into_parts();
        lease.source.validate()?;
        let env = |k: &str| std::env::var(k).ok();
        let from_env = target.pg.is_none();
        let mut config = match target.pg {
            Some(c) => c,
            None => pg_config_from_lookup(env)?,
        };
        let connect = match target.connect {
            Some(connect) => connect,
            #[cfg(feature = "tls")]
            None => {
                let tls = match target.ssl {
                    Some(tls) => tls,
                    None => {
                        // libpq's variables; a pg_config given without PGSSLMODE keeps
                        // its own mode.
                        let mut params = env("DATABASE_URL")
                            .filter(|_| from_env)
                            .map(|u| ssl_params(&u))
                            .unwrap_or_default();
                        if !from_env && env("PGSSLMODE").is_none() {
                            params
                                .push(("sslmode".into(), mode_name(config.get_ssl_mode()).into()));
                        }
                        crate::tls::PgTls::from_lookup(env, &params)?
                    }
                };
                config.ssl_mode(tls.tokio_postgres_mode());
                let connect: Arc<dyn deadpool_postgres::Connect> = match tls.connector()? {
                    Some(tls) => Arc::new(deadpool_postgres::ConfigConnectImpl { tls }),
                    None => Arc::new(deadpool_postgres::ConfigConnectImpl {
                        tls: tokio_postgres::NoTls,
                    }),
                };
                connect
            }
            #[cfg(not(feature = "tls"))]
            None => {
                if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "configuring PostgreSQL at {}: sslmode asks for TLS, and vaultpool \
                             was built without its `tls` feature; enable it (or give a \
                             connector with .tls(…))",
                            self::target(&config)
                        ),
                    ));
                }
                let _ = from_env;
                Arc::new(deadpool_postgres::ConfigConnectImpl {
                    tls: tokio_postgres::NoTls,
                })
            }
        };
        if config.get_application_name().is_none() {
            config.application_name("vaultpool");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        let verify = PgConnect {
            config,
            connect,
            // Verification always asks the server, whatever the recycling method.
            recycling: RecyclingMethod::Verified,
        };
        let connect = PgConnect {
            recycling: target.recycling,
            ..verify.clone()
        };
        let vault = lease.vault()?;
        Self::build_with(lease, deadpool, vault, verify, connect).await
    }
}

/// PostgreSQL settings from `DATABASE_URL` (which must not carry a password) or the libpq
/// variables `PGHOST`, `PGPORT`, `PGDATABASE`, `PGSSLMODE`.
///
/// # Errors
/// [`ErrorKind::Config`] when `DATABASE_URL` is empty, unparsable or has a password, or
/// when no database is named.
pub fn pg_config_from_lookup(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<tokio_postgres::Config> {
    if let Some(url) = lookup("DATABASE_URL") {
        if url.trim().is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "reading DATABASE_URL: it is set but empty; set it to e.g. \
                 postgres://db.internal:5432/app (no user or password: Vault supplies them) \
                 or unset it and use PGHOST/PGPORT/PGDATABASE",
            ));
        }
        // tokio-postgres knows only three sslmodes: the TLS parameters are read apart.
        let params = ssl_params(&url);
        let mut config = tokio_postgres::Config::from_str(&without_ssl_params(url.trim()))
            .map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    "reading DATABASE_URL: it is not a PostgreSQL URL or key=value string",
                )
                .with_source(e)
            })?;
        if config.get_password().is_some() {
            return Err(Error::new(
                ErrorKind::Config,
                "reading DATABASE_URL: it carries a password; remove it — vaultpool logs in \
                 with credentials leased from Vault",
            ));
        }
        if let Some((_, mode)) = params.iter().rev().find(|(k, _)| k == "sslmode") {
            config.ssl_mode(tokio_mode(mode, "the sslmode of DATABASE_URL")?);
        }
        return Ok(config);
    }
    let mut config = tokio_postgres::Config::new();
    config.host(lookup("PGHOST").unwrap_or_else(|| "localhost".into()));
    if let Some(port) = lookup("PGPORT") {
        config.port(port.trim().parse().map_err(|_| {
            Error::new(
                ErrorKind::Config,
                format!("reading PGPORT: {port:?} is not a port number"),
            )
        })?);
    }
    let db = lookup("PGDATABASE").ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            "configuring PostgreSQL: set PGDATABASE (and PGHOST, PGPORT) or DATABASE_URL",
        )
    })?;
    config.dbname(db);
    if let Some(mode) = lookup("PGSSLMODE") {
        config.ssl_mode(tokio_mode(&mode, "PGSSLMODE")?);
    }
    Ok(config)
}

/// tokio-postgres' mode for a libpq sslmode (it knows disable, prefer and require; the
/// certificate checks of verify-ca/verify-full are the connector's).
fn tokio_mode(mode: &str, from: &str) -> Result<tokio_postgres::config::SslMode> {
    use tokio_postgres::config::SslMode;
    Ok(match mode.trim() {
        "disable" => SslMode::Disable,
        "prefer" | "allow" => SslMode::Prefer,
        "require" | "verify-ca" | "verify-full" => SslMode::Require,
        other => {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "reading {from}: unknown mode {other:?}; use disable, allow, prefer, \
                     require, verify-ca or verify-full"
                ),
            ));
        }
    })
}

#[cfg(feature = "tls")]
fn mode_name(mode: tokio_postgres::config::SslMode) -> &'static str {
    match mode {
        tokio_postgres::config::SslMode::Disable => "disable",
        tokio_postgres::config::SslMode::Require => "require",
        _ => "prefer",
    }
}

/// The TLS parameters libpq reads from a connection string.
const SSL_PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// The TLS parameters of a URL (`postgres://…?sslmode=…`) or key=value string.
fn ssl_params(conn: &str) -> Vec<(String, String)> {
    let conn = conn.trim();
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        url::Url::parse(conn)
            .map(|u| {
                u.query_pairs()
                    .filter(|(k, _)| SSL_PARAMS.contains(&k.as_ref()))
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default()
    } else {
        conn.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| SSL_PARAMS.contains(k))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
            .collect()
    }
}

/// The connection string without its TLS parameters.
fn without_ssl_params(conn: &str) -> String {
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        let Ok(mut url) = url::Url::parse(conn) else {
            return conn.to_owned();
        };
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| !SSL_PARAMS.contains(&k.as_ref()))
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        url.to_string()
    } else {
        conn.split_whitespace()
            .filter(|kv| {
                kv.split_once('=')
                    .is_none_or(|(k, _)| !SSL_PARAMS.contains(&k))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lookup;

    #[test]
    fn libpq_variables_are_read() {
        let c = pg_config_from_lookup(lookup(&[
            ("PGHOST", "db.internal"),
            ("PGPORT", "6432"),
            ("PGDATABASE", "app"),
            ("PGSSLMODE", "disable"),
        ]))
        .unwrap();
        assert_eq!(target(&c), "db.internal:6432/app");
    }

    #[test]
    fn database_url_with_password_is_refused_without_echoing_it() {
        let err = pg_config_from_lookup(lookup(&[(
            "DATABASE_URL",
            "postgres://app:hunter2@db:5432/app",
        )]))
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(err.to_string().contains("password"), "{err}");
    }

    #[test]
    fn empty_database_url_is_a_clear_config_error() {
        let err = pg_config_from_lookup(lookup(&[("DATABASE_URL", " ")])).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        let err = pg_config_from_lookup(lookup(&[])).unwrap_err();
        assert!(err.to_string().contains("PGDATABASE"), "{err}");
        let err =
            pg_config_from_lookup(lookup(&[("PGDATABASE", "a"), ("PGPORT", "x")])).unwrap_err();
        assert!(err.to_string().contains("PGPORT"), "{err}");
    }

    #[test]
    fn every_libpq_sslmode_is_accepted_and_tls_parameters_are_set_apart() {
        use tokio_postgres::config::SslMode;
        let c = pg_config_from_lookup(lookup(&[(
            "DATABASE_URL",
            "postgres://db:5433/app?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x",
        )]))
        .unwrap();
        assert_eq!(c.get_ssl_mode(), SslMode::Require);
        assert_eq!(c.get_application_name(), Some("x"));
        let params = ssl_params("postgres://db/app?sslmode=verify-ca&sslrootcert=/ca.pem");
        assert_eq!(params.len(), 2);
        assert_eq!(
            without_ssl_params("host=db dbname=app sslmode=verify-full"),
            "host=db dbname=app"
        );
        let e = pg_config_from_lookup(lookup(&[("PGDATABASE", "a"), ("PGSSLMODE", "verify")]))
            .unwrap_err();
        assert!(e.to_string().contains("verify-full"), "{e}");
    }

    #[test]
    fn database_url_without_password_is_used() {
        let c =
            pg_config_from_lookup(lookup(&[("DATABASE_URL", "postgres://db:5433/app")])).unwrap();
        assert_eq!(target(&c), "db:5433/app");
    }
}
