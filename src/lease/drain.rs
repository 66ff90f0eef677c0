//! The drain path: retired generations wait for their connections to come back (or for
//! their deadline), then their leases are revoked ([`retire`]); a forced rotation lets
//! the previous generation finish first ([`settle`]); [`close`](super::Engine::close)
//! drains and revokes everything ([`shutdown`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::worker::{STEP_MAX, noteworthy, now};
use super::{Current, EngineState, Stats};
use crate::backoff::Backoff;
use crate::credentials::{Generation, Lease};
use crate::error::{Error, ErrorKind};

/// How often retiring generations are checked for being drained, in their first
/// [`DRAIN_FAST_FOR`] (most drain within it)…
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// …and after that (a generation may drain for as long as its lease lasts).
const DRAIN_POLL_SLOW: Duration = Duration::from_secs(1);
/// How long a retired generation is checked at the fast pace.
const DRAIN_FAST_FOR: Duration = Duration::from_secs(5);
/// How long `close()` waits for connections in use when no drain timeout is set: 20 s,
/// so that the revocations after it fit in Kubernetes' default grace period (30 s from
/// SIGTERM to SIGKILL).
const CLOSE_WAIT: Duration = Duration::from_secs(20);
/// How long `close()` tries again a revoke that failed, and how often.
const CLOSE_REVOKE_RETRY: Duration = Duration::from_secs(5);
const CLOSE_REVOKE_PAUSE: Duration = Duration::from_millis(250);
/// The wait before retrying a retired lease's revoke that failed (Vault down, sealed,
/// failing): 1 s, doubling up to 5 minutes (jittered), for as long as the lease lasts —
/// a lease without an end is retried at that pace until it is revoked or the pool closes.
const REVOKE_RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));

/// The retired generations, draining until their leases are revoked.
#[derive(Default)]
pub(super) struct Drain {
    /// Retired generations not yet revoked, oldest first.
    pub(super) retiring: Vec<Retiring>,
    /// A refused revocation was logged as a warning already.
    revoke_refusal_logged: bool,
}

/// A retired generation: its lease, its open connections, and when it is revoked.
pub(super) struct Retiring {
    generation: Generation,
    lease: Lease,
    connections: Arc<AtomicUsize>,
    /// When it is revoked even if connections remain; `None`: only once drained.
    deadline: Option<Instant>,
    /// The Vault token that issued its lease: Vault revokes the lease when that token
    /// ends, so the drain ends before then (see [`deadline`](Self::deadline)).
    issuing_token: Option<String>,
    /// When it was retired.
    since: Instant,
    attempts: u32,
    next_attempt: Instant,
}

impl Retiring {
    /// The id of the retiring lease.
    pub(super) fn lease_id(&self) -> &str {
        &self.lease.id
    }

    /// `current`'s generation, retired at `now`, revoked at `deadline` at the latest (and
    /// before the end of `issuing_token`, once known).
    pub(super) fn new(
        current: &Current,
        deadline: Option<Instant>,
        issuing_token: Option<String>,
        now: Instant,
    ) -> Self {
        Self {
            generation: current.generation,
            lease: current.lease.clone(),
            connections: current.connections.clone(),
            deadline,
            issuing_token,
            since: now,
            attempts: 0,
            next_attempt: now,
        }
    }

    /// When its lease is revoked even if connections remain: its own deadline, or before
    /// the end of the token that issued it if that comes first (Vault revokes the lease
    /// with its token, ending the sessions without warning). The token's end may become
    /// known after the retirement (the token replaced later), so this is asked anew.
    fn deadline(&self, shared: &EngineState) -> Option<Instant> {
        let by_token = self
            .issuing_token
            .as_deref()
            .and_then(|a| shared.source.token_end(a))
            .map(|end| {
                let left = end.saturating_duration_since(self.since);
                end - shared.settings.policy.min_margin.min(left / 2)
            });
        match (self.deadline, by_token) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Revoking its lease failed (not refused): retried later with backoff (1 s doubling
    /// to 5 minutes), warned about at the 1st, 2nd, 4th, 8th… failure. Returns whether
    /// it is given up: the lease has ended anyway (Vault revoked it itself). A 400 is
    /// retried too: Vault answers 400 "failed to revoke entry" when the database could
    /// not drop the user (unreachable, `tuple concurrently updated`).
    fn revoke_failed(&mut self, shared: &EngineState, e: &Error, now: Instant) -> bool {
        self.attempts = self.attempts.saturating_add(1);
        self.next_attempt = now + REVOKE_RETRY.delay_jittered(self.attempts, fastrand::f64());
        let ended = self.lease.expires_at().is_some_and(|end| now >= end);
        let then = if ended {
            "; its lease has ended, so Vault has revoked it itself"
        } else {
            "; retrying with backoff (up to 5 minutes apart)"
        };
        if noteworthy(self.attempts) || ended {
            tracing::warn!(
                generation = self.generation.0,
                lease_id = %self.lease.id,
                attempts = self.attempts,
                "revoking retired lease failed{then}: {e}"
            );
        } else {
            tracing::debug!(
                generation = self.generation.0,
                lease_id = %self.lease.id,
                attempts = self.attempts,
                "revoking retired lease failed again: {e}"
            );
        }
        shared.stats().last_error = Some(e.to_string());
        ended
    }
}

impl Drain {
    /// When the worker should look at the retiring generations next, if there are any.
    pub(super) fn next_check(&self, now: Instant) -> Option<Instant> {
        if self.retiring.is_empty() {
            return None;
        }
        let young = self.retiring.iter().any(|r| now < r.since + DRAIN_FAST_FOR);
        Some(now + if young { DRAIN_POLL } else { DRAIN_POLL_SLOW })
    }

    /// Drop retired generation `i` from the list and from the status; `count` updates the
    /// counters in the same lock (a status snapshot sees both or neither).
    fn forget(&mut self, shared: &EngineState, i: usize, count: impl FnOnce(&mut Stats)) {
        let generation = self.retiring.remove(i).generation;
        let mut stats = shared.stats();
        count(&mut stats);
        stats.retiring.retain(|(g, _, _)| *g != generation);
    }
}

/// When a retired generation's lease is revoked even if connections remain: its end less
/// a small margin (revocation ends its sessions, and Vault revokes it at its end anyway),
/// or sooner with an explicit drain timeout. `None`: a lease without end and no timeout —
/// revoked once drained.
pub(super) fn drain_deadline(shared: &EngineState, lease: &Lease, now: Instant) -> Option<Instant> {
    let by_lease = lease.expires_at().map(|end| {
        let left = end.saturating_duration_since(now);
        end - shared.settings.policy.min_margin.min(left / 2)
    });
    let by_timeout = shared
        .settings
        .drain_timeout
        .and_then(|t| now.checked_add(t));
    match (by_lease, by_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Revoke retired generations that are drained or past their deadline. With `all`, wait
/// for nothing — neither connections nor the retry backoff of a revoke that failed: the
/// caller decided the time is up.
pub(super) async fn retire(shared: &EngineState, drain: &mut Drain, all: bool) {
    let now = now();
    let mut i = 0;
    while i < drain.retiring.len() {
        let r = &mut drain.retiring[i];
        let drained = r.connections.load(Ordering::Acquire) == 0;
        let past_deadline = r.deadline(shared).is_some_and(|d| now >= d);
        let due = all || ((drained || past_deadline) && now >= r.next_attempt);
        if !due {
            i += 1;
            continue;
        }
        if !all && r.lease.id == shared.current.load().lease.id {
            // A source that reused the serving lease's id: revoking it would end the
            // credentials in use. Left to expire (on close, everything is revoked).
            tracing::warn!(lease_id = %r.lease.id, "not revoking a retired lease with the serving lease's id");
            drain.forget(shared, i, |_| {});
            continue;
        }
        match shared.source.revoke(&r.lease).await {
            Ok(()) => {
                tracing::info!(
                    generation = r.generation.0,
                    lease_id = %r.lease.id,
                    drained,
                    "revoked retired lease"
                );
                metrics::counter!("vaultpool_revocations_total", "role" => shared.label.clone())
                    .increment(1);
                shared.emit(super::LeaseEvent::Revoked {
                    generation: r.generation,
                    drained,
                });
                drain.forget(shared, i, |stats| stats.revocations += 1);
            }
            Err(e) if matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::NotFound) => {
                // The token's policy has no revoke (403), or the revoke path is not there
                // (404: Vault answers 204 for a lease it no longer knows, so this is a
                // namespace, a path prefix or something in front of Vault): lasting, so not
                // retried. The lease is left to expire by its TTL; the operator is told
                // once, and in status().
                let why = if e.kind() == ErrorKind::NotFound {
                    format!(
                        "revoking the lease of generation {} failed: the revoke path is not \
                         there (HTTP {}; Vault answers a revoke of a lease it no longer knows \
                         with 204) — check the namespace and what is in front of Vault; retired \
                         leases are left to expire by their TTL",
                        r.generation.0,
                        e.vault_status().unwrap_or(404)
                    )
                } else {
                    format!(
                        "revoking the lease of generation {} was refused by Vault (HTTP {}): \
                         the token's policy does not allow it; retired leases are left to \
                         expire by their TTL. Grant the token `update` on sys/leases/revoke/\
                         <mount>/creds/<role>/* (see the README's policy)",
                        r.generation.0,
                        e.vault_status().unwrap_or(403)
                    )
                };
                if drain.revoke_refusal_logged {
                    tracing::debug!(lease_id = %r.lease.id, "{why}");
                } else {
                    tracing::warn!(lease_id = %r.lease.id, "{why}");
                    drain.revoke_refusal_logged = true;
                }
                drain.forget(shared, i, |stats| {
                    stats.revocations_refused += 1;
                    stats.revoke_refused = Some(why);
                });
            }
            Err(e) => {
                // Kept (even by close(), which tries again for a while; see `shutdown`)
                // unless the lease has ended anyway.
                if r.revoke_failed(shared, &e, now) {
                    drain.forget(shared, i, |_| {});
                } else {
                    i += 1;
                }
            }
        }
    }
}

/// Revoke retired generations as they drain, for at most `max`.
pub(super) async fn settle(shared: &EngineState, drain: &mut Drain, max: Duration) {
    let until = now() + max;
    loop {
        retire(shared, drain, false).await;
        if drain.retiring.is_empty() || now() >= until {
            return;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// On close: wait for connections of every generation to be returned (up to the drain
/// timeout), then revoke everything.
pub(super) async fn shutdown(shared: &EngineState, drain: &mut Drain) {
    let current = shared.current.load_full();
    let wait = shared.settings.drain_timeout.unwrap_or(CLOSE_WAIT);
    let retired_at = now();
    let deadline = retired_at.checked_add(wait);
    drain
        .retiring
        .push(Retiring::new(&current, deadline, None, retired_at));
    let deadline = deadline.unwrap_or_else(|| now() + CLOSE_WAIT);
    while now() < deadline
        && drain
            .retiring
            .iter()
            .any(|r| r.connections.load(Ordering::Acquire) > 0)
    {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    // A revoke that fails right at close is tried again for a while: Vault answers 400
    // when the database cannot drop the user yet — a session that just ended still
    // cleaning up its temporary objects, say — and a moment later it can.
    let revoke_all = async {
        let until = now() + CLOSE_REVOKE_RETRY;
        loop {
            retire(shared, drain, true).await;
            if drain.retiring.is_empty() || now() >= until {
                return;
            }
            tokio::time::sleep(CLOSE_REVOKE_PAUSE).await;
        }
    };
    let finished = tokio::time::timeout(STEP_MAX, revoke_all).await.is_ok();
    if !drain.retiring.is_empty() {
        tracing::warn!(
            left = drain.retiring.len(),
            "closing: {} the leases left expire by their TTL",
            if finished {
                format!("revoking failed for {CLOSE_REVOKE_RETRY:?};")
            } else {
                format!("revoking did not finish within {STEP_MAX:?};")
            }
        );
        while !drain.retiring.is_empty() {
            drain.forget(shared, 0, |_| {});
        }
        return;
    }
    tracing::info!("lease worker closed; leases revoked");
}
