//! The client's own token, kept like a lease: [`TokenManager`] holds it, renews it before
//! it runs out, logs in again when a renewal is capped by the token's max TTL, backs off
//! after failed refreshes (sharing a lasting failure with the callers inside the
//! backoff), and remembers when replaced tokens end (the leases they issued end then).
//! Also the renew-self and lookup-self calls, and [`Client::login`] and
//! [`Client::token_info`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use super::advice::login_error;
use super::watch::look_behind_proxy;
use super::{AuthMethod, LoginRequest};
use crate::backoff::Backoff;
use crate::error::{Error, ErrorKind, Result};
use crate::vault::envelope::{AuthInfo, ttl};
use crate::vault::{Call, Client};

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

    /// When renewal is due: two thirds into its TTL, or `None` if it never ends.
    pub(super) fn renew_at(&self) -> Option<Instant> {
        (!self.ttl.is_zero()).then(|| self.obtained_at + self.ttl * 2 / 3)
    }
}

/// The token in use and what is known of it.
pub(super) struct TokenState {
    /// The token; `None` behind a Vault Proxy (it adds its own).
    pub(super) token: Option<SecretString>,
    /// What is known of it.
    pub(super) info: TokenInfo,
    /// The TTL asked for on renewal: the token's TTL when first obtained.
    pub(super) increment: Duration,
    /// Renewal, login or a new look (token file, Proxy) is due at this point.
    pub(super) refresh_at: Option<Instant>,
}

impl TokenState {
    /// The same token, with its next refresh (renewal, login or look) due at
    /// `refresh_at`.
    pub(super) fn with_refresh_at(&self, refresh_at: Option<Instant>) -> TokenState {
        TokenState {
            token: self.token.clone(),
            info: self.info.clone(),
            increment: self.increment,
            refresh_at,
        }
    }

    /// Whether this state holds the token `other`.
    pub(super) fn same_token(&self, other: &SecretString) -> bool {
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

/// The client's token: obtained, renewed and replaced as its method says (one refresh at
/// a time, in a task of its own), with the ends of the tokens it held.
///
/// Nobody waits for a refresh while the current token is still valid: a due refresh is
/// started in the background and callers go on with the current token (a slow login —
/// a Kubernetes TokenReview taking seconds, a custom `Login` taking 20 — never holds up
/// lease renewals). Only a caller without a valid token waits, and a caller cut by its
/// own deadline does not cut the refresh: it finishes (within [`REFRESH_BOUND`]) and is
/// recorded either way.
pub(crate) struct TokenManager {
    method: AuthMethod,
    current: ArcSwapOption<TokenState>,
    /// Held by the one refresh running (its task owns the guard).
    refresh: Arc<tokio::sync::Mutex<()>>,
    /// A refresh is running (set while [`refresh_locked`](Self::refresh_locked) runs).
    refreshing: std::sync::atomic::AtomicBool,
    /// Known hard ends of tokens by accessor: leases die with the token that issued them.
    ends: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    /// Refreshes failed in a row, and when the next one is due: a token that cannot be
    /// refreshed (Vault down past its end) is retried with backoff, not at every wake-up.
    failed: std::sync::Mutex<(u32, Option<Instant>)>,
    /// The last refresh's failure, handed to callers inside the backoff that follows it
    /// (instead of each trying again).
    last_error: std::sync::Mutex<Option<Error>>,
    /// A token file's first read has waited for the file (later reads never wait).
    pub(super) waited_for_file: std::sync::atomic::AtomicBool,
    /// Names for tokens whose accessor Vault does not give (batch tokens).
    unnamed: std::sync::atomic::AtomicU64,
    /// The client certificate ([`Client::tls_identity`]) of the last login: a cert-auth
    /// token can only be renewed with the certificate it logged in with.
    login_identity: std::sync::atomic::AtomicU64,
}

/// The wait after a failed token refresh: 1 s, doubling up to 30 s between two refreshes
/// that fail.
const REFRESH_RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
/// While a refresh runs, how often [`refresh_at`](TokenManager::refresh_at) asks to be
/// looked at again (the engine's worker waits for the new token this way).
const REFRESH_RUNNING_LOOK: Duration = Duration::from_millis(250);
/// The longest one refresh (renewal, login with its retries, lookup) may take before it
/// is given up and recorded as failed. A token file's first read, which waits for the
/// Agent to write the file, is bounded by that wait instead.
const REFRESH_BOUND: Duration = Duration::from_secs(120);

impl TokenManager {
    /// A manager for `method`, with no token yet (the first call gets one).
    pub(crate) fn new(method: AuthMethod) -> Self {
        Self {
            method,
            current: ArcSwapOption::empty(),
            refresh: Arc::new(tokio::sync::Mutex::new(())),
            refreshing: std::sync::atomic::AtomicBool::new(false),
            ends: std::sync::Mutex::new(std::collections::HashMap::new()),
            failed: std::sync::Mutex::new((0, None)),
            last_error: std::sync::Mutex::new(None),
            waited_for_file: std::sync::atomic::AtomicBool::new(false),
            unnamed: std::sync::atomic::AtomicU64::new(0),
            login_identity: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether the client certificate changed since the last login, for cert auth: Vault
    /// binds a cert-auth token's renewals to the certificate it logged in with ("client
    /// identity during renewal not matching"), so once cert-manager renewed the files the
    /// token is replaced by a login with the new certificate, while it is still valid
    /// (its leases then rotate before it ends), instead of failing to renew until it
    /// runs out.
    pub(crate) fn identity_changed(&self, client: &Client) -> bool {
        matches!(self.method, AuthMethod::Cert { .. })
            && client.tls_identity()
                != self
                    .login_identity
                    .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The auth method's name, for logs and errors.
    pub(crate) fn method_name(&self) -> String {
        self.method.name()
    }

    /// Whether a token Vault says is gone can be replaced (a new login, or the token
    /// file read again).
    pub(crate) fn can_replace_token(&self) -> bool {
        self.method.logs_in() || matches!(self.method, AuthMethod::TokenFile { .. })
    }

    /// What is known of the current token, if there is one.
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
    /// not asked for again at every wake-up. `None` while a refresh runs: it replaces the
    /// token (or records its failure, with the next attempt's time) when it ends.
    pub(crate) fn refresh_at(&self) -> Option<Instant> {
        if self.refreshing.load(std::sync::atomic::Ordering::Acquire) {
            // Look again soon: the refresh replaces the token (or records its failure)
            // when it ends, and whoever waits for a new token (a rotation away from an
            // ending one) should see it then, not at the old token's end.
            return Some(Instant::now() + REFRESH_RUNNING_LOOK);
        }
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
    pub(super) fn name_unnamed(&self, info: &mut TokenInfo) {
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

    /// While refreshing the token is failing: how many refreshes failed in a row, and the
    /// last one's error (refreshes run in the background, so their callers may never
    /// see it).
    pub(crate) fn refresh_failure(&self) -> Option<(u32, Error)> {
        let (failures, _) = *self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failures == 0 {
            return None;
        }
        let last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        let error = last.as_ref().map_or_else(
            || {
                Error::new(
                    ErrorKind::CredentialsUnavailable,
                    format!(
                        "refreshing the client's Vault token ({}): the refresh did not finish",
                        self.method.name()
                    ),
                )
            },
            Error::shared_copy,
        );
        Some((failures, error))
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
    ///
    /// While the current token is valid, a due refresh starts in the background and the
    /// current token is returned at once; without one, the caller waits for the refresh.
    pub(crate) async fn token(&self, client: &Client) -> Result<Option<SecretString>> {
        let now = Instant::now();
        if let Some(token) = self.cached(now)
            && !self.identity_changed(client)
        {
            return Ok(token);
        }
        let old = self.current.load_full();
        if let Some(s) = old.as_deref().filter(|s| self.still_valid(s, now)) {
            self.start_refresh(client);
            return Ok(s.token.clone());
        }
        // No valid token: wait for the refresh running, or run one.
        let guard = Arc::clone(&self.refresh).lock_owned().await;
        let owner = client.clone();
        let refresh = tokio::spawn(async move { owner.auth().refresh_locked(&owner, guard).await });
        refresh.await.unwrap_or_else(|e| {
            Err(Error::new(
                ErrorKind::CredentialsUnavailable,
                format!(
                    "refreshing the client's Vault token ({}): the refresh task ended: {e}",
                    self.method.name()
                ),
            ))
        })
    }

    /// Start a refresh in a task of its own, unless one is running.
    fn start_refresh(&self, client: &Client) {
        // Inside the backoff after a failed refresh, whatever its kind, the valid token
        // serves and nothing is tried (a slow login that timed out is not retried at
        // every call).
        let (_, not_before) = *self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if not_before.is_some_and(|nb| Instant::now() < nb) {
            return;
        }
        let Ok(guard) = Arc::clone(&self.refresh).try_lock_owned() else {
            return; // one is running: it will replace the token
        };
        // Marked before the task first runs, so nobody takes the refresh as not started.
        self.refreshing
            .store(true, std::sync::atomic::Ordering::Release);
        let owner = client.clone();
        tokio::spawn(async move {
            let _ = owner.auth().refresh_locked(&owner, guard).await;
        });
    }

    /// The refresh itself, under the refresh lock: check again (the token may have been
    /// replaced while waiting), honour the backoff, refresh within [`REFRESH_BOUND`],
    /// record the outcome and store the new token.
    async fn refresh_locked(
        &self,
        client: &Client,
        _one_at_a_time: tokio::sync::OwnedMutexGuard<()>,
    ) -> Result<Option<SecretString>> {
        let _running = Running::start(&self.refreshing);
        let old = self.current.load_full();
        let now = Instant::now();
        if let Some(s) = &old
            && Self::usable(s, now)
            && !self.identity_changed(client)
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
        // A refresh dropped midway (the runtime shutting down) counts as failed, so the
        // backoff holds however the attempt ended.
        let mut unfinished = Unfinished(Some(self));
        let bounded = !matches!(self.method, AuthMethod::TokenFile { .. });
        let refreshed = if bounded {
            match tokio::time::timeout(REFRESH_BOUND, self.refresh(client, old.as_deref())).await {
                Ok(r) => r,
                Err(_) => Err(Error::new(
                    ErrorKind::Transport,
                    format!(
                        "refreshing the client's Vault token ({}): no answer within {}s; \
                         check that Vault (and what it asks, e.g. Kubernetes' TokenReview) \
                         answers",
                        self.method.name(),
                        REFRESH_BOUND.as_secs()
                    ),
                )),
            }
        } else {
            self.refresh(client, old.as_deref()).await
        };
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
                    let failures = self.failed.lock().unwrap_or_else(|e| e.into_inner()).0;
                    if failures.is_power_of_two() {
                        tracing::warn!(
                            method = %self.method.name(),
                            failures,
                            "refreshing the client's Vault token failed; the current one \
                             stays in use while it is valid: {e}"
                        );
                    } else {
                        tracing::debug!(
                            failures,
                            "refreshing the client's Vault token failed again: {e}"
                        );
                    }
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
                Ok(s.with_refresh_at(s.info.expires_at()))
            }
            (AuthMethod::Token(_), Some(s)) => match renew_self(client, s).await {
                Ok(renewed) => Ok(renewed),
                Err(e) => keep_until_retry(s, e),
            },
            // Renewed with another certificate than it logged in with, Vault would refuse
            // it: log in with the new one (cert-manager renewed the files).
            (AuthMethod::Cert { .. }, Some(_)) if self.identity_changed(client) => {
                tracing::info!(
                    "the client certificate was renewed on disk; logging in with the new one"
                );
                self.login(client, old).await
            }
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

    async fn login(&self, client: &Client, old: Option<&TokenState>) -> Result<TokenState> {
        // The certificate this login presents (the files looked at first), recorded only
        // once the login succeeded: a login that fails, is cut, or gets an answer it
        // cannot use leaves the change pending, so the next refresh is a login again
        // (never a renewal over the new certificate, which Vault refuses). If the files
        // change while it runs, the next call logs in again.
        let identity = client.tls_identity();
        let LoginRequest { path, body } = self.method.login_request().await?;
        let name = self.method.name();
        let (env, received) = client
            .call::<serde_json::Value>(Call::put(&path, &body).unauthenticated().login())
            .await
            .map_err(|e| login_error(&self.method, &path, e, client.tls_files()))?;
        let auth = env.auth.ok_or_else(|| {
            Error::new(
                ErrorKind::Decode,
                format!("logging in at {path}: the answer has no `auth` block"),
            )
        })?;
        let logins = old.map_or(0, |s| s.info.logins) + 1;
        let mut info = token_info(&auth, received, logins, 0, &path)?;
        self.name_unnamed(&mut info);
        self.login_identity
            .store(identity, std::sync::atomic::Ordering::Release);
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
}

/// Marks a refresh as running for as long as it lives.
struct Running<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> Running<'a> {
    fn start(flag: &'a std::sync::atomic::AtomicBool) -> Self {
        flag.store(true, std::sync::atomic::Ordering::Release);
        Self(flag)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Marks a token refresh as failed if dropped before it finished.
struct Unfinished<'a>(Option<&'a TokenManager>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(manager) = self.0.take() {
            // A lasting failure (shared inside the backoff, not tried again by every
            // caller): a refresh that panicked (a custom `Login`) would panic again.
            let e = Error::new(
                ErrorKind::CredentialsUnavailable,
                format!(
                    "refreshing the client's Vault token ({}): the refresh did not finish \
                     (it panicked, or the runtime shut down)",
                    manager.method.name()
                ),
            );
            manager.refresh_failed(Instant::now(), Some(&e));
        }
    }
}

/// A fresh state for `token`: renewal due at two thirds of its TTL, renewed by `increment`
/// (default: its TTL now).
pub(super) fn state(
    token: Option<SecretString>,
    info: TokenInfo,
    increment: Option<Duration>,
) -> TokenState {
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
    Ok(s.with_refresh_at(Some((now + wait).min(end))))
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

/// The `data` of Vault's answer to `auth/token/lookup-self`.
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

/// What a lookup-self answer (received at `received`) says of the token.
pub(super) fn lookup_info(data: LookupSelf, received: Instant) -> Result<TokenInfo> {
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

/// Look `token` up (`auth/token/lookup-self`).
pub(super) async fn lookup_self(client: &Client, token: &SecretString) -> Result<TokenInfo> {
    let (env, received) = client
        .call::<LookupSelf>(Call::get("auth/token/lookup-self").with_token(token))
        .await?;
    lookup_info(env.into_data("auth/token/lookup-self")?.0, received)
}

impl Client {
    /// The client's token manager.
    fn auth(&self) -> &TokenManager {
        &self.inner.auth
    }

    /// While refreshing the client's token is failing: the failures in a row and the
    /// last error.
    pub(crate) fn token_refresh_failure(&self) -> Option<(u32, Error)> {
        self.auth().refresh_failure()
    }

    /// Log in (or check the token) now, so that bad credentials fail at startup rather
    /// than at the first secret. Returns what is known of the token. With a token that
    /// is still valid but due for renewal or re-login, that refresh starts in the
    /// background and the current token's info is returned at once (its outcome shows in
    /// later calls and in the engine's status).
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
