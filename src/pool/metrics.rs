//! The pool's metrics, through the `metrics` facade: checkout wait and timeouts,
//! connections opened and closed (by reason), and — sampled once a second — connections
//! in use and idle, and callers waiting. Handles are registered once per pool (install
//! your recorder before building pools), so a checkout costs a clock read and one
//! histogram record, not a label lookup.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

/// Why a pooled connection was closed (the `reason` label).
#[derive(Clone, Copy)]
pub(crate) enum Closed {
    /// Its generation was retired (a rotation).
    Rotated,
    /// It reached the pool's max lifetime.
    MaxLifetime,
    /// Its check before reuse failed (the server closed it, a FATAL error).
    Broken,
}

/// One pool's metric handles, labelled by its `role`.
pub(crate) struct PoolMetrics {
    checkout_wait: Histogram,
    checkout_timeouts: Counter,
    opened: Counter,
    closed: [Counter; 3],
    in_use: Gauge,
    idle: Gauge,
    waiting: Gauge,
    max: Gauge,
}

impl PoolMetrics {
    /// The handles of the pool on `role`.
    pub(crate) fn new(role: &str) -> Self {
        let role = role.to_owned();
        let closed = |reason: &'static str| metrics::counter!("vaultpool_pool_connections_closed_total", "role" => role.clone(), "reason" => reason);
        let connections = |state: &'static str| metrics::gauge!("vaultpool_pool_connections", "role" => role.clone(), "state" => state);
        Self {
            checkout_wait: metrics::histogram!("vaultpool_pool_checkout_wait_seconds", "role" => role.clone()),
            checkout_timeouts: metrics::counter!("vaultpool_pool_checkout_timeouts_total", "role" => role.clone()),
            opened: metrics::counter!("vaultpool_pool_connections_opened_total", "role" => role.clone()),
            closed: [closed("rotated"), closed("max_lifetime"), closed("broken")],
            in_use: connections("in_use"),
            idle: connections("idle"),
            waiting: metrics::gauge!("vaultpool_pool_waiting", "role" => role.clone()),
            max: metrics::gauge!("vaultpool_pool_max_connections", "role" => role),
        }
    }

    /// A checkout that took `wait` (until a connection or the error).
    pub(crate) fn checkout(&self, wait: Duration, timed_out: bool) {
        self.checkout_wait.record(wait.as_secs_f64());
        if timed_out {
            self.checkout_timeouts.increment(1);
        }
    }

    /// A connection was opened.
    pub(crate) fn opened(&self) {
        self.opened.increment(1);
    }

    /// `n` connections were closed for `why`.
    pub(crate) fn closed(&self, why: Closed, n: u64) {
        self.closed[why as usize].increment(n);
    }

    /// The pool's sizes now.
    pub(crate) fn sample(&self, status: &deadpool::Status) {
        let idle = status.available;
        self.in_use.set(status.size.saturating_sub(idle) as f64);
        self.idle.set(idle as f64);
        self.waiting.set(status.waiting as f64);
        self.max.set(status.max_size as f64);
    }
}
