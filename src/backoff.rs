//! One backoff rule for every retry in the crate: a delay that starts at a floor and
//! doubles with each failure in a row up to a cap.
//!
//! Each retry loop names its own `Backoff` constant (the floor and cap are the policy);
//! how the delay grows is written once, here.

use std::time::Duration;

/// A delay that doubles from `min` (after the first failure) up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// From `min` (the delay after the first failure, the floor) up to `max` (the cap).
    pub(crate) const fn new(min: Duration, max: Duration) -> Self {
        Self { min, max }
    }

    /// The delay after `failures` failures in a row: `min` for the first (and for 0),
    /// doubled for each one after it, capped at `max`. Saturating: no count overflows it.
    pub(crate) fn delay(self, failures: u32) -> Duration {
        self.min
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
            .min(self.max)
    }

    /// [`delay`](Self::delay) with "equal jitter": between half and all of it, by
    /// `unit`, a sample in `[0, 1)` (clamped).
    pub(crate) fn delay_jittered(self, failures: u32, unit: f64) -> Duration {
        self.delay(failures)
            .mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// The same rule for `backon`: at most `retries` retries, each delay jittered upwards
    /// by up to itself (backon's jitter), for loops that `backon` drives.
    pub(crate) fn retries(self, retries: usize) -> backon::ExponentialBuilder {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_max_times(retries)
            .with_jitter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_floor_to_the_cap_and_never_overflows() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let got: Vec<u64> = (0..8).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(got, [1, 1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(30));
        let huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.delay(40), Duration::MAX);
    }

    #[test]
    fn equal_jitter_stays_between_half_and_all_of_the_step() {
        let b = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        assert_eq!(b.delay_jittered(3, 0.0), Duration::from_millis(400));
        assert_eq!(b.delay_jittered(3, 1.0), Duration::from_millis(800));
        assert_eq!(b.delay_jittered(3, 7.0), Duration::from_millis(800));
        assert_eq!(b.delay_jittered(3, -1.0), Duration::from_millis(400));
    }
}
