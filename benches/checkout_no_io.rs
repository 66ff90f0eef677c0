//! Checkout overhead with no I/O at all: the same no-op connection behind plain deadpool
//! and behind vaultpool's pool (`VaultPool::custom`, credentials from a provider that
//! needs no Vault), so only the work vaultpool adds to a checkout is timed — the lease
//! check, the generation tag, the recycle check and the return. A live server moves the
//! live benches by several percent from run to run; this one resolves fractions of one.
//!
//! `cargo bench --all-features --bench checkout_no_io` (no stack needed). Prints
//! criterion's numbers, then the ratio.

use std::hint::black_box;
use std::time::Duration;

use criterion::Criterion;
use deadpool::managed::{self, Metrics, RecycleResult};
use vaultpool::lease::{BoxFuture, CredentialProvider, CredentialSource};
use vaultpool::pool::{Connect, VaultPool};
use vaultpool::{Credentials, Lease, Leased};

const POOL_SIZE: usize = 16;

/// The connection: nothing behind it.
struct NoopConn(#[allow(dead_code)] u64);

/// Plain deadpool's manager for it.
struct NoopManager;

impl managed::Manager for NoopManager {
    type Type = NoopConn;
    type Error = std::io::Error;
    async fn create(&self) -> Result<NoopConn, std::io::Error> {
        Ok(NoopConn(0))
    }
    async fn recycle(&self, _: &mut NoopConn, _: &Metrics) -> RecycleResult<std::io::Error> {
        Ok(())
    }
}

/// vaultpool's `Connect` for it: the same no-op.
#[derive(Clone)]
struct NoopConnect;

impl Connect for NoopConnect {
    type Conn = NoopConn;
    type Error = std::io::Error;
    fn open<'a>(&'a self, _: &'a Credentials) -> BoxFuture<'a, Result<NoopConn, std::io::Error>> {
        Box::pin(async { Ok(NoopConn(0)) })
    }
    fn is_auth_failure(&self, _: &std::io::Error) -> bool {
        false
    }
    fn check<'a>(&'a self, _: &'a mut NoopConn) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn target(&self) -> String {
        "nothing".into()
    }
}

/// Credentials without Vault: one lease for an hour.
struct OneLease;

impl CredentialProvider for OneLease {
    fn issue(&self) -> BoxFuture<'_, vaultpool::Result<Leased<Credentials>>> {
        Box::pin(async {
            Ok(Leased::new(
                Credentials::new("bench", "not-a-secret"),
                Lease::new("bench#1", Duration::from_secs(3600), false),
            ))
        })
    }
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let plain = managed::Pool::<NoopManager>::builder(NoopManager)
        .max_size(POOL_SIZE)
        .build()
        .unwrap();
    let ours = rt.block_on(async {
        VaultPool::custom(CredentialSource::custom("bench", OneLease), NoopConnect)
            .max_size(POOL_SIZE)
            .build()
            .await
            .unwrap()
    });
    let plain_timeouts = managed::Pool::<NoopManager>::builder(NoopManager)
        .max_size(POOL_SIZE)
        .timeouts(managed::Timeouts {
            wait: Some(Duration::from_secs(10)),
            create: Some(Duration::from_secs(10)),
            recycle: Some(Duration::from_secs(5)),
        })
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .unwrap();
    let mut g = c.benchmark_group("checkout_no_io");
    g.bench_function("plain_deadpool", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(plain.get().await.unwrap()) })
    });
    g.bench_function("plain_deadpool_timeouts", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(plain_timeouts.get().await.unwrap()) })
    });
    g.bench_function("vaultpool", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(ours.get().await.unwrap()) })
    });
    g.finish();
    rt.block_on(ours.close());
    c.final_summary();

    let estimate = |id: &str| -> Option<f64> {
        let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        let path = format!("{dir}/criterion/checkout_no_io/{id}/new/estimates.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        // criterion's headline figure: the slope where it fits one, else the mean.
        v["slope"]["point_estimate"]
            .as_f64()
            .or_else(|| v["mean"]["point_estimate"].as_f64())
    };
    println!("\n| checkout + return, no I/O | vaultpool | plain deadpool | added | ratio |");
    println!("|---|---|---|---|---|");
    for (baseline, what) in [
        (
            "plain_deadpool_timeouts",
            "same settings (vaultpool's timeouts)",
        ),
        ("plain_deadpool", "deadpool without timeouts"),
    ] {
        if let (Some(a), Some(b)) = (estimate("vaultpool"), estimate(baseline)) {
            println!(
                "| vs {what} | {a:.1} ns | {b:.1} ns | {:.1} ns | {:.3} |",
                a - b,
                a / b
            );
        }
    }
}
