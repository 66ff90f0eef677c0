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
