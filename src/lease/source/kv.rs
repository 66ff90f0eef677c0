//! Static credentials in a KV v2 secret ([`KvCredentials`]): "issuing" reads the newest
//! version; a new version, noticed by polling the secret's metadata, is a rotation.

use std::time::Duration;

use secrecy::ExposeSecret;

use super::{MAX_POLL, MIN_POLL, Source};
use crate::BoxFuture;
use crate::credentials::{Credentials, Lease, Leased};
use crate::error::{Error, ErrorKind, Result};
use crate::vault::Client;

/// Static credentials in a KV v2 secret (e.g. the seed's `secret/redis/main`): reading
/// the newest version is "issuing"; a new version is a rotation, noticed by polling the
/// secret's metadata. Nothing is renewed or revoked: the credentials live as long as the
/// secret says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvCredentials {
    pub(super) mount: String,
    pub(super) path: String,
    poll: Duration,
    username_key: String,
    password_key: String,
    default_username: Option<String>,
}

impl KvCredentials {
    /// The secret at `path` on the mount `secret`.
    pub fn new(path: impl Into<String>) -> Self {
        Self {
            mount: "secret".into(),
            path: path.into(),
            poll: Duration::from_secs(30),
            username_key: "username".into(),
            password_key: "password".into(),
            default_username: None,
        }
    }

    /// The KV v2 mount. Default `secret`.
    #[must_use]
    pub fn mount(mut self, mount: impl Into<String>) -> Self {
        self.mount = mount.into();
        self
    }

    /// How often the secret's metadata is read to notice a new version; each wait is
    /// jittered by ±10% so that many services do not poll in step. Default 30 s; less
    /// than 100 ms or more than a day is refused at build.
    #[must_use]
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll = every;
        self
    }

    /// The keys holding the username and the password. Default `username` and
    /// `password`; a secret without the username key is refused unless
    /// [`default_username`](Self::default_username) is set.
    #[must_use]
    pub fn keys(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.username_key = username.into();
        self.password_key = password.into();
        self
    }

    /// The user to log in as when the secret has no username key, e.g. Redis' `default`
    /// user (what `VaultRedisPool::builder_kv` sets). Default: none — such a secret is
    /// refused, naming the key.
    #[must_use]
    pub fn default_username(mut self, user: impl Into<String>) -> Self {
        self.default_username = Some(user.into());
        self
    }

    /// The KV v2 mount.
    pub fn get_mount(&self) -> &str {
        &self.mount
    }

    /// The secret's path below the mount.
    pub fn get_path(&self) -> &str {
        &self.path
    }

    /// The poll interval.
    pub fn get_poll_interval(&self) -> Duration {
        self.poll
    }

    /// Check the poll interval.
    pub(super) fn validate(&self) -> Result<()> {
        if self.poll > MAX_POLL {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "watching KV secret {}/{}: the poll interval {:?} is longer than a day; a \
                     new version would go unnoticed that long",
                    self.mount, self.path, self.poll
                ),
            ));
        }
        if self.poll < MIN_POLL {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "watching KV secret {}/{}: the poll interval {:?} is shorter than \
                     {MIN_POLL:?}; it would keep Vault busy (default 30 s)",
                    self.mount, self.path, self.poll
                ),
            ));
        }
        Ok(())
    }
}

/// A KV v2 secret: "issuing" reads the newest version (never the cache); polling reads
/// only the metadata.
pub(super) struct KvStatic {
    client: Client,
    kv: KvCredentials,
}

impl KvStatic {
    /// The secret's source, read through `client`.
    pub(super) fn new(client: Client, kv: KvCredentials) -> Self {
        Self { client, kv }
    }
}

/// The KV version a lease id of [`KvStatic`] names (`kv:{mount}/{path}@v{N}`).
fn kv_version(lease: &Lease) -> Option<u64> {
    lease
        .id
        .rsplit_once("@v")
        .and_then(|(_, v)| v.parse::<u64>().ok())
}

impl Source for KvStatic {
    fn issue(&self) -> BoxFuture<'_, Result<Leased<Credentials>>> {
        Box::pin(async move {
            let KvCredentials { mount, path, .. } = &self.kv;
            self.client.invalidate_kv(mount, path);
            let secret = self.client.read_kv(mount, path).await?;
            let username = match (secret.get(&self.kv.username_key), &self.kv.default_username) {
                (Some(u), _) => u.expose_secret().trim().to_owned(),
                (None, Some(default)) => default.clone(),
                // Missing and required: `require` says which key of which secret.
                (None, None) => secret
                    .require(&self.kv.username_key)?
                    .expose_secret()
                    .to_owned(),
            };
            let password = secret.require(&self.kv.password_key)?.clone();
            let id = format!("kv:{mount}/{path}@v{}", secret.version());
            Ok(Leased::new(
                Credentials::new(username, password).with_kv(secret),
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
        Some(self.kv.poll)
    }

    /// Polling reads `{mount}/metadata/{path}`, which a policy grants separately from
    /// `{mount}/data/{path}`: without it every poll would fail for ever.
    fn preflight(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let KvCredentials { mount, path, .. } = &self.kv;
            match self.client.read_kv_metadata(mount, path).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == ErrorKind::PermissionDenied => Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "reading the metadata of KV secret {mount}/{path}, which is polled for \
                         new versions: permission denied; grant `read` on \
                         \"{mount}/metadata/{path}\" in the token's policy, next to \
                         \"{mount}/data/{path}\""
                    ),
                )
                .with_source(e)),
                Err(e) => Err(e.context(format!(
                    "reading the metadata of KV secret {mount}/{path} (polled for new versions)"
                ))),
            }
        })
    }

    /// Compares with the version the serving lease names: a version that failed
    /// verification is tried again at every poll until KV holds a good one.
    fn changed<'a>(&'a self, current: &'a Lease) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let meta = self
                .client
                .read_kv_metadata(&self.kv.mount, &self.kv.path)
                .await?;
            Ok(kv_version(current) != Some(meta.current_version))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_lease_ids_name_their_version() {
        let lease = Lease::new("kv:secret/redis/main@v12", Duration::ZERO, false);
        assert_eq!(kv_version(&lease), Some(12));
        assert_eq!(kv_version(&Lease::new("x", Duration::ZERO, false)), None);
    }
}
