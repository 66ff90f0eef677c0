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
    /// How often to ask [`changed`](Source::changed), for sources without leases.
    fn poll_interval(&self) -> Option<Duration> {
        None
    }
    /// Whether the source holds other credentials than those of `current`.
    fn changed<'a>(&'a self, _current: &'a Lease) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async { Ok(false) })
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

/// Static credentials kept in KV v2 (e.g. `secret/redis/main`): "issuing" reads the
/// newest version; a new KV version is a rotation. Nothing to renew or revoke.
pub(crate) struct KvStatic {
    client: Client,
    mount: String,
    path: String,
    username_key: String,
    password_key: String,
    poll: Duration,
}

impl KvStatic {
    pub(crate) fn new(client: Client, mount: String, path: String, poll: Duration) -> Self {
        Self {
            client,
            mount,
            path,
            username_key: "username".into(),
            password_key: "password".into(),
            poll,
        }
    }
}

impl Source for KvStatic {
    fn issue(&self) -> BoxFuture<'_, Result<Leased<Credentials>>> {
        Box::pin(async move {
            // Always the newest version, never the cache.
            self.client.invalidate_kv(&self.mount, &self.path);
            let kv = self.client.read_kv(&self.mount, &self.path).await?;
            let username = kv
                .get(&self.username_key)
                .map(|u| secrecy::ExposeSecret::expose_secret(u).to_owned())
                .unwrap_or_else(|| "default".into());
            let password = kv.require(&self.password_key)?.clone();
            let id = format!("kv:{}/{}@v{}", self.mount, self.path, kv.version());
            Ok(Leased::new(
                Credentials::new(username, password),
                Lease::new(id, Duration::ZERO, false),
            ))
        })
    }

    fn renew<'a>(&'a self, lease: &'a Lease, _: Duration) -> BoxFuture<'a, Result<Lease>> {
        Box::pin(async move { Ok(lease.clone()) })
    }

    fn revoke<'a>(&'a self, _: &'a Lease) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(self.poll)
    }

    /// Compares with the version in the serving lease's id (`kv:…@vN`): a version that
    /// failed verification is tried again at every poll until KV holds a good one.
    fn changed<'a>(&'a self, current: &'a Lease) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let meta = self
                .client
                .read_kv_metadata(&self.mount, &self.path)
                .await?;
            let serving = current
                .id
                .rsplit_once("@v")
                .and_then(|(_, v)| v.parse::<u64>().ok());
            Ok(serving != Some(meta.current_version))
        })
    }
}
