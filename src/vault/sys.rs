//! `sys/`: lease renew, revoke and lookup; health; and the client's own token.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::envelope::{Envelope, ttl};
use super::path::check_lease_id;
use super::{Call, Client};
use crate::credentials::Lease;
use crate::error::{ErrorKind, Result};

/// The server's state as `sys/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerState {
    /// Initialized, unsealed, active: serves everything.
    Active,
    /// An unsealed standby of an HA cluster (HTTP 429).
    Standby,
    /// A performance standby (HTTP 473).
    PerformanceStandby,
    /// A disaster-recovery secondary (HTTP 472).
    DrSecondary,
    /// Sealed (HTTP 503): serves nothing until unsealed.
    Sealed,
    /// Not initialized (HTTP 501).
    Uninitialized,
}

impl ServerState {
    /// Whether requests for secrets can be served (active or standby).
    pub fn can_serve(self) -> bool {
        matches!(
            self,
            Self::Active | Self::Standby | Self::PerformanceStandby
        )
    }
}

/// The answer of `sys/health`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerHealth {
    /// The state, from the body (not only the status code).
    pub state: ServerState,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The server's version, e.g. `2.7.2`.
    pub version: String,
    /// The cluster name, if reported.
    pub cluster_name: Option<String>,
    /// The server's clock (Unix seconds), if reported.
    pub server_time_utc: Option<i64>,
}

#[derive(Deserialize)]
pub(crate) struct HealthBody {
    initialized: bool,
    sealed: bool,
    #[serde(default)]
    standby: bool,
    #[serde(default)]
    performance_standby: bool,
    #[serde(default)]
    replication_dr_mode: Option<String>,
    #[serde(default)]
    version: String,
    #[serde(default)]
    cluster_name: Option<String>,
    #[serde(default)]
    server_time_utc: Option<i64>,
}

/// What `sys/leases/lookup` says about a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseInfo {
    /// The lease id.
    pub id: String,
    /// Time left (zero once expired).
    pub ttl: Duration,
    /// Whether it can be renewed.
    pub renewable: bool,
    /// When it was issued (RFC 3339).
    pub issue_time: String,
    /// When it ends (RFC 3339), if it does.
    pub expire_time: Option<String>,
    /// When it was last renewed (RFC 3339), if ever.
    pub last_renewal: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct LookupData {
    id: String,
    #[serde(default)]
    ttl: i64,
    #[serde(default)]
    renewable: bool,
    #[serde(default)]
    issue_time: String,
    #[serde(default)]
    expire_time: Option<String>,
    #[serde(default)]
    last_renewal: Option<String>,
}

impl Client {
    /// Renew a lease: `PUT sys/leases/renew`. `increment` asks for a new TTL counted
    /// from now; Vault may cap it at the role's max TTL — compare the returned
    /// [`Lease::duration`] with what you asked and read [`Lease::warnings`].
    ///
    /// Without an increment Vault uses the role's default TTL, which can *shorten* the
    /// lease.
    ///
    /// # Errors
    /// [`ErrorKind::LeaseExpired`] once the lease is past its max TTL,
    /// [`ErrorKind::NotFound`] for an unknown or revoked lease, [`ErrorKind::Server`] when
    /// the database behind Vault is down (the TTL is then unchanged).
    pub async fn renew_lease(&self, lease_id: &str, increment: Option<Duration>) -> Result<Lease> {
        let what = format!("renewing lease {lease_id}");
        check_lease_id(&what, lease_id)?;
        let mut body = json!({ "lease_id": lease_id });
        if let Some(inc) = increment {
            body["increment"] = json!(inc.as_secs());
        }
        let (env, received, from_cache) = self
            .call_cached::<serde_json::Value>(Call::put("sys/leases/renew", &body))
            .await
            .map_err(|e| e.context(&what))?;
        let Envelope {
            lease_id: id,
            renewable,
            lease_duration,
            warnings,
            ..
        } = env;
        let mut lease = Lease::new(
            if id.is_empty() {
                lease_id.to_owned()
            } else {
                id
            },
            ttl(lease_duration, &what)?,
            renewable,
        );
        lease.issued_at = received;
        lease.warnings = warnings;
        if from_cache {
            // A cache answered with an earlier renewal's answer: this renewal never reached
            // Vault (the cache renews on its own). What is left is Vault's to say; a lease
            // Vault no longer knows is gone. If it cannot be asked (no `sys/leases/lookup`
            // in the policy), the cached answer stands.
            match self.lookup_lease(&lease.id).await {
                Ok(info) => {
                    lease.duration = info.ttl;
                    lease.renewable = info.renewable;
                }
                Err(e) if e.kind() == ErrorKind::NotFound => return Err(e.context(&what)),
                Err(e) => tracing::debug!(
                    lease_id,
                    "renewal answered by a cache; its real end could not be looked up: {e}"
                ),
            }
        }
        tracing::debug!(
            lease_id,
            ttl_s = lease.duration.as_secs(),
            capped = increment.is_some_and(|i| lease.duration < i),
            "renewed lease"
        );
        Ok(lease)
    }

    /// Revoke a lease now: `PUT sys/leases/revoke/{lease_id}` (the URL form, which a
    /// policy can grant per role). Revoking an unknown lease succeeds.
    ///
    /// # Errors
    /// [`ErrorKind::PermissionDenied`] when the policy lacks `update` on
    /// `sys/leases/revoke/<mount>/creds/<role>/*`; [`ErrorKind::InvalidRequest`] or
    /// [`ErrorKind::Server`] when the secrets engine could not revoke (e.g. the database
    /// refused to drop the user).
    pub async fn revoke_lease(&self, lease_id: &str) -> Result<()> {
        let what = format!("revoking lease {lease_id}");
        check_lease_id(&what, lease_id)?;
        self.send(Call::new(
            reqwest::Method::PUT,
            &format!("sys/leases/revoke/{lease_id}"),
        ))
        .await
        .map_err(|e| e.context(&what))?;
        tracing::info!(lease_id, "revoked lease");
        if self
            .inner
            .behind_cache
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.evict_from_cache(lease_id).await;
        }
        Ok(())
    }

    /// Ask the cache in front of Vault (a Vault Proxy or Agent with `cache {}`) to drop
    /// the answers that issued `lease_id`, just revoked: left there, the dead lease is
    /// handed to the next request for new credentials until the cache's own renewal of
    /// it fails. Revocations seen by the cache evict only by lease, and a lease renewed
    /// through it is indexed by its renewal, not by the answer that issued it — so the
    /// request path is cleared (`{proxy,agent}/v1/cache-clear`, which needs no token).
    /// Best effort: a failure is logged.
    async fn evict_from_cache(&self, lease_id: &str) {
        // A dynamic secret's lease id is the path that issued it plus an id of its own.
        let Some((path, _)) = lease_id.rsplit_once('/') else {
            return;
        };
        let mut body = json!({ "type": "request_path", "value": format!("/v1/{path}") });
        if let Some(ns) = &self.inner.namespace {
            body["namespace"] = json!(ns);
        }
        let mut last = None;
        let mut not_there = 0;
        for endpoint in ["proxy/v1/cache-clear", "agent/v1/cache-clear"] {
            let call = Call::put(endpoint, &body)
                .outside_api()
                .unauthenticated()
                .no_retry();
            match self.send(call).await {
                // A cache answers with nothing (or JSON); a page (Vault's UI, reached by
                // a redirect from an unknown path) is not a cache's answer.
                Ok(answer) if answer.body.first() != Some(&b'<') => {
                    tracing::debug!(
                        lease_id,
                        endpoint,
                        "cleared the revoked lease from the cache"
                    );
                    return;
                }
                Ok(_) => not_there += 1,
                Err(e) => {
                    if e.kind() == ErrorKind::NotFound {
                        not_there += 1;
                    }
                    last = Some(e);
                }
            }
        }
        if not_there == 2 {
            // Neither a Vault Proxy nor an Agent: the X-Cache header came from something
            // else in front of Vault (a CDN, nginx). Stop treating answers as cached.
            self.inner
                .behind_cache
                .store(false, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                "an X-Cache header came from something that is not a Vault Proxy or Agent \
                 (no cache-clear endpoint); revocations no longer try to clear a cache"
            );
            return;
        }
        if let Some(e) = last {
            tracing::warn!(
                lease_id,
                "the revoked lease could not be cleared from the cache in front of Vault; it \
                 may be handed out again until the cache's renewal of it fails: {e}"
            );
        }
    }

    /// Revoke every lease under a prefix: `PUT sys/leases/revoke-prefix/{prefix}`
    /// (typically needs an operator token).
    ///
    /// # Errors
    /// As [`revoke_lease`](Self::revoke_lease).
    pub async fn revoke_lease_prefix(&self, prefix: &str) -> Result<()> {
        let what = format!("revoking leases under {prefix}");
        check_lease_id(&what, prefix.trim_end_matches('/'))?;
        self.send(Call::new(
            reqwest::Method::PUT,
            &format!("sys/leases/revoke-prefix/{prefix}"),
        ))
        .await
        .map_err(|e| e.context(&what))?;
        tracing::info!(prefix, "revoked leases by prefix");
        Ok(())
    }

    /// Look a lease up: `PUT sys/leases/lookup`.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown lease (`invalid lease`).
    pub async fn lookup_lease(&self, lease_id: &str) -> Result<LeaseInfo> {
        let what = format!("looking up lease {lease_id}");
        check_lease_id(&what, lease_id)?;
        let body = json!({ "lease_id": lease_id });
        let (env, _) = self
            .call::<LookupData>(Call::put("sys/leases/lookup", &body))
            .await
            .map_err(|e| e.context(&what))?;
        let (d, _) = env.into_data(&what)?;
        Ok(LeaseInfo {
            id: d.id,
            ttl: ttl(d.ttl.max(0) as u64, &what)?,
            renewable: d.renewable,
            issue_time: d.issue_time,
            expire_time: d.expire_time.filter(|s| !s.is_empty()),
            last_renewal: d.last_renewal.filter(|s| !s.is_empty()),
        })
    }

    /// Ask `sys/health` (unauthenticated, not retried): active, standby, sealed or
    /// uninitialized. A sealed server is an answer here, not an error.
    ///
    /// # Errors
    /// The transport kinds when Vault cannot be reached, [`ErrorKind::Decode`] when the
    /// answer is not Vault's health JSON.
    pub async fn health(&self) -> Result<ServerHealth> {
        let what = format!("checking the health of Vault at {}", self.address());
        let answer = self
            .send(
                Call::get("sys/health")
                    .unauthenticated()
                    .any_status()
                    .no_retry(),
            )
            .await
            .map_err(|e| e.context(&what))?;
        let body: HealthBody = super::envelope::decode_json(&answer.body, "GET sys/health")
            .map_err(|e| e.context(&what))?;
        let state = if !body.initialized {
            ServerState::Uninitialized
        } else if body.sealed {
            ServerState::Sealed
        } else if body.performance_standby {
            ServerState::PerformanceStandby
        } else if body.standby {
            ServerState::Standby
        } else if body
            .replication_dr_mode
            .as_deref()
            .is_some_and(|m| m == "secondary")
        {
            ServerState::DrSecondary
        } else {
            ServerState::Active
        };
        Ok(ServerHealth {
            state,
            status: answer.status.as_u16(),
            version: body.version,
            cluster_name: body.cluster_name,
            server_time_utc: body.server_time_utc,
        })
    }
}
