//! libpq's rules that both PostgreSQL flavours (and the TLS settings) follow: the one
//! [`SslMode`] type that names, parses and ranks `sslmode` and converts it to the
//! drivers' own enums, and how `DATABASE_URL` is read (set means not empty, and no
//! password in it).
//!
//! Public as `vaultpool::tls::SslMode` (feature `tls`); without that feature
//! the type is only used inside the crate, to read and compare the modes users name.
// Without `tls` nothing re-exports `SslMode`: it is crate-internal then.
#![cfg_attr(not(feature = "tls"), allow(unreachable_pub))]

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, ErrorKind, Result};

/// libpq's `sslmode`.
/// Ordered from weakest to strongest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
#[non_exhaustive]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS if the server offers it (tried first; libpq tries plaintext first).
    Allow,
    /// TLS if the server offers it (libpq's default).
    #[default]
    Prefer,
    /// TLS or nothing; the certificate is checked only if a root certificate is given.
    Require,
    /// TLS, the server's certificate signed by the root certificate.
    VerifyCa,
    /// As `VerifyCa`, and the certificate names the host connected to.
    VerifyFull,
}

impl SslMode {
    /// Every mode, weakest first.
    const ALL: [Self; 6] = [
        Self::Disable,
        Self::Allow,
        Self::Prefer,
        Self::Require,
        Self::VerifyCa,
        Self::VerifyFull,
    ];

    /// libpq's name for the mode (`verify-full`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// The mode libpq calls `name`, exactly (no trimming, no case folding).
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// `value` (trimmed) as a mode; `from` names where it was read, for the message.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for an unknown mode ([`unknown`](Self::unknown)).
    pub(crate) fn parse_from(value: &str, from: &str) -> Result<Self> {
        let value = value.trim();
        Self::from_name(value).ok_or_else(|| Self::unknown(value, from))
    }

    /// The strongest of the modes named in `values` (in order, each as
    /// [`parse_from`](Self::parse_from) reads it), `None` for none: where several places
    /// name a mode, a setting is never weakened by another.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for the first unknown mode.
    #[cfg(any(feature = "postgres", feature = "tls"))]
    pub(crate) fn strongest<'a>(
        values: impl IntoIterator<Item = &'a str>,
        from: &str,
    ) -> Result<Option<Self>> {
        let mut strongest = None;
        for value in values {
            strongest = strongest.max(Some(Self::parse_from(value, from)?));
        }
        Ok(strongest)
    }

    /// The error for an unknown mode `shown`, read from `from` ("PGSSLMODE").
    pub(crate) fn unknown(shown: &str, from: &str) -> Error {
        Error::new(
            ErrorKind::Config,
            format!(
                "reading {from}: unknown mode {shown:?}; use disable, allow, prefer, require, \
                 verify-ca or verify-full"
            ),
        )
    }

    /// tokio-postgres' mode for this one (it knows disable, prefer and require; the
    /// certificate checks of verify-ca/verify-full are the connector's).
    #[cfg(feature = "postgres")]
    pub(crate) fn to_tokio_postgres(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as T;
        match self {
            Self::Disable => T::Disable,
            Self::Allow | Self::Prefer => T::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => T::Require,
        }
    }

    /// The mode a tokio-postgres config names, if it names one: `Disable` or `Require`;
    /// `Prefer` is tokio-postgres' default, so it says nothing.
    #[cfg(feature = "postgres")]
    pub(crate) fn named_by_tokio_postgres(mode: tokio_postgres::config::SslMode) -> Option<Self> {
        match mode {
            tokio_postgres::config::SslMode::Disable => Some(Self::Disable),
            tokio_postgres::config::SslMode::Require => Some(Self::Require),
            _ => None,
        }
    }

    /// sqlx's mode for this one (sqlx knows all six).
    #[cfg(feature = "sqlx")]
    pub(crate) fn to_sqlx(self) -> ::sqlx::postgres::PgSslMode {
        use ::sqlx::postgres::PgSslMode as M;
        match self {
            Self::Disable => M::Disable,
            Self::Allow => M::Allow,
            Self::Prefer => M::Prefer,
            Self::Require => M::Require,
            Self::VerifyCa => M::VerifyCa,
            Self::VerifyFull => M::VerifyFull,
        }
    }

    /// The mode for sqlx's.
    #[cfg(feature = "sqlx")]
    pub(crate) fn from_sqlx(mode: ::sqlx::postgres::PgSslMode) -> Self {
        use ::sqlx::postgres::PgSslMode as M;
        match mode {
            M::Disable => Self::Disable,
            M::Allow => Self::Allow,
            M::Prefer => Self::Prefer,
            M::Require => Self::Require,
            M::VerifyCa => Self::VerifyCa,
            M::VerifyFull => Self::VerifyFull,
        }
    }
}

impl FromStr for SslMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse_from(s, "sslmode")
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `DATABASE_URL` read as both PostgreSQL flavours read it: set means not empty (the
/// message ends with `advice`, what to set instead), then `parse`d, and refused if
/// `has_password` (vaultpool logs in with leased credentials). `url` is given as set,
/// untrimmed.
///
/// # Errors
/// [`ErrorKind::Config`] when it is empty or carries a password; what `parse` returns.
#[cfg(any(feature = "postgres", feature = "sqlx"))]
pub(crate) fn read_database_url<T>(
    url: &str,
    advice: &str,
    parse: impl FnOnce(&str) -> Result<T>,
    has_password: impl FnOnce(&T) -> bool,
) -> Result<T> {
    if url.trim().is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "reading DATABASE_URL: it is set but empty; set it to e.g. \
                 postgres://db.internal:5432/app {advice}"
            ),
        ));
    }
    let parsed = parse(url)?;
    if has_password(&parsed) {
        return Err(Error::new(
            ErrorKind::Config,
            "reading DATABASE_URL: it carries a password; remove it — vaultpool logs in \
             with credentials leased from Vault",
        ));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_rank_weakest_first() {
        for (i, mode) in SslMode::ALL.into_iter().enumerate() {
            assert_eq!(mode.name().parse::<SslMode>().unwrap(), mode);
            assert_eq!(mode.to_string(), mode.name());
            assert!(SslMode::ALL[..i].iter().all(|weaker| *weaker < mode));
        }
        assert_eq!(SslMode::from_name(" require"), None);
        let e = SslMode::parse_from(" verify ", "PGSSLMODE").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(
            e.to_string()
                .starts_with("reading PGSSLMODE: unknown mode \"verify\""),
            "{e}"
        );
    }
}
