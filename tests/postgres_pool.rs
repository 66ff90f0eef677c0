//! VaultPgPool against real OpenBao + PostgreSQL, with short TTLs.
#![cfg(feature = "postgres")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use vaultpool::lease::{Health, Policy};
use vaultpool::postgres::{VaultPgPool, tokio_postgres};
use vaultpool::vault::{BreakerConfig, Client};
use vaultpool::{ErrorKind, Generation};

fn pg_target() -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(var("PGHOST"))
        .port(var("PGPORT").parse().unwrap())
        .dbname("adaptive_immunity");
    c
}

fn fast_policy() -> Policy {
    let mut p = Policy::default();
    p.retry_max = Duration::from_secs(1);
    p
}

async fn query(pool: &VaultPgPool) -> Result<i64, String> {
    let client = pool.get().await.map_err(|e| format!("get: {e}"))?;
    let row = client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .map_err(|e| format!("query (gen {}): {e}", client.generation().0))?;
    Ok(row.get(0))
}

/// Run `tasks` query loops until `stop`; returns (ok, failed, first errors).
fn load(
    pool: &VaultPgPool,
    tasks: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64, Vec<String>)> {
    let pool = pool.clone();
    tokio::spawn(async move {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let (pool, stop, ok, failed, errors) = (
                pool.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                errors.clone(),
            );
            handles.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match query(&pool).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            let mut errs = errors.lock().unwrap();
                            if errs.len() < 10 {
                                errs.push(e);
                            }
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        let errs = errors.lock().unwrap().clone();
        (
            ok.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            errs,
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_loses_no_query() {
    // 8 s TTL and max TTL: every lease is rotated by schedule about every 4 s.
    let role = create_role("8s", "8s").await;
    let pool = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_target())
        .max_size(16)
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    let admin = pg_admin("postgres").await;
    let usernames = Arc::new(std::sync::Mutex::new(vec![
        pool.credentials().current().credentials.username.clone(),
    ]));
    // Record every generation's username.
    let watcher = {
        let (pool, usernames) = (pool.clone(), usernames.clone());
        tokio::spawn(async move {
            let mut rx = pool.credentials().subscribe();
            while rx.changed().await.is_ok() {
                let name = pool.credentials().current().credentials.username.clone();
                usernames.lock().unwrap().push(name);
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let load = load(&pool, 32, stop.clone());

    let started = Instant::now();
    let mut max_alive = 0;
    let mut forced = 0;
    let mut next_force = Instant::now() + Duration::from_secs(7);
    while started.elapsed() < Duration::from_secs(62) {
        let names = usernames.lock().unwrap().clone();
        max_alive = max_alive.max(roles_alive(&admin, &names).await.len());
        if Instant::now() >= next_force {
            pool.rotate().await.expect("forced rotation");
            forced += 1;
            next_force = Instant::now() + Duration::from_secs(7);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, errors) = load.await.unwrap();
    let status = pool.status();
    pool.close().await;
    watcher.abort();

    let names = usernames.lock().unwrap().clone();
    let left = roles_alive(&admin, &names).await;
    let leases = leases_of(&role).await;
    println!(
        "rotation_under_load: queries ok {ok}, failed {failed}, rotations {} ({forced} forced), \
         renewals {}, generations {}, max roles alive {max_alive}, roles left after close {}, \
         leases left {}",
        status.lease.rotations,
        status.lease.renewals,
        names.len(),
        left.len(),
        leases.len()
    );
    assert_eq!(failed, 0, "failed queries: {errors:?}");
    assert!(ok > 1000, "too few queries ran: {ok}");
    assert!(
        status.lease.rotations >= 10,
        "only {} rotations",
        status.lease.rotations
    );
    assert!(forced >= 5);
    assert!(max_alive <= 2, "{max_alive} dynamic roles alive at once");
    assert!(left.is_empty(), "roles left behind: {left:?}");
    assert!(leases.is_empty(), "leases left behind: {leases:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_down_shorter_than_the_lease_loses_no_query_and_renewals_resume() {
    let role = "app";
    // 40 s lease: renewal due at ~24-27 s, rotation point at 35 s.
    let mut vault = PersistentVault::start(role, "40s", "10m").await;
    let mut breaker = BreakerConfig::default();
    breaker.cooldown = Duration::from_secs(1);
    let client = Client::builder()
        .address(&vault.addr)
        .token(&vault.root_token)
        .breaker(breaker)
        .build()
        .unwrap();
    let pool = VaultPgPool::builder(role)
        .vault(client)
        .pg_config(pg_target())
        .max_size(8)
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = load(&pool, 8, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    vault.kill();
    // Down for 27 s: past the renewal point, short of the rotation point and the end.
    tokio::time::sleep(Duration::from_secs(27)).await;
    let during = pool.status();
    assert_eq!(during.lease.health, Health::Degraded, "{during:?}");
    assert!(during.lease.failures > 0);
    assert_eq!(during.lease.renewals, 0);
    assert_eq!(during.lease.generation, Generation(1));

    vault.restart().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool.status().lease.renewals == 0 {
        assert!(Instant::now() < deadline, "renewals never resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, errors) = load.await.unwrap();
    let after = pool.status();
    println!(
        "vault_down: queries ok {ok}, failed {failed}, renew/rotate failures while down {}, \
         renewals after restart {}, rotations {}",
        during.lease.failures, after.lease.renewals, after.lease.rotations
    );
    assert_eq!(failed, 0, "failed queries: {errors:?}");
    assert!(ok > 100);
    assert_eq!(after.lease.health, Health::Serving);
    assert_eq!(
        after.lease.generation,
        Generation(1),
        "renewed, not replaced"
    );
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_down_past_expiry_gives_a_typed_error_then_heals() {
    let role = "app";
    let mut vault = PersistentVault::start(role, "6s", "6s").await;
    let mut breaker = BreakerConfig::default();
    breaker.cooldown = Duration::from_secs(1);
    let client = Client::builder()
        .address(&vault.addr)
        .token(&vault.root_token)
        .breaker(breaker)
        .build()
        .unwrap();
    let pool = VaultPgPool::builder(role)
        .vault(client)
        .pg_config(pg_target())
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    query(&pool).await.unwrap();
    vault.kill();

    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        match pool.get().await {
            Err(e) => break e,
            Ok(c) => drop(c),
        }
        assert!(Instant::now() < deadline, "never reported expiry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(err.kind(), ErrorKind::LeaseExpired, "{err}");
    assert!(err.to_string().contains("role app"), "{err}");
    assert_eq!(pool.status().lease.health, Health::Expired);

    vault.restart().await;
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(30);
    loop {
        if query(&pool).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the pool did not heal");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "vault_down_past_expiry: error seen: {err}; healed {:?} after restart",
        restarted.elapsed()
    );
    assert!(pool.credentials().generation() >= Generation(2));
    assert_eq!(pool.status().lease.health, Health::Serving);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_revoked_from_outside_is_replaced_and_the_pool_serves_again() {
    let role = create_role("1h", "2h").await;
    let pool = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_target())
        .max_size(4)
        .build()
        .await
        .unwrap();
    // Warm up four connections.
    let held: Vec<_> = futures_join(&pool, 4).await;
    drop(held);
    assert_eq!(pool.status().size, 4);

    root_client()
        .revoke_lease_prefix(&format!("database/creds/{role}"))
        .await
        .unwrap();
    let revoked = Instant::now();
    let mut failures = Vec::new();
    let deadline = revoked + Duration::from_secs(10);
    loop {
        match query(&pool).await {
            Ok(_) => break,
            Err(e) => failures.push(e),
        }
        assert!(
            Instant::now() < deadline,
            "never served again: {failures:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = revoked.elapsed();
    println!(
        "revoked_from_outside: served again {took:?} after the revocation, {} failed queries \
         before: {failures:?}",
        failures.len()
    );
    assert_eq!(pool.credentials().generation(), Generation(2));
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // And it keeps serving.
    for _ in 0..20 {
        query(&pool).await.unwrap();
    }
    pool.close().await;
    assert!(leases_of(&role).await.is_empty());
}

async fn futures_join(pool: &VaultPgPool, n: usize) -> Vec<vaultpool::postgres::Client> {
    let mut handles = Vec::new();
    for _ in 0..n {
        let pool = pool.clone();
        handles.push(tokio::spawn(async move { pool.get().await.unwrap() }));
    }
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_rotations_then_close_leave_no_role_and_no_lease() {
    let role = create_role("1h", "2h").await;
    let pool = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_target())
        .build()
        .await
        .unwrap();
    let admin = pg_admin("postgres").await;
    let mut usernames = vec![pool.credentials().current().credentials.username.clone()];
    for i in 0..100 {
        let held = pool.get().await.unwrap();
        let g = pool.rotate().await.unwrap();
        assert_eq!(g, Generation(i + 2));
        // The connection checked out before the rotation still works...
        held.query_one("SELECT 1", &[]).await.unwrap();
        assert_eq!(held.generation(), Generation(i + 1));
        drop(held);
        // ...and a new checkout never gets an old generation.
        let fresh = pool.get().await.unwrap();
        assert_eq!(fresh.generation(), g);
        usernames.push(pool.credentials().current().credentials.username.clone());
    }
    let alive_before_close = roles_alive(&admin, &usernames).await.len();
    pool.close().await;
    let left = roles_alive(&admin, &usernames).await;
    let leases = leases_of(&role).await;
    println!(
        "hundred_rotations: {} usernames, alive before close {alive_before_close}, after close {}, \
         leases left {}",
        usernames.len(),
        left.len(),
        leases.len()
    );
    assert!(left.is_empty(), "roles left: {left:?}");
    assert!(leases.is_empty(), "leases left: {leases:?}");
    assert_eq!(pool.get().await.unwrap_err().kind(), ErrorKind::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_cache_and_transactions_work_like_deadpool() {
    let role = create_role("1h", "2h").await;
    let pool = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_target())
        .max_size(1)
        .build()
        .await
        .unwrap();
    let name = format!("item-{}", unique());
    {
        let mut client = pool.get().await.unwrap();
        let stmt = client
            .prepare_cached("SELECT count(*) FROM items WHERE name = $1")
            .await
            .unwrap();
        let tx = client.transaction().await.unwrap();
        tx.execute("INSERT INTO items (name) VALUES ($1)", &[&name])
            .await
            .unwrap();
        let n: i64 = tx.query_one(&stmt, &[&name]).await.unwrap().get(0);
        assert_eq!(n, 1);
        tx.rollback().await.unwrap();
    }
    let client = pool.get().await.unwrap();
    assert_eq!(
        client.statement_cache.size(),
        1,
        "the cached statement survived checkout"
    );
    let n: i64 = client
        .query_one("SELECT count(*) FROM items WHERE name = $1", &[&name])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    drop(client);
    pool.close().await;
}
