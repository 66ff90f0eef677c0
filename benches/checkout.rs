//! Checkout overhead and the hot-path credential read, side by side with what users
//! would pick instead — same server, same pool size, same run.
//!
//! `cargo bench --all-features --bench checkout` (needs the local stack:
//! `scripts/stack.sh up`). Prints criterion's numbers, then a table of ratios, then an
//! interleaved A/B of checkout + `SELECT 1` (plain and vaultpool alternating, several
//! rounds: the median ratio and its spread), because a live server on shared cores moves
//! one run by several percent. The plain pools get the same settings as vaultpool's
//! (size, deadpool timeouts, sqlx options), so only vaultpool's own work differs; the
//! work itself, without any I/O, is timed by `benches/checkout_no_io.rs`.

#[allow(unused_imports)]
#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use criterion::Criterion;
use secrecy::ExposeSecret;
use std::hint::black_box;
use vaultpool::postgres::{VaultPgPool, deadpool_postgres, tokio_postgres};
use vaultpool::sqlx::VaultSqlxPool;
use vaultpool::sqlx::sqlx::postgres::{PgConnectOptions, PgPoolOptions};

const POOL_SIZE: usize = 16;

fn sqlx_target() -> PgConnectOptions {
    PgConnectOptions::new_without_pgpass()
        .host(&common::var("PGHOST"))
        .port(common::var("PGPORT").parse().unwrap())
        .database("adaptive_immunity")
        // Plaintext on both sides of the comparison (the stack also offers TLS).
        .ssl_mode(vaultpool::sqlx::sqlx::postgres::PgSslMode::Disable)
}

/// The stack's static login (the seed's `postgres/main` user), read from KV.
async fn static_login() -> (String, String) {
    let kv = common::root_client()
        .read_kv("secret", "postgres/main")
        .await
        .unwrap();
    (
        kv.require("username").unwrap().expose_secret().to_owned(),
        kv.require("password").unwrap().expose_secret().to_owned(),
    )
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (user, password) = rt.block_on(static_login());
    let role = rt.block_on(common::create_role("1h", "2h"));

    // --- checkout + SELECT 1: deadpool ---
    let plain = {
        let mut cfg = common::pg_target();
        cfg.user(&user).password(&password);
        let mgr = deadpool_postgres::Manager::new(cfg, tokio_postgres::NoTls);
        deadpool_postgres::Pool::builder(mgr)
            .max_size(POOL_SIZE)
            // vaultpool's defaults: bounded waits.
            .timeouts(deadpool_postgres::Timeouts {
                wait: Some(Duration::from_secs(10)),
                create: Some(Duration::from_secs(10)),
                recycle: Some(Duration::from_secs(5)),
            })
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .unwrap()
    };
    let vault_pool = rt.block_on(async {
        VaultPgPool::builder(&role)
            .vault(common::approle_client("IMMUNE_SYSTEM"))
            .pg_config(common::pg_target())
            .max_size(POOL_SIZE)
            .build()
            .await
            .unwrap()
    });
    let mut g = c.benchmark_group("checkout_deadpool");
    g.bench_function("plain_deadpool_static_password", |b| {
        b.to_async(&rt).iter(|| async {
            let client = plain.get().await.unwrap();
            black_box(client.query_one("SELECT 1", &[]).await.unwrap());
        })
    });
    g.bench_function("vaultpool_VaultPgPool", |b| {
        b.to_async(&rt).iter(|| async {
            let client = vault_pool.get().await.unwrap();
            black_box(client.query_one("SELECT 1", &[]).await.unwrap());
        })
    });
    g.finish();

    // --- checkout and return only (no query; fast recycling does no I/O) ---
    let mut g = c.benchmark_group("checkout_only_deadpool");
    g.bench_function("plain_deadpool_static_password", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(plain.get().await.unwrap()) })
    });
    g.bench_function("vaultpool_VaultPgPool", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(vault_pool.get().await.unwrap()) })
    });
    g.finish();

    // --- checkout + SELECT 1: sqlx ---
    let plain_sqlx = rt.block_on(async {
        PgPoolOptions::new()
            .max_connections(POOL_SIZE as u32)
            .connect_with(sqlx_target().username(&user).password(&password))
            .await
            .unwrap()
    });
    let vault_sqlx = rt.block_on(async {
        VaultSqlxPool::builder(&role)
            .vault(common::approle_client("IMMUNE_SYSTEM"))
            .connect_options(sqlx_target())
            .pool_options(PgPoolOptions::new().max_connections(POOL_SIZE as u32))
            .build()
            .await
            .unwrap()
    });
    let mut g = c.benchmark_group("checkout_sqlx");
    g.bench_function("plain_sqlx_static_password", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = plain_sqlx.acquire().await.unwrap();
            let one: i32 = vaultpool::sqlx::sqlx::query_scalar("SELECT 1")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            black_box(one);
        })
    });
    g.bench_function("vaultpool_VaultSqlxPool", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = vault_sqlx.acquire().await.unwrap();
            let one: i32 = vaultpool::sqlx::sqlx::query_scalar("SELECT 1")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            black_box(one);
        })
    });
    g.finish();

    // --- sqlx checkout and return only: no ping before a checkout, on both sides ---
    let (plain_sqlx_quiet, vault_sqlx_quiet) = rt.block_on(async {
        let options = || {
            PgPoolOptions::new()
                .max_connections(POOL_SIZE as u32)
                .test_before_acquire(false)
        };
        (
            options()
                .connect_with(sqlx_target().username(&user).password(&password))
                .await
                .unwrap(),
            VaultSqlxPool::builder(&role)
                .vault(common::approle_client("IMMUNE_SYSTEM"))
                .connect_options(sqlx_target())
                .pool_options(options())
                .build()
                .await
                .unwrap(),
        )
    });
    let mut g = c.benchmark_group("checkout_only_sqlx");
    g.bench_function("plain_sqlx_static_password", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(plain_sqlx_quiet.acquire().await.unwrap()) })
    });
    g.bench_function("vaultpool_VaultSqlxPool", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(vault_sqlx_quiet.acquire().await.unwrap()) })
    });
    g.finish();

    // --- interleaved A/B (only in bench mode: `cargo bench`, not `cargo test`) ---
    if std::env::args().any(|a| a == "--bench") {
        let rounds = 9;
        let per_side = Duration::from_millis(1500);
        let dp = rt.block_on(interleaved(
            rounds,
            per_side,
            || async {
                let client = plain.get().await.unwrap();
                black_box(client.query_one("SELECT 1", &[]).await.unwrap());
            },
            || async {
                let client = vault_pool.get().await.unwrap();
                black_box(client.query_one("SELECT 1", &[]).await.unwrap());
            },
        ));
        let sq = rt.block_on(interleaved(
            rounds,
            per_side,
            || async {
                let mut conn = plain_sqlx.acquire().await.unwrap();
                let one: i32 = vaultpool::sqlx::sqlx::query_scalar("SELECT 1")
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap();
                black_box(one);
            },
            || async {
                let mut conn = vault_sqlx.acquire().await.unwrap();
                let one: i32 = vaultpool::sqlx::sqlx::query_scalar("SELECT 1")
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap();
                black_box(one);
            },
        ));
        println!(
            "\n### Interleaved A/B: checkout + SELECT 1, {rounds} rounds of {per_side:?} per side \
             (order alternating), vaultpool / plain\n"
        );
        println!("| flavour | median ratio | spread (min – max) | per round |");
        println!("|---|---|---|---|");
        for (what, r) in [("deadpool", dp), ("sqlx", sq)] {
            let mut sorted = r.clone();
            sorted.sort_by(f64::total_cmp);
            println!(
                "| {what} | {:.3} | {:.3} – {:.3} | {} |",
                sorted[sorted.len() / 2],
                sorted[0],
                sorted[sorted.len() - 1],
                r.iter()
                    .map(|x| format!("{x:.3}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }

    // --- the hot-path read while a writer rotates continuously ---
    let engine = vault_pool.engine().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let rotator = {
        let (pool, stop) = (vault_pool.clone(), stop.clone());
        rt.spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                pool.rotate().await.unwrap();
                n += 1;
            }
            n
        })
    };
    let plain_arc = Arc::new(engine.current());
    let mut g = c.benchmark_group("credential_read");
    g.bench_function("arc_clone", |b| {
        b.iter(|| black_box(Arc::clone(&plain_arc)))
    });
    g.bench_function("vaultpool_current", |b| {
        b.iter(|| black_box(engine.current()))
    });
    g.bench_function("vaultpool_generation", |b| {
        b.iter(|| black_box(engine.generation()))
    });
    g.finish();
    stop.store(true, Ordering::Relaxed);
    let rotations = rt.block_on(rotator).unwrap();
    println!("(the writer rotated {rotations} times during the credential_read group)");

    rt.block_on(async {
        vault_pool.close().await;
        vault_sqlx.close().await;
        vault_sqlx_quiet.close().await;
        plain_sqlx.close().await;
        plain_sqlx_quiet.close().await;
    });
    drop(plain);
    std::thread::sleep(Duration::from_millis(100));
}

/// `rounds` rounds of `a` and `b` run back to back for `per_side` each, the order
/// alternating between rounds; the ratio of their mean times (b / a) per round.
async fn interleaved<A, B, FA, FB>(rounds: usize, per_side: Duration, a: A, b: B) -> Vec<f64>
where
    A: Fn() -> FA,
    B: Fn() -> FB,
    FA: std::future::Future<Output = ()>,
    FB: std::future::Future<Output = ()>,
{
    async fn mean_ns<F: std::future::Future<Output = ()>>(
        per_side: Duration,
        f: &impl Fn() -> F,
    ) -> f64 {
        // A short warm-up, then as many calls as fit.
        for _ in 0..200 {
            f().await;
        }
        let start = std::time::Instant::now();
        let mut n = 0u64;
        while start.elapsed() < per_side {
            f().await;
            n += 1;
        }
        start.elapsed().as_nanos() as f64 / n as f64
    }
    let mut ratios = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let (ta, tb) = if round % 2 == 0 {
            let ta = mean_ns(per_side, &a).await;
            (ta, mean_ns(per_side, &b).await)
        } else {
            let tb = mean_ns(per_side, &b).await;
            (mean_ns(per_side, &a).await, tb)
        };
        ratios.push(tb / ta);
    }
    ratios
}

/// criterion's point estimate (mean, ns) of one benchmark, if it ran in bench mode.
fn estimate(group: &str, id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{dir}/criterion/{group}/{id}/new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    // criterion's headline figure: the slope where it fits one, else the mean.
    v["slope"]["point_estimate"]
        .as_f64()
        .or_else(|| v["mean"]["point_estimate"].as_f64())
}

fn ratios() {
    let rows = [
        (
            "checkout + SELECT 1, deadpool",
            "checkout_deadpool",
            "vaultpool_VaultPgPool",
            "plain_deadpool_static_password",
            1.02,
        ),
        (
            "checkout + SELECT 1, sqlx",
            "checkout_sqlx",
            "vaultpool_VaultSqlxPool",
            "plain_sqlx_static_password",
            1.02,
        ),
        (
            "checkout + return only, deadpool (no I/O)",
            "checkout_only_deadpool",
            "vaultpool_VaultPgPool",
            "plain_deadpool_static_password",
            1.02,
        ),
        (
            "checkout + return only, sqlx (no ping)",
            "checkout_only_sqlx",
            "vaultpool_VaultSqlxPool",
            "plain_sqlx_static_password",
            1.02,
        ),
        (
            "credential read: current() vs Arc clone",
            "credential_read",
            "vaultpool_current",
            "arc_clone",
            2.0,
        ),
        (
            "credential read: generation() vs Arc clone",
            "credential_read",
            "vaultpool_generation",
            "arc_clone",
            2.0,
        ),
    ];
    println!("\n| comparison | vaultpool | baseline | ratio | goal |");
    println!("|---|---|---|---|---|");
    for (what, group, ours, theirs, goal) in rows {
        match (estimate(group, ours), estimate(group, theirs)) {
            (Some(a), Some(b)) => println!(
                "| {what} | {} | {} | {:.3} | ≤ {goal} |",
                fmt_ns(a),
                fmt_ns(b),
                a / b
            ),
            _ => println!("| {what} | (not measured in this mode) | | | ≤ {goal} |"),
        }
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1000.0 {
        format!("{:.1} µs", ns / 1000.0)
    } else {
        format!("{ns:.1} ns")
    }
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    benches(&mut c);
    c.final_summary();
    ratios();
}
