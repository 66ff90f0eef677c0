//! The issue path: issuing new credentials and verifying them ([`issue_verified`], also
//! used for the first credentials), making sure no issued lease is left behind when a
//! step is cut ([`InFlight`], [`Unclaimed`], [`revoke_until_end`]), and [`rotate`]: issue,
//! verify, pre-warm, swap, and hand the old generation to the drain.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::drain::{Retiring, drain_deadline};
use super::policy::Policy;
use super::source::Source;
use super::worker::{ServingLease, WorkerState, now, step_limit};
use super::{Current, EngineState, Prepare, RotationTiming, Verifier};
use crate::backoff::Backoff;
use crate::credentials::{Credentials, Generation, Lease, Leased};
use crate::error::{Error, ErrorKind, Result};

/// Why a rotation happened (the reason of a [`LeaseEvent::Rotated`](super::LeaseEvent)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// The schedule's: the lease cannot be renewed further (or has ended).
    Schedule,
    /// [`Engine::rotate`](super::Engine::rotate).
    Forced,
    /// A login with the serving credentials was refused.
    AuthFailure,
    /// The lease is gone in Vault (expired, or revoked from outside).
    LeaseLost,
    /// A polled source holds new credentials.
    SourceChanged,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Schedule => "scheduled (lease cannot be renewed further)",
            Self::Forced => "forced",
            Self::AuthFailure => "authentication failure reported",
            Self::LeaseLost => "lease lost (expired or revoked in Vault)",
            Self::SourceChanged => {
                "the source changed (a new KV version, or the lease gone in Vault)"
            }
        })
    }
}

/// The wait before issuing again after the database could not be reached to verify new
/// credentials: 5 s, doubling up to 30 s between two rotations that cannot reach it.
const UNREACHABLE: Backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(30));
/// The wait before issuing again after the database refused newly issued credentials (a
/// replica that has not caught up: seconds; `password_encryption` or `pg_hba` changed:
/// until someone fixes it): 5 s, doubling up to 5 minutes. The serving credentials still
/// work meanwhile, and the last try before their lease's end is kept.
const REFUSED: Backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(300));
/// How long replacing a lost lease waits after a refused new user, at most.
const LOST_AFTER_REFUSAL: Duration = Duration::from_secs(5);
/// After this long without another such failure, the backoff starts again from the
/// beginning.
const UNREACHABLE_FORGET: Duration = Duration::from_secs(300);

/// Rotations in a row whose new credentials could not be verified — the database did not
/// answer, refused TLS, or refused the new user — and when the next one may issue again.
#[derive(Default)]
pub(super) struct Unreachable {
    /// Such rotations in a row.
    pub(super) in_a_row: u32,
    /// No new user is issued before this (except the last try before the lease's end).
    pub(super) until: Option<Instant>,
    /// The last failure was a refusal of the new user (not the database unreachable),
    /// at this time.
    refused_at: Option<Instant>,
}

impl Unreachable {
    /// Whether replacing a lost lease waits for the database now. After a refused new
    /// user it waits at most [`LOST_AFTER_REFUSAL`]: the serving credentials are gone,
    /// and the refusal (a replica behind) may be over — the long backoff is for
    /// scheduled rotations, whose credentials still work.
    pub(super) fn waiting(&self) -> bool {
        let until = match self.refused_at {
            Some(at) => self.until.map(|t| t.min(at + LOST_AFTER_REFUSAL)),
            None => self.until,
        };
        until.is_some_and(|t| now() < t)
    }

    /// One more rotation could not verify its new credentials: back off issuing (5 s
    /// doubling to 30 s when the database could not be reached, to 5 minutes when it
    /// refused the new user; an episode over 5 minutes old starts again from 5 s).
    fn failed(&mut self, refused: bool) {
        if self.until.is_some_and(|t| now() > t + UNREACHABLE_FORGET) {
            self.in_a_row = 0; // an old episode: start again from 5 s
        }
        self.in_a_row = self.in_a_row.saturating_add(1);
        let backoff = if refused { REFUSED } else { UNREACHABLE };
        self.refused_at = refused.then(now);
        let wait = backoff.delay(self.in_a_row);
        self.until = Some(now() + wait);
    }
}

/// New credentials, verified, and how long that took.
pub(super) struct Issued {
    /// The credentials with their lease.
    pub(super) leased: Leased<Credentials>,
    /// How long issuing took.
    pub(super) issuing: Duration,
    /// How long verifying took.
    pub(super) verifying: Duration,
}

/// Issue credentials and, if a verifier is set, check them; revoke them if the check
/// fails. Returns how long issuing and verifying took.
///
/// `held` are the ids of the leases the engine holds (serving and retiring): an answer
/// with one of them is not new credentials (a cache in front of Vault handed it back)
/// and is an error here — never verified, never revoked, never swapped in.
pub(super) async fn issue_verified(
    source: &Arc<dyn Source>,
    verify: Option<&Verifier>,
    verify_timeout: Duration,
    what: &str,
    held: &[&str],
) -> Result<Issued> {
    let started = now();
    // Issued in a task of its own: if this future is dropped while Vault is still
    // answering, the answer is awaited anyway and its lease revoked (Vault has created
    // the user by then), instead of leaving the user behind until its TTL.
    let mut in_flight = InFlight {
        source: source.clone(),
        handle: Some(tokio::spawn({
            let source = source.clone();
            async move { source.issue().await }
        })),
        held: held.iter().map(|id| (*id).to_owned()).collect(),
    };
    let leased = in_flight.answer(what).await?;
    // A secret without a lease (KV: the same version read again) is the caller's to
    // judge; a lease this engine holds is never new.
    let id = leased.lease.id.as_str();
    if !id.is_empty() && !leased.lease.duration.is_zero() && held.contains(&id) {
        return Err(Error::new(
            ErrorKind::CredentialsUnavailable,
            format!(
                "issuing credentials of {what}: Vault's answer is lease {id}, which this pool \
                 already holds — a cache in front of Vault (a Vault Proxy or Agent with \
                 `cache {{}}`) hands back the credentials it issued first instead of new ones; \
                 they serve until their end, and rotation resumes when new ones come. Run the \
                 Proxy without `cache` for dynamic credentials (README: Running on Kubernetes)"
            ),
        ));
    }
    let issued = now();
    // Until verified and handed over, these credentials are ours alone: if this future is
    // dropped midway (a caller's timeout around `build()`), revoke them in the background
    // instead of leaving a database user behind until its TTL.
    let mut unclaimed = Unclaimed {
        source: source.clone(),
        lease: Some(leased.lease.clone()),
    };
    let verified = match verify {
        None => Ok(()),
        // A server that accepts connections but never answers the login must not hold
        // the engine: the check has a deadline of its own.
        Some(verify) => {
            match tokio::time::timeout(verify_timeout, verify(leased.value.clone())).await {
                Ok(result) => result,
                Err(_) => Err(Error::new(
                    ErrorKind::Backend,
                    format!(
                        "the verifying connection as {} did not log in and answer within \
                     {verify_timeout:?}; is the database accepting logins?",
                        leased.value.username
                    ),
                )),
            }
        }
    };
    if let Err(e) = verified {
        // Debug: the error goes back to the caller (build's, or the worker's, whose
        // warnings are throttled); a warning here would repeat on every retry.
        tracing::debug!(source = what, lease_id = %leased.lease.id, "new credentials failed verification: {e}");
        // Nobody will use them: revoke now (briefly); if that fails or this future is
        // dropped meanwhile, `unclaimed` retries in the background.
        if let Ok(Ok(())) =
            tokio::time::timeout(UNUSED_REVOKE_WAIT, source.revoke(&leased.lease)).await
        {
            unclaimed.lease = None;
        }
        return Err(e.context(format!("verifying new credentials of {what}")));
    }
    unclaimed.lease = None; // handed over
    Ok(Issued {
        leased,
        issuing: issued - started,
        verifying: now() - issued,
    })
}

/// How long a failed verification waits for the revocation of the unused credentials
/// before leaving it to the background.
const UNUSED_REVOKE_WAIT: Duration = Duration::from_secs(5);

/// An issue request under way; if dropped before its answer was taken, the answer is
/// awaited in the background and its lease revoked.
struct InFlight {
    source: Arc<dyn Source>,
    handle: Option<tokio::task::JoinHandle<Result<Leased<Credentials>>>>,
    /// Leases the engine holds: an abandoned answer with one of them (a cache handing
    /// back the serving lease) is not ours to revoke.
    held: Vec<String>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let source = self.source.clone();
        let held = std::mem::take(&mut self.held);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut handle = handle;
                match tokio::time::timeout(ABANDONED_ISSUE_WAIT, &mut handle).await {
                    Ok(Ok(Ok(leased))) if held.contains(&leased.lease.id) => {}
                    Ok(Ok(Ok(leased))) => revoke_until_end(source, leased.lease).await,
                    Ok(_) => {}
                    Err(_) => handle.abort(), // never answered: nothing to revoke
                }
            });
        }
    }
}

impl InFlight {
    /// Wait for the answer and take it (the guard is then disarmed).
    async fn answer(&mut self, what: &str) -> Result<Leased<Credentials>> {
        let failed = |why: String| {
            Error::new(
                ErrorKind::CredentialsUnavailable,
                format!("issuing credentials of {what}: {why}"),
            )
        };
        let Some(handle) = self.handle.as_mut() else {
            return Err(failed("no request under way".into()));
        };
        // Vault's calls are bounded by the client's own budget; a custom provider's by its
        // wrapper (`CheckedProvider`).
        let joined = handle.await;
        self.handle = None;
        joined.map_err(|e| failed(format!("the request task failed ({e})")))?
    }
}

/// Credentials issued but not (yet) handed over: revoked in the background if dropped.
struct Unclaimed {
    source: Arc<dyn Source>,
    lease: Option<Lease>,
}

impl Drop for Unclaimed {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(revoke_until_end(self.source.clone(), lease));
            }
            Err(_) => tracing::warn!(
                lease_id = %lease.id,
                "unused credentials could not be revoked (no async runtime); they expire by TTL"
            ),
        }
    }
}

/// How long an abandoned issue request is still awaited (to revoke what it returns).
const ABANDONED_ISSUE_WAIT: Duration = Duration::from_secs(300);
/// A lease without an end is not tried for ever.
const MAX_REVOKE_ATTEMPTS_WITHOUT_END: u32 = 20;

/// Revoke a lease nobody uses, retrying with backoff (250 ms doubling to 5 s) until it
/// succeeds, is refused for good (403), the lease has ended anyway, or (for a lease with
/// no end) 20 attempts failed.
async fn revoke_until_end(source: Arc<dyn Source>, lease: Lease) {
    let retry = Policy::default();
    let mut attempts = 0;
    loop {
        match source.revoke(&lease).await {
            Ok(()) => {
                tracing::debug!(lease_id = %lease.id, "revoked unused credentials");
                return;
            }
            Err(e) => {
                attempts += 1;
                let over = !e.is_transient()
                    || match lease.expires_at() {
                        Some(end) => now() >= end,
                        None => attempts >= MAX_REVOKE_ATTEMPTS_WITHOUT_END,
                    };
                if over {
                    tracing::warn!(lease_id = %lease.id, attempts, "unused credentials not revoked; they expire by TTL: {e}");
                    return;
                }
                tracing::debug!(lease_id = %lease.id, attempts, "revoking unused credentials failed, retrying: {e}");
                tokio::time::sleep(retry.retry_delay(attempts, fastrand::f64())).await;
            }
        }
    }
}

/// Rotate: issue and verify new credentials, pre-warm (while the old ones serve), swap
/// them in as the next generation, and hand the old generation to the drain.
pub(super) async fn rotate(
    shared: &EngineState,
    state: &mut WorkerState,
    reason: Reason,
) -> Result<Generation> {
    let started = now();
    // What is left of the step this rotation runs in (a token refresh or revocations
    // may have come first in it): a pre-warm must leave the swap time within it.
    let limit = state.step_ends.map_or_else(
        || step_limit(shared),
        |end| end.saturating_duration_since(started),
    );
    // The token before the issue: if it is replaced meanwhile (an Agent, a Proxy), the
    // lease may be the old token's, whose end is then known; the newer one could be
    // taken for it and its end missed.
    let issuing_token = shared.source.issuing_token();
    let issued = issue_for_rotation(shared, state, reason).await?;
    let old = shared.current.load_full();
    // The serving lease's real end: its own, or its issuing token's if sooner.
    let old_end = state.lease_state(&old.lease, shared.source.as_ref()).end();
    if !old.lease.id.is_empty()
        && issued.leased.lease.id == old.lease.id
        && issued.leased.lease.duration.is_zero()
    {
        // The same secret again (a KV read served by a standby that lags behind the
        // metadata it answered): nothing new to swap in; the next poll tries again.
        tracing::debug!(lease_id = %old.lease.id, "issued the serving credentials again; no rotation");
        return Ok(old.generation);
    }
    let Issued {
        leased,
        issuing,
        verifying,
    } = issued;
    // From here until the swap the new lease is ours alone: if this future is dropped
    // (close, the step's limit), revoke it instead of leaving its user behind.
    let mut unclaimed = Unclaimed {
        source: shared.source.clone(),
        lease: Some(leased.lease.clone()),
    };
    let (warm, warmed) = prewarm(shared, reason, &leased, old_end, started, limit).await;
    let generation = Generation(old.generation.0 + 1);
    let new = Current {
        generation,
        credentials: leased.value,
        lease: leased.lease,
        connections: Arc::new(AtomicUsize::new(0)),
    };
    let new_lease_id = new.lease.id.clone();
    let new_full_ttl = new.lease.duration;
    let swap_started = now();
    swap(shared, &old, new, &mut unclaimed);
    let now = now();
    let timing = RotationTiming {
        issue: issuing,
        verify: verifying,
        warm,
        warmed,
        swap: now - swap_started,
        total: now - started,
    };
    let deadline = drain_deadline(shared, &old.lease, now);
    state.drain.retiring.push(Retiring::new(
        &old,
        deadline,
        state.serving.issuing_token.clone(),
        now,
    ));
    // No token before (none yet, or just invalidated): the one that issued it.
    state.serving = ServingLease::new(
        new_full_ttl,
        issuing_token.or_else(|| shared.source.issuing_token()),
    );
    state.succeeded(shared);
    {
        let mut stats = shared.stats();
        stats.rotations += 1;
        stats.last_rotation = Some(timing);
    }
    metrics::counter!("vaultpool_rotations_total", "role" => shared.label.clone()).increment(1);
    for (phase, took) in [
        ("issue", timing.issue),
        ("verify", timing.verify),
        ("warm", timing.warm),
        ("swap", timing.swap),
    ] {
        metrics::histogram!("vaultpool_rotation_phase_seconds", "role" => shared.label.clone(), "phase" => phase)
            .record(took.as_secs_f64());
    }
    shared.emit(super::LeaseEvent::Rotated {
        from: old.generation,
        to: generation,
        reason,
        ttl: new_full_ttl,
    });
    tracing::info!(
        reason = %reason,
        old_generation = old.generation.0,
        generation = generation.0,
        lease_id = %new_lease_id,
        ttl_s = new_full_ttl.as_secs(),
        took_ms = (now - started).as_millis() as u64,
        "rotated credentials"
    );
    Ok(generation)
}

/// Issue and verify the rotation's new credentials. A failure counts as the lease's; one
/// of verifying them (the database unreachable, refusing TLS or the new user) backs off
/// issuing.
async fn issue_for_rotation(
    shared: &EngineState,
    state: &mut WorkerState,
    reason: Reason,
) -> Result<Issued> {
    let serving = shared.current.load_full();
    let held: Vec<&str> = if shared.source.issues_unique_leases() {
        std::iter::once(serving.lease.id.as_str())
            .chain(state.drain.retiring.iter().map(Retiring::lease_id))
            .collect()
    } else {
        Vec::new()
    };
    let issued = issue_verified(
        &shared.source,
        shared.settings.verify.as_ref(),
        shared.settings.verify_timeout,
        &shared.source_name,
        &held,
    )
    .await
    .map_err(|e| {
        e.context(format!(
            "rotating credentials of {} ({reason})",
            shared.source_name
        ))
    });
    match issued {
        Ok(issued) => {
            state.unreachable = Unreachable::default();
            Ok(issued)
        }
        Err(e) => {
            state.failed(shared, "rotating credentials", &e);
            match e.kind() {
                // Verification failed: the database unreachable, hung, failing the check,
                // or refusing TLS (an expired server certificate lasts): back off issuing
                // (5 s doubling to 30 s) instead of creating and dropping a user per retry.
                ErrorKind::Backend | ErrorKind::Tls => state.unreachable.failed(false),
                // The database refused the user Vault just created (a replica behind,
                // password_encryption changed): the same, up to 5 minutes apart.
                ErrorKind::AuthenticationFailed => state.unreachable.failed(true),
                _ => {}
            }
            Err(e)
        }
    }
}

/// Pre-warm: connections with the new credentials, opened while the old ones serve —
/// only when they do (a scheduled or forced rotation; after a refused login, a lost
/// lease or a changed secret the old generation may not work, and the swap must not
/// wait) — bounded so that the swap comes well before the old lease's end (`old_end`:
/// its issuing token's end if sooner) and within what is left of the step (`limit`,
/// from `started`). Returns how long it took and how many it opened.
async fn prewarm(
    shared: &EngineState,
    reason: Reason,
    leased: &Leased<Credentials>,
    old_end: Option<Instant>,
    started: Instant,
    limit: Duration,
) -> (Duration, usize) {
    let serving = matches!(reason, Reason::Schedule | Reason::Forced);
    match &shared.settings.prewarm {
        Some(prewarm) if serving => {
            let at = now();
            let mut bound = shared
                .settings
                .verify_timeout
                .min(limit.saturating_sub(at - started) / 2);
            if let Some(end) = old_end {
                bound = bound.min(end.saturating_duration_since(at) / 2);
            }
            let n = if bound.is_zero() {
                0
            } else {
                let prepare = Prepare {
                    lease_id: leased.lease.id.clone(),
                    credentials: leased.value.clone(),
                };
                tokio::time::timeout(bound, prewarm(prepare))
                    .await
                    .unwrap_or(0)
            };
            (now() - at, n)
        }
        _ => (Duration::ZERO, 0),
    }
}

/// Swap `new` in for `old`: list the old generation as retiring, serve the new one (its
/// lease no longer unclaimed), and tell subscribers.
fn swap(shared: &EngineState, old: &Current, new: Current, unclaimed: &mut Unclaimed) {
    let generation = new.generation;
    // Listed as retiring before anyone hears of the new generation: an adapter that
    // follows the swap can ask `is_retiring` at once.
    shared.stats().retiring.push((
        old.generation,
        old.lease.id.clone(),
        old.connections.clone(),
    ));
    shared.current.store(Arc::new(new));
    unclaimed.lease = None; // serving now
    shared.generation.store(generation.0, Ordering::Release);
    shared.generation_tx.send_replace(generation);
}
