//! Credentials and the lease they come with.
//!
//! [`Credentials`] hold a username and a [`SecretString`] password; their `Debug` shows
//! the username only. A [`Lease`] is what Vault says about how long they live. A
//! [`KvSecret`] is one version of a KV v2 secret, its values `SecretString`s too.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use secrecy::SecretString;

use crate::error::{Error, ErrorKind, Result};

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

/// A KV v2 secret: its values (each a [`SecretString`]) and version metadata.
///
/// `Debug` shows the path, version and key names, never a value. Cheap to clone.
#[derive(Clone)]
pub struct KvSecret {
    inner: Arc<KvInner>,
}

struct KvInner {
    mount: String,
    path: String,
    version: u64,
    created_time: String,
    data: BTreeMap<String, SecretString>,
}

impl KvSecret {
    /// A secret as read from `mount`/`path` (the Vault client builds these).
    pub(crate) fn new(
        mount: &str,
        path: &str,
        version: u64,
        created_time: String,
        data: BTreeMap<String, SecretString>,
    ) -> Self {
        Self {
            inner: Arc::new(KvInner {
                mount: mount.to_owned(),
                path: path.to_owned(),
                version,
                created_time,
                data,
            }),
        }
    }

    /// The value under `key`. Non-string JSON values are given as their JSON text.
    pub fn get(&self, key: &str) -> Option<&SecretString> {
        self.inner.data.get(key)
    }

    /// The value under `key`, or a [`ErrorKind::NotFound`] error naming the path and key.
    ///
    /// # Errors
    /// When the secret has no such key.
    pub fn require(&self, key: &str) -> Result<&SecretString> {
        self.get(key).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "reading key {key:?} of KV secret {}/{} (version {})",
                    self.inner.mount, self.inner.path, self.inner.version
                ),
            )
        })
    }

    /// The key names.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.inner.data.keys().map(String::as_str)
    }

    /// The KV version this value is.
    pub fn version(&self) -> u64 {
        self.inner.version
    }

    /// When this version was written (RFC 3339, as Vault reports it).
    pub fn created_time(&self) -> &str {
        &self.inner.created_time
    }

    /// The secret's path below its mount.
    pub fn path(&self) -> &str {
        &self.inner.path
    }
}

#[cfg(all(test, any(feature = "kafka", feature = "redis")))]
impl KvSecret {
    /// A secret built in memory, for unit tests.
    pub(crate) fn for_test(mount: &str, path: &str, version: u64, pairs: &[(&str, &str)]) -> Self {
        Self {
            inner: Arc::new(KvInner {
                mount: mount.into(),
                path: path.into(),
                version,
                created_time: String::new(),
                data: pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), SecretString::from(*v)))
                    .collect(),
            }),
        }
    }
}

impl fmt::Debug for KvSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvSecret")
            .field("mount", &self.inner.mount)
            .field("path", &self.inner.path)
            .field("version", &self.inner.version)
            .field("keys", &self.inner.data.keys().collect::<Vec<_>>())
            .finish()
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
