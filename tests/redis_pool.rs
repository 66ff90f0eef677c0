//! VaultRedisPool against real OpenBao (redis-database-plugin) and Redis 7.
#![cfg(feature = "redis")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use vaultpool::lease::KvCredentials;
use vaultpool::redis::VaultRedisPool;
use vaultpool::redis::redis::AsyncCommands;
use vaultpool::{ErrorKind, Generation};

async fn pool_for(role: &str, vault: vaultpool::vault::Client) -> VaultRedisPool {
    VaultRedisPool::builder(role)
        .vault(vault)
        .address(redis_url())
        .max_size(8)
        .policy(fast_policy())
        .auth_failure_wait(Duration::from_secs(2))
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rotation_under_load_loses_no_command_and_old_acl_users_go() {
    // 10 s leases that cannot be renewed past 10 s: a scheduled rotation every ~5 s.
    let role = create_redis_role("10s", "10s").await;
    let pool = pool_for(&role, approle_client("IMMUNE_SYSTEM")).await;
    let users = Arc::new(std::sync::Mutex::new(vec![
        pool.engine().current().credentials.username.clone(),
    ]));
    let watcher = {
        let (pool, users) = (pool.clone(), users.clone());
        tokio::spawn(async move {
            let mut rx = pool.engine().subscribe();
            while rx.changed().await.is_ok() {
                users
                    .lock()
                    .unwrap()
                    .push(pool.engine().current().credentials.username.clone());
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_redis_load(&pool, 16, "load", stop.clone());
    let started = Instant::now();
    let mut max_alive = 0;
    let mut next_force = started + Duration::from_secs(7);
    while started.elapsed() < Duration::from_secs(32) {
        let names = users.lock().unwrap().clone();
        max_alive = max_alive.max(redis_users_alive(&names).await.len());
        if Instant::now() >= next_force {
            pool.rotate().await.unwrap();
            next_force = Instant::now() + Duration::from_secs(7);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, errors) = load.await.unwrap();
    let failed = errors.len();
    let status = pool.status().lease;
    // Scheduled and forced rotations pre-warm: connections opened before the swap.
    let warmed = status.last_rotation.map_or(0, |t| t.warmed);
    pool.close().await;
    watcher.abort();
    let names = users.lock().unwrap().clone();
    let left = redis_users_alive(&names).await;
    println!(
        "redis rotation_under_load: commands ok {} (SET+GET pairs), failed {failed}, rotations {}, \
         ACL users {}, max alive {max_alive}, left after close {}",
        ok,
        status.rotations,
        names.len(),
        left.len()
    );
    assert_eq!(failed, 0, "failed: {errors:?}");
    assert!(ok > 1000);
    assert!(status.rotations >= 5, "only {} rotations", status.rotations);
    assert!(
        warmed >= 1,
        "the last rotation pre-warmed nothing: {status:?}"
    );
    assert!(max_alive <= 2, "{max_alive} ACL users alive at once");
    assert!(left.is_empty(), "ACL users left: {left:?}");
    assert!(leases_of(&role).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_user_deleted_from_outside_is_replaced() {
    let role = create_redis_role("1h", "2h").await;
    let pool = pool_for(&role, approle_client("IMMUNE_SYSTEM")).await;
    redis_set_get(&pool, "app:outside").await.unwrap();
    let user = pool.engine().current().credentials.username.clone();
    // ACL DELUSER closes the user's connections at once, like a revocation.
    let reply = redis_admin(&["ACL", "DELUSER", &user]).await;
    assert!(reply.starts_with(":1"), "{reply}");
    let t = Instant::now();
    let mut failures = Vec::new();
    loop {
        match redis_set_get(&pool, "app:outside").await {
            Ok(()) => break,
            Err(e) => failures.push(e),
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "never served again: {failures:?}"
        );
    }
    println!(
        "redis deleted_from_outside: served again after {:?}, {} failures: {failures:?}",
        t.elapsed(),
        failures.len()
    );
    assert_eq!(pool.engine().generation(), Generation(2));
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_with_vault_gone_give_a_typed_error() {
    let vault = DevVault::start();
    vault.configure_redis("app", "1h").await;
    let pool = pool_for("app", vault.client().build().unwrap()).await;
    redis_set_get(&pool, "app:typed").await.unwrap();
    let user = pool.engine().current().credentials.username.clone();
    drop(vault); // Vault gone: no re-lease possible
    redis_admin(&["ACL", "DELUSER", &user]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let err = loop {
        match pool.get().await {
            Err(e) => break e,
            Ok(mut c) => {
                // An idle connection may not have noticed yet; using it fails.
                let r: Result<String, _> = vaultpool::redis::redis::cmd("PING")
                    .query_async(&mut *c)
                    .await;
                drop(r);
            }
        }
        assert!(Instant::now() < deadline, "no typed error");
    };
    println!("redis refused credentials: {err}");
    assert_eq!(err.kind(), ErrorKind::CredentialsUnavailable, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("Redis at") && msg.contains("role app"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_kv_password_rotation_is_picked_up_without_restart() {
    let user = format!("kvtest-{}", unique());
    let (p1, p2) = (format!("p1-{}", unique()), format!("p2-{}", unique()));
    let rules = ["on", "~app:*", "+@all", "-@dangerous"];
    let mut args = vec!["ACL", "SETUSER", user.as_str()];
    args.extend(rules);
    let add_p1 = format!(">{p1}");
    args.push(&add_p1);
    assert!(redis_admin(&args).await.starts_with("+OK"));
    let path = format!("redis/kvtest-{}", unique());
    let secret = |password: &str| {
        json!({
            "host": var("REDIS_HOST"),
            "port": var("REDIS_PORT"),
            "username": user,
            "password": password,
        })
    };
    kv_put(&path, secret(&p1)).await;
    let pool = VaultRedisPool::builder_for(
        KvCredentials::new(&path).poll_interval(Duration::from_secs(1)),
    )
    .vault(root_client())
    .build()
    .await
    .unwrap();
    redis_set_get(&pool, "app:kv").await.unwrap();
    assert_eq!(pool.engine().generation(), Generation(1));

    // Commands keep flowing while the password changes underneath.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match redis_set_get(&pool, "app:kv").await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        })
    };

    // Rotate: add p2, publish it in KV, and once picked up, remove p1.
    let add_p2 = format!(">{p2}");
    assert!(
        redis_admin(&["ACL", "SETUSER", &user, &add_p2])
            .await
            .starts_with("+OK")
    );
    let t = Instant::now();
    kv_put(&path, secret(&p2)).await;
    let g = pool
        .engine()
        .wait_newer(Generation(1), Duration::from_secs(10))
        .await;
    let picked_up = t.elapsed();
    assert_eq!(g, Generation(2), "the new KV version was not picked up");
    let del_p1 = format!("<{p1}");
    assert!(
        redis_admin(&["ACL", "SETUSER", &user, &del_p1])
            .await
            .starts_with("+OK")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A wrong password in KV: verification refuses it; the pool keeps serving on p2.
    kv_put(&path, secret("not-the-password")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = pool.status().lease;
    assert_eq!(
        status.generation,
        Generation(2),
        "a bad password must not be swapped in"
    );
    let last = status.last_error.unwrap_or_default();
    assert!(last.contains("verifying new credentials"), "{last}");
    redis_set_get(&pool, "app:kv").await.unwrap();

    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    println!(
        "redis static KV: new version picked up after {picked_up:?}, {ok} SET+GET pairs during \
         the change, {} failed; bad password refused: {last}",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(!last.contains("not-the-password"));
    pool.close().await;
    redis_admin(&["ACL", "DELUSER", &user]).await;
}

/// A blocking command on a pooled connection waits as long as it asks: `BLPOP` on an
/// empty list for 3 s returns nil after ~3 s (redis' default 500 ms response timeout cut
/// it at 0.50 s with "timed out"), and a value pushed meanwhile is returned at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_commands_on_a_pooled_connection_wait_as_long_as_they_ask() {
    let role = create_redis_role("1h", "1h").await;
    let pool = pool_for(&role, root_client()).await;
    let key = format!("app:blpop-{}", unique());
    let mut conn = pool.get().await.unwrap();
    let t = Instant::now();
    let got: Option<(String, String)> = conn.blpop(&key, 3.0).await.unwrap();
    let waited = t.elapsed();
    assert_eq!(got, None);
    assert!(
        waited >= Duration::from_millis(2900),
        "BLPOP 3 returned after {waited:?}"
    );
    // Unblocked by a push from another pooled connection.
    let pusher = {
        let (pool, key) = (pool.clone(), key.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let mut c = pool.get().await.unwrap();
            let _: i64 = c.rpush(&key, "job-1").await.unwrap();
        })
    };
    let t = Instant::now();
    let got: Option<(String, String)> = conn.blpop(&key, 10.0).await.unwrap();
    let unblocked = t.elapsed();
    pusher.await.unwrap();
    assert_eq!(got, Some((key.clone(), "job-1".to_string())));
    println!(
        "redis BLPOP 3 on a pooled connection: nil after {waited:?}; unblocked by a push after {unblocked:?}"
    );
    drop(conn);
    // A response timeout set on the builder applies (and says so).
    let strict = VaultRedisPool::builder(&role)
        .vault(root_client())
        .address(redis_url())
        .response_timeout(Some(Duration::from_millis(300)))
        .build()
        .await
        .unwrap();
    let mut c = strict.get().await.unwrap();
    let t = Instant::now();
    let err = c
        .blpop::<_, Option<(String, String)>>(&key, 3.0)
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(err.is_timeout(), "{err}");
    drop(c);
    strict.close().await;
    pool.close().await;
}

/// A KV secret moves the pool to a new address: version 2 names another host:port (a
/// proxy in front of the same Redis); the new address is verified, new connections go
/// there, commands never fail. Before, a later version's host/port was ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_kv_version_with_another_address_moves_the_pool() {
    let user = format!("kvmove-{}", unique());
    let pw = format!("pw-{}", unique());
    let add = format!(">{pw}");
    assert!(
        redis_admin(&[
            "ACL",
            "SETUSER",
            &user,
            "on",
            "~app:*",
            "+@all",
            "-@dangerous",
            &add
        ])
        .await
        .starts_with("+OK")
    );
    let proxy = Proxy::start(
        &format!("{}:{}", var("REDIS_HOST"), var("REDIS_PORT")),
        "\u{0}",
    )
    .await;
    let proxy_port = proxy.addr.rsplit(':').next().unwrap().to_owned();
    let path = format!("redis/kvmove-{}", unique());
    let secret = |port: &str| json!({"host": var("REDIS_HOST"), "port": port, "username": user, "password": pw});
    kv_put(&path, secret(&var("REDIS_PORT"))).await;
    let pool = VaultRedisPool::builder_for(
        KvCredentials::new(&path).poll_interval(Duration::from_secs(1)),
    )
    .vault(root_client())
    .build()
    .await
    .unwrap();
    redis_set_get(&pool, "app:kvmove").await.unwrap();
    assert_eq!(proxy.accepted.load(Ordering::Relaxed), 0);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match redis_set_get(&pool, "app:kvmove").await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    kv_put(&path, secret(&proxy_port)).await;
    let g = pool
        .engine()
        .wait_newer(Generation(1), Duration::from_secs(10))
        .await;
    let moved = t.elapsed();
    assert_eq!(g, Generation(2), "the new version was not picked up");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    let through_proxy = proxy.accepted.load(Ordering::Relaxed);
    println!(
        "redis KV address change: picked up after {moved:?}; {through_proxy} connections to \
         the new address; {ok} SET+GET pairs, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    // The verifying connection and the pool's new ones went to the new address.
    assert!(
        through_proxy >= 2,
        "{through_proxy} connections to the new address"
    );
    let conn = pool.get().await.unwrap();
    assert_eq!(conn.generation(), Generation(2));
    drop(conn);
    pool.close().await;
    redis_admin(&["ACL", "DELUSER", &user]).await;
}

/// A KV secret without `host` is refused at build, naming the path and the fix (before,
/// the pool silently connected to 127.0.0.1:6379).
#[tokio::test]
async fn a_kv_secret_without_a_host_is_refused_at_build() {
    let path = format!("redis/nohost-{}", unique());
    kv_put(
        &path,
        json!({"port": "6390", "username": "default", "password": "x"}),
    )
    .await;
    let err = VaultRedisPool::builder_kv(&path)
        .vault(root_client())
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("no `host`") && msg.contains(&path), "{msg}");
}

/// A policy that grants the KV secret's data but not its metadata (which polling reads)
/// is refused at build, naming the path and the capability to add; before, the build
/// worked and every poll failed for ever.
#[tokio::test]
async fn a_kv_policy_without_metadata_access_is_refused_at_build() {
    let path = format!("redis/nometa-{}", unique());
    kv_put(
        &path,
        json!({
            "host": var("REDIS_HOST"),
            "port": var("REDIS_PORT"),
            "username": "default",
            "password": var("VAULTPOOL_REDIS_ADMIN_PASSWORD"),
        }),
    )
    .await;
    let name = format!("no-metadata-{}", unique());
    let hcl = format!("path \"secret/data/{path}\" {{ capabilities = [\"read\"] }}");
    let (role_id, secret_id) = approle(
        &var("VAULT_ADDR"),
        &var("VAULTPOOL_ROOT_TOKEN"),
        &name,
        &hcl,
        ("1h", "4h"),
    )
    .await;
    let client = builder().app_role(role_id, secret_id).build().unwrap();
    // The data itself is readable with this policy...
    client.read_kv("secret", &path).await.unwrap();
    // ...but the pool is refused before anything is leased.
    let err = VaultRedisPool::builder_kv(&path)
        .vault(client)
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("secret/metadata/{path}")) && msg.contains("`read`"),
        "{msg}"
    );
    println!("redis KV without metadata access: {msg}");
}
