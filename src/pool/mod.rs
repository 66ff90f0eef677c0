//! One pool handle for every backend, and one builder.
//!
//! - [`VaultPool<C>`](VaultPool) is the handle: `get`, `engine`, `rotate`, `status`,
//!   `close`, written once. `postgres::VaultPgPool` and `redis::VaultRedisPool` are
//!   this type over their backend's [`Connect`]; a new deadpool-based backend is a
//!   `Connect` impl and a few lines (deadpool-postgres does the same with its
//!   `Manager`). A driver this crate has no feature for is a `Connect` of your own given
//!   to [`VaultPool::custom`].
//! - [`Builder<T>`](Builder) holds what every pool sets about leasing — the
//!   [`CredentialSource`], the Vault client, the [`Policy`], the drain timeout — with its
//!   setters written once here; `T` is the backend's own settings (its target, and for
//!   deadpool pools [`Deadpool`]'s size and timeouts), whose setters live in the
//!   backend's module.
//! - [`PoolStatus`] is what every pool's `status()` returns, the sqlx flavour included.
//!
//! The machinery (the deadpool manager, the generation-tagged connection, the task that
//! retires idle connections) is in `inner.rs`; the deadpool handle in `handle.rs`.

#[cfg(any(feature = "postgres", feature = "redis"))]
mod handle;
#[cfg(any(feature = "postgres", feature = "redis"))]
mod inner;

use std::fmt;
use std::time::Duration;

use crate::error::Result;
use crate::lease::{self, CredentialSource, Engine, Policy, Verifier};
use crate::vault::Client;

#[cfg(any(feature = "postgres", feature = "redis"))]
pub use ::deadpool::managed::Timeouts;
#[cfg(any(feature = "postgres", feature = "redis"))]
pub use handle::{Custom, Deadpool, VaultPool};
#[cfg(any(feature = "postgres", feature = "redis"))]
pub use inner::{Connect, Pooled, RotatingManager, Tagged};

/// The SQLSTATEs of a refused PostgreSQL login: `invalid_password` (also what an expired,
/// dropped or unknown user gets) and `invalid_authorization_specification`.
#[cfg(any(feature = "postgres", feature = "sqlx"))]
pub(crate) const PG_AUTH_FAILURE: [&str; 2] = ["28P01", "28000"];

/// What a user should do about a failed TLS connection to PostgreSQL, from the error's
/// text (rustls' and PostgreSQL's), if it is a TLS matter.
/// An error and its sources as one line, to look for what they say.
#[cfg(any(feature = "postgres", feature = "sqlx", feature = "redis"))]
pub(crate) fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// What to fix when a connection to PostgreSQL failed for a TLS reason: a refusal by
/// the server (`sqlstate` given: only pg_hba's 28000 for a *plaintext* connection counts,
/// so a real login refusal is never taken for one; a refusal of a TLS connection is not
/// blamed on TLS — PostgreSQL names the encryption in every pg_hba refusal, and the
/// advice would be to weaken it) or a failed handshake (no SQLSTATE; rustls' and the
/// drivers' words).
#[cfg(any(feature = "postgres", feature = "sqlx"))]
pub(crate) fn tls_diagnosis(sqlstate: Option<&str>, text: &str) -> Option<&'static str> {
    let t = text.to_ascii_lowercase();
    if let Some(code) = sqlstate {
        return match code {
            "28000" if t.contains("no encryption") || t.contains("ssl off") => Some(
                "no pg_hba.conf entry accepts this plaintext connection: if the server \
                 accepts only TLS connections here (pg_hba hostssl), set PGSSLMODE to require \
                 or verify-full (with PGSSLROOTCERT); otherwise pg_hba lacks an entry for \
                 this user and database",
            ),
            _ => None,
        };
    }
    if t.contains("notvalidforname") || t.contains("not valid for name") {
        Some(
            "the server's certificate does not name the host connected to: connect by a name \
             the certificate holds, or use sslmode=verify-ca",
        )
    } else if t.contains("unknownissuer") || t.contains("unknown issuer") {
        Some(
            "the server's certificate is not signed by the root certificate given: set \
             PGSSLROOTCERT to the CA that signed it",
        )
    } else if t.contains("without tls support") {
        Some("sslmode asks for TLS: build vaultpool with its `tls` feature")
    } else if t.contains("server does not support tls") || t.contains("ssl is not enabled") {
        Some(
            "the server does not offer TLS: enable ssl on the server, or use sslmode=prefer \
             or disable",
        )
    } else if t.contains("alert") && t.contains("certificateexpired") {
        Some(
            "the server refused the client certificate as expired: renew it (PGSSLCERT / \
             PGSSLKEY)",
        )
    } else if t.contains("certificate")
        && (t.contains("expired") || t.contains("notvalidyet") || t.contains("not valid yet"))
        && !t.contains("revocation")
    {
        Some("the server's certificate is expired or not yet valid: renew it on the server")
    } else {
        None
    }
}

#[cfg(all(test, any(feature = "postgres", feature = "sqlx")))]
mod tests {
    use super::tls_diagnosis as diagnose;

    #[test]
    fn tls_failures_are_explained() {
        let hba = "FATAL: pg_hba.conf rejects connection for host \"127.0.0.1\", user \"u\", \
                   database \"d\", no encryption";
        assert!(diagnose(Some("28000"), hba).unwrap().contains("PGSSLMODE"));
        // Over TLS, a pg_hba refusal (a missing entry for the user) is not blamed on TLS.
        let hba_tls = "FATAL: no pg_hba.conf entry for host \"127.0.0.1\", user \"v-app\", \
                       database \"d\", SSL encryption";
        assert!(diagnose(Some("28000"), hba_tls).is_none());
        // A client certificate the server refused as expired is the client's to renew.
        assert!(
            diagnose(None, "received fatal alert: CertificateExpired")
                .unwrap()
                .contains("client certificate")
        );
        // A real login refusal is never taken for TLS, whatever the user's name says.
        assert!(
            diagnose(
                Some("28P01"),
                "password authentication failed for user \"v-unknownissuer-certificate-expired\""
            )
            .is_none()
        );
        assert!(
            diagnose(None, "invalid peer certificate: NotValidForName")
                .unwrap()
                .contains("verify-ca")
        );
        assert!(
            diagnose(None, "invalid peer certificate: UnknownIssuer")
                .unwrap()
                .contains("PGSSLROOTCERT")
        );
        assert!(diagnose(None, "invalid peer certificate: certificate not valid yet").is_some());
        assert!(diagnose(None, "connection refused").is_none());
    }
}

/// Pool and lease status together; every pool's `status()` returns it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PoolStatus {
    /// The lease engine's status (source, generation, lease, TTL left, connections per
    /// generation, last error).
    pub lease: lease::Status,
    /// Connections open (idle and in use).
    pub size: usize,
    /// Idle connections.
    pub available: usize,
    /// Callers waiting for a connection (the sqlx flavour cannot tell: 0).
    pub waiting: usize,
    /// The pool's maximum size.
    pub max_size: usize,
    /// Connections opened by a pre-warm and not yet taken (outside `size`; at most the
    /// pool's size, closed 30 s after the swap if unused). Always 0 for sqlx.
    pub prepared: usize,
}

/// Builds a pool: the leasing settings shared by every backend, plus the backend's own
/// settings `T` (see each backend's `Builder` alias).
#[must_use]
pub struct Builder<T> {
    pub(crate) lease: LeaseOptions,
    pub(crate) target: T,
}

impl<T: fmt::Debug> fmt::Debug for Builder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("source", &self.lease.source)
            .field("vault", &self.lease.vault)
            .field("policy", &self.lease.policy)
            .field("drain_timeout", &self.lease.drain_timeout)
            .field("auth_failure_wait", &self.lease.auth_failure_wait)
            .field("target", &self.target)
            .finish()
    }
}

/// What every pool builder sets about leasing, with its defaults.
#[derive(Debug, Clone)]
pub(crate) struct LeaseOptions {
    /// What is leased.
    pub(crate) source: CredentialSource,
    /// Default: `Client::from_env()` at build.
    pub(crate) vault: Option<Client>,
    /// Default `Policy::default()`.
    pub(crate) policy: Policy,
    /// Default `None`: until the old lease's end.
    pub(crate) drain_timeout: Option<Duration>,
    /// Default 5 s.
    pub(crate) auth_failure_wait: Duration,
    /// Default `None`: the engine's (10 s).
    pub(crate) verify_timeout: Option<Duration>,
}

impl LeaseOptions {
    /// The given Vault client, or one from the Vault CLI's environment variables.
    /// The Vault client: the one given, else from the environment — unless the source
    /// needs none (a custom one).
    pub(crate) fn vault(&self) -> Result<Option<Client>> {
        match (&self.vault, &self.source) {
            (Some(v), _) => Ok(Some(v.clone())),
            (None, CredentialSource::Custom(_)) => Ok(None),
            (None, _) => Client::from_env().map(Some),
        }
    }

    /// Lease and verify the first credentials and start the engine.
    pub(crate) async fn engine(
        self,
        vault: Option<Client>,
        verify: Verifier,
        prewarm: Option<crate::lease::Prewarm>,
    ) -> Result<Engine> {
        let mut engine = Engine::builder_with(vault, self.source)
            .policy(self.policy)
            .verify_with(verify);
        if let Some(prewarm) = prewarm {
            engine = engine.prewarm_with(prewarm);
        }
        if let Some(timeout) = self.drain_timeout {
            engine = engine.drain_timeout(timeout);
        }
        if let Some(timeout) = self.verify_timeout {
            engine = engine.verify_timeout(timeout);
        }
        engine.build().await
    }
}

impl<T> Builder<T> {
    pub(crate) fn new(source: impl Into<CredentialSource>, target: T) -> Self {
        Self {
            lease: LeaseOptions {
                source: source.into(),
                vault: None,
                policy: Policy::default(),
                drain_timeout: None,
                auth_failure_wait: Duration::from_secs(5),
                verify_timeout: None,
            },
            target,
        }
    }

    /// What the pool leases.
    pub fn credential_source(&self) -> &CredentialSource {
        &self.lease.source
    }

    /// The Vault client. Default: [`Client::from_env`], made at build.
    pub fn vault(mut self, client: Client) -> Self {
        self.lease.vault = Some(client);
        self
    }

    /// Renewal and rotation timing. Default [`Policy::default`].
    pub fn policy(mut self, policy: Policy) -> Self {
        self.lease.policy = policy;
        self
    }

    /// How long a retired generation's connections may stay in use before its lease is
    /// revoked anyway (which ends their sessions); also how long `close()` waits.
    /// Default: no cap — they drain until the old lease's end, so a long transaction
    /// across a rotation completes; `close()` waits up to 30 s. See
    /// [`lease::Builder::drain_timeout`].
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.lease.drain_timeout = Some(timeout);
        self
    }

    /// How long the connection that checks new credentials may take to log in and
    /// answer before the rotation counts as failed (and is retried later). Default 10 s.
    /// It also bounds each login of the sqlx flavour's login probe.
    pub fn verify_timeout(mut self, timeout: Duration) -> Self {
        self.lease.verify_timeout = Some(timeout);
        self
    }

    /// After the server refuses credentials whose lease should be valid (revoked from
    /// outside), how long a connect waits for the re-lease. Default 5 s.
    pub fn auth_failure_wait(mut self, wait: Duration) -> Self {
        self.lease.auth_failure_wait = wait;
        self
    }
}
