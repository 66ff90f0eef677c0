//! axum integration (feature `axum`): errors as responses, a ready health handler, and
//! the graceful-shutdown pattern.
//!
//! Pools are cheap `Clone` handles: put them in your state as they are, and use
//! `FromRef` to hand each handler the part it needs.
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use axum::{Router, extract::{FromRef, State}, routing::get};
//! use vaultpool::axum::{HealthCheck, health};
//! use vaultpool::postgres::VaultPgPool;
//!
//! #[derive(Clone, FromRef)]
//! struct App {
//!     db: VaultPgPool,
//!     health: HealthCheck,
//! }
//!
//! async fn count(State(db): State<VaultPgPool>) -> Result<String, vaultpool::Error> {
//!     let client = db.get().await?; // a vaultpool error becomes a 503, details logged
//!     let n: i64 = client
//!         .query_one("SELECT count(*) FROM items", &[])
//!         .await
//!         .map_err(vaultpool::Error::query)?
//!         .get(0);
//!     Ok(n.to_string())
//! }
//!
//! let vault = vaultpool::vault::Client::from_env()?;
//! let db = VaultPgPool::builder("immune-readwrite").vault(vault.clone()).build().await?;
//! let checks = HealthCheck::new(vault).with(&db); // Kafka: .with(&sasl)
//! let app = Router::new()
//!     .route("/items/count", get(count))
//!     .route("/health", get(health))
//!     .with_state(App { db: db.clone(), health: checks });
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app)
//!     .with_graceful_shutdown(vaultpool::axum::shutdown_signal())
//!     .await?;
//! db.close().await; // after the server has drained: revoke the leases
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::{Error, ErrorKind};
use crate::lease::{self, Engine};
use crate::vault::{self, ServerState};

impl ErrorKind {
    /// The HTTP status a service should answer with when a request failed with this kind:
    /// 503 when the dependency is (temporarily) unavailable, 500 otherwise.
    pub fn http_status(self) -> u16 {
        match self {
            Self::CredentialsUnavailable
            | Self::LeaseExpired
            | Self::PoolTimeout
            | Self::Transport
            | Self::Tls
            | Self::CircuitOpen
            | Self::Sealed
            | Self::RateLimited
            | Self::Server
            | Self::Shutdown
            | Self::Backend
            | Self::AuthenticationFailed => 503,
            _ => 500,
        }
    }
}

/// A short JSON body: `{"error": "service temporarily unavailable"}`, with `Retry-After`
/// when the error carries a delay (an open circuit breaker; Vault's `Retry-After` on a
/// 429). The full
/// error is logged (it names roles and addresses, never secrets), not sent to the client:
/// 500s at ERROR; 503s at WARN, at most once a minute per kind with a count of the
/// others (an outage makes every request fail; its log should not grow with the traffic).
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.kind().http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = if status == StatusCode::SERVICE_UNAVAILABLE {
            match UNAVAILABLE_LOG.admit(self.kind()) {
                Some(suppressed) => tracing::warn!(
                    kind = ?self.kind(),
                    suppressed,
                    "request failed: {self}"
                ),
                None => tracing::debug!(kind = ?self.kind(), "request failed: {self}"),
            }
            "service temporarily unavailable"
        } else {
            tracing::error!(kind = ?self.kind(), "request failed: {self}");
            "internal error"
        };
        let mut response = (status, Json(serde_json::json!({ "error": message }))).into_response();
        if let Some(after) = self.retry_after() {
            let secs = after
                .as_secs()
                .saturating_add(u64::from(after.subsec_nanos() > 0));
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs.max(1)),
            );
        }
        response
    }
}

/// Logs one unavailable-error line per kind per minute; counts the rest.
struct LogLimit {
    window: Duration,
    last: Mutex<Vec<(ErrorKind, Instant, u64)>>,
}

static UNAVAILABLE_LOG: LogLimit = LogLimit {
    window: Duration::from_secs(60),
    last: Mutex::new(Vec::new()),
};

impl LogLimit {
    /// `Some(suppressed since the last line)` when this one should be logged.
    fn admit(&self, kind: ErrorKind) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.iter_mut().find(|(k, _, _)| *k == kind) {
            Some((_, at, suppressed)) if now.duration_since(*at) < self.window => {
                *suppressed += 1;
                None
            }
            Some((_, at, suppressed)) => {
                *at = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                last.push((kind, now, 0));
                Some(0)
            }
        }
    }
}

/// What the health handler checks: a Vault client (reachable? sealed?) and the lease
/// engines of your pools and Kafka settings, each critical or not. Cheap to clone; the
/// clones share one cached report.
///
/// - **Status**: `unavailable` (503) when a critical check fails, `degraded` (200) when
///   only non-critical ones do, else `ok` (200). Pools are critical unless added with
///   [`with_optional`](Self::with_optional). Vault is not critical while a pool is
///   checked (pools keep serving on leased credentials through a Vault outage, and a
///   readiness probe should not take every replica out of the load balancer for it),
///   unless [`vault_critical`](Self::vault_critical); with no pool it is the only
///   check, and counts.
/// - **Cached**: a report is reused for [`cache_for`](Self::cache_for) (default 1 s) and
///   only one is computed at a time (callers arriving meanwhile get the previous one), so
///   probes and scrapers do not become Vault traffic and a hung Vault (probe bounded by
///   [`vault_timeout`](Self::vault_timeout), 800 ms) does not queue them. Clones made
///   after the last builder call share one cache; each builder call starts a new one.
/// - **Redacted**: error strings (which name addresses and paths) are replaced by a
///   placeholder unless [`details`](Self::details) is on. The `source` of each check
///   (e.g. `database role app`, `KV secret secret/kafka/main`) is always shown.
/// - **Logged** at WARN when the status changes for the worse, at INFO when it recovers;
///   never per request.
#[derive(Clone)]
pub struct HealthCheck {
    vault: Option<vault::Client>,
    vault_critical: Option<bool>,
    checks: Vec<(Engine, bool)>,
    timeout: Duration,
    cache_for: Duration,
    details: bool,
    cache: Arc<Cache>,
}

#[derive(Default)]
struct Cache {
    /// Held while a report is computed: one probe in flight.
    report: tokio::sync::Mutex<Option<(Instant, HealthReport)>>,
    /// The last report made, for callers arriving while the next one is made.
    latest: Mutex<Option<HealthReport>>,
    /// The last status, to log changes only.
    last_status: Mutex<Option<&'static str>>,
}

impl fmt::Debug for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthCheck")
            .field("vault", &self.vault.is_some())
            .field("vault_critical", &self.vault_critical)
            .field(
                "checks",
                &self
                    .checks
                    .iter()
                    .map(|(e, critical)| (e.source().to_owned(), *critical))
                    .collect::<Vec<_>>(),
            )
            .field("cache_for", &self.cache_for)
            .field("details", &self.details)
            .finish_non_exhaustive()
    }
}

/// Redacted error strings say this.
const HIDDEN: &str = "hidden (HealthCheck::details shows it)";

impl HealthCheck {
    /// Check this Vault client, and no pool yet.
    pub fn new(vault: vault::Client) -> Self {
        Self {
            vault: Some(vault),
            ..Self::pools_only()
        }
    }

    /// Check only pools, not Vault.
    pub fn pools_only() -> Self {
        Self {
            vault: None,
            vault_critical: None,
            checks: Vec::new(),
            timeout: Duration::from_millis(800),
            cache_for: Duration::from_secs(1),
            details: false,
            cache: Arc::default(),
        }
    }

    /// Also check these credentials, as critical: a pool (`&pool`), a
    /// [`KafkaSasl`](crate::kafka::KafkaSasl), or any [`Engine`].
    #[must_use]
    pub fn with<E: AsRef<Engine> + ?Sized>(mut self, check: &E) -> Self {
        self.checks.push((check.as_ref().clone(), true));
        self.cache = Arc::default();
        self
    }

    /// Also check these credentials, as non-critical: a failure makes the status
    /// `degraded` (200), not `unavailable`.
    #[must_use]
    pub fn with_optional<E: AsRef<Engine> + ?Sized>(mut self, check: &E) -> Self {
        self.checks.push((check.as_ref().clone(), false));
        self.cache = Arc::default();
        self
    }

    /// Whether Vault unreachable or sealed makes the service `unavailable`. Default:
    /// only when no pool is checked.
    #[must_use]
    pub fn vault_critical(mut self, critical: bool) -> Self {
        self.vault_critical = Some(critical);
        self.cache = Arc::default();
        self
    }

    /// How long the Vault probe may take. Default 800 ms (under Kubernetes' default
    /// probe timeout of 1 s).
    #[must_use]
    pub fn vault_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self.cache = Arc::default();
        self
    }

    /// How long a report is reused. Default 1 s; zero computes one per request (still
    /// one at a time).
    #[must_use]
    pub fn cache_for(mut self, ttl: Duration) -> Self {
        self.cache_for = ttl;
        self.cache = Arc::default();
        self
    }

    /// Show error strings (addresses, paths, roles; never secrets) in the report.
    /// Default off: each is replaced by a placeholder.
    #[must_use]
    pub fn details(mut self, on: bool) -> Self {
        self.details = on;
        self.cache = Arc::default();
        self
    }

    /// The report: the cached one if it is fresh, else a new one (one at a time; while
    /// one is being made, callers get the previous report rather than wait for it).
    pub async fn report(&self) -> HealthReport {
        let mut cached = match self.cache.report.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                if let Some(stale) = self
                    .cache
                    .latest
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                {
                    return stale;
                }
                self.cache.report.lock().await
            }
        };
        if let Some((at, report)) = cached.as_ref()
            && at.elapsed() < self.cache_for
        {
            return report.clone();
        }
        let report = self.compute().await;
        self.log_change(&report);
        *cached = Some((Instant::now(), report.clone()));
        *self.cache.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
        report
    }

    async fn compute(&self) -> HealthReport {
        let vault_critical = self.vault_critical.unwrap_or(self.checks.is_empty());
        let vault = match &self.vault {
            None => None,
            Some(client) => Some(
                match tokio::time::timeout(self.timeout, client.health()).await {
                    Ok(Ok(h)) => VaultHealth {
                        reachable: true,
                        serving: h.state.can_serve(),
                        sealed: h.state == ServerState::Sealed,
                        state: format!("{:?}", h.state).to_lowercase(),
                        critical: vault_critical,
                        error: None,
                    },
                    Ok(Err(e)) => VaultHealth {
                        reachable: false,
                        serving: false,
                        sealed: false,
                        state: "unreachable".into(),
                        critical: vault_critical,
                        error: Some(e.to_string()),
                    },
                    Err(_) => VaultHealth {
                        reachable: false,
                        serving: false,
                        sealed: false,
                        state: "timeout".into(),
                        critical: vault_critical,
                        error: Some(format!("no answer within {:?}", self.timeout)),
                    },
                },
            ),
        };
        let vault_ok = vault.as_ref().is_none_or(VaultHealth::ok);
        let mut pools: Vec<PoolHealth> = self
            .checks
            .iter()
            .map(|(e, critical)| {
                let mut p = PoolHealth::from(e.status());
                p.critical = *critical;
                p
            })
            .collect();
        let critical_down =
            pools.iter().any(|p| p.critical && !p.can_serve) || (vault_critical && !vault_ok);
        let optional_down = pools.iter().any(|p| !p.critical && !p.can_serve) || !vault_ok;
        let mut vault = vault;
        if !self.details {
            for p in &mut pools {
                redact(&mut p.status.last_error);
                redact(&mut p.status.revoke_refused);
            }
            if let Some(v) = vault.as_mut() {
                redact(&mut v.error);
            }
        }
        HealthReport {
            status: if critical_down {
                "unavailable"
            } else if optional_down {
                "degraded"
            } else {
                "ok"
            },
            vault,
            pools,
        }
    }

    fn log_change(&self, report: &HealthReport) {
        let mut last = self
            .cache
            .last_status
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = last.replace(report.status);
        if before == Some(report.status) {
            return;
        }
        let failing: Vec<String> = report
            .pools
            .iter()
            .filter(|p| !p.can_serve)
            .map(|p| format!("{} ({:?})", p.status.source, p.status.health))
            .chain(
                report
                    .vault
                    .iter()
                    .filter(|v| !v.ok())
                    .map(|v| format!("Vault ({})", v.state)),
            )
            .collect();
        let rank = |s: &str| match s {
            "ok" => 0,
            "degraded" => 1,
            _ => 2,
        };
        match (before, report.status) {
            (None, "ok") => {}
            (Some(b), status) if rank(status) < rank(b) => tracing::info!(
                status,
                failing = %failing.join(", "),
                "health improved to {status}"
            ),
            (_, status) => tracing::warn!(
                status,
                failing = %failing.join(", "),
                "health changed to {status}"
            ),
        }
    }
}

fn redact(field: &mut Option<String>) {
    if field.is_some() {
        *field = Some(HIDDEN.to_owned());
    }
}

impl AsRef<Engine> for Engine {
    fn as_ref(&self) -> &Engine {
        self
    }
}

/// The health JSON.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// `ok`, `degraded` (a non-critical check fails; still 200) or `unavailable` (a
    /// critical one fails; 503).
    pub status: &'static str,
    /// Vault's state, if checked.
    pub vault: Option<VaultHealth>,
    /// One entry per pool or Kafka settings.
    pub pools: Vec<PoolHealth>,
}

/// Vault as the health handler saw it.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct VaultHealth {
    /// It answered `sys/health`.
    pub reachable: bool,
    /// It can serve secrets (active or a standby; not sealed, uninitialized or a DR
    /// secondary).
    pub serving: bool,
    /// It is sealed.
    pub sealed: bool,
    /// `active`, `standby`, `performancestandby`, `drsecondary`, `sealed`,
    /// `uninitialized`, `unreachable` or `timeout`.
    pub state: String,
    /// Whether its failure makes the service unavailable.
    pub critical: bool,
    /// Why it is unreachable (redacted unless details are on).
    pub error: Option<String>,
}

impl VaultHealth {
    /// Reachable and able to serve secrets.
    pub fn ok(&self) -> bool {
        self.reachable && self.serving
    }
}

/// One pool's credentials: whether they can serve, whether that is critical, and the
/// engine's [`Status`](lease::Status) as it is (source, health, generation, TTL left in
/// seconds, connections per generation, counters, last error — redacted unless details
/// are on).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct PoolHealth {
    /// Whether its credentials are valid (serving, or degraded but valid).
    pub can_serve: bool,
    /// Whether its failure makes the service unavailable.
    pub critical: bool,
    /// The engine's status.
    #[serde(flatten)]
    pub status: lease::Status,
}

impl From<lease::Status> for PoolHealth {
    fn from(status: lease::Status) -> Self {
        Self {
            can_serve: status.health.can_serve(),
            critical: true,
            status,
        }
    }
}

/// The health handler: 503 with the JSON when a critical check fails, else 200 (`ok` or
/// `degraded`). Mount it with `.route("/health", get(vaultpool::axum::health))`; the
/// state must give a [`HealthCheck`] (directly or through `FromRef`).
pub async fn health(State(health): State<HealthCheck>) -> Response {
    let report = health.report().await;
    let status = if report.status == "unavailable" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(report)).into_response()
}

/// Resolves on Ctrl-C or SIGTERM: pass it to `with_graceful_shutdown`, then call
/// `close().await` on every pool so their leases are revoked.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailability_maps_to_503_and_the_body_hides_internals() {
        let e = Error::new(
            ErrorKind::LeaseExpired,
            "using credentials for role app at http://10.0.0.1:8200",
        );
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ErrorKind::Config.http_status(), 500);
        assert_eq!(ErrorKind::PoolTimeout.http_status(), 503);
        assert!(resp.headers().get("retry-after").is_none());
    }

    #[test]
    fn a_delay_the_error_carries_becomes_retry_after() {
        let e = Error::new(ErrorKind::RateLimited, "reading creds for role app")
            .with_retry_after(Duration::from_millis(2500));
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()["retry-after"], "3");
    }

    #[test]
    fn unavailable_errors_are_logged_once_a_window_with_a_count() {
        let limit = LogLimit {
            window: Duration::from_secs(3600),
            last: Mutex::new(Vec::new()),
        };
        assert_eq!(limit.admit(ErrorKind::LeaseExpired), Some(0));
        for _ in 0..99 {
            assert_eq!(limit.admit(ErrorKind::LeaseExpired), None);
        }
        // Another kind has its own window.
        assert_eq!(limit.admit(ErrorKind::PoolTimeout), Some(0));
        let zero = LogLimit {
            window: Duration::ZERO,
            last: Mutex::new(vec![(ErrorKind::LeaseExpired, Instant::now(), 41)]),
        };
        assert_eq!(zero.admit(ErrorKind::LeaseExpired), Some(41));
    }
}
