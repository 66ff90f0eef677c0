//! Where credentials come from. The engine only needs issue, renew and revoke; the Vault
//! database secrets engine is the real source, tests may plug in another.

use std::time::{Duration, Instant};

use super::BoxFuture;
use crate::credentials::{Credentials, Lease, Leased};
use crate::error::Result;
use crate::vault::Client;

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
}

/// `{mount}/creds/{role}` of the database secrets engine.
pub(crate) struct VaultDatabase {
    client: Client,
    mount: String,
    role: String,
}

impl VaultDatabase {
    pub(crate) fn new(client: Client, mount: String, role: String) -> Result<Self> {
        crate::vault::check_name("the database secrets mount", &mount)?;
        crate::vault::check_name("the database role", &role)?;
        Ok(Self {
            client,
            mount,
            role,
        })
    }
}

impl Source for VaultDatabase {
    fn issue(&self) -> BoxFuture<'_, Result<Leased<Credentials>>> {
        Box::pin(self.client.database_creds(&self.mount, &self.role))
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
}
