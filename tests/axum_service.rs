//! The axum example's routes, driven over real HTTP across rotations and a Vault outage.
#![cfg(all(feature = "postgres", feature = "axum"))]

mod common;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/axum_service.rs"]
mod axum_service;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use vaultpool::axum::HealthCheck;
use vaultpool::postgres::VaultPgPool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_and_health_stay_200_across_rotations_and_turn_503_when_vault_is_gone() {
    let mut vault = PersistentVault::start("app", "10s", "10s").await;
    let client = vault.client();
    let db = VaultPgPool::builder("app")
        .vault(client.clone())
        .pg_config(pg_target())
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    let health = HealthCheck::new(client).with(db.engine());
    let app = axum_service::app(axum_service::AppState {
        db: db.clone(),
        health,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let http = reqwest::Client::new();

    // CRUD for 12 s: through one forced rotation and the scheduled ones (10 s leases).
    let mut generations = BTreeSet::new();
    let mut requests = 0;
    let started = Instant::now();
    let mut forced = false;
    while started.elapsed() < Duration::from_secs(12) {
        let created: Value = {
            let r = http
                .post(format!("{base}/items"))
                .json(&json!({"name": "a"}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            r.json().await.unwrap()
        };
        let id = created["id"].as_i64().unwrap();
        generations.insert(created["generation"].as_u64().unwrap());
        let r = http.get(format!("{base}/items/{id}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = http
            .put(format!("{base}/items/{id}"))
            .json(&json!({"name": "b"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        let item: Value = http
            .get(format!("{base}/items/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(item["name"], "b");
        let r = http
            .delete(format!("{base}/items/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        let r = http.get(format!("{base}/items/{id}")).send().await.unwrap();
        assert_eq!(r.status(), 404);
        let r = http.get(format!("{base}/health")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        requests += 7;
        if !forced && started.elapsed() > Duration::from_secs(2) {
            db.rotate().await.unwrap();
            forced = true;
        }
    }
    let h: Value = http
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    println!("axum: {requests} requests, generations seen {generations:?}, health {h}");
    assert!(
        generations.len() >= 3,
        "expected forced + scheduled rotations: {generations:?}"
    );
    assert_eq!(h["status"], "ok");
    assert_eq!(h["vault"]["reachable"], true);
    assert_eq!(h["vault"]["sealed"], false);
    let pool = &h["pools"][0];
    assert_eq!(pool["source"], "database role app");
    assert_eq!(pool["can_serve"], true);
    assert!(pool["generation"].as_u64().unwrap() >= 3);
    assert!(pool["ttl_remaining"].as_f64().unwrap() > 0.0);
    assert!(pool["generations"].is_array());

    // Vault gone past the lease's end: 503s with a short body, and a health JSON that
    // says why.
    vault.kill();
    let deadline = Instant::now() + Duration::from_secs(25);
    let (status, h) = loop {
        let r = http.get(format!("{base}/health")).send().await.unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        if status == 503 {
            break (status, body);
        }
        assert!(Instant::now() < deadline, "health never turned 503: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("axum: health with Vault gone: {status} {h}");
    assert_eq!(h["status"], "unavailable");
    assert_eq!(h["vault"]["reachable"], false);
    assert_eq!(h["pools"][0]["can_serve"], false);
    assert_eq!(h["pools"][0]["health"], "expired");
    let r = http
        .post(format!("{base}/items"))
        .json(&json!({"name": "c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert_eq!(body, r#"{"error":"service temporarily unavailable"}"#);

    // Back: the same process serves again.
    vault.restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http
            .post(format!("{base}/items"))
            .json(&json!({"name": "d"}))
            .send()
            .await
            .unwrap();
        if r.status() == 201 {
            break;
        }
        assert!(Instant::now() < deadline, "never healed: {}", r.status());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        http.get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    db.close().await;
}

/// Status, body and the handler's response for a `HealthCheck`, as a service sees them.
async fn check(h: &HealthCheck) -> (u16, Value) {
    let response = vaultpool::axum::health(axum::extract::State(h.clone())).await;
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

/// The health check on the paths nobody named: Vault's state counts (no pool and Vault
/// sealed: 503, was 200); a non-critical check only degrades; Kafka settings register
/// like a pool; 50 concurrent probes make one Vault request (was 50); error strings are
/// redacted unless details are on; a change of state is logged once, not per probe.
#[tokio::test(flavor = "current_thread")]
async fn health_counts_vault_caches_redacts_and_logs_once_per_change() {
    let lines = LineCounter::default();
    let _log = tracing::subscriber::set_default(lines.subscriber());
    let dev = DevVault::start();
    let proxy = Proxy::start(&dev.addr, "/v1/sys/health").await;
    let vault = vaultpool::vault::Client::builder()
        .address(&proxy.addr)
        .token("root")
        .max_retries(0)
        .build()
        .unwrap();

    // Vault alone: it is the only check, so it counts.
    let vault_only = HealthCheck::new(vault.clone()).cache_for(Duration::ZERO);
    assert_eq!(check(&vault_only).await.0, 200);
    dev.seal().await;
    let (status, body) = check(&vault_only).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["vault"]["sealed"], true);
    assert_eq!(body["vault"]["critical"], true);

    // With a pool (critical) serving, a sealed Vault only degrades: the pool serves on
    // its lease.
    let role = create_role("1h", "1h").await;
    let db = small_pool(&role, approle_client("IMMUNE_SYSTEM")).await;
    let closed = small_pool(&role, approle_client("IMMUNE_SYSTEM")).await;
    closed.close().await;
    let with_pool = HealthCheck::new(vault.clone())
        .with(&db)
        .cache_for(Duration::ZERO);
    let (status, body) = check(&with_pool).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("degraded")),
        "{body}"
    );
    assert_eq!(body["vault"]["critical"], false);
    // ...unless Vault is marked critical.
    let strict = with_pool.clone().vault_critical(true);
    assert_eq!(check(&strict).await.0, 503);
    // A closed pool as an optional check degrades; as a critical one it is a 503.
    let optional = HealthCheck::pools_only().with(&db).with_optional(&closed);
    let (status, body) = check(&optional).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("degraded")),
        "{body}"
    );
    assert_eq!(body["pools"][1]["critical"], false);
    let critical = HealthCheck::pools_only().with(&db).with(&closed);
    assert_eq!(check(&critical).await.0, 503);

    // Kafka settings register like a pool.
    #[cfg(feature = "kafka")]
    {
        let path = format!("kafka/health-{}", unique());
        kv_put(
            &path,
            kafka_secret("broker-1:9092", "svc", "pw-1", "SCRAM-SHA-512"),
        )
        .await;
        let sasl = vaultpool::kafka::KafkaSasl::builder(approle_client("INFRASTRUCTURE"))
            .secret(vaultpool::lease::KvCredentials::new(&path))
            .build()
            .await
            .unwrap();
        let (status, body) = check(&HealthCheck::pools_only().with(&sasl)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["pools"][0]["source"],
            format!("KV secret secret/{path}")
        );
        sasl.close().await;
    }

    // Cached, one probe in flight: 50 concurrent probes, one Vault request.
    dev.unseal().await;
    let cached = HealthCheck::new(vault.clone())
        .with(&db)
        .cache_for(Duration::from_secs(60));
    let before = proxy.hits().len();
    let probes: Vec<_> = (0..50).map(|_| check(&cached)).collect();
    let results = futures_util::future::join_all(probes).await;
    assert!(results.iter().all(|(s, _)| *s == 200));
    let vault_requests = proxy.hits().len() - before;
    assert_eq!(
        vault_requests, 1,
        "50 probes made {vault_requests} Vault requests"
    );

    // Redacted by default; details on request. (Vault stopped: unreachable.)
    drop(dev);
    let (_, body) = check(&vault_only).await;
    let error = body["vault"]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_owned();
    assert!(error.starts_with("hidden"), "{error}");
    let (_, body) = check(&vault_only.clone().details(true)).await;
    let detailed = body["vault"]["error"].as_str().unwrap().to_owned();
    assert!(detailed.contains("127.0.0.1"), "{detailed}");

    // Logged once per change, not per probe: 20 probes while Vault is unreachable.
    let logged_before = lines.count();
    lines.sample.lock().unwrap().clear();
    let down = HealthCheck::new(vault.clone()).cache_for(Duration::ZERO);
    for _ in 0..20 {
        assert_eq!(check(&down).await.0, 503);
    }
    let logged = lines.count() - logged_before;
    println!(
        "axum health: 50 concurrent probes → {vault_requests} Vault request; 20 probes with \
         Vault unreachable → {logged} warning line(s) (1 health change + the breaker's); redacted error: {error:?}"
    );
    // One health line, plus the client's own single "circuit breaker opened".
    let sample = lines.sample.lock().unwrap().clone();
    let health_lines = sample
        .iter()
        .filter(|l| l.contains("health changed"))
        .count();
    assert_eq!(health_lines, 1, "{sample:?}");
    assert!(logged <= 2, "{logged} lines: {sample:?}");
    db.close().await;
}
