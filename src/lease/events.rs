//! Lease events: what happened to an engine's leases, as a stream an application can act
//! on ([`Engine::events`](super::Engine::events)) — reload something on a rotation, alert
//! on failures, count revocations.

use std::time::Duration;

use crate::credentials::Generation;
use crate::error::ErrorKind;

pub use super::issue::Reason as RotationReason;

/// How many events a slow receiver may fall behind before it misses some (it is told:
/// `RecvError::Lagged(n)`).
pub(super) const EVENTS_KEPT: usize = 256;

/// Something that happened to an engine's leases. Never holds a secret (no password, no
/// token); a [`Failed`](Self::Failed) message may name a lease id or a user name, as the
/// logs do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseEvent {
    /// New credentials serve: generation `to` replaced `from`, for `reason`; the new
    /// lease lasts `ttl` (zero: no lease, a KV secret).
    Rotated {
        /// The generation that served before.
        from: Generation,
        /// The generation that serves now.
        to: Generation,
        /// Why.
        reason: RotationReason,
        /// The new lease's TTL.
        ttl: Duration,
    },
    /// The serving lease was renewed: it now lasts `ttl`.
    Renewed {
        /// The serving generation.
        generation: Generation,
        /// The lease's TTL after the renewal.
        ttl: Duration,
    },
    /// A retired generation's lease was revoked (its user dropped).
    Revoked {
        /// The retired generation.
        generation: Generation,
        /// Whether all its connections had been returned (else its deadline came first).
        drained: bool,
    },
    /// An attempt at the lease failed (a renewal, a rotation, a poll); it is retried with
    /// backoff. `failures` in a row so far.
    Failed {
        /// What failed: "renewing the lease", "rotating credentials", …
        what: String,
        /// The error's kind.
        kind: ErrorKind,
        /// The error's message (never a secret).
        message: String,
        /// Failures in a row.
        failures: u32,
    },
    /// The serving lease has ended and no new credentials could be obtained yet: new
    /// connections fail until they are.
    Expired {
        /// The generation whose lease ended.
        generation: Generation,
    },
}
