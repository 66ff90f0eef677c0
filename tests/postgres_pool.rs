//! VaultPgPool against real OpenBao + PostgreSQL, with short TTLs.
#![cfg(feature = "postgres")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::scenarios;
use common::*;
use secrecy::ExposeSecret;
use vaultpool::lease::Health;
use vaultpool::postgres::VaultPgPool;
use vaultpool::{ErrorKind, Generation};

async fn pool_for(role: &str, max_size: usize) -> VaultPgPool {
    VaultPgPool::builder(role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_target())
        .max_size(max_size)
        .policy(fast_policy())
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_loses_no_query() {
    // 8 s TTL and max TTL: every lease is rotated by schedule about every 4 s.
    let role = create_role("8s", "8s").await;
    scenarios::rotation_under_load_loses_no_query(pool_for(&role, 16).await, &role, "deadpool")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_revoked_from_outside_is_replaced_and_the_pool_serves_again() {
    let role = create_role("1h", "2h").await;
    scenarios::revoked_from_outside_serves_again(pool_for(&role, 4).await, &role, "deadpool").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_rotations_then_close_leave_no_role_and_no_lease() {
    let role = create_role("1h", "2h").await;
    scenarios::hundred_rotations_then_close_leave_nothing(
        pool_for(&role, 16).await,
        &role,
        "deadpool",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_checked_out_across_a_rotation_finishes_and_is_never_reused() {
    let role = create_role("1h", "2h").await;
    let pool = pool_for(&role, 4).await;
    let held = pool.get().await.unwrap();
    let idle = pool.get().await.unwrap();
    drop(idle);
    assert_eq!(pool.status().size, 2);
    assert_eq!(pool.rotate().await.unwrap(), Generation(2));
    // The idle generation-1 connection is closed at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.status().size != 1 {
        assert!(Instant::now() < deadline, "idle old connection not closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The checked-out one finishes its work...
    held.query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap();
    assert_eq!(held.generation(), Generation(1));
    // ...and the old lease waits for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = pool.status();
    assert_eq!(status.lease.revocations, 0, "revoked while in use");
    assert_eq!(status.lease.generations.len(), 2);
    drop(held);
    // Returned: closed, not pooled; then the old lease is revoked.
    let fresh = pool.get().await.unwrap();
    assert_eq!(fresh.generation(), Generation(2));
    drop(fresh);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.status().lease.revocations == 0 {
        assert!(Instant::now() < deadline, "old lease never revoked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pool.status().size, 1);
    pool.close().await;
    assert_eq!(pool.get().await.unwrap_err().kind(), ErrorKind::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_down_shorter_than_the_lease_loses_no_query_and_renewals_resume() {
    let role = "app";
    // 40 s lease: first renewal due between 2.7 and 27 s (spread), rotation point at 35 s.
    let mut vault = PersistentVault::start(role, "40s", "10m").await;
    let client = vault.client();
    let pool = VaultPgPool::builder(role)
        .vault(client)
        .pg_config(pg_target())
        .max_size(8)
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(&pool, 8, stop.clone());
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
    let LoadReport {
        ok, failed, errors, ..
    } = load.await.unwrap();
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
    let client = vault.client();
    let pool = VaultPgPool::builder(role)
        .vault(client)
        .pg_config(pg_target())
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    pool.query().await.unwrap();
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
        if pool.query().await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the pool did not heal");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "vault_down_past_expiry: error seen: {err}; healed {:?} after restart",
        restarted.elapsed()
    );
    assert!(pool.engine().generation() >= Generation(2));
    assert_eq!(pool.status().lease.health, Health::Serving);
    pool.close().await;
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

/// A connection in a transaction longer than the old fixed 30 s drain deadline, across a
/// forced rotation of a lease with minutes left: the transaction completes (its lease is
/// not revoked under it), and the old lease is revoked once the connection is returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_across_a_forced_rotation_completes() {
    let role = create_role("10m", "1h").await;
    let pool = pool_for(&role, 4).await;
    let client = pool.get().await.unwrap();
    let tx = tokio::spawn(async move {
        let started = Instant::now();
        let run = async {
            client.batch_execute("BEGIN").await?;
            client.query_one("SELECT pg_sleep(35)::text", &[]).await?;
            client.query_one("SELECT count(*) FROM items", &[]).await?;
            client.batch_execute("COMMIT").await
        };
        let result = run.await.map_err(|e| e.to_string());
        (result, started.elapsed(), client)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pool.rotate().await.unwrap(), Generation(2));
    let (result, took, client) = tx.await.unwrap();
    let status = pool.status().lease;
    println!(
        "long transaction across a forced rotation: {result:?} after {took:?}; revocations \
         while it ran: {}",
        status.revocations
    );
    result.expect("the transaction on the old generation must complete");
    assert_eq!(status.revocations, 0, "revoked while in use: {status:?}");
    drop(client);
    eventually(
        Duration::from_secs(5),
        "old lease not revoked after return",
        || pool.status().lease.revocations == 1,
    )
    .await;
    pool.close().await;
    assert!(leases_of(&role).await.is_empty());
}

/// An AppRole whose policy may lease and renew but not revoke (Vault's default policy has
/// no `sys/leases/revoke`): every refused revoke is final — not retried, no new login —
/// and `status()` says why; the leases are left to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_without_revoke_is_reported_and_never_logs_in_again() {
    let role = create_role("2m", "10m").await;
    let name = format!("no-revoke-{}", unique());
    let hcl = format!("path \"database/creds/{role}\" {{ capabilities = [\"read\"] }}");
    let (role_id, secret_id) = approle(
        &var("VAULT_ADDR"),
        &var("VAULTPOOL_ROOT_TOKEN"),
        &name,
        &hcl,
        ("1h", "4h"),
    )
    .await;
    let client = builder().app_role(role_id, secret_id).build().unwrap();
    let pool = small_pool(&role, client.clone()).await;
    for _ in 0..3 {
        pool.rotate().await.unwrap();
        pool.query().await.unwrap();
    }
    eventually(Duration::from_secs(10), "refusals not recorded", || {
        pool.status().lease.revocations_refused >= 3
    })
    .await;
    let status = pool.status().lease;
    let logins = client.token_info().unwrap().logins;
    println!(
        "policy without revoke, 3 forced rotations: {logins} login(s), {} revocations, {} \
         refused, health {:?}; status says: {:?}",
        status.revocations, status.revocations_refused, status.health, status.revoke_refused
    );
    assert_eq!(logins, 1, "a refused revoke must not throw the token away");
    assert_eq!(status.revocations, 0);
    assert_eq!(status.health, Health::Serving);
    let why = status
        .revoke_refused
        .expect("the refusal is shown in status()");
    assert!(why.contains("sys/leases/revoke"), "{why}");
    pool.close().await;
    assert_eq!(client.token_info().unwrap().logins, 1);
    root_client()
        .revoke_lease_prefix(&format!("database/creds/{role}"))
        .await
        .unwrap();
}

/// A connection still in its login handshake when its generation is retired is counted
/// from the moment it starts opening: the old lease is not revoked under it (revocation
/// drops its user). A TCP proxy holds that connection's first message for 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_opening_across_a_rotation_keeps_its_lease_until_it_is_returned() {
    let role = create_role("5m", "1h").await;
    let proxy = pg_proxy().await;
    let pool = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_target_via(&proxy))
        .max_size(4)
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    proxy.delay_ms.store(3000, Ordering::Relaxed);
    let opening = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let c = pool.get().await.map_err(|e| e.to_string())?;
            c.query_one("SELECT count(*) FROM items", &[])
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(c.generation())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Later messages pass at once (the rotation's verifying connection among them).
    proxy.delay_ms.store(0, Ordering::Relaxed);
    assert_eq!(pool.rotate().await.unwrap(), Generation(2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = pool.status().lease;
    let opened = opening.await.unwrap();
    println!(
        "connection opening across a rotation: served as {opened:?}; revocations while it \
         was logging in: {}",
        during.revocations
    );
    assert_eq!(
        during.revocations, 0,
        "generation 1 revoked while its connection was logging in: {during:?}"
    );
    assert_eq!(opened, Ok(Generation(1)));
    eventually(
        Duration::from_secs(5),
        "old lease not revoked once its connection was returned",
        || pool.status().lease.revocations == 1,
    )
    .await;
    pool.close().await;
    assert!(leases_of(&role).await.is_empty());
}

/// `build()` abandoned by the caller's timeout after the credentials were issued (the
/// verifying login held 3 s by a proxy, the caller gives up after 1 s): the lease, and
/// with it the database user, is revoked in the background instead of living on until
/// its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_abandoned_after_issuing_leaves_no_lease_behind() {
    let role = create_role("5m", "1h").await;
    let proxy = pg_proxy().await;
    proxy.delay_ms.store(3000, Ordering::Relaxed);
    let build = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_target_via(&proxy))
        .policy(fast_policy())
        .build();
    // Given up as soon as the verifying connection reached the proxy: the credentials
    // have been issued by then, and the login is held for 3 s.
    let verifying = async {
        while proxy.accepted.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::select! {
        built = build => panic!("the build finished through a 3 s proxy: {:?}", built.map(|_| ())),
        () = verifying => {}
    }
    let gave_up = Instant::now();
    let left = loop {
        let left = leases_of(&role).await;
        if left.is_empty() || gave_up.elapsed() > Duration::from_secs(10) {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "build abandoned after issuing: leases left after {:?}: {left:?}",
        gave_up.elapsed()
    );
    assert!(
        left.is_empty(),
        "the abandoned build left its lease: {left:?}"
    );
}

/// The database unreachable from the service (a proxy closing every new connection) while
/// Vault, which reaches it directly, works: past the rotation point the engine backs off
/// issuing instead of creating and dropping a user every retry, and rotates as soon as
/// the database can be reached again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_causes_no_user_churn() {
    let role = create_role("15s", "15s").await; // not renewable past 15 s: rotation at 10 s
    let proxy = pg_proxy().await;
    let pool = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_target_via(&proxy))
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    proxy.blocked.store(true, Ordering::Relaxed);
    let blocked_at = Instant::now();
    let failures_before = pool.status().lease.failures;
    // 30 s unreachable: from ~10 s on, every rotation fails its verification.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = pool.status().lease;
    let failed_rotations = during.failures - failures_before;
    proxy.blocked.store(false, Ordering::Relaxed);
    let back = Instant::now();
    eventually(
        Duration::from_secs(45),
        "no rotation after the database was reachable again",
        || pool.status().lease.generation > Generation(1),
    )
    .await;
    println!(
        "database unreachable for {:?} across the rotation point: {failed_rotations} \
         rotations tried (each one a user created and dropped); rotated {:?} after it was \
         reachable again",
        back - blocked_at,
        back.elapsed()
    );
    // Without the backoff: one try per retry_max (1 s here), ~20 in 20 s. With it: about
    // 5 (5 s, then the last try before the end, then every 5 s once the lease has ended).
    assert!(
        failed_rotations <= 8,
        "{failed_rotations} users created and dropped in 30 s: {during:?}"
    );
    pool.query().await.unwrap();
    pool.close().await;
}

/// A static role (one user, the password rotated by Vault every 5 s) under load until
/// Vault has rotated three times (60 s at most): every rotation is picked up soon after
/// Vault made it (not before: Vault would return the old password), no query fails, a
/// session opened before the first rotation is still the same session at the end, and
/// Vault is read a few times per rotation (the change, the issue, a confirming read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_role_rotated_by_vault_keeps_serving_and_keeps_its_sessions() {
    use vaultpool::lease::StaticRole;
    let id = unique().replace('-', "_");
    let (user, name) = (format!("static_{id}"), format!("static-{id}"));
    let admin = pg_admin("adaptive_immunity").await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{user}\" LOGIN PASSWORD 'set-by-the-test'; \
             GRANT SELECT ON items TO \"{user}\";"
        ))
        .await
        .unwrap();
    vault_write(
        &var("VAULT_ADDR"),
        &var("VAULTPOOL_ROOT_TOKEN"),
        reqwest::Method::POST,
        &format!("database/static-roles/{name}"),
        serde_json::json!({
            "db_name": "adaptive_immunity",
            "username": user,
            "rotation_period": "5s",
        }),
    )
    .await;
    // Vault reads through a proxy that counts them.
    let proxy = Proxy::start(&var("VAULT_ADDR"), "/v1/database/static-creds/").await;
    let vault = vaultpool::vault::Client::builder()
        .address(&proxy.addr)
        .token(var("VAULTPOOL_ROOT_TOKEN"))
        .build()
        .unwrap();
    let pool = VaultPgPool::builder_for(StaticRole::new(&name))
        .vault(vault)
        .pg_config(pg_target())
        .max_size(4)
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    // One session held across every rotation.
    let held = pool.get().await.unwrap();
    let pid: i32 = held
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(&pool, 3, stop.clone());
    // Watch Vault's password (root, directly) and the pool's generation side by side.
    let root = root_client();
    let mut password = root.static_creds("database", &name).await.unwrap().password;
    let mut generation = pool.engine().generation();
    let (mut vault_changed, mut delays) = (None, Vec::new());
    // Until Vault has rotated three times (its queue runs every few seconds, so the 5 s
    // period is 5-10 s in practice), at most 60 s.
    while generation.0 < 4 && started.elapsed() < Duration::from_secs(60) {
        let now = root.static_creds("database", &name).await.unwrap().password;
        if now.expose_secret() != password.expose_secret() {
            password = now;
            vault_changed = Some(Instant::now());
        }
        let g = pool.engine().generation();
        if g != generation {
            generation = g;
            if let Some(t) = vault_changed.take() {
                delays.push(t.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    let still: i32 = held
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    drop(held);
    let reads = proxy.hits().len();
    let per_minute = reads as f64 / started.elapsed().as_secs_f64() * 60.0;
    println!(
        "static role, rotation period 5 s (Vault checks its queue every few seconds), {:?} under load: {} generations, password changes \
         picked up {delays:?} after Vault made them; {} queries, {} failed; {reads} Vault \
         reads ({per_minute:.1}/min); the held session kept its pid: {}",
        started.elapsed(),
        generation.0,
        report.ok,
        report.failed,
        still == pid
    );
    assert!(generation.0 >= 4, "{} generations in 60 s", generation.0);
    // Each picked up soon after Vault made it (a read at Vault's ttl + 1 s, then backoff
    // from 1 s while Vault's queue has not run yet).
    // Most changes are seen here first (the watch polls every 100 ms; the pool reads at
    // Vault's ttl + 1 s): a pickup with no change seen before it would be a read ahead
    // of Vault — allowed once, for a race with this watch.
    assert!(
        delays.len() >= 2,
        "{delays:?}: changes picked up before Vault made them?"
    );
    assert!(
        delays.iter().all(|d| *d < Duration::from_secs(15)),
        "{delays:?}"
    );
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(still, pid, "the session held across rotations was replaced");
    // A few reads per rotation (the change, the issue, a confirming read, one or two while
    // Vault's queue is late); a loop asking before Vault made it would be hundreds.
    assert!(
        reads <= 4 * generation.0 as usize + 4,
        "{reads} Vault reads"
    );
    pool.close().await;
    root.static_creds("database", &name).await.unwrap(); // still there: nothing revoked
    vault_write(
        &var("VAULT_ADDR"),
        &var("VAULTPOOL_ROOT_TOKEN"),
        reqwest::Method::DELETE,
        &format!("database/static-roles/{name}"),
        serde_json::json!({}),
    )
    .await;
    admin
        .batch_execute(&format!(
            "REVOKE ALL ON items FROM \"{user}\"; DROP ROLE \"{user}\";"
        ))
        .await
        .unwrap();
}

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/minted_passwords.rs"]
mod minted_passwords;

/// The example's own credential source (passwords minted with `ALTER ROLE`, no Vault
/// client at all) under load: rotations every few seconds, no failed query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_source_of_your_own_rotates_under_load() {
    let target = minted_passwords::Target {
        host: var("PGHOST"),
        port: var("PGPORT").parse().unwrap(),
        database: "adaptive_immunity".into(),
        admin_user: "postgres".into(),
        admin_password: var("VAULTPOOL_PG_SUPER_PASSWORD"),
    };
    let user = format!("minted_{}", unique().replace('-', "_"));
    let report = minted_passwords::run(
        &target,
        &user,
        Duration::from_secs(9),
        4,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    println!(
        "custom source (minted passwords, 9 s lifetime), 20 s under load: {} rotations, {} \
         queries, {} failed",
        report.generation.0 - 1,
        report.queries,
        report.failed.len()
    );
    assert!(report.generation.0 >= 3, "{report:?}");
    assert!(
        report.failed.is_empty(),
        "{:?}",
        &report.failed[..report.failed.len().min(5)]
    );
    pg_admin("adaptive_immunity")
        .await
        .batch_execute(&format!(
            "REVOKE ALL ON items FROM \"{user}\"; DROP ROLE \"{user}\";"
        ))
        .await
        .unwrap();
}

/// Pre-warm (the default): the connections handed out after a rotation were opened
/// before `rotate()` returned — with the new credentials, while the old ones served —
/// so no checkout waited on a connect; with `prewarm(false)` they are opened after, on
/// demand. PostgreSQL's own `backend_start` says when each session began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prewarmed_rotation_hands_out_connections_opened_before_the_swap() {
    let role = create_role("1h", "1h").await;
    for prewarm in [true, false] {
        let pool = VaultPgPool::builder(&role)
            .vault(approle_client("IMMUNE_SYSTEM"))
            .pg_config(pg_target())
            .max_size(4)
            .prewarm(prewarm)
            .build()
            .await
            .unwrap();
        // Four connections in the pool.
        let held: Vec<_> = futures_util::future::join_all((0..4).map(|_| pool.get()))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        drop(held);
        pool.rotate().await.unwrap();
        let timing = pool.status().lease.last_rotation.unwrap();
        let rotated: std::time::SystemTime = pg_admin("adaptive_immunity")
            .await
            .query_one("SELECT now()", &[])
            .await
            .unwrap()
            .get(0);
        let conns: Vec<_> = futures_util::future::join_all((0..4).map(|_| pool.get()))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let mut opened_before = 0;
        for c in &conns {
            assert_eq!(c.generation(), Generation(2));
            let started: std::time::SystemTime = c
                .query_one(
                    "SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if started < rotated {
                opened_before += 1;
            }
        }
        println!(
            "pre-warm {prewarm}: warmed {} in {:?}; {opened_before} of 4 connections handed \
             out after the rotation were opened before it returned",
            timing.warmed, timing.warm
        );
        if prewarm {
            assert_eq!(timing.warmed, 4, "{timing:?}");
            assert_eq!(opened_before, 4);
        } else {
            assert_eq!(timing.warmed, 0, "{timing:?}");
            assert_eq!(opened_before, 0);
        }
        drop(conns);
        pool.close().await;
        assert_eq!(
            pool.status().prepared,
            0,
            "prepared connections left after close"
        );
    }
    assert_leases_gone(&role).await;
}

/// `max_lifetime`: a connection older than it (less up to 20 %) is closed before reuse
/// and replaced by a new session; a younger one is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_max_lifetime_is_replaced_before_reuse() {
    let role = create_role("1h", "1h").await;
    let pool = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_target())
        .max_size(1)
        .max_lifetime(Some(Duration::from_secs(2)))
        .build()
        .await
        .unwrap();
    let pid = async || -> i32 {
        pool.get()
            .await
            .unwrap()
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0)
    };
    let first = pid().await;
    assert_eq!(pid().await, first, "reused while young");
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_ne!(pid().await, first, "reused past its max lifetime");
    pool.close().await;
}

/// A driver the crate has no feature for, as a user would plug it in: a `Connect` of its
/// own (here plain tokio-postgres, opened by the test) behind `VaultPool::custom`.
#[derive(Clone)]
struct OwnDriver;

impl vaultpool::pool::Connect for OwnDriver {
    type Conn = vaultpool::postgres::tokio_postgres::Client;
    type Error = vaultpool::postgres::tokio_postgres::Error;

    fn open<'a>(
        &'a self,
        creds: &'a vaultpool::Credentials,
    ) -> vaultpool::lease::BoxFuture<'a, Result<Self::Conn, Self::Error>> {
        Box::pin(async move {
            let mut config = pg_target();
            config
                .user(&creds.username)
                .password(creds.password.expose_secret());
            let (client, conn) = config
                .connect(vaultpool::postgres::tokio_postgres::NoTls)
                .await?;
            tokio::spawn(conn);
            Ok(client)
        })
    }

    fn is_auth_failure(&self, e: &Self::Error) -> bool {
        e.code().is_some_and(|c| c.code() == "28P01")
    }

    fn check<'a>(
        &'a self,
        conn: &'a mut Self::Conn,
    ) -> vaultpool::lease::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            conn.simple_query("")
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn target(&self) -> String {
        "PostgreSQL (the test's own driver)".into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_of_your_own_behind_vault_pool_custom_rotates_under_load() {
    let role = create_role("1h", "2h").await;
    let pool =
        vaultpool::pool::VaultPool::custom(vaultpool::lease::DatabaseRole::new(&role), OwnDriver)
            .vault(approle_client("IMMUNE_SYSTEM"))
            .max_size(4)
            .policy(fast_policy())
            .build()
            .await
            .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::<String>::new())),
    );
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (pool, stop, ok, failed) = (pool.clone(), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = async {
                        let c = pool.get().await.map_err(|e| e.to_string())?;
                        c.query_one("SELECT count(*) FROM items", &[])
                            .await
                            .map_err(|e| e.to_string())
                    }
                    .await;
                    match r {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            failed.lock().unwrap().push(e);
                            0
                        }
                    };
                }
            })
        })
        .collect();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        pool.rotate().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let status = pool.status();
    pool.close().await;
    let failed = failed.lock().unwrap().clone();
    let ok = ok.load(Ordering::Relaxed);
    println!(
        "own driver: queries ok {ok}, failed {}, generation {}, prepared by pre-warm at the end {}",
        failed.len(),
        status.lease.generation.0,
        status.prepared
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 100, "too few queries: {ok}");
    assert_eq!(status.lease.generation, Generation(4));
    assert!(status.size <= 4, "{status:?}");
    assert_leases_gone(&role).await;
}

/// A pool of 4 on `role` through `client`, on the fast policy.
async fn small_fast_pool(
    client: vaultpool::vault::Client,
    role: String,
) -> vaultpool::Result<VaultPgPool> {
    VaultPgPool::builder(&role)
        .vault(client)
        .pg_config(pg_target())
        .max_size(4)
        .policy(fast_policy())
        .build()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caching_vault_proxy_never_makes_the_pool_retire_or_revoke_its_serving_lease() {
    scenarios::a_caching_vault_proxy_hands_back_the_serving_lease("deadpool", small_fast_pool)
        .await;
}

/// The same through a Vault Agent with `cache {}` (api_proxy with the auto-auth token):
/// the revoke on close() clears the Agent's cache (`agent/v1/cache-clear`, after the
/// Proxy's endpoint answered 404), so the next pool gets a new lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caching_vault_agent_never_makes_the_pool_retire_or_revoke_its_serving_lease() {
    scenarios::a_caching_bao_hands_back_the_serving_lease("agent", "deadpool", small_fast_pool)
        .await;
}

/// Every session of the pool terminated under load (`pg_terminate_backend`, as a revoke
/// that ends sessions does), 20 times: each terminated session fails at most the one
/// query it was running (or the one that took it just then), never a second one —
/// a connection whose server sent FATAL is never handed out again, even before
/// tokio-postgres has read the end of its stream. Plaintext (`sslmode=disable`, through
/// the pool's plaintext connector) and TLS (`require` against the stack's TLS-capable
/// server: rustls, wrapped). Before, in 2 of 8 runs more queries failed than sessions
/// were killed (18 and 23 for 16).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_sessions_fail_at_most_their_own_query() {
    use vaultpool::postgres::tokio_postgres::config::SslMode;
    terminate_every_session_20_times(SslMode::Disable).await;
    terminate_every_session_20_times(SslMode::Require).await;
}

async fn terminate_every_session_20_times(
    mode: vaultpool::postgres::tokio_postgres::config::SslMode,
) {
    use std::sync::atomic::AtomicUsize;
    let role = create_role("5m", "1h").await;
    let mut target = pg_target();
    target.ssl_mode(mode);
    let pool = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(target)
        .max_size(16)
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    let user = pool.engine().current().credentials.username.clone();
    let admin = pg_admin("adaptive_immunity").await;
    let encrypted = encrypted(&pool).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let (pool, stop, ok, failed) = (pool.clone(), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let result = match pool.get().await {
                        Ok(client) => client
                            .query_one("SELECT 1", &[])
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    match result {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let mut rounds = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = failed.load(Ordering::Relaxed);
        let killed = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                &[&user],
            )
            .await
            .unwrap()
            .iter()
            .filter(|r| r.get::<_, bool>(0))
            .count();
        tokio::time::sleep(Duration::from_millis(300)).await;
        rounds.push((killed, failed.load(Ordering::Relaxed) - before));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (killed, lost): (usize, usize) =
        rounds.iter().fold((0, 0), |(k, l), (a, b)| (k + a, l + b));
    println!(
        "{mode:?} (encrypted: {encrypted}): 20 rounds of terminating every session under 32 \
         workers (pool of 16): {killed} sessions killed, {lost} queries failed, {} served; per \
         round (killed, failed): {rounds:?}",
        ok.load(Ordering::Relaxed)
    );
    assert_eq!(
        encrypted,
        matches!(
            mode,
            vaultpool::postgres::tokio_postgres::config::SslMode::Require
        ),
        "TLS used (or not) against the mode asked for"
    );
    assert!(
        rounds.iter().all(|(k, f)| f <= k),
        "more queries failed than sessions were killed: {rounds:?}"
    );
    assert!(killed >= 20, "the rounds killed {killed} sessions");
    pool.close().await;
    assert_leases_gone(&role).await;
}

/// `cancel_token()` on a pooled plaintext connection cancels its running query with
/// `NoTls`, as on a plain tokio-postgres client (the pool opens plaintext connections
/// through a connector of its own, and its cancel token picks that connector).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_query_is_cancelled_through_the_cancel_token() {
    use vaultpool::postgres::tokio_postgres::{NoTls, error::SqlState};
    let role = create_role("5m", "1h").await;
    let pool = pool_for(&role, 2).await;
    let client = pool.get().await.unwrap();
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(NoTls).await
    });
    let started = Instant::now();
    let err = client.query("SELECT pg_sleep(30)", &[]).await.unwrap_err();
    let took = started.elapsed();
    canceller.await.unwrap().unwrap();
    println!("pg_sleep(30) cancelled after {took:?}: {err}");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert!(took < Duration::from_secs(25), "not cancelled: {took:?}");
    // The connection serves on.
    client.query_one("SELECT 1", &[]).await.unwrap();
    drop(client);
    pool.close().await;
}

/// `.tls(NoTls)` with tokio-postgres' default `prefer`, against a server that offers TLS
/// (the stack's): plaintext, as with deadpool-postgres — the pool must not try TLS with
/// a connector that has none ("no TLS implementation configured").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notls_connector_with_prefer_connects_in_plaintext() {
    use vaultpool::postgres::tokio_postgres::{NoTls, config::SslMode};
    let role = create_role("5m", "1h").await;
    let mut target = pg_target();
    target.ssl_mode(SslMode::Prefer);
    let pool = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(target)
        .tls(NoTls)
        .max_size(2)
        .build()
        .await
        .unwrap();
    assert!(!encrypted(&pool).await);
    pool.close().await;
}
