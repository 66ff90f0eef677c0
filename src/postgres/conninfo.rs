//! How the PostgreSQL target is read from the environment: `DATABASE_URL` (a URL or a
//! key=value string, without password) or libpq's `PGHOST`, `PGPORT`, `PGDATABASE`,
//! `PGSSLMODE`; and the TLS parameters of a connection string (`sslmode`,
//! `sslrootcert`, `sslcert`, `sslkey`), which tokio-postgres does not know and which
//! are read apart.

use std::str::FromStr;

use crate::error::{Error, ErrorKind, Result};
use crate::libpq::{SslMode, read_database_url};

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
        let (mut config, params) = read_database_url(
            &url,
            "(no user or password: Vault supplies them) or unset it and use \
             PGHOST/PGPORT/PGDATABASE",
            |url| {
                // tokio-postgres knows only three sslmodes: the TLS parameters are read apart.
                let params = ssl_params(url)?;
                let config =
                    tokio_postgres::Config::from_str(&without_ssl_params(url)?).map_err(|e| {
                        Error::new(
                            ErrorKind::Config,
                            "reading DATABASE_URL: it is not a PostgreSQL URL or key=value string",
                        )
                        .with_source(e)
                    })?;
                Ok((config, params))
            },
            |(config, _)| config.get_password().is_some(),
        )?;
        // The strongest sslmode named (libpq takes the last; never weaker is safer).
        let named = params
            .iter()
            .filter(|(k, _)| k == "sslmode")
            .map(|(_, m)| m.as_str());
        if let Some(mode) = SslMode::strongest(named, "the sslmode of DATABASE_URL")? {
            config.ssl_mode(mode.to_tokio_postgres());
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
        config.ssl_mode(SslMode::parse_from(&mode, "PGSSLMODE")?.to_tokio_postgres());
    }
    Ok(config)
}

/// The TLS parameters libpq reads from a connection string.
const SSL_PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// The TLS parameters of a URL (`postgres://…?sslmode=…`, multi-host too) or a
/// key=value string (values may be quoted).
///
/// # Errors
/// [`ErrorKind::Config`] when a key=value string has an unterminated quote.
pub(super) fn ssl_params(conn: &str) -> Result<Vec<(String, String)>> {
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
    use crate::postgres::target;
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
