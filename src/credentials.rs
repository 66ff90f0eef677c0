//! Credentials and the lease they come with.
//!
//! [`Credentials`] hold a username and a [`SecretString`] password; their `Debug` shows
//! the username only. A [`Lease`] is what Vault says about how long they live.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use secrecy::SecretString;

use crate::vault::KvSecret;

/// A username and password issued by Vault (e.g. by `database/creds/<role>`).
///
/// The password is a [`SecretString`]: zeroized on drop, redacted in `Debug`, readable
/// only through [`secrecy::ExposeSecret`].
#[derive(Clone)]
#[non_exhaustive]
pub struct Credentials {
    /// The login name (not secret: it shows up in server logs and `pg_stat_activity`).
    pub username: String,
    /// The password.
    pub password: SecretString,
    /// The KV v2 secret these credentials were read from, for KV sources: adapters that
    /// need its other keys (Kafka's bootstrap servers, Redis' host) read them here.
    kv: Option<KvSecret>,
}

impl Credentials {
    /// Credentials from a username and password.
    pub fn new(username: impl Into<String>, password: impl Into<SecretString>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
            kv: None,
        }
    }

    /// The same credentials, remembering the KV secret they were read from.
    pub(crate) fn with_kv(mut self, kv: KvSecret) -> Self {
        self.kv = Some(kv);
        self
    }

    /// The whole KV v2 secret these credentials were read from (its values are
    /// [`SecretString`]s too), or `None` when they were not read from KV.
    pub fn kv_secret(&self) -> Option<&KvSecret> {
        self.kv.as_ref()
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"[REDACTED]")
            .finish()
    }
}

/// What Vault said about a secret's lifetime when it issued or renewed it.
///
/// `issued_at` is a monotonic [`Instant`] taken when the response arrived; all scheduling
/// uses it. Wall-clock time is only for display.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// The lease id (`database/creds/app/AbC…`); empty for secrets without a lease.
    /// Lease ids are not secrets: they are in Vault's audit log in clear.
    pub id: String,
    /// How long the secret lives from `issued_at`. Zero means Vault set no expiry.
    pub duration: Duration,
    /// Whether Vault allows renewing it.
    pub renewable: bool,
    /// When the response carrying this lease arrived (monotonic).
    pub issued_at: Instant,
    /// Wall-clock time of the same moment, for display.
    pub issued_at_wall: SystemTime,
    /// Warnings Vault attached (e.g. "TTL … exceeded the effective max_ttl").
    pub warnings: Vec<String>,
}

impl Lease {
    /// A lease that starts now.
    pub fn new(id: impl Into<String>, duration: Duration, renewable: bool) -> Self {
        Self {
            id: id.into(),
            duration,
            renewable,
            issued_at: Instant::now(),
            issued_at_wall: SystemTime::now(),
            warnings: Vec::new(),
        }
    }

    /// When the lease ends, or `None` for a lease without expiry (duration 0).
    pub fn expires_at(&self) -> Option<Instant> {
        // A duration past what `Instant` can hold is a lease without a known end.
        (!self.duration.is_zero())
            .then(|| self.issued_at.checked_add(self.duration))
            .flatten()
    }

    /// Time left at `now` (zero once expired), or `None` without expiry.
    pub fn remaining_at(&self, now: Instant) -> Option<Duration> {
        self.expires_at()
            .map(|end| end.saturating_duration_since(now))
    }

    /// Time left now.
    pub fn remaining(&self) -> Option<Duration> {
        self.remaining_at(Instant::now())
    }
}

/// A value together with the lease Vault issued it under.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Leased<T> {
    /// The value (e.g. [`Credentials`]).
    pub value: T,
    /// Its lease.
    pub lease: Lease,
}

impl<T> Leased<T> {
    /// Pair a value with its lease.
    pub fn new(value: T, lease: Lease) -> Self {
        Self { value, lease }
    }
}

/// A credentials generation: bumped by one on every rotation, starting at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gen{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_password() {
        let c = Credentials::new("v-app-1", "hunter2-very-secret".to_string());
        let dbg = format!("{c:?}");
        assert!(dbg.contains("v-app-1"), "{dbg}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        let leased = Leased::new(
            c,
            Lease::new("database/creds/x/1", Duration::from_secs(5), true),
        );
        assert!(!format!("{leased:?}").contains("hunter2"));
    }

    #[test]
    fn lease_without_duration_never_expires() {
        let l = Lease::new("", Duration::ZERO, false);
        assert_eq!(l.expires_at(), None);
        assert_eq!(l.remaining(), None);
        let l = Lease::new("x", Duration::from_secs(10), true);
        assert_eq!(
            l.remaining_at(l.issued_at + Duration::from_secs(20)),
            Some(Duration::ZERO)
        );
    }
}
