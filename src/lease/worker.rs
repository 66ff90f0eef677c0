//! The background task: follows the [`policy`](super::policy) schedule, renews, rotates,
//! drains and revokes. It holds only a `Weak` to the shared state and stops when the last
//! handle is dropped or on [`close`](super::Engine::close).
//!
//! This file is the loop ([`run`]: plan, sleep, then a command or the work due) and the
//! steps it takes itself (renew, poll, re-lease after a refused login), each bounded by
//! [`step_limit`]. Issuing and rotating are in `issue.rs`, draining and revoking retired
//! generations in `drain.rs`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::drain::{Drain, retire, settle, shutdown};
use super::issue::{Reason, Unreachable, rotate};
use super::policy::{self, Action, LeaseState};
use super::source::Source;
use super::{Command, Current, EngineState};
use crate::backoff::Backoff;
use crate::credentials::{Generation, Lease};
use crate::error::{Error, ErrorKind, Result};

/// How long a forced rotation waits for a still-draining generation before going ahead.
const FORCED_ROTATION_SETTLE: Duration = Duration::from_secs(1);
/// The longest wait for an unreachable database once the lease has ended (nothing left
/// to protect; come back soon once the database can be reached again).
const UNREACHABLE_EXPIRED: Duration = Duration::from_secs(5);

/// The wait before retrying a failed re-lease after a refused login: 1 s, doubling up to
/// 60 s between two attempts.
const AUTH_RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
/// The longest one step of the worker (a renewal, a rotation, a revocation round, a token
/// refresh) may take before it is cut, so that nothing holds the worker for long.
pub(super) const STEP_MAX: Duration = Duration::from_secs(30);
/// The shortest limit a step gets, even when the lease is about to end (or has ended).
const STEP_MIN: Duration = Duration::from_secs(5);

/// How long the next step may take: while the lease is valid, not past its end (a step
/// that cannot finish before then must not delay the next try), within
/// STEP_MIN..STEP_MAX; once it has ended, STEP_MAX (a slow Vault must still be able to
/// answer).
pub(super) fn step_limit(shared: &EngineState) -> Duration {
    match shared.current.load().lease.remaining_at(now()) {
        Some(left) if !left.is_zero() => left
            .saturating_sub(STEP_CUT_BEFORE_END)
            .clamp(STEP_MIN, STEP_MAX),
        _ => STEP_MAX,
    }
}

/// How long before the lease's end a step is cut (given at least [`STEP_MIN`]), so that
/// it cannot delay the schedule's last attempt, made
/// [`LAST_ATTEMPT_BEFORE_END`](policy::LAST_ATTEMPT_BEFORE_END) before the end.
const STEP_CUT_BEFORE_END: Duration = Duration::from_millis(200);

/// Why a step did not finish.
enum StepInterrupted {
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
) -> std::result::Result<T, StepInterrupted> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(StepInterrupted::Closed),
        r = tokio::time::timeout(limit, step) => r.map_err(|_| StepInterrupted::TimedOut(limit)),
    }
}

impl StepInterrupted {
    /// The error for `what`, interrupted this way.
    fn error(&self, shared: &EngineState, what: &str) -> Error {
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
pub(super) fn noteworthy(n: u32) -> bool {
    n.is_power_of_two()
}

/// Now, on tokio's clock (so `tokio::time::pause` drives the schedule in tests).
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The worker's own state: what it knows of the serving lease beyond the lease itself,
/// its failures and backoffs, and the generations it is retiring.
pub(crate) struct WorkerState {
    /// The serving lease's renewal schedule.
    pub(super) serving: ServingLease,
    /// Failed attempts at the lease, and their backoff.
    failures: Failures,
    /// Token refreshes failed in a row (the lease's own failures are `failures`).
    token_failures: u32,
    /// Re-leasing after a refused login.
    re_lease: ReLeaseRetry,
    /// Rotations that could not reach the database, and the backoff they set.
    pub(super) unreachable: Unreachable,
    /// When the polled source is asked next (drawn once per wait, cleared when asked).
    next_poll: Option<Instant>,
    /// Retired generations, draining until their leases are revoked.
    /// When the step under way is cut (set as each step starts): work late in a step
    /// (a rotation's pre-warm) bounds itself by what is left of it.
    pub(super) step_ends: Option<Instant>,
    /// The generation whose expiry was last reported as an event (once each).
    expired_reported: Option<Generation>,
    pub(super) drain: Drain,
}

/// What the worker knows of the serving lease beyond the lease itself: what its
/// renewals ask for and how they went.
pub(super) struct ServingLease {
    full_ttl: Duration,
    capped: bool,
    /// Not renewed since it was issued (its first renewal is spread wider).
    fresh: bool,
    /// The jitter sample for the current lease's next renewal: drawn once per issue and
    /// renewal, so re-planning (after every wake) does not draw again and pull the
    /// renewal early.
    jitter: f64,
    /// The auth token that issued it (its end is the lease's end at the latest).
    pub(super) issuing_token: Option<String>,
}

impl ServingLease {
    /// A lease just issued with `full_ttl` by the token with this accessor.
    pub(super) fn new(full_ttl: Duration, issuing_token: Option<String>) -> Self {
        Self {
            full_ttl,
            capped: false,
            fresh: true,
            jitter: policy::spread_sample(),
            issuing_token,
        }
    }
}

/// Failed attempts at the lease (renewal, rotation, a KV poll) since the last success.
struct Failures {
    /// How many in a row.
    in_a_row: u32,
    /// When the last one failed.
    last: Option<Instant>,
    /// The jitter of the next retry's delay, drawn at each failure.
    retry_jitter: f64,
}

/// A re-lease after a refused login that failed, retried with backoff.
#[derive(Default)]
struct ReLeaseRetry {
    /// Retried at this time while the generation is still serving and its lease valid.
    pending: Option<(Generation, Instant)>,
    /// Re-lease attempts in a row for the same refusal.
    attempts: u32,
}

impl WorkerState {
    /// The state for the first lease, issued by the token with this accessor.
    pub(crate) fn new(lease: &Lease, issuing_token: Option<String>) -> Self {
        Self {
            serving: ServingLease::new(lease.duration, issuing_token),
            failures: Failures {
                in_a_row: 0,
                last: None,
                retry_jitter: 0.5,
            },
            token_failures: 0,
            re_lease: ReLeaseRetry::default(),
            unreachable: Unreachable::default(),
            next_poll: None,
            step_ends: None,
            expired_reported: None,
            drain: Drain::default(),
        }
    }

    /// What the schedule needs to know of `lease`.
    pub(super) fn lease_state(&self, lease: &Lease, source: &dyn Source) -> LeaseState {
        LeaseState {
            renewed_at: lease.issued_at,
            ttl: lease.duration,
            full_ttl: self.serving.full_ttl,
            renewable: lease.renewable,
            capped: self.serving.capped,
            fresh: self.serving.fresh,
            hard_end: self
                .serving
                .issuing_token
                .as_deref()
                .and_then(|a| source.token_end(a)),
            failures: self.failures.in_a_row,
            last_failure: self.failures.last,
        }
    }

    /// An attempt at the lease failed: counted, published, logged, and retried with
    /// backoff.
    pub(super) fn failed(&mut self, shared: &EngineState, what: &str, e: &crate::Error) {
        self.failures.in_a_row = self.failures.in_a_row.saturating_add(1);
        self.failures.last = Some(now());
        // Each retry backs off with a jitter of its own (engines that failed together
        // do not retry in step).
        self.failures.retry_jitter = fastrand::f64();
        let mut stats = shared.stats();
        stats.failures += 1;
        stats.degraded = true;
        stats.last_error = Some(e.to_string());
        drop(stats);
        metrics::counter!("vaultpool_lease_failures_total", "role" => shared.label.clone())
            .increment(1);
        shared.emit(super::LeaseEvent::Failed {
            what: what.to_owned(),
            kind: e.kind(),
            message: e.to_string(),
            failures: self.failures.in_a_row,
        });
        if noteworthy(self.failures.in_a_row) {
            tracing::warn!(
                source = %shared.label,
                failures = self.failures.in_a_row,
                "{what} failed, will retry with backoff: {e}"
            );
        } else {
            tracing::debug!(source = %shared.label, failures = self.failures.in_a_row, "{what} failed again: {e}");
        }
    }

    /// Take over what the client knows of its token's refreshes (they run in the
    /// background, whoever started them): a failure is reported once per failed attempt,
    /// a success clears it.
    fn follow_token(&mut self, shared: &EngineState) {
        match shared.source.token_failure() {
            Some((failures, e)) if failures != self.token_failures => {
                self.token_failures = failures.saturating_sub(1);
                self.token_failed(shared, &e);
            }
            None if self.token_failures > 0 => self.token_refreshed(shared),
            _ => {}
        }
    }

    /// The Vault token could not be refreshed; the client retries with backoff.
    fn token_failed(&mut self, shared: &EngineState, e: &crate::Error) {
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

    /// The Vault token was refreshed: clears a token failure (and the degraded state, if
    /// the lease itself is fine).
    fn token_refreshed(&mut self, shared: &EngineState) {
        if self.token_failures > 0 {
            tracing::info!(
                after = self.token_failures,
                "refreshed the Vault token after failures"
            );
            self.token_failures = 0;
            if self.failures.in_a_row == 0 {
                let mut stats = shared.stats();
                stats.degraded = false;
                stats.last_error = None;
            }
        }
    }

    /// An attempt at the lease succeeded: the failures are over.
    pub(super) fn succeeded(&mut self, shared: &EngineState) {
        self.failures.in_a_row = 0;
        self.failures.last = None;
        let mut stats = shared.stats();
        stats.degraded = false;
        stats.last_error = None;
    }
}

/// The worker's loop: plan the next step, sleep until it (or a command, or close), do it.
pub(crate) async fn run(
    weak: Weak<EngineState>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    cancel: CancellationToken,
    mut state: WorkerState,
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
        // A command taken from the queue while gathering forced rotations, obeyed next.
        let mut held: Option<Command> = None;
        loop {
            if let Some(cmd) = held.take() {
                let Some(shared) = weak.upgrade() else { return };
                held = obey(&shared, &mut state, &cancel, cmd, &mut commands).await;
                continue;
            }
            let Some(shared) = weak.upgrade() else {
                tracing::debug!("all handles dropped; lease worker stops (leases expire by TTL)");
                return;
            };
            let now = now();
            let current = shared.current.load_full();
            let plan = plan_next(&shared, &state, &current, now);
            publish_ttl(&shared, &current, now);
            let (wake, poll_at) = next_wake(&shared, &mut state, plan, now);
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
                        shutdown(&shared, &mut state.drain).await;
                    }
                    return;
                }
                cmd = commands.recv() => {
                    let (Some(cmd), Some(shared)) = (cmd, weak.upgrade()) else { return };
                    held = obey(&shared, &mut state, &cancel, cmd, &mut commands).await;
                }
                _ = sleep => {
                    let Some(shared) = weak.upgrade() else { return };
                    let limit = step_limit(&shared);
                    state.step_ends = Some(self::now() + limit);
                    let work = due_work(&shared, &mut state, plan, poll_at);
                    if let Err(cut @ StepInterrupted::TimedOut(_)) = bounded(&cancel, limit, work).await {
                        let e = cut.error(&shared, "the scheduled work");
                        state.failed(&shared, "the scheduled work", &e);
                    }
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// The schedule's next step for the serving lease, held back while issuing waits for an
/// unreachable database.
fn plan_next(
    shared: &EngineState,
    state: &WorkerState,
    current: &Current,
    now: Instant,
) -> Option<policy::Plan> {
    let lease = state.lease_state(&current.lease, shared.source.as_ref());
    let mut plan = policy::plan(
        &shared.settings.policy,
        &lease,
        now,
        if state.failures.in_a_row > 0 {
            state.failures.retry_jitter
        } else {
            state.serving.jitter
        },
    );
    if let Some(p) = plan.as_mut()
        && p.action == Action::Rotate
        && let Some(until) = token_end_wait(shared, state, &lease, now)
    {
        p.at = p.at.max(until);
    }
    // The database cannot be reached from here: issuing a user only to drop it
    // again helps nobody; the next rotation waits for the backoff.
    if let (Some(p), Some(until)) = (plan.as_mut(), state.unreachable.until) {
        match p.action {
            // Never past the last try before the lease's end.
            Action::Rotate => {
                let end = state
                    .lease_state(&current.lease, shared.source.as_ref())
                    .end();
                let last_try = end.map_or(until, |e| {
                    e - policy::LAST_ATTEMPT_BEFORE_END.min(e.saturating_duration_since(now))
                });
                p.at = p.at.max(until.min(last_try));
            }
            // Expired already: nothing to protect, but come back soon once the
            // database is reachable again.
            Action::Expired => p.at = p.at.max(until.min(now + UNREACHABLE_EXPIRED)),
            Action::Renew => {}
        }
    }
    plan
}

/// A rotation for the end of the token that issued the serving lease helps only once
/// another token issues the new one: under the same token (its refresh failing or still
/// running) every new lease has the same end, and rotating again at once would create a
/// user per try until that end. Until when such a rotation waits: the token's next
/// refresh (while one runs, a quarter second from now: the worker looks again as soon as
/// a new token may be there), at most the token's end. `None`: the rotation need not wait.
fn token_end_wait(
    shared: &EngineState,
    state: &WorkerState,
    lease: &LeaseState,
    now: Instant,
) -> Option<Instant> {
    let token_end = lease.hard_end?;
    if lease.end() != Some(token_end)
        || shared.source.issuing_token() != state.serving.issuing_token
    {
        return None;
    }
    let look = shared
        .source
        .token_refresh_at()
        .unwrap_or(token_end)
        .max(now + TOKEN_LOOK_MIN);
    Some(look.min(token_end))
}

/// The shortest wait of a rotation for a token's end before the token is looked at again.
const TOKEN_LOOK_MIN: Duration = Duration::from_millis(250);

/// When the worker wakes next — the schedule, a drain check, a token refresh, a poll or
/// a re-lease retry, whichever comes first (`None`: only for a command or close) — and
/// when the polled source is due (its jittered time drawn once per wait).
fn next_wake(
    shared: &EngineState,
    state: &mut WorkerState,
    plan: Option<policy::Plan>,
    now: Instant,
) -> (Option<Instant>, Option<Instant>) {
    let drain_at = state.drain.next_check(now);
    let token_at = shared.source.token_refresh_at();
    let poll_at = shared.source.poll_delay().map(|every| {
        *state.next_poll.get_or_insert_with(|| {
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
    let re_lease_at = state.re_lease.pending.map(|(_, t)| t);
    let wake = [plan.map(|p| p.at), drain_at, token_at, poll_at, re_lease_at]
        .into_iter()
        .flatten()
        .min();
    (wake, poll_at)
}

/// Carry out a handle's command, cut at `close()` or at the step limit. Forced rotations
/// already waiting in `queue` share this one (N concurrent `rotate()` calls, one new
/// user); a command of another kind met while gathering them is returned, to be obeyed
/// next.
async fn obey(
    shared: &EngineState,
    state: &mut WorkerState,
    cancel: &CancellationToken,
    cmd: Command,
    queue: &mut mpsc::UnboundedReceiver<Command>,
) -> Option<Command> {
    let limit = step_limit(shared);
    state.step_ends = Some(now() + limit);
    let mut next = None;
    match cmd {
        Command::Rotate(reply) => {
            let mut also = Vec::new();
            while let Ok(cmd) = queue.try_recv() {
                match cmd {
                    Command::Rotate(reply) => also.push(reply),
                    other => {
                        next = Some(other);
                        break;
                    }
                }
            }
            // Right after another rotation: let the previous generation
            // finish draining first (briefly), so at most two generations'
            // users exist at once.
            let work = async {
                settle(shared, &mut state.drain, FORCED_ROTATION_SETTLE).await;
                rotate(shared, state, Reason::Forced).await
            };
            let result = match bounded(cancel, limit, work).await {
                Ok(result) => result,
                Err(cut) => {
                    let e = cut.error(shared, "a forced rotation");
                    if let StepInterrupted::TimedOut(_) = cut {
                        state.failed(shared, "rotating credentials", &e);
                    }
                    Err(e)
                }
            };
            for other in also {
                let shared_result = match &result {
                    Ok(generation) => Ok(*generation),
                    Err(e) => Err(e.for_another_caller(
                        "this rotate() call shared a rotation already asked for",
                    )),
                };
                let _ = other.send(shared_result);
            }
            let _ = reply.send(result);
        }
        Command::AuthFailure(generation) => {
            let work = re_lease(shared, state, generation);
            if let Err(cut @ StepInterrupted::TimedOut(_)) = bounded(cancel, limit, work).await {
                // Retried at the time `re_lease` set before trying.
                let e = cut.error(shared, "re-leasing after a refused login");
                state.failed(shared, "re-leasing", &e);
            }
        }
        Command::Check(reply) => {
            state.next_poll = None;
            let result = match bounded(cancel, limit, check(shared, state)).await {
                Ok(result) => result,
                Err(cut) => {
                    let e = cut.error(shared, "checking for a new version");
                    let kv = shared.current.load().lease.duration.is_zero();
                    if let (StepInterrupted::TimedOut(_), true) = (&cut, kv) {
                        state.failed(shared, "checking for a new version", &e);
                    }
                    Err(e)
                }
            };
            let _ = reply.send(result);
        }
    }
    next
}

/// What is due when the worker wakes: token refresh, revocations, a re-lease retry, a
/// poll, the schedule's renewal or rotation — in that order.
async fn due_work(
    shared: &EngineState,
    state: &mut WorkerState,
    plan: Option<policy::Plan>,
    poll_at: Option<Instant>,
) {
    let now = now();
    state.follow_token(shared);
    if shared.source.token_refresh_at().is_some_and(|t| now >= t) {
        // While the current token is valid this only starts the refresh (it runs in the
        // background, recorded by the client) and returns: renewals never wait for it.
        if let Err(e) = shared.source.refresh_token().await
            && shared.source.token_failure().is_none()
        {
            state.token_failed(shared, &e);
        }
        state.follow_token(shared);
    }
    // Revoke what has drained before creating anything new.
    retire(shared, &mut state.drain, false).await;
    if let Some((generation, at)) = state.re_lease.pending
        && now >= at
    {
        re_lease(shared, state, generation).await;
    }
    // The schedule first. When it renewed or rotated, the poll waits: that proved (or
    // replaced) the lease, and the loop plans again before anything else is issued.
    if let Some(plan) = plan.filter(|p| now >= p.at) {
        if plan.action == Action::Expired {
            let generation = shared.current.load().generation;
            if state.expired_reported != Some(generation) {
                state.expired_reported = Some(generation);
                shared.emit(super::LeaseEvent::Expired { generation });
            }
        }
        match plan.action {
            Action::Renew => renew(shared, state).await,
            // The token refresh just started above may bring the token the new lease
            // needs: a rotation for the old token's end waits for it.
            Action::Rotate
                if {
                    let current = shared.current.load_full();
                    let lease = state.lease_state(&current.lease, shared.source.as_ref());
                    token_end_wait(shared, state, &lease, now).is_some_and(|t| t > now)
                } => {}
            Action::Rotate | Action::Expired => {
                let _ = rotate(shared, state, Reason::Schedule).await;
            }
        }
        state.next_poll = None;
    } else if poll_at.is_some_and(|t| now >= t) {
        state.next_poll = None;
        let _ = check(shared, state).await;
    }
    retire(shared, &mut state.drain, false).await;
}

/// Replace `generation` after the backend refused its credentials. A failed attempt is
/// retried with backoff for as long as that generation serves and its lease is valid
/// (after its end, the schedule's own retries take over).
async fn re_lease(shared: &EngineState, state: &mut WorkerState, generation: Generation) {
    let current = shared.current.load_full();
    if current.generation != generation || current.expired_at(now()) {
        state.re_lease = ReLeaseRetry::default();
        return;
    }
    // Scheduled before trying, so that a try cut by its step limit is retried too. The
    // attempts have their own count (a successful renewal in between must not reset the
    // backoff) and their own cap: a database that refuses every login must not make the
    // engine issue a new user every few seconds.
    state.re_lease.attempts = state.re_lease.attempts.saturating_add(1);
    let delay = AUTH_RETRY.delay(state.re_lease.attempts);
    state.re_lease.pending = Some((generation, now() + delay));
    match rotate(shared, state, Reason::AuthFailure).await {
        Ok(_) => {
            state.re_lease = ReLeaseRetry::default();
        }
        Err(e) if e.kind() == ErrorKind::AuthenticationFailed => {
            // The new credentials were refused as well: the database refuses logins for
            // another reason (pg_hba, password encryption); re-leasing cannot help.
            tracing::warn!(
                generation = generation.0,
                "re-leasing after a refused login stopped: the new credentials were refused \
                 too ({e}); the schedule keeps rotating as usual"
            );
            state.re_lease.pending = None;
        }
        Err(_) => {}
    }
}

/// Ask a polled source whether it holds other credentials, and rotate to them if so.
async fn check(shared: &EngineState, state: &mut WorkerState) -> Result<bool> {
    if shared.source.poll_interval().is_none() {
        return Ok(false); // nothing to poll: leave the worker's state and the status alone
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
            if state.unreachable.waiting() {
                // The database could not be reached at the last try: no new user yet; the
                // schedule's next rotation or the next lookup tries again.
                return Ok(false);
            }
            rotate(shared, state, Reason::LeaseLost)
                .await
                .map(|g| g != current.generation)
        }
        Ok(true) => rotate(shared, state, Reason::SourceChanged)
            .await
            .map(|g| g != current.generation),
        Ok(false) => {
            // A poll that works again clears a KV source's failures.
            if state.failures.in_a_row > 0 && !leased {
                state.succeeded(shared);
            }
            Ok(false)
        }
        Err(e) => {
            let e = e.context(format!("checking {}", shared.source_name));
            if leased {
                tracing::debug!("looking the lease up failed: {e}");
                shared.stats().last_error = Some(e.to_string());
            } else {
                state.failed(shared, "checking for a new version", &e);
            }
            Err(e)
        }
    }
}

/// Marks the engine's worker as gone when dropped (a panic unwinds through it too).
struct AliveGuard(Weak<EngineState>);

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

/// Publish the time the serving lease has left as a metric.
fn publish_ttl(shared: &EngineState, current: &Current, now: Instant) {
    if let Some(left) = current.lease.remaining_at(now) {
        metrics::gauge!("vaultpool_lease_seconds_remaining", "role" => shared.label.clone())
            .set(left.as_secs_f64());
    }
}

/// Renew the serving lease; a lease gone in Vault is replaced (unless issuing waits for
/// an unreachable database).
async fn renew(shared: &EngineState, state: &mut WorkerState) {
    let current = shared.current.load_full();
    let serving = &mut state.serving;
    match shared.source.renew(&current.lease, serving.full_ttl).await {
        Ok(lease) => {
            // A renewal that does not move the end (a source whose renew gives the same
            // lease back) counts as capped: rotate before the end instead of renewing again.
            let old_end = current.lease.expires_at();
            let new_end = lease.expires_at();
            serving.capped = lease.duration < serving.full_ttl || new_end <= old_end;
            serving.fresh = false;
            serving.jitter = fastrand::f64();
            let capped = serving.capped;
            state.succeeded(shared);
            shared.stats().renewals += 1;
            shared.emit(super::LeaseEvent::Renewed {
                generation: current.generation,
                ttl: lease.duration,
            });
            metrics::counter!("vaultpool_renewals_total", "role" => shared.label.clone())
                .increment(1);
            tracing::debug!(
                generation = current.generation.0,
                lease_id = %lease.id,
                ttl_s = lease.duration.as_secs(),
                capped,
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
            if state.unreachable.waiting() {
                // The database could not be reached at the last try: no new user yet.
                state.failed(
                    shared,
                    "replacing a lost lease (waiting for the database)",
                    &e,
                );
            } else {
                let _ = rotate(shared, state, Reason::LeaseLost).await;
            }
        }
        Err(e) => state.failed(shared, "renewing the lease", &e),
    }
}
