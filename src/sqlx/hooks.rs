//! The hooks a [`VaultSqlxPool`](super::VaultSqlxPool) sets on its `sqlx::PgPool`: they
//! retire the connections of old credentials (closed instead of handed out or returned)
//! and refuse a new connection logged in as a retired user; the user's own hooks run
//! with them.

use std::sync::Arc;

use ::sqlx::PgConnection;
use ::sqlx::pool::PoolConnectionMetadata;
use ::sqlx::postgres::PgPoolOptions;

use super::stale::StaleTracker;
use crate::BoxFuture;

/// A hook like sqlx's `before_acquire`/`after_release`: `Ok(false)` closes the connection.
pub type CheckHook = Arc<
    dyn for<'c> Fn(
            &'c mut ::sqlx::PgConnection,
            ::sqlx::pool::PoolConnectionMetadata,
        ) -> BoxFuture<'c, std::result::Result<bool, ::sqlx::Error>>
        + Send
        + Sync,
>;

/// A hook like sqlx's `after_connect` (e.g. `SET search_path`).
pub type ConnectHook = Arc<
    dyn for<'c> Fn(
            &'c mut ::sqlx::PgConnection,
            ::sqlx::pool::PoolConnectionMetadata,
        ) -> BoxFuture<'c, std::result::Result<(), ::sqlx::Error>>
        + Send
        + Sync,
>;

/// The user's own hooks, run after the pool's.
#[derive(Default)]
pub(super) struct UserHooks {
    /// Run before the pool's check of a new connection's user.
    pub(super) after_connect: Option<ConnectHook>,
    /// Run for connections the pool keeps.
    pub(super) before_acquire: Option<CheckHook>,
    /// Run for connections the pool keeps.
    pub(super) after_release: Option<CheckHook>,
}

/// `options` with the pool's hooks, each running the user's own (`user`) as documented
/// on the builder, all reporting to `tracker`.
pub(super) fn install(
    options: PgPoolOptions,
    tracker: &Arc<StaleTracker>,
    user: UserHooks,
) -> PgPoolOptions {
    let (on_acquire, on_release, on_connect) = (tracker.clone(), tracker.clone(), tracker.clone());
    let UserHooks {
        after_connect: user_connect,
        before_acquire: user_acquire,
        after_release: user_release,
    } = user;
    // `after_release` makes sqlx spawn a task per release (measured: +6% per
    // checkout), but without it a stale connection released under load goes back
    // into circulation until its next acquire, and draining takes longer than the
    // gap between two rotations (seen: three users alive at once).
    options
        .after_connect(move |conn, meta| {
            refuse_retired_user(conn, meta, on_connect.clone(), user_connect.clone())
        })
        .before_acquire(move |conn, meta| {
            keep_if_fresh(conn, meta, &on_acquire, user_acquire.as_ref())
        })
        .after_release(move |conn, meta| {
            keep_if_fresh(conn, meta, &on_release, user_release.as_ref())
        })
}

/// `after_connect`: logged in as a retired generation's user? A connect that began with
/// the options of a generation retired meanwhile is refused here (sqlx logs it and
/// connects again with the current options). The user's own hook runs first, so that
/// nothing follows the check.
fn refuse_retired_user(
    conn: &mut PgConnection,
    meta: PoolConnectionMetadata,
    tracker: Arc<StaleTracker>,
    user_hook: Option<ConnectHook>,
) -> BoxFuture<'_, Result<(), ::sqlx::Error>> {
    tracker.used();
    Box::pin(async move {
        if let Some(hook) = user_hook {
            hook(&mut *conn, meta).await?;
        }
        let user: String = ::sqlx::query_scalar("SELECT session_user::text")
            .fetch_one(&mut *conn)
            .await?;
        if tracker.is_retired(&user) {
            return Err(::sqlx::Error::Configuration(
                format!("connected as {user}, whose credentials were retired").into(),
            ));
        }
        Ok(())
    })
}

/// `before_acquire` and `after_release`: a connection opened before the last swap is
/// closed (`Ok(false)`); a fresh one is kept, or what the user's hook says.
fn keep_if_fresh<'c>(
    conn: &'c mut PgConnection,
    meta: PoolConnectionMetadata,
    tracker: &StaleTracker,
    user_hook: Option<&CheckHook>,
) -> BoxFuture<'c, Result<bool, ::sqlx::Error>> {
    tracker.used();
    let fresh = !tracker.is_stale(meta.age);
    let user_hook = user_hook.cloned();
    Box::pin(async move {
        match user_hook {
            Some(hook) if fresh => hook(conn, meta).await,
            _ => Ok(fresh),
        }
    })
}
