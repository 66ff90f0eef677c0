//! The connect options of the sqlx flavour: read from `DATABASE_URL` or the libpq
//! variables as libpq would (an unknown `PGSSLMODE` refused, the stronger of two modes
//! kept), and refused where sqlx's TLS would be weaker than libpq's.

use ::sqlx::postgres::PgConnectOptions;

use crate::error::{Error, ErrorKind, Result};
use crate::libpq::{SslMode, read_database_url};

/// sqlx's TLS trusts the public CAs besides the root certificate given: its `verify-ca`
/// would accept any public certificate for any name, and `sslrootcert=system` means every
/// public CA; and it checks nothing below `verify-ca`, where libpq (and the deadpool
/// flavour) check the chain when a root certificate is given. All are refused rather than
/// quietly weaker than libpq's — for the options given as for the environment's.
pub(super) fn refuse_weak_tls(options: &PgConnectOptions) -> Result<()> {
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
pub(super) fn from_env() -> Result<PgConnectOptions> {
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
