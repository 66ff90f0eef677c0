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
//!
//! Here: the [`Connect`](pool::Connect) for tokio-postgres, the builder, and the TLS
//! connector made from libpq's settings; reading `DATABASE_URL` and the libpq variables
//! is in `conninfo.rs`.

mod conninfo;
mod watch;

use std::fmt;
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
use crate::pool::diagnosis;
pub use conninfo::pg_config_from_lookup;
use watch::{Dial, Dialed, Dialer, Fatal};

/// How vaultpool opens PostgreSQL connections: the target (host, port, database,
/// options), TLS, and the check made before an idle connection is reused.
#[derive(Clone)]
pub struct PgConnect {
    config: tokio_postgres::Config,
    connect: Arc<dyn Dial>,
    recycling: RecyclingMethod,
    /// The connector made from TLS settings (its files are read again when they
    /// change), to say what they held when the server refuses the certificate.
    #[cfg(feature = "tls")]
    tls_files: Option<crate::tls::PgConnector>,
}

/// A pooled PostgreSQL connection: a [`ClientWrapper`] (derefs to it, and on to
/// [`tokio_postgres::Client`]) whose stream from the server is watched. Once the server
/// has sent a `FATAL` error on it (`pg_terminate_backend`, a revoke that ends sessions, a
/// restart), it is never handed out again — even before tokio-postgres has seen the
/// connection close, which is when a plain deadpool-postgres pool would still hand it
/// to the next caller. Watched: TLS connections, and plaintext ones to a host name
/// (`sslmode=disable`, or no TLS connector); not: `prefer` falling back to plaintext when
/// the server has no TLS, Unix sockets.
///
/// Cancelling: call [`cancel_token`](Self::cancel_token) on it (or on the pooled
/// handle, which reaches it first). A plaintext connection is opened through a connector
/// of the pool's own, and a token taken from the inner [`tokio_postgres::Client`] — by an
/// explicit deref, or in code that takes `&Client` — cannot cancel on it
/// ("no TLS implementation configured").
pub struct WatchedClient {
    client: ClientWrapper,
    fatal: Fatal,
    plain: bool,
}

impl WatchedClient {
    /// A token to cancel the query running on this connection, as
    /// [`tokio_postgres::Client::cancel_token`] — which it replaces: a plaintext
    /// connection of the pool is opened in a way (see [`WatchedClient`]) whose cancel
    /// request needs vaultpool's own connector, and [`CancelToken::cancel_query`] picks it.
    pub fn cancel_token(&self) -> CancelToken {
        CancelToken {
            inner: self.client.cancel_token(),
            plain: self.plain,
        }
    }

    /// Whether the server ended the session with a fatal error (the connection is
    /// closed when it is returned).
    pub fn ended_by_server(&self) -> bool {
        self.fatal.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Cancels the query running on a pooled connection ([`WatchedClient::cancel_token`]).
#[derive(Clone)]
pub struct CancelToken {
    inner: tokio_postgres::CancelToken,
    plain: bool,
}

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelToken").finish_non_exhaustive()
    }
}

impl CancelToken {
    /// Ask the server to cancel the connection's running query, over a new connection
    /// made with `tls` (pass the pool's kind: `NoTls` for plaintext; for a plaintext
    /// pool connection, vaultpool's own connector is used whatever `tls` is).
    ///
    /// # Errors
    /// tokio-postgres' error when the cancel request cannot be sent.
    pub async fn cancel_query<T>(&self, tls: T) -> Result<(), tokio_postgres::Error>
    where
        T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    {
        if self.plain {
            self.inner.cancel_query(watch::plain_for_cancel()).await
        } else {
            self.inner.cancel_query(tls).await
        }
    }
}

impl std::ops::Deref for WatchedClient {
    type Target = ClientWrapper;
    fn deref(&self) -> &ClientWrapper {
        &self.client
    }
}

impl std::ops::DerefMut for WatchedClient {
    fn deref_mut(&mut self) -> &mut ClientWrapper {
        &mut self.client
    }
}

impl fmt::Debug for WatchedClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchedClient")
            .field("closed", &self.client.is_closed())
            .field("ended_by_server", &self.ended_by_server())
            .finish()
    }
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
struct CheckPassed;

impl std::future::Future for CheckPassed {
    type Output = std::result::Result<(), String>;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl pool::Connect for PgConnect {
    type Conn = WatchedClient;
    type Error = tokio_postgres::Error;

    fn open<'a>(
        &'a self,
        creds: &'a Credentials,
    ) -> BoxFuture<'a, Result<WatchedClient, tokio_postgres::Error>> {
        Box::pin(async move {
            let mut config = self.config.clone();
            config
                .user(&creds.username)
                .password(creds.password.expose_secret());
            let Dialed {
                client,
                fatal,
                plain,
            } = self.connect.dial(&config).await?;
            Ok(WatchedClient {
                client,
                fatal,
                plain,
            })
        })
    }

    fn is_auth_failure(&self, e: &tokio_postgres::Error) -> bool {
        // pg_hba's "no encryption" refusal has an auth SQLSTATE too; it is a TLS matter,
        // and no new credentials would help.
        e.code()
            .is_some_and(|c| diagnosis::PG_AUTH_FAILURE.contains(&c.code()))
            && self.tls_problem(e).is_none()
    }

    fn reason(&self, e: &tokio_postgres::Error) -> Option<String> {
        Some(diagnosis::reason(e))
    }

    fn tls_problem(&self, e: &tokio_postgres::Error) -> Option<&'static str> {
        diagnosis::postgres_tls_diagnosis(e.code().map(|c| c.code()), &diagnosis::chain_text(e))
    }

    #[cfg(feature = "tls")]
    fn tls_detail(&self, e: &tokio_postgres::Error) -> Option<String> {
        let text = diagnosis::chain_text(e).to_ascii_lowercase();
        crate::watched::peer_refused_our_certificate(&text)
            .then(|| self.tls_files.as_ref()?.describe())
            .flatten()
    }

    fn check<'a>(&'a self, conn: &'a mut WatchedClient) -> BoxFuture<'a, Result<(), String>> {
        // Fast recycling (the default) decides here, and answers with a zero-sized future:
        // boxing it allocates nothing, on the path of every checkout.
        if conn.is_closed() {
            return Box::pin(async { Err("connection closed".into()) });
        }
        if conn.ended_by_server() {
            return Box::pin(async {
                Err("the server ended the session (a FATAL error), closing it".into())
            });
        }
        let Some(sql) = self.recycling.query() else {
            return Box::pin(CheckPassed);
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

/// A pooled connection. Derefs to [`WatchedClient`], and on to [`ClientWrapper`] and
/// [`tokio_postgres::Client`]. Returned to the pool on drop — or closed, if its
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
    connect: Option<Arc<dyn Dial>>,
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
        // `NoTls` cannot do TLS (tokio-postgres asks it, through a private method that a
        // wrapper cannot answer): it is plaintext, so that `prefer` falls back to it.
        let dial: Arc<dyn Dial> =
            if std::any::TypeId::of::<T>() == std::any::TypeId::of::<tokio_postgres::NoTls>() {
                Arc::new(Dialer::plaintext())
            } else {
                Arc::new(Dialer::tls(tls))
            };
        self.target.backend.connect = Some(dial);
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
        // A connector given in code is used as it is, but never with a weaker mode than
        // the environment names: PGSSLMODE=require must not fall back to plaintext
        // because a pg_config was given in code.
        #[cfg(feature = "tls")]
        let (connect, tls_files) = match target.connect {
            Some(connect) => {
                at_least_the_environments_mode(&mut config, env)?;
                (connect, None)
            }
            None => connector_from_settings(&mut config, target.ssl, env)?,
        };
        #[cfg(not(feature = "tls"))]
        let connect = match target.connect {
            Some(connect) => {
                at_least_the_environments_mode(&mut config, env)?;
                connect
            }
            None => plaintext_connector(&config, env)?,
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
            #[cfg(feature = "tls")]
            tls_files,
        };
        let connect = PgConnect {
            recycling: target.recycling,
            ..verify.clone()
        };
        let vault = lease.vault()?;
        Self::build_with(lease, deadpool, vault, verify, connect).await
    }
}

/// Raise `config`'s mode to the strongest that `PGSSLMODE` or `DATABASE_URL`'s `sslmode`
/// names, if stronger (`require` and above are tokio-postgres' `require`; verifying the
/// certificate is the connector's part).
///
/// # Errors
/// [`ErrorKind::Config`] for an unknown mode in either.
fn at_least_the_environments_mode(
    config: &mut tokio_postgres::Config,
    env: impl Fn(&str) -> Option<String>,
) -> Result<()> {
    use crate::libpq::SslMode;
    let from_url: Vec<String> = env("DATABASE_URL")
        .map(|u| conninfo::ssl_params(&u))
        .transpose()?
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k == "sslmode")
        .map(|(_, v)| v)
        .collect();
    let from_env = env("PGSSLMODE").filter(|m| !m.trim().is_empty());
    let named = SslMode::strongest(from_env.as_deref(), "PGSSLMODE")?.max(SslMode::strongest(
        from_url.iter().map(String::as_str),
        "DATABASE_URL's sslmode",
    )?);
    let own = SslMode::named_by_tokio_postgres(config.get_ssl_mode()).unwrap_or(SslMode::Prefer);
    if let Some(mode) = named.filter(|m| *m > own) {
        config.ssl_mode(mode.to_tokio_postgres());
    }
    Ok(())
}

/// The connector made from TLS settings with libpq's meaning: `ssl` (the builder's, if
/// given) merged with the environment's (`PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`,
/// `PGSSLKEY`, `DATABASE_URL`'s parameters) and `config`'s own mode; `config`'s mode is
/// set to match. With TLS, the [`PgConnector`](crate::tls::PgConnector) inside too (its
/// files are read again when they change).
///
/// # Errors
/// [`ErrorKind::Config`] for an unknown mode, a certificate without its key, or
/// certificate files that cannot be used.
#[cfg(feature = "tls")]
fn connector_from_settings(
    config: &mut tokio_postgres::Config,
    ssl: Option<crate::tls::PgTls>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(Arc<dyn Dial>, Option<crate::tls::PgConnector>)> {
    // Never weaker than any place that names a mode: DATABASE_URL, PGSSLMODE, and the
    // config's own mode when it was set (Disable or Require; Prefer is tokio-postgres'
    // default, so it says nothing).
    let mut params = env("DATABASE_URL")
        .map(|u| conninfo::ssl_params(&u))
        .transpose()?
        .unwrap_or_default();
    if let Some(mode) = crate::libpq::SslMode::named_by_tokio_postgres(config.get_ssl_mode()) {
        params.push(("sslmode".into(), mode.to_string()));
    }
    let from_env = crate::tls::PgTls::from_lookup(&env, &params)?;
    let tls = match ssl {
        Some(tls) => {
            // A mode named in the environment (or the config), or sslrootcert=system,
            // counts; libpq's `prefer` default does not.
            let named = params.iter().any(|(k, _)| k == "sslmode")
                || env("PGSSLMODE").is_some_and(|m| !m.trim().is_empty())
                || from_env.uses_system_roots();
            tls.merged_with(from_env, named)
        }
        None => from_env,
    };
    config.ssl_mode(tls.mode().to_tokio_postgres());
    Ok(match tls.connector()? {
        Some(tls) => (Arc::new(Dialer::tls(tls.clone())), Some(tls)),
        None => (Arc::new(Dialer::plaintext()), None),
    })
}

/// The connector of a build without the `tls` feature: plaintext, and refused when
/// `PGSSLMODE`, `DATABASE_URL` or `config` asks for TLS (`require` or stronger).
///
/// # Errors
/// [`ErrorKind::Config`] when TLS is asked for.
#[cfg(not(feature = "tls"))]
fn plaintext_connector(
    config: &tokio_postgres::Config,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Arc<dyn Dial>> {
    use crate::libpq::SslMode;
    let asks_for_tls = |m: SslMode| m >= SslMode::Require;
    let asked = env("PGSSLMODE")
        .iter()
        .chain(
            env("DATABASE_URL")
                .map(|u| conninfo::ssl_params(&u))
                .transpose()?
                .unwrap_or_default()
                .iter()
                .filter(|(k, _)| k == "sslmode")
                .map(|(_, v)| v),
        )
        .any(|m| SslMode::from_name(m.trim()).is_some_and(asks_for_tls));
    if asked || SslMode::named_by_tokio_postgres(config.get_ssl_mode()).is_some_and(asks_for_tls) {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "configuring PostgreSQL at {}: sslmode asks for TLS, and vaultpool was built \
                 without its `tls` feature; enable it (or give a connector with .tls(…))",
                target(config)
            ),
        ));
    }
    Ok(Arc::new(Dialer::plaintext()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::SslMode as T;

    /// `.tls(connector)` with `.pg_config(..)`: the config's mode is raised to what the
    /// environment names, never lowered. Before, PGSSLMODE and DATABASE_URL were ignored
    /// there, and a `prefer` config fell back to plaintext under `PGSSLMODE=require`.
    #[test]
    fn a_connector_given_in_code_keeps_the_environments_mode() {
        let raised = |mode: T, vars: &'static [(&'static str, &'static str)]| {
            let mut config = tokio_postgres::Config::new();
            config.ssl_mode(mode);
            let lookup = |k: &str| {
                vars.iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| (*v).to_owned())
            };
            at_least_the_environments_mode(&mut config, lookup).map(|()| config.get_ssl_mode())
        };
        const URL: &str = "postgres://db.example/app?sslmode=verify-full";
        assert_eq!(
            raised(T::Prefer, &[("PGSSLMODE", "require")]).unwrap(),
            T::Require
        );
        assert_eq!(
            raised(T::Disable, &[("DATABASE_URL", URL)]).unwrap(),
            T::Require
        );
        assert_eq!(
            raised(T::Prefer, &[("PGSSLMODE", "disable")]).unwrap(),
            T::Prefer,
            "lowered"
        );
        assert_eq!(
            raised(T::Require, &[("PGSSLMODE", "prefer")]).unwrap(),
            T::Require
        );
        assert_eq!(raised(T::Prefer, &[]).unwrap(), T::Prefer);
        let err = raised(T::Prefer, &[("PGSSLMODE", "verify_full")]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("PGSSLMODE"), "{err}");
    }
}
