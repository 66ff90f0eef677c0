//! The database secrets engine: `{mount}/creds/{role}`.

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

impl Client {
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
        let (env, received) = self
            .call::<CredsData>(Call::get(&path))
            .await
            .map_err(|e| e.context(&what))?;
        let (data, parts) = env.into_data(&what)?;
        if parts.id.is_empty() {
            return Err(Error::new(
                ErrorKind::Decode,
                format!("{what}: the answer carries no lease_id"),
            ));
        }
        let lease = parts.into_lease(received, &what)?;
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
