//! Credentials from your own code: a [`CredentialProvider`] under a name
//! ([`CustomSource`]), and the checked wrapper the engine calls ([`CheckedProvider`]),
//! which bounds every call and refuses leases out of range.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::{CredentialProvider, MAX_POLL, MIN_POLL, Source};
use crate::BoxFuture;
use crate::credentials::{Credentials, Lease, Leased};
use crate::error::{Error, ErrorKind, Result};

/// A [`CredentialProvider`] with its name, as a
/// [`CredentialSource::Custom`](super::CredentialSource::Custom).
#[derive(Clone)]
pub struct CustomSource {
    pub(super) name: String,
    pub(super) provider: Arc<dyn CredentialProvider>,
}

impl fmt::Debug for CustomSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomSource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The same provider under the same name.
impl PartialEq for CustomSource {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && Arc::ptr_eq(&self.provider, &other.provider)
    }
}

impl Eq for CustomSource {}

impl CustomSource {
    /// Check the name and the provider's poll interval.
    pub(super) fn validate(&self) -> Result<()> {
        self.validate_name()?;
        self.checked_poll_interval().map(|_| ())
    }

    /// Check that it has a name.
    fn validate_name(&self) -> Result<()> {
        if self.name.trim().is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "a custom credential source needs a name (for messages and status)",
            ));
        }
        Ok(())
    }

    /// The provider's poll interval, read once and checked (100 ms to a day).
    fn checked_poll_interval(&self) -> Result<Option<Duration>> {
        match self.provider.poll_interval() {
            Some(every) if !(MIN_POLL..=MAX_POLL).contains(&every) => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "{}: the poll interval {every:?} is out of range; use between \
                     {MIN_POLL:?} and a day",
                    self.name
                ),
            )),
            poll => Ok(poll),
        }
    }
}

/// A [`CredentialProvider`] as the engine sees it: its leases checked and stamped with
/// the engine's clock, its calls bounded, its poll interval read once (validated at
/// build).
pub(super) struct CheckedProvider {
    provider: Arc<dyn CredentialProvider>,
    name: String,
    poll: Option<Duration>,
}

impl CheckedProvider {
    /// Validate `custom` and wrap its provider.
    pub(super) fn new(custom: CustomSource) -> Result<Self> {
        custom.validate_name()?;
        // Read once and checked once: a provider answering differently the second time
        // (a zero among them) could otherwise make the engine poll in a loop.
        let poll = custom.checked_poll_interval()?;
        Ok(Self {
            provider: custom.provider,
            name: custom.name,
            poll,
        })
    }
}

/// The longest lease a custom source may give (Vault's own ceiling is 32 years; ten
/// keeps every deadline computable).
const MAX_CUSTOM_LEASE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl CheckedProvider {
    /// `lease` if its duration and id are acceptable, stamped with the engine's clock.
    fn checked(&self, mut lease: Lease, what: &str) -> Result<Lease> {
        if !lease.duration.is_zero()
            && !(Duration::from_secs(1)..=MAX_CUSTOM_LEASE).contains(&lease.duration)
        {
            return Err(Error::new(
                ErrorKind::Decode,
                format!(
                    "{what} of {}: a lease of {:?}; give zero (no expiry) or between 1 s and \
                     10 years",
                    self.name, lease.duration
                ),
            ));
        }
        if lease.id.is_empty() {
            return Err(Error::new(
                ErrorKind::Decode,
                format!(
                    "{what} of {}: the lease has no id; give each lease its own",
                    self.name
                ),
            ));
        }
        // The engine's clock (tokio's, which tests may pause), not the provider's.
        lease.issued_at = tokio::time::Instant::now().into_std();
        Ok(lease)
    }
}

/// A custom provider's issue answers within this (the engine's step limit).
const PROVIDER_ISSUE_TIMEOUT: Duration = Duration::from_secs(30);
/// A custom provider's revoke answers within this, or counts as a failed attempt.
const PROVIDER_REVOKE_TIMEOUT: Duration = Duration::from_secs(10);

impl CheckedProvider {
    /// The error for a call of the provider that did not answer within `after`.
    fn timed_out(&self, what: &str, after: Duration) -> Error {
        // Timeout (transient: retried), not Transport: that one speaks of Vault, and no
        // Vault is involved here.
        Error::new(
            ErrorKind::Timeout,
            format!(
                "{what} of {}: the credential provider did not answer within {after:?}; check \
                 the service it asks for credentials (the call is retried)",
                self.name
            ),
        )
        .fix_given()
    }
}

impl Source for CheckedProvider {
    fn issues_unique_leases(&self) -> bool {
        false
    }

    fn issue(&self) -> BoxFuture<'_, Result<Leased<Credentials>>> {
        Box::pin(async move {
            let leased = tokio::time::timeout(PROVIDER_ISSUE_TIMEOUT, self.provider.issue())
                .await
                .map_err(|_| self.timed_out("issuing credentials", PROVIDER_ISSUE_TIMEOUT))??;
            match self.checked(leased.lease.clone(), "issuing credentials") {
                Ok(lease) => Ok(Leased::new(leased.value, lease)),
                Err(e) => {
                    // Refused, but it may exist: give it back.
                    let _ = tokio::time::timeout(
                        PROVIDER_REVOKE_TIMEOUT,
                        self.provider.revoke(&leased.lease),
                    )
                    .await;
                    Err(e)
                }
            }
        })
    }
    fn renew<'a>(&'a self, lease: &'a Lease, increment: Duration) -> BoxFuture<'a, Result<Lease>> {
        Box::pin(async move {
            let renewed = self.provider.renew(lease, increment).await?;
            if renewed.id == lease.id
                && renewed.duration == lease.duration
                && renewed.issued_at == lease.issued_at
            {
                return Ok(renewed); // unchanged: the engine rotates before the end
            }
            if renewed.duration.is_zero() && !lease.duration.is_zero() {
                // "No end" for credentials that had one would stop every renewal and
                // rotation: taken as the lease being over, so the engine replaces it.
                return Err(Error::new(
                    ErrorKind::LeaseExpired,
                    format!(
                        "renewing a lease of {}: the renewal has no duration",
                        self.name
                    ),
                ));
            }
            self.checked(renewed, "renewing a lease")
        })
    }
    fn revoke<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            tokio::time::timeout(PROVIDER_REVOKE_TIMEOUT, self.provider.revoke(lease))
                .await
                .map_err(|_| self.timed_out("revoking a lease", PROVIDER_REVOKE_TIMEOUT))?
        })
    }
    fn poll_interval(&self) -> Option<Duration> {
        self.poll
    }
    fn changed<'a>(&'a self, current: &'a Lease) -> BoxFuture<'a, Result<bool>> {
        self.provider.changed(current)
    }
}
