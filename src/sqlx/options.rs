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
    // sqlx has no getter for the root certificate; its Debug shows it. The password
    // (PGPASSWORD, if sqlx read it) is blanked first: the text never holds a secret.
    let shown = format!("{:?}", options.clone().password(""));
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

/// `options` given in code, never with a weaker mode than `PGSSLMODE` or
/// `DATABASE_URL`'s `sslmode` names (a `require` there must not fall back to plaintext
/// because options were given in code).
///
/// # Errors
/// [`ErrorKind::Config`] for an unknown mode in either.
pub(super) fn at_least_the_environments_mode(
    options: PgConnectOptions,
    env: impl Fn(&str) -> Option<String>,
) -> Result<PgConnectOptions> {
    let mut named = None;
    if let Some(mode) = env("PGSSLMODE").filter(|m| !m.trim().is_empty()) {
        named = named.max(Some(SslMode::parse_from(&mode, "PGSSLMODE")?));
    }
    if let Some(url) = env("DATABASE_URL").and_then(|u| url::Url::parse(u.trim()).ok()) {
        for (_, mode) in url.query_pairs().filter(|(k, _)| k == "sslmode") {
            named = named.max(Some(SslMode::parse_from(&mode, "DATABASE_URL's sslmode")?));
        }
    }
    Ok(match named {
        Some(mode) if mode > SslMode::from_sqlx(options.get_ssl_mode()) => {
            options.ssl_mode(mode.to_sqlx())
        }
        _ => options,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use ::sqlx::postgres::PgSslMode;

    /// Options given in code keep the environment's mode at least. Before, `PGSSLMODE`
    /// was ignored once `.connect_options(..)` was given.
    #[test]
    fn options_given_in_code_keep_the_environments_mode() {
        let raised = |mode: PgSslMode, vars: &'static [(&'static str, &'static str)]| {
            let lookup = |k: &str| {
                vars.iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| (*v).to_owned())
            };
            at_least_the_environments_mode(
                PgConnectOptions::new_without_pgpass().ssl_mode(mode),
                lookup,
            )
            .map(|o| o.get_ssl_mode())
        };
        const URL: &str = "postgres://db.example/app?sslmode=verify-full";
        assert!(matches!(
            raised(PgSslMode::Prefer, &[("PGSSLMODE", "require")]).unwrap(),
            PgSslMode::Require
        ));
        assert!(matches!(
            raised(PgSslMode::Disable, &[("DATABASE_URL", URL)]).unwrap(),
            PgSslMode::VerifyFull
        ));
        assert!(matches!(
            raised(PgSslMode::Require, &[("PGSSLMODE", "disable")]).unwrap(),
            PgSslMode::Require
        ));
        assert!(raised(PgSslMode::Prefer, &[("PGSSLMODE", "verify_full")]).is_err());
    }

    /// The weak-TLS check never formats a password: a password in the options is
    /// blanked before sqlx's Debug text is searched (checked by the text searched).
    #[test]
    fn the_weak_tls_check_sees_no_password() {
        let options = PgConnectOptions::new_without_pgpass()
            .password("hunter2-secret")
            .ssl_mode(PgSslMode::Require)
            .ssl_root_cert("/tmp/ca.pem");
        let err = refuse_weak_tls(&options).unwrap_err();
        assert!(!format!("{err} {err:?}").contains("hunter2"));
        assert!(!format!("{:?}", options.clone().password("")).contains("hunter2"));
    }
}
