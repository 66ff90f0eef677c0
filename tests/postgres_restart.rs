//! PostgreSQL restarted or stopped under a running VaultPgPool (its own test binary: this
//! would disturb the other tests; the tests here take turns).
#![cfg(feature = "postgres")]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use vaultpool::postgres::VaultPgPool;

/// One test at a time touches the server.
static PG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn pg_ctl(action: &str) {
    let status = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(format!("{}/pg_ctl", var("VAULTPOOL_PG_BIN")))
        .args(["-D", &var("VAULTPOOL_PG_DATA"), "-m", "fast", "-w", action])
        .args([
            "-l",
            &format!("{}/pg-log/postgres.log", var("VAULTPOOL_STACK_DIR")),
        ])
        .status()
        .unwrap();
    assert!(status.success(), "pg_ctl {action} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_is_survived() {
    let _turn = PG.lock().await;
    let role = create_role("1h", "2h").await;
    let pool = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_target())
        .max_size(4)
        .build()
        .await
        .unwrap();
    for _ in 0..4 {
        pool.get()
            .await
            .unwrap()
            .query_one("SELECT 1", &[])
            .await
            .unwrap();
    }

    pg_ctl("restart");
    let restarted = Instant::now();

    let mut errors = Vec::new();
    let deadline = restarted + Duration::from_secs(30);
    loop {
        let result = async {
            let c = pool.get().await.map_err(|e| e.to_string())?;
            c.query_one("SELECT count(*) FROM items", &[])
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(_) => break,
            Err(e) => errors.push(e),
        }
        assert!(Instant::now() < deadline, "no recovery: {errors:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "postgres_restart: recovered {:?} after restart, {} failed attempts before ({:?})",
        restarted.elapsed(),
        errors.len(),
        errors.first()
    );
    // All four old connections were dead; the pool replaced them.
    for _ in 0..10 {
        pool.get()
            .await
            .unwrap()
            .query_one("SELECT 1", &[])
            .await
            .unwrap();
    }
    pool.close().await;
    assert!(leases_of(&role).await.is_empty());
}

/// PostgreSQL stopped just before the lease must rotate: Vault cannot create the new user
/// (HTTP 500), so the engine keeps the old lease while it is valid, retries, and rotates
/// as soon as PostgreSQL is back — before the old lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_during_a_rotation_keeps_the_old_lease_and_rotates_once_back() {
    let _turn = PG.lock().await;
    // 30 s leases that cannot be renewed: rotation due 5 s before the end (at ~25 s).
    let role = create_role("30s", "30s").await;
    let pool = small_pool(&role, approle_client("IMMUNE_SYSTEM")).await;
    let issued = Instant::now();
    let first_lease = pool.status().lease.lease_id;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcomes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Instant, bool)>::new()));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (pool, stop, outcomes) = (pool.clone(), stop.clone(), outcomes.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ok = async {
                        let c = pool.get().await.ok()?;
                        c.query_one("SELECT count(*) FROM items", &[]).await.ok()
                    }
                    .await
                    .is_some();
                    outcomes.lock().unwrap().push((Instant::now(), ok));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(21).saturating_sub(issued.elapsed())).await;
    let stopped = Instant::now();
    pg_ctl("stop");
    // Past the rotation point (25 s): issuing fails with HTTP 500, the old lease stays.
    let during = loop {
        let status = pool.status().lease;
        if status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("HTTP 500"))
        {
            break status;
        }
        assert!(
            issued.elapsed() < Duration::from_secs(28),
            "no failed issue reported: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(during.generation, vaultpool::Generation(1));
    assert_eq!(during.lease_id, first_lease, "the old lease must be kept");
    let error = during.last_error.clone().unwrap_or_default();
    assert!(
        leases_of(&role)
            .await
            .iter()
            .any(|l| first_lease.ends_with(l.as_str()))
    );
    pg_ctl("start");
    let back = Instant::now();
    while pool.status().lease.generation == vaultpool::Generation(1) {
        assert!(
            issued.elapsed() < Duration::from_secs(30),
            "not rotated before the old lease ended: {:?}",
            pool.status().lease
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rotated_after = back.elapsed();
    let left = Duration::from_secs(30).saturating_sub(issued.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let outcomes = outcomes.lock().unwrap().clone();
    let failed_before = outcomes
        .iter()
        .filter(|(t, ok)| !ok && *t < stopped)
        .count();
    let failed_down = outcomes
        .iter()
        .filter(|(t, ok)| !ok && *t >= stopped && *t < back)
        .count();
    let settled = back + Duration::from_secs(1);
    let failed_after = outcomes
        .iter()
        .filter(|(t, ok)| !ok && *t >= settled)
        .count();
    println!(
        "PostgreSQL down {:?} across the rotation point: {} queries; failed: {failed_before} \
         before, {failed_down} while down (the database itself was gone), {failed_after} from 1 s \
         after it was back; engine reported \"{error}\"; rotated {rotated_after:?} after \
         PostgreSQL was back, {left:?} before the old lease's end",
        back.duration_since(stopped),
        outcomes.len()
    );
    assert_eq!(failed_before, 0);
    assert_eq!(failed_after, 0);
    pool.close().await;
    assert!(leases_of(&role).await.is_empty());
}
