//! The Vault client against a real OpenBao (and PostgreSQL behind its database engine).

mod common;

use std::time::Duration;

use common::*;
use secrecy::ExposeSecret;
use serde_json::json;
use vaultpool::ErrorKind;
use vaultpool::vault::{BreakerConfig, Client, RetryConfig, ServerState};

fn fast_retry(max_retries: usize) -> RetryConfig {
    let mut r = RetryConfig::default();
    r.max_retries = max_retries;
    r.min_delay = Duration::from_millis(20);
    r.max_delay = Duration::from_millis(100);
    r
}

#[tokio::test]
async fn approle_login_gets_a_renewable_token_with_its_policies() {
    let client = approle_client("IMMUNE_SYSTEM");
    let info = client.login().await.unwrap();
    assert!(
        info.policies.iter().any(|p| p == "immune-system"),
        "{info:?}"
    );
    assert!(info.renewable);
    assert_eq!(info.ttl, Duration::from_secs(3600));
    assert_eq!(info.logins, 1);
    assert!(!info.accessor.is_empty());
}

#[tokio::test]
async fn short_lived_token_is_renewed_then_replaced_by_a_fresh_login() {
    // short-token: token_ttl 4 s, token_max_ttl 10 s.
    let path = format!("immune/token-{}", unique());
    kv_put(&path, json!({"v": "1"})).await;
    let client = approle_builder("SHORT_TOKEN")
        .kv_cache_ttl(Duration::ZERO)
        .build()
        .unwrap();
    let mut saw_renewal = false;
    let mut reads = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(14);
    while tokio::time::Instant::now() < deadline {
        let secret = client
            .read_kv("secret", &path)
            .await
            .expect("read with a live token");
        assert_eq!(secret.version(), 1);
        reads += 1;
        let info = client.token_info().unwrap();
        saw_renewal |= info.renewals > 0;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let info = client.token_info().unwrap();
    assert!(saw_renewal, "the token was never renewed");
    assert!(
        info.logins >= 2,
        "no fresh login after the max TTL: {info:?}"
    );
    assert!(reads > 20);
}

#[tokio::test]
async fn kv_read_returns_values_and_version_and_cache_respects_its_ttl() {
    let path = format!("immune/cache-{}", unique());
    kv_put(&path, json!({"password": "first-value", "port": 5432})).await;
    let client = approle_builder("IMMUNE_SYSTEM")
        .kv_cache_ttl(Duration::from_millis(800))
        .build()
        .unwrap();
    let first = client.read_kv("secret", &path).await.unwrap();
    assert_eq!(first.version(), 1);
    assert_eq!(
        first.require("password").unwrap().expose_secret(),
        "first-value"
    );
    assert_eq!(first.get("port").unwrap().expose_secret(), "5432");
    assert!(!format!("{first:?}").contains("first-value"));

    kv_put(&path, json!({"password": "second-value"})).await;
    // Within the TTL: the cached version 1.
    assert_eq!(client.read_kv("secret", &path).await.unwrap().version(), 1);
    // Metadata is never cached.
    assert_eq!(
        client
            .read_kv_metadata("secret", &path)
            .await
            .unwrap()
            .current_version,
        2
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    let fresh = client.read_kv("secret", &path).await.unwrap();
    assert_eq!(fresh.version(), 2);
    assert_eq!(
        fresh.require("password").unwrap().expose_secret(),
        "second-value"
    );
    assert_eq!(
        client
            .read_kv_version("secret", &path, 1)
            .await
            .unwrap()
            .version(),
        1
    );
    let err = fresh.require("nope").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn missing_kv_secret_is_not_found() {
    let err = root_client()
        .read_kv("secret", &format!("immune/absent-{}", unique()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(err.vault_status(), Some(404));
}

#[tokio::test]
async fn creds_issue_renew_revoke_and_the_role_is_gone_from_pg_roles() {
    let client = approle_client("IMMUNE_SYSTEM");
    // test-medium: default_ttl 60 s, max_ttl 10 min.
    let creds = client
        .database_creds("database", "test-medium")
        .await
        .unwrap();
    assert!(creds.lease.id.starts_with("database/creds/test-medium/"));
    assert_eq!(creds.lease.duration, Duration::from_secs(60));
    assert!(creds.lease.renewable);
    assert!(pg_role_exists(&creds.value.username).await);

    // The credentials work.
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(var("PGHOST"))
        .port(var("PGPORT").parse().unwrap())
        .dbname("adaptive_immunity")
        .user(&creds.value.username)
        .password(creds.value.password.expose_secret());
    let (pg, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    let n: i64 = pg
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n >= 0);
    drop(pg);
    let _ = conn.await;

    let renewed = client
        .renew_lease(&creds.lease.id, Some(Duration::from_secs(120)))
        .await
        .unwrap();
    assert_eq!(renewed.duration, Duration::from_secs(120));
    assert!(renewed.warnings.is_empty());
    // Asking past max_ttl: capped, with Vault's warning kept.
    let capped = client
        .renew_lease(&creds.lease.id, Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert!(capped.duration <= Duration::from_secs(600), "{capped:?}");
    assert!(capped.duration > Duration::from_secs(500), "{capped:?}");
    assert!(!capped.warnings.is_empty(), "no cap warning: {capped:?}");
    let info = client.lookup_lease(&creds.lease.id).await.unwrap();
    assert!(info.ttl > Duration::from_secs(500));

    client.revoke_lease(&creds.lease.id).await.unwrap();
    assert!(
        !pg_role_exists(&creds.value.username).await,
        "role left behind"
    );
    let err = client.renew_lease(&creds.lease.id, None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn renewing_an_expired_lease_fails_with_a_lease_error() {
    let client = approle_client("IMMUNE_SYSTEM");
    // test-tiny: 2 s TTL and max TTL.
    let creds = client
        .database_creds("database", "test-tiny")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let err = client.renew_lease(&creds.lease.id, None).await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::LeaseExpired | ErrorKind::NotFound),
        "{err}"
    );
    assert!(!err.is_transient());
    assert!(err.to_string().contains(&creds.lease.id), "{err}");
}

#[tokio::test]
async fn renewing_an_unknown_lease_is_not_found() {
    let err = root_client()
        .renew_lease("database/creds/test-medium/doesnotexist", None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(err.vault_status(), Some(400));
}

#[tokio::test]
async fn unknown_role_is_not_found_for_root_and_denied_for_an_app() {
    let err = root_client()
        .database_creds("database", "no-such-role")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let msg = err.to_string();
    assert!(
        msg.contains("no-such-role") && msg.contains("unknown role"),
        "{msg}"
    );

    let err = approle_client("IMMUNE_SYSTEM")
        .database_creds("database", "no-such-role")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
}

#[tokio::test]
async fn policy_denial_is_permission_denied_and_not_retried() {
    let client = approle_builder("MAXIMUS_AI")
        .retry(fast_retry(3))
        .build()
        .unwrap();
    let err = client
        .database_creds("database", "immune-readwrite")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert_eq!(err.vault_status(), Some(403));
    assert!(err.to_string().contains("immune-readwrite"), "{err}");
    // Its own path works.
    let kv = client
        .read_kv("secret", "maximus_ai/anthropic")
        .await
        .unwrap();
    assert!(
        kv.require("api_key")
            .unwrap()
            .expose_secret()
            .starts_with("sk-ant-placeholder")
    );
}

#[tokio::test]
async fn bad_token_and_bad_secret_id_are_permission_denied_without_echoing_them() {
    let err = builder()
        .token("hvs.not-a-real-token-xyz")
        .build()
        .unwrap()
        .login()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(!format!("{err} {err:?}").contains("not-a-real-token"));

    let err = builder()
        .app_role(var("IMMUNE_SYSTEM_ROLE_ID"), "wrong-secret-id-abc")
        .build()
        .unwrap()
        .login()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains("AppRole"), "{err}");
    assert!(!format!("{err} {err:?}").contains("wrong-secret-id"));
}

#[tokio::test]
async fn health_of_the_stack_is_active() {
    let h = root_client().health().await.unwrap();
    assert_eq!(h.state, ServerState::Active);
    assert!(h.state.can_serve());
    assert!(!h.version.is_empty());
}

#[tokio::test]
async fn sealed_vault_gives_typed_errors_and_recovers_after_unseal() {
    let vault = DevVault::start();
    vault.kv_put("app/cfg", json!({"k": "v"})).await;
    let client = vault
        .client()
        .retry(fast_retry(1))
        .kv_cache_ttl(Duration::ZERO)
        .build()
        .unwrap();
    assert_eq!(
        client.read_kv("secret", "app/cfg").await.unwrap().version(),
        1
    );

    vault.seal().await;
    let err = client.read_kv("secret", "app/cfg").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Sealed, "{err}");
    assert_eq!(err.vault_status(), Some(503));
    assert!(err.to_string().contains("unseal"), "{err}");
    let h = client.health().await.unwrap();
    assert_eq!(h.state, ServerState::Sealed);
    assert_eq!(h.status, 503);

    vault.unseal().await;
    assert_eq!(
        client.read_kv("secret", "app/cfg").await.unwrap().version(),
        1
    );
    assert_eq!(client.health().await.unwrap().state, ServerState::Active);
}

#[tokio::test]
async fn unreachable_vault_fails_after_retries_then_breaker_opens_then_recovers() {
    let port = free_port();
    let mut breaker = BreakerConfig::default();
    breaker.failure_threshold = 3;
    breaker.cooldown = Duration::from_millis(500);
    let client = Client::builder()
        .address(format!("http://127.0.0.1:{port}"))
        .token("root")
        .retry(fast_retry(2))
        .breaker(breaker)
        .build()
        .unwrap();

    // First call: 1 attempt + 2 retries, all refused: a transport error naming the address.
    let err = client.read_kv("secret", "app/cfg").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transport, "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        client.circuit_open(),
        "3 consecutive failures must open the breaker"
    );

    // While open: fail fast, nothing sent.
    let err = client.read_kv("secret", "app/cfg").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen, "{err}");
    assert!(err.retry_after().is_some());

    // Vault comes up on that address; after the cooldown a probe goes through and closes it.
    let vault = DevVault::start_on(port);
    vault.kv_put("app/cfg", json!({"k": "v"})).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let secret = client.read_kv("secret", "app/cfg").await.unwrap();
    assert_eq!(secret.version(), 1);
    assert!(!client.circuit_open());
}

#[tokio::test]
async fn malformed_json_is_a_decode_error() {
    let addr = tiny_server(Some(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\nnot json!",
    ))
    .await;
    let client = Client::builder().address(&addr).token("t").build().unwrap();
    let err = client.database_creds("database", "app").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
    assert!(err.to_string().contains("database/creds/app"), "{err}");
}

#[tokio::test]
async fn hanging_socket_times_out_within_the_configured_bound() {
    let addr = tiny_server(None).await;
    let client = Client::builder()
        .address(&addr)
        .token("t")
        .request_timeout(Duration::from_millis(300))
        .retry(fast_retry(0))
        .build()
        .unwrap();
    let err = client.read_kv("secret", "x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transport, "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
}

/// Vault's rate-limit quota answers 429 with `Retry-After`: the error keeps it, so a
/// service can pass it on (the axum `IntoResponse` sets the header from it).
#[tokio::test]
async fn a_rate_limited_answer_keeps_vaults_retry_after() {
    let dev = DevVault::start();
    for (path, body) in [
        (
            "sys/quotas/rate-limit/tight",
            serde_json::json!({"rate": 1, "interval": "10s"}),
        ),
        (
            "sys/quotas/config",
            serde_json::json!({"enable_rate_limit_response_headers": true}),
        ),
    ] {
        vault_write(&dev.addr, "root", reqwest::Method::POST, path, body).await;
    }
    let client = dev.client().max_retries(0).build().unwrap();
    let mut err = None;
    for _ in 0..3 {
        if let Err(e) = client.read_kv("secret", "nothing-here").await
            && e.kind() == vaultpool::ErrorKind::RateLimited
        {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("no 429 from a 1-per-10 s quota");
    let after = err.retry_after().expect("Retry-After not kept");
    println!("vault 429: {err}; retry after {after:?}");
    assert!(
        (Duration::from_secs(1)..=Duration::from_secs(10)).contains(&after),
        "{after:?}"
    );
}
