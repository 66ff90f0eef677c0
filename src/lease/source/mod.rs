//! What is leased. [`CredentialSource`] names it — a dynamic database role, a static
//! role, a KV v2 secret, or a [`CredentialProvider`] of your own — so that builders,
//! messages and [`Status`](super::Status) say which; the crate-private [`Source`] trait
//! is what the engine calls on it (issue, renew, revoke, and "has something new been
//! written?").
//!
//! One file per source: `dynamic.rs` ([`DatabaseRole`]), `static_role.rs`
//! ([`StaticRole`]), `kv.rs` ([`KvCredentials`]) and `custom.rs` (your
//! [`CredentialProvider`], wrapped and checked).

mod custom;
mod dynamic;
mod kv;
mod static_role;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::BoxFuture;
use crate::credentials::{Credentials, Lease, Leased};
use crate::error::{Error, ErrorKind, Result};
use crate::vault::Client;

use custom::CustomSource;
pub use dynamic::DatabaseRole;
pub use kv::KvCredentials;
pub use static_role::StaticRole;

/// The shortest poll interval a KV source (or a custom one) accepts.
const MIN_POLL: Duration = Duration::from_millis(100);
/// The longest poll interval a KV source (or a custom one, or a database role's lease
/// check) accepts.
const MAX_POLL: Duration = Duration::from_secs(24 * 3600);

/// What a pool (or [`Engine`](super::Engine)) leases.
///
/// ```
/// use std::time::Duration;
/// use vaultpool::lease::{CredentialSource, DatabaseRole, KvCredentials};
///
/// let dynamic: CredentialSource = DatabaseRole::new("immune-readwrite").into();
/// assert_eq!(dynamic.to_string(), "database role immune-readwrite");
/// let from_kv: CredentialSource = KvCredentials::new("redis/main")
///     .poll_interval(Duration::from_secs(10))
///     .into();
/// assert_eq!(from_kv.to_string(), "KV secret secret/redis/main");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CredentialSource {
    /// Dynamic credentials from the database secrets engine: a new user per lease.
    DatabaseRole(DatabaseRole),
    /// Static credentials kept in a KV v2 secret; a new version is a rotation.
    Kv(KvCredentials),
    /// A static role of the database secrets engine: one user whose password Vault
    /// rotates on a period; each new password is a rotation.
    StaticRole(StaticRole),
    /// Credentials from your own code ([`CredentialSource::custom`]).
    Custom(CustomSource),
}

/// Credentials minted by your own code — a cloud IAM token (RDS IAM: 15-minute tokens;
/// Cloud SQL; Entra), a password set with `ALTER ROLE`, an in-memory fake for your own
/// tests — given the same renew / rotate / drain / revoke treatment as Vault's.
///
/// [`issue`](Self::issue) returns credentials with their [`Lease`]: a duration of zero
/// means "no expiry" (replace them when [`changed`](Self::changed) says so); otherwise the
/// engine renews a renewable lease at about ⅔ of its TTL (the first time, anywhere from
/// 1/15 to ⅔: see [`Policy::first_renewal_spread`](super::Policy::first_renewal_spread))
/// and rotates to freshly issued
/// credentials before it ends (a non-renewable one, such as an IAM token, is rotated
/// before its end). A retired generation is revoked once its last connection is back.
/// Issuing and verification failures are retried with backoff; every call is bounded
/// (an issue by the engine's 30 s step limit, a revoke by 10 s). Leases out of range
/// (over 10 years, under 1 s) are refused as errors.
///
/// A provider that gives one user a new password on each issue (as a static role does)
/// ends the old password when it sets the new one: sessions already open go on, and a
/// connection opened in the moment before the swap is refused and retried with the new
/// password (the pools' refused-login path). The sqlx flavour does not take custom
/// sources (it tells generations apart by user name). See
/// `examples/minted_passwords.rs`.
pub trait CredentialProvider: Send + Sync + 'static {
    /// New credentials with their lease. The lease's id names them in logs and status:
    /// give each issue its own id (a counter, a timestamp), never a secret. Its duration
    /// is zero (no expiry) or between 1 s and 10 years; its `issued_at` is set by the
    /// engine.
    fn issue(&self) -> BoxFuture<'_, Result<Leased<Credentials>>>;

    /// Extend a renewable lease by about `increment`; the answer's duration is what the
    /// lease has left. Default: the lease unchanged (it is rotated before its end).
    fn renew<'a>(&'a self, lease: &'a Lease, _increment: Duration) -> BoxFuture<'a, Result<Lease>> {
        Box::pin(async move { Ok(lease.clone()) })
    }

    /// Invalidate credentials no longer in use. Default: nothing (they expire). It may be
    /// called again for the same lease (a retry after a timeout): make it idempotent.
    fn revoke<'a>(&'a self, _lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// How often to ask [`changed`](Self::changed) (jittered ±10%, 100 ms to a day).
    /// Default: never.
    fn poll_interval(&self) -> Option<Duration> {
        None
    }

    /// Whether other credentials than those of `current` should serve now (then they are
    /// issued, verified and swapped in). Default: no.
    fn changed<'a>(&'a self, _current: &'a Lease) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async { Ok(false) })
    }
}

/// A shared provider is a provider (a test can keep an `Arc` to inspect its fake).
impl<P: CredentialProvider + ?Sized> CredentialProvider for Arc<P> {
    fn issue(&self) -> BoxFuture<'_, Result<Leased<Credentials>>> {
        (**self).issue()
    }
    fn renew<'a>(&'a self, lease: &'a Lease, increment: Duration) -> BoxFuture<'a, Result<Lease>> {
        (**self).renew(lease, increment)
    }
    fn revoke<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        (**self).revoke(lease)
    }
    fn poll_interval(&self) -> Option<Duration> {
        (**self).poll_interval()
    }
    fn changed<'a>(&'a self, current: &'a Lease) -> BoxFuture<'a, Result<bool>> {
        (**self).changed(current)
    }
}

impl CredentialSource {
    /// A short name for logs and metrics labels: the role, or the KV path.
    pub fn name(&self) -> &str {
        match self {
            Self::DatabaseRole(r) => &r.role,
            Self::Kv(k) => &k.path,
            Self::StaticRole(r) => &r.role,
            Self::Custom(c) => &c.name,
        }
    }

    /// Check names and settings before anything is sent.
    pub(crate) fn validate(&self) -> Result<()> {
        match self {
            Self::DatabaseRole(r) => r.validate(),
            Self::Kv(k) => k.validate(),
            Self::StaticRole(r) => r.validate(),
            Self::Custom(c) => c.validate(),
        }
    }

    /// Your own credentials, under `name` (what messages and status call them, e.g.
    /// "RDS IAM token for app@orders-db").
    pub fn custom(name: impl Into<String>, provider: impl CredentialProvider) -> Self {
        Self::Custom(CustomSource {
            name: name.into(),
            provider: Arc::new(provider),
        })
    }

    /// Validate, then make what the engine calls: a Vault-backed source needs `client`.
    pub(crate) fn into_source(self, client: Option<Client>) -> Result<Arc<dyn Source>> {
        if let Self::Custom(c) = self {
            // Validated by the wrapper itself, which reads the poll interval once.
            return Ok(Arc::new(custom::CheckedProvider::new(c)?));
        }
        self.validate()?;
        let Some(client) = client else {
            return Err(Error::new(
                ErrorKind::Config,
                format!("{self}: a Vault client is needed (Engine::builder(client, …))"),
            ));
        };
        Ok(match self {
            Self::DatabaseRole(r) => Arc::new(dynamic::VaultDatabase::new(client, r)),
            Self::Kv(k) => Arc::new(kv::KvStatic::new(client, k)),
            Self::StaticRole(r) => Arc::new(static_role::VaultStaticRole::new(client, r)),
            Self::Custom(_) => unreachable!("handled above"),
        })
    }
}

impl fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DatabaseRole(r) if r.mount == "database" => {
                write!(f, "database role {}", r.role)
            }
            Self::DatabaseRole(r) => write!(f, "database role {} (mount {})", r.role, r.mount),
            Self::Kv(k) => write!(f, "KV secret {}/{}", k.mount, k.path),
            Self::StaticRole(r) if r.mount == "database" => {
                write!(f, "static database role {}", r.role)
            }
            Self::StaticRole(r) => {
                write!(f, "static database role {} (mount {})", r.role, r.mount)
            }
            Self::Custom(c) => f.write_str(&c.name),
        }
    }
}

impl From<DatabaseRole> for CredentialSource {
    fn from(role: DatabaseRole) -> Self {
        Self::DatabaseRole(role)
    }
}

impl From<KvCredentials> for CredentialSource {
    fn from(kv: KvCredentials) -> Self {
        Self::Kv(kv)
    }
}

impl From<StaticRole> for CredentialSource {
    fn from(role: StaticRole) -> Self {
        Self::StaticRole(role)
    }
}

/// What the engine calls on a source. Issue, renew and revoke are all a lease needs; the
/// rest has defaults for sources without a Vault token or without polling.
pub(crate) trait Source: Send + Sync {
    /// Issue new credentials with their lease.
    fn issue(&self) -> BoxFuture<'_, Result<Leased<Credentials>>>;
    /// Renew a lease, asking for `increment`.
    fn renew<'a>(&'a self, lease: &'a Lease, increment: Duration) -> BoxFuture<'a, Result<Lease>>;
    /// Revoke a lease.
    fn revoke<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>>;
    /// The accessor of the auth token now in use (leases die with the token that issued
    /// them).
    fn issuing_token(&self) -> Option<String> {
        None
    }
    /// When the token with this accessor ends for good, if known.
    fn token_end(&self, _accessor: &str) -> Option<Instant> {
        None
    }
    /// When the auth token is due for renewal or re-login.
    fn token_refresh_at(&self) -> Option<Instant> {
        None
    }
    /// Renew or replace the auth token if due.
    fn refresh_token(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    /// While refreshing the auth token is failing (whoever tried last; refreshes run in
    /// the background): the failures in a row and the last error.
    fn token_failure(&self) -> Option<(u32, Error)> {
        None
    }
    /// Whether answers come through a cache in front of Vault (which hands one lease to
    /// several processes).
    fn behind_cache(&self) -> bool {
        false
    }
    /// How often to ask [`changed`](Source::changed): a KV source's poll, or a database
    /// role's lease check.
    fn poll_interval(&self) -> Option<Duration> {
        None
    }
    /// Whether the source holds other credentials than those of `current`.
    fn changed<'a>(&'a self, _current: &'a Lease) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async { Ok(false) })
    }
    /// How long until the next [`changed`](Source::changed) (jittered by the engine); by
    /// default the poll interval. A source that knows when its credentials change
    /// (a static role: Vault's `ttl`) says so here.
    fn poll_delay(&self) -> Option<Duration> {
        self.poll_interval()
    }
    /// Whether [`poll_delay`](Source::poll_delay) is a time before which nothing can
    /// have changed (jitter only after it).
    fn polls_when_due(&self) -> bool {
        false
    }
    /// Whether every issue gives a lease of its own (Vault does), so that a lease id the
    /// engine already holds means a cache handed it back, not new credentials. A user's
    /// provider may reuse ids for new credentials: each issue is taken as new.
    fn issues_unique_leases(&self) -> bool {
        true
    }
    /// Checked once at build, after the first issue (whose lease is revoked if this
    /// fails): what [`changed`](Source::changed) needs later, so a permission missing for
    /// polling fails the build, not every poll.
    fn preflight(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_zero_polls_refused() {
        let bad: CredentialSource = DatabaseRole::new("a/b").into();
        assert_eq!(bad.validate().unwrap_err().kind(), ErrorKind::Config);
        let zero: CredentialSource = KvCredentials::new("redis/main")
            .poll_interval(Duration::ZERO)
            .into();
        let e = zero.validate().unwrap_err();
        assert!(e.to_string().contains("shorter"), "{e}");
        assert!(e.to_string().contains("secret/redis/main"), "{e}");
        let other: CredentialSource = DatabaseRole::new("app").mount("pg").into();
        assert_eq!(other.to_string(), "database role app (mount pg)");
        assert_eq!(other.name(), "app");
    }
}
