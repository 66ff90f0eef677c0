//! A dynamic role of the database secrets engine ([`DatabaseRole`]): each issue is a new
//! database user with a lease of its own, renewed, and revoked once its generation has
//! drained. With a lease check, the serving lease is looked up now and then in case it
//! was revoked from outside.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{MAX_POLL, Source};
use crate::BoxFuture;
use crate::credentials::{Credentials, Lease, Leased};
use crate::error::{Error, ErrorKind, Result};
use crate::vault::Client;

/// A role of the database secrets engine: `GET {mount}/creds/{role}` issues a new user
/// with its own lease, renewed and finally revoked by the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseRole {
    pub(super) mount: String,
    pub(super) role: String,
    lease_check: Option<Duration>,
}

impl DatabaseRole {
    /// The role `role` on the mount `database`.
    pub fn new(role: impl Into<String>) -> Self {
        Self {
            mount: "database".into(),
            role: role.into(),
            lease_check: None,
        }
    }

    /// The secrets engine's mount. Default `database`.
    #[must_use]
    pub fn mount(mut self, mount: impl Into<String>) -> Self {
        self.mount = mount.into();
        self
    }

    /// Ask Vault every `every` (jittered ±10%; not while renewals come more often)
    /// whether the serving lease still exists (`sys/leases/lookup`), and re-lease at once
    /// if it was revoked from outside. For pools that cannot see a refused login
    /// themselves: `VaultSqlxPool::builder(role)` sets 15 s. Cost: one Vault read per
    /// pool per interval. Default: none (a refused login, or the next renewal, notices
    /// it). A refused lookup turns the check off for an hour, with one warning.
    #[must_use]
    pub fn check_lease_every(mut self, every: Duration) -> Self {
        self.lease_check = Some(every);
        self
    }

    /// How often the lease is looked up, if at all.
    pub fn get_lease_check(&self) -> Option<Duration> {
        self.lease_check
    }

    /// The role's name.
    pub fn get_role(&self) -> &str {
        &self.role
    }

    /// The secrets engine's mount.
    pub fn get_mount(&self) -> &str {
        &self.mount
    }

    /// Check the names and the lease check's interval.
    pub(super) fn validate(&self) -> Result<()> {
        crate::vault::check_name("the database secrets mount", &self.mount)?;
        crate::vault::check_name("the database role", &self.role)?;
        if let Some(every) = self.lease_check
            && !(Duration::from_secs(1)..=MAX_POLL).contains(&every)
        {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "checking the lease of database role {}: every {every:?}; use between a \
                     second and a day",
                    self.role
                ),
            ));
        }
        Ok(())
    }
}

/// `{mount}/creds/{role}` of the database secrets engine.
pub(super) struct VaultDatabase {
    client: Client,
    role: DatabaseRole,
    /// `sys/leases/lookup` was refused: the lease check is off until then (an hour
    /// later, in case the refusal came from a token that was about to be replaced).
    lookup_denied_until: Mutex<Option<Instant>>,
}

impl VaultDatabase {
    /// The role's source, leased through `client`.
    pub(super) fn new(client: Client, role: DatabaseRole) -> Self {
        Self {
            client,
            role,
            lookup_denied_until: Mutex::new(None),
        }
    }
}

/// How long a refused lease lookup turns the check off.
const LOOKUP_DENIED_PAUSE: Duration = Duration::from_secs(3600);

impl Source for VaultDatabase {
    fn behind_cache(&self) -> bool {
        self.client.behind_cache()
    }

    fn issue(&self) -> BoxFuture<'_, Result<Leased<Credentials>>> {
        Box::pin(
            self.client
                .database_creds(&self.role.mount, &self.role.role),
        )
    }

    fn renew<'a>(&'a self, lease: &'a Lease, increment: Duration) -> BoxFuture<'a, Result<Lease>> {
        Box::pin(self.client.renew_lease(&lease.id, Some(increment)))
    }

    fn revoke<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.client.revoke_lease(&lease.id))
    }

    fn issuing_token(&self) -> Option<String> {
        self.client.token_info().map(|t| t.accessor)
    }

    fn token_end(&self, accessor: &str) -> Option<Instant> {
        self.client.token_end(accessor)
    }

    fn token_refresh_at(&self) -> Option<Instant> {
        self.client.token_refresh_at()
    }

    fn refresh_token(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.client.login().await.map(|_| ()) })
    }

    fn token_failure(&self) -> Option<(u32, Error)> {
        self.client.token_refresh_failure()
    }

    fn poll_interval(&self) -> Option<Duration> {
        self.role.lease_check
    }

    /// With a lease check: whether the serving lease is gone in Vault (revoked from
    /// outside), so that it is replaced before anyone else notices.
    fn changed<'a>(&'a self, current: &'a Lease) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let denied = || {
                self.lookup_denied_until
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
            };
            if denied().is_some_and(|until| Instant::now() < until) {
                return Ok(false);
            }
            match self.client.lookup_lease(&current.id).await {
                Ok(_) => Ok(false),
                // Vault's own answer for a lease it does not know (HTTP 400 "invalid
                // lease"), not any 404 from a proxy or a wrong path.
                Err(e) if e.kind() == ErrorKind::NotFound && e.vault_status() == Some(400) => {
                    tracing::warn!(lease_id = %current.id, "the serving lease is gone in Vault; re-leasing");
                    Ok(true)
                }
                Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                    *denied() = Some(Instant::now() + LOOKUP_DENIED_PAUSE);
                    tracing::warn!(
                        "looking up the lease of database role {} was refused \
                         (sys/leases/lookup, in Vault's default policy); the check is off \
                         for an hour: {e}",
                        self.role.role
                    );
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })
    }
}
