//! The staleness tracker of the sqlx flavour: sqlx does not say which credentials a
//! connection used, so a connection is told stale by its age (opened before the last
//! swap of connect options) and, when it logs in, by its user (one of the last retired).
//! It also records when a hook last fired, for the login probe.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Connections whose user was checked just before a swap are recycled once.
const SWAP_GRACE: Duration = Duration::from_millis(100);
/// How many retired users a new connection is checked against.
pub(super) const RETIRED_USERS_KEPT: usize = 8;

/// When the last swap of credentials happened and whose users it retired, shared with
/// the pool's hooks: what tells a stale connection from a fresh one.
pub(super) struct StaleTracker {
    base: Instant,
    /// Connections created before `base + stale_before_ns` may hold old credentials.
    stale_before_ns: AtomicU64,
    /// The users of the last few retired generations: a new connection logged in as one
    /// of them began before the swap, and is refused.
    retired_users: Mutex<VecDeque<String>>,
    /// When a hook last fired (a connection acquired, released or opened), since `base`.
    last_used_ns: AtomicU64,
}

impl StaleTracker {
    /// The options now hold new credentials; `old_user` is retired.
    pub(super) fn retire(&self, old_user: String) {
        {
            let mut retired = self.retired_users.lock().unwrap_or_else(|e| e.into_inner());
            if retired.len() == RETIRED_USERS_KEPT {
                retired.pop_front();
            }
            retired.push_back(old_user);
        }
        // The grace covers a connection whose user was checked just before the swap but
        // that sqlx counts as created just after it (the check comes first).
        let at = self.base.elapsed() + SWAP_GRACE;
        self.stale_before_ns
            .store(at.as_nanos() as u64, Ordering::Release);
    }

    /// Whether `user` (PostgreSQL's `session_user`, cut to 63 bytes) is a retired one.
    pub(super) fn is_retired(&self, user: &str) -> bool {
        let retired = self.retired_users.lock().unwrap_or_else(|e| e.into_inner());
        retired.iter().any(|r| {
            // PostgreSQL cuts names to 63 bytes: a longer retired name matches its cut.
            r == user
                || (r.len() > 63 && user.len() == 63 && r.as_bytes().starts_with(user.as_bytes()))
        })
    }

    /// A tracker with no swap yet, measuring from `base`.
    pub(super) fn new(base: Instant) -> Self {
        Self {
            base,
            stale_before_ns: AtomicU64::new(0),
            retired_users: Mutex::new(VecDeque::new()),
            last_used_ns: AtomicU64::new(0),
        }
    }

    /// A hook fired now.
    pub(super) fn used(&self) {
        let now = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_used_ns.store(now, Ordering::Relaxed);
    }

    /// Whether a hook fired within `d`.
    pub(super) fn used_within(&self, d: Duration) -> bool {
        let last = Duration::from_nanos(self.last_used_ns.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last) < d
    }

    /// Whether a connection of this age was opened before the last swap (plus grace).
    pub(super) fn is_stale(&self, age: Duration) -> bool {
        let stale_before = Duration::from_nanos(self.stale_before_ns.load(Ordering::Acquire));
        if stale_before.is_zero() {
            return false;
        }
        let created = self.base.elapsed().saturating_sub(age);
        created < stale_before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlx::follow::LOGIN_PROBE_ACTIVE;

    #[test]
    fn connections_older_than_the_swap_are_stale() {
        let tracker = StaleTracker::new(Instant::now() - Duration::from_secs(100));
        assert!(!tracker.is_stale(Duration::from_secs(50)), "no tracker yet");
        tracker.retire("v-old".into());
        // Opened 10 s ago: before the tracker.
        assert!(tracker.is_stale(Duration::from_secs(10)));
        // Opened just now: within the grace, recycled once to be safe.
        assert!(tracker.is_stale(Duration::ZERO));
        let later = StaleTracker::new(Instant::now() - Duration::from_secs(100));
        later
            .stale_before_ns
            .store(Duration::from_secs(90).as_nanos() as u64, Ordering::Relaxed);
        // Opened 5 s ago = at 95 s, after the tracker at 90 s.
        assert!(!later.is_stale(Duration::from_secs(5)));
    }

    #[test]
    fn use_is_recorded_for_the_login_probe() {
        let tracker = StaleTracker::new(Instant::now() - Duration::from_secs(1000));
        assert!(!tracker.used_within(LOGIN_PROBE_ACTIVE), "never used");
        tracker.used();
        assert!(tracker.used_within(Duration::from_secs(1)));
    }

    #[test]
    fn retired_users_are_recognised_even_cut_to_63_bytes() {
        let tracker = StaleTracker::new(Instant::now());
        let long = "v-approle-some-very-long-role-name-that-goes-past-the-limit-1796023347";
        tracker.retire(long.into());
        tracker.retire("v-short".into());
        assert!(tracker.is_retired("v-short"));
        assert!(tracker.is_retired(&long[..63]));
        assert!(!tracker.is_retired("v-current"));
        for i in 0..RETIRED_USERS_KEPT {
            tracker.retire(format!("v-{i}"));
        }
        assert!(!tracker.is_retired("v-short"), "only the last few are kept");
    }
}
