//! Errors: one opaque [`Error`] with a matchable [`ErrorKind`].
//!
//! Every error says what was being done (the operation, the Vault path or role, the
//! address), what went wrong and, where there is one, what to do next. None carries a
//! token, password, secret_id or secret value: Vault's own error strings are kept, but
//! they never contain the request's secrets.

use std::fmt;
use std::time::Duration;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is. Match on this; the message is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The configuration is missing or invalid (an address, a CA file, an env var).
    Config,
    /// Vault could not be reached: connect error, timeout, reset.
    Transport,
    /// The TLS handshake with Vault failed: its certificate is not signed by a trusted CA
    /// (`VAULT_CACERT`), or does not name the address's host. Not retried: it fails the
    /// same way until the configuration or the certificate changes.
    Tls,
    /// The circuit breaker is open after repeated transport failures; the call was not
    /// sent. It lets a probe through after its cooldown.
    CircuitOpen,
    /// Vault is sealed (HTTP 503 `Vault is sealed`).
    Sealed,
    /// Vault is not initialized.
    Uninitialized,
    /// The path, role, lease or secret does not exist (HTTP 404, `unknown role`,
    /// `lease not found`, `invalid lease`).
    NotFound,
    /// The token is invalid or its policies do not allow the path (HTTP 403), or an
    /// AppRole login was refused.
    PermissionDenied,
    /// Vault rejected the request as malformed (HTTP 400 other than the cases above).
    InvalidRequest,
    /// Vault asked us to slow down or is a standby that is not ready (HTTP 429).
    RateLimited,
    /// Vault failed while handling the request (HTTP 5xx other than sealed), e.g. the
    /// database behind the secrets engine is down.
    Server,
    /// The response was not the JSON Vault sends (malformed, missing or wrong-typed
    /// fields).
    Decode,
    /// The lease has run out and can no longer be renewed (`lease expired`).
    LeaseExpired,
    /// No valid credentials are available and none could be obtained.
    CredentialsUnavailable,
    /// The backend (PostgreSQL, Redis, Kafka) failed.
    Backend,
    /// The backend refused the credentials (wrong password, unknown user).
    AuthenticationFailed,
    /// No pooled connection became available in time.
    PoolTimeout,
    /// A statement failed on a working connection (wrapped with [`Error::query`]).
    Query,
    /// The component was shut down.
    Shutdown,
    /// A service other than Vault that vaultpool waits on (a credential provider of
    /// your own) did not answer in time. Retried like a transport failure.
    Timeout,
}

impl ErrorKind {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::Transport | Self::Sealed | Self::RateLimited | Self::Server | Self::Timeout
        )
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Config => "invalid configuration",
            Self::Transport => "could not reach Vault",
            Self::Tls => "TLS failed",
            Self::CircuitOpen => "circuit breaker open",
            Self::Sealed => "Vault is sealed",
            Self::Uninitialized => "Vault is not initialized",
            Self::NotFound => "not found",
            Self::PermissionDenied => "permission denied",
            Self::InvalidRequest => "invalid request",
            Self::RateLimited => "rate limited",
            Self::Server => "Vault server error",
            Self::Decode => "unexpected response",
            Self::LeaseExpired => "lease expired",
            Self::CredentialsUnavailable => "credentials unavailable",
            Self::Backend => "backend error",
            Self::AuthenticationFailed => "the backend refused the credentials",
            Self::PoolTimeout => "pool timeout",
            Self::Query => "query failed",
            Self::Shutdown => "shut down",
            Self::Timeout => "no answer in time",
        }
    }

    fn hint(self) -> Option<&'static str> {
        Some(match self {
            Self::Transport => {
                "check VAULT_ADDR and that Vault is running and reachable from this host"
            }
            Self::Tls => {
                "check the CA file given (VAULT_CACERT for Vault, PGSSLROOTCERT for \
                 PostgreSQL, REDIS_TLS_CA_FILE for Redis) and that the host name connected \
                 to is in the certificate"
            }
            Self::CircuitOpen => {
                "Vault failed repeatedly; calls resume after the breaker's cooldown"
            }
            Self::Sealed => "unseal Vault (`bao operator unseal`); calls succeed once it is",
            Self::Uninitialized => "initialize Vault (`bao operator init`) first",
            Self::PermissionDenied => {
                "check that the token or AppRole is valid and that its policies grant this path"
            }
            Self::NotFound => "check the mount, path or role name",
            Self::Server => "see the Vault server log; the call is retried when transient",
            Self::RateLimited => "retry later",
            Self::AuthenticationFailed => {
                "check the username and password stored in Vault against the backend's users; \
                 after changing them on the backend, write them to Vault too"
            }
            _ => return None,
        })
    }
}

/// The error type of this crate: what failed, where, and why.
///
/// The message names the operation and its target; [`kind`](Error::kind) tells how to
/// react; [`vault_status`](Error::vault_status) and [`vault_errors`](Error::vault_errors)
/// give what Vault answered. The underlying error is available through
/// [`source`](std::error::Error::source) and is not repeated in the message.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    context: String,
    status: Option<u16>,
    vault_errors: Vec<String>,
    retry_after: Option<Duration>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    /// The context already says what to do: the kind's general hint is left out.
    fix_given: bool,
}

/// Vault error strings are kept, but bounded: a broken proxy can send megabytes.
const MAX_VAULT_ERROR_LEN: usize = 512;

impl Error {
    /// A new error of `kind` while doing `context` (e.g. "reading database/creds/app").
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                context: context.into(),
                status: None,
                vault_errors: Vec::new(),
                retry_after: None,
                source: None,
                fix_given: false,
            }),
        }
    }

    /// A copy without the source, to hand the same failure to several callers (a token
    /// refresh shared by everyone waiting for it).
    pub(crate) fn shared_copy(&self) -> Self {
        let i = &self.inner;
        Self {
            inner: Box::new(Inner {
                kind: i.kind,
                context: i.context.clone(),
                status: i.status,
                vault_errors: i.vault_errors.clone(),
                retry_after: i.retry_after,
                source: None,
                fix_given: i.fix_given,
            }),
        }
    }

    /// The same error as another kind (a 4xx on a login is a refused credential).
    pub(crate) fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.inner.kind = kind;
        self
    }

    /// The context says what to fix: leave out the kind's general hint (for TLS, "check
    /// the CA file given…"), which could point elsewhere.
    pub(crate) fn fix_given(mut self) -> Self {
        self.inner.fix_given = true;
        self
    }

    /// Wrap a driver error from running a statement (e.g. a `tokio_postgres::Error`), so
    /// handlers can `?` it into an [`Error`] of kind [`ErrorKind::Query`].
    pub fn query(e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self::new(ErrorKind::Query, "running a statement").with_source(e)
    }

    /// Attach the error that caused this one (e.g. a driver's, in a
    /// [`CredentialProvider`](crate::lease::CredentialProvider)); it is kept as
    /// [`source`](std::error::Error::source), not printed in the message.
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    pub(crate) fn with_vault(mut self, status: u16, errors: Vec<String>) -> Self {
        self.inner.status = Some(status);
        // At most MAX_VAULT_ERROR_LEN bytes in all: a body with thousands of short errors
        // must not make a message that grows with it.
        let mut kept: Vec<String> = Vec::new();
        let (mut total, mut dropped) = (0, 0);
        for e in errors {
            let e = e.trim().replace("\n\t* ", "; ").replace('\n', " ");
            if e.is_empty() {
                continue;
            }
            let room = MAX_VAULT_ERROR_LEN.saturating_sub(total);
            if room == 0 {
                dropped += 1;
                continue;
            }
            let e = if e.len() > room {
                let mut cut = room;
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                format!("{}…", &e[..cut])
            } else {
                e
            };
            total += e.len();
            kept.push(e);
        }
        if dropped > 0 {
            kept.push(format!("({dropped} more)"));
        }
        self.inner.vault_errors = kept;
        self
    }

    pub(crate) fn with_retry_after(mut self, after: Duration) -> Self {
        self.inner.retry_after = Some(after);
        self
    }

    /// Prefix the context with an outer operation ("leasing role app: reading …").
    pub(crate) fn context(mut self, outer: impl fmt::Display) -> Self {
        self.inner.context = format!("{outer}: {}", self.inner.context);
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The HTTP status Vault answered with, if it answered.
    pub fn vault_status(&self) -> Option<u16> {
        self.inner.status
    }

    /// The `errors` strings of Vault's response body (tidied up, bounded in length).
    pub fn vault_errors(&self) -> &[String] {
        &self.inner.vault_errors
    }

    /// A delay the server or breaker asked for before the next attempt, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after
    }

    /// Whether retrying later may succeed (transport failures, sealed, 429, 5xx).
    pub fn is_transient(&self) -> bool {
        self.inner.kind.is_transient()
    }

    /// The same failure for another caller of the call that failed (a coalesced
    /// `rotate()`), with `context` in front: kind, Vault's status and errors, retry hint
    /// and fix kept; the source (not clonable) stays with the first caller's error.
    pub(crate) fn for_another_caller(&self, context: impl Into<String>) -> Self {
        let inner = &self.inner;
        Self {
            inner: Box::new(Inner {
                kind: inner.kind,
                context: format!("{}: {}", context.into(), inner.context),
                status: inner.status,
                vault_errors: inner.vault_errors.clone(),
                retry_after: inner.retry_after,
                source: None,
                fix_given: inner.fix_given,
            }),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        write!(f, "{}: {}", inner.context, inner.kind.describe())?;
        match (inner.status, inner.vault_errors.is_empty()) {
            (Some(status), false) => {
                write!(f, " (HTTP {status}: {})", inner.vault_errors.join("; "))?
            }
            (Some(status), true) => write!(f, " (HTTP {status})")?,
            (None, _) => {}
        }
        if let Some(hint) = inner.kind.hint().filter(|_| !inner.fix_given) {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        let mut d = f.debug_struct("Error");
        d.field("kind", &inner.kind)
            .field("context", &inner.context);
        if let Some(status) = inner.status {
            d.field("status", &status);
        }
        if !inner.vault_errors.is_empty() {
            d.field("vault_errors", &inner.vault_errors);
        }
        if let Some(source) = &inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_context_status_vault_message_and_hint() {
        let e = Error::new(ErrorKind::PermissionDenied, "reading database/creds/app").with_vault(
            403,
            vec!["1 error occurred:\n\t* permission denied\n\n".into()],
        );
        assert_eq!(
            e.to_string(),
            "reading database/creds/app: permission denied (HTTP 403: 1 error occurred:; \
             permission denied); check that the token or AppRole is valid and that its \
             policies grant this path"
        );
    }

    #[test]
    fn source_is_not_repeated_in_display() {
        let io = std::io::Error::other("boom-underlying");
        let e = Error::new(ErrorKind::Transport, "GET sys/health").with_source(io);
        assert!(!e.to_string().contains("boom-underlying"));
        assert!(
            std::error::Error::source(&e)
                .unwrap()
                .to_string()
                .contains("boom-underlying")
        );
    }

    #[test]
    fn long_vault_errors_are_cut() {
        let e = Error::new(ErrorKind::Server, "x").with_vault(500, vec!["é".repeat(2000)]);
        assert!(e.vault_errors()[0].len() <= MAX_VAULT_ERROR_LEN + '…'.len_utf8());
    }

    #[test]
    fn many_short_vault_errors_are_bounded_in_all() {
        // Found by the fuzz target: thousands of short errors made a message that grew
        // with the body.
        let errors: Vec<String> = (0..5000).map(|i| format!("error {i}")).collect();
        let e = Error::new(ErrorKind::PermissionDenied, "GET x").with_vault(403, errors);
        let shown = format!("{e} {e:?}");
        assert!(shown.len() < 2048, "{} bytes", shown.len());
        assert!(e.vault_errors().last().unwrap().ends_with("more)"), "{e}");
        assert!(e.to_string().contains("error 0"), "{e}");
    }
}
