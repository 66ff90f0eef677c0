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
//! let checks = HealthCheck::new(vault).with(db.engine());
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

use std::time::Duration;

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

/// A short JSON body: `{"error": "service temporarily unavailable"}`. The full error is
/// logged (it names roles and addresses, never secrets), not sent to the client.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.kind().http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        tracing::error!(kind = ?self.kind(), "request failed: {self}");
        let message = if status == StatusCode::SERVICE_UNAVAILABLE {
            "service temporarily unavailable"
        } else {
            "internal error"
        };
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}

/// What the health handler checks: a Vault client (reachable? sealed?) and the lease
/// engines of your pools. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HealthCheck {
    vault: Option<vault::Client>,
    engines: Vec<Engine>,
    timeout: Duration,
}

impl HealthCheck {
    /// Check this Vault client, and no pool yet.
    pub fn new(vault: vault::Client) -> Self {
        Self {
            vault: Some(vault),
            engines: Vec::new(),
            timeout: Duration::from_secs(2),
        }
    }

    /// Check only pools, not Vault.
    pub fn pools_only() -> Self {
        Self {
            vault: None,
            engines: Vec::new(),
            timeout: Duration::from_secs(2),
        }
    }

    /// Also check this pool's credentials (`pool.engine()`).
    #[must_use]
    pub fn with(mut self, engine: &Engine) -> Self {
        self.engines.push(engine.clone());
        self
    }

    /// How long the Vault probe may take. Default 2 s.
    #[must_use]
    pub fn vault_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Run the checks.
    pub async fn report(&self) -> HealthReport {
        let vault = match &self.vault {
            None => None,
            Some(client) => Some(
                match tokio::time::timeout(self.timeout, client.health()).await {
                    Ok(Ok(h)) => VaultHealth {
                        reachable: true,
                        sealed: h.state == ServerState::Sealed,
                        state: format!("{:?}", h.state).to_lowercase(),
                        error: None,
                    },
                    Ok(Err(e)) => VaultHealth {
                        reachable: false,
                        sealed: false,
                        state: "unreachable".into(),
                        error: Some(e.to_string()),
                    },
                    Err(_) => VaultHealth {
                        reachable: false,
                        sealed: false,
                        state: "timeout".into(),
                        error: Some(format!("no answer within {:?}", self.timeout)),
                    },
                },
            ),
        };
        let pools: Vec<PoolHealth> = self
            .engines
            .iter()
            .map(|e| PoolHealth::from(e.status()))
            .collect();
        let ok = pools.iter().all(|p| p.can_serve);
        HealthReport {
            status: if ok { "ok" } else { "unavailable" },
            vault,
            pools,
        }
    }
}

/// The health JSON.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// `ok` when every pool can serve, else `unavailable`.
    pub status: &'static str,
    /// Vault's state, if checked.
    pub vault: Option<VaultHealth>,
    /// One entry per pool.
    pub pools: Vec<PoolHealth>,
}

/// Vault as the health handler saw it.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct VaultHealth {
    /// It answered `sys/health`.
    pub reachable: bool,
    /// It is sealed.
    pub sealed: bool,
    /// `active`, `standby`, `sealed`, `uninitialized`, `unreachable`, …
    pub state: String,
    /// Why it is unreachable.
    pub error: Option<String>,
}

/// One pool's credentials: whether they can serve, and the engine's
/// [`Status`](lease::Status) as it is (source, health, generation, TTL left in seconds,
/// connections per generation, counters, last error).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct PoolHealth {
    /// Whether its credentials are valid (serving, or degraded but valid).
    pub can_serve: bool,
    /// The engine's status.
    #[serde(flatten)]
    pub status: lease::Status,
}

impl From<lease::Status> for PoolHealth {
    fn from(status: lease::Status) -> Self {
        Self {
            can_serve: status.health.can_serve(),
            status,
        }
    }
}

/// The health handler: 200 with the JSON when every pool can serve, 503 when one cannot.
/// Mount it with `.route("/health", get(vaultpool::axum::health))`; the state must give
/// a [`HealthCheck`] (directly or through `FromRef`).
pub async fn health(State(health): State<HealthCheck>) -> Response {
    let report = health.report().await;
    let status = if report.status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
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
    }
}
