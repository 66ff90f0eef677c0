//! The engine's tests: [`start`](super::start) on an in-memory source under tokio's paused
//! clock, watching renewals, rotations, drains and revocations over simulated time.

use std::sync::Mutex;

use super::worker::now;

use super::*;
use crate::credentials::Leased;

/// An in-memory source on tokio's clock: counts calls, fails on demand.
#[derive(Default)]
struct Fake {
    ttl: Duration,
    max_ttl: Duration,
    issued: Mutex<Vec<(String, Instant)>>,
    renewals: AtomicUsize,
    revoked: Mutex<Vec<String>>,
    down: std::sync::atomic::AtomicBool,
    /// Panic in renew (a bug in a source), to see the engine notice its dead worker.
    panic_on_renew: std::sync::atomic::AtomicBool,
    /// Look the lease up this often (a database role's lease check).
    lease_check: Option<Duration>,
    /// The lookup says the lease is gone / fails.
    gone: std::sync::atomic::AtomicBool,
    lookup_fails: std::sync::atomic::AtomicBool,
    lookups: AtomicUsize,
    /// The next this many revocations fail (Vault briefly unreachable).
    revoke_failures: AtomicUsize,
    /// Each revocation takes this long (Vault slow to drop the user).
    revoke_delay: Duration,
    /// Issue hands back the last lease issued (a cache in front of Vault).
    hand_back: std::sync::atomic::AtomicBool,
    /// The auth token leases are issued under now (none: no token).
    token: Mutex<Option<String>>,
    /// The end of auth token `token-1`, once known.
    token_end: Mutex<Option<Instant>>,
}

impl Fake {
    fn unavailable(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(Error::new(ErrorKind::Transport, "fake vault is down"))
        } else {
            Ok(())
        }
    }
}

impl Source for Arc<Fake> {
    fn issue(&self) -> super::BoxFuture<'_, Result<Leased<Credentials>>> {
        Box::pin(async move {
            self.unavailable()?;
            if self
                .issuing_token()
                .is_some_and(|t| self.token_end(&t).is_some_and(|end| now() >= end))
            {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    "fake token expired",
                ));
            }
            let mut issued = self.issued.lock().unwrap();
            let id = match issued.last() {
                Some((last, _)) if self.hand_back.load(Ordering::SeqCst) => last.clone(),
                _ => {
                    let id = format!("fake/{}", issued.len() + 1);
                    issued.push((id.clone(), now()));
                    id
                }
            };
            let mut lease = Lease::new(id, self.ttl, true);
            lease.issued_at = now();
            Ok(Leased::new(Credentials::new("u", "p".to_string()), lease))
        })
    }
    fn renew<'a>(
        &'a self,
        lease: &'a Lease,
        increment: Duration,
    ) -> super::BoxFuture<'a, Result<Lease>> {
        Box::pin(async move {
            self.unavailable()?;
            assert!(
                !self.panic_on_renew.load(Ordering::SeqCst),
                "fake source: renew panicked"
            );
            self.renewals.fetch_add(1, Ordering::SeqCst);
            let issued = self.issued.lock().unwrap();
            let born = issued.iter().find(|(id, _)| *id == lease.id).unwrap().1;
            let left = (born + self.max_ttl).saturating_duration_since(now());
            let mut l = Lease::new(lease.id.clone(), increment.min(left), true);
            l.issued_at = now();
            Ok(l)
        })
    }
    fn revoke<'a>(&'a self, lease: &'a Lease) -> super::BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            tokio::time::sleep(self.revoke_delay).await;
            self.unavailable()?;
            if self
                .revoke_failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(Error::new(ErrorKind::Transport, "fake revoke failed"));
            }
            self.revoked.lock().unwrap().push(lease.id.clone());
            Ok(())
        })
    }
    fn poll_interval(&self) -> Option<Duration> {
        self.lease_check
    }
    fn issuing_token(&self) -> Option<String> {
        self.token.lock().unwrap().clone()
    }
    fn token_refresh_at(&self) -> Option<Instant> {
        // With a token, a refresh is always about to be tried (and may replace it).
        self.token
            .lock()
            .unwrap()
            .as_ref()
            .map(|_| now() + Duration::from_secs(1))
    }
    fn token_end(&self, accessor: &str) -> Option<Instant> {
        (accessor == "token-1")
            .then(|| *self.token_end.lock().unwrap())
            .flatten()
    }
    fn changed<'a>(&'a self, _: &'a Lease) -> super::BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            if self.lookup_fails.load(Ordering::SeqCst) {
                return Err(Error::new(ErrorKind::Server, "fake lookup failed"));
            }
            Ok(self.gone.load(Ordering::SeqCst))
        })
    }
}

/// `source` under `name` (for messages) and `label`, with `settings`.
fn setup(name: &str, label: &str, source: Arc<dyn Source>, settings: Settings) -> Setup {
    Setup {
        source_name: name.into(),
        label: label.into(),
        source,
        settings,
    }
}

/// The default policy without the first renewal's spread: these tests reason about
/// when a lease ends, and a first renewal anywhere from 1/15 of the TTL on would move
/// it. (The spread has its own test.)
fn steady() -> Policy {
    Policy {
        first_renewal_spread: 0.0,
        ..Policy::default()
    }
}

/// The settings most tests run with: [`steady`], and a 30 s drain timeout.
fn steady_settings() -> Settings {
    Settings {
        policy: steady(),
        drain_timeout: Some(Duration::from_secs(30)),
        ..Settings::default()
    }
}

/// An engine on `fake` with `settings`.
async fn start_fake(fake: &Arc<Fake>, settings: Settings) -> Engine {
    start(setup(
        "fake role",
        "fake-role",
        Arc::new(fake.clone()),
        settings,
    ))
    .await
    .unwrap()
}

async fn engine(fake: &Arc<Fake>) -> Engine {
    start_fake(fake, steady_settings()).await
}

/// A pre-warm that never finishes: the engine bounds it and swaps anyway; a close
/// during it revokes the new lease (it never served) and stops.
#[tokio::test(start_paused = true)]
async fn a_hung_prewarm_is_bounded_and_a_close_during_it_revokes_the_new_lease() {
    let fake = fake(600, 3600);
    let hung: super::Prewarm = Arc::new(|_| Box::pin(std::future::pending::<usize>()));
    let engine = start_fake(
        &fake,
        Settings {
            prewarm: Some(hung),
            ..steady_settings()
        },
    )
    .await;
    // Forced: it pre-warms; the hang is cut at the verify timeout and the swap comes.
    let started = tokio::time::Instant::now();
    assert_eq!(engine.rotate().await.unwrap(), Generation(2));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(11),
        "{took:?}"
    );
    let timing = engine.status().last_rotation.unwrap();
    assert_eq!(timing.warmed, 0);
    // A close while the next pre-warm hangs: the lease issued for it never served and
    // is revoked with the others.
    let rotating = tokio::spawn({
        let engine = engine.clone();
        async move { engine.rotate().await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let third = fake.issued.lock().unwrap().last().unwrap().0.clone();
    engine.close().await;
    let _ = rotating.await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        fake.revoked.lock().unwrap().contains(&third),
        "the lease issued for a cut rotation was left behind: {:?}",
        fake.revoked.lock().unwrap()
    );
}

fn fake(ttl: u64, max_ttl: u64) -> Arc<Fake> {
    Arc::new(Fake {
        ttl: Duration::from_secs(ttl),
        max_ttl: Duration::from_secs(max_ttl),
        ..Fake::default()
    })
}

#[tokio::test(start_paused = true)]
async fn renews_then_rotates_before_max_ttl_and_revokes_the_drained_old_lease() {
    let fake = fake(60, 300);
    let engine = engine(&fake).await;
    let guard = engine.current().track();
    // 10 simulated minutes.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let issued = fake.issued.lock().unwrap().clone();
    assert!(
        issued.len() >= 2,
        "must rotate before the 300 s max TTL: {issued:?}"
    );
    // Each generation served until at most max_ttl - margin (5 s floor, 6 s = 10%).
    for pair in issued.windows(2) {
        let lifetime = pair[1].1 - pair[0].1;
        assert!(lifetime <= Duration::from_secs(295), "{lifetime:?}");
        assert!(lifetime >= Duration::from_secs(240), "{lifetime:?}");
    }
    assert!(fake.renewals.load(Ordering::SeqCst) >= 6);
    // Generation 1 still has a connection: not revoked before the drain deadline...
    let status = engine.status();
    assert!(status.rotations >= 2);
    // ...but the drain deadline (30 s) has passed long ago, so it was revoked.
    assert!(fake.revoked.lock().unwrap().contains(&"fake/1".to_string()));
    drop(guard);
    engine.close().await;
    let revoked = fake.revoked.lock().unwrap().clone();
    assert_eq!(
        revoked.len(),
        issued.len(),
        "close revokes every lease: {revoked:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn old_lease_waits_for_its_connections_then_is_revoked_at_once() {
    let fake = fake(600, 3600);
    let engine = engine(&fake).await;
    let guard = engine.current().track();
    assert_eq!(engine.rotate().await.unwrap(), Generation(2));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        fake.revoked.lock().unwrap().is_empty(),
        "revoked while in use"
    );
    assert_eq!(engine.status().generations[1].connections, 1);
    drop(guard);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*fake.revoked.lock().unwrap(), vec!["fake/1".to_string()]);
    engine.close().await;
}

/// A source that hands back the serving lease (a cache in front of Vault): not new
/// credentials. The rotation fails and says why; the serving lease is never verified,
/// retired or revoked, and serves on. Later rotations work again.
#[tokio::test(start_paused = true)]
async fn the_serving_lease_handed_back_is_never_taken_for_new_credentials() {
    let fake = fake(600, 3600);
    let engine = engine(&fake).await;
    assert_eq!(engine.rotate().await.unwrap(), Generation(2));
    fake.hand_back.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let e = engine.rotate().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::CredentialsUnavailable, "{e}");
        assert!(e.to_string().contains("already holds"), "{e}");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(engine.generation(), Generation(2));
    assert_eq!(engine.current().lease.id, "fake/2");
    assert_eq!(
        *fake.revoked.lock().unwrap(),
        ["fake/1"],
        "the serving lease revoked"
    );
    assert!(engine.usable().is_ok());
    fake.hand_back.store(false, Ordering::SeqCst);
    assert_eq!(engine.rotate().await.unwrap(), Generation(3));
    engine.close().await;
}

/// A retired generation still in use drains until its lease's end — or until just before
/// the end of the token that issued it, when that comes first and becomes known after the
/// retirement (the token replaced later): Vault revokes the lease with its token.
#[tokio::test(start_paused = true)]
async fn a_retired_generation_is_revoked_before_its_issuing_token_ends() {
    let fake = fake(600, 3600);
    // The first lease is issued under token-1, the second under its replacement.
    *fake.token.lock().unwrap() = Some("token-1".into());
    let engine = start_fake(
        &fake,
        Settings {
            policy: steady(),
            ..Settings::default()
        },
    )
    .await;
    let guard = engine.current().track();
    *fake.token.lock().unwrap() = Some("token-2".into());
    assert_eq!(engine.rotate().await.unwrap(), Generation(2));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        fake.revoked.lock().unwrap().is_empty(),
        "revoked while in use"
    );
    // Now token-1, which issued the retired lease, is known to end in 60 s.
    *fake.token_end.lock().unwrap() = Some(now() + Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(50)).await;
    assert!(
        fake.revoked.lock().unwrap().is_empty(),
        "revoked more than the margin (5 s) before the token's end"
    );
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(
        *fake.revoked.lock().unwrap(),
        ["fake/1"],
        "still draining past the token's end"
    );
    drop(guard);
    engine.close().await;
}

/// Every lease comes from a token about to end that is not replaced (its refresh keeps
/// failing): rotating cannot escape its end, and must not try again at once, each try a
/// new database user, until it ends.
#[tokio::test(start_paused = true)]
async fn leases_of_an_ending_token_that_is_not_replaced_are_not_rotated_in_a_loop() {
    let fake = fake(600, 3600);
    *fake.token.lock().unwrap() = Some("token-1".into());
    let engine = engine(&fake).await;
    *fake.token_end.lock().unwrap() = Some(now() + Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(70)).await;
    let issued = fake.issued.lock().unwrap().len();
    // The first lease, and after the token's end none (the token is gone).
    assert!(issued <= 2, "{issued} leases issued in 70 s");
    engine.close().await;
}

/// The same, but the token is replaced before its end: the rotation comes as soon as the
/// new token is there (the worker looks again with each refresh), not at the old
/// token's end, when Vault revokes the lease with it.
#[tokio::test(start_paused = true)]
async fn leases_of_an_ending_token_rotate_as_soon_as_a_new_token_is_there() {
    let fake = fake(600, 3600);
    *fake.token.lock().unwrap() = Some("token-1".into());
    let engine = engine(&fake).await;
    let start = now();
    *fake.token_end.lock().unwrap() = Some(start + Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        engine.generation(),
        Generation(1),
        "rotated under the same token"
    );
    *fake.token.lock().unwrap() = Some("token-2".into());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        engine.generation(),
        Generation(2),
        "not rotated within 3 s of the new token"
    );
    engine.close().await;
}

/// A retired lease whose revoke just failed waits for its retry, but `close()` does
/// not: it revokes every lease it holds, that one too.
#[tokio::test(start_paused = true)]
async fn close_revokes_a_retired_lease_inside_its_retry_backoff() {
    let fake = fake(600, 3600);
    fake.revoke_failures.store(1, Ordering::SeqCst);
    let engine = engine(&fake).await;
    assert_eq!(engine.rotate().await.unwrap(), Generation(2));
    // Drained at once (no connection): its revoke is tried, fails, and backs off.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(fake.revoked.lock().unwrap().is_empty());
    assert_eq!(
        fake.revoke_failures.load(Ordering::SeqCst),
        0,
        "no revoke tried"
    );
    engine.close().await;
    let mut revoked = fake.revoked.lock().unwrap().clone();
    revoked.sort();
    assert_eq!(revoked, ["fake/1", "fake/2"], "close() skipped a lease");
}

/// The events an application sees: renewals, a scheduled rotation, the old lease's
/// revocation, a forced rotation, failures while Vault is down, and the expiry.
#[tokio::test(start_paused = true)]
async fn lease_events_tell_what_happened() {
    use super::{LeaseEvent, RotationReason};
    let fake = fake(60, 300);
    let engine = engine(&fake).await;
    let mut events = engine.events();
    tokio::time::sleep(Duration::from_secs(330)).await;
    assert_eq!(engine.rotate().await.unwrap(), Generation(3));
    fake.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(400)).await;
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    let renewed = seen
        .iter()
        .filter(|e| {
            matches!(
                e,
                LeaseEvent::Renewed {
                    generation: Generation(1),
                    ..
                }
            )
        })
        .count();
    assert!(renewed >= 3, "{renewed} renewals in {seen:?}");
    let rotations: Vec<_> = seen
        .iter()
        .filter_map(|e| match e {
            LeaseEvent::Rotated {
                from, to, reason, ..
            } => Some((*from, *to, *reason)),
            _ => None,
        })
        .collect();
    assert_eq!(
        rotations,
        [
            (Generation(1), Generation(2), RotationReason::Schedule),
            (Generation(2), Generation(3), RotationReason::Forced)
        ]
    );
    assert!(
        seen.iter().any(|e| matches!(
            e,
            LeaseEvent::Revoked {
                generation: Generation(1),
                drained: true
            }
        )),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|e| matches!(
            e,
            LeaseEvent::Failed {
                kind: ErrorKind::Transport,
                ..
            }
        )),
        "{seen:?}"
    );
    let expired = seen
        .iter()
        .filter(|e| {
            matches!(
                e,
                LeaseEvent::Expired {
                    generation: Generation(3)
                }
            )
        })
        .count();
    assert_eq!(expired, 1, "{seen:?}");
    fake.down.store(false, Ordering::SeqCst);
    engine.close().await;
}

/// Five rotate() calls at once (say, five instances of an admin endpoint hit together):
/// the calls waiting while a rotation starts share it — one new user, every call answered
/// with the generation it made. Before, each call made a user of its own (5).
#[tokio::test(start_paused = true)]
async fn concurrent_rotate_calls_share_one_rotation() {
    let fake = fake(600, 3600);
    let engine = engine(&fake).await;
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.rotate().await })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap().unwrap());
    }
    let issued = fake.issued.lock().unwrap().len() - 1;
    assert_eq!(issued, 1, "{issued} new users for 5 concurrent calls");
    assert!(answers.iter().all(|g| *g == Generation(2)), "{answers:?}");
    // A call after them rotates again.
    assert_eq!(engine.rotate().await.unwrap(), Generation(3));
    // A shared rotation that fails: every caller gets the failure, with its kind.
    fake.down.store(true, Ordering::SeqCst);
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.rotate().await })
        })
        .collect();
    for call in calls {
        let e = call.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Transport, "{e}");
        assert!(e.to_string().contains("fake vault is down"), "{e}");
    }
    fake.down.store(false, Ordering::SeqCst);
    engine.close().await;
}

/// Two close() calls at once (a shutdown hook and a drop guard): the second returns only
/// once the leases are revoked, like the first. Before, it returned at once.
#[tokio::test(start_paused = true)]
async fn a_second_concurrent_close_waits_for_the_revocations() {
    let fake = Arc::new(Fake {
        ttl: Duration::from_secs(600),
        max_ttl: Duration::from_secs(3600),
        revoke_delay: Duration::from_secs(2),
        ..Fake::default()
    });
    let engine = engine(&fake).await;
    let first = tokio::spawn({
        let engine = engine.clone();
        async move { engine.close().await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    engine.close().await;
    assert_eq!(
        *fake.revoked.lock().unwrap(),
        ["fake/1"],
        "the second close() returned before the revocation"
    );
    first.await.unwrap();
}

/// A retired lease whose revoke fails for an hour (Vault sealed after a forced
/// rotation) is retried with backoff up to 5 minutes apart, and revoked once Vault is
/// back. Before, it was retried every retry_max (5 s): ~700 attempts, each a warning.
#[tokio::test(start_paused = true)]
async fn a_revoke_that_fails_for_an_hour_backs_off_to_minutes() {
    let fake = fake(86_400, 86_400);
    let engine = engine(&fake).await;
    fake.revoke_failures.store(100_000, Ordering::SeqCst);
    assert_eq!(engine.rotate().await.unwrap(), Generation(2));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let attempts = 100_000 - fake.revoke_failures.load(Ordering::SeqCst);
    // 1, 2, 4, … 256 s (9 attempts in 8.5 minutes), then 150–300 s apart: 20–30.
    assert!(
        (15..=35).contains(&attempts),
        "{attempts} revoke attempts in an hour"
    );
    let retiring = || {
        engine
            .status()
            .generations
            .iter()
            .filter(|g| g.retiring)
            .count()
    };
    assert_eq!(retiring(), 1, "given up on the lease");
    fake.revoke_failures.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(301)).await;
    assert_eq!(*fake.revoked.lock().unwrap(), ["fake/1"]);
    assert_eq!(retiring(), 0);
    engine.close().await;
}

/// A revoke that fails right at close() (Vault's 400 while the database still cleans up a
/// session that just ended) is tried again for a while: both leases revoked. Before, a
/// failure at close left the lease until its TTL.
#[tokio::test(start_paused = true)]
async fn close_tries_a_failing_revoke_again_for_a_while() {
    let fake = fake(600, 3600);
    let engine = engine(&fake).await;
    assert_eq!(engine.rotate().await.unwrap(), Generation(2));
    tokio::time::sleep(Duration::from_millis(200)).await; // the retired one revoked
    fake.revoke_failures.store(3, Ordering::SeqCst);
    engine.close().await;
    let mut revoked = fake.revoked.lock().unwrap().clone();
    revoked.sort();
    assert_eq!(revoked, ["fake/1", "fake/2"], "close() gave up on a lease");
}

#[tokio::test(start_paused = true)]
async fn keeps_serving_while_vault_is_down_and_heals_after_expiry() {
    let fake = fake(60, 3600);
    let engine = engine(&fake).await;
    fake.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(50)).await;
    // Renewal at ~40 s failed; still valid.
    assert!(engine.usable().is_ok());
    assert_eq!(engine.status().health, super::Health::Degraded);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let err = engine.usable().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LeaseExpired);
    assert!(err.to_string().contains("fake role"), "{err}");
    fake.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let current = engine.usable().expect("healed once Vault is back");
    assert_eq!(current.generation, Generation(2));
    engine.close().await;
}

#[tokio::test(start_paused = true)]
async fn auth_failures_are_coalesced_into_one_re_lease() {
    let fake = fake(600, 3600);
    let engine = engine(&fake).await;
    for _ in 0..10 {
        engine.report_auth_failure(Generation(1));
    }
    let g = engine
        .wait_newer(Generation(1), Duration::from_secs(5))
        .await;
    assert_eq!(g, Generation(2));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        fake.issued.lock().unwrap().len(),
        2,
        "one re-lease for ten reports"
    );
    engine.report_auth_failure(Generation(1)); // stale: ignored
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.issued.lock().unwrap().len(), 2);
    engine.close().await;
    engine.close().await; // twice is harmless
    assert_eq!(
        engine.rotate().await.unwrap_err().kind(),
        ErrorKind::Shutdown
    );
}

#[tokio::test(start_paused = true)]
async fn worker_stops_when_every_handle_is_dropped() {
    let fake = fake(60, 3600);
    let engine = engine(&fake).await;
    drop(engine);
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        fake.renewals.load(Ordering::SeqCst),
        0,
        "worker kept running"
    );
    assert!(fake.revoked.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_dies_turns_health_to_failed_and_usable_says_so() {
    let fake = fake(60, 3600);
    fake.panic_on_renew.store(true, Ordering::SeqCst);
    let engine = engine(&fake).await;
    assert_eq!(engine.status().health, super::Health::Serving);
    // The renewal at ~36-40 s panics inside the worker.
    tokio::time::sleep(Duration::from_secs(45)).await;
    assert_eq!(engine.status().health, super::Health::Failed);
    let err = engine.usable().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CredentialsUnavailable);
    assert!(err.to_string().contains("stopped unexpectedly"), "{err}");
    engine.close().await; // still harmless
    assert_eq!(engine.status().health, super::Health::Closed);
}

#[tokio::test(start_paused = true)]
async fn leases_issued_together_renew_first_across_their_first_cycle() {
    // 20 engines issued at once, 600 s leases: before, all renewed within 360-400 s.
    let fake = fake(600, 3600);
    let mut engines = Vec::new();
    for _ in 0..20 {
        engines.push(start_fake(&fake, Settings::default()).await);
    }
    let renewed = || engines.iter().filter(|e| e.status().renewals > 0).count();
    tokio::time::sleep(Duration::from_secs(39)).await;
    assert_eq!(renewed(), 0, "renewed before 1/15 of the TTL");
    // Halfway through the window (40-400 s): about half of them.
    tokio::time::sleep(Duration::from_secs(181)).await;
    let half = renewed();
    assert!((3..=17).contains(&half), "{half} of 20 renewed by 220 s");
    tokio::time::sleep(Duration::from_secs(181)).await;
    assert_eq!(renewed(), 20, "a first renewal later than 2/3 of the TTL");
    for e in &engines {
        e.close().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_huge_drain_timeout_does_not_overflow() {
    let fake = fake(600, 3600);
    let engine = start_fake(
        &fake,
        Settings {
            drain_timeout: Some(Duration::MAX),
            ..steady_settings()
        },
    )
    .await;
    let guard = engine.current().track();
    assert_eq!(engine.rotate().await.unwrap(), Generation(2));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(fake.revoked.lock().unwrap().is_empty(), "revoked in use");
    drop(guard);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*fake.revoked.lock().unwrap(), vec!["fake/1".to_string()]);
    engine.close().await;
}

#[tokio::test(start_paused = true)]
async fn without_a_drain_timeout_a_busy_generation_drains_until_its_lease_nearly_ends() {
    let fake = fake(600, 3600);
    let engine = start_fake(
        &fake,
        Settings {
            drain_timeout: None,
            ..steady_settings()
        },
    )
    .await;
    let guard = engine.current().track();
    tokio::time::sleep(Duration::from_secs(100)).await;
    engine.rotate().await.unwrap(); // generation 1 has ~500 s left
    tokio::time::sleep(Duration::from_secs(480)).await;
    assert!(
        fake.revoked.lock().unwrap().is_empty(),
        "a connection in use was cut long before its lease's end"
    );
    // Revoked at its end less the margin (5 s), connection or not.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(*fake.revoked.lock().unwrap(), vec!["fake/1".to_string()]);
    drop(guard);
    engine.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_re_lease_after_a_refused_login_is_retried_until_it_succeeds() {
    let fake = fake(600, 3600);
    let engine = engine(&fake).await;
    fake.down.store(true, Ordering::SeqCst);
    engine.report_auth_failure(Generation(1));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(engine.generation(), Generation(1), "Vault is down");
    fake.down.store(false, Ordering::SeqCst);
    // Retried with backoff (at most `retry_max`, 5 s), long before the renewal at
    // ~400 s: before, the one-shot latch left the refused credentials serving.
    let g = engine
        .wait_newer(Generation(1), Duration::from_secs(10))
        .await;
    assert_eq!(
        g,
        Generation(2),
        "the refused credentials are still serving"
    );
    engine.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_lease_check_replaces_a_lease_gone_in_vault_and_its_failures_move_nothing() {
    let fake = Arc::new(Fake {
        ttl: Duration::from_secs(600),
        max_ttl: Duration::from_secs(3600),
        lease_check: Some(Duration::from_secs(10)),
        ..Fake::default()
    });
    let engine = engine(&fake).await;
    // Lookups failing for a minute: no renewal or rotation brought forward.
    fake.lookup_fails.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(fake.lookups.load(Ordering::SeqCst) >= 4);
    assert_eq!(fake.renewals.load(Ordering::SeqCst), 0, "renewed early");
    assert_eq!(
        engine.generation(),
        Generation(1),
        "rotated on a lookup blip"
    );
    assert_eq!(engine.status().health, super::Health::Serving);
    // The lease gone in Vault: replaced at the next lookup.
    fake.lookup_fails.store(false, Ordering::SeqCst);
    fake.gone.store(true, Ordering::SeqCst);
    let g = engine
        .wait_newer(Generation(1), Duration::from_secs(12))
        .await;
    assert_eq!(g, Generation(2));
    engine.close().await;
}

/// An engine whose verifier fails like an unreachable database while the flag is set.
async fn engine_on_flaky_database(
    fake: &Arc<Fake>,
) -> (Engine, Arc<std::sync::atomic::AtomicBool>) {
    engine_failing_verify(fake, ErrorKind::Backend).await
}

/// An engine whose verifier fails with `kind` while the flag is set.
async fn engine_failing_verify(
    fake: &Arc<Fake>,
    kind: ErrorKind,
) -> (Engine, Arc<std::sync::atomic::AtomicBool>) {
    let db_down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let verify: Verifier = {
        let db_down = db_down.clone();
        Arc::new(move |_| {
            let down = db_down.load(Ordering::SeqCst);
            Box::pin(async move {
                if down {
                    Err(Error::new(
                        kind,
                        "fake database unreachable or refusing TLS",
                    ))
                } else {
                    Ok(())
                }
            })
        })
    };
    let engine = start_fake(
        fake,
        Settings {
            verify: Some(verify),
            ..steady_settings()
        },
    )
    .await;
    (engine, db_down)
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_waits_for_the_unreachable_backoff_before_issuing_again() {
    lost_lease_backs_off(ErrorKind::Backend).await;
}

/// A TLS failure that lasts (an expired server certificate, a CA changed on the
/// server) backs off the same way: no user created and dropped per retry.
#[tokio::test(start_paused = true)]
async fn a_lasting_tls_failure_backs_off_like_an_unreachable_database() {
    lost_lease_backs_off(ErrorKind::Tls).await;
}

async fn lost_lease_backs_off(kind: ErrorKind) {
    // Looked up every 10 s, gone in Vault, and the database unreachable: each lookup
    // would issue (and drop) a user; the backoff (5 s doubling to 30 s) gates them.
    let fake = Arc::new(Fake {
        ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(3600),
        lease_check: Some(Duration::from_secs(10)),
        ..Fake::default()
    });
    let (engine, db_down) = engine_failing_verify(&fake, kind).await;
    db_down.store(true, Ordering::SeqCst);
    fake.gone.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(300)).await;
    let tries = fake.issued.lock().unwrap().len() - 1;
    let lookups = fake.lookups.load(Ordering::SeqCst);
    // One per lookup (20-30, jittered) without the gate; 5, 10, 20, 30, 30, ... s
    // apart with it.
    assert!(lookups >= 20, "{lookups} lookups");
    assert!(
        (5..=16).contains(&tries),
        "{tries} users issued in 300 s for {lookups} lookups"
    );
    db_down.store(false, Ordering::SeqCst);
    let g = engine
        .wait_newer(Generation(1), Duration::from_secs(45))
        .await;
    assert_eq!(g, Generation(2), "not replaced once the database was back");
    engine.close().await;
}

/// A database that refuses every newly issued user (a replica that never catches up,
/// `password_encryption` changed) while the serving one still works: the scheduled
/// rotation backs off (5 s doubling to 5 minutes) and keeps its last try before the
/// end. Before, it issued, failed to verify and dropped a user every retry_max (5 s):
/// ~70 users between the rotation's due time and the end of an hour's lease.
#[tokio::test(start_paused = true)]
async fn new_users_the_database_refuses_back_off_the_scheduled_rotation() {
    let fake = fake(3600, 3600);
    let started = now();
    let (engine, refusing) = engine_failing_verify(&fake, ErrorKind::AuthenticationFailed).await;
    refusing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3590)).await;
    let tries: Vec<f64> = fake.issued.lock().unwrap()[1..]
        .iter()
        .map(|(_, at)| (*at - started).as_secs_f64())
        .collect();
    let first = *tries.first().expect("the scheduled rotation never tried");
    // From the due time (3240 s) to 10 s before the end: 5, 10, 20, 40, 80, 160 s
    // apart (7 tries); one per retry_max (5 s) was 96.
    assert!(first < 3300.0, "rotation due at {first} s");
    assert!(
        tries.len() <= 10,
        "{} users issued and dropped: {tries:?}",
        tries.len()
    );
    assert!(
        tries.windows(2).all(|w| w[1] - w[0] >= 4.5),
        "retried without backoff: {tries:?}"
    );
    assert_eq!(engine.generation(), Generation(1));
    // Degraded (the failures are reported), still serving.
    assert_eq!(engine.status().health, super::Health::Degraded);
    // The last try just before the end, and the refusal over: rotated.
    refusing.store(false, Ordering::SeqCst);
    let g = engine
        .wait_newer(Generation(1), Duration::from_secs(15))
        .await;
    assert_eq!(g, Generation(2), "not rotated at the last try");
    let last = fake.issued.lock().unwrap().last().unwrap().1 - started;
    assert!(
        (3599.0..3600.0).contains(&last.as_secs_f64()),
        "the last try at {last:?}, not just before the end"
    );
    engine.close().await;
}

/// Refused new users back off scheduled rotations for minutes, but a lease lost
/// meanwhile (the serving credentials gone) is replaced within seconds once the database
/// takes the new user (a replica caught up).
#[tokio::test(start_paused = true)]
async fn a_lost_lease_is_replaced_soon_after_refused_new_users() {
    let fake = Arc::new(Fake {
        ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(3600),
        lease_check: Some(Duration::from_secs(10)),
        ..Fake::default()
    });
    let (engine, refusing) = engine_failing_verify(&fake, ErrorKind::AuthenticationFailed).await;
    refusing.store(true, Ordering::SeqCst);
    // Five refused forced rotations: the backoff is at 80 s.
    for _ in 0..5 {
        assert!(engine.rotate().await.is_err());
    }
    refusing.store(false, Ordering::SeqCst);
    fake.gone.store(true, Ordering::SeqCst);
    let g = engine
        .wait_newer(Generation(1), Duration::from_secs(20))
        .await;
    assert_eq!(
        g,
        Generation(2),
        "the lost lease waited for the refusal backoff"
    );
    engine.close().await;
}

#[tokio::test(start_paused = true)]
async fn an_old_unreachable_episode_is_forgotten_after_five_minutes() {
    let fake = Arc::new(Fake {
        ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(3600),
        lease_check: Some(Duration::from_secs(10)),
        ..Fake::default()
    });
    let (engine, db_down) = engine_on_flaky_database(&fake).await;
    db_down.store(true, Ordering::SeqCst);
    // Five forced rotations fail: the backoff is at its 30 s ceiling.
    for _ in 0..5 {
        assert!(engine.rotate().await.is_err());
    }
    // Ten quiet minutes (the lease has an hour), then the lease is lost.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let before = fake.issued.lock().unwrap().len();
    fake.gone.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(25)).await;
    let tries = fake.issued.lock().unwrap().len() - before;
    // Forgotten: retried 5 s, then 10 s after the first try (2-3 tries in 25 s);
    // kept, the first failure waits 30 s (1 try).
    assert!(
        tries >= 2,
        "{tries} tries in 25 s: the old episode's backoff kept"
    );
    engine.close().await;
}

/// A provider that gives every lease the same id and leaves renewal to the default
/// (the lease back unchanged): no hot loop of issues or renewals. Before, the same id
/// made each rotation a no-op retried at once, and the unchanged renewal was due again
/// at once (thousands a second).
#[tokio::test(start_paused = true)]
async fn a_careless_custom_provider_cannot_make_the_engine_spin() {
    #[derive(Default)]
    struct Careless {
        issued: AtomicUsize,
        renewed: AtomicUsize,
    }
    impl super::CredentialProvider for Careless {
        fn issue(&self) -> super::BoxFuture<'_, Result<Leased<Credentials>>> {
            self.issued.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {
                Ok(Leased::new(
                    Credentials::new("u", "p".to_string()),
                    Lease::new("always-the-same", Duration::from_secs(60), true),
                ))
            })
        }
        fn renew<'a>(
            &'a self,
            lease: &'a Lease,
            _: Duration,
        ) -> super::BoxFuture<'a, Result<Lease>> {
            self.renewed.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Ok(lease.clone()) })
        }
    }
    let careless = Arc::new(Careless::default());
    let source = super::CredentialSource::custom("careless", careless.clone())
        .into_source(None)
        .unwrap();
    let engine = start(setup("careless", "careless", source, steady_settings()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(300)).await;
    let (issued, renewed) = (
        careless.issued.load(Ordering::SeqCst),
        careless.renewed.load(Ordering::SeqCst),
    );
    // A 60 s lease rotated before its end: about one issue a minute.
    assert!((4..=12).contains(&issued), "{issued} issues in 300 s");
    assert!(renewed <= 12, "{renewed} renewals in 300 s");
    assert!(engine.generation().0 >= 4, "{:?}", engine.generation());
    assert_ne!(engine.status().health, super::Health::Expired);
    engine.close().await;
}

/// A provider that never answers: the error names the provider and says what to check —
/// not "could not reach Vault; check VAULT_ADDR", as it did (no Vault is involved).
#[tokio::test(start_paused = true)]
async fn a_provider_that_hangs_is_reported_as_the_providers_timeout() {
    struct Hangs;
    impl super::CredentialProvider for Hangs {
        fn issue(&self) -> super::BoxFuture<'_, Result<Leased<Credentials>>> {
            Box::pin(std::future::pending())
        }
    }
    let source = super::CredentialSource::custom("hangs", Hangs)
        .into_source(None)
        .unwrap();
    let err = start(setup("hangs", "hangs", source, steady_settings()))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.is_transient());
    assert!(
        text.contains("credential provider did not answer within 30s") && text.contains("hangs"),
        "{text}"
    );
    assert!(!text.contains("Vault"), "{text}");
}

/// A provider's lease out of range is refused (and retried), never a panic.
#[tokio::test(start_paused = true)]
async fn a_custom_lease_out_of_range_is_an_error_not_a_panic() {
    struct Forever;
    impl super::CredentialProvider for Forever {
        fn issue(&self) -> super::BoxFuture<'_, Result<Leased<Credentials>>> {
            Box::pin(async {
                Ok(Leased::new(
                    Credentials::new("u", "p".to_string()),
                    Lease::new("forever", Duration::MAX, true),
                ))
            })
        }
    }
    let source = super::CredentialSource::custom("forever", Forever)
        .into_source(None)
        .unwrap();
    let err = start(setup(
        "forever",
        "forever",
        source,
        Settings {
            drain_timeout: None,
            ..steady_settings()
        },
    ))
    .await
    .unwrap_err();
    assert!(err.to_string().contains("10 years"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_database_backs_off_issuing_but_keeps_the_last_try_before_the_end() {
    // A 60 s lease that cannot be renewed past 60 s: rotation due at 54 s.
    let fake = fake(60, 60);
    let started = now();
    let (engine, db_down) = engine_on_flaky_database(&fake).await;
    db_down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(90)).await;
    let tries: Vec<f64> = fake.issued.lock().unwrap()[1..]
        .iter()
        .map(|(_, at)| (*at - started).as_secs_f64())
        .collect();
    // Backed off (a try per retry_max, 5 s, would be ~8 before the end and ~15
    // after), yet one last try just before the end at 60 s.
    assert!(tries.len() <= 10, "{} users issued: {tries:?}", tries.len());
    // The last try comes 100 ms before the end (backed off, the next would be at
    // 69 s, past it).
    assert!(
        tries.iter().any(|t| (59.5..60.0).contains(t)),
        "no last try just before the end: {tries:?}"
    );
    // After the end, at most 5 s apart: back soon once the database is.
    let after: Vec<f64> = tries.iter().copied().filter(|t| *t >= 60.0).collect();
    assert!(
        after.windows(2).all(|w| w[1] - w[0] <= 5.5),
        "tries after the end too far apart: {after:?}"
    );
    db_down.store(false, Ordering::SeqCst);
    let g = engine
        .wait_newer(Generation(1), Duration::from_secs(6))
        .await;
    assert_eq!(g, Generation(2), "not rotated once the database was back");
    engine.close().await;
}
