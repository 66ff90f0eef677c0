//! TLS to Redis against the stack's Redis TLS port (`tls-auth-clients yes`: a client
//! certificate is required; the server's certificate names only `localhost`, signed by
//! the stack's CA): commands under load across rotations, and each TLS mistake as a
//! typed error that says what to fix, with nothing left behind.
#![cfg(all(feature = "redis", feature = "tls"))]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use vaultpool::ErrorKind;
use vaultpool::redis::VaultRedisPool;
use vaultpool::tls::RedisTls;

/// The TLS port by `host`.
fn tls_url(host: &str) -> String {
    format!("rediss://{host}:{}/0", var("VAULTPOOL_REDIS_TLS_PORT"))
}

/// The stack's CA and the client certificate it signed.
fn full_tls() -> RedisTls {
    RedisTls::new()
        .root_cert(var("VAULTPOOL_PG_CA"))
        .client_cert(
            var("VAULTPOOL_TLS_CLIENT_CERT"),
            var("VAULTPOOL_TLS_CLIENT_KEY"),
        )
}

fn builder(role: &str, url: String, tls: RedisTls) -> vaultpool::redis::Builder {
    VaultRedisPool::builder(role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .address(url)
        .tls(tls)
        .max_size(8)
        .policy(fast_policy())
}

/// 8 workers SET/GET over TLS (with a client certificate) across 3 forced rotations a
/// second apart: none fails, every old ACL user and lease is gone after close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_client_certificate_under_load_across_rotations_loses_no_command() {
    let role = create_redis_role("1h", "1h").await;
    let pool = builder(&role, tls_url("localhost"), full_tls())
        .build()
        .await
        .unwrap();
    let mut users = vec![pool.engine().current().credentials.username.clone()];
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_redis_load(&pool, 8, "tls", stop.clone());
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        pool.rotate().await.unwrap();
        users.push(pool.engine().current().credentials.username.clone());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, errors) = load.await.unwrap();
    let rotations = pool.status().lease.rotations;
    pool.close().await;
    let failed = errors.len();
    println!("Redis TLS: {ok} SET+GET pairs across {rotations} rotations, {failed} failed");
    assert_eq!(failed, 0, "{errors:?}");
    assert!(ok > 100, "only {ok}");
    assert!(rotations >= 3, "{rotations} rotations");
    assert!(redis_users_alive(&users).await.is_empty());
    assert!(leases_of(&role).await.is_empty());
}

/// Each TLS mistake is refused at build with `ErrorKind::Tls` and a message saying what
/// to fix; every lease issued for these builds is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tls_mistakes_are_typed_errors_that_say_what_to_fix() {
    let role = create_redis_role("1h", "1h").await;
    let tls_to_plain_port = format!("rediss://{}:{}/0", var("REDIS_HOST"), var("REDIS_PORT"));
    let cases = [
        (
            "a wrong host name (the certificate names only localhost)",
            builder(&role, tls_url("127.0.0.1"), full_tls()),
            "does not name the host",
        ),
        (
            "an untrusted CA",
            builder(
                &role,
                tls_url("localhost"),
                RedisTls::new()
                    .root_cert(var("VAULTPOOL_PG_OTHER_CA"))
                    .client_cert(
                        var("VAULTPOOL_TLS_CLIENT_CERT"),
                        var("VAULTPOOL_TLS_CLIENT_KEY"),
                    ),
            ),
            "REDIS_TLS_CA_FILE",
        ),
        (
            "no client certificate for a server that requires one",
            builder(
                &role,
                tls_url("localhost"),
                RedisTls::new().root_cert(var("VAULTPOOL_PG_CA")),
            ),
            "requires a client certificate",
        ),
    ];
    for (what, b, says) in cases {
        let started = Instant::now();
        let e = b.build().await.unwrap_err();
        println!("Redis TLS, {what} ({:?}): {e}", started.elapsed());
        assert_eq!(e.kind(), ErrorKind::Tls, "{what}: {e:?}");
        assert!(e.to_string().contains(says), "{what}: {e}");
    }
    // Across TLS and plaintext ports, each side waits for the other (Redis for a
    // command's end, rustls for the server's hello) or drops the connection: no
    // certificate to blame, but no hang either (the connect timeout bounds it).
    for (what, url) in [
        ("TLS to the plaintext port", tls_to_plain_port),
        (
            "plaintext to the TLS port",
            tls_url("localhost").replacen("rediss", "redis", 1),
        ),
    ] {
        let started = Instant::now();
        let e = VaultRedisPool::builder(&role)
            .vault(approle_client("IMMUNE_SYSTEM"))
            .address(url)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .await
            .unwrap_err();
        println!("Redis TLS, {what} ({:?}): {e}", started.elapsed());
        assert_eq!(e.kind(), ErrorKind::Backend, "{what}: {e}");
        // Bounded by the 2 s connect timeout (generous margin for a busy machine).
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: {:?}",
            started.elapsed()
        );
    }
    assert_leases_gone(&role).await;
}
