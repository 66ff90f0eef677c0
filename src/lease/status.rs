//! What the engine reports about itself: [`Health`], and the [`Status`] snapshot (with
//! [`GenerationStatus`] per generation and the last rotation's [`RotationTiming`]) that
//! health endpoints serialize.

use std::time::Duration;

use crate::credentials::Generation;

/// How the engine is doing. Serialized in lowercase (`"serving"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Health {
    /// The lease is valid and the last renewal or rotation succeeded.
    Serving,
    /// The lease is valid, but renewing, rotating or refreshing the Vault token is
    /// failing; retrying with backoff.
    Degraded,
    /// The lease has ended and no new credentials could be obtained yet.
    Expired,
    /// [`Engine::close`](super::Engine::close) was called.
    Closed,
    /// The engine's background task stopped unexpectedly (a bug: see the log). Nothing
    /// renews or rotates any more; restart the service.
    Failed,
}

impl Health {
    /// Whether the credentials can be used: serving, or degraded but still valid.
    pub fn can_serve(self) -> bool {
        matches!(self, Self::Serving | Self::Degraded)
    }
}

/// Durations as seconds (`1.5`) in the status JSON.
mod secs {
    use std::time::Duration;

    pub(super) fn one<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}

/// Connections of one generation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct GenerationStatus {
    /// The generation.
    pub generation: Generation,
    /// Its lease id (not in the health JSON: an endpoint anyone may read need not list
    /// them).
    #[serde(skip)]
    pub lease_id: String,
    /// Open connections.
    pub connections: usize,
    /// Whether it is retired (draining, lease revoked once drained).
    pub retiring: bool,
}

/// A snapshot of the engine, for health endpoints and logs. Holds no secret; serializes
/// to the JSON the axum health handler shows (durations in seconds).
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct Status {
    /// What is leased: "database role app", "KV secret secret/redis/main".
    pub source: String,
    /// Serving, degraded, expired, closed or failed.
    pub health: Health,
    /// The current generation.
    pub generation: Generation,
    /// The current lease id (not in the health JSON).
    #[serde(skip)]
    pub lease_id: String,
    /// Time until the current lease ends (`None`: it never does).
    #[serde(serialize_with = "secs::opt")]
    pub ttl_remaining: Option<Duration>,
    /// Whether the current lease is renewable.
    pub renewable: bool,
    /// The current and retiring generations with their connections.
    pub generations: Vec<GenerationStatus>,
    /// The last failure, if the engine has not succeeded since.
    pub last_error: Option<String>,
    /// Rotations so far.
    pub rotations: u64,
    /// Successful renewals so far.
    pub renewals: u64,
    /// Checks of a polled source so far: a KV secret's version, or a lease looked up
    /// (`DatabaseRole::check_lease_every`).
    pub polls: u64,
    /// Failed renewal or rotation attempts so far.
    pub failures: u64,
    /// Leases revoked so far.
    pub revocations: u64,
    /// Revocations Vault refused (HTTP 403: the token's policy has no revoke; HTTP 404:
    /// the revoke path is not there), so far. Refused leases are left to expire by their
    /// TTL.
    pub revocations_refused: u64,
    /// Why the last revocation was refused, and what to fix (the policy, the namespace).
    /// It stays: a policy without revoke is a lasting condition, not a passing failure.
    pub revoke_refused: Option<String>,
    /// How long the last rotation took, by phase.
    pub last_rotation: Option<RotationTiming>,
}

/// The phases of one rotation, from the decision to "new generation serving".
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RotationTiming {
    /// Issuing new credentials in Vault (which creates the database user).
    #[serde(serialize_with = "secs::one")]
    pub issue: Duration,
    /// Verifying them (one real connection).
    #[serde(serialize_with = "secs::one")]
    pub verify: Duration,
    /// Pre-warming: opening connections with them before the swap (zero without).
    #[serde(serialize_with = "secs::one")]
    pub warm: Duration,
    /// How many connections the pre-warm opened.
    pub warmed: usize,
    /// Swapping them in and notifying subscribers.
    #[serde(serialize_with = "secs::one")]
    pub swap: Duration,
    /// All of it.
    #[serde(serialize_with = "secs::one")]
    pub total: Duration,
}
