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

/// A check that passed: ready at once, and zero-sized (`Box::pin` of it does not
/// allocate, where an `async {}` block, one byte of state, would).
struct Fine;

impl std::future::Future for Fine {
    type Output = std::result::Result<(), String>;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::task::Poll::Ready(Ok(()))
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
        pool::tls_diagnosis(e.code().map(|c| c.code()), &pool::chain_text(e))
    }

    fn check<'a>(&'a self, conn: &'a mut ClientWrapper) -> BoxFuture<'a, Result<(), String>> {
        // Fast recycling (the default) decides here, and answers with a zero-sized future:
        // boxing it allocates nothing, on the path of every checkout.
        if conn.is_closed() {
            return Box::pin(async { Err("connection closed".into()) });
        }
        let Some(sql) = self.recycling.query() else {
            return Box::pin(Fine);
        };
        Box::pin(async move {
            conn.simple_query(sql)
                .await
                .map(|_| ())
                .map_err(|e| format!("checking a pooled PostgreSQL connection: {e}"))
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
    /// `PGSSLKEY` and `DATABASE_URL`'s parameters; without them, `prefer`. Given here,
    /// they are merged with those: the strongest mode named anywhere wins, and a
    /// certificate file not given here is taken from there. Refused together with
    /// [`tls`](Self::tls).
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
        let mut config = match target.pg {
            Some(c) => c,
            None => pg_config_from_lookup(env)?,
        };
        #[cfg(feature = "tls")]
        if target.connect.is_some() && target.ssl.is_some() {
            return Err(Error::new(
                ErrorKind::Config,
                "configuring PostgreSQL TLS: both .tls(connector) and .ssl(settings) are given, \
                 and the connector would silently win; give one of them",
            ));
        }
        let connect = match target.connect {
            Some(connect) => connect,
            #[cfg(feature = "tls")]
            None => {
                // Never weaker than any place that names a mode: DATABASE_URL, PGSSLMODE,
                // and the config's own mode when it was set (Disable or Require; Prefer is
                // tokio-postgres' default, so it says nothing).
                let mut params = env("DATABASE_URL")
                    .map(|u| ssl_params(&u))
                    .transpose()?
                    .unwrap_or_default();
                match config.get_ssl_mode() {
                    tokio_postgres::config::SslMode::Disable => {
                        params.push(("sslmode".into(), "disable".into()));
                    }
                    tokio_postgres::config::SslMode::Require => {
                        params.push(("sslmode".into(), "require".into()));
                    }
                    _ => {}
                }
                let from_env = crate::tls::PgTls::from_lookup(env, &params)?;
                let tls = match target.ssl {
                    Some(tls) => {
                        // A mode named in the environment (or the config), or
                        // sslrootcert=system, counts; libpq's `prefer` default does not.
                        let named = params.iter().any(|(k, _)| k == "sslmode")
                            || env("PGSSLMODE").is_some_and(|m| !m.trim().is_empty())
                            || from_env.uses_system_roots();
                        tls.merged_with(from_env, named)
                    }
                    None => from_env,
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
                let asked = env("PGSSLMODE")
                    .iter()
                    .chain(
                        env("DATABASE_URL")
                            .map(|u| ssl_params(&u))
                            .transpose()?
                            .unwrap_or_default()
                            .iter()
                            .filter(|(k, _)| k == "sslmode")
                            .map(|(_, v)| v),
                    )
                    .any(|m| matches!(m.trim(), "require" | "verify-ca" | "verify-full"));
                if asked || config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
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
        let params = ssl_params(&url)?;
        let mut config =
            tokio_postgres::Config::from_str(&without_ssl_params(&url)?).map_err(|e| {
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
        // The strongest sslmode named (libpq takes the last; never weaker is safer).
        let strength = |m: &tokio_postgres::config::SslMode| match m {
            tokio_postgres::config::SslMode::Disable => 0,
            tokio_postgres::config::SslMode::Require => 2,
            _ => 1,
        };
        let mut modes = Vec::new();
        for (_, m) in params.iter().filter(|(k, _)| k == "sslmode") {
            modes.push(tokio_mode(m, "the sslmode of DATABASE_URL")?);
        }
        if let Some(mode) = modes.into_iter().max_by_key(strength) {
            config.ssl_mode(mode);
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

/// The TLS parameters libpq reads from a connection string.
const SSL_PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// The TLS parameters of a URL (`postgres://…?sslmode=…`, multi-host too) or a
/// key=value string (values may be quoted).
///
/// # Errors
/// [`ErrorKind::Config`] when a key=value string has an unterminated quote.
fn ssl_params(conn: &str) -> Result<Vec<(String, String)>> {
    Ok(conn_params(conn.trim())?
        .into_iter()
        .filter(|(k, _, _)| SSL_PARAMS.contains(&k.as_str()))
        .map(|(k, v, _)| (k, v))
        .collect())
}

/// The connection string without its TLS parameters; everything else as written.
fn without_ssl_params(conn: &str) -> Result<String> {
    let conn = conn.trim();
    let params = conn_params(conn)?;
    if !params
        .iter()
        .any(|(k, _, _)| SSL_PARAMS.contains(&k.as_str()))
    {
        return Ok(conn.to_owned());
    }
    let kept = params
        .iter()
        .filter(|(k, _, _)| !SSL_PARAMS.contains(&k.as_str()))
        .map(|(_, _, raw)| raw.as_str());
    if is_url(conn) {
        let (base, _) = conn.split_once('?').unwrap_or((conn, ""));
        let query: Vec<&str> = kept.collect();
        Ok(if query.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", query.join("&"))
        })
    } else {
        Ok(kept.collect::<Vec<_>>().join(" "))
    }
}

fn is_url(conn: &str) -> bool {
    conn.starts_with("postgres://") || conn.starts_with("postgresql://")
}

/// (key, decoded value, the segment as written) of a URL's query or a key=value string.
fn conn_params(conn: &str) -> Result<Vec<(String, String, String)>> {
    if is_url(conn) {
        let query = conn.split_once('?').map_or("", |(_, q)| q);
        return Ok(query
            .split('&')
            .filter(|seg| !seg.is_empty())
            .map(|seg| {
                let (k, v) = seg.split_once('=').unwrap_or((seg, ""));
                (percent_decode(k), percent_decode(v), seg.to_owned())
            })
            .collect());
    }
    // key = value pairs, separated by whitespace; values in single quotes may hold
    // spaces, with \' and \\ escaped (libpq's rules).
    let mut out = Vec::new();
    let mut chars = conn.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut key = String::new();
        while let Some(&(_, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_some_and(|(_, c)| *c == '=') {
            chars.next();
        }
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek().is_some_and(|(_, c)| *c == '\'') {
            chars.next();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, e)) = chars.next() {
                            value.push(e);
                        }
                    }
                    '\'' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "reading the connection string: the value of {key} has no closing quote"
                    ),
                ));
            }
        } else {
            while let Some(&(_, c)) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        let end = chars.peek().map_or(conn.len(), |(i, _)| *i);
        out.push((key, value, conn[start..end].trim_end().to_owned()));
    }
    Ok(out)
}

/// `%XX` decoded (a `+` stays a `+`, as libpq reads it).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
        let params =
            ssl_params("postgres://db/app?sslmode=verify-ca&sslrootcert=/a+b%20c.pem").unwrap();
        assert_eq!(
            params,
            vec![
                ("sslmode".to_string(), "verify-ca".to_string()),
                ("sslrootcert".to_string(), "/a+b c.pem".to_string())
            ]
        );
        // Other parameters untouched, as written.
        assert_eq!(
            without_ssl_params("postgres://h1:5432,h2:5433/app?options=-c%20x%3D1&sslmode=require")
                .unwrap(),
            "postgres://h1:5432,h2:5433/app?options=-c%20x%3D1"
        );
        assert_eq!(
            ssl_params("postgres://h1:5432,h2:5433/app?sslmode=require").unwrap(),
            vec![("sslmode".to_string(), "require".to_string())]
        );
        assert_eq!(
            without_ssl_params(
                "host=db dbname=app sslmode = verify-full sslrootcert='/x y/ca.pem'"
            )
            .unwrap(),
            "host=db dbname=app"
        );
        assert_eq!(
            ssl_params("host=db sslrootcert='/x y/ca.pem'").unwrap(),
            vec![("sslrootcert".to_string(), "/x y/ca.pem".to_string())]
        );
        assert!(ssl_params("host=db sslrootcert='/x").is_err());
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
