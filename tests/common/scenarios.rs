//! Scenarios every pool flavour must pass, written once against [`TestPool`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vaultpool::Generation;
use vaultpool::lease::Engine;

use super::*;

/// Every username the engine has used, collected as generations change.
fn record_usernames(
    engine: &Engine,
) -> (
    Arc<std::sync::Mutex<Vec<String>>>,
    tokio::task::JoinHandle<()>,
) {
    let names = Arc::new(std::sync::Mutex::new(vec![
        engine.current().credentials.username.clone(),
    ]));
    let task = {
        let (engine, names) = (engine.clone(), names.clone());
        tokio::spawn(async move {
            let mut rx = engine.subscribe();
            while rx.changed().await.is_ok() {
                let name = engine.current().credentials.username.clone();
                let mut names = names.lock().unwrap();
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        })
    };
    (names, task)
}

/// Test 1: 32 tasks query for 62 s while the lease is rotated by schedule (the role's
/// TTL = max TTL = 8 s) and by force every 7 s. Zero failed queries, ≥ 10 rotations, at
/// most two dynamic roles alive at once, nothing left after close.
pub async fn rotation_under_load_loses_no_query<P: TestPool>(pool: P, role: &str, flavour: &str) {
    let admin = pg_admin("postgres").await;
    let (usernames, watcher) = record_usernames(pool.engine());
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(&pool, 32, stop.clone());

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
    let report = load.await.unwrap();
    let status = pool.engine().status();
    pool.close().await;
    watcher.abort();

    let names = usernames.lock().unwrap().clone();
    let left = roles_alive(&admin, &names).await;
    let leases = leases_of(role).await;
    println!(
        "{flavour} rotation_under_load: queries ok {}, failed {}, rotations {} ({forced} forced), \
         renewals {}, users {}, max roles alive {max_alive}, roles left after close {}, leases \
         left {}",
        report.ok,
        report.failed,
        status.rotations,
        status.renewals,
        names.len(),
        left.len(),
        leases.len()
    );
    assert_eq!(report.failed, 0, "failed queries: {:?}", report.errors);
    assert!(report.ok > 1000, "too few queries ran: {}", report.ok);
    assert!(
        status.rotations >= 10,
        "only {} rotations",
        status.rotations
    );
    assert!(forced >= 5);
    assert!(max_alive <= 2, "{max_alive} dynamic roles alive at once");
    assert!(left.is_empty(), "roles left behind: {left:?}");
    assert!(leases.is_empty(), "leases left behind: {leases:?}");
}

/// Test 4: every lease of the role is revoked behind the pool's back (revocation ends
/// the sessions); the pool re-leases on the first refused login and serves again.
pub async fn revoked_from_outside_serves_again<P: TestPool>(pool: P, role: &str, flavour: &str) {
    for _ in 0..4 {
        pool.query().await.unwrap();
    }
    root_client()
        .revoke_lease_prefix(&format!("database/creds/{role}"))
        .await
        .unwrap();
    let revoked = Instant::now();
    let mut failures = Vec::new();
    let deadline = revoked + Duration::from_secs(10);
    loop {
        match pool.query().await {
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
        "{flavour} revoked_from_outside: served again {took:?} after the revocation, {} failed \
         queries before: {failures:?}",
        failures.len()
    );
    assert_eq!(pool.engine().generation(), Generation(2));
    assert!(took < Duration::from_secs(5), "took {took:?}");
    for _ in 0..20 {
        pool.query().await.unwrap();
    }
    pool.close().await;
    assert!(leases_of(role).await.is_empty());
}

/// Test 6: 100 forced rotations with a query after each, then close: no dynamic role in
/// pg_roles, no lease in Vault.
pub async fn hundred_rotations_then_close_leave_nothing<P: TestPool>(
    pool: P,
    role: &str,
    flavour: &str,
) {
    let admin = pg_admin("postgres").await;
    let mut usernames = vec![pool.engine().current().credentials.username.clone()];
    let started = Instant::now();
    for i in 0..100u64 {
        let g = pool.rotate().await.unwrap();
        assert_eq!(g, Generation(i + 2));
        pool.query().await.unwrap();
        usernames.push(pool.engine().current().credentials.username.clone());
    }
    let took = started.elapsed();
    let alive_before_close = roles_alive(&admin, &usernames).await.len();
    pool.close().await;
    let left = roles_alive(&admin, &usernames).await;
    let leases = leases_of(role).await;
    println!(
        "{flavour} hundred_rotations: {} users in {took:?}, alive before close \
         {alive_before_close}, after close {}, leases left {}",
        usernames.len(),
        left.len(),
        leases.len()
    );
    assert!(left.is_empty(), "roles left: {left:?}");
    assert!(leases.is_empty(), "leases left: {leases:?}");
}

/// A Vault Proxy with `cache {}` (AppRole auto-auth, `use_auto_auth_token`: the pool holds
/// no token) hands every request for credentials the lease it issued first, with the TTL
/// it had then. `build` makes a pool of the flavour through a client and a role.
///
/// 1. Under load, three forced rotations: each is refused as "not new credentials" —
///    never swapped in, never retiring or revoking the serving lease or user — and no
///    query fails.
/// 2. `close()` revokes, and clears the lease from the Proxy's cache: the next pool on
///    the role gets a new lease, not the revoked one.
/// 3. A lease revoked where the cache cannot see it (straight at Vault) stays in the
///    cache: the next pool fails to start with an error that says so (Vault no longer
///    knows the lease), instead of "the backend refused the credentials".
pub async fn a_caching_vault_proxy_hands_back_the_serving_lease<P, F, Fut>(flavour: &str, build: F)
where
    P: TestPool,
    F: Fn(vaultpool::vault::Client, String) -> Fut,
    Fut: std::future::Future<Output = vaultpool::Result<P>>,
{
    a_caching_bao_hands_back_the_serving_lease("proxy", flavour, build).await;
}

/// [`a_caching_vault_proxy_hands_back_the_serving_lease`] through `bao {mode}` (`proxy`
/// or `agent`, each with `cache {}`; their cache-clear endpoints differ).
pub async fn a_caching_bao_hands_back_the_serving_lease<P, F, Fut>(
    mode: &str,
    flavour: &str,
    build: F,
) where
    P: TestPool,
    F: Fn(vaultpool::vault::Client, String) -> Fut,
    Fut: std::future::Future<Output = vaultpool::Result<P>>,
{
    let role = create_role("1m", "10m").await;
    let port = free_port();
    let config = format!(
        "vault {{ address = \"{}\" }}\n{}\ncache {{}}\napi_proxy {{ use_auto_auth_token = true }}\n\
         listener \"tcp\" {{ address = \"127.0.0.1:{port}\" tls_disable = true }}\n",
        var("VAULT_ADDR"),
        AUTO_AUTH.replace("SINK", "")
    );
    let proxy = BaoHelper::prepare(mode, &config);
    approle_files(&proxy.dir, ("10m", "1h")).await;
    let proxy = proxy.spawn();
    eventually(Duration::from_secs(10), "the Proxy listening", || {
        port_open(&format!("127.0.0.1:{port}"))
    })
    .await;
    let client = || {
        vaultpool::vault::Client::builder()
            .address(format!("http://127.0.0.1:{port}"))
            .auth(vaultpool::vault::AuthMethod::ProxyAutoAuth)
            .build()
            .unwrap()
    };

    // The listener opens before auto-auth has a token.
    let ready = Instant::now();
    while let Err(e) = client().login().await {
        assert!(
            ready.elapsed() < Duration::from_secs(15),
            "the Proxy never logged in: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 1. Forced rotations through the cache, under load.
    let pool = build(client(), role.clone()).await.unwrap();
    let first = pool.engine().current();
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(&pool, 8, stop.clone());
    for i in 1..=3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let e = pool.rotate().await.unwrap_err();
        println!("{flavour}, caching {mode}, forced rotation {i}: {e}");
        assert_eq!(
            e.kind(),
            vaultpool::ErrorKind::CredentialsUnavailable,
            "{e}"
        );
        assert!(e.to_string().contains("already holds"), "{e}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    let now = pool.engine().current();
    println!(
        "{flavour}, caching {mode}: {} queries, {} failed, generation {} (lease {})",
        report.ok, report.failed, now.generation, now.lease.id
    );
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert!(report.ok > 100, "only {} queries", report.ok);
    assert_eq!(
        now.generation, first.generation,
        "swapped in the same lease"
    );
    assert_eq!(now.lease.id, first.lease.id);
    // The pool still logs in as its user: nothing retired it.
    pool.query().await.unwrap();
    pool.close().await;

    // 2. The revoke evicted the cached lease: a new pool gets a new one.
    let second = build(client(), role.clone()).await.unwrap_or_else(|e| {
        panic!(
            "{flavour}: a pool after close() through the cache: {e}\n{}",
            proxy.output()
        )
    });
    let lease = second.engine().current().lease.id.clone();
    assert_ne!(lease, first.lease.id, "the revoked lease again");
    second.query().await.unwrap();

    // 3. Revoked straight at Vault, where the cache cannot see it: the cache keeps it.
    root_client().revoke_lease(&lease).await.unwrap();
    let e = match build(client(), role.clone()).await {
        Ok(p) => {
            let id = p.engine().current().lease.id.clone();
            p.close().await;
            panic!("{flavour}: a pool started on the revoked lease {id} (was {lease})");
        }
        Err(e) => e,
    };
    println!("{flavour}, caching {mode}, a revoked lease in the cache: {e}");
    assert!(e.to_string().contains("no longer knows"), "{e}");
    second.close().await;
    drop(proxy);
    assert_leases_gone(&role).await;
}
