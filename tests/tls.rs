//! TLS to PostgreSQL against the stack's TLS-only database (`immune_tls`: `hostssl`
//! only, a certificate for localhost/127.0.0.1 signed by the stack's CA), in both pool
//! flavours: verify-full under load across rotations, and each TLS mistake as a typed
//! error that says what to fix.
#![cfg(all(feature = "postgres", feature = "sqlx", feature = "tls"))]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use vaultpool::ErrorKind;
use vaultpool::postgres::{VaultPgPool, tokio_postgres};
use vaultpool::sqlx::VaultSqlxPool;
use vaultpool::sqlx::sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use vaultpool::tls::{PgTls, SslMode};

fn sqlx_tls_target(mode: PgSslMode, ca: &str) -> PgConnectOptions {
    PgConnectOptions::new_without_pgpass()
        .host("localhost")
        .port(var("PGPORT").parse().unwrap())
        .database(&var("VAULTPOOL_PG_TLS_DB"))
        .ssl_mode(mode)
        .ssl_root_cert(ca)
}

/// 8 workers on `pool` across `rotations` forced rotations a second apart: none fails.
async fn under_load_across_rotations<P: TestPool>(pool: &P, rotations: usize, flavour: &str) {
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(pool, 8, stop.clone());
    for _ in 0..rotations {
        tokio::time::sleep(Duration::from_secs(1)).await;
        pool.rotate().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    println!(
        "TLS verify-full ({flavour}): {} queries across {rotations} rotations, {} failed",
        report.ok, report.failed
    );
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert!(report.ok > 0);
    pool.close().await;
}

fn verify_full() -> PgTls {
    PgTls::new(SslMode::VerifyFull).root_cert(var("VAULTPOOL_PG_CA"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_under_load_across_rotations_loses_no_query() {
    let role = create_role("1h", "1h").await;
    let pool = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_tls_target("localhost"))
        .ssl(verify_full())
        .max_size(4)
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    assert!(encrypted(&pool).await, "not encrypted");
    under_load_across_rotations(&pool, 3, "deadpool").await;

    // The sqlx flavour, with sqlx's own TLS (the same libpq settings).
    let pool = VaultSqlxPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .connect_options(sqlx_tls_target(
            PgSslMode::VerifyFull,
            &var("VAULTPOOL_PG_CA"),
        ))
        .pool_options(PgPoolOptions::new().max_connections(4))
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    let encrypted: bool = vaultpool::sqlx::sqlx::query_scalar(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .fetch_one(pool.pool())
    .await
    .unwrap();
    assert!(encrypted);
    under_load_across_rotations(&pool, 2, "sqlx").await;
}

/// Each TLS mistake is refused at build with `ErrorKind::Tls` and a message saying what
/// to fix; no credentials are left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mistakes_are_typed_errors_that_say_what_to_fix() {
    let role = create_role("1h", "1h").await;
    let deadpool = |host: &'static str, tls: PgTls| {
        let role = role.clone();
        async move {
            build_tls_pool(&role, pg_tls_target(host), tls)
                .await
                .unwrap_err()
        }
    };
    let cases = [
        (
            "a wrong host name",
            deadpool("wrong.example", verify_full()).await,
            "does not name the host",
        ),
        (
            "an untrusted CA",
            deadpool(
                "localhost",
                PgTls::new(SslMode::VerifyFull).root_cert(var("VAULTPOOL_PG_OTHER_CA")),
            )
            .await,
            "not signed by the root certificate",
        ),
        (
            "plaintext to a TLS-only database",
            deadpool("localhost", PgTls::new(SslMode::Disable)).await,
            "accepts only TLS",
        ),
    ];
    for (what, e, says) in &cases {
        println!("TLS, {what}: {e}");
        assert_eq!(e.kind(), ErrorKind::Tls, "{what}: {e}");
        assert!(e.to_string().contains(says), "{what}: {e}");
    }
    let sqlx = |options: PgConnectOptions| {
        let role = role.clone();
        async move {
            VaultSqlxPool::builder(&role)
                .vault(approle_client("IMMUNE_SYSTEM"))
                .connect_options(options)
                .build()
                .await
                .unwrap_err()
        }
    };
    let cases = [
        (
            "an untrusted CA (sqlx)",
            sqlx(sqlx_tls_target(
                PgSslMode::VerifyFull,
                &var("VAULTPOOL_PG_OTHER_CA"),
            ))
            .await,
        ),
        (
            "plaintext to a TLS-only database (sqlx)",
            sqlx(sqlx_tls_target(PgSslMode::Disable, &var("VAULTPOOL_PG_CA"))).await,
        ),
    ];
    for (what, e) in &cases {
        println!("TLS, {what}: {e}");
        assert_eq!(e.kind(), ErrorKind::Tls, "{what}: {e}");
    }
    // Every credential issued for these builds was revoked (in the background, at once).
    assert_leases_gone(&role).await;
}

/// The verifiers other than verify-full, against the real server: verify-ca takes a
/// certificate whose name does not match but refuses an untrusted CA; prefer without a
/// root certificate encrypts (the TLS-only database lets it in); a config that says
/// `require` is never weakened by a weaker `.ssl(…)`; the sqlx flavour refuses
/// verify-ca (its TLS would also trust every public CA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_prefer_and_precedence_against_the_real_server() {
    let role = create_role("1h", "1h").await;
    let encrypted = |pool: VaultPgPool| async move {
        let on = encrypted(&pool).await;
        pool.close().await;
        on
    };
    let build = |config: tokio_postgres::Config, tls: PgTls| {
        let role = role.clone();
        async move { build_tls_pool(&role, config, tls).await }
    };
    let ca = PgTls::new(SslMode::VerifyCa).root_cert(var("VAULTPOOL_PG_CA"));
    let pool = build(pg_tls_target("wrong.example"), ca).await.unwrap();
    assert!(encrypted(pool).await, "verify-ca with another name");
    let e = build(
        pg_tls_target("localhost"),
        PgTls::new(SslMode::VerifyCa).root_cert(var("VAULTPOOL_PG_OTHER_CA")),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Tls, "{e}");
    assert!(
        e.to_string().contains("not signed by the root certificate"),
        "{e}"
    );
    let pool = build(pg_tls_target("localhost"), PgTls::new(SslMode::Prefer))
        .await
        .unwrap();
    assert!(encrypted(pool).await, "prefer without a root certificate");
    let mut require = pg_tls_target("localhost");
    require.ssl_mode(tokio_postgres::config::SslMode::Require);
    let pool = build(require, PgTls::new(SslMode::Disable)).await.unwrap();
    assert!(encrypted(pool).await, "require weakened by .ssl(disable)");
    let e = VaultSqlxPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .connect_options(sqlx_tls_target(
            PgSslMode::VerifyCa,
            &var("VAULTPOOL_PG_CA"),
        ))
        .build()
        .await
        .unwrap_err();
    println!("TLS, verify-ca (sqlx): {e}");
    assert_eq!(e.kind(), ErrorKind::Tls, "{e}");
    assert!(e.to_string().contains("verify-full"), "{e}");
    // require with a root certificate: libpq checks the chain, sqlx would check nothing.
    let e = VaultSqlxPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .connect_options(sqlx_tls_target(PgSslMode::Require, &var("VAULTPOOL_PG_CA")))
        .build()
        .await
        .unwrap_err();
    println!("TLS, require with a root certificate (sqlx): {e}");
    assert_eq!(e.kind(), ErrorKind::Tls, "{e}");
    assert!(e.to_string().contains("verify-full"), "{e}");
    // A connector of one's own and libpq settings: one of them would be ignored.
    let e = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_tls_target("localhost"))
        .ssl(verify_full())
        .tls(tokio_postgres::NoTls)
        .build()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("give one of them"), "{e}");
    // Nothing leased for the refused builds is left behind.
    assert_leases_gone(&role).await;
}
