//! The background task: follows the [`policy`](super::policy) schedule, renews, rotates,
//! drains and revokes. It holds only a `Weak` to the shared state and stops when the last
//! handle is dropped or on [`close`](super::Engine::close).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::policy::{self, Action, LeaseState, Policy};
use super::source::Source;
use super::{Command, Current, Reason, Shared, Verifier};
use crate::backoff::Backoff;
use crate::credentials::{Credentials, Generation, Lease, Leased};
use crate::error::{Error, ErrorKind, Result};

/// How often retiring generations are checked for being drained, in their first
/// [`DRAIN_FAST_FOR`] (most drain within it)…
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// …and after that (a generation may drain for as long as its lease lasts).
const DRAIN_POLL_SLOW: Duration = Duration::from_secs(1);
const DRAIN_FAST_FOR: Duration = Duration::from_secs(5);
/// How long a forced rotation waits for a still-draining generation before going ahead.
const FORCED_ROTATION_SETTLE: Duration = Duration::from_secs(1);
/// The wait before issuing again after the database could not be reached to verify new
/// credentials: 5 s, doubling up to 30 s between two rotations that cannot reach it.
const UNREACHABLE: Backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(30));
/// After this long without another such failure, the backoff starts again from the
/// beginning.
const UNREACHABLE_FORGET: Duration = Duration::from_secs(300);
/// The longest such wait once the lease has ended (nothing left to protect; come back
/// soon once the database can be reached again).
const UNREACHABLE_EXPIRED: Duration = Duration::from_secs(5);

/// The wait before retrying a failed re-lease after a refused login: 1 s, doubling up to
/// 60 s between two attempts.
const AUTH_RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
/// How long `close()` waits for connections in use when no drain timeout is set.
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// The longest one step of the worker (a renewal, a rotation, a revocation round, a token
/// refresh) may take before it is cut, so that nothing holds the worker for long.
const STEP_MAX: Duration = Duration::from_secs(30);
/// The shortest limit a step gets, even when the lease is about to end (or has ended).
const STEP_MIN: Duration = Duration::from_secs(5);

/// How long the next step may take: while the lease is valid, not past its end (a step
/// that cannot finish before then must not delay the next try), within
/// STEP_MIN..STEP_MAX; once it has ended, STEP_MAX (a slow Vault must still be able to
/// answer).
fn step_limit(shared: &Shared) -> Duration {
    match shared.current.load().lease.remaining_at(now()) {
        Some(left) if !left.is_zero() => left.saturating_sub(LAST_TRY).clamp(STEP_MIN, STEP_MAX),
        _ => STEP_MAX,
    }
}

/// How long before the lease's end the last step must be done.
const LAST_TRY: Duration = Duration::from_millis(200);

/// Why a step did not finish.
enum Cut {
    /// `close()` was called: stop, then shut down.
    Closed,
    /// It ran past its limit.
    TimedOut(Duration),
}

/// Run one step of the worker, cut at `close()` or after `limit`.
async fn bounded<T>(
    cancel: &CancellationToken,
    limit: Duration,
    step: impl std::future::Future<Output = T>,
) -> std::result::Result<T, Cut> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(Cut::Closed),
        r = tokio::time::timeout(limit, step) => r.map_err(|_| Cut::TimedOut(limit)),
    }
}

impl Cut {
    fn error(&self, shared: &Shared, what: &str) -> Error {
        match self {
            Self::Closed => Error::new(
                ErrorKind::Shutdown,
                format!("{what} for {}: closed", shared.source_name),
            ),
            Self::TimedOut(limit) => Error::new(
                ErrorKind::Transport,
                format!(
                    "{what} for {} did not finish within {limit:?} (Vault or the database \
                     hangs?); cut, retrying with backoff",
                    shared.source_name
                ),
            ),
        }
    }
}

/// Whether the `n`th failure in a row is logged as a warning (1, 2, 4, 8, …); the others
/// go to debug, so a long outage writes a handful of lines, not one per attempt.
fn noteworthy(n: u32) -> bool {
    n.is_power_of_two()
}

/// Now, on tokio's clock (so `tokio::time::pause` drives the schedule in tests).
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The worker's own bookkeeping of the current lease.
pub(crate) struct Book {
    full_ttl: Duration,
    capped: bool,
    /// Not renewed since it was issued (its first renewal is spread wider).
    fresh: bool,
    /// The jitter sample for the current lease's next renewal: drawn once per issue and
    /// renewal, so re-planning (after every wake) does not draw again and pull the
    /// renewal early.
    jitter: f64,
    /// The jitter of the next retry's delay, drawn at each failure.
    retry_jitter: f64,
    failures: u32,
    last_failure: Option<Instant>,
    issuing_token: Option<String>,
    retiring: Vec<Retiring>,
    next_poll: Option<Instant>,
    /// Token refreshes failed in a row (the lease's own failures are `failures`).
    token_failures: u32,
    /// A refused revocation was logged as a warning already.
    revoke_refusal_logged: bool,
    /// A re-lease after a refused login that failed: retried at this time while the
    /// generation is still serving and its lease valid.
    auth_retry: Option<(Generation, Instant)>,
    /// Re-lease attempts in a row for the same refusal.
    auth_attempts: u32,
    /// Rotations in a row whose new credentials could not be verified because the
    /// database did not answer (not a refusal), and when the next one may issue again.
    unreachable: u32,
    unreachable_until: Option<Instant>,
}

struct Retiring {
    generation: Generation,
    lease: Lease,
    connections: Arc<AtomicUsize>,
    /// When it is revoked even if connections remain; `None`: only once drained.
    deadline: Option<Instant>,
    /// When it was retired.
    since: Instant,
    attempts: u32,
    next_attempt: Instant,
}

impl Book {
    pub(crate) fn new(lease: &Lease, issuing_token: Option<String>) -> Self {
        Self {
            full_ttl: lease.duration,
            capped: false,
            fresh: true,
            jitter: policy::spread_sample(),
            retry_jitter: 0.5,
            failures: 0,
            last_failure: None,
            issuing_token,
            retiring: Vec::new(),
            next_poll: None,
            token_failures: 0,
            revoke_refusal_logged: false,
            auth_retry: None,
            auth_attempts: 0,
            unreachable: 0,
            unreachable_until: None,
        }
    }

    fn state(&self, lease: &Lease, source: &dyn Source) -> LeaseState {
        LeaseState {
            renewed_at: lease.issued_at,
            ttl: lease.duration,
            full_ttl: self.full_ttl,
            renewable: lease.renewable,
            capped: self.capped,
            fresh: self.fresh,
            hard_end: self
                .issuing_token
                .as_deref()
                .and_then(|a| source.token_end(a)),
            failures: self.failures,
            last_failure: self.last_failure,
        }
    }

    fn failed(&mut self, shared: &Shared, what: &str, e: &crate::Error) {
        self.failures = self.failures.saturating_add(1);
        self.last_failure = Some(now());
        // Each retry backs off with a jitter of its own (engines that failed together
        // do not retry in step).
        self.retry_jitter = fastrand::f64();
        let mut stats = shared.stats();
        stats.failures += 1;
        stats.degraded = true;
        stats.last_error = Some(e.to_string());
        drop(stats);
        metrics::counter!("vaultpool_lease_failures_total", "role" => shared.label.clone())
            .increment(1);
        if noteworthy(self.failures) {
            tracing::warn!(
                source = %shared.label,
                failures = self.failures,
                "{what} failed, will retry with backoff: {e}"
            );
        } else {
            tracing::debug!(source = %shared.label, failures = self.failures, "{what} failed again: {e}");
        }
    }

    /// The Vault token could not be refreshed; the client retries with backoff.
    fn token_failed(&mut self, shared: &Shared, e: &crate::Error) {
        self.token_failures = self.token_failures.saturating_add(1);
        let mut stats = shared.stats();
        stats.degraded = true;
        stats.last_error = Some(e.to_string());
        drop(stats);
        if noteworthy(self.token_failures) {
            tracing::warn!(
                failures = self.token_failures,
                "refreshing the Vault token failed, will retry with backoff: {e}"
            );
        } else {
            tracing::debug!(
                failures = self.token_failures,
                "refreshing the Vault token failed again: {e}"
            );
        }
    }

    fn token_refreshed(&mut self, shared: &Shared) {
        if self.token_failures > 0 {
            tracing::info!(
                after = self.token_failures,
                "refreshed the Vault token after failures"
            );
            self.token_failures = 0;
            if self.failures == 0 {
                let mut stats = shared.stats();
                stats.degraded = false;
                stats.last_error = None;
            }
        }
    }

    fn succeeded(&mut self, shared: &Shared) {
        self.failures = 0;
        self.last_failure = None;
        let mut stats = shared.stats();
        stats.degraded = false;
        stats.last_error = None;
    }
}

/// Issue credentials and, if a verifier is set, check them; revoke them if the check
/// fails. Returns how long issuing and verifying took.
pub(crate) async fn issue_verified(
    source: &Arc<dyn Source>,
    verify: Option<&Verifier>,
    verify_timeout: Duration,
    what: &str,
) -> Result<(Leased<Credentials>, Duration, Duration)> {
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
    };
    let leased = in_flight.answer(what).await?;
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
        tracing::warn!(source = what, lease_id = %leased.lease.id, "new credentials failed verification: {e}");
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
    Ok((leased, issued - started, now() - issued))
}

/// How long a failed verification waits for the revocation of the unused credentials
/// before leaving it to the background.
const UNUSED_REVOKE_WAIT: Duration = Duration::from_secs(5);

/// An issue request under way; if dropped before its answer was taken, the answer is
/// awaited in the background and its lease revoked.
struct InFlight {
    source: Arc<dyn Source>,
    handle: Option<tokio::task::JoinHandle<Result<Leased<Credentials>>>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let source = self.source.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut handle = handle;
                match tokio::time::timeout(ABANDONED_ISSUE_WAIT, &mut handle).await {
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

pub(crate) async fn run(
    weak: Weak<Shared>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    cancel: CancellationToken,
    mut book: Book,
) {
    let role = match weak.upgrade() {
        Some(s) => s.label.clone(),
        None => return,
    };
    let span = tracing::info_span!("vaultpool_lease", source = %role);
    // However the task ends — closed, every handle dropped, or a panic — the engine
    // learns it has no worker any more.
    let _alive = AliveGuard(weak.clone());
    async move {
        loop {
            let Some(shared) = weak.upgrade() else {
                tracing::debug!("all handles dropped; lease worker stops (leases expire by TTL)");
                return;
            };
            let now = now();
            let current = shared.current.load_full();
            let mut plan = policy::plan(
                &shared.policy,
                &book.state(&current.lease, shared.source.as_ref()),
                now,
                if book.failures > 0 {
                    book.retry_jitter
                } else {
                    book.jitter
                },
            );
            // The database cannot be reached from here: issuing a user only to drop it
            // again helps nobody; the next rotation waits for the backoff.
            if let (Some(p), Some(until)) = (plan.as_mut(), book.unreachable_until) {
                match p.action {
                    // Never past the last try before the lease's end.
                    Action::Rotate => {
                        let end = book.state(&current.lease, shared.source.as_ref()).end();
                        let last_try = end.map_or(until, |e| {
                            e - policy::LAST_TRY_BEFORE_END.min(e.saturating_duration_since(now))
                        });
                        p.at = p.at.max(until.min(last_try));
                    }
                    // Expired already: nothing to protect, but come back soon once the
                    // database is reachable again.
                    Action::Expired => p.at = p.at.max(until.min(now + UNREACHABLE_EXPIRED)),
                    Action::Renew => {}
                }
            }
            publish_ttl(&shared, &current, now);
            let mut wake = plan.map(|p| p.at);
            if !book.retiring.is_empty() {
                let young = book.retiring.iter().any(|r| now < r.since + DRAIN_FAST_FOR);
                let at = now + if young { DRAIN_POLL } else { DRAIN_POLL_SLOW };
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
            if let Some(t) = shared.source.token_refresh_at() {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
            let poll_at = shared.source.poll_delay().map(|every| {
                *book.next_poll.get_or_insert_with(|| {
                    // +0..10% jitter for a source that knows when its credentials change
                    // (never early), ±10% otherwise; at most a day (checked at build).
                    let jitter = if shared.source.polls_when_due() {
                        1.0 + 0.1 * fastrand::f64()
                    } else {
                        0.9 + 0.2 * fastrand::f64()
                    };
                    now + every.mul_f64(jitter)
                })
            });
            if let Some(t) = poll_at {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
            if let Some((_, t)) = book.auth_retry {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
            drop((shared, current));
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.max(now).into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    if let Some(shared) = weak.upgrade() {
                        shutdown(&shared, &mut book).await;
                    }
                    return;
                }
                cmd = commands.recv() => {
                    let (Some(cmd), Some(shared)) = (cmd, weak.upgrade()) else { return };
                    let limit = step_limit(&shared);
                    match cmd {
                        Command::Rotate(reply) => {
                            // Right after another rotation: let the previous generation
                            // finish draining first (briefly), so at most two generations'
                            // users exist at once.
                            let work = async {
                                settle(&shared, &mut book, FORCED_ROTATION_SETTLE).await;
                                rotate(&shared, &mut book, Reason::Forced).await
                            };
                            let result = match bounded(&cancel, limit, work).await {
                                Ok(result) => result,
                                Err(cut) => {
                                    let e = cut.error(&shared, "a forced rotation");
                                    if let Cut::TimedOut(_) = cut {
                                        book.failed(&shared, "rotating credentials", &e);
                                    }
                                    Err(e)
                                }
                            };
                            let _ = reply.send(result);
                        }
                        Command::AuthFailure(generation) => {
                            let work = re_lease(&shared, &mut book, generation);
                            if let Err(cut @ Cut::TimedOut(_)) = bounded(&cancel, limit, work).await {
                                // Retried at the time `re_lease` set before trying.
                                let e = cut.error(&shared, "re-leasing after a refused login");
                                book.failed(&shared, "re-leasing", &e);
                            }
                        }
                        Command::Check(reply) => {
                            book.next_poll = None;
                            let result = match bounded(&cancel, limit, check(&shared, &mut book)).await {
                                Ok(result) => result,
                                Err(cut) => {
                                    let e = cut.error(&shared, "checking for a new version");
                                    let kv = shared.current.load().lease.duration.is_zero();
                                    if let (Cut::TimedOut(_), true) = (&cut, kv) {
                                        book.failed(&shared, "checking for a new version", &e);
                                    }
                                    Err(e)
                                }
                            };
                            let _ = reply.send(result);
                        }
                    }
                }
                _ = sleep => {
                    let Some(shared) = weak.upgrade() else { return };
                    let limit = step_limit(&shared);
                    let work = due_work(&shared, &mut book, plan, poll_at);
                    if let Err(cut @ Cut::TimedOut(_)) = bounded(&cancel, limit, work).await {
                        let e = cut.error(&shared, "the scheduled work");
                        book.failed(&shared, "the scheduled work", &e);
                    }
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// What is due when the worker wakes: token refresh, revocations, a re-lease retry, a
/// poll, the schedule's renewal or rotation — in that order.
async fn due_work(
    shared: &Shared,
    book: &mut Book,
    plan: Option<policy::Plan>,
    poll_at: Option<Instant>,
) {
    let now = now();
    if book.token_failures > 0 && !shared.source.token_failing() {
        // Refreshed by another caller of the same client meanwhile.
        book.token_refreshed(shared);
    }
    if shared.source.token_refresh_at().is_some_and(|t| now >= t) {
        match shared.source.refresh_token().await {
            Ok(()) => book.token_refreshed(shared),
            Err(e) => book.token_failed(shared, &e),
        }
    }
    // Revoke what has drained before creating anything new.
    retire(shared, book, false).await;
    if let Some((generation, at)) = book.auth_retry
        && now >= at
    {
        re_lease(shared, book, generation).await;
    }
    // The schedule first. When it renewed or rotated, the poll waits: that proved (or
    // replaced) the lease, and the loop plans again before anything else is issued.
    if let Some(plan) = plan.filter(|p| now >= p.at) {
        match plan.action {
            Action::Renew => renew(shared, book).await,
            Action::Rotate | Action::Expired => {
                let _ = rotate(shared, book, Reason::Schedule).await;
            }
        }
        book.next_poll = None;
    } else if poll_at.is_some_and(|t| now >= t) {
        book.next_poll = None;
        let _ = check(shared, book).await;
    }
    retire(shared, book, false).await;
}

/// Replace `generation` after the backend refused its credentials. A failed attempt is
/// retried with backoff for as long as that generation serves and its lease is valid
/// (after its end, the schedule's own retries take over).
async fn re_lease(shared: &Shared, book: &mut Book, generation: Generation) {
    let current = shared.current.load_full();
    if current.generation != generation || current.expired_at(now()) {
        book.auth_retry = None;
        book.auth_attempts = 0;
        return;
    }
    // Scheduled before trying, so that a try cut by its step limit is retried too. The
    // attempts have their own count (a successful renewal in between must not reset the
    // backoff) and their own cap: a database that refuses every login must not make the
    // engine issue a new user every few seconds.
    book.auth_attempts = book.auth_attempts.saturating_add(1);
    let delay = AUTH_RETRY.delay(book.auth_attempts);
    book.auth_retry = Some((generation, now() + delay));
    match rotate(shared, book, Reason::AuthFailure).await {
        Ok(_) => {
            book.auth_retry = None;
            book.auth_attempts = 0;
        }
        Err(e) if e.kind() == ErrorKind::AuthenticationFailed => {
            // The new credentials were refused as well: the database refuses logins for
            // another reason (pg_hba, password encryption); re-leasing cannot help.
            tracing::warn!(
                generation = generation.0,
                "re-leasing after a refused login stopped: the new credentials were refused \
                 too ({e}); the schedule keeps rotating as usual"
            );
            book.auth_retry = None;
        }
        Err(_) => {}
    }
}

/// Ask a polled source whether it holds other credentials, and rotate to them if so.
async fn check(shared: &Shared, book: &mut Book) -> Result<bool> {
    if shared.source.poll_interval().is_none() {
        return Ok(false); // nothing to poll: leave the book and the status alone
    }
    let current = shared.current.load_full();
    // A KV secret is polled for new versions; a leased secret is looked up in case it
    // was revoked from outside. A lookup only adds to what renewals say: its failures do
    // not move the schedule (that would renew or rotate early on every Vault blip).
    let leased = !current.lease.duration.is_zero();
    let changed = shared.source.changed(&current.lease).await;
    shared.stats().polls += 1;
    match changed {
        Ok(true) if leased => {
            if book.unreachable_until.is_some_and(|t| now() < t) {
                // The database could not be reached at the last try: no new user yet; the
                // schedule's next rotation or the next lookup tries again.
                return Ok(false);
            }
            rotate(shared, book, Reason::LeaseLost)
                .await
                .map(|g| g != current.generation)
        }
        Ok(true) => rotate(shared, book, Reason::SourceChanged)
            .await
            .map(|g| g != current.generation),
        Ok(false) => {
            // A poll that works again clears a KV source's failures.
            if book.failures > 0 && !leased {
                book.succeeded(shared);
            }
            Ok(false)
        }
        Err(e) => {
            let e = e.context(format!("checking {}", shared.source_name));
            if leased {
                tracing::debug!("looking the lease up failed: {e}");
                shared.stats().last_error = Some(e.to_string());
            } else {
                book.failed(shared, "checking for a new version", &e);
            }
            Err(e)
        }
    }
}

/// Marks the engine's worker as gone when dropped (a panic unwinds through it too).
struct AliveGuard(Weak<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        // Only a panic is "unexpected": a worker dropped with its runtime (a service
        // exiting without close()) leaves valid credentials valid.
        if std::thread::panicking()
            && let Some(shared) = self.0.upgrade()
        {
            shared.worker_alive.store(false, Ordering::Release);
            tracing::error!(
                source = %shared.label,
                "the lease worker panicked; credentials are no longer renewed"
            );
        }
    }
}

fn publish_ttl(shared: &Shared, current: &Current, now: Instant) {
    if let Some(left) = current.lease.remaining_at(now) {
        metrics::gauge!("vaultpool_lease_seconds_remaining", "role" => shared.label.clone())
            .set(left.as_secs_f64());
    }
}

async fn renew(shared: &Shared, book: &mut Book) {
    let current = shared.current.load_full();
    match shared.source.renew(&current.lease, book.full_ttl).await {
        Ok(lease) => {
            // A renewal that does not move the end (a source whose renew gives the same
            // lease back) counts as capped: rotate before the end instead of renewing again.
            let old_end = current.lease.expires_at();
            let new_end = lease.expires_at();
            book.capped = lease.duration < book.full_ttl || new_end <= old_end;
            book.fresh = false;
            book.jitter = fastrand::f64();
            book.succeeded(shared);
            shared.stats().renewals += 1;
            metrics::counter!("vaultpool_renewals_total", "role" => shared.label.clone())
                .increment(1);
            tracing::debug!(
                generation = current.generation.0,
                lease_id = %lease.id,
                ttl_s = lease.duration.as_secs(),
                capped = book.capped,
                "renewed lease"
            );
            shared.current.store(Arc::new(Current {
                generation: current.generation,
                credentials: current.credentials.clone(),
                lease: Lease {
                    id: current.lease.id.clone(),
                    ..lease
                },
                connections: current.connections.clone(),
            }));
        }
        Err(e) if matches!(e.kind(), ErrorKind::LeaseExpired | ErrorKind::NotFound) => {
            tracing::warn!(lease_id = %current.lease.id, "lease is gone in Vault: {e}");
            if book.unreachable_until.is_some_and(|t| now() < t) {
                // The database could not be reached at the last try: no new user yet.
                book.failed(
                    shared,
                    "replacing a lost lease (waiting for the database)",
                    &e,
                );
            } else {
                let _ = rotate(shared, book, Reason::LeaseLost).await;
            }
        }
        Err(e) => book.failed(shared, "renewing the lease", &e),
    }
}

async fn rotate(shared: &Shared, book: &mut Book, reason: Reason) -> Result<Generation> {
    let started = now();
    // The limit the caller's step runs under (the same computation): a pre-warm must
    // leave the swap time within it.
    let limit = step_limit(shared);
    // The token before the issue: if it is replaced meanwhile (an Agent, a Proxy), the
    // lease may be the old token's, whose end is then known; the newer one could be
    // taken for it and its end missed.
    let issuing_token = shared.source.issuing_token();
    let issued = issue_verified(
        &shared.source,
        shared.verify.as_ref(),
        shared.verify_timeout,
        &shared.source_name,
    )
    .await
    .map_err(|e| {
        e.context(format!(
            "rotating credentials of {} ({reason})",
            shared.source_name
        ))
    });
    let (leased, issue_took, verify_took) = match issued {
        Ok(l) => l,
        Err(e) => {
            book.failed(shared, "rotating credentials", &e);
            if matches!(e.kind(), ErrorKind::Backend | ErrorKind::Tls) {
                // Verification failed for another reason than a refused login (the
                // database unreachable, hung, failing the check, or refusing TLS — an
                // expired server certificate lasts): back off issuing
                // (5 s doubling to 30 s) instead of creating and dropping a user per retry.
                if book
                    .unreachable_until
                    .is_some_and(|t| now() > t + UNREACHABLE_FORGET)
                {
                    book.unreachable = 0; // an old episode: start again from 5 s
                }
                book.unreachable = book.unreachable.saturating_add(1);
                let wait = UNREACHABLE.delay(book.unreachable);
                book.unreachable_until = Some(now() + wait);
            }
            return Err(e);
        }
    };
    book.unreachable = 0;
    book.unreachable_until = None;
    let old = shared.current.load_full();
    if !old.lease.id.is_empty()
        && leased.lease.id == old.lease.id
        && leased.lease.duration.is_zero()
    {
        // The same secret again (a KV read served by a standby that lags behind the
        // metadata it answered): nothing new to swap in; the next poll tries again.
        tracing::debug!(lease_id = %old.lease.id, "issued the serving credentials again; no rotation");
        return Ok(old.generation);
    }
    // From here until the swap the new lease is ours alone: if this future is dropped
    // (close, the step's limit), revoke it instead of leaving its user behind.
    let mut unclaimed = Unclaimed {
        source: shared.source.clone(),
        lease: Some(leased.lease.clone()),
    };
    // Pre-warm: connections with the new credentials, opened while the old ones serve —
    // only when they do (a scheduled or forced rotation; after a refused login, a lost
    // lease or a changed secret the old generation may not work, and the swap must not
    // wait) — bounded so that the swap comes well before the old lease's end and within
    // the step's limit.
    let serving = matches!(reason, Reason::Schedule | Reason::Forced);
    let (warm, warmed) = match &shared.prewarm {
        Some(prewarm) if serving => {
            let at = self::now();
            let mut bound = shared
                .verify_timeout
                .min(limit.saturating_sub(at - started) / 2);
            if let Some(end) = old.lease.expires_at() {
                bound = bound.min(end.saturating_duration_since(at) / 2);
            }
            let n = if bound.is_zero() {
                0
            } else {
                let prepare = super::Prepare {
                    lease_id: leased.lease.id.clone(),
                    credentials: leased.value.clone(),
                };
                tokio::time::timeout(bound, prewarm(prepare))
                    .await
                    .unwrap_or(0)
            };
            (self::now() - at, n)
        }
        _ => (Duration::ZERO, 0),
    };
    let generation = Generation(old.generation.0 + 1);
    let new = Current {
        generation,
        credentials: leased.value,
        lease: leased.lease,
        connections: Arc::new(AtomicUsize::new(0)),
    };
    let new_lease_id = new.lease.id.clone();
    let new_full_ttl = new.lease.duration;
    let swap_started = self::now();
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
    let now = now();
    let timing = super::RotationTiming {
        issue: issue_took,
        verify: verify_took,
        warm,
        warmed,
        swap: now - swap_started,
        total: now - started,
    };
    let deadline = drain_deadline(shared, &old.lease, now);
    book.retiring.push(Retiring {
        generation: old.generation,
        lease: old.lease.clone(),
        connections: old.connections.clone(),
        deadline,
        since: now,
        attempts: 0,
        next_attempt: now,
    });
    book.full_ttl = new_full_ttl;
    book.capped = false;
    book.fresh = true;
    book.jitter = policy::spread_sample();
    // No token before (none yet, or just invalidated): the one that issued it.
    book.issuing_token = issuing_token.or_else(|| shared.source.issuing_token());
    book.succeeded(shared);
    {
        let mut stats = shared.stats();
        stats.rotations += 1;
        stats.last_rotation = Some(timing);
    }
    metrics::counter!("vaultpool_rotations_total", "role" => shared.label.clone()).increment(1);
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

/// When a retired generation's lease is revoked even if connections remain: its end less
/// a small margin (revocation ends its sessions, and Vault revokes it at its end anyway),
/// or sooner with an explicit drain timeout. `None`: a lease without end and no timeout —
/// revoked once drained.
fn drain_deadline(shared: &Shared, lease: &Lease, now: Instant) -> Option<Instant> {
    let by_lease = lease.expires_at().map(|end| {
        let left = end.saturating_duration_since(now);
        end - shared.policy.min_margin.min(left / 2)
    });
    let by_timeout = shared.drain_timeout.and_then(|t| now.checked_add(t));
    match (by_lease, by_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Revoke retired generations that are drained or past their deadline. With `all`, wait
/// for nothing: the caller decided the time is up.
async fn retire(shared: &Shared, book: &mut Book, all: bool) {
    let now = now();
    let mut i = 0;
    while i < book.retiring.len() {
        let r = &mut book.retiring[i];
        let drained = r.connections.load(Ordering::Acquire) == 0;
        let due = (all || drained || r.deadline.is_some_and(|d| now >= d)) && now >= r.next_attempt;
        if !due {
            i += 1;
            continue;
        }
        if !all && r.lease.id == shared.current.load().lease.id {
            // A source that reused the serving lease's id: revoking it would end the
            // credentials in use. Left to expire (on close, everything is revoked).
            tracing::warn!(lease_id = %r.lease.id, "not revoking a retired lease with the serving lease's id");
            let generation = r.generation;
            book.retiring.remove(i);
            shared.stats().retiring.retain(|(g, _, _)| *g != generation);
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
                let generation = r.generation;
                book.retiring.remove(i);
                let mut stats = shared.stats();
                stats.revocations += 1;
                stats.retiring.retain(|(g, _, _)| *g != generation);
            }
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                // The token's policy has no revoke: lasting, so not retried. The lease is
                // left to expire by its TTL; the operator is told once, and in status().
                let why = format!(
                    "revoking the lease of generation {} was refused by Vault (HTTP {}): the \
                     token's policy does not allow it; retired leases are left to expire by \
                     their TTL. Grant the token `update` on sys/leases/revoke/<mount>/creds/\
                     <role>/* (see the README's policy)",
                    r.generation.0,
                    e.vault_status().unwrap_or(403)
                );
                if book.revoke_refusal_logged {
                    tracing::debug!(lease_id = %r.lease.id, "{why}");
                } else {
                    tracing::warn!(lease_id = %r.lease.id, "{why}");
                    book.revoke_refusal_logged = true;
                }
                let generation = r.generation;
                book.retiring.remove(i);
                let mut stats = shared.stats();
                stats.revocations_refused += 1;
                stats.revoke_refused = Some(why);
                stats.retiring.retain(|(g, _, _)| *g != generation);
            }
            Err(e) => {
                r.attempts += 1;
                r.next_attempt = now + shared.policy.retry_delay(r.attempts, fastrand::f64());
                let gone = r.lease.expires_at().is_some_and(|end| now >= end);
                tracing::warn!(
                    generation = r.generation.0,
                    lease_id = %r.lease.id,
                    attempts = r.attempts,
                    "revoking retired lease failed{}: {e}",
                    if gone { "; it has expired, Vault revokes it itself" } else { "" }
                );
                shared.stats().last_error = Some(e.to_string());
                if gone || all {
                    let generation = r.generation;
                    book.retiring.remove(i);
                    shared.stats().retiring.retain(|(g, _, _)| *g != generation);
                } else {
                    i += 1;
                }
            }
        }
    }
}

/// Revoke retired generations as they drain, for at most `max`.
async fn settle(shared: &Shared, book: &mut Book, max: Duration) {
    let until = now() + max;
    loop {
        retire(shared, book, false).await;
        if book.retiring.is_empty() || now() >= until {
            return;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// On close: wait for connections of every generation to be returned (up to the drain
/// timeout), then revoke everything.
async fn shutdown(shared: &Shared, book: &mut Book) {
    let current = shared.current.load_full();
    let wait = shared.drain_timeout.unwrap_or(CLOSE_WAIT);
    let deadline = now().checked_add(wait);
    book.retiring.push(Retiring {
        generation: current.generation,
        lease: current.lease.clone(),
        connections: current.connections.clone(),
        deadline,
        since: now(),
        attempts: 0,
        next_attempt: now(),
    });
    let deadline = deadline.unwrap_or_else(|| now() + CLOSE_WAIT);
    while now() < deadline
        && book
            .retiring
            .iter()
            .any(|r| r.connections.load(Ordering::Acquire) > 0)
    {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    if tokio::time::timeout(STEP_MAX, retire(shared, book, true))
        .await
        .is_err()
    {
        tracing::warn!(
            left = book.retiring.len(),
            "closing: revoking the leases did not finish within {STEP_MAX:?}; the rest expire by TTL"
        );
        return;
    }
    tracing::info!("lease worker closed; leases revoked");
}

#[cfg(test)]
mod tests {
    use super::super::{Engine, Policy, start};
    use super::*;
    use crate::error::Error;
    use std::sync::Mutex;

    /// An in-memory source on tokio's clock: counts calls, fails on demand.
    #[derive(Default)]
    struct Fake {
        ttl: Duration,
        max_ttl: Duration,
        issued: Mutex<Vec<(String, Instant)>>,
        renewals: AtomicUsize,
        revoked: Mutex<Vec<String>>,
        down: std::sync::atomic::AtomicBool,
        /// Panic in renew (a bug in a source), to see the engine notice its dead worker.
        panic_on_renew: std::sync::atomic::AtomicBool,
        /// Look the lease up this often (a database role's lease check).
        lease_check: Option<Duration>,
        /// The lookup says the lease is gone / fails.
        gone: std::sync::atomic::AtomicBool,
        lookup_fails: std::sync::atomic::AtomicBool,
        lookups: AtomicUsize,
    }

    impl Fake {
        fn unavailable(&self) -> Result<()> {
            if self.down.load(Ordering::SeqCst) {
                Err(Error::new(ErrorKind::Transport, "fake vault is down"))
            } else {
                Ok(())
            }
        }
    }

    impl Source for Arc<Fake> {
        fn issue(&self) -> super::super::BoxFuture<'_, Result<Leased<Credentials>>> {
            Box::pin(async move {
                self.unavailable()?;
                let mut issued = self.issued.lock().unwrap();
                let id = format!("fake/{}", issued.len() + 1);
                issued.push((id.clone(), now()));
                let mut lease = Lease::new(id, self.ttl, true);
                lease.issued_at = now();
                Ok(Leased::new(Credentials::new("u", "p".to_string()), lease))
            })
        }
        fn renew<'a>(
            &'a self,
            lease: &'a Lease,
            increment: Duration,
        ) -> super::super::BoxFuture<'a, Result<Lease>> {
            Box::pin(async move {
                self.unavailable()?;
                assert!(
                    !self.panic_on_renew.load(Ordering::SeqCst),
                    "fake source: renew panicked"
                );
                self.renewals.fetch_add(1, Ordering::SeqCst);
                let issued = self.issued.lock().unwrap();
                let born = issued.iter().find(|(id, _)| *id == lease.id).unwrap().1;
                let left = (born + self.max_ttl).saturating_duration_since(now());
                let mut l = Lease::new(lease.id.clone(), increment.min(left), true);
                l.issued_at = now();
                Ok(l)
            })
        }
        fn revoke<'a>(&'a self, lease: &'a Lease) -> super::super::BoxFuture<'a, Result<()>> {
            Box::pin(async move {
                self.unavailable()?;
                self.revoked.lock().unwrap().push(lease.id.clone());
                Ok(())
            })
        }
        fn poll_interval(&self) -> Option<Duration> {
            self.lease_check
        }
        fn changed<'a>(&'a self, _: &'a Lease) -> super::super::BoxFuture<'a, Result<bool>> {
            Box::pin(async move {
                self.lookups.fetch_add(1, Ordering::SeqCst);
                if self.lookup_fails.load(Ordering::SeqCst) {
                    return Err(Error::new(ErrorKind::Server, "fake lookup failed"));
                }
                Ok(self.gone.load(Ordering::SeqCst))
            })
        }
    }

    /// The default policy without the first renewal's spread: these tests reason about
    /// when a lease ends, and a first renewal anywhere from 1/15 of the TTL on would move
    /// it. (The spread has its own test.)
    fn steady() -> Policy {
        Policy {
            first_renewal_spread: 0.0,
            ..Policy::default()
        }
    }

    async fn engine(fake: &Arc<Fake>) -> Engine {
        start(
            ("fake role".into(), "fake-role".into()),
            Arc::new(fake.clone()),
            steady(),
            Some(Duration::from_secs(30)),
            (None, Duration::from_secs(10)),
            None,
        )
        .await
        .unwrap()
    }

    /// A pre-warm that never finishes: the engine bounds it and swaps anyway; a close
    /// during it revokes the new lease (it never served) and stops.
    #[tokio::test(start_paused = true)]
    async fn a_hung_prewarm_is_bounded_and_a_close_during_it_revokes_the_new_lease() {
        let fake = fake(600, 3600);
        let hung: super::super::Prewarm = Arc::new(|_| Box::pin(std::future::pending::<usize>()));
        let engine = start(
            ("fake role".into(), "fake-role".into()),
            Arc::new(fake.clone()),
            steady(),
            Some(Duration::from_secs(30)),
            (None, Duration::from_secs(10)),
            Some(hung),
        )
        .await
        .unwrap();
        // Forced: it pre-warms; the hang is cut at the verify timeout and the swap comes.
        let started = tokio::time::Instant::now();
        assert_eq!(engine.rotate().await.unwrap(), Generation(2));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_secs(11),
            "{took:?}"
        );
        let timing = engine.status().last_rotation.unwrap();
        assert_eq!(timing.warmed, 0);
        // A close while the next pre-warm hangs: the lease issued for it never served and
        // is revoked with the others.
        let rotating = tokio::spawn({
            let engine = engine.clone();
            async move { engine.rotate().await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let third = fake.issued.lock().unwrap().last().unwrap().0.clone();
        engine.close().await;
        let _ = rotating.await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            fake.revoked.lock().unwrap().contains(&third),
            "the lease issued for a cut rotation was left behind: {:?}",
            fake.revoked.lock().unwrap()
        );
    }

    fn fake(ttl: u64, max_ttl: u64) -> Arc<Fake> {
        Arc::new(Fake {
            ttl: Duration::from_secs(ttl),
            max_ttl: Duration::from_secs(max_ttl),
            ..Fake::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn renews_then_rotates_before_max_ttl_and_revokes_the_drained_old_lease() {
        let fake = fake(60, 300);
        let engine = engine(&fake).await;
        let guard = engine.current().track();
        // 10 simulated minutes.
        tokio::time::sleep(Duration::from_secs(600)).await;
        let issued = fake.issued.lock().unwrap().clone();
        assert!(
            issued.len() >= 2,
            "must rotate before the 300 s max TTL: {issued:?}"
        );
        // Each generation served until at most max_ttl - margin (5 s floor, 6 s = 10%).
        for pair in issued.windows(2) {
            let lifetime = pair[1].1 - pair[0].1;
            assert!(lifetime <= Duration::from_secs(295), "{lifetime:?}");
            assert!(lifetime >= Duration::from_secs(240), "{lifetime:?}");
        }
        assert!(fake.renewals.load(Ordering::SeqCst) >= 6);
        // Generation 1 still has a connection: not revoked before the drain deadline...
        let status = engine.status();
        assert!(status.rotations >= 2);
        // ...but the drain deadline (30 s) has passed long ago, so it was revoked.
        assert!(fake.revoked.lock().unwrap().contains(&"fake/1".to_string()));
        drop(guard);
        engine.close().await;
        let revoked = fake.revoked.lock().unwrap().clone();
        assert_eq!(
            revoked.len(),
            issued.len(),
            "close revokes every lease: {revoked:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn old_lease_waits_for_its_connections_then_is_revoked_at_once() {
        let fake = fake(600, 3600);
        let engine = engine(&fake).await;
        let guard = engine.current().track();
        assert_eq!(engine.rotate().await.unwrap(), Generation(2));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            fake.revoked.lock().unwrap().is_empty(),
            "revoked while in use"
        );
        assert_eq!(engine.status().generations[1].connections, 1);
        drop(guard);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*fake.revoked.lock().unwrap(), vec!["fake/1".to_string()]);
        engine.close().await;
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_serving_while_vault_is_down_and_heals_after_expiry() {
        let fake = fake(60, 3600);
        let engine = engine(&fake).await;
        fake.down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(50)).await;
        // Renewal at ~40 s failed; still valid.
        assert!(engine.usable().is_ok());
        assert_eq!(engine.status().health, super::super::Health::Degraded);
        tokio::time::sleep(Duration::from_secs(15)).await;
        let err = engine.usable().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::LeaseExpired);
        assert!(err.to_string().contains("fake role"), "{err}");
        fake.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(6)).await;
        let current = engine.usable().expect("healed once Vault is back");
        assert_eq!(current.generation, Generation(2));
        engine.close().await;
    }

    #[tokio::test(start_paused = true)]
    async fn auth_failures_are_coalesced_into_one_relase() {
        let fake = fake(600, 3600);
        let engine = engine(&fake).await;
        for _ in 0..10 {
            engine.report_auth_failure(Generation(1));
        }
        let g = engine
            .wait_newer(Generation(1), Duration::from_secs(5))
            .await;
        assert_eq!(g, Generation(2));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            fake.issued.lock().unwrap().len(),
            2,
            "one re-lease for ten reports"
        );
        engine.report_auth_failure(Generation(1)); // stale: ignored
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(fake.issued.lock().unwrap().len(), 2);
        engine.close().await;
        engine.close().await; // twice is harmless
        assert_eq!(
            engine.rotate().await.unwrap_err().kind(),
            ErrorKind::Shutdown
        );
    }

    #[tokio::test(start_paused = true)]
    async fn worker_stops_when_every_handle_is_dropped() {
        let fake = fake(60, 3600);
        let engine = engine(&fake).await;
        drop(engine);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(
            fake.renewals.load(Ordering::SeqCst),
            0,
            "worker kept running"
        );
        assert!(fake.revoked.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_dies_turns_health_to_failed_and_usable_says_so() {
        let fake = fake(60, 3600);
        fake.panic_on_renew.store(true, Ordering::SeqCst);
        let engine = engine(&fake).await;
        assert_eq!(engine.status().health, super::super::Health::Serving);
        // The renewal at ~36-40 s panics inside the worker.
        tokio::time::sleep(Duration::from_secs(45)).await;
        assert_eq!(engine.status().health, super::super::Health::Failed);
        let err = engine.usable().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::CredentialsUnavailable);
        assert!(err.to_string().contains("stopped unexpectedly"), "{err}");
        engine.close().await; // still harmless
        assert_eq!(engine.status().health, super::super::Health::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn leases_issued_together_renew_first_across_their_first_cycle() {
        // 20 engines issued at once, 600 s leases: before, all renewed within 360-400 s.
        let fake = fake(600, 3600);
        let mut engines = Vec::new();
        for _ in 0..20 {
            engines.push(
                start(
                    ("fake role".into(), "fake-role".into()),
                    Arc::new(fake.clone()),
                    Policy::default(),
                    None,
                    (None, Duration::from_secs(10)),
                    None,
                )
                .await
                .unwrap(),
            );
        }
        let renewed = || engines.iter().filter(|e| e.status().renewals > 0).count();
        tokio::time::sleep(Duration::from_secs(39)).await;
        assert_eq!(renewed(), 0, "renewed before 1/15 of the TTL");
        // Halfway through the window (40-400 s): about half of them.
        tokio::time::sleep(Duration::from_secs(181)).await;
        let half = renewed();
        assert!((3..=17).contains(&half), "{half} of 20 renewed by 220 s");
        tokio::time::sleep(Duration::from_secs(181)).await;
        assert_eq!(renewed(), 20, "a first renewal later than 2/3 of the TTL");
        for e in &engines {
            e.close().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_huge_drain_timeout_does_not_overflow() {
        let fake = fake(600, 3600);
        let engine = start(
            ("fake role".into(), "fake-role".into()),
            Arc::new(fake.clone()),
            steady(),
            Some(Duration::MAX),
            (None, Duration::from_secs(10)),
            None,
        )
        .await
        .unwrap();
        let guard = engine.current().track();
        assert_eq!(engine.rotate().await.unwrap(), Generation(2));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(fake.revoked.lock().unwrap().is_empty(), "revoked in use");
        drop(guard);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*fake.revoked.lock().unwrap(), vec!["fake/1".to_string()]);
        engine.close().await;
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_drain_timeout_a_busy_generation_drains_until_its_lease_nearly_ends() {
        let fake = fake(600, 3600);
        let engine = start(
            ("fake role".into(), "fake-role".into()),
            Arc::new(fake.clone()),
            steady(),
            None,
            (None, Duration::from_secs(10)),
            None,
        )
        .await
        .unwrap();
        let guard = engine.current().track();
        tokio::time::sleep(Duration::from_secs(100)).await;
        engine.rotate().await.unwrap(); // generation 1 has ~500 s left
        tokio::time::sleep(Duration::from_secs(480)).await;
        assert!(
            fake.revoked.lock().unwrap().is_empty(),
            "a connection in use was cut long before its lease's end"
        );
        // Revoked at its end less the margin (5 s), connection or not.
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(*fake.revoked.lock().unwrap(), vec!["fake/1".to_string()]);
        drop(guard);
        engine.close().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_re_lease_after_a_refused_login_is_retried_until_it_succeeds() {
        let fake = fake(600, 3600);
        let engine = engine(&fake).await;
        fake.down.store(true, Ordering::SeqCst);
        engine.report_auth_failure(Generation(1));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(engine.generation(), Generation(1), "Vault is down");
        fake.down.store(false, Ordering::SeqCst);
        // Retried with backoff (at most `retry_max`, 5 s), long before the renewal at
        // ~400 s: before, the one-shot latch left the refused credentials serving.
        let g = engine
            .wait_newer(Generation(1), Duration::from_secs(10))
            .await;
        assert_eq!(
            g,
            Generation(2),
            "the refused credentials are still serving"
        );
        engine.close().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_check_replaces_a_lease_gone_in_vault_and_its_failures_move_nothing() {
        let fake = Arc::new(Fake {
            ttl: Duration::from_secs(600),
            max_ttl: Duration::from_secs(3600),
            lease_check: Some(Duration::from_secs(10)),
            ..Fake::default()
        });
        let engine = engine(&fake).await;
        // Lookups failing for a minute: no renewal or rotation brought forward.
        fake.lookup_fails.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(fake.lookups.load(Ordering::SeqCst) >= 4);
        assert_eq!(fake.renewals.load(Ordering::SeqCst), 0, "renewed early");
        assert_eq!(
            engine.generation(),
            Generation(1),
            "rotated on a lookup blip"
        );
        assert_eq!(engine.status().health, super::super::Health::Serving);
        // The lease gone in Vault: replaced at the next lookup.
        fake.lookup_fails.store(false, Ordering::SeqCst);
        fake.gone.store(true, Ordering::SeqCst);
        let g = engine
            .wait_newer(Generation(1), Duration::from_secs(12))
            .await;
        assert_eq!(g, Generation(2));
        engine.close().await;
    }

    /// An engine whose verifier fails like an unreachable database while the flag is set.
    async fn engine_on_flaky_database(
        fake: &Arc<Fake>,
    ) -> (Engine, Arc<std::sync::atomic::AtomicBool>) {
        engine_failing_verify(fake, ErrorKind::Backend).await
    }

    /// An engine whose verifier fails with `kind` while the flag is set.
    async fn engine_failing_verify(
        fake: &Arc<Fake>,
        kind: ErrorKind,
    ) -> (Engine, Arc<std::sync::atomic::AtomicBool>) {
        let db_down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let verify: Verifier = {
            let db_down = db_down.clone();
            Arc::new(move |_| {
                let down = db_down.load(Ordering::SeqCst);
                Box::pin(async move {
                    if down {
                        Err(Error::new(
                            kind,
                            "fake database unreachable or refusing TLS",
                        ))
                    } else {
                        Ok(())
                    }
                })
            })
        };
        let engine = start(
            ("fake role".into(), "fake-role".into()),
            Arc::new(fake.clone()),
            steady(),
            Some(Duration::from_secs(30)),
            (Some(verify), Duration::from_secs(10)),
            None,
        )
        .await
        .unwrap();
        (engine, db_down)
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_waits_for_the_unreachable_backoff_before_issuing_again() {
        lost_lease_backs_off(ErrorKind::Backend).await;
    }

    /// A TLS failure that lasts (an expired server certificate, a CA changed on the
    /// server) backs off the same way: no user created and dropped per retry.
    #[tokio::test(start_paused = true)]
    async fn a_lasting_tls_failure_backs_off_like_an_unreachable_database() {
        lost_lease_backs_off(ErrorKind::Tls).await;
    }

    async fn lost_lease_backs_off(kind: ErrorKind) {
        // Looked up every 10 s, gone in Vault, and the database unreachable: each lookup
        // would issue (and drop) a user; the backoff (5 s doubling to 30 s) gates them.
        let fake = Arc::new(Fake {
            ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(3600),
            lease_check: Some(Duration::from_secs(10)),
            ..Fake::default()
        });
        let (engine, db_down) = engine_failing_verify(&fake, kind).await;
        db_down.store(true, Ordering::SeqCst);
        fake.gone.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(300)).await;
        let tries = fake.issued.lock().unwrap().len() - 1;
        let lookups = fake.lookups.load(Ordering::SeqCst);
        // One per lookup (20-30, jittered) without the gate; 5, 10, 20, 30, 30, ... s
        // apart with it.
        assert!(lookups >= 20, "{lookups} lookups");
        assert!(
            (5..=16).contains(&tries),
            "{tries} users issued in 300 s for {lookups} lookups"
        );
        db_down.store(false, Ordering::SeqCst);
        let g = engine
            .wait_newer(Generation(1), Duration::from_secs(45))
            .await;
        assert_eq!(g, Generation(2), "not replaced once the database was back");
        engine.close().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_old_unreachable_episode_is_forgotten_after_five_minutes() {
        let fake = Arc::new(Fake {
            ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(3600),
            lease_check: Some(Duration::from_secs(10)),
            ..Fake::default()
        });
        let (engine, db_down) = engine_on_flaky_database(&fake).await;
        db_down.store(true, Ordering::SeqCst);
        // Five forced rotations fail: the backoff is at its 30 s ceiling.
        for _ in 0..5 {
            assert!(engine.rotate().await.is_err());
        }
        // Ten quiet minutes (the lease has an hour), then the lease is lost.
        tokio::time::sleep(Duration::from_secs(600)).await;
        let before = fake.issued.lock().unwrap().len();
        fake.gone.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(25)).await;
        let tries = fake.issued.lock().unwrap().len() - before;
        // Forgotten: retried 5 s, then 10 s after the first try (2-3 tries in 25 s);
        // kept, the first failure waits 30 s (1 try).
        assert!(
            tries >= 2,
            "{tries} tries in 25 s: the old episode's backoff kept"
        );
        engine.close().await;
    }

    /// A provider that gives every lease the same id and leaves renewal to the default
    /// (the lease back unchanged): no hot loop of issues or renewals. Before, the same id
    /// made each rotation a no-op retried at once, and the unchanged renewal was due again
    /// at once (thousands a second).
    #[tokio::test(start_paused = true)]
    async fn a_careless_custom_provider_cannot_make_the_engine_spin() {
        #[derive(Default)]
        struct Careless {
            issued: AtomicUsize,
            renewed: AtomicUsize,
        }
        impl super::super::CredentialProvider for Careless {
            fn issue(&self) -> super::super::BoxFuture<'_, Result<Leased<Credentials>>> {
                self.issued.fetch_add(1, Ordering::SeqCst);
                Box::pin(async {
                    Ok(Leased::new(
                        Credentials::new("u", "p".to_string()),
                        Lease::new("always-the-same", Duration::from_secs(60), true),
                    ))
                })
            }
            fn renew<'a>(
                &'a self,
                lease: &'a Lease,
                _: Duration,
            ) -> super::super::BoxFuture<'a, Result<Lease>> {
                self.renewed.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move { Ok(lease.clone()) })
            }
        }
        let careless = Arc::new(Careless::default());
        let source = super::super::CredentialSource::custom("careless", careless.clone())
            .into_source(None)
            .unwrap();
        let engine = start(
            ("careless".into(), "careless".into()),
            source,
            steady(),
            Some(Duration::from_secs(30)),
            (None, Duration::from_secs(10)),
            None,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(300)).await;
        let (issued, renewed) = (
            careless.issued.load(Ordering::SeqCst),
            careless.renewed.load(Ordering::SeqCst),
        );
        // A 60 s lease rotated before its end: about one issue a minute.
        assert!((4..=12).contains(&issued), "{issued} issues in 300 s");
        assert!(renewed <= 12, "{renewed} renewals in 300 s");
        assert!(engine.generation().0 >= 4, "{:?}", engine.generation());
        assert_ne!(engine.status().health, super::super::Health::Expired);
        engine.close().await;
    }

    /// A provider's lease out of range is refused (and retried), never a panic.
    #[tokio::test(start_paused = true)]
    async fn a_custom_lease_out_of_range_is_an_error_not_a_panic() {
        struct Forever;
        impl super::super::CredentialProvider for Forever {
            fn issue(&self) -> super::super::BoxFuture<'_, Result<Leased<Credentials>>> {
                Box::pin(async {
                    Ok(Leased::new(
                        Credentials::new("u", "p".to_string()),
                        Lease::new("forever", Duration::MAX, true),
                    ))
                })
            }
        }
        let source = super::super::CredentialSource::custom("forever", Forever)
            .into_source(None)
            .unwrap();
        let err = start(
            ("forever".into(), "forever".into()),
            source,
            steady(),
            None,
            (None, Duration::from_secs(10)),
            None,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("10 years"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_database_backs_off_issuing_but_keeps_the_last_try_before_the_end() {
        // A 60 s lease that cannot be renewed past 60 s: rotation due at 54 s.
        let fake = fake(60, 60);
        let started = now();
        let (engine, db_down) = engine_on_flaky_database(&fake).await;
        db_down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(90)).await;
        let tries: Vec<f64> = fake.issued.lock().unwrap()[1..]
            .iter()
            .map(|(_, at)| (*at - started).as_secs_f64())
            .collect();
        // Backed off (a try per retry_max, 5 s, would be ~8 before the end and ~15
        // after), yet one last try just before the end at 60 s.
        assert!(tries.len() <= 10, "{} users issued: {tries:?}", tries.len());
        // The last try comes 100 ms before the end (backed off, the next would be at
        // 69 s, past it).
        assert!(
            tries.iter().any(|t| (59.5..60.0).contains(t)),
            "no last try just before the end: {tries:?}"
        );
        // After the end, at most 5 s apart: back soon once the database is.
        let after: Vec<f64> = tries.iter().copied().filter(|t| *t >= 60.0).collect();
        assert!(
            after.windows(2).all(|w| w[1] - w[0] <= 5.5),
            "tries after the end too far apart: {after:?}"
        );
        db_down.store(false, Ordering::SeqCst);
        let g = engine
            .wait_newer(Generation(1), Duration::from_secs(6))
            .await;
        assert_eq!(g, Generation(2), "not rotated once the database was back");
        engine.close().await;
    }
}
