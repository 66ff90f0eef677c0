//! The transport under [`Client`]: one request to Vault (with the token, retries with
//! backoff and jitter, the circuit breaker, failover between nodes), reading the body
//! (bounded, zeroized), and mapping a non-2xx answer to an [`ErrorKind`].

use std::time::{Duration, Instant};

use backon::Retryable;
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;
use serde_json::Value;
use zeroize::Zeroizing;

use super::Client;
use super::breaker::{Admission, Breaker};
use super::envelope::{self, Envelope};
use crate::BoxFuture;
use crate::backoff::Backoff;
use crate::error::{Error, ErrorKind, Result};

/// One request to Vault, described for sending and for error messages.
pub(crate) struct Call<'a> {
    method: Method,
    path: &'a str,
    body: Option<&'a Value>,
    /// Send the client token.
    authed: bool,
    /// Send this token instead of the client's (token renew/lookup of the token itself).
    token: Option<&'a secrecy::SecretString>,
    /// Treat every HTTP status as an answer to decode (sys/health).
    any_status: bool,
    /// Never retry (e.g. a login that carries a one-time secret_id is safe to retry,
    /// but a health probe should answer at once).
    no_retry: bool,
    /// A login: Vault may ask another system before it answers (Kubernetes'
    /// TokenReview, a JWKS or OIDC endpoint), so a timeout waiting for the answer says
    /// nothing about Vault's own health and does not count towards the circuit breaker
    /// (which would then refuse lease renewals that Vault can answer).
    login: bool,
    /// The path is not under `/v1` (a Vault Proxy's or Agent's own endpoints).
    outside_api: bool,
}

impl<'a> Call<'a> {
    pub(crate) fn new(method: Method, path: &'a str) -> Self {
        Self {
            method,
            path,
            body: None,
            authed: true,
            token: None,
            any_status: false,
            no_retry: false,
            login: false,
            outside_api: false,
        }
    }
    pub(crate) fn get(path: &'a str) -> Self {
        Self::new(Method::GET, path)
    }
    pub(crate) fn put(path: &'a str, body: &'a Value) -> Self {
        Self::new(Method::PUT, path).body(body)
    }
    pub(crate) fn body(mut self, body: &'a Value) -> Self {
        self.body = Some(body);
        self
    }
    pub(crate) fn unauthenticated(mut self) -> Self {
        self.authed = false;
        self
    }
    /// A path outside Vault's `/v1` API (a Vault Proxy's or Agent's own endpoint).
    pub(crate) fn outside_api(mut self) -> Self {
        self.outside_api = true;
        self
    }
    /// A login (see the field): its timeouts do not open the circuit breaker.
    pub(crate) fn login(mut self) -> Self {
        self.login = true;
        self
    }
    pub(crate) fn with_token(mut self, token: &'a secrecy::SecretString) -> Self {
        self.token = Some(token);
        self
    }
    pub(crate) fn any_status(mut self) -> Self {
        self.any_status = true;
        self
    }
    pub(crate) fn no_retry(mut self) -> Self {
        self.no_retry = true;
        self
    }
}

/// A raw answer: status, body and when it arrived. The body (it carries tokens and
/// passwords) is zeroized when dropped.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: Zeroizing<Vec<u8>>,
    pub(crate) received: Instant,
    /// Served from a cache in front of Vault (a Vault Proxy or Agent with `cache {}`
    /// answers `X-Cache: HIT`): the answer may be minutes old.
    pub(crate) from_cache: bool,
}

/// The most we read of a response body; Vault's answers are a few KiB.
const MAX_BODY: usize = 4 * 1024 * 1024;

impl Client {
    pub(super) fn base(&self) -> (usize, &url::Url) {
        let i = self
            .inner
            .current
            .load(std::sync::atomic::Ordering::Acquire)
            % self.inner.addrs.len();
        (i, &self.inner.addrs[i])
    }

    /// `addrs[failed]` could not be reached: move to the next address (once, even when
    /// many requests saw the same failure). The retry then goes there.
    fn fail_over(&self, failed: usize) {
        let n = self.inner.addrs.len();
        if n > 1
            && self
                .inner
                .current
                .compare_exchange(
                    failed,
                    (failed + 1) % n,
                    std::sync::atomic::Ordering::AcqRel,
                    std::sync::atomic::Ordering::Acquire,
                )
                .is_ok()
        {
            tracing::warn!(
                from = %self.inner.addrs[failed],
                to = %self.inner.addrs[(failed + 1) % n],
                "vault node unreachable, moving to the next address"
            );
        }
    }

    fn what(&self, call: &Call<'_>) -> String {
        format!(
            "{} {} at {}",
            call.method,
            call.path,
            self.address().trim_end_matches('/')
        )
    }

    /// Send a call with retries and the breaker; map non-2xx answers to errors.
    ///
    /// A 403 on the client's own token means one of two things: the token's policy does
    /// not allow the path (lasting: nothing to retry), or the token is gone (revoked from
    /// outside, expired early). `lookup-self` (in every token's default policy) tells
    /// which; only a gone token is replaced — its end recorded first, so that leases it
    /// issued rotate at once — and the call tried once more, for AppRole clients.
    pub(crate) async fn send(&self, call: Call<'_>) -> Result<Answer> {
        let uses_client_token = call.authed && call.token.is_none();
        match self.send_with_retries(&call).await {
            Err(e)
                if e.kind() == ErrorKind::PermissionDenied
                    && uses_client_token
                    && self.inner.auth.can_replace_token() =>
            {
                let Some(gone) = self.gone_token().await else {
                    return Err(e);
                };
                tracing::info!(
                    path = call.path,
                    method = %self.inner.auth.method_name(),
                    "vault refused the token and lookup-self says it is gone; replacing it"
                );
                self.inner.auth.invalidate(&gone);
                self.send_with_retries(&call).await
            }
            other => other,
        }
    }

    /// The client's current token, if Vault says it is no longer valid (lookup-self
    /// refused). Any other answer, a failure to ask included, counts as "not gone".
    async fn gone_token(&self) -> Option<secrecy::SecretString> {
        let token = self.inner.auth.current_token()?;
        let lookup = Call::get("auth/token/lookup-self")
            .with_token(&token)
            .no_retry();
        match self.send_with_retries(&lookup).await {
            Err(e) if e.kind() == ErrorKind::PermissionDenied => Some(token),
            _ => None,
        }
    }

    async fn send_with_retries(&self, call: &Call<'_>) -> Result<Answer> {
        // The token first, once: a renewal or login is a call of its own, with its own
        // retries and admission; retrying it again here would multiply attempts.
        let fetched;
        let token = match (call.token, call.authed) {
            (Some(t), _) => Some(t),
            (None, true) => {
                fetched = self.client_token().await?;
                fetched.as_ref()
            }
            (None, false) => None,
        };
        let retry = &self.inner.retry;
        let backoff = Backoff::new(retry.min_delay, retry.max_delay).retries(if call.no_retry {
            0
        } else {
            retry.max_retries
        });
        (|| async move { self.send_once(call, token).await })
            .retry(backoff)
            .when(|e: &Error| e.is_transient())
            .adjust(|e: &Error, planned| {
                planned.map(|d| {
                    e.retry_after()
                        .map_or(d, |after| after.max(d).min(retry.max_delay))
                })
            })
            .notify(|e: &Error, after: Duration| {
                // The caller reports the final failure; each retry is detail.
                tracing::debug!(
                    path = call.path,
                    kind = ?e.kind(),
                    status = e.vault_status(),
                    retry_in_ms = after.as_millis() as u64,
                    "vault request failed, retrying: {e}"
                );
            })
            .await
    }

    async fn send_once(
        &self,
        call: &Call<'_>,
        token: Option<&secrecy::SecretString>,
    ) -> Result<Answer> {
        let inner = &self.inner;
        let probe = match inner.breaker.admit(Instant::now()) {
            Admission::Reject(after) => {
                return Err(
                    Error::new(ErrorKind::CircuitOpen, self.what(call)).with_retry_after(after)
                );
            }
            Admission::Probe => {
                tracing::debug!(path = call.path, "vault circuit breaker: sending a probe");
                Some(ProbeGuard(&inner.breaker))
            }
            Admission::Pass => None,
        };
        let (index, base) = self.base();
        let result = self.exchange(base, call, token).await;
        let kind = result.as_ref().err().map(Error::kind);
        // Only while Vault itself answers (anything within the last minute): a node that
        // takes connections and answers nothing must still open the breaker.
        let slow_login = call.login
            && result.as_ref().err().is_some_and(timed_out)
            && inner
                .breaker
                .answered_within(SLOW_LOGIN_ANSWERED_WITHIN, Instant::now());
        if slow_login {
            // Connected, sent, and no answer in time: no verdict on Vault's health (a
            // probe's guard, dropped below, lets another probe through).
        } else if kind == Some(ErrorKind::Transport) {
            inner.breaker.on_transport_failure(Instant::now());
        } else {
            // Any other outcome, a refused certificate included, came from a live server:
            // it is the probe's verdict too (the guard below is forgotten, not released).
            inner.breaker.on_success();
        }
        // Another node may be reachable, or present a certificate this client accepts.
        if matches!(kind, Some(ErrorKind::Transport | ErrorKind::Tls)) {
            self.fail_over(index);
        }
        if let Some(p) = probe
            && !slow_login
        {
            std::mem::forget(p);
        }
        result
    }

    /// The client's token: the cached one, or a renewal/login. The refresh is boxed
    /// behind an explicit `dyn Future + Send` ([`BoxFuture`]): a login is itself a call,
    /// and the future would otherwise contain itself.
    pub(super) async fn client_token(&self) -> Result<Option<secrecy::SecretString>> {
        match self.inner.auth.cached(Instant::now()) {
            Some(token) if !self.inner.auth.identity_changed(self) => Ok(token),
            _ => self.refresh_token().await,
        }
    }

    /// Which client certificate the HTTP client presents: a new number each time the
    /// certificate files were read again (looked at first, at most once a second).
    pub(crate) fn tls_identity(&self) -> u64 {
        self.inner.http.look();
        self.inner.http.version()
    }

    fn refresh_token(&self) -> BoxFuture<'_, Result<Option<secrecy::SecretString>>> {
        Box::pin(self.inner.auth.token(self))
    }

    async fn exchange(
        &self,
        base: &url::Url,
        call: &Call<'_>,
        token: Option<&secrecy::SecretString>,
    ) -> Result<Answer> {
        let inner = &self.inner;
        let url = base
            .join(&if call.outside_api {
                call.path.trim_start_matches('/').to_owned()
            } else {
                format!("v1/{}", call.path.trim_start_matches('/'))
            })
            .map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!("building the URL for {}", call.path),
                )
                .with_source(e)
            })?;
        let mut req = inner
            .http
            .get()
            .request(call.method.clone(), url)
            .header("X-Vault-Request", "true");
        if let Some(ns) = &inner.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(token) = token {
            let mut value = reqwest::header::HeaderValue::from_str(token.expose_secret())
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Config,
                        "using the Vault token: it contains characters not allowed in an HTTP header",
                    )
                })?;
            value.set_sensitive(true);
            req = req.header("X-Vault-Token", value);
        }
        if let Some(body) = call.body {
            req = req.json(body);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| transport_error(self.what(call), e, || self.tls_files()))?;
        let status = resp.status();
        // Vault's rate limiter says when to come back (seconds).
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(3600)));
        // A Vault Proxy or Agent with `cache {}` marks every answer it handles with
        // X-Cache (HIT or MISS): requests go through a cache from now on.
        let cache = resp.headers().get("x-cache").map(|v| v.as_bytes().to_vec());
        if cache.is_some() {
            inner
                .behind_cache
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // Sized once from Content-Length where given; a buffer outgrown is zeroized
        // before it is freed, so no copy of a secret is left behind in the heap.
        let hint = resp.content_length().unwrap_or(0).min(MAX_BODY as u64) as usize;
        let mut body = Zeroizing::new(Vec::with_capacity(hint.max(1024)));
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| transport_error(self.what(call), e, || self.tls_files()))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(Error::new(
                    ErrorKind::Decode,
                    format!(
                        "{}: the response is larger than {MAX_BODY} bytes",
                        self.what(call)
                    ),
                ));
            }
            if body.len() + chunk.len() > body.capacity() {
                let mut bigger =
                    Vec::with_capacity((body.len() + chunk.len()).max(2 * body.capacity()));
                bigger.extend_from_slice(&body);
                body = Zeroizing::new(bigger); // the old buffer is zeroized as it drops
            }
            body.extend_from_slice(&chunk);
        }
        let answer = Answer {
            status,
            body,
            received: Instant::now(),
            from_cache: cache.is_some_and(|v| v.eq_ignore_ascii_case(b"hit")),
        };
        if status.is_success() || call.any_status {
            return Ok(answer);
        }
        let mut err = status_error(self.what(call), status, &answer.body);
        if let Some(after) = retry_after.filter(|_| err.kind() == ErrorKind::RateLimited) {
            err = err.with_retry_after(after);
        }
        if err.kind() == ErrorKind::Sealed && self.uninitialized().await {
            // An uninitialized server answers "sealed" to everything but sys/init.
            return Err(Error::new(ErrorKind::Uninitialized, self.what(call))
                .with_vault(status.as_u16(), vec!["Vault is not initialized".into()]));
        }
        Err(err)
    }

    /// What the TLS files given by path (the client certificate and key, `VAULT_CACERT`)
    /// held when last read, and why new ones could not be used; `None` when none is
    /// watched. For the messages of a login or handshake refused for the certificate.
    pub(crate) fn tls_files(&self) -> Option<String> {
        let http = &self.inner.http;
        http.watches_files().then(|| http.describe())
    }

    /// Whether `sys/init` says the server was never initialized (one quick, unauthenticated
    /// request, only after a "sealed" answer).
    async fn uninitialized(&self) -> bool {
        #[derive(serde::Deserialize)]
        struct Init {
            initialized: bool,
        }
        let Ok(url) = self.base().1.join("v1/sys/init") else {
            return false;
        };
        let answer = self
            .inner
            .http
            .get()
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        match answer {
            Ok(r) if r.status().is_success() => {
                r.json::<Init>().await.is_ok_and(|init| !init.initialized)
            }
            _ => false,
        }
    }

    /// Send and decode the envelope.
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        call: Call<'_>,
    ) -> Result<(Envelope<T>, Instant)> {
        let (envelope, received, _) = self.call_cached(call).await?;
        Ok((envelope, received))
    }

    /// [`call`](Self::call), also saying whether the answer came from a cache in front
    /// of Vault.
    pub(crate) async fn call_cached<T: DeserializeOwned>(
        &self,
        call: Call<'_>,
    ) -> Result<(Envelope<T>, Instant, bool)> {
        let what = format!("{} {}", call.method, call.path);
        let answer = self.send(call).await?;
        let envelope = Envelope::decode(&answer.body, &what)?;
        Ok((envelope, answer.received, answer.from_cache))
    }
}

/// Releases a half-open probe if the request future is dropped mid-flight.
struct ProbeGuard<'a>(&'a Breaker);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.release_probe();
    }
}

/// A login that timed out is taken for a slow login (not a Vault outage) only if Vault
/// answered something within this long.
const SLOW_LOGIN_ANSWERED_WITHIN: Duration = Duration::from_secs(60);

/// Whether `e` is a request that got no answer within the request timeout (connected
/// and sent: the server was reached).
fn timed_out(e: &Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<reqwest::Error>())
        .is_some_and(|r| r.is_timeout() && !r.is_connect())
}

fn transport_error(
    what: String,
    e: reqwest::Error,
    files: impl FnOnce() -> Option<String>,
) -> Error {
    // A TLS failure says why (rustls: "invalid peer certificate: UnknownIssuer") and
    // what to check; the chain of sources holds no secret.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    let mut tls = None;
    while let Some(c) = cause {
        let text = c.to_string();
        if text.contains("certificate") || text.contains("tls") || text.contains("TLS") {
            tls = Some(text);
        }
        cause = c.source();
    }
    let (kind, detail) = match (tls, e.is_timeout(), e.is_connect()) {
        // Vault refused the client certificate at the handshake (a listener with
        // `tls_require_and_verify_client_cert`): say what the files held.
        (Some(why), _, _)
            if crate::watched::peer_refused_our_certificate(&why.to_ascii_lowercase()) =>
        {
            let files = files().map(|f| format!("; {f}")).unwrap_or_default();
            (ErrorKind::Tls, format!("TLS handshake: {why}{files}"))
        }
        (Some(why), _, _) => (ErrorKind::Tls, format!("TLS handshake: {why}")),
        (None, true, _) => (ErrorKind::Transport, "timed out".into()),
        (None, false, true) => (ErrorKind::Transport, "connection failed".into()),
        (None, false, false) => (ErrorKind::Transport, "connection error".into()),
    };
    // reqwest's Display names the URL (no token: tokens travel in headers).
    Error::new(kind, format!("{what}: {detail}")).with_source(e.without_url())
}

/// Map a non-2xx answer to an error of the right kind.
pub(crate) fn status_error(what: String, status: StatusCode, body: &[u8]) -> Error {
    let errors = envelope::error_strings(body);
    let joined = errors.join(" ").to_ascii_lowercase();
    let kind = match status.as_u16() {
        400 if joined.contains("lease expired") => ErrorKind::LeaseExpired,
        400 if joined.contains("unknown role")
            || joined.contains("lease not found")
            || joined.contains("invalid lease") =>
        {
            ErrorKind::NotFound
        }
        400 if joined.contains("invalid role or secret id")
            || joined.contains("invalid secret id")
            || joined.contains("invalid role id") =>
        {
            ErrorKind::PermissionDenied
        }
        401 | 403 => ErrorKind::PermissionDenied,
        404 => ErrorKind::NotFound,
        429 => ErrorKind::RateLimited,
        501 => ErrorKind::Uninitialized,
        503 if joined.contains("sealed") => ErrorKind::Sealed,
        503 if joined.contains("not initialized") => ErrorKind::Uninitialized,
        400..=499 => ErrorKind::InvalidRequest,
        _ => ErrorKind::Server,
    };
    let mut err = Error::new(kind, what).with_vault(status.as_u16(), errors);
    if kind == ErrorKind::NotFound
        && status == StatusCode::NOT_FOUND
        && err.vault_errors().is_empty()
    {
        // KV's 404 has an empty errors list; say it plainly.
        err = err.with_vault(404, vec!["no secret or mount at this path".into()]);
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(status: u16, body: &str) -> ErrorKind {
        status_error(
            "x".into(),
            StatusCode::from_u16(status).unwrap(),
            body.as_bytes(),
        )
        .kind()
    }

    #[test]
    fn maps_vault_answers_to_kinds() {
        assert_eq!(
            kind(400, r#"{"errors":["unknown role: nope"]}"#),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind(400, r#"{"errors":["lease not found"]}"#),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind(400, r#"{"errors":["invalid lease"]}"#),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind(400, r#"{"errors":["lease expired"]}"#),
            ErrorKind::LeaseExpired
        );
        assert_eq!(
            kind(400, r#"{"errors":["invalid role or secret ID"]}"#),
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            kind(400, r#"{"errors":["lease_id must be specified"]}"#),
            ErrorKind::InvalidRequest
        );
        assert_eq!(
            kind(403, r#"{"errors":["permission denied"]}"#),
            ErrorKind::PermissionDenied
        );
        assert_eq!(kind(404, r#"{"errors":[]}"#), ErrorKind::NotFound);
        assert_eq!(kind(429, ""), ErrorKind::RateLimited);
        assert_eq!(
            kind(503, r#"{"errors":["Vault is sealed"]}"#),
            ErrorKind::Sealed
        );
        assert_eq!(kind(500, "<html>"), ErrorKind::Server);
        assert_eq!(kind(502, ""), ErrorKind::Server);
    }

    #[test]
    fn transient_kinds_are_retried_and_client_errors_are_not() {
        assert!(ErrorKind::Server.is_transient());
        assert!(ErrorKind::Transport.is_transient());
        assert!(ErrorKind::RateLimited.is_transient());
        assert!(ErrorKind::Sealed.is_transient());
        for k in [
            ErrorKind::InvalidRequest,
            ErrorKind::PermissionDenied,
            ErrorKind::NotFound,
            ErrorKind::CircuitOpen,
            ErrorKind::Decode,
            ErrorKind::Tls,
        ] {
            assert!(!k.is_transient(), "{k:?}");
        }
    }
}
