//! The fault suite: Vault sealed during a run, AppRole tokens expiring again and again, a
//! Vault that hangs, and 200 pools whose Vault comes back after an outage. Each test runs
//! a real pool (or engines) against a real OpenBao and the stack's PostgreSQL, and asserts
//! that nothing is lost; each prints what it measured.
#![cfg(feature = "postgres")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use vaultpool::Generation;
use vaultpool::lease::{DatabaseRole, Engine};

/// One fault at a time: each test times renewals against its own Vault, and two of them
/// side by side on a 2-core machine (200 engines next to a seal/unseal) measure the
/// machine, not the engine.
static ONE_FAULT_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_sealed_during_a_run_is_reported_and_renewal_resumes_after_unseal() {
    let _one = ONE_FAULT_AT_A_TIME.lock().await;
    let vault = PersistentVault::start("app", "45s", "1h").await;
    // Renew at half the TTL (20.25–22.5 s into the 45 s lease); rotation would start at
    // 40 s, so the renewal after the unseal (28 s) has 12 s before the engine would
    // rather rotate.
    let mut policy = fast_policy();
    policy.renew_fraction = 0.5;
    // Renewal points this test reasons about: no first renewal spread forward.
    policy.first_renewal_spread = 0.0;
    let pool = small_pool_with("app", vault.client(), policy).await;
    let stop = Arc::new(AtomicBool::new(false));
    let workers = spawn_load(&pool, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(16)).await;

    // Sealed for 12 s (16–28 s), across the renewal point.
    vault.seal().await;
    let sealed_at = Instant::now();
    let mut seen_sealed = None;
    while sealed_at.elapsed() < Duration::from_secs(12) {
        let status = pool.status().lease;
        if let Some(e) = status.last_error.filter(|e| e.contains("Vault is sealed")) {
            seen_sealed = Some((e, status.health));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (sealed_error, health_sealed) = seen_sealed.expect("no sealed error reported while sealed");
    assert_eq!(pool.status().lease.generation, Generation(1));
    // Counted while still sealed: the retry can succeed while `unseal()` is still waiting
    // for the node to report itself active (a CI run read the count just after that).
    let renewals_before = pool.status().lease.renewals;
    let unseal_started = Instant::now();
    vault.unseal().await;
    let unsealed_at = Instant::now();
    let unseal_took = unsealed_at - unseal_started;
    while pool.status().lease.renewals == renewals_before {
        assert!(
            unsealed_at.elapsed() < Duration::from_secs(10),
            "no renewal within 10 s of the unseal (retries are at most 1 s apart): {:?}",
            pool.status().lease
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = unsealed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let LoadReport {
        ok, failed, errors, ..
    } = workers.await.unwrap();
    let status = pool.status().lease;
    println!(
        "sealed for 12 s across the renewal point: {ok} queries, {} failed; reported \
         {health_sealed:?} with \"{sealed_error}\"; unseal took {unseal_took:?}; renewed \
         {recovered:?} after Vault was active again (generation {}, {:?} left)",
        failed, status.generation.0, status.ttl_remaining
    );
    assert_eq!(failed, 0, "{errors:?}");
    assert_eq!(
        status.generation,
        Generation(1),
        "the lease was renewed, not replaced"
    );
    assert!(status.last_error.is_none(), "{:?}", status.last_error);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_tokens_that_keep_expiring_are_never_noticed_by_the_pool() {
    let _one = ONE_FAULT_AT_A_TIME.lock().await;
    // short-token: token TTL 4 s, max TTL 10 s: renewed, then replaced by a fresh login
    // every ~10 s; the leases it issued die with it, so the engine rotates before that.
    let role = create_role("1h", "2h").await;
    let client = approle_client("SHORT_TOKEN");
    let first = client.login().await.unwrap().accessor;
    let pool = small_pool(&role, client.clone()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let workers = spawn_load(&pool, 4, stop.clone());
    let mut tokens = vec![first];
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(36) {
        if let Some(info) = client.token_info()
            && tokens.last() != Some(&info.accessor)
        {
            tokens.push(info.accessor);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let LoadReport {
        ok, failed, errors, ..
    } = workers.await.unwrap();
    let status = pool.status().lease;
    println!(
        "AppRole token max TTL 10 s over 36 s: {} tokens, {} rotations, {ok} queries, {} failed",
        tokens.len(),
        status.rotations,
        failed
    );
    assert_eq!(failed, 0, "{errors:?}");
    assert!(tokens.len() >= 3, "the token was not replaced: {tokens:?}");
    assert!(
        status.rotations >= 2,
        "leases were not moved off ending tokens"
    );
    pool.close().await;
    assert!(leases_of(&role).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_vault_never_stalls_the_request_path() {
    let _one = ONE_FAULT_AT_A_TIME.lock().await;
    let vault = PersistentVault::start("app", "40s", "1h").await;
    let proxy = Proxy::start(&vault.addr, "/v1/sys/leases/renew").await;
    let client = vaultpool::vault::Client::builder()
        .address(&proxy.addr)
        .token(&vault.root_token)
        .request_timeout(Duration::from_secs(1))
        .max_retries(1)
        .build()
        .unwrap();
    // Renew at half the TTL (18–20 s), well inside the hang; rotation would start at 35 s.
    let mut policy = fast_policy();
    policy.renew_fraction = 0.5;
    // Renewal points this test reasons about: no first renewal spread forward.
    policy.first_renewal_spread = 0.0;
    let pool = small_pool_with("app", client, policy).await;
    let stop = Arc::new(AtomicBool::new(false));
    let steady = spawn_load(&pool, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let LoadReport {
        ok: ok_steady,
        failed: failed_steady,
        slowest: slowest_steady,
        ..
    } = steady.await.unwrap();

    // Vault hangs (every request held for an hour) from 4 s to 24 s, across the renewal.
    proxy.delay_ms.store(3_600_000, Ordering::Relaxed);
    let hung_at = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let hung = spawn_load(&pool, 4, stop.clone());
    let mut timeout_seen = None;
    while hung_at.elapsed() < Duration::from_secs(20) {
        if let Some(e) = pool
            .status()
            .lease
            .last_error
            .filter(|e| e.contains("timed out"))
        {
            timeout_seen.get_or_insert((hung_at.elapsed(), e));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let LoadReport {
        ok: ok_hung,
        failed: failed_hung,
        errors: errors_hung,
        slowest: slowest_hung,
    } = hung.await.unwrap();
    proxy.delay_ms.store(0, Ordering::Relaxed);
    let back = Instant::now();
    let renewals = pool.status().lease.renewals;
    // The timeouts opened the client's breaker (5 s cooldown); the engine's next try is
    // then at most `retry_max` (1 s) away: 6 s, plus 4 s of slack, still 1 s before the
    // rotation point (35 s into the lease).
    while pool.status().lease.renewals == renewals {
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "no renewal once Vault answered: {:?}",
            pool.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (seen_after, error) = timeout_seen.expect("no timeout reported while Vault hung");
    println!(
        "Vault hanging for 20 s (request timeout 1 s): {ok_hung} queries, {} failed, slowest \
         query (checkout included) {slowest_hung:?} (steady: {ok_steady} queries, slowest {slowest_steady:?}); \
         renewal timeouts reported after {seen_after:?} (\"{error}\"); renewed {:?} after \
         Vault answered again",
        failed_hung,
        back.elapsed()
    );
    assert!(failed_steady == 0 && failed_hung == 0, "{errors_hung:?}");
    // A checkout that waited on Vault would take at least the 1 s request timeout.
    assert!(slowest_hung < Duration::from_secs(1), "{slowest_hung:?}");
    assert_eq!(pool.status().lease.generation, Generation(1));
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_pools_after_an_outage_renew_spread_out_not_in_step() {
    let _one = ONE_FAULT_AT_A_TIME.lock().await;
    const POOLS: usize = 200;
    let mut vault = PersistentVault::start("app", "80s", "1h").await;
    let proxy = Proxy::start(&vault.addr, "/v1/sys/leases/renew").await;
    // Renew at half the TTL (40 s, jittered down to 36 s); rotation would start at 72 s.
    let mut policy = vaultpool::lease::Policy::default();
    policy.renew_fraction = 0.5;
    // Every pool past its renewal point while Vault is down: no first renewal spread
    // forward (that spreading has its own test).
    policy.first_renewal_spread = 0.0;
    let started = Instant::now();
    let mut engines = Vec::with_capacity(POOLS);
    for _ in 0..POOLS {
        // One client per pool, as 200 services would have.
        let client = vaultpool::vault::Client::builder()
            .address(&proxy.addr)
            .token(&vault.root_token)
            .request_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        engines.push(
            Engine::builder(client, DatabaseRole::new("app"))
                .policy(policy)
                .build()
                .await
                .unwrap(),
        );
    }
    let issued_in = started.elapsed();
    assert!(
        issued_in < Duration::from_secs(25),
        "issuing {POOLS} leases took {issued_in:?}: the outage would miss the first renewals"
    );
    // Down across every renewal point (36–40 s after each issue), back 31 s before the
    // first rotation point.
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(started.elapsed())).await;
    vault.kill();
    tokio::time::sleep((Duration::from_secs(41) + issued_in).saturating_sub(started.elapsed()))
        .await;
    let before = proxy.hits().len();
    vault.restart().await;
    let back = Instant::now();
    // Each engine's next try is at most `retry_max` (5 s) away, and may meet its client's
    // breaker still open (5 s cooldown): 10 s, plus 200 renewals on two cores. 20 s still
    // leaves the first rotation point (72 s) 11 s away.
    while engines.iter().any(|e| e.status().renewals == 0) {
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "not every pool renewed after the outage: {:?}",
            engines
                .iter()
                .find(|e| e.status().renewals == 0)
                .map(|e| e.status())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every renewal request since the restart began (some land while it unseals).
    let hits: Vec<Instant> = proxy.hits()[before..].to_vec();
    let span = hits.last().unwrap().duration_since(hits[0]);
    let window = Duration::from_millis(250);
    let peak = hits
        .iter()
        .map(|t| {
            hits.iter()
                .filter(|u| **u >= *t && **u < *t + window)
                .count()
        })
        .max()
        .unwrap();
    let mean = hits.len() as f64 / (span.as_secs_f64() / window.as_secs_f64()).max(1.0);
    println!(
        "{POOLS} pools (issued in {issued_in:?}), Vault back {:?} after the first issue: {} renewals in {span:?} after it came back; peak {peak} \
         per 250 ms (mean {mean:.1}; all in step would be {POOLS}); every pool renewed {:?} \
         after restart",
        back.duration_since(started),
        hits.len(),
        back.elapsed()
    );
    assert!(hits.len() >= POOLS);
    // Synchronized retries would put all 200 in one window; jittered backoff spreads them
    // over seconds.
    assert!(
        peak <= POOLS / 4,
        "renewals came in step: peak {peak} in 250 ms"
    );
    for e in &engines {
        assert_eq!(e.generation(), Generation(1));
        e.close().await;
    }
}

/// Vault unreachable for 60 s — past the end of the AppRole token (4 s TTL, 10 s max),
/// the pool idle: the process stays idle and quiet (retries back off, token refresh
/// included; a handful of warnings, not one per wake-up), `status()` shows the
/// degradation and why, and it heals when Vault is back. Current-thread runtime, so the
/// log counter (a thread-local subscriber) sees every task.
#[tokio::test]
async fn vault_unreachable_past_the_token_end_stays_idle_quiet_and_reported() {
    let _one = ONE_FAULT_AT_A_TIME.lock().await;
    let mut vault = PersistentVault::start("app", "5m", "1h").await;
    let (role_id, secret_id) = approle(
        &vault.addr,
        &vault.root_token,
        "app",
        "path \"database/creds/app\" { capabilities = [\"read\"] }",
        ("4s", "10s"),
    )
    .await;
    let proxy = Proxy::start(&vault.addr, "").await;
    // A client as a service would build it: default retries, breaker and timeouts.
    let client = vaultpool::vault::Client::builder()
        .address(&proxy.addr)
        .app_role(role_id, secret_id)
        .build()
        .unwrap();
    let pool = small_pool("app", client.clone()).await;
    pool.query().await.unwrap();

    let logs = LineCounter::default();
    let _logging = tracing::subscriber::set_default(logs.subscriber());
    vault.kill();
    let (cpu0, tried0) = (cpu_seconds(), proxy.accepted.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs(60)).await;
    let cpu = cpu_seconds() - cpu0;
    let tried = proxy.accepted.load(Ordering::Relaxed) - tried0;
    let lines = logs.count();
    let during = pool.status().lease;
    println!(
        "Vault unreachable 60 s past the token's end, pool idle: {cpu:.2} CPU-s, {lines} \
         warning lines, {tried} connection attempts to Vault; status {:?}, last error {:?}; \
         first lines: {:#?}",
        during.health,
        during.last_error,
        logs.sample.lock().unwrap()
    );

    vault.restart().await;
    let back = std::time::Instant::now();
    let healed = loop {
        if pool.status().lease.health == vaultpool::lease::Health::Serving
            && pool.query().await.is_ok()
        {
            break back.elapsed();
        }
        assert!(
            back.elapsed() < Duration::from_secs(40),
            "never healed: {:?}",
            pool.status().lease
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "healed {healed:?} after Vault came back; logins {}",
        client.token_info().map_or(0, |t| t.logins)
    );

    assert!(lines <= 20, "{lines} warning lines in 60 s");
    assert!(tried <= 120, "{tried} connection attempts to Vault in 60 s");
    assert!(cpu < 3.0, "{cpu:.2} CPU-seconds while idle");
    assert_eq!(during.health, vaultpool::lease::Health::Degraded);
    assert!(during.last_error.is_some(), "{during:?}");
    pool.close().await;
}

/// PostgreSQL accepting connections but answering no new login (its postmaster stopped
/// with SIGSTOP; the running sessions go on) while a rotation is forced: the verification
/// is cut at its deadline, `rotate()` returns an error instead of hanging, the engine
/// goes on renewing the lease meanwhile (the renewal is sent to Vault while the
/// verification hangs; whether Vault can then run its `ALTER ROLE` depends on whether
/// its own pooled connection to PostgreSQL is still open, so success is not asserted),
/// and no query on an open connection fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_answers_no_login_never_stalls_the_engine() {
    let _one = ONE_FAULT_AT_A_TIME.lock().await;
    let role = create_role("30s", "1h").await;
    let mut policy = fast_policy();
    // Renew at 13.5–15 s into the 30 s lease (no first renewal spread forward).
    policy.renew_fraction = 0.5;
    policy.first_renewal_spread = 0.0;
    // Through a proxy that logs each renewal request sent to Vault.
    let vault_proxy = Proxy::start(&var("VAULT_ADDR"), "/v1/sys/leases/renew").await;
    let client = approle_builder("IMMUNE_SYSTEM")
        .address(&vault_proxy.addr)
        .build()
        .unwrap();
    let pool = small_pool_with(&role, client, policy).await;
    // Four connections open and idle before the fault; four workers use only them.
    let mut warm = Vec::new();
    for _ in 0..4 {
        warm.push(pool.get().await.unwrap());
    }
    drop(warm);
    let stop = Arc::new(AtomicBool::new(false));
    let workers = spawn_load(&pool, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Vault's own connections to PostgreSQL open and idle before the stop (its plugin
    // keeps up to 4): the issue then runs on one of them, and what this test watches is
    // our verification, not Vault waiting for a new connection of its own (which made
    // rotate() wait out the whole stop in one run).
    let root = root_client();
    let warm_leases =
        futures_util::future::join_all((0..4).map(|_| root.database_creds("database", &role)))
            .await;
    futures_util::future::join_all(
        warm_leases
            .iter()
            .flatten()
            .map(|l| root.revoke_lease(&l.lease.id)),
    )
    .await;
    let postmaster = postmaster_pid();
    signal(postmaster, "STOP");
    // Whatever happens next (a failed assertion included), PostgreSQL runs again.
    let _resume = Resume(postmaster);
    let stopped = Instant::now();
    let renewals_before = pool.status().lease.renewals;
    let forced = tokio::spawn({
        let pool = pool.clone();
        async move {
            let t = Instant::now();
            (pool.rotate().await, t.elapsed())
        }
    });
    // 25 s stopped: past the verification deadline (10 s) and the renewal point.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let during = pool.status().lease;
    let renewals_sent = vault_proxy.hits().iter().filter(|t| **t > stopped).count();
    signal(postmaster, "CONT");
    let stopped_for = stopped.elapsed();
    let (rotated, rotate_took) = forced.await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let LoadReport {
        ok, failed, errors, ..
    } = workers.await.unwrap();
    println!(
        "postmaster stopped {stopped_for:?} during a forced rotation: rotate() returned after \
         {rotate_took:?} with {:?}; renewals sent to Vault while stopped {renewals_sent}, \
         completed {}; health {:?}; {ok} queries, {failed} failed",
        rotated.as_ref().map_err(|e| e.to_string()),
        during.renewals - renewals_before,
        during.health
    );
    let e = rotated.expect_err("no rotation can complete without a login");
    assert!(
        rotate_took < Duration::from_secs(20),
        "rotate() held for {rotate_took:?}: {e}"
    );
    // Before the fix one worker did everything: the hung verify held the renewal back
    // (0 sent). Now the renewal goes out at its time.
    assert!(
        renewals_sent >= 1,
        "no renewal sent while PostgreSQL answered no login: {during:?}"
    );
    assert_ne!(during.health, vaultpool::lease::Health::Expired);
    assert_eq!(failed, 0, "{errors:?}");
    pool.close().await;
}

/// Sends SIGCONT when dropped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

fn postmaster_pid() -> u32 {
    let file = std::path::Path::new(&var("VAULTPOOL_PG_DATA")).join("postmaster.pid");
    std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid}");
}
