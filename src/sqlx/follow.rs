//! The task behind a [`VaultSqlxPool`](super::VaultSqlxPool): it applies every new
//! generation to the pool (new connect options, the old user retired), drains the old
//! generation until PostgreSQL shows no session of its user, and probes the login while
//! the pool has no idle connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::sqlx::postgres::{PgConnectOptions, PgPool};

use super::stale::StaleTracker;
use crate::credentials::Generation;
use crate::error::ErrorKind;
use crate::lease::{self, ConnectionGuard, Current, Engine};

/// How often a draining generation is checked: every 100 ms at first (most drain within
/// a second), doubling up to every 30 s (a `PgListener` or a long transaction holds a
/// session of the old user for as long as the lease lasts, up to hours). The cost: the
/// end of a long-held session is seen up to 30 s late, and its lease revoked that much
/// later (a forced rotation within that time has three users alive for a while).
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// The longest wait between two checks of a draining generation.
const DRAIN_POLL_MAX: Duration = Duration::from_secs(30);
/// "In use": a connection acquired, released or opened within this long.
pub(super) const LOGIN_PROBE_ACTIVE: Duration = Duration::from_secs(300);
/// A pool not in use (no hook fired for `LOGIN_PROBE_ACTIVE`) is probed at most this
/// often: a refused login fires no hook, so an idle pool cannot be skipped entirely.
const LOGIN_PROBE_IDLE: Duration = Duration::from_secs(300);

/// The login probe's settings.
pub(super) struct LoginProbe {
    /// How often it logs in while the pool is in use.
    pub(super) every: Duration,
    /// The bound on each login.
    pub(super) timeout: Duration,
    /// The login, as the engine verifies new credentials.
    pub(super) verify: lease::Verifier,
}

/// Apply every new generation to the pool and drain the old one; probe the login while
/// the pool has no idle connection.
pub(super) async fn follow(
    engine: Engine,
    (pool, base): (PgPool, PgConnectOptions),
    tracker: Arc<StaleTracker>,
    (mut guard, mut current): (ConnectionGuard, Arc<Current>),
    (applied, drains): (
        tokio::sync::watch::Sender<Generation>,
        tokio_util::sync::CancellationToken,
    ),
    probe: Option<LoginProbe>,
) {
    let mut generations = engine.subscribe();
    // Without a probe the timer never fires (its branch is disabled).
    let every = probe
        .as_ref()
        .map_or(Duration::from_secs(3600), |p| p.every);
    let mut probe_at = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    probe_at.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probing: Option<lease::BoxFuture<'static, ()>> = None;
    let mut last_probe = Instant::now();
    loop {
        tokio::select! {
            changed = generations.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = probe_at.tick(), if probe.is_some() && probing.is_none() => {
                let due = tracker.used_within(LOGIN_PROBE_ACTIVE)
                    || last_probe.elapsed() >= LOGIN_PROBE_IDLE;
                // A new connection would be opened only with room for it: a pool at its
                // `max_connections` with none idle waits for one to be returned, and the
                // probe must not open one beyond that bound.
                if let Some(p) = probe.as_ref().filter(|_| due)
                    && !pool.is_closed()
                    && pool.num_idle() == 0
                    && pool.size() < pool.options().get_max_connections()
                {
                    last_probe = Instant::now();
                    probing = Some(Box::pin(probe_login(
                        engine.clone(),
                        p.verify.clone(),
                        p.timeout,
                    )));
                }
                continue;
            }
            () = async {
                match probing.as_mut() {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            }, if probing.is_some() => {
                probing = None;
                continue;
            }
        }
        let next = engine.current();
        if next.generation == current.generation {
            continue;
        }
        pool.set_connect_options(super::options_for(&base, &next));
        // A generation with the same user (the same credentials handed back) never
        // retires the user it serves with, and has no session of its own to drain: the
        // user's sessions are the new generation's too.
        let same_user = current.credentials.username == next.credentials.username;
        if !same_user {
            tracker.retire(current.credentials.username.clone());
        }
        applied.send_replace(next.generation);
        // Hold the new generation before letting go of the old one, so the engine never
        // sees a generation of ours at zero connections while it is still in use.
        let old_guard = std::mem::replace(&mut guard, next.track());
        let old = std::mem::replace(&mut current, next);
        if same_user {
            drop(old_guard);
            continue;
        }
        tokio::spawn(drain(
            (pool.clone(), engine.clone()),
            old,
            old_guard,
            drains.clone(),
        ));
    }
}

/// One login with the current credentials, as the verifier does it; a refusal is
/// reported to the engine as `acquire()` would (it re-leases, with its backoff). sqlx has
/// no hook on a failed connect, so this is how `pool()` users get the same healing.
async fn probe_login(engine: Engine, verify: lease::Verifier, timeout: Duration) {
    let Ok(current) = engine.usable() else {
        return; // expired or closed: the engine is already replacing it, or done
    };
    match tokio::time::timeout(timeout, verify(current.credentials.clone())).await {
        Ok(Err(e)) if e.kind() == ErrorKind::AuthenticationFailed => {
            engine.report_auth_failure(current.generation);
        }
        Ok(Err(e)) if e.kind() == ErrorKind::Tls => {
            // It lasts (a certificate expired, a CA changed) and every new connection of
            // the pool fails with it: said where operators look.
            tracing::warn!("probing the login of {}: {e}", engine.label());
        }
        Ok(Err(e)) => {
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            tracing::debug!(
                cause = cause.as_deref().unwrap_or(""),
                "probing the login of {}: {e}",
                engine.label()
            );
        }
        Ok(Ok(())) => {}
        Err(_) => tracing::debug!(
            "probing the login of {}: no answer within {timeout:?}",
            engine.label()
        ),
    }
}

/// Close idle connections of the old generation at once, then hold its guard until
/// PostgreSQL has no session of the old user left, the engine has revoked it (its drain
/// deadline), or the pool closes.
async fn drain(
    (pool, engine): (PgPool, Engine),
    old: Arc<Current>,
    guard: ConnectionGuard,
    cancel: tokio_util::sync::CancellationToken,
) {
    let user = old.credentials.username.clone();
    let mut wait = DRAIN_POLL;
    loop {
        // The engine revokes at the generation's drain deadline (just before its lease's
        // end, renewals included) whatever is still open; then there is nothing to hold.
        if cancel.is_cancelled() || !engine.is_retiring(old.generation) {
            break;
        }
        // Cycle the idle queue: `before_acquire` closes stale connections (the fresh
        // ones pass through `after_release`, your hook included, at each check).
        for _ in 0..pool.num_idle() {
            match pool.try_acquire() {
                Some(conn) => drop(conn),
                None => break,
            }
        }
        if pool.is_closed() {
            break;
        }
        let sessions: std::result::Result<i64, _> = ::sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1::text::name",
        )
        .bind(&user)
        .fetch_one(&pool)
        .await;
        match sessions {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => tracing::debug!("checking sessions of {user}: {e}"),
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(DRAIN_POLL_MAX);
    }
    tracing::debug!(generation = old.generation.0, user = %user, "sqlx generation drained");
    drop(guard);
}
