//! Authentication: a static token or AppRole, the client's own token as a lease, and
//! the public calls about it ([`Client::login`], [`Client::token_info`]).
//!
//! The token is renewed (`auth/token/renew-self`) once two thirds of its TTL have passed.
//! When a renewal comes back capped by the token's max TTL, an AppRole client logs in
//! afresh instead (a new token with a full TTL); a static token is used until it ends.
//! One refresh runs at a time: concurrent callers wait for it and share its result.
//!
//! Old AppRole tokens are not revoked on re-login: revoking a token revokes every lease
//! issued under it (database credentials included). They expire by their own TTL.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use super::envelope::{AuthInfo, ttl};
use super::{Call, Client};
use crate::error::{Error, ErrorKind, Result};

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

    /// The same method at another mount (AppRole only; a token has no mount).
    #[must_use]
    pub fn with_mount(mut self, new_mount: impl Into<String>) -> Self {
        if let Self::AppRole { mount, .. } = &mut self {
            *mount = new_mount.into();
        }
        self
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Token(_) => "token",
            Self::AppRole { .. } => "approle",
        }
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
    token: SecretString,
    info: TokenInfo,
    /// The TTL asked for on renewal: the token's TTL when first obtained.
    increment: Duration,
    /// Renewal or login is due at this point (earlier than expiry).
    refresh_at: Option<Instant>,
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
}

/// The first wait after a failed token refresh; it doubles up to [`REFRESH_RETRY_MAX`].
const REFRESH_RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait between two token refreshes that fail.
const REFRESH_RETRY_MAX: Duration = Duration::from_secs(30);

impl TokenManager {
    pub(crate) fn new(method: AuthMethod) -> Self {
        Self {
            method,
            current: ArcSwapOption::empty(),
            refresh: tokio::sync::Mutex::new(()),
            ends: std::sync::Mutex::new(std::collections::HashMap::new()),
            failed: std::sync::Mutex::new((0, None)),
        }
    }

    pub(crate) fn method_name(&self) -> &'static str {
        self.method.name()
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

    /// When the current token is due for renewal or re-login: never earlier than the
    /// backoff after failed refreshes, so a token that cannot be refreshed is not asked
    /// for again at every wake-up.
    pub(crate) fn refresh_at(&self) -> Option<Instant> {
        let due = self.current.load().as_deref().and_then(|s| s.refresh_at)?;
        let (_, not_before) = *self.failed.lock().unwrap_or_else(|e| e.into_inner());
        Some(not_before.map_or(due, |nb| due.max(nb)))
    }

    fn refresh_failed(&self, now: Instant) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.0 = failed.0.saturating_add(1);
        let wait = crate::lease::doubling(REFRESH_RETRY_MIN, REFRESH_RETRY_MAX, failed.0);
        failed.1 = Some(now + wait);
    }

    fn record_end(&self, info: &TokenInfo) {
        if let Some(end) = info.expires_at() {
            let mut ends = self.ends.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            ends.retain(|_, e| *e > now);
            ends.insert(info.accessor.clone(), end);
        }
    }

    /// Forget `gone` after Vault said it is no longer valid — if it is still the current
    /// token (another call may have replaced it meanwhile). Its end (now) is recorded
    /// first: leases it issued died with it, and the engine rotates them at once.
    pub(crate) fn invalidate(&self, gone: &SecretString) {
        let current = self.current.load_full();
        let Some(state) = current
            .as_ref()
            .filter(|s| s.token.expose_secret() == gone.expose_secret())
        else {
            return;
        };
        let previous = self.current.compare_and_swap(&current, None);
        if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, state)) {
            let mut ends = self.ends.lock().unwrap_or_else(|e| e.into_inner());
            ends.insert(state.info.accessor.clone(), Instant::now());
        }
    }

    /// Whether the last refresh of the token failed (and none has succeeded since).
    pub(crate) fn refresh_failing(&self) -> bool {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).0 > 0
    }

    /// The current token, due for refresh or not.
    pub(crate) fn current_token(&self) -> Option<SecretString> {
        self.current.load().as_deref().map(|s| s.token.clone())
    }

    fn usable(state: &TokenState, now: Instant) -> bool {
        state.refresh_at.is_none_or(|at| now < at)
    }

    /// The current token if it is not due for renewal.
    pub(crate) fn cached(&self, now: Instant) -> Option<SecretString> {
        let s = self.current.load();
        s.as_deref()
            .filter(|s| Self::usable(s, now))
            .map(|s| s.token.clone())
    }

    /// The current token, renewing or logging in first if it is due.
    pub(crate) async fn token(&self, client: &Client) -> Result<SecretString> {
        if let Some(token) = self.cached(Instant::now()) {
            return Ok(token);
        }
        let _one_at_a_time = self.refresh.lock().await;
        let old = self.current.load_full();
        if let Some(s) = &old
            && Self::usable(s, Instant::now())
        {
            return Ok(s.token.clone());
        }
        // A refresh dropped midway (its caller cut by a deadline) counts as failed, so
        // the backoff holds however the attempt ended.
        let mut unfinished = Unfinished(Some(self));
        let refreshed = self.refresh(client, old.as_deref()).await;
        unfinished.0 = None;
        let new = match refreshed {
            Ok(new) => {
                *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = (0, None);
                Arc::new(new)
            }
            Err(e) => {
                self.refresh_failed(Instant::now());
                return Err(e);
            }
        };
        if let Some(old) = &old {
            // A renewal that came back short, or a token replaced by a login: the old
            // token's end is now final.
            if old.info.accessor != new.info.accessor || new.info.ttl < new.increment {
                self.record_end(if old.info.accessor != new.info.accessor {
                    &old.info
                } else {
                    &new.info
                });
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
            (AuthMethod::Token(token), None) => {
                if old.is_some() {
                    return Err(Error::new(
                        ErrorKind::PermissionDenied,
                        "using the Vault token: it has expired",
                    ));
                }
                let info = lookup_self(client, token).await?;
                Ok(state(token.clone(), info, None))
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
            (AuthMethod::AppRole { .. }, Some(s)) if s.info.renewable => {
                match renew_self(client, s).await {
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
                }
            }
            (AuthMethod::AppRole { .. }, _) => self.login(client, old).await,
        }
    }

    /// After a capped renewal: log in, but if Vault fails transiently keep the still-valid
    /// renewed token.
    async fn login_or_keep(&self, client: &Client, renewed: &TokenState) -> Result<TokenState> {
        match self.login(client, Some(renewed)).await {
            Ok(s) => Ok(s),
            Err(e) if e.is_transient() => keep_until_retry(renewed, e),
            Err(e) => Err(e),
        }
    }

    async fn login(&self, client: &Client, old: Option<&TokenState>) -> Result<TokenState> {
        let AuthMethod::AppRole {
            mount,
            role_id,
            secret_id,
        } = &self.method
        else {
            unreachable!("login is only called for AppRole");
        };
        let secret_id = match secret_id {
            SecretIdSource::Value(v) => v.clone(),
            SecretIdSource::File(path) => read_secret_id(path)?,
        };
        let path = format!("auth/{mount}/login");
        let body = json!({
            "role_id": role_id.expose_secret(),
            "secret_id": secret_id.expose_secret(),
        });
        let (env, received) = client
            .call::<serde_json::Value>(Call::put(&path, &body).unauthenticated())
            .await
            .map_err(|e| e.context("logging in to Vault with AppRole"))?;
        let auth = env.auth.ok_or_else(|| {
            Error::new(
                ErrorKind::Decode,
                format!("logging in at {path}: the answer has no `auth` block"),
            )
        })?;
        let logins = old.map_or(0, |s| s.info.logins) + 1;
        let info = token_info(&auth, received, logins, 0, &path)?;
        tracing::info!(
            accessor = %info.accessor,
            ttl_s = info.ttl.as_secs(),
            renewable = info.renewable,
            logins,
            "logged in to Vault with AppRole"
        );
        Ok(state(auth.client_token, info, None))
    }
}

/// Marks a token refresh as failed if dropped before it finished.
struct Unfinished<'a>(Option<&'a TokenManager>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(manager) = self.0.take() {
            manager.refresh_failed(Instant::now());
        }
    }
}

fn state(token: SecretString, info: TokenInfo, increment: Option<Duration>) -> TokenState {
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

fn read_secret_id(path: &std::path::Path) -> Result<SecretString> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("reading the AppRole secret_id file {}", path.display()),
        )
        .with_source(e)
    })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "reading the AppRole secret_id file {}: it is empty",
                path.display()
            ),
        ));
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
        .call::<serde_json::Value>(Call::put("auth/token/renew-self", &body).with_token(&s.token))
        .await
        .map_err(|e| e.context("renewing the client's Vault token"))?;
    let auth = env.auth.ok_or_else(|| {
        Error::new(
            ErrorKind::Decode,
            "renewing the client's Vault token: the answer has no `auth` block",
        )
    })?;
    let info = token_info(
        &auth,
        received,
        s.info.logins,
        s.info.renewals + 1,
        "auth/token/renew-self",
    )?;
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
}

async fn lookup_self(client: &Client, token: &SecretString) -> Result<TokenInfo> {
    let (env, received) = client
        .call::<LookupSelf>(Call::get("auth/token/lookup-self").with_token(token))
        .await
        .map_err(|e| e.context("checking the Vault token (VAULT_TOKEN)"))?;
    let (data, _) = env.into_data("auth/token/lookup-self")?;
    Ok(TokenInfo {
        accessor: data.accessor,
        ttl: ttl(data.ttl.max(0) as u64, "auth/token/lookup-self")?,
        renewable: data.renewable,
        policies: data.policies,
        obtained_at: received,
        logins: 0,
        renewals: 0,
    })
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
        let s = state(SecretString::from("t"), info, None);
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
        let s = state(SecretString::from("root"), info, None);
        assert!(TokenManager::usable(
            &s,
            now + Duration::from_secs(1_000_000)
        ));
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
        m.current
            .store(Some(Arc::new(state(SecretString::from("t"), info, None))));
        // Due long ago: before the fix the worker woke for it again and again at once.
        assert!(m.refresh_at().unwrap() < now);
        let mut waits = Vec::new();
        for _ in 0..8 {
            let at = Instant::now();
            m.refresh_failed(at);
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
