//! The database secrets engine: `{mount}/creds/{role}` (dynamic) and
//! `{mount}/static-creds/{role}` (static roles).

use secrecy::SecretString;
use serde::Deserialize;

use super::path::check_name;
use super::{Call, Client};
use crate::credentials::{Credentials, Leased};
use crate::error::{Error, ErrorKind, Result};

#[derive(Deserialize)]
pub(crate) struct CredsData {
    username: String,
    password: SecretString,
}

/// The answer of `{mount}/static-creds/{role}`: one user whose password Vault rotates
/// every `rotation_period`. `Debug` never shows the password.
#[derive(Deserialize)]
#[non_exhaustive]
pub struct StaticCreds {
    /// The database user (always the same).
    pub username: String,
    /// Its password now.
    pub password: SecretString,
    /// When Vault last set the password (RFC 3339), which names this version.
    pub last_vault_rotation: String,
    /// Seconds until Vault's next rotation, if Vault said.
    #[serde(rename = "ttl", default)]
    pub ttl_seconds: Option<u64>,
    /// Seconds between Vault's rotations.
    #[serde(rename = "rotation_period", default)]
    pub rotation_period_seconds: u64,
}

impl std::fmt::Debug for StaticCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCreds")
            .field("username", &self.username)
            .field("password", &"[REDACTED]")
            .field("last_vault_rotation", &self.last_vault_rotation)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("rotation_period_seconds", &self.rotation_period_seconds)
            .finish()
    }
}

/// How often a revoked lease from a cache is asked for again, and how long apart: a
/// Vault Proxy evicts a lease revoked through it just after it answers the revoke.
const CACHE_EVICTION_TRIES: u32 = 5;
/// The cached end of a lease could not be looked up: said once per process as a warning.
static CACHED_END_WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
const CACHE_EVICTION_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

impl Client {
    /// A lease a cache in front of Vault answered with (a Vault Proxy or Agent with
    /// `cache {}` hands every request the lease it issued first, with the TTL it had
    /// then): its real end from Vault (`sys/leases/lookup` is never cached), or an
    /// error if Vault no longer knows it (revoked, while the cache still holds it).
    async fn cached_lease_end(
        &self,
        lease: &mut crate::credentials::Lease,
        what: &str,
    ) -> Result<()> {
        match self.lookup_lease(&lease.id).await {
            Ok(info) => {
                tracing::debug!(
                    lease_id = %lease.id,
                    cached_ttl_s = lease.duration.as_secs(),
                    ttl_s = info.ttl.as_secs(),
                    "credentials came from a cache in front of Vault; their end is Vault's"
                );
                lease.duration = info.ttl;
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::new(
                ErrorKind::CredentialsUnavailable,
                format!(
                    "{what}: a cache in front of Vault (a Vault Proxy or Agent with `cache {{}}`) \
                     answered with lease {}, which Vault no longer knows (revoked); the cache \
                     drops it at its next renewal. Give the token `update` on \
                     `sys/leases/revoke` so that revocations evict the cache, or run the Proxy \
                     without `cache` for dynamic credentials",
                    lease.id
                ),
            )),
            Err(e) => {
                // Not allowed to look it up (or Vault unreachable): the cache's TTL, which
                // may be longer than what is left.
                if !CACHED_END_WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        lease_id = %lease.id,
                        "credentials came from a cache in front of Vault and their real end \
                         could not be looked up; taking the cached TTL: {e}"
                    );
                } else {
                    tracing::debug!(
                        lease_id = %lease.id,
                        "credentials came from a cache in front of Vault and their real end \
                         could not be looked up; taking the cached TTL: {e}"
                    );
                }
                Ok(())
            }
        }
    }

    /// Read a static role's credentials: `GET {mount}/static-creds/{role}`. Nothing is
    /// leased: the user stays, Vault changes its password every rotation period.
    ///
    /// # Errors
    /// As [`database_creds`](Self::database_creds).
    pub async fn static_creds(&self, mount: &str, role: &str) -> Result<StaticCreds> {
        check_name("the database secrets mount", mount)?;
        check_name("the static database role", role)?;
        let path = format!("{mount}/static-creds/{role}");
        let what = format!("reading static database credentials of role {role} ({path})");
        let (env, _) = self
            .call::<StaticCreds>(Call::get(&path))
            .await
            .map_err(|e| e.context(&what))?;
        let (data, _) = env.into_data(&what)?;
        Ok(data)
    }

    /// Issue new credentials for a database role: `GET {mount}/creds/{role}`.
    ///
    /// Every call creates a new database user with its own lease; the caller owns the
    /// lease (renew it, and revoke it when done).
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown role (root token) and
    /// [`ErrorKind::PermissionDenied`] when the policy does not allow the path (which is
    /// also what an unknown role looks like to a non-root token); [`ErrorKind::Server`]
    /// when the database behind Vault fails; the transport kinds.
    pub async fn database_creds(&self, mount: &str, role: &str) -> Result<Leased<Credentials>> {
        check_name("the database secrets mount", mount)?;
        check_name("the database role", role)?;
        let path = format!("{mount}/creds/{role}");
        let what = format!("leasing database credentials for role {role} ({path})");
        let mut tries = 0;
        let (data, lease) = loop {
            let (env, received, from_cache) = self
                .call_cached::<CredsData>(Call::get(&path))
                .await
                .map_err(|e| e.context(&what))?;
            let (data, parts) = env.into_data(&what)?;
            if parts.id.is_empty() {
                return Err(Error::new(
                    ErrorKind::Decode,
                    format!("{what}: the answer carries no lease_id"),
                ));
            }
            let mut lease = parts.into_lease(received, &what)?;
            if !from_cache {
                break (data, lease);
            }
            match self.cached_lease_end(&mut lease, &what).await {
                Ok(()) => break (data, lease),
                // A Proxy evicts a lease revoked through it a moment after the revoke's
                // answer: a revoked lease right after a revoke is asked for again.
                Err(e) if tries < CACHE_EVICTION_TRIES => {
                    tries += 1;
                    tracing::debug!("{e}; asking again in {CACHE_EVICTION_WAIT:?}");
                    tokio::time::sleep(CACHE_EVICTION_WAIT).await;
                }
                Err(e) => return Err(e),
            }
        };
        tracing::info!(
            role,
            lease_id = %lease.id,
            ttl_s = lease.duration.as_secs(),
            renewable = lease.renewable,
            "issued database credentials"
        );
        Ok(Leased::new(
            Credentials::new(data.username, data.password),
            lease,
        ))
    }
}
