//! The metrics the README lists, read from a recorder installed in this test process
//! (a binary of its own: the recorder is global), against real OpenBao + PostgreSQL.
#![cfg(feature = "postgres")]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use vaultpool::postgres::VaultPgPool;

/// Every metric's value (counters, gauges) or number of records (histograms), by
/// `name{label=value,…}` with the labels sorted.
type Values = Arc<Mutex<BTreeMap<String, f64>>>;

struct Capture(Values);

struct Handle(String, Values);

impl Handle {
    fn update(&self, f: impl FnOnce(&mut f64)) {
        f(self.1.lock().unwrap().entry(self.0.clone()).or_insert(0.0));
    }
}

impl metrics::CounterFn for Handle {
    fn increment(&self, value: u64) {
        self.update(|v| *v += value as f64);
    }
    fn absolute(&self, value: u64) {
        self.update(|v| *v = value as f64);
    }
}

impl metrics::GaugeFn for Handle {
    fn increment(&self, value: f64) {
        self.update(|v| *v += value);
    }
    fn decrement(&self, value: f64) {
        self.update(|v| *v -= value);
    }
    fn set(&self, value: f64) {
        self.update(|v| *v = value);
    }
}

impl metrics::HistogramFn for Handle {
    fn record(&self, _: f64) {
        self.update(|v| *v += 1.0);
    }
}

impl Capture {
    fn handle(&self, key: &Key) -> Arc<Handle> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        self.0.lock().unwrap().entry(name.clone()).or_insert(0.0);
        Arc::new(Handle(name, self.0.clone()))
    }
}

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.handle(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.handle(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.handle(key))
    }
}

/// Every metric name the README lists, with its labels, after checkouts, a wait that
/// timed out, a rotation and a renewal: present, and counting what happened
/// (`vaultpool_lease_failures_total` appears with the first failure; the fault tests
/// make those).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_emitted_with_its_labels() {
    let values = Values::default();
    metrics::set_global_recorder(Capture(values.clone())).unwrap();
    let role = create_role("6s", "1h").await;
    let pool = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_target())
        .max_size(2)
        .timeouts(vaultpool::pool::Timeouts {
            wait: Some(Duration::from_millis(200)),
            create: Some(Duration::from_secs(10)),
            recycle: Some(Duration::from_secs(5)),
        })
        .build()
        .await
        .unwrap();
    for _ in 0..50 {
        pool.get()
            .await
            .unwrap()
            .query_one("SELECT 1", &[])
            .await
            .unwrap();
    }
    // Both connections held: the next checkout waits 200 ms and times out.
    let (a, b) = (pool.get().await.unwrap(), pool.get().await.unwrap());
    assert!(pool.get().await.is_err());
    let in_use = format!("vaultpool_pool_connections{{role={role},state=in_use}}");
    eventually(Duration::from_secs(5), "a sample with 2 in use", || {
        values.lock().unwrap().get(&in_use) == Some(&2.0)
    })
    .await;
    drop((a, b));
    pool.rotate().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let renewals = format!("vaultpool_renewals_total{{role={role}}}");
    eventually(Duration::from_secs(10), "a renewal counted", || {
        values
            .lock()
            .unwrap()
            .get(&renewals)
            .is_some_and(|n| *n >= 1.0)
    })
    .await;
    let got = values.lock().unwrap().clone();
    let value = |name: &str| {
        *got.get(name)
            .unwrap_or_else(|| panic!("{name} missing; emitted: {:#?}", got.keys()))
    };
    let r = format!("role={role}");
    println!("metrics after 52 checkouts, a timeout and a rotation:");
    for (name, v) in got.iter().filter(|(n, _)| n.contains(&r)) {
        println!("  {name} = {v}");
    }
    assert!(value(&format!("vaultpool_pool_checkout_wait_seconds{{{r}}}")) >= 53.0);
    assert_eq!(
        value(&format!("vaultpool_pool_checkout_timeouts_total{{{r}}}")),
        1.0
    );
    assert!(value(&format!("vaultpool_pool_connections_opened_total{{{r}}}")) >= 2.0);
    assert!(
        value(&format!(
            "vaultpool_pool_connections_closed_total{{reason=rotated,{r}}}"
        )) >= 2.0,
        "the rotation retired the two idle connections"
    );
    value(&format!(
        "vaultpool_pool_connections_closed_total{{reason=max_lifetime,{r}}}"
    ));
    value(&format!(
        "vaultpool_pool_connections_closed_total{{reason=broken,{r}}}"
    ));
    value(&format!("vaultpool_pool_connections{{{r},state=idle}}"));
    assert_eq!(value(&format!("vaultpool_pool_waiting{{{r}}}")), 0.0);
    assert_eq!(
        value(&format!("vaultpool_pool_max_connections{{{r}}}")),
        2.0
    );
    for phase in ["issue", "verify", "warm", "swap"] {
        assert_eq!(
            value(&format!(
                "vaultpool_rotation_phase_seconds{{phase={phase},{r}}}"
            )),
            1.0
        );
    }
    assert_eq!(value(&format!("vaultpool_rotations_total{{{r}}}")), 1.0);
    assert!(value(&format!("vaultpool_lease_seconds_remaining{{{r}}}")) > 0.0);
    pool.close().await;
    let revoked = values.lock().unwrap()[&format!("vaultpool_revocations_total{{{r}}}")];
    assert!(revoked >= 1.0, "{revoked}");
}
