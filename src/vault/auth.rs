//! Authentication: how the client gets its Vault token, the token as a lease, and the
//! public calls about it ([`Client::login`], [`Client::token_info`]).
//!
//! | method | credential | refreshed by |
//! |---|---|---|
//! | [`Token`](AuthMethod::Token) | a static token | renewal while renewable |
//! | [`AppRole`](AuthMethod::AppRole), [`Kubernetes`](AuthMethod::Kubernetes), [`Jwt`](AuthMethod::Jwt), [`Cert`](AuthMethod::Cert), [`Custom`](AuthMethod::Custom) | a login (`auth/<mount>/login`) | renewal, then a new login when the renewal is capped by the token's max TTL |
//! | [`TokenFile`](AuthMethod::TokenFile) | a token file (Vault Agent's file sink) | the file, read again when it changes; never renewed or revoked by us |
//! | [`ProxyAutoAuth`](AuthMethod::ProxyAutoAuth) | none: Vault Proxy adds its own (`use_auto_auth_token`) | the Proxy |
//!
//! Login credentials that live in files (the Kubernetes service-account token, a JWT, an
//! AppRole secret_id file) are read again at every login, never cached: projected tokens
//! rotate. One refresh runs at a time: concurrent callers wait for it and share its
//! result.
//!
//! Old tokens are not revoked on re-login: revoking a token revokes every lease issued
//! under it (database credentials included). They expire by their own TTL; the lease
//! engine rotates leases issued under a token before that token's end, once it is known
//! (a capped renewal, a replaced token file, a new token behind the Proxy).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use super::envelope::{AuthInfo, ttl};
use super::{Call, Client};
use crate::BoxFuture;
use crate::backoff::Backoff;
use crate::error::{Error, ErrorKind, Result};

/// Where the Kubernetes service-account token is mounted by default.
pub const KUBERNETES_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// How the client authenticates to Vault.
#[derive(Clone)]
#[non_exhaustive]
pub enum AuthMethod {
    /// A token, used as is (e.g. `VAULT_TOKEN`). Renewed while renewable.
    Token(SecretString),
    /// AppRole login (`auth/{mount}/login`) with a role_id and a secret_id.
    AppRole {
        /// Where the AppRole auth method is mounted. Default `approle`.
        mount: String,
        /// The role_id.
        role_id: SecretString,
        /// The secret_id, given or read from a file at each login.
        secret_id: SecretIdSource,
    },
    /// Kubernetes login (`auth/{mount}/login` with `role` and the pod's service-account
    /// token, read from `token_path` at every login: projected tokens rotate).
    Kubernetes {
        /// Where the Kubernetes auth method is mounted. Default `kubernetes`.
        mount: String,
        /// The Vault role bound to this service account.
        role: String,
        /// The service-account token file. Default [`KUBERNETES_TOKEN_PATH`].
        token_path: PathBuf,
    },
    /// JWT/OIDC login (`auth/{mount}/login` with `role` and a JWT read afresh at every
    /// login).
    Jwt {
        /// Where the JWT auth method is mounted. Default `jwt`.
        mount: String,
        /// The Vault role (`role_type=jwt`).
        role: String,
        /// Where the JWT comes from.
        jwt: JwtSource,
    },
    /// TLS-certificate login (`auth/{mount}/login`): the credential is the client
    /// certificate the client presents on every connection to Vault
    /// ([`ClientBuilder::client_cert`](super::ClientBuilder::client_cert),
    /// `VAULT_CLIENT_CERT`/`VAULT_CLIENT_KEY`).
    Cert {
        /// Where the cert auth method is mounted. Default `cert`.
        mount: String,
        /// The certificate role to log in against; `None` lets Vault pick the one that
        /// matches.
        name: Option<String>,
    },
    /// A token file that another process owns and replaces — Vault Agent's file sink.
    /// Read again to see whether it changed (every second at most, more often as the
    /// token nears its end); the token is never renewed or revoked by vaultpool (the
    /// Agent does that). Leases issued under a token that the Agent replaced rotate
    /// before that token's end.
    TokenFile {
        /// The sink file.
        path: PathBuf,
        /// How long the first read waits for the file to appear (the Agent may not have
        /// written it yet; at most an hour); later reads do not wait. Default 30 s.
        wait: Duration,
    },
    /// No token at all: requests go to a Vault Proxy with `use_auto_auth_token = true`,
    /// which adds its own. The token behind it is looked up (through the Proxy) to learn
    /// when it changes; leases issued under a replaced token rotate before its end. The
    /// Proxy's token must be allowed `auth/token/lookup-self` (Vault's default policy is).
    ProxyAutoAuth,
    /// A login of your own (AWS IAM, GCP, Azure, …): see [`Login`].
    Custom(Arc<dyn Login>),
}

/// Where an AppRole secret_id comes from.
#[derive(Clone)]
#[non_exhaustive]
pub enum SecretIdSource {
    /// The secret_id itself.
    Value(SecretString),
    /// A file holding it, read at each login (so an agent can replace it).
    File(PathBuf),
}

/// Where a JWT comes from; read at every login.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum JwtSource {
    /// A file holding the JWT (e.g. a projected token, or one a CI system writes).
    File(PathBuf),
    /// An environment variable of this process holding the JWT (e.g. a CI job's OIDC
    /// token), read at every login — also when the client was configured with
    /// [`ClientBuilder::from_lookup`](super::ClientBuilder::from_lookup) (`VAULT_JWT`).
    Env(String),
}

/// A login request: the path (`auth/aws/login`) and the JSON body Vault's auth method
/// expects. The body is sent as is and never logged. Made with [`LoginRequest::new`]
/// (more may be added, e.g. headers).
#[derive(Clone)]
#[non_exhaustive]
pub struct LoginRequest {
    /// The login path, without `/v1/`: e.g. `auth/aws/login`.
    pub path: String,
    /// The body, e.g. `{"role": "app", "iam_request_body": "…", …}`.
    pub body: serde_json::Value,
}

impl LoginRequest {
    /// A `PUT` of `body` to `path` (e.g. `auth/aws/login`).
    pub fn new(path: impl Into<String>, body: serde_json::Value) -> Self {
        Self {
            path: path.into(),
            body,
        }
    }
}

impl fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginRequest")
            .field("path", &self.path)
            .field("body", &"[REDACTED]")
            .finish()
    }
}

/// An auth method vaultpool does not ship, as an extension point: build the login
/// request (fresh credentials each time — a signed AWS request, a GCP or Azure identity
/// token), and the client does the rest — sends it, renews the token it gets, logs in
/// again when the renewal is capped or Vault says the token is gone, and the lease
/// engine rotates leases before that token's end.
///
/// ```
/// use vaultpool::BoxFuture;
/// use vaultpool::vault::{AuthMethod, Client, Login, LoginRequest};
///
/// /// GCP-style login: a role and an identity token fetched at each login.
/// struct Gcp { role: String }
///
/// impl Login for Gcp {
///     fn name(&self) -> &str { "gcp" }
///     fn request(&self) -> BoxFuture<'_, vaultpool::Result<LoginRequest>> {
///         Box::pin(async move {
///             let jwt = String::from("…"); // e.g. from the metadata server
///             Ok(LoginRequest::new(
///                 "auth/gcp/login",
///                 serde_json::json!({ "role": self.role, "jwt": jwt }),
///             ))
///         })
///     }
/// }
///
/// let client = Client::builder()
///     .address("https://vault.internal:8200")
///     .auth(AuthMethod::custom(Gcp { role: "app".into() }))
///     .build()?;
/// # let _ = client; Ok::<(), vaultpool::Error>(())
/// ```
pub trait Login: Send + Sync + 'static {
    /// A short name for logs and errors ("aws", "gcp").
    fn name(&self) -> &str;

    /// The request for one login, built afresh each time.
    ///
    /// # Errors
    /// Whatever prevents building it (a credential that cannot be read): it fails the
    /// login with that error.
    fn request(&self) -> BoxFuture<'_, Result<LoginRequest>>;
}

impl AuthMethod {
    /// A static token.
    pub fn token(token: impl Into<String>) -> Self {
        Self::Token(SecretString::from(token.into()))
    }

    /// AppRole at the default mount `approle`.
    pub fn app_role(role_id: impl Into<String>, secret_id: impl Into<String>) -> Self {
        Self::AppRole {
            mount: "approle".into(),
            role_id: SecretString::from(role_id.into()),
            secret_id: SecretIdSource::Value(SecretString::from(secret_id.into())),
        }
    }

    /// AppRole at the default mount, with the secret_id read from `path` at each login.
    pub fn app_role_file(role_id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self::AppRole {
            mount: "approle".into(),
            role_id: SecretString::from(role_id.into()),
            secret_id: SecretIdSource::File(path.into()),
        }
    }

    /// Kubernetes login as `role` at the mount `kubernetes`, with the service-account
    /// token from [`KUBERNETES_TOKEN_PATH`] (change it with
    /// [`with_token_path`](Self::with_token_path)).
    pub fn kubernetes(role: impl Into<String>) -> Self {
        Self::Kubernetes {
            mount: "kubernetes".into(),
            role: role.into(),
            token_path: KUBERNETES_TOKEN_PATH.into(),
        }
    }

    /// JWT login as `role` at the mount `jwt`, the JWT read from `path` at every login.
    pub fn jwt_file(role: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self::Jwt {
            mount: "jwt".into(),
            role: role.into(),
            jwt: JwtSource::File(path.into()),
        }
    }

    /// JWT login as `role` at the mount `jwt`, the JWT read from the environment
    /// variable `var` at every login.
    pub fn jwt_env(role: impl Into<String>, var: impl Into<String>) -> Self {
        Self::Jwt {
            mount: "jwt".into(),
            role: role.into(),
            jwt: JwtSource::Env(var.into()),
        }
    }

    /// TLS-certificate login at the mount `cert`, against the certificate role `name`
    /// (or whichever matches, for `None`). The client certificate is set on the builder.
    pub fn cert(name: Option<String>) -> Self {
        Self::Cert {
            mount: "cert".into(),
            name,
        }
    }

    /// The token in Vault Agent's file sink at `path` (waits up to 30 s for it at the
    /// first read).
    pub fn token_file(path: impl Into<PathBuf>) -> Self {
        Self::TokenFile {
            path: path.into(),
            wait: Duration::from_secs(30),
        }
    }

    /// A login of your own.
    pub fn custom(login: impl Login) -> Self {
        Self::Custom(Arc::new(login))
    }

    /// The same method at another mount (the methods that log in; a token, a token file
    /// and the Proxy have none).
    #[must_use]
    pub fn with_mount(mut self, new_mount: impl Into<String>) -> Self {
        match &mut self {
            Self::AppRole { mount, .. }
            | Self::Kubernetes { mount, .. }
            | Self::Jwt { mount, .. }
            | Self::Cert { mount, .. } => *mount = new_mount.into(),
            _ => {}
        }
        self
    }

    /// The same Kubernetes method with the service-account token read from `path`.
    #[must_use]
    pub fn with_token_path(mut self, path: impl Into<PathBuf>) -> Self {
        if let Self::Kubernetes { token_path, .. } = &mut self {
            *token_path = path.into();
        }
        self
    }

    /// The name for logs and errors.
    pub(crate) fn name(&self) -> String {
        match self {
            Self::Token(_) => "token".into(),
            Self::AppRole { .. } => "approle".into(),
            Self::Kubernetes { .. } => "kubernetes".into(),
            Self::Jwt { .. } => "jwt".into(),
            Self::Cert { .. } => "cert".into(),
            Self::TokenFile { .. } => "token file".into(),
            Self::ProxyAutoAuth => "proxy auto-auth".into(),
            Self::Custom(l) => l.name().to_owned(),
        }
    }

    /// Whether the client gets its token by logging in (and can log in again).
    fn logs_in(&self) -> bool {
        matches!(
            self,
            Self::AppRole { .. }
                | Self::Kubernetes { .. }
                | Self::Jwt { .. }
                | Self::Cert { .. }
                | Self::Custom(_)
        )
    }
}

impl fmt::Debug for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Token(_) => f.write_str("Token([REDACTED])"),
            Self::AppRole {
                mount, secret_id, ..
            } => f
                .debug_struct("AppRole")
                .field("mount", mount)
                .field("role_id", &"[REDACTED]")
                .field("secret_id", secret_id)
                .finish(),
            Self::Kubernetes {
                mount,
                role,
                token_path,
            } => f
                .debug_struct("Kubernetes")
                .field("mount", mount)
                .field("role", role)
                .field("token_path", token_path)
                .finish(),
            Self::Jwt { mount, role, jwt } => f
                .debug_struct("Jwt")
                .field("mount", mount)
                .field("role", role)
                .field("jwt", jwt)
                .finish(),
            Self::Cert { mount, name } => f
                .debug_struct("Cert")
                .field("mount", mount)
                .field("name", name)
                .finish(),
            Self::TokenFile { path, wait } => f
                .debug_struct("TokenFile")
                .field("path", path)
                .field("wait", wait)
                .finish(),
            Self::ProxyAutoAuth => f.write_str("ProxyAutoAuth"),
            Self::Custom(l) => f.debug_tuple("Custom").field(&l.name()).finish(),
        }
    }
}

impl fmt::Debug for SecretIdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(_) => f.write_str("[REDACTED]"),
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

/// What the client knows about its own token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenInfo {
    /// The token's accessor (safe to log: it cannot be used to authenticate).
    pub accessor: String,
    /// Its TTL when obtained or last renewed; zero for a token that never expires.
    pub ttl: Duration,
    /// Whether it can be renewed.
    pub renewable: bool,
    /// Its policies.
    pub policies: Vec<String>,
    /// When it was obtained or last renewed (monotonic).
    pub obtained_at: Instant,
    /// How many logins this client has made (AppRole); 0 for a static token.
    pub logins: u64,
    /// How many times it was renewed since it was obtained.
    pub renewals: u64,
}

impl TokenInfo {
    /// When the token ends, or `None` if it never does.
    pub fn expires_at(&self) -> Option<Instant> {
        (!self.ttl.is_zero()).then(|| self.obtained_at + self.ttl)
    }

    fn renew_at(&self) -> Option<Instant> {
        (!self.ttl.is_zero()).then(|| self.obtained_at + self.ttl * 2 / 3)
    }
}

struct TokenState {
    /// The token; `None` behind a Vault Proxy (it adds its own).
    token: Option<SecretString>,
    info: TokenInfo,
    /// The TTL asked for on renewal: the token's TTL when first obtained.
    increment: Duration,
    /// Renewal, login or a new look (token file, Proxy) is due at this point.
    refresh_at: Option<Instant>,
}

impl TokenState {
    fn same_token(&self, other: &SecretString) -> bool {
        self.token
            .as_ref()
            .is_some_and(|t| t.expose_secret() == other.expose_secret())
    }

    /// The token to send; renewals are only for methods that hold one.
    fn held(&self) -> Result<&SecretString> {
        self.token.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::CredentialsUnavailable,
                "renewing the client's Vault token: the client holds none (Vault Proxy)",
            )
        })
    }
}

pub(crate) struct TokenManager {
    method: AuthMethod,
    current: ArcSwapOption<TokenState>,
    refresh: tokio::sync::Mutex<()>,
    /// Known hard ends of tokens by accessor: leases die with the token that issued them.
    ends: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    /// Refreshes failed in a row, and when the next one is due: a token that cannot be
    /// refreshed (Vault down past its end) is retried with backoff, not at every wake-up.
    failed: std::sync::Mutex<(u32, Option<Instant>)>,
    /// The last refresh's failure, handed to callers inside the backoff that follows it
    /// (instead of each trying again).
    last_error: std::sync::Mutex<Option<Error>>,
    /// A token file's first read has waited for the file (later reads never wait).
    waited_for_file: std::sync::atomic::AtomicBool,
    /// Names for tokens whose accessor Vault does not give (batch tokens).
    unnamed: std::sync::atomic::AtomicU64,
}

/// The wait after a failed token refresh: 1 s, doubling up to 30 s between two refreshes
/// that fail.
const REFRESH_RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
/// The longest wait before a token file is read again to see whether the Agent
/// replaced it (sooner as the token nears its end: see [`next_look`]).
const TOKEN_FILE_CHECK: Duration = Duration::from_secs(1);
/// The longest wait before the Proxy's token is looked up again.
const PROXY_CHECK: Duration = Duration::from_secs(30);
/// How long a custom [`Login::request`] may take.
const CUSTOM_LOGIN_BOUND: Duration = Duration::from_secs(30);
/// The longest a token file's first read waits for the file.
const TOKEN_FILE_WAIT_MAX: Duration = Duration::from_secs(3600);
/// How often a waiting first read looks for the token file.
const TOKEN_FILE_POLL: Duration = Duration::from_millis(100);

impl TokenManager {
    pub(crate) fn new(method: AuthMethod) -> Self {
        Self {
            method,
            current: ArcSwapOption::empty(),
            refresh: tokio::sync::Mutex::new(()),
            ends: std::sync::Mutex::new(std::collections::HashMap::new()),
            failed: std::sync::Mutex::new((0, None)),
            last_error: std::sync::Mutex::new(None),
            waited_for_file: std::sync::atomic::AtomicBool::new(false),
            unnamed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub(crate) fn method_name(&self) -> String {
        self.method.name()
    }

    /// Whether a token Vault says is gone can be replaced (a new login, or the token
    /// file read again).
    pub(crate) fn can_replace_token(&self) -> bool {
        self.method.logs_in() || matches!(self.method, AuthMethod::TokenFile { .. })
    }

    pub(crate) fn info(&self) -> Option<TokenInfo> {
        self.current.load_full().map(|s| s.info.clone())
    }

    /// When the token with `accessor` ends for good, if known.
    pub(crate) fn end_of(&self, accessor: &str) -> Option<Instant> {
        self.ends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(accessor)
            .copied()
    }

    /// When the current token is due for renewal, re-login or a new look: never earlier
    /// than the backoff after failed refreshes, so a token that cannot be refreshed is
    /// not asked for again at every wake-up.
    pub(crate) fn refresh_at(&self) -> Option<Instant> {
        let due = self.current.load().as_deref().and_then(|s| s.refresh_at)?;
        let (_, not_before) = *self.failed.lock().unwrap_or_else(|e| e.into_inner());
        Some(not_before.map_or(due, |nb| due.max(nb)))
    }

    fn refresh_failed(&self, now: Instant, error: Option<&Error>) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.0 = failed.0.saturating_add(1);
        let wait = REFRESH_RETRY.delay(failed.0);
        failed.1 = Some(now + wait);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error.map(Error::shared_copy);
    }

    /// Inside the backoff after a refresh that failed for a lasting reason (a refused
    /// login, a missing credential file): that failure, to hand out instead of a new
    /// attempt. A transient failure (Vault unreachable, sealed) is not shared: the
    /// client's retries and circuit breaker already pace those, and say so.
    fn backing_off(&self, now: Instant) -> Option<Error> {
        let (_, not_before) = *self.failed.lock().unwrap_or_else(|e| e.into_inner());
        not_before.filter(|nb| now < *nb)?;
        let last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref()
            .filter(|e| !e.is_transient() && e.kind() != ErrorKind::CircuitOpen)
            .map(Error::shared_copy)
    }

    /// Whether `s` can still be used after a failed refresh: until its end (behind a
    /// Proxy, always — the Proxy holds the token).
    fn still_valid(&self, s: &TokenState, now: Instant) -> bool {
        matches!(self.method, AuthMethod::ProxyAutoAuth)
            || s.info.expires_at().is_none_or(|end| now < end)
    }

    /// Record when the token `accessor` ends, keeping the earlier of two ends (a token
    /// Vault refused ended "now", whatever its TTL said). Tokens without a name are not
    /// tracked.
    fn end_token(&self, accessor: &str, end: Instant) {
        if accessor.is_empty() {
            return;
        }
        let mut ends = self.ends.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        ends.retain(|_, e| *e > now);
        ends.entry(accessor.to_owned())
            .and_modify(|e| *e = (*e).min(end))
            .or_insert(end);
    }

    fn record_end(&self, info: &TokenInfo) {
        if let Some(end) = info.expires_at() {
            self.end_token(&info.accessor, end);
        }
    }

    /// A name for a token Vault gave none (a batch token): unique in this process.
    fn name_unnamed(&self, info: &mut TokenInfo) {
        if info.accessor.is_empty() {
            let n = self
                .unnamed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            info.accessor = format!("unnamed token #{n}");
        }
    }

    /// Forget `gone` after Vault said it is no longer valid — if it is still the current
    /// token (another call may have replaced it meanwhile). Its end (now) is recorded
    /// first: leases it issued died with it, and the engine rotates them at once.
    pub(crate) fn invalidate(&self, gone: &SecretString) {
        let current = self.current.load_full();
        let Some(state) = current.as_ref().filter(|s| s.same_token(gone)) else {
            return;
        };
        let previous = self.current.compare_and_swap(&current, None);
        if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, state)) {
            self.end_token(&state.info.accessor, Instant::now());
        }
    }

    /// Whether the last refresh of the token failed (and none has succeeded since).
    pub(crate) fn refresh_failing(&self) -> bool {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).0 > 0
    }

    /// The current token, due for refresh or not.
    pub(crate) fn current_token(&self) -> Option<SecretString> {
        self.current.load().as_deref().and_then(|s| s.token.clone())
    }

    fn usable(state: &TokenState, now: Instant) -> bool {
        state.refresh_at.is_none_or(|at| now < at)
    }

    /// The current token if it is not due for renewal (`Some(None)`: none is sent,
    /// behind a Vault Proxy).
    pub(crate) fn cached(&self, now: Instant) -> Option<Option<SecretString>> {
        let s = self.current.load();
        s.as_deref()
            .filter(|s| Self::usable(s, now))
            .map(|s| s.token.clone())
    }

    /// The current token, renewing, logging in or reading it again first if it is due.
    pub(crate) async fn token(&self, client: &Client) -> Result<Option<SecretString>> {
        if let Some(token) = self.cached(Instant::now()) {
            return Ok(token);
        }
        let _one_at_a_time = self.refresh.lock().await;
        let old = self.current.load_full();
        let now = Instant::now();
        if let Some(s) = &old
            && Self::usable(s, now)
        {
            return Ok(s.token.clone());
        }
        // Inside the backoff after a failure, callers do not try again one after another:
        // they keep the token while it is valid, or get the failure itself.
        if let Some(e) = self.backing_off(now) {
            return match old.as_deref().filter(|s| self.still_valid(s, now)) {
                Some(s) => Ok(s.token.clone()),
                None => Err(e),
            };
        }
        // A refresh dropped midway (its caller cut by a deadline) counts as failed, so
        // the backoff holds however the attempt ended.
        let mut unfinished = Unfinished(Some(self));
        let refreshed = self.refresh(client, old.as_deref()).await;
        unfinished.0 = None;
        let new = match refreshed {
            Ok(new) => {
                *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = (0, None);
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Arc::new(new)
            }
            Err(e) => {
                let now = Instant::now();
                self.refresh_failed(now, Some(&e));
                // A token that still works stays in use (a Proxy lookup that failed, a
                // token file briefly unreadable, a re-login refused while the renewed
                // token has time left); the next attempt comes after the backoff.
                if let Some(s) = old.as_deref().filter(|s| self.still_valid(s, now)) {
                    tracing::warn!(
                        method = %self.method.name(),
                        "refreshing the client's Vault token failed; the current one stays \
                         in use while it is valid: {e}"
                    );
                    return Ok(s.token.clone());
                }
                return Err(e);
            }
        };
        // Vault refused the token this refresh started from while it ran (`invalidate`):
        // a refresh that came back with that same token must not bring it back.
        let replaced = self.current.load_full();
        let invalidated = !match (&replaced, &old) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if invalidated
            && let (Some(gone), Some(token)) = (old.as_deref(), new.token.as_ref())
            && gone.same_token(token)
        {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "using the Vault token ({}): Vault refused it while it was being checked; \
                     waiting for a new one",
                    self.method.name()
                ),
            ));
        }
        if let Some(old) = &old {
            // A renewal that came back short, or a token replaced (a login, the Agent,
            // the Proxy): the old token's end is now final.
            if old.info.accessor != new.info.accessor {
                if !matches!(self.method, AuthMethod::Token(_)) {
                    tracing::info!(
                        old = %old.info.accessor,
                        new = %new.info.accessor,
                        method = %self.method.name(),
                        "the client's Vault token changed; leases issued under the old one \
                         rotate before its end"
                    );
                }
                self.record_end(&old.info);
            } else if new.info.ttl < new.increment {
                self.record_end(&new.info);
            }
        }
        let token = new.token.clone();
        self.current.store(Some(new));
        Ok(token)
    }

    async fn refresh(&self, client: &Client, old: Option<&TokenState>) -> Result<TokenState> {
        let now = Instant::now();
        let alive = old.filter(|s| s.info.expires_at().is_none_or(|end| now < end));
        match (&self.method, alive) {
            (AuthMethod::TokenFile { path, wait }, _) => {
                self.read_token_file(client, path, *wait, old).await
            }
            (AuthMethod::ProxyAutoAuth, _) => look_behind_proxy(client).await,
            (AuthMethod::Token(token), None) => {
                if old.is_some() {
                    return Err(Error::new(
                        ErrorKind::PermissionDenied,
                        "using the Vault token: it has expired",
                    ));
                }
                let info = lookup_self(client, token)
                    .await
                    .map_err(|e| e.context("checking the Vault token (VAULT_TOKEN)"))?;
                Ok(state(Some(token.clone()), info, None))
            }
            (AuthMethod::Token(_), Some(s)) if !s.info.renewable => {
                // Not renewable: use it until it ends.
                Ok(TokenState {
                    refresh_at: s.info.expires_at(),
                    token: s.token.clone(),
                    info: s.info.clone(),
                    increment: s.increment,
                })
            }
            (AuthMethod::Token(_), Some(s)) => match renew_self(client, s).await {
                Ok(renewed) => Ok(renewed),
                Err(e) => keep_until_retry(s, e),
            },
            (_, Some(s)) if s.info.renewable => match renew_self(client, s).await {
                Ok(renewed) if renewed.info.ttl >= s.increment => Ok(renewed),
                Ok(renewed) => {
                    tracing::debug!(
                        ttl_s = renewed.info.ttl.as_secs(),
                        "vault token renewal capped by its max TTL; logging in afresh"
                    );
                    self.login_or_keep(client, &renewed).await
                }
                Err(e) if e.is_transient() => keep_until_retry(s, e),
                Err(e) => {
                    tracing::info!("vault token renewal refused ({e}); logging in afresh");
                    self.login(client, old).await
                }
            },
            _ => self.login(client, old).await,
        }
    }

    /// After a capped renewal: log in, but if that fails keep the still-valid renewed
    /// token (a refused login — an expired JWT, a rotated service-account token — may be
    /// fixed before it ends) and try again later.
    async fn login_or_keep(&self, client: &Client, renewed: &TokenState) -> Result<TokenState> {
        match self.login(client, Some(renewed)).await {
            Ok(s) => Ok(s),
            Err(e) => {
                if !e.is_transient() {
                    tracing::warn!(
                        method = %self.method.name(),
                        "logging in again failed; the current token stays in use until its \
                         end: {e}"
                    );
                }
                keep_until_retry(renewed, e)
            }
        }
    }

    /// The request for one login, credentials read afresh.
    async fn login_request(&self) -> Result<LoginRequest> {
        let body = match &self.method {
            AuthMethod::AppRole {
                role_id, secret_id, ..
            } => {
                let secret_id = match secret_id {
                    SecretIdSource::Value(v) => v.clone(),
                    SecretIdSource::File(path) => read_secret_id(path)?,
                };
                json!({
                    "role_id": role_id.expose_secret(),
                    "secret_id": secret_id.expose_secret(),
                })
            }
            AuthMethod::Kubernetes {
                role, token_path, ..
            } => {
                let jwt = read_credential(
                    token_path,
                    "the Kubernetes service-account token",
                    "check the pod's service account token mount (automountServiceAccountToken)",
                    false,
                )?;
                json!({ "role": role, "jwt": jwt.expose_secret() })
            }
            AuthMethod::Jwt { role, jwt, .. } => {
                let jwt = match jwt {
                    JwtSource::File(path) => read_credential(
                        path,
                        "the JWT",
                        "check the path given (VAULT_JWT_FILE)",
                        false,
                    )?,
                    JwtSource::Env(var) => std::env::var(var)
                        .ok()
                        .map(|v| v.trim().to_owned())
                        .filter(|v| !v.is_empty())
                        .map(SecretString::from)
                        .ok_or_else(|| {
                            Error::new(
                                ErrorKind::Config,
                                format!(
                                    "reading the JWT from the environment variable {var}: it \
                                     is not set or empty; set it, or give a file"
                                ),
                            )
                        })?,
                };
                json!({ "role": role, "jwt": jwt.expose_secret() })
            }
            AuthMethod::Cert { name, .. } => match name {
                Some(name) => json!({ "name": name }),
                None => json!({}),
            },
            AuthMethod::Custom(login) => {
                // Bounded: it runs under the refresh lock that every Vault call may wait on.
                return match tokio::time::timeout(CUSTOM_LOGIN_BOUND, login.request()).await {
                    Ok(r) => r.map_err(|e| {
                        e.context(format!("building the {} login request", login.name()))
                    }),
                    Err(_) => Err(Error::new(
                        ErrorKind::CredentialsUnavailable,
                        format!(
                            "building the {} login request: no answer within \
                             {CUSTOM_LOGIN_BOUND:?}",
                            login.name()
                        ),
                    )),
                };
            }
            AuthMethod::Token(_) | AuthMethod::TokenFile { .. } | AuthMethod::ProxyAutoAuth => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "logging in to Vault: the {} method has no login",
                        self.method.name()
                    ),
                ));
            }
        };
        let mount = match &self.method {
            AuthMethod::AppRole { mount, .. }
            | AuthMethod::Kubernetes { mount, .. }
            | AuthMethod::Jwt { mount, .. }
            | AuthMethod::Cert { mount, .. } => mount.trim_matches('/'),
            _ => "",
        };
        Ok(LoginRequest::new(format!("auth/{mount}/login"), body))
    }

    async fn login(&self, client: &Client, old: Option<&TokenState>) -> Result<TokenState> {
        let LoginRequest { path, body } = self.login_request().await?;
        let name = self.method.name();
        let (env, received) = client
            .call::<serde_json::Value>(Call::put(&path, &body).unauthenticated())
            .await
            .map_err(|e| login_error(&self.method, &path, e))?;
        let auth = env.auth.ok_or_else(|| {
            Error::new(
                ErrorKind::Decode,
                format!("logging in at {path}: the answer has no `auth` block"),
            )
        })?;
        let logins = old.map_or(0, |s| s.info.logins) + 1;
        let mut info = token_info(&auth, received, logins, 0, &path)?;
        self.name_unnamed(&mut info);
        tracing::info!(
            method = %name,
            accessor = %info.accessor,
            ttl_s = info.ttl.as_secs(),
            renewable = info.renewable,
            logins,
            "logged in to Vault"
        );
        Ok(state(Some(auth.client_token), info, None))
    }

    /// Vault Agent's sink: the token in `path`, looked up when it is new or when its
    /// last look is two thirds old (the Agent renews it); never renewed here.
    async fn read_token_file(
        &self,
        client: &Client,
        path: &Path,
        wait: Duration,
        old: Option<&TokenState>,
    ) -> Result<TokenState> {
        if !self
            .waited_for_file
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            // The first read only: the Agent may not have written the sink yet.
            let deadline = Instant::now() + wait.min(TOKEN_FILE_WAIT_MAX);
            while !path.exists() && Instant::now() < deadline {
                tokio::time::sleep(TOKEN_FILE_POLL).await;
            }
            if !path.exists() {
                return Err(Error::new(
                    ErrorKind::CredentialsUnavailable,
                    format!(
                        "reading the Vault token file {}: it does not exist after waiting {wait:?}; \
                         check that Vault Agent runs and that its file sink writes this path",
                        path.display()
                    ),
                ));
            }
        }
        let token = read_credential(
            path,
            "the Vault token file",
            "check the Agent's file sink path (VAULT_TOKEN_FILE)",
            true,
        )?;
        let now = Instant::now();
        if let Some(s) = old.filter(|s| s.same_token(&token))
            && s.info.renew_at().is_none_or(|at| now < at)
            && s.info.expires_at().is_none_or(|end| now < end)
        {
            return Ok(TokenState {
                token: s.token.clone(),
                info: s.info.clone(),
                increment: s.increment,
                refresh_at: Some(next_look(now, TOKEN_FILE_CHECK, &s.info)),
            });
        }
        let mut info = lookup_self(client, &token).await.map_err(|e| {
            e.context(format!(
                "checking the token in {} (Vault Agent's sink)",
                path.display()
            ))
        })?;
        if let Some(o) = old.filter(|o| o.same_token(&token)) {
            // The same token looked up again: the same name; and a 0 TTL after a finite
            // one is its last second (without an expire_time to say so), not "never".
            info.accessor.clone_from(&o.info.accessor);
            if info.ttl.is_zero() && !o.info.ttl.is_zero() {
                info.ttl = Duration::from_millis(1);
            }
        } else {
            self.name_unnamed(&mut info);
        }
        let mut s = state(Some(token), info, None);
        s.refresh_at = Some(next_look(now, TOKEN_FILE_CHECK, &s.info));
        Ok(s)
    }
}

/// Behind a Vault Proxy: no token of ours; the Proxy's is looked up (through it) to
/// learn which token it is and its TTL, again more often as it nears its end (see
/// [`next_look`]), so that a replaced token is seen before the old one ends.
async fn look_behind_proxy(client: &Client) -> Result<TokenState> {
    let (env, received) = client
        .call::<LookupSelf>(Call::get("auth/token/lookup-self").unauthenticated())
        .await
        .map_err(|e| {
            let hint = if e.kind() == ErrorKind::PermissionDenied {
                "; is the Proxy's `use_auto_auth_token` on, and its auto-auth logged in?"
            } else {
                ""
            };
            e.context(format!(
                "looking up the Vault Proxy's token (no token of our own){hint}"
            ))
        })?;
    let info = lookup_info(env.into_data("auth/token/lookup-self")?.0, received)?;
    let mut s = state(None, info, None);
    s.refresh_at = Some(next_look(received, PROXY_CHECK, &s.info));
    Ok(s)
}

/// The next look at a token that is not ours to renew (the Agent's or the Proxy's):
/// after a tenth of what is left of it as last seen, between 100 ms and `longest`.
/// Whoever owns it replaces it shortly before its end (Vault's lifetime watcher keeps a
/// grace of 10-20 % of its TTL), so the looks get denser as that moment nears, and the
/// replacement is seen well before the old token ends; a token far from its end is
/// looked at rarely.
fn next_look(now: Instant, longest: Duration, info: &TokenInfo) -> Instant {
    let every = info
        .expires_at()
        .map_or(longest, |end| end.saturating_duration_since(now) / 10)
        .clamp(TOKEN_FILE_POLL, longest);
    now + every
}

/// A login refused or failed: say which method, path and role, and what to fix when
/// Vault's words say it.
fn login_error(method: &AuthMethod, path: &str, e: Error) -> Error {
    // Only Vault's own words count: a TLS or transport failure says "certificate" or
    // "expired" about something else (the server's certificate).
    let text = if e.vault_status().is_some() {
        e.vault_errors().join("; ").to_ascii_lowercase()
    } else {
        String::new()
    };
    let (what, fix): (String, Option<String>) = match method {
        AuthMethod::AppRole { .. } => (format!("logging in to Vault with AppRole ({path})"), None),
        AuthMethod::Kubernetes {
            role, token_path, ..
        } => (
            format!(
                "logging in to Vault with Kubernetes as role {role} ({path}, service-account \
                 token {})",
                token_path.display()
            ),
            if text.contains("role")
                && (text.contains("not found") || text.contains("invalid role"))
            {
                Some(format!("no role {role} at {path}: check the role name"))
            } else if text.contains("service account") || text.contains("namespace") {
                Some(format!(
                    "role {role} does not bind this pod's service account or namespace \
                     (bound_service_account_names / _namespaces)"
                ))
            } else {
                None
            },
        ),
        AuthMethod::Jwt { role, jwt, .. } => (
            format!(
                "logging in to Vault with a JWT as role {role} ({path}, JWT from {})",
                match jwt {
                    JwtSource::File(p) => p.display().to_string(),
                    JwtSource::Env(v) => format!("${v}"),
                }
            ),
            if text.contains("expired") {
                Some(
                    "the JWT has expired: its issuer must provide a fresh one (it is read again \
                     at every login)"
                        .to_owned(),
                )
            } else if text.contains("audience") || text.contains("aud)") {
                Some(format!(
                    "the JWT's audience (aud) is not one role {role} accepts (bound_audiences)"
                ))
            } else if text.contains("role") && text.contains("could not be found") {
                Some(format!("no role {role} at {path}: check the role name"))
            } else {
                None
            },
        ),
        AuthMethod::Cert { name, .. } => (
            format!(
                "logging in to Vault with a TLS client certificate ({path}{})",
                name.as_deref()
                    .map(|n| format!(", role {n}"))
                    .unwrap_or_default()
            ),
            (text.contains("certificate") || text.contains("permission denied")).then(|| {
                "Vault did not accept the client certificate (VAULT_CLIENT_CERT): check that a \
                 cert role at this mount trusts the CA that signed it, and that the certificate \
                 and key match"
                    .to_owned()
            }),
        ),
        other => (
            format!("logging in to Vault with {} ({path})", other.name()),
            None,
        ),
    };
    // A login Vault answered with 4xx is a refused credential, whatever the method's
    // own words (an expired JWT, an unknown certificate are 400s).
    let e = if e.kind() == ErrorKind::InvalidRequest {
        e.with_kind(ErrorKind::PermissionDenied)
    } else {
        e
    };
    match fix {
        Some(fix) => e.context(format!("{what}: {fix}")).fix_given(),
        None => e.context(what),
    }
}

/// Marks a token refresh as failed if dropped before it finished.
struct Unfinished<'a>(Option<&'a TokenManager>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(manager) = self.0.take() {
            manager.refresh_failed(Instant::now(), None);
        }
    }
}

fn state(token: Option<SecretString>, info: TokenInfo, increment: Option<Duration>) -> TokenState {
    TokenState {
        refresh_at: info.renew_at(),
        increment: increment.unwrap_or(info.ttl),
        token,
        info,
    }
}

/// A refresh failed but the token is still valid: keep it, try again a bit later (never
/// past its end).
fn keep_until_retry(s: &TokenState, e: Error) -> Result<TokenState> {
    let now = Instant::now();
    let Some(end) = s.info.expires_at().filter(|end| now < *end) else {
        return Err(e);
    };
    tracing::debug!("vault token refresh failed, keeping the current token for now: {e}");
    let wait = ((end - now) / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
    Ok(TokenState {
        token: s.token.clone(),
        info: s.info.clone(),
        increment: s.increment,
        refresh_at: Some((now + wait).min(end)),
    })
}

fn read_secret_id(path: &Path) -> Result<SecretString> {
    read_credential(
        path,
        "the AppRole secret_id file",
        "check VAULT_SECRET_ID_FILE",
        false,
    )
}

/// A credential from a file, trimmed: missing, unreadable or empty is a `Config` error
/// naming the file; `private` also refuses a file every user can read (a Vault token).
fn read_credential(path: &Path, what: &str, check: &str, private: bool) -> Result<SecretString> {
    let failed = |why: &str| {
        Error::new(
            ErrorKind::Config,
            format!("reading {what} {}: {why}; {check}", path.display()),
        )
    };
    let io = |e: std::io::Error| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "it does not exist",
            std::io::ErrorKind::PermissionDenied => "this process may not read it",
            _ => "it cannot be read",
        };
        failed(why).with_source(e)
    };
    // One handle for the mode and the text: the file cannot change in between.
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).map_err(io)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata().map_err(io)?.permissions().mode();
        if mode & 0o004 != 0 {
            return Err(failed(&format!(
                "every user of this machine can read it (mode {:o}); make it 0600 or 0640 \
                 (Vault Agent's sink `mode`)",
                mode & 0o777
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = private;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(failed("it is empty"));
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

fn token_info(
    auth: &AuthInfo,
    received: Instant,
    logins: u64,
    renewals: u64,
    what: &str,
) -> Result<TokenInfo> {
    Ok(TokenInfo {
        accessor: auth.accessor.clone(),
        ttl: ttl(auth.lease_duration, what)?,
        renewable: auth.renewable,
        policies: auth.policies.clone(),
        obtained_at: received,
        logins,
        renewals,
    })
}

async fn renew_self(client: &Client, s: &TokenState) -> Result<TokenState> {
    let body = json!({ "increment": format!("{}s", s.increment.as_secs()) });
    let (env, received) = client
        .call::<serde_json::Value>(Call::put("auth/token/renew-self", &body).with_token(s.held()?))
        .await
        .map_err(|e| e.context("renewing the client's Vault token"))?;
    let auth = env.auth.ok_or_else(|| {
        Error::new(
            ErrorKind::Decode,
            "renewing the client's Vault token: the answer has no `auth` block",
        )
    })?;
    let mut info = token_info(
        &auth,
        received,
        s.info.logins,
        s.info.renewals + 1,
        "auth/token/renew-self",
    )?;
    if info.accessor.is_empty() {
        info.accessor.clone_from(&s.info.accessor);
    }
    if info.ttl.is_zero() && !s.info.ttl.is_zero() {
        // Whole seconds: a renewal in the token's last second says 0 — ending, not endless.
        info.ttl = Duration::from_millis(1);
    }
    tracing::debug!(
        ttl_s = info.ttl.as_secs(),
        "renewed the client's Vault token"
    );
    Ok(state(s.token.clone(), info, Some(s.increment)))
}

#[derive(serde::Deserialize)]
pub(crate) struct LookupSelf {
    #[serde(default)]
    accessor: String,
    #[serde(default)]
    ttl: i64,
    #[serde(default)]
    renewable: bool,
    #[serde(default)]
    policies: Vec<String>,
    /// When the token was issued: who it is when the accessor is withheld (Vault Proxy
    /// strips it from answers about its own token).
    #[serde(default)]
    issue_time: String,
    /// When it ends; null for a token that never does.
    #[serde(default)]
    expire_time: Option<String>,
}

fn lookup_info(data: LookupSelf, received: Instant) -> Result<TokenInfo> {
    let accessor = match (data.accessor.is_empty(), data.issue_time.is_empty()) {
        (true, false) => format!("issued at {}", data.issue_time),
        _ => data.accessor,
    };
    // Whole seconds: a token in its last second says 0, which for TokenInfo means "never
    // ends" (a root token's 0 comes with no expire_time). Count it as ending now.
    let expiring = data.expire_time.as_deref().is_some_and(|t| !t.is_empty());
    let left = if data.ttl <= 0 && expiring {
        Duration::from_millis(1)
    } else {
        ttl(data.ttl.max(0) as u64, "auth/token/lookup-self")?
    };
    Ok(TokenInfo {
        accessor,
        ttl: left,
        renewable: data.renewable,
        policies: data.policies,
        obtained_at: received,
        logins: 0,
        renewals: 0,
    })
}

async fn lookup_self(client: &Client, token: &SecretString) -> Result<TokenInfo> {
    let (env, received) = client
        .call::<LookupSelf>(Call::get("auth/token/lookup-self").with_token(token))
        .await?;
    lookup_info(env.into_data("auth/token/lookup-self")?.0, received)
}

impl Client {
    /// Log in (or check the token) now, so that bad credentials fail at startup rather
    /// than at the first secret. Returns what is known of the token.
    ///
    /// # Errors
    /// [`ErrorKind::PermissionDenied`] for a bad token or AppRole credentials, the
    /// transport kinds when Vault cannot be reached.
    pub async fn login(&self) -> Result<TokenInfo> {
        self.client_token().await?;
        self.inner.auth.info().ok_or_else(|| {
            Error::new(
                ErrorKind::CredentialsUnavailable,
                "logging in to Vault: no token after login",
            )
        })
    }

    /// What the client knows of its own token, if it has one yet.
    pub fn token_info(&self) -> Option<TokenInfo> {
        self.inner.auth.info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_role_or_secret_id_or_token() {
        let m = AuthMethod::app_role("role-1234", "secret-5678");
        let d = format!("{m:?}");
        assert!(
            !d.contains("role-1234") && !d.contains("secret-5678"),
            "{d}"
        );
        let t = AuthMethod::token("hvs.tokentoken");
        assert!(!format!("{t:?}").contains("tokentoken"));
        let f = AuthMethod::app_role_file("r", "/run/secret_id").with_mount("ar");
        assert!(format!("{f:?}").contains("/run/secret_id"));
    }

    #[test]
    fn renewal_is_due_at_two_thirds() {
        let now = Instant::now();
        let info = TokenInfo {
            accessor: String::new(),
            ttl: Duration::from_secs(30),
            renewable: true,
            policies: vec![],
            obtained_at: now,
            logins: 1,
            renewals: 0,
        };
        let s = state(Some(SecretString::from("t")), info, None);
        assert!(TokenManager::usable(&s, now + Duration::from_secs(19)));
        assert!(!TokenManager::usable(&s, now + Duration::from_secs(20)));
        assert_eq!(s.increment, Duration::from_secs(30));
    }

    #[test]
    fn a_token_without_ttl_never_needs_a_refresh() {
        let now = Instant::now();
        let info = TokenInfo {
            accessor: String::new(),
            ttl: Duration::ZERO,
            renewable: false,
            policies: vec![],
            obtained_at: now,
            logins: 0,
            renewals: 0,
        };
        let s = state(Some(SecretString::from("root")), info, None);
        assert!(TokenManager::usable(
            &s,
            now + Duration::from_secs(1_000_000)
        ));
    }

    #[test]
    fn credential_files_missing_empty_or_world_readable_are_config_errors() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("vaultpool-tok-{}", std::process::id()));
        let read = |private| read_credential(&path, "the Vault token file", "check it", private);
        let err = read(true).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("does not exist"), "{err}");
        std::fs::write(&path, "hvs.abc\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read(true).unwrap_err();
        assert!(
            err.to_string().contains("every user") && err.to_string().contains("644"),
            "{err}"
        );
        assert!(!err.to_string().contains("hvs.abc"), "{err}");
        // A Kubernetes service-account token is mounted 0644: not refused.
        assert_eq!(read(false).unwrap().expose_secret(), "hvs.abc");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(read(true).unwrap().expose_secret(), "hvs.abc");
        std::fs::write(&path, " \n").unwrap();
        assert!(read(true).unwrap_err().to_string().contains("empty"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn new_methods_never_show_secrets_and_name_their_mounts() {
        let k = AuthMethod::kubernetes("app").with_mount("k8s");
        assert!(
            format!("{k:?}").contains("k8s") && format!("{k:?}").contains(KUBERNETES_TOKEN_PATH)
        );
        let r = LoginRequest::new("auth/aws/login", json!({"iam_request_body": "s3cr3t-sig"}));
        assert!(!format!("{r:?}").contains("s3cr3t"), "{r:?}");
        assert_eq!(AuthMethod::ProxyAutoAuth.name(), "proxy auto-auth");
        assert!(AuthMethod::jwt_env("r", "CI_JWT").logs_in());
        assert!(!AuthMethod::token_file("/run/sink").logs_in());
    }

    #[test]
    fn a_failed_refresh_is_shared_inside_its_backoff_and_ends_keep_the_earlier() {
        let m = TokenManager::new(AuthMethod::jwt_file("app", "/run/jwt"));
        let now = Instant::now();
        assert!(m.backing_off(now).is_none());
        let refused = Error::new(
            ErrorKind::PermissionDenied,
            "logging in to Vault with a JWT",
        );
        m.refresh_failed(now, Some(&refused));
        let shared = m.backing_off(now + Duration::from_millis(500)).unwrap();
        assert_eq!(shared.kind(), ErrorKind::PermissionDenied);
        assert_eq!(shared.to_string(), refused.to_string());
        assert!(
            m.backing_off(now + Duration::from_secs(2)).is_none(),
            "1 s backoff"
        );
        // A token refused "now" keeps that end over the later one its TTL gave.
        m.end_token("acc", now + Duration::from_secs(60));
        m.end_token("acc", now + Duration::from_secs(5));
        m.end_token("acc", now + Duration::from_secs(90));
        assert_eq!(m.end_of("acc"), Some(now + Duration::from_secs(5)));
        // A token without a name is never tracked (every lease would share its end).
        m.end_token("", now + Duration::from_secs(5));
        assert_eq!(m.end_of(""), None);
        let mut batch = TokenInfo {
            accessor: String::new(),
            ttl: Duration::from_secs(60),
            renewable: false,
            policies: vec![],
            obtained_at: now,
            logins: 1,
            renewals: 0,
        };
        m.name_unnamed(&mut batch);
        let mut another = batch.clone();
        another.accessor.clear();
        m.name_unnamed(&mut another);
        assert!(!batch.accessor.is_empty() && batch.accessor != another.accessor);
    }

    #[test]
    fn login_advice_comes_only_from_vaults_answer() {
        let jwt = AuthMethod::jwt_file("app", "/run/jwt");
        // A TLS failure reaching Vault says "certificate ... expired": not the JWT's.
        let tls = Error::new(
            ErrorKind::Tls,
            "TLS handshake: invalid peer certificate: Expired",
        );
        let e = login_error(&jwt, "auth/jwt/login", tls);
        assert_eq!(e.kind(), ErrorKind::Tls);
        assert!(!e.to_string().contains("the JWT has expired"), "{e}");
        let answered = Error::new(ErrorKind::InvalidRequest, "PUT auth/jwt/login")
            .with_vault(400, vec!["error validating token: token is expired".into()]);
        let e = login_error(&jwt, "auth/jwt/login", answered);
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("the JWT has expired"), "{e}");
    }

    #[test]
    fn a_token_in_its_last_second_is_ending_not_endless() {
        let at = Instant::now();
        let data = |ttl: i64, expire: Option<&str>| LookupSelf {
            accessor: String::new(),
            ttl,
            renewable: true,
            policies: vec![],
            issue_time: "2026-11-30T12:00:00Z".into(),
            expire_time: expire.map(Into::into),
        };
        let ending = lookup_info(data(0, Some("2026-11-30T12:00:10Z")), at).unwrap();
        assert!(
            ending
                .expires_at()
                .is_some_and(|e| e <= at + Duration::from_millis(1))
        );
        assert_eq!(ending.accessor, "issued at 2026-11-30T12:00:00Z");
        let root = lookup_info(data(0, None), at).unwrap();
        assert_eq!(root.expires_at(), None);
    }

    #[test]
    fn looks_at_a_token_not_ours_get_denser_near_its_end_but_never_busy() {
        let now = Instant::now();
        let mut info = TokenInfo {
            accessor: "a".into(),
            ttl: Duration::from_secs(3600),
            renewable: true,
            policies: vec![],
            obtained_at: now,
            logins: 0,
            renewals: 0,
        };
        let wait = |info: &TokenInfo, longest| next_look(now, longest, info) - now;
        // An hour left: the longest wait (30 s for the Proxy, 1 s for a file).
        assert_eq!(wait(&info, PROXY_CHECK), PROXY_CHECK);
        assert_eq!(wait(&info, TOKEN_FILE_CHECK), TOKEN_FILE_CHECK);
        // 60 s left: every 6 s; 2 s left: every 200 ms.
        info.ttl = Duration::from_secs(60);
        assert_eq!(wait(&info, PROXY_CHECK), Duration::from_secs(6));
        info.ttl = Duration::from_secs(2);
        assert_eq!(wait(&info, PROXY_CHECK), Duration::from_millis(200));
        // Past its end, or no end: never "now" (a busy loop), never more than the longest.
        info.obtained_at = now - Duration::from_secs(10);
        assert_eq!(wait(&info, PROXY_CHECK), TOKEN_FILE_POLL);
        info.ttl = Duration::ZERO;
        assert_eq!(wait(&info, PROXY_CHECK), PROXY_CHECK);
    }

    #[test]
    fn empty_secret_id_file_is_a_config_error() {
        let dir = std::env::temp_dir().join(format!("vaultpool-sid-{}", std::process::id()));
        std::fs::write(&dir, "  \n").unwrap();
        let err = read_secret_id(&dir).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("empty"));
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(read_secret_id(&dir).unwrap_err().kind(), ErrorKind::Config);
    }

    #[test]
    fn failed_refreshes_push_the_next_one_back_exponentially() {
        let now = Instant::now();
        let info = TokenInfo {
            accessor: "acc".into(),
            ttl: Duration::from_secs(3),
            renewable: true,
            policies: vec![],
            obtained_at: now - Duration::from_secs(10), // ended 7 s ago
            logins: 1,
            renewals: 0,
        };
        let m = TokenManager::new(AuthMethod::app_role("r", "s"));
        m.current.store(Some(Arc::new(state(
            Some(SecretString::from("t")),
            info,
            None,
        ))));
        // Due long ago: before the fix the worker woke for it again and again at once.
        assert!(m.refresh_at().unwrap() < now);
        let mut waits = Vec::new();
        for _ in 0..8 {
            let at = Instant::now();
            m.refresh_failed(at, None);
            waits.push((m.refresh_at().unwrap() - at).as_secs());
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(m.failed.lock().unwrap().0, 8);
        // Forgetting a gone token records its end, so leases it issued rotate at once; a
        // token that is no longer the current one is left alone.
        m.invalidate(&SecretString::from("another"));
        assert!(m.current_token().is_some());
        m.invalidate(&SecretString::from("t"));
        assert!(m.end_of("acc").is_some_and(|end| end <= Instant::now()));
        assert!(m.current_token().is_none());
    }
}
