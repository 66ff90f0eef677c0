//! PostgreSQL restarted under a running VaultPgPool (its own test binary: the restart
//! would disturb the other tests).
#![cfg(feature = "postgres")]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use vaultpool::postgres::VaultPgPool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_is_survived() {
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

    let status = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(format!("{}/pg_ctl", var("VAULTPOOL_PG_BIN")))
        .args([
            "-D",
            &var("VAULTPOOL_PG_DATA"),
            "-m",
            "fast",
            "-w",
            "restart",
        ])
        .args([
            "-l",
            &format!("{}/pg-log/postgres.log", var("VAULTPOOL_STACK_DIR")),
        ])
        .status()
        .unwrap();
    assert!(status.success(), "pg_ctl restart failed");
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
