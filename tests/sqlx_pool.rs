//! VaultSqlxPool against real OpenBao + PostgreSQL: the same scenarios as the deadpool
//! flavour (rotation under load, revocation from outside, 100 rotations then close).
#![cfg(feature = "sqlx")]

mod common;

use std::time::Duration;

use common::scenarios;
use common::*;
use vaultpool::sqlx::VaultSqlxPool;
use vaultpool::sqlx::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use vaultpool::{ErrorKind, Generation};

/// The stack's `adaptive_immunity` database, without login (the lease supplies it).
fn target() -> PgConnectOptions {
    PgConnectOptions::new_without_pgpass()
        .host(&var("PGHOST"))
        .port(var("PGPORT").parse().unwrap())
        .database("adaptive_immunity")
        .ssl_mode(vaultpool::sqlx::sqlx::postgres::PgSslMode::Disable)
}

/// `SELECT count(*)` through `pool()`, the plain `sqlx::PgPool`.
async fn count(pool: &VaultSqlxPool) -> Result<i64, vaultpool::sqlx::sqlx::Error> {
    vaultpool::sqlx::sqlx::query_scalar::<_, i64>("SELECT count(*) FROM items")
        .fetch_one(pool.pool())
        .await
}

/// Try `pool()` every 100 ms until it serves on a new generation; fail after `within`.
async fn served_again(pool: &VaultSqlxPool, within: Duration, after: &str) {
    let since = std::time::Instant::now();
    let mut failed = 0;
    while count(pool).await.is_err() || pool.engine().generation() == Generation(1) {
        failed += 1;
        assert!(
            since.elapsed() < within,
            "pool() users still failing {:?} {after}: {:?}",
            since.elapsed(),
            pool.status().lease
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "sqlx pool() {after}: served again {:?} later ({failed} failed tries before)",
        since.elapsed()
    );
}

async fn pool_for(role: &str, max: u32) -> VaultSqlxPool {
    builder_for(role, max).build().await.unwrap()
}

fn builder_for(role: &str, max: u32) -> vaultpool::sqlx::Builder {
    VaultSqlxPool::builder(role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .connect_options(target())
        .pool_options(PgPoolOptions::new().max_connections(max))
        .policy(fast_policy())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_rotation_under_load_loses_no_query() {
    let role = create_role("8s", "8s").await;
    scenarios::rotation_under_load_loses_no_query(pool_for(&role, 16).await, &role, "sqlx").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_lease_revoked_from_outside_is_replaced() {
    let role = create_role("1h", "2h").await;
    scenarios::revoked_from_outside_serves_again(pool_for(&role, 4).await, &role, "sqlx").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_hundred_rotations_then_close_leave_nothing() {
    let role = create_role("1h", "2h").await;
    scenarios::hundred_rotations_then_close_leave_nothing(pool_for(&role, 16).await, &role, "sqlx")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pg_pool_keeps_its_identity_and_old_connections_are_retired() {
    let role = create_role("1h", "2h").await;
    let pool = pool_for(&role, 4).await;
    let before: *const _ = pool.pool();
    let held = pool.acquire().await.unwrap();
    assert_eq!(pool.rotate().await.unwrap(), Generation(2));
    assert!(std::ptr::eq(before, pool.pool()));
    // The old lease waits for the held connection.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(pool.status().lease.revocations, 0, "revoked while in use");
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pool.status().lease.revocations == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "old lease never revoked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n: i64 = vaultpool::sqlx::sqlx::query_scalar("SELECT count(*) FROM items")
        .fetch_one(pool.pool())
        .await
        .unwrap();
    assert!(n >= 0);
    pool.close().await;
    assert_eq!(
        pool.acquire().await.unwrap_err().kind(),
        ErrorKind::Shutdown
    );
}

/// A `PgListener` holds one of the pool's connections for ever; `close()` still returns
/// (after its 30 s wait) and revokes the lease, instead of waiting for that connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_is_bounded_even_with_a_listener_holding_a_connection() {
    let role = create_role("5m", "1h").await;
    let pool = pool_for(&role, 4).await;
    let mut listener = vaultpool::sqlx::sqlx::postgres::PgListener::connect_with(pool.pool())
        .await
        .unwrap();
    listener.listen("vaultpool_test").await.unwrap();
    let started = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(50), pool.close()).await;
    let took = started.elapsed();
    let leases = leases_of(&role).await;
    println!("sqlx close with a PgListener: returned after {took:?}; leases left {leases:?}");
    assert!(closed.is_ok(), "close() still waiting after {took:?}");
    assert!(leases.is_empty(), "leases left after close: {leases:?}");
    drop(listener);
}

/// Hooks of the user's own composed with the pool's: an `after_connect` that sets a session
/// setting, and a `before_acquire` that counts — both take effect, and rotation still
/// retires old connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_hooks_are_composed_with_the_pools_own() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vaultpool::sqlx::sqlx;
    let role = create_role("5m", "1h").await;
    let acquired = Arc::new(AtomicUsize::new(0));
    let counter = acquired.clone();
    let pool = VaultSqlxPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .connect_options(target())
        .pool_options(PgPoolOptions::new().max_connections(2))
        .after_connect(Arc::new(|conn, _meta| {
            Box::pin(async move {
                sqlx::query("SET application_name = 'hooked-by-user'")
                    .execute(&mut *conn)
                    .await
                    .map(|_| ())
            })
        }))
        .before_acquire(Arc::new(move |_conn, _meta| {
            counter.fetch_add(1, Ordering::Relaxed);
            Box::pin(async { Ok(true) })
        }))
        .build()
        .await
        .unwrap();
    for _ in 0..3 {
        let name: String = sqlx::query_scalar("SELECT current_setting('application_name')")
            .fetch_one(pool.pool())
            .await
            .unwrap();
        assert_eq!(name, "hooked-by-user");
    }
    pool.rotate().await.unwrap();
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(pool.pool())
        .await
        .unwrap();
    assert_eq!(user, pool.engine().current().credentials.username);
    assert!(
        acquired.load(Ordering::Relaxed) >= 1,
        "before_acquire never ran"
    );
    pool.close().await;
}

/// A generation whose lease was renewed past its first TTL keeps its connection in use
/// after a rotation until the engine's drain deadline (just before the renewed end), not
/// until its first TTL (long past): the drain must not judge by a stale lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_generation_drains_until_its_renewed_end() {
    let role = create_role("10s", "1h").await;
    let pool = pool_for(&role, 4).await;
    // Renewed every few seconds: at 15 s the first TTL is long over, the lease is not.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(
        pool.status().lease.renewals >= 1,
        "{:?}",
        pool.status().lease
    );
    let held = pool.pool().acquire().await.unwrap();
    pool.rotate().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = pool.status().lease;
    println!(
        "sqlx: renewed generation, connection held across a rotation: {} revocations 1 s \
         later; lease left then {:?}",
        during.revocations, during.ttl_remaining
    );
    assert_eq!(
        during.revocations, 0,
        "revoked under a connection in use: {during:?}"
    );
    drop(held);
    pool.close().await;
    assert!(leases_of(&role).await.is_empty());
}

/// Code that uses `pool()` directly (a plain `sqlx::PgPool`, the documented drop-in) after
/// the lease was revoked from outside: the engine's lease check notices within ~15 s and
/// re-leases, instead of waiting for the next renewal (40 s into this 60 s lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_users_heal_after_an_outside_revocation() {
    let role = create_role("60s", "1h").await;
    // The login probe off: this shows the lease check alone.
    let pool = builder_for(&role, 4)
        .login_probe(None)
        .build()
        .await
        .unwrap();
    count(&pool).await.unwrap();
    root_client()
        .revoke_lease_prefix(&format!("database/creds/{role}"))
        .await
        .unwrap();
    // A fresh connection each try: the revocation ended the old sessions, and a new login
    // with the revoked user is refused until the re-lease.
    served_again(
        &pool,
        Duration::from_secs(25),
        "after an outside revocation",
    )
    .await;
    pool.close().await;
}

/// A refusal that no lease lookup can see — the user's password changed in PostgreSQL
/// behind Vault's back, its sessions ended — for code using `pool()` directly: the login
/// probe (every 15 s while the pool has no idle connection) reports it and the engine
/// re-leases. Before the probe this pool failed until its lease's end (1 h here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_users_heal_after_a_login_refused_for_another_reason() {
    let role = create_role("1h", "1h").await;
    // The lease check off: this shows the login probe alone (no lookup could see this
    // refusal anyway: the lease is valid).
    let pool = VaultSqlxPool::builder_for(vaultpool::lease::DatabaseRole::new(&role))
        .vault(approle_client("IMMUNE_SYSTEM"))
        .connect_options(target())
        .pool_options(PgPoolOptions::new().max_connections(4))
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    count(&pool).await.unwrap();
    let user = pool.engine().current().credentials.username.clone();
    let admin = pg_admin("adaptive_immunity").await;
    admin
        .batch_execute(&format!(
            "ALTER ROLE \"{user}\" PASSWORD 'changed-behind-vaults-back'"
        ))
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&user],
        )
        .await
        .unwrap();
    served_again(
        &pool,
        Duration::from_secs(40),
        "after a password changed in PostgreSQL",
    )
    .await;
    // The refused user is revoked once drained: nothing is left behind.
    pool.close().await;
    assert!(leases_of(&role).await.is_empty(), "leases left behind");
    assert!(
        !pg_role_exists(&user).await,
        "the refused user {user} left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_a_caching_vault_proxy_never_makes_the_pool_retire_or_revoke_its_serving_lease() {
    scenarios::a_caching_vault_proxy_hands_back_the_serving_lease(
        "sqlx",
        |client, role| async move {
            VaultSqlxPool::builder(&role)
                .vault(client)
                .connect_options(target())
                .pool_options(PgPoolOptions::new().max_connections(4))
                .policy(fast_policy())
                .build()
                .await
        },
    )
    .await;
}

/// Logins of `user` PostgreSQL has authorized so far (the stack logs connections).
fn logins_of(user: &str) -> usize {
    let log = std::fs::read_to_string(format!(
        "{}/pg-log/postgres.log",
        var("VAULTPOOL_STACK_DIR")
    ))
    .unwrap();
    let needle = format!("connection authorized: user={user} ");
    log.lines().filter(|l| l.contains(&needle)).count()
}

/// A saturated pool (every connection in use, at `max_connections`) is never probed: the
/// probe's login would be one connection beyond the bound (before: one login a second
/// with a 1 s probe). A generation drained slowly (a connection held across the
/// rotation, like a `PgListener`) is checked 100 ms, then doubling up to 30 s apart
/// (before: 10 times a second, each check cycling the idle connections through the
/// user's `after_release`: ~200 calls in 20 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_is_not_probed_and_a_slow_drain_is_checked_with_backoff() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let role = create_role("5m", "1h").await;
    let released = Arc::new(AtomicUsize::new(0));
    let counter = released.clone();
    let pool = builder_for(&role, 2)
        .login_probe(Some(Duration::from_secs(1)))
        .after_release(Arc::new(move |_conn, _meta| {
            counter.fetch_add(1, Ordering::Relaxed);
            Box::pin(async { Ok(true) })
        }))
        .build()
        .await
        .unwrap();
    let user = pool.engine().current().credentials.username.clone();
    let a = pool.pool().acquire().await.unwrap();
    let b = pool.pool().acquire().await.unwrap();
    let before = logins_of(&user);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let probed = logins_of(&user) - before;
    println!(
        "sqlx saturated pool (2 of 2 in use) with a 1 s login probe: {probed} logins in 4.5 s"
    );
    assert_eq!(probed, 0, "logins beyond max_connections while saturated");

    drop(b);
    pool.rotate().await.unwrap();
    let from = released.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let calls = released.load(Ordering::Relaxed) - from;
    println!("sqlx drain held by one connection for 20 s: {calls} after_release calls");
    assert!(
        calls <= 40,
        "{calls} after_release calls in 20 s of draining"
    );
    // Still draining (the held connection's user has a session), and the pool serves.
    count(&pool).await.unwrap();
    drop(a);
    pool.close().await;
    assert!(leases_of(&role).await.is_empty());
}
