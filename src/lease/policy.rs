//! The schedule, as a pure function: given a lease and what happened to it, when to act
//! next and how (renew, rotate, or report it expired). No clock, no randomness inside:
//! `now` and a jitter sample in `[0, 1)` come in as arguments, so tables test it.
//!
//! The rules:
//! - A renewable lease is renewed at `renew_fraction` of its TTL (default 2/3), brought
//!   forward by up to `jitter` of that (default 10%). Vault's Go `LifetimeWatcher` renews
//!   at ~70% with 10–20% grace.
//! - The first renewal of a newly issued lease is brought forward by up to
//!   `first_renewal_spread` of that instead (default 90%: anywhere from 1/15 to 2/3 of
//!   the TTL). A 10% jitter alone keeps leases issued together (a fleet starting at
//!   once, many pools in one process) renewing in clumps for many cycles; spread over a
//!   whole cycle once, they stay apart. It costs at most one early renewal per lease.
//!   (Rotations are not spread: leases issued together reach their max_ttl together.)
//! - A lease that cannot be renewed (not renewable, or its last renewal came back capped
//!   by max_ttl, or the token that issued it ends first) is rotated `margin` before its
//!   end: new credentials serve before the old ones are in danger.
//! - After a failure, the next attempt backs off exponentially with jitter (250 ms to
//!   5 s by default), but never past the point where the lease is in danger: a failing
//!   renewal turns into a rotation at the rotation point, and the last attempt happens
//!   before the end.
//! - Past its end the lease is expired: keep trying to obtain new credentials.

use std::time::{Duration, Instant};

use crate::backoff::Backoff;

/// Renewal and rotation timing.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Policy {
    /// Fraction of the TTL after which a lease is renewed. Default 2/3.
    pub renew_fraction: f64,
    /// Renewal is brought forward by up to this fraction of its delay (random). Default 0.1.
    pub jitter: f64,
    /// The first renewal of a newly issued lease is brought forward by up to this
    /// fraction of its delay (spread evenly across the leases of the process), so leases
    /// issued together renew apart from then on. Default 0.9; at most `jitter` has no
    /// further effect.
    pub first_renewal_spread: f64,
    /// How long before its end a lease that cannot be renewed further is replaced.
    /// Default `None`: the larger of 10% of the lease's TTL and `min_margin`, but at most
    /// half the TTL. Not zero.
    pub margin: Option<Duration>,
    /// The lower bound of the default margin. Default 5 s; not zero.
    pub min_margin: Duration,
    /// First retry delay after a failure. Default 250 ms; at least 10 ms.
    pub retry_min: Duration,
    /// Largest retry delay. Default 5 s (short, so a pool heals quickly once Vault is
    /// back); from 100 ms to an hour.
    pub retry_max: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            renew_fraction: 2.0 / 3.0,
            jitter: 0.1,
            first_renewal_spread: 0.9,
            margin: None,
            min_margin: Duration::from_secs(5),
            retry_min: Duration::from_millis(250),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// The shortest first retry a policy may ask for.
const RETRY_MIN_FLOOR: Duration = Duration::from_millis(10);
/// The shortest longest retry a policy may ask for: a lasting failure is retried at most
/// ten times a second.
const RETRY_MAX_FLOOR: Duration = Duration::from_millis(100);

impl Policy {
    /// Check that every field is in range, so that no arithmetic on it can panic and no
    /// retry can be immediate.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) naming the field and its range.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |what: String| {
            Err(crate::Error::new(
                crate::ErrorKind::Config,
                format!("checking the lease policy: {what}"),
            ))
        };
        if !(self.renew_fraction.is_finite()
            && self.renew_fraction > 0.0
            && self.renew_fraction < 1.0)
        {
            return bad(format!(
                "renew_fraction is {}; use a fraction between 0 and 1 (default 2/3)",
                self.renew_fraction
            ));
        }
        if !(self.jitter.is_finite() && (0.0..1.0).contains(&self.jitter)) {
            return bad(format!(
                "jitter is {}; use a fraction from 0 up to (not including) 1 (default 0.1)",
                self.jitter
            ));
        }
        if !(self.first_renewal_spread.is_finite()
            && (0.0..1.0).contains(&self.first_renewal_spread))
        {
            return bad(format!(
                "first_renewal_spread is {}; use a fraction from 0 up to (not including) 1 \
                 (default 0.9)",
                self.first_renewal_spread
            ));
        }
        if self.retry_min < RETRY_MIN_FLOOR {
            return bad(format!(
                "retry_min is {:?}: a failing call would be retried almost at once, in a \
                 loop; use at least {RETRY_MIN_FLOOR:?} (default 250 ms)",
                self.retry_min
            ));
        }
        if self.retry_max < RETRY_MAX_FLOOR {
            return bad(format!(
                "retry_max is {:?}: a lasting failure would be retried more than ten times a \
                 second for as long as it lasts; use at least {RETRY_MAX_FLOOR:?} (default 5 s)",
                self.retry_max
            ));
        }
        if self.margin.is_some_and(|m| m.is_zero()) || self.min_margin.is_zero() {
            return bad(format!(
                "margin is {:?} and min_margin {:?}: a zero margin rotates at the lease's very \
                 end, when it can no longer serve; use at least a second, or leave margin \
                 unset (default: 10% of the TTL, at least min_margin = 5 s)",
                self.margin, self.min_margin
            ));
        }
        if self.retry_max > Duration::from_secs(3600) {
            return bad(format!(
                "retry_max is {:?}; use at most an hour (default 5 s)",
                self.retry_max
            ));
        }
        if self.retry_max < self.retry_min {
            return bad(format!(
                "retry_max ({:?}) is below retry_min ({:?})",
                self.retry_max, self.retry_min
            ));
        }
        Ok(())
    }

    /// The rotation margin for a lease whose full TTL is `ttl`.
    pub fn margin_for(&self, ttl: Duration) -> Duration {
        let m = self
            .margin
            .unwrap_or_else(|| (ttl / 10).max(self.min_margin));
        m.min(ttl / 2)
    }

    /// The delay before retry number `failures` (1 = first retry): exponential, capped,
    /// with "equal jitter" (between half and all of the step).
    pub fn retry_delay(&self, failures: u32, jitter_unit: f64) -> Duration {
        Backoff::new(self.retry_min, self.retry_max).delay_jittered(failures, jitter_unit)
    }
}

/// A sample in `[0, 1)` for a first renewal's spread: successive calls in a process walk
/// the golden-ratio sequence from a random start, so leases issued one after another get
/// samples spread evenly over the interval (no clumps a run of random draws can have),
/// and processes starting together do not share their samples.
pub(crate) fn spread_sample() -> f64 {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static START: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| fastrand::u64(..));
    golden(start, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The `k`th point of the golden-ratio sequence from `start`, in `[0, 1)`.
fn golden(start: u64, k: u64) -> f64 {
    // 2^64 / φ: adding it walks the unit interval in the golden ratio, fixed-point.
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
    let x = start.wrapping_add(k.wrapping_mul(GOLDEN));
    // The top 53 bits as a double in [0, 1).
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// How long before the end the last attempt of a failing lease is made (the worker cuts
/// a step before it in time: see `STEP_CUT_BEFORE_END`).
pub(crate) const LAST_ATTEMPT_BEFORE_END: Duration = Duration::from_millis(100);

/// What is known about the current lease.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseState {
    /// When the lease was issued or last renewed.
    pub(crate) renewed_at: Instant,
    /// Its TTL from `renewed_at`; zero for a lease that never expires.
    pub(crate) ttl: Duration,
    /// The TTL it was issued with (what renewals ask for).
    pub(crate) full_ttl: Duration,
    /// Whether Vault allows renewing it.
    pub(crate) renewable: bool,
    /// The last renewal returned less than asked: the lease is at its max_ttl.
    pub(crate) capped: bool,
    /// Not renewed since it was issued: its first renewal is spread wider.
    pub(crate) fresh: bool,
    /// An end imposed from outside, e.g. the issuing token's hard expiry.
    pub(crate) hard_end: Option<Instant>,
    /// Consecutive failed attempts (renew or rotate) since the last success.
    pub(crate) failures: u32,
    /// When the last attempt failed.
    pub(crate) last_failure: Option<Instant>,
}

impl LeaseState {
    /// The moment the lease ends, or `None` for a lease without expiry.
    pub(crate) fn end(&self) -> Option<Instant> {
        let natural = (!self.ttl.is_zero()).then(|| self.renewed_at + self.ttl);
        match (natural, self.hard_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Renew the lease.
    Renew,
    /// Obtain new credentials and switch to them.
    Rotate,
    /// The lease has ended: credentials are unusable until new ones are obtained.
    Expired,
}

/// The next step: `action` at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// What to do.
    pub(crate) action: Action,
    /// When (never before `now`).
    pub(crate) at: Instant,
}

/// Plan the next step for `lease` at `now`. `jitter_unit` is a random sample in
/// `[0, 1)`. `None` means nothing is ever due (a lease without expiry).
pub(crate) fn plan(
    policy: &Policy,
    lease: &LeaseState,
    now: Instant,
    jitter_unit: f64,
) -> Option<Plan> {
    let end = lease.end()?;
    let retry_at = (lease.failures > 0).then(|| {
        let from = lease.last_failure.unwrap_or(now);
        (from + policy.retry_delay(lease.failures, jitter_unit)).max(now)
    });
    if now >= end {
        // Expired: keep trying to obtain new credentials, backing off between failures.
        return Some(Plan {
            action: Action::Expired,
            at: retry_at.unwrap_or(now),
        });
    }
    let margin = policy.margin_for(if lease.full_ttl.is_zero() {
        lease.ttl
    } else {
        lease.full_ttl
    });
    let rotate_at = end.checked_sub(margin).unwrap_or(now).max(now);
    let hard_end_first = lease
        .hard_end
        .is_some_and(|h| lease.ttl.is_zero() || h < lease.renewed_at + lease.ttl);
    let can_renew = lease.renewable && !lease.capped && !hard_end_first && !lease.ttl.is_zero();

    if let Some(retry_at) = retry_at {
        // Back off from the last failure. A renewal that keeps failing turns into a
        // rotation once the rotation point is reached.
        let action = if can_renew && retry_at < rotate_at {
            Action::Renew
        } else {
            Action::Rotate
        };
        // Never past the end: one last try just before it; after that, the end.
        let last_try = end.checked_sub(LAST_ATTEMPT_BEFORE_END).unwrap_or(end);
        let from = lease.last_failure.unwrap_or(now);
        return Some(if from < last_try {
            Plan {
                action,
                at: retry_at.min(last_try).max(now),
            }
        } else {
            Plan {
                action: Action::Expired,
                at: end,
            }
        });
    }

    if !can_renew {
        return Some(Plan {
            action: Action::Rotate,
            at: rotate_at,
        });
    }
    let spread = if lease.fresh {
        policy.first_renewal_spread.max(policy.jitter)
    } else {
        policy.jitter
    };
    let delay = lease
        .ttl
        .mul_f64(policy.renew_fraction * (1.0 - spread * jitter_unit.clamp(0.0, 1.0)));
    let renew_at = (lease.renewed_at + delay).min(rotate_at).max(now);
    Some(Plan {
        action: Action::Renew,
        at: renew_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_settings_are_config_errors_naming_the_field() {
        type Case = (&'static str, fn(&mut Policy));
        let cases: [Case; 15] = [
            ("renew_fraction", |p| p.renew_fraction = 0.0),
            ("renew_fraction", |p| p.renew_fraction = 1.5),
            ("renew_fraction", |p| p.renew_fraction = f64::NAN),
            ("jitter", |p| p.jitter = -0.1),
            ("jitter", |p| p.jitter = 1.0),
            ("first_renewal_spread", |p| p.first_renewal_spread = 1.0),
            ("first_renewal_spread", |p| {
                p.first_renewal_spread = f64::INFINITY
            }),
            ("retry_min", |p| p.retry_min = Duration::ZERO),
            ("retry_min", |p| p.retry_min = Duration::from_nanos(1)),
            ("retry_max", |p| p.retry_max = Duration::MAX),
            ("retry_max", |p| p.retry_max = Duration::from_millis(1)),
            // 1 ms both ways was accepted: a failing call retried 1,000 times a second.
            ("retry_min", |p| {
                p.retry_min = Duration::from_millis(1);
                p.retry_max = Duration::from_millis(1);
            }),
            ("retry_max", |p| {
                p.retry_min = Duration::from_millis(10);
                p.retry_max = Duration::from_millis(10);
            }),
            ("margin", |p| p.margin = Some(Duration::ZERO)),
            ("min_margin", |p| p.min_margin = Duration::ZERO),
        ];
        for (field, set) in cases {
            let mut p = Policy::default();
            set(&mut p);
            let e = p.validate().unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Config);
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
        assert!(Policy::default().validate().is_ok());
    }

    const S: Duration = Duration::from_secs(1);

    fn lease(t0: Instant, ttl: u64) -> LeaseState {
        LeaseState {
            renewed_at: t0,
            ttl: S * ttl as u32,
            full_ttl: S * ttl as u32,
            renewable: true,
            capped: false,
            fresh: false,
            hard_end: None,
            failures: 0,
            last_failure: None,
        }
    }

    fn secs(t0: Instant, at: Instant) -> f64 {
        (at - t0).as_secs_f64()
    }

    #[test]
    fn table() {
        let p = Policy::default();
        let t0 = Instant::now();
        // (description, lease, now offset s, jitter, expected action, expected at offset s)
        let cases: Vec<(&str, LeaseState, f64, f64, Action, f64)> = vec![
            (
                "renew at 2/3, no jitter",
                lease(t0, 60),
                0.0,
                0.0,
                Action::Renew,
                40.0,
            ),
            (
                "renew at 2/3 - 10%, full jitter",
                lease(t0, 60),
                0.0,
                1.0,
                Action::Renew,
                36.0,
            ),
            (
                "2h lease renews at 80 min",
                lease(t0, 7200),
                0.0,
                0.0,
                Action::Renew,
                4800.0,
            ),
            (
                "not renewable: rotate margin (10% = 720 s) before the end",
                LeaseState {
                    renewable: false,
                    ..lease(t0, 7200)
                },
                0.0,
                0.5,
                Action::Rotate,
                6480.0,
            ),
            (
                "capped short lease: margin is the 5 s floor",
                LeaseState {
                    capped: true,
                    ..lease(t0, 30)
                },
                0.0,
                0.0,
                Action::Rotate,
                25.0,
            ),
            (
                "tiny lease: margin at most half the TTL",
                LeaseState {
                    renewable: false,
                    ..lease(t0, 4)
                },
                0.0,
                0.0,
                Action::Rotate,
                2.0,
            ),
            (
                "10 s lease: renewal pulled in to the rotation point",
                lease(t0, 10),
                0.0,
                0.0,
                Action::Renew,
                5.0,
            ),
            (
                "token ends before the lease: rotate before the token's end",
                LeaseState {
                    hard_end: Some(t0 + S * 20),
                    ..lease(t0, 60)
                },
                0.0,
                0.0,
                Action::Rotate,
                14.0,
            ),
            (
                "past the rotation point: rotate now",
                LeaseState {
                    capped: true,
                    ..lease(t0, 30)
                },
                27.0,
                0.0,
                Action::Rotate,
                27.0,
            ),
            (
                "past the end: expired",
                lease(t0, 30),
                31.0,
                0.0,
                Action::Expired,
                31.0,
            ),
            (
                "expired and failing: back off",
                LeaseState {
                    failures: 2,
                    last_failure: Some(t0 + S * 31),
                    ..lease(t0, 30)
                },
                31.0,
                1.0,
                Action::Expired,
                31.5,
            ),
            (
                "last try already made: next is the end",
                LeaseState {
                    failures: 9,
                    last_failure: Some(t0 + Duration::from_millis(59_950)),
                    capped: true,
                    ..lease(t0, 60)
                },
                59.95,
                1.0,
                Action::Expired,
                60.0,
            ),
            (
                "renewal failed once: retry after 125..250 ms",
                LeaseState {
                    failures: 1,
                    last_failure: Some(t0 + S * 40),
                    ..lease(t0, 60)
                },
                40.0,
                1.0,
                Action::Renew,
                40.25,
            ),
            (
                "many failures: backoff capped at 5 s",
                LeaseState {
                    failures: 30,
                    last_failure: Some(t0 + S * 40),
                    ..lease(t0, 60)
                },
                40.0,
                1.0,
                Action::Renew,
                45.0,
            ),
            (
                "renewal failing past the rotation point becomes a rotation",
                LeaseState {
                    failures: 5,
                    last_failure: Some(t0 + S * 53),
                    ..lease(t0, 60)
                },
                53.0,
                1.0,
                Action::Rotate,
                57.0,
            ),
            (
                "failing rotation near the end: last try just before the end",
                LeaseState {
                    failures: 9,
                    last_failure: Some(t0 + S * 59),
                    capped: true,
                    ..lease(t0, 60)
                },
                59.0,
                1.0,
                Action::Rotate,
                59.9,
            ),
        ];
        for (what, l, now, jitter, action, at) in cases {
            let now = t0 + Duration::from_secs_f64(now);
            let got = plan(&p, &l, now, jitter).unwrap();
            assert_eq!(got.action, action, "{what}");
            assert!(
                (secs(t0, got.at) - at).abs() < 0.001,
                "{what}: at {} s, expected {at} s",
                secs(t0, got.at)
            );
            assert!(got.at >= now, "{what}: scheduled in the past");
        }
    }

    #[test]
    fn lease_without_expiry_needs_nothing() {
        let t0 = Instant::now();
        let l = LeaseState {
            ttl: Duration::ZERO,
            full_ttl: Duration::ZERO,
            ..lease(t0, 0)
        };
        assert_eq!(plan(&Policy::default(), &l, t0, 0.5), None);
    }

    #[test]
    fn never_scheduled_past_the_end_for_any_state() {
        let p = Policy::default();
        let t0 = Instant::now();
        for ttl in [2u64, 10, 30, 60, 3600] {
            for failures in [0u32, 1, 3, 10, 40] {
                for (capped, fresh) in [(false, false), (true, false), (false, true)] {
                    for now_frac in [0.0, 0.3, 0.6, 0.9, 0.99] {
                        for jitter in [0.0, 0.5, 0.999] {
                            let now = t0 + Duration::from_secs(ttl).mul_f64(now_frac);
                            let l = LeaseState {
                                capped,
                                fresh,
                                failures,
                                last_failure: (failures > 0).then_some(now),
                                ..lease(t0, ttl)
                            };
                            let got = plan(&p, &l, now, jitter).unwrap();
                            let end = l.end().unwrap();
                            assert!(got.at >= now);
                            assert!(
                                got.at < end || (got.action == Action::Expired && got.at == end),
                                "ttl {ttl} failures {failures} capped {capped} at {now_frac}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn jitter_spreads_renewals() {
        let p = Policy::default();
        let t0 = Instant::now();
        let l = lease(t0, 3600);
        let a = plan(&p, &l, t0, 0.0).unwrap().at;
        let b = plan(&p, &l, t0, 0.99).unwrap().at;
        assert!(
            a - b > Duration::from_secs(200),
            "jitter must spread by ~10%"
        );
    }

    #[test]
    fn a_fresh_lease_renews_first_anywhere_in_its_first_cycle() {
        let p = Policy::default();
        let t0 = Instant::now();
        let fresh = LeaseState {
            fresh: true,
            ..lease(t0, 60)
        };
        // From 2/3 of the TTL (40 s) down to 1/15 of it (4 s).
        assert_eq!(secs(t0, plan(&p, &fresh, t0, 0.0).unwrap().at), 40.0);
        let earliest = secs(t0, plan(&p, &fresh, t0, 0.999_999).unwrap().at);
        assert!((earliest - 4.0).abs() < 0.01, "{earliest}");
        // After that, 10% only.
        let renewed = plan(&p, &lease(t0, 60), t0, 0.999_999).unwrap().at;
        assert!((secs(t0, renewed) - 36.0).abs() < 0.01);
        // Off: as wide as `jitter`, never narrower.
        let off = Policy {
            first_renewal_spread: 0.0,
            ..p
        };
        assert!((secs(t0, plan(&off, &fresh, t0, 0.999_999).unwrap().at) - 36.0).abs() < 0.01);
    }

    #[test]
    fn spread_samples_cover_the_interval_evenly() {
        // 1,000 samples in a row (as 1,000 leases issued one after another get them):
        // every tenth of [0, 1) holds 100 ± 2 of them; random draws would vary by ~±10.
        for start in [0, 1 << 63, fastrand::u64(..), u64::MAX] {
            let mut tenths = [0u32; 10];
            for k in 0..1000 {
                let x = golden(start, k);
                assert!((0.0..1.0).contains(&x));
                tenths[(x * 10.0) as usize] += 1;
            }
            assert!(
                tenths.iter().all(|&n| (98..=102).contains(&n)),
                "{tenths:?}"
            );
        }
        assert!((0.0..1.0).contains(&spread_sample()));
    }

    #[test]
    fn retry_delay_doubles_and_caps() {
        let p = Policy::default();
        assert_eq!(p.retry_delay(1, 1.0), Duration::from_millis(250));
        assert_eq!(p.retry_delay(2, 1.0), Duration::from_millis(500));
        assert_eq!(p.retry_delay(3, 0.0), Duration::from_millis(500));
        assert_eq!(p.retry_delay(20, 1.0), Duration::from_secs(5));
        assert_eq!(p.retry_delay(u32::MAX, 1.0), Duration::from_secs(5));
    }
}
