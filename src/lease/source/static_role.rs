//! A static role of the database secrets engine ([`StaticRole`]): one user whose password
//! Vault rotates on a period; the engine reads it again right after each of Vault's
//! rotations, and each new password is a new generation.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::Source;
use crate::BoxFuture;
use crate::backoff::Backoff;
use crate::credentials::{Credentials, Lease, Leased};
use crate::error::Result;
use crate::vault::Client;

/// A static role of the database secrets engine (`GET {mount}/static-creds/{role}`): one
/// database user that keeps its objects, whose password Vault rotates every rotation
/// period. The engine reads the credentials again just after each of Vault's rotations
/// (the answer says when: its `ttl`), never before — Vault returns the old password until
/// then, so there is no loop asking for it. Each new password is a new generation:
/// connections opened with the old one keep running (PostgreSQL does not end sessions
/// when a password changes) and drain; nothing is revoked. A connection refused in the
/// moment between Vault's rotation and the read is retried with the new password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticRole {
    pub(super) mount: String,
    pub(super) role: String,
}

impl StaticRole {
    /// The static role `role` on the mount `database`.
    pub fn new(role: impl Into<String>) -> Self {
        Self {
            mount: "database".into(),
            role: role.into(),
        }
    }

    /// The secrets engine's mount. Default `database`.
    #[must_use]
    pub fn mount(mut self, mount: impl Into<String>) -> Self {
        self.mount = mount.into();
        self
    }

    /// The role's name.
    pub fn get_role(&self) -> &str {
        &self.role
    }

    /// The secrets engine's mount.
    pub fn get_mount(&self) -> &str {
        &self.mount
    }

    /// Check the names.
    pub(super) fn validate(&self) -> Result<()> {
        crate::vault::check_name("the database secrets mount", &self.mount)?;
        crate::vault::check_name("the static database role", &self.role)
    }
}

/// `{mount}/static-creds/{role}`: reading is issuing; the lease id names Vault's last
/// rotation, so a read that returns it again is no change.
pub(super) struct VaultStaticRole {
    client: Client,
    role: StaticRole,
    /// When Vault rotates next, as of the last read.
    next_rotation: Mutex<Option<Instant>>,
    /// Reads in a row that failed or found Vault's rotation due but not made: retried
    /// soon, with backoff; reset by any read with a ttl ahead.
    failed_or_overdue_reads: AtomicU32,
    /// Changes seen in a row and not yet swapped in (a failing swap): reads in a row
    /// that found another password than the serving one. Looked at again soon, with
    /// backoff; reset when a read finds the serving version.
    reads_with_password_not_serving: AtomicU32,
}

/// Read again this long after Vault's rotation time (its clock and ours may differ).
const STATIC_ROTATION_GRACE: Duration = Duration::from_secs(1);
/// Read at least this often, whatever the last answer said (a rotation forced in Vault
/// with `rotate-role` comes unannounced).
const STATIC_MAX_WAIT: Duration = Duration::from_secs(300);

impl VaultStaticRole {
    /// The role's source, read through `client`.
    pub(super) fn new(client: Client, role: StaticRole) -> Self {
        Self {
            client,
            role,
            next_rotation: Mutex::new(None),
            failed_or_overdue_reads: AtomicU32::new(0),
            reads_with_password_not_serving: AtomicU32::new(0),
        }
    }

    /// Read the credentials, noting when Vault rotates next (and whether it is late).
    async fn read(&self) -> Result<crate::vault::StaticCreds> {
        let creds = match self
            .client
            .static_creds(&self.role.mount, &self.role.role)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                self.failed_or_overdue_reads.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let ttl = creds
            .ttl_seconds
            .or((creds.rotation_period_seconds > 0).then_some(creds.rotation_period_seconds))
            .unwrap_or(STATIC_MAX_WAIT.as_secs())
            .min(86_400);
        if ttl == 0 {
            // Due, and not made yet: Vault's queue runs every few seconds.
            self.failed_or_overdue_reads.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed_or_overdue_reads.store(0, Ordering::Relaxed);
        }
        *self.next_rotation.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + Duration::from_secs(ttl));
        Ok(creds)
    }

    /// The lease id of these credentials: names Vault's last rotation.
    fn lease_id(&self, creds: &crate::vault::StaticCreds) -> String {
        format!(
            "static:{}/{}@{}",
            self.role.mount, self.role.role, creds.last_vault_rotation
        )
    }
}

impl Source for VaultStaticRole {
    fn issue(&self) -> BoxFuture<'_, Result<Leased<Credentials>>> {
        Box::pin(async move {
            let creds = self.read().await?;
            let id = self.lease_id(&creds);
            tracing::info!(
                role = %self.role.role,
                rotated = %creds.last_vault_rotation,
                next_in_s = creds.ttl_seconds.unwrap_or(0),
                "read static database credentials"
            );
            Ok(Leased::new(
                Credentials::new(creds.username, creds.password),
                // No expiry of ours: Vault rotates; the engine reads again after it.
                Lease::new(id, Duration::ZERO, false),
            ))
        })
    }

    fn renew<'a>(&'a self, lease: &'a Lease, _: Duration) -> BoxFuture<'a, Result<Lease>> {
        Box::pin(async move { Ok(lease.clone()) })
    }

    fn revoke<'a>(&'a self, _: &'a Lease) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) }) // the user stays; Vault owns its password
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(STATIC_MAX_WAIT)
    }

    fn polls_when_due(&self) -> bool {
        true
    }

    fn poll_delay(&self) -> Option<Duration> {
        let backoff = |n| Backoff::new(STATIC_ROTATION_GRACE, Duration::from_secs(30)).delay(n);
        let failed_or_overdue = self.failed_or_overdue_reads.load(Ordering::Relaxed);
        if failed_or_overdue > 0 {
            return Some(backoff(failed_or_overdue));
        }
        let next = *self.next_rotation.lock().unwrap_or_else(|e| e.into_inner());
        let due = match next {
            Some(at) => (at.saturating_duration_since(Instant::now()) + STATIC_ROTATION_GRACE)
                .min(STATIC_MAX_WAIT),
            None => STATIC_ROTATION_GRACE,
        };
        Some(
            match self.reads_with_password_not_serving.load(Ordering::Relaxed) {
                0 => due,
                n => due.min(backoff(n)),
            },
        )
    }

    fn changed<'a>(&'a self, current: &'a Lease) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let creds = self.read().await?;
            let changed = self.lease_id(&creds) != current.id;
            if changed {
                // Looked again soon, in case the swap fails (then with backoff).
                self.reads_with_password_not_serving
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                self.reads_with_password_not_serving
                    .store(0, Ordering::Relaxed);
            }
            Ok(changed)
        })
    }
}
