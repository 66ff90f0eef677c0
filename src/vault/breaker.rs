//! A small circuit breaker: opens after N consecutive transport failures, fails fast while
//! open, lets one probe through after a cooldown, closes on the probe's success.
//!
//! Hand-written (≈60 lines) rather than a dependency: the crates that offer one bring
//! their own futures/timer stacks, and this one has to count only *transport* failures
//! (an HTTP 403 is a healthy server saying no).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Consecutive transport failures that open the breaker. Default 5. Zero disables it.
    pub failure_threshold: u32,
    /// How long it stays open before one probe is let through. Default 5 s.
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cooldown: Duration::from_secs(5),
        }
    }
}

impl BreakerConfig {
    /// A breaker that never opens.
    pub fn disabled() -> Self {
        Self {
            failure_threshold: 0,
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// What [`Breaker::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Go ahead.
    Pass,
    /// Go ahead: this call is the probe after the cooldown.
    Probe,
    /// Fail fast; retry after at most this long.
    Reject(Duration),
}

#[derive(Debug)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    state: Mutex<State>,
    /// When Vault last answered (any answer, an error status included).
    answered: Mutex<Option<Instant>>,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: Mutex::new(State::Closed { failures: 0 }),
            answered: Mutex::new(None),
        }
    }

    /// Whether Vault answered anything within `within` of `now`.
    pub(crate) fn answered_within(&self, within: Duration, now: Instant) -> bool {
        self.answered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| now.saturating_duration_since(at) <= within)
    }

    pub(crate) fn admit(&self, now: Instant) -> Admission {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match *state {
            State::Closed { .. } => Admission::Pass,
            State::Open { until } if now >= until => {
                *state = State::HalfOpen;
                Admission::Probe
            }
            State::Open { until } => Admission::Reject(until - now),
            // One probe at a time; the others wait for its verdict.
            State::HalfOpen => Admission::Reject(self.config.cooldown),
        }
    }

    /// The server answered (any HTTP status): it is reachable.
    pub(crate) fn on_success(&self) {
        *self.answered.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state != (State::Closed { failures: 0 }) {
            if !matches!(*state, State::Closed { .. }) {
                tracing::info!("vault circuit breaker closed: Vault answered again");
            }
            *state = State::Closed { failures: 0 };
        }
    }

    /// A transport failure (connect error, timeout, reset). Returns true if it opened.
    pub(crate) fn on_transport_failure(&self, now: Instant) -> bool {
        if self.config.failure_threshold == 0 {
            return false;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (open, reopened) = match *state {
            State::Closed { failures } => {
                let failures = failures + 1;
                *state = State::Closed { failures };
                (failures >= self.config.failure_threshold, false)
            }
            State::HalfOpen => (true, true),
            State::Open { .. } => (false, false),
        };
        if open {
            *state = State::Open {
                until: now + self.config.cooldown,
            };
            if reopened {
                // The probe failed: still down. Said once when it opened, not every cooldown.
                tracing::debug!("vault circuit breaker: the probe failed; open again");
            } else {
                tracing::warn!(
                    cooldown_ms = self.config.cooldown.as_millis() as u64,
                    "vault circuit breaker opened after repeated transport failures"
                );
            }
        }
        open
    }

    /// The probe ended without a verdict (e.g. cancelled): let another one through.
    pub(crate) fn release_probe(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state == State::HalfOpen {
            *state = State::Open {
                until: Instant::now(),
            };
        }
    }

    /// Whether the breaker currently rejects calls.
    pub(crate) fn is_open(&self) -> bool {
        !matches!(
            *self.state.lock().unwrap_or_else(|e| e.into_inner()),
            State::Closed { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32) -> Breaker {
        Breaker::new(BreakerConfig {
            failure_threshold: threshold,
            cooldown: Duration::from_secs(5),
        })
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let b = breaker(3);
        let t = Instant::now();
        assert!(!b.on_transport_failure(t));
        assert!(!b.on_transport_failure(t));
        assert_eq!(b.admit(t), Admission::Pass);
        assert!(b.on_transport_failure(t));
        assert_eq!(
            b.admit(t + Duration::from_secs(1)),
            Admission::Reject(Duration::from_secs(4))
        );
    }

    #[test]
    fn success_resets_the_count() {
        let b = breaker(2);
        let t = Instant::now();
        b.on_transport_failure(t);
        b.on_success();
        assert!(!b.on_transport_failure(t));
        assert_eq!(b.admit(t), Admission::Pass);
    }

    #[test]
    fn one_probe_after_cooldown_then_close_or_reopen() {
        let b = breaker(1);
        let t = Instant::now();
        b.on_transport_failure(t);
        let later = t + Duration::from_secs(5);
        assert_eq!(b.admit(later), Admission::Probe);
        // A second caller during the probe is rejected.
        assert!(matches!(b.admit(later), Admission::Reject(_)));
        // The probe fails: open again for a full cooldown.
        assert!(b.on_transport_failure(later));
        assert!(matches!(
            b.admit(later + Duration::from_secs(1)),
            Admission::Reject(_)
        ));
        let much_later = later + Duration::from_secs(5);
        assert_eq!(b.admit(much_later), Admission::Probe);
        b.on_success();
        assert_eq!(b.admit(much_later), Admission::Pass);
        assert!(!b.is_open());
    }

    #[test]
    fn threshold_zero_never_opens() {
        let b = breaker(0);
        let t = Instant::now();
        for _ in 0..100 {
            assert!(!b.on_transport_failure(t));
        }
        assert_eq!(b.admit(t), Admission::Pass);
    }
}
