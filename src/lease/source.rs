//! What is leased. [`CredentialSource`] names it — a dynamic database role, a static
//! role, a KV v2 secret, or a [`CredentialProvider`] of your own — so that builders,
//! messages and [`Status`](super::Status) say which; the crate-private [`Source`] trait
//! is what the engine calls on it (issue, renew, revoke, and "has something new been
//! written?").

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;

use crate::BoxFuture;
use crate::backoff::Backoff;
use crate::credentials::{Credentials, Lease, Leased};
use crate::error::{Error, ErrorKind, Result};
use crate::vault::Client;

/// The shortest poll interval a KV source accepts.
const MIN_POLL: Duration = Duration::from_millis(100);
/// The longest poll interval a KV source accepts.
const MAX_POLL: Duration = Duration::from_secs(24 * 3600);

/// What a pool (or [`Engine`](super::Engine)) leases.
///
/// ```
/// use std::time::Duration;
/// use vaultpool::lease::{CredentialSource, DatabaseRole, KvCredentials};
///
/// let dynamic: CredentialSource = DatabaseRole::new("immune-readwrite").into();
/// assert_eq!(dynamic.to_string(), "database role immune-readwrite");
/// let from_kv: CredentialSource = KvCredentials::new("redis/main")
///     .poll_interval(Duration::from_secs(10))
///     .into();
/// assert_eq!(from_kv.to_string(), "KV secret secret/redis/main");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CredentialSource {
    /// Dynamic credentials from the database secrets engine: a new user per lease.
    DatabaseRole(DatabaseRole),
    /// Static credentials kept in a KV v2 secret; a new version is a rotation.
    Kv(KvCredentials),
    /// A static role of the database secrets engine: one user whose password Vault
    /// rotates on a period; each new password is a rotation.
    StaticRole(StaticRole),
    /// Credentials from your own code ([`CredentialSource::custom`]).
    Custom(CustomSource),
}

/// Credentials minted by your own code — a cloud IAM token (RDS IAM: 15-minute tokens;
/// Cloud SQL; Entra), a password set with `ALTER ROLE`, an in-memory fake for your own
/// tests — given the same renew / rotate / drain / revoke treatment as Vault's.
///
/// [`issue`](Self::issue) returns credentials with their [`Lease`]: a duration of zero
/// means "no expiry" (replace them when [`changed`](Self::changed) says so); otherwise the
/// engine renews a renewable lease at about ⅔ of its TTL (the first time, anywhere from
/// 1/15 to ⅔: see [`Policy::first_renewal_spread`](super::Policy::first_renewal_spread))
/// and rotates to freshly issued
/// credentials before it ends (a non-renewable one, such as an IAM token, is rotated
/// before its end). A retired generation is revoked once its last connection is back.
/// Issuing and verification failures are retried with backoff; every call is bounded
/// (an issue by the engine's 30 s step limit, a revoke by 10 s). Leases out of range
/// (over 10 years, under 1 s) are refused as errors.
///
/// A provider that gives one user a new password on each issue (as a static role does)
/// ends the old password when it sets the new one: sessions already open go on, and a
/// connection opened in the moment before the swap is refused and retried with the new
/// password (the pools' refused-login path). The sqlx flavour does not take custom
/// sources (it tells generations apart by user name). See
/// `examples/minted_passwords.rs`.
pub trait CredentialProvider: Send + Sync + 'static {
    /// New credentials with their lease. The lease's id names them in logs and status:
    /// give each issue its own id (a counter, a timestamp), never a secret. Its duration
    /// is zero (no expiry) or between 1 s and 10 years; its `issued_at` is set by the
    /// engine.
    fn issue(&self) -> BoxFuture<'_, Result<Leased<Credentials>>>;

    /// Extend a renewable lease by about `increment`; the answer's duration is what the
    /// lease has left. Default: the lease unchanged (it is rotated before its end).
    fn renew<'a>(&'a self, lease: &'a Lease, _increment: Duration) -> BoxFuture<'a, Result<Lease>> {
        Box::pin(async move { Ok(lease.clone()) })
    }

    /// Invalidate credentials no longer in use. Default: nothing (they expire). It may be
    /// called again for the same lease (a retry after a timeout): make it idempotent.
    fn revoke<'a>(&'a self, _lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// How often to ask [`changed`](Self::changed) (jittered ±10%, 100 ms to a day).
    /// Default: never.
    fn poll_interval(&self) -> Option<Duration> {
        None
    }

    /// Whether other credentials than those of `current` should serve now (then they are
    /// issued, verified and swapped in). Default: no.
    fn changed<'a>(&'a self, _current: &'a Lease) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async { Ok(false) })
    }
}

/// A shared provider is a provider (a test can keep an `Arc` to inspect its fake).
impl<P: CredentialProvider + ?Sized> CredentialProvider for Arc<P> {
    fn issue(&self) -> BoxFuture<'_, Result<Leased<Credentials>>> {
        (**self).issue()
    }
    fn renew<'a>(&'a self, lease: &'a Lease, increment: Duration) -> BoxFuture<'a, Result<Lease>> {
        (**self).renew(lease, increment)
    }
    fn revoke<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        (**self).revoke(lease)
    }
    fn poll_interval(&self) -> Option<Duration> {
        (**self).poll_interval()
    }
    fn changed<'a>(&'a self, current: &'a Lease) -> BoxFuture<'a, Result<bool>> {
        (**self).changed(current)
    }
}

/// A [`CredentialProvider`] with its name, as a [`CredentialSource::Custom`].
#[derive(Clone)]
pub struct CustomSource {
    name: String,
    provider: Arc<dyn CredentialProvider>,
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

impl CredentialSource {
    /// A short name for logs and metrics labels: the role, or the KV path.
    pub fn name(&self) -> &str {
        match self {
            Self::DatabaseRole(r) => &r.role,
            Self::Kv(k) => &k.path,
            Self::StaticRole(r) => &r.role,
            Self::Custom(c) => &c.name,
        }
    }

    /// Check names and settings before anything is sent.
    pub(crate) fn validate(&self) -> Result<()> {
        match self {
            Self::DatabaseRole(r) => {
                crate::vault::check_name("the database secrets mount", &r.mount)?;
                crate::vault::check_name("the database role", &r.role)?;
                if let Some(every) = r.lease_check
                    && !(Duration::from_secs(1)..=MAX_POLL).contains(&every)
                {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "checking the lease of database role {}: every {every:?}; use \
                             between a second and a day",
                            r.role
                        ),
                    ));
                }
                Ok(())
            }
            Self::Kv(k) => {
                if k.poll > MAX_POLL {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "watching KV secret {}/{}: the poll interval {:?} is longer than a \
                             day; a new version would go unnoticed that long",
                            k.mount, k.path, k.poll
                        ),
                    ));
                }
                if k.poll < MIN_POLL {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "watching KV secret {}/{}: the poll interval {:?} is shorter than \
                             {MIN_POLL:?}; it would keep Vault busy (default 30 s)",
                            k.mount, k.path, k.poll
                        ),
                    ));
                }
                Ok(())
            }
            Self::StaticRole(r) => {
                crate::vault::check_name("the database secrets mount", &r.mount)?;
                crate::vault::check_name("the static database role", &r.role)
            }
            Self::Custom(c) => {
                if c.name.trim().is_empty() {
                    return Err(Error::new(
                        ErrorKind::Config,
                        "a custom credential source needs a name (for messages and status)",
                    ));
                }
                match c.provider.poll_interval() {
                    Some(every) if !(MIN_POLL..=MAX_POLL).contains(&every) => Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "{}: the poll interval {every:?} is out of range; use between \
                             {MIN_POLL:?} and a day",
                            c.name
                        ),
                    )),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Your own credentials, under `name` (what messages and status call them, e.g.
    /// "RDS IAM token for app@orders-db").
    pub fn custom(name: impl Into<String>, provider: impl CredentialProvider) -> Self {
        Self::Custom(CustomSource {
            name: name.into(),
            provider: Arc::new(provider),
        })
    }

    pub(crate) fn into_source(self, client: Option<Client>) -> Result<Arc<dyn Source>> {
        self.validate()?;
        if let Self::Custom(c) = self {
            // Read once and checked once: a provider answering differently the second
            // time (a zero among them) could otherwise make the engine poll in a loop.
            let poll = c.provider.poll_interval();
            if let Some(every) = poll
                && !(MIN_POLL..=MAX_POLL).contains(&every)
            {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "{}: the poll interval {every:?} is out of range; use between \
                         {MIN_POLL:?} and a day",
                        c.name
                    ),
                ));
            }
            return Ok(Arc::new(Provided {
                provider: c.provider,
                name: c.name,
                poll,
            }));
        }
        let Some(client) = client else {
            return Err(Error::new(
                ErrorKind::Config,
                format!("{self}: a Vault client is needed (Engine::builder(client, …))"),
            ));
        };
        Ok(match self {
            Self::DatabaseRole(r) => Arc::new(VaultDatabase {
                client,
                role: r,
                lookup_denied_until: std::sync::Mutex::new(None),
            }),
            Self::Kv(k) => Arc::new(KvStatic { client, kv: k }),
            Self::StaticRole(r) => Arc::new(VaultStaticRole {
                client,
                role: r,
                next_rotation: std::sync::Mutex::new(None),
                late: std::sync::atomic::AtomicU32::new(0),
                unswapped: std::sync::atomic::AtomicU32::new(0),
            }),
            Self::Custom(_) => unreachable!("handled above"),
        })
    }
}

impl fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DatabaseRole(r) if r.mount == "database" => {
                write!(f, "database role {}", r.role)
            }
            Self::DatabaseRole(r) => write!(f, "database role {} (mount {})", r.role, r.mount),
            Self::Kv(k) => write!(f, "KV secret {}/{}", k.mount, k.path),
            Self::StaticRole(r) if r.mount == "database" => {
                write!(f, "static database role {}", r.role)
            }
            Self::StaticRole(r) => {
                write!(f, "static database role {} (mount {})", r.role, r.mount)
            }
            Self::Custom(c) => f.write_str(&c.name),
        }
    }
}

impl From<DatabaseRole> for CredentialSource {
    fn from(role: DatabaseRole) -> Self {
        Self::DatabaseRole(role)
    }
}

impl From<KvCredentials> for CredentialSource {
    fn from(kv: KvCredentials) -> Self {
        Self::Kv(kv)
    }
}

impl From<StaticRole> for CredentialSource {
    fn from(role: StaticRole) -> Self {
        Self::StaticRole(role)
    }
}

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
    mount: String,
    role: String,
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
}

/// A role of the database secrets engine: `GET {mount}/creds/{role}` issues a new user
/// with its own lease, renewed and finally revoked by the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseRole {
    mount: String,
    role: String,
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
}

/// Static credentials in a KV v2 secret (e.g. the seed's `secret/redis/main`): reading
/// the newest version is "issuing"; a new version is a rotation, noticed by polling the
/// secret's metadata. Nothing is renewed or revoked: the credentials live as long as the
/// secret says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvCredentials {
    mount: String,
    path: String,
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
}

/// What the engine calls on a source. Issue, renew and revoke are all a lease needs; the
/// rest has defaults for sources without a Vault token or without polling.
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
    /// Whether refreshing the auth token is failing (whoever tried last).
    fn token_failing(&self) -> bool {
        false
    }
    /// How often to ask [`changed`](Source::changed): a KV source's poll, or a database
    /// role's lease check.
    fn poll_interval(&self) -> Option<Duration> {
        None
    }
    /// Whether the source holds other credentials than those of `current`.
    fn changed<'a>(&'a self, _current: &'a Lease) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async { Ok(false) })
    }
    /// How long until the next [`changed`](Source::changed) (jittered by the engine); by
    /// default the poll interval. A source that knows when its credentials change
    /// (a static role: Vault's `ttl`) says so here.
    fn poll_delay(&self) -> Option<Duration> {
        self.poll_interval()
    }
    /// Whether [`poll_delay`](Source::poll_delay) is a time before which nothing can
    /// have changed (jitter only after it).
    fn polls_when_due(&self) -> bool {
        false
    }
    /// Checked once at build, after the first issue (whose lease is revoked if this
    /// fails): what [`changed`](Source::changed) needs later, so a permission missing for
    /// polling fails the build, not every poll.
    fn preflight(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// `{mount}/creds/{role}` of the database secrets engine.
struct VaultDatabase {
    client: Client,
    role: DatabaseRole,
    /// `sys/leases/lookup` was refused: the lease check is off until then (an hour
    /// later, in case the refusal came from a token that was about to be replaced).
    lookup_denied_until: std::sync::Mutex<Option<Instant>>,
}

/// How long a refused lease lookup turns the check off.
const LOOKUP_DENIED_PAUSE: Duration = Duration::from_secs(3600);

impl Source for VaultDatabase {
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

    fn token_failing(&self) -> bool {
        self.client.token_refresh_failing()
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

/// A KV v2 secret: "issuing" reads the newest version (never the cache); polling reads
/// only the metadata.
struct KvStatic {
    client: Client,
    kv: KvCredentials,
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

/// `{mount}/static-creds/{role}`: reading is issuing; the lease id names Vault's last
/// rotation, so a read that returns it again is no change.
struct VaultStaticRole {
    client: Client,
    role: StaticRole,
    /// When Vault rotates next, as of the last read.
    next_rotation: std::sync::Mutex<Option<Instant>>,
    /// Reads in a row that failed or found Vault's rotation due but not made: retried
    /// soon, with backoff; reset by any read with a ttl ahead.
    late: std::sync::atomic::AtomicU32,
    /// Changes seen in a row and not yet swapped in (a failing swap): looked at again
    /// soon, with backoff; reset when a read finds the serving version.
    unswapped: std::sync::atomic::AtomicU32,
}

/// Read again this long after Vault's rotation time (its clock and ours may differ).
const STATIC_ROTATION_GRACE: Duration = Duration::from_secs(1);
/// Read at least this often, whatever the last answer said (a rotation forced in Vault
/// with `rotate-role` comes unannounced).
const STATIC_MAX_WAIT: Duration = Duration::from_secs(300);

impl VaultStaticRole {
    async fn read(&self) -> Result<crate::vault::StaticCreds> {
        let creds = match self
            .client
            .static_creds(&self.role.mount, &self.role.role)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                self.late.fetch_add(1, Ordering::Relaxed);
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
            self.late.fetch_add(1, Ordering::Relaxed);
        } else {
            self.late.store(0, Ordering::Relaxed);
        }
        *self.next_rotation.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + Duration::from_secs(ttl));
        Ok(creds)
    }

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
        let late = self.late.load(Ordering::Relaxed);
        if late > 0 {
            return Some(backoff(late));
        }
        let next = *self.next_rotation.lock().unwrap_or_else(|e| e.into_inner());
        let due = match next {
            Some(at) => (at.saturating_duration_since(Instant::now()) + STATIC_ROTATION_GRACE)
                .min(STATIC_MAX_WAIT),
            None => STATIC_ROTATION_GRACE,
        };
        Some(match self.unswapped.load(Ordering::Relaxed) {
            0 => due,
            n => due.min(backoff(n)),
        })
    }

    fn changed<'a>(&'a self, current: &'a Lease) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let creds = self.read().await?;
            let changed = self.lease_id(&creds) != current.id;
            if changed {
                // Looked again soon, in case the swap fails (then with backoff).
                self.unswapped.fetch_add(1, Ordering::Relaxed);
            } else {
                self.unswapped.store(0, Ordering::Relaxed);
            }
            Ok(changed)
        })
    }
}

/// A [`CredentialProvider`] as the engine sees it: its leases checked and stamped with
/// the engine's clock, its poll interval read once (validated at build).
struct Provided {
    provider: Arc<dyn CredentialProvider>,
    name: String,
    poll: Option<Duration>,
}

/// The longest lease a custom source may give (Vault's own ceiling is 32 years; ten
/// keeps every deadline computable).
const MAX_CUSTOM_LEASE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl Provided {
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

impl Provided {
    fn timed_out(&self, what: &str, after: Duration) -> Error {
        Error::new(
            ErrorKind::Transport,
            format!("{what} of {}: no answer within {after:?}", self.name),
        )
    }
}

impl Source for Provided {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_zero_polls_refused() {
        let bad: CredentialSource = DatabaseRole::new("a/b").into();
        assert_eq!(bad.validate().unwrap_err().kind(), ErrorKind::Config);
        let zero: CredentialSource = KvCredentials::new("redis/main")
            .poll_interval(Duration::ZERO)
            .into();
        let e = zero.validate().unwrap_err();
        assert!(e.to_string().contains("shorter"), "{e}");
        assert!(e.to_string().contains("secret/redis/main"), "{e}");
        let other: CredentialSource = DatabaseRole::new("app").mount("pg").into();
        assert_eq!(other.to_string(), "database role app (mount pg)");
        assert_eq!(other.name(), "app");
    }

    #[test]
    fn kv_lease_ids_name_their_version() {
        let lease = Lease::new("kv:secret/redis/main@v12", Duration::ZERO, false);
        assert_eq!(kv_version(&lease), Some(12));
        assert_eq!(kv_version(&Lease::new("x", Duration::ZERO, false)), None);
    }
}
