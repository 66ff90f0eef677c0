//! The load benchmark: rotation latency, rotation under load (vaultpool vs the naive
//! "rebuild the pool on every rotation"), and scale (many leases against one OpenBao).
//! Prints tables, writes `bench-results/load.csv`, `bench-results/load.svg` and
//! `bench-results/scale.csv`.
//!
//! `cargo run --release --all-features --example load_bench` (full, ~6 min) or
//! `… -- --smoke` (CI: seconds); `… -- --only=scale` or `--only=load` runs one part.
//! Needs the local stack (`scripts/stack.sh up`).

#[allow(unused_imports)]
#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use secrecy::ExposeSecret;
use vaultpool::lease::{DatabaseRole, Engine};
use vaultpool::postgres::{VaultPgPool, deadpool_postgres, tokio_postgres};
use vaultpool::vault::Client;

struct Settings {
    smoke: bool,
    workers: Vec<usize>,
    run: Duration,
    rotate_every: Duration,
    window: Duration,
    scale_leases: usize,
    scale_run: Duration,
    outage: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ------------------------------------------------------------------ rotation latency

async fn rotation_latency(role: &str, n: usize) -> String {
    let pool = VaultPgPool::builder(role)
        .vault(common::approle_client("IMMUNE_SYSTEM"))
        .pg_config(common::pg_target())
        .build()
        .await
        .unwrap();
    let (mut issue, mut verify, mut warm, mut swap, mut total, mut outside) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        let t = Instant::now();
        pool.rotate().await.unwrap();
        outside.push(t.elapsed());
        let r = pool.status().lease.last_rotation.unwrap();
        issue.push(r.issue);
        verify.push(r.verify);
        warm.push(r.warm);
        swap.push(r.swap);
        // The goal compares issue + verify + swap with the floor; the pre-warm (none here:
        // an idle pool holds no connection) is reported on its own.
        total.push(r.total.saturating_sub(r.warm));
    }
    pool.close().await;

    // The floor: one database/creds call plus one connection, nothing else.
    let client = common::approle_client("IMMUNE_SYSTEM");
    let (mut f_issue, mut f_connect, mut f_total) = (vec![], vec![], vec![]);
    for _ in 0..n {
        let t = Instant::now();
        let creds = client.database_creds("database", role).await.unwrap();
        let issued = t.elapsed();
        let mut cfg = common::pg_target();
        cfg.user(&creds.value.username)
            .password(creds.value.password.expose_secret());
        let t2 = Instant::now();
        let (pg, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
        let task = tokio::spawn(conn);
        pg.simple_query("SELECT 1").await.unwrap();
        f_connect.push(t2.elapsed());
        f_issue.push(issued);
        f_total.push(t.elapsed());
        drop(pg);
        task.abort();
        client.revoke_lease(&creds.lease.id).await.unwrap();
    }
    let (t, f) = (median(total), median(f_total.clone()));
    let mut out = String::new();
    writeln!(out, "### Rotation latency (median of {n})\n").unwrap();
    writeln!(
        out,
        "| phase | vaultpool rotation | floor (creds + connect) |"
    )
    .unwrap();
    writeln!(out, "|---|---|---|").unwrap();
    writeln!(
        out,
        "| Vault issue (`database/creds`) | {:.2} ms | {:.2} ms |",
        ms(median(issue)),
        ms(median(f_issue))
    )
    .unwrap();
    writeln!(
        out,
        "| connect + verify | {:.2} ms | {:.2} ms |",
        ms(median(verify)),
        ms(median(f_connect))
    )
    .unwrap();
    writeln!(out, "| swap + notify | {:.3} ms | — |", ms(median(swap))).unwrap();
    writeln!(
        out,
        "| pre-warm (not in the total; an idle pool warms nothing, see the load runs) | {:.3} ms | — |",
        ms(median(warm))
    )
    .unwrap();
    writeln!(
        out,
        "| **issue + verify + swap** | **{:.2} ms** | **{:.2} ms** |",
        ms(t),
        ms(f)
    )
    .unwrap();
    writeln!(
        out,
        "| `rotate().await` seen by the caller | {:.2} ms | |",
        ms(median(outside))
    )
    .unwrap();
    writeln!(
        out,
        "\nratio total / floor: **{:.2}** (goal ≤ 1.5)",
        t.as_secs_f64() / f.as_secs_f64()
    )
    .unwrap();
    out
}

// ------------------------------------------------------------------ rotation under load

#[derive(Clone, Copy)]
struct Sample {
    at_ms: u32,
    latency_us: u32,
    ok: bool,
}

/// What the workers query through: vaultpool, or the naive rebuild.
#[derive(Clone)]
enum Subject {
    Vaultpool(VaultPgPool),
    /// The sqlx flavour (no pre-warm: sqlx takes no connection opened outside its pool).
    Sqlx(vaultpool::sqlx::VaultSqlxPool),
    Naive(Arc<ArcSwap<deadpool_postgres::Pool>>),
}

impl Subject {
    async fn query(&self) -> Result<(), String> {
        match self {
            Subject::Vaultpool(p) => {
                let c = p.get().await.map_err(|e| e.to_string())?;
                c.query_one("SELECT count(*) FROM items", &[])
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Subject::Sqlx(p) => {
                let mut c = p.acquire().await.map_err(|e| e.to_string())?;
                let _: i64 = vaultpool::sqlx::sqlx::query_scalar("SELECT count(*) FROM items")
                    .fetch_one(&mut *c)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Subject::Naive(p) => {
                let pool = p.load_full();
                let c = pool.get().await.map_err(|e| e.to_string())?;
                c.query_one("SELECT count(*) FROM items", &[])
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

fn naive_pool(
    creds: &vaultpool::Leased<vaultpool::Credentials>,
    size: usize,
) -> deadpool_postgres::Pool {
    let mut cfg = common::pg_target();
    cfg.user(&creds.value.username)
        .password(creds.value.password.expose_secret());
    let mgr = deadpool_postgres::Manager::new(cfg, tokio_postgres::NoTls);
    deadpool_postgres::Pool::builder(mgr)
        .max_size(size)
        .build()
        .unwrap()
}

struct Run {
    approach: &'static str,
    workers: usize,
    samples: Vec<Sample>,
    rotations_ms: Vec<u32>,
    errors: Vec<String>,
    /// vaultpool's rotations under this load, by phase.
    timings: Vec<vaultpool::lease::RotationTiming>,
}

async fn load_run(approach: &'static str, role: &str, workers: usize, s: &Settings) -> Run {
    let size = workers.min(32);
    let client = common::approle_client("IMMUNE_SYSTEM");
    let (subject, naive_lease) = if approach == "vaultpool-sqlx" {
        use vaultpool::sqlx::sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
        let pool = vaultpool::sqlx::VaultSqlxPool::builder(role)
            .vault(client.clone())
            .connect_options(
                PgConnectOptions::new_without_pgpass()
                    .host(&common::var("PGHOST"))
                    .port(common::var("PGPORT").parse().unwrap())
                    .database("adaptive_immunity")
                    .ssl_mode(PgSslMode::Disable),
            )
            .pool_options(PgPoolOptions::new().max_connections(size as u32))
            .build()
            .await
            .unwrap();
        (Subject::Sqlx(pool), None)
    } else if approach.starts_with("vaultpool") {
        let pool = VaultPgPool::builder(role)
            .vault(client.clone())
            .pg_config(common::pg_target())
            .max_size(size)
            .prewarm(approach == "vaultpool")
            .build()
            .await
            .unwrap();
        (Subject::Vaultpool(pool), None)
    } else {
        let creds = client.database_creds("database", role).await.unwrap();
        let pool = naive_pool(&creds, size);
        (
            Subject::Naive(Arc::new(ArcSwap::from_pointee(pool))),
            Some(creds.lease),
        )
    };
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (subject, stop) = (subject.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = subject.query().await;
                let at_ms = start.elapsed().as_millis() as u32;
                if let Err(e) = &r
                    && errors.len() < 3
                {
                    errors.push(e.clone());
                }
                samples.push(Sample {
                    at_ms,
                    latency_us: t.elapsed().as_micros() as u32,
                    ok: r.is_ok(),
                });
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (samples, errors)
        }));
    }
    let mut rotations_ms = Vec::new();
    let mut timings = Vec::new();
    let mut lease = naive_lease;
    let mut next = start + s.rotate_every;
    while start.elapsed() < s.run {
        tokio::time::sleep_until(next.into()).await;
        next += s.rotate_every;
        if start.elapsed() >= s.run {
            break;
        }
        rotations_ms.push(start.elapsed().as_millis() as u32);
        match &subject {
            Subject::Vaultpool(p) => {
                p.rotate().await.unwrap();
                timings.extend(p.status().lease.last_rotation);
            }
            Subject::Sqlx(p) => {
                p.rotate().await.unwrap();
                timings.extend(p.status().lease.last_rotation);
            }
            Subject::Naive(p) => {
                // What services do today: new credentials, a new pool, swap it in, drop the
                // old pool and revoke the old lease.
                let creds = client.database_creds("database", role).await.unwrap();
                p.store(Arc::new(naive_pool(&creds, size)));
                if let Some(old) = lease.replace(creds.lease) {
                    client.revoke_lease(&old.id).await.unwrap();
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    for h in handles {
        let (s, e) = h.await.unwrap();
        samples.extend(s);
        errors.extend(e);
    }
    match subject {
        Subject::Vaultpool(p) => p.close().await,
        Subject::Sqlx(p) => p.close().await,
        Subject::Naive(p) => {
            p.load().close();
            if let Some(l) = lease {
                client.revoke_lease(&l.id).await.unwrap();
            }
        }
    }
    samples.sort_by_key(|s| s.at_ms);
    Run {
        approach,
        workers,
        samples,
        rotations_ms,
        errors,
        timings,
    }
}

/// Median phases of vaultpool's rotations in a run: "issue / verify / warm (conns) / swap".
fn phases(t: &[vaultpool::lease::RotationTiming]) -> String {
    if t.is_empty() {
        return "—".into();
    }
    let m = |f: fn(&vaultpool::lease::RotationTiming) -> Duration| {
        ms(median(t.iter().map(f).collect()))
    };
    let mut warmed: Vec<usize> = t.iter().map(|r| r.warmed).collect();
    warmed.sort_unstable();
    format!(
        "{:.1} / {:.1} / {:.1} ({}) / {:.2} ms",
        m(|r| r.issue),
        m(|r| r.verify),
        m(|r| r.warm),
        warmed[warmed.len() / 2],
        m(|r| r.swap)
    )
}

struct Window {
    start_ms: u32,
    p50: f64,
    p99: f64,
    max: f64,
    count: usize,
    errors: usize,
    rotation: bool,
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

fn windows(run: &Run, window: Duration) -> Vec<Window> {
    let w = window.as_millis() as u32;
    let end = run.samples.last().map_or(0, |s| s.at_ms);
    let mut out = Vec::new();
    let mut start = 0;
    while start <= end {
        let in_window: Vec<&Sample> = run
            .samples
            .iter()
            .filter(|s| s.at_ms >= start && s.at_ms < start + w)
            .collect();
        let mut lat: Vec<u32> = in_window
            .iter()
            .filter(|s| s.ok)
            .map(|s| s.latency_us)
            .collect();
        lat.sort_unstable();
        // A window is "during rotation" if a rotation started in it or in the second before.
        let rotation = run
            .rotations_ms
            .iter()
            .any(|r| *r < start + w && r + 1000 >= start);
        out.push(Window {
            start_ms: start,
            p50: pct(&lat, 0.5),
            p99: pct(&lat, 0.99),
            max: pct(&lat, 1.0),
            count: in_window.len(),
            errors: in_window.iter().filter(|s| !s.ok).count(),
            rotation,
        });
        start += w;
    }
    out
}

struct Summary {
    steady_p99: f64,
    rotation_p99: f64,
    max: f64,
    errors: usize,
    queries: usize,
}

fn summarize(run: &Run) -> Summary {
    let is_rot = |at: u32| run.rotations_ms.iter().any(|r| at >= *r && at < r + 1000);
    let mut steady: Vec<u32> = vec![];
    let mut rot: Vec<u32> = vec![];
    for s in run.samples.iter().filter(|s| s.ok) {
        if is_rot(s.at_ms) {
            rot.push(s.latency_us)
        } else {
            steady.push(s.latency_us)
        }
    }
    steady.sort_unstable();
    rot.sort_unstable();
    let mut all: Vec<u32> = run
        .samples
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.latency_us)
        .collect();
    all.sort_unstable();
    Summary {
        steady_p99: pct(&steady, 0.99),
        rotation_p99: pct(&rot, 0.99),
        max: pct(&all, 1.0),
        errors: run.samples.iter().filter(|s| !s.ok).count(),
        queries: run.samples.len(),
    }
}

/// A small hand-written SVG: p99 per window over time, one panel per worker count,
/// vaultpool and the naive rebuild, rotation moments marked. (No font stack needed.)
fn svg(runs: &[Run], window: Duration) -> String {
    let counts: Vec<usize> = {
        let mut c: Vec<usize> = runs.iter().map(|r| r.workers).collect();
        c.dedup();
        c
    };
    let (w, ph, left, top) = (900.0, 220.0, 70.0, 40.0);
    let h = top + ph * counts.len() as f64 + 40.0;
    let mut out = String::new();
    writeln!(out, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#).unwrap();
    writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#).unwrap();
    writeln!(out, r#"<text x="{left}" y="22" font-size="14" font-weight="bold">p99 query latency per {} ms window: vaultpool vs rebuilding the pool (dashed: rotations, red: failed queries)</text>"#, window.as_millis()).unwrap();
    for (i, n) in counts.iter().enumerate() {
        let y0 = top + ph * i as f64 + 10.0;
        let (pw, pph) = (w - left - 20.0, ph - 50.0);
        let panel: Vec<&Run> = runs.iter().filter(|r| r.workers == *n).collect();
        let wins: Vec<(&str, Vec<Window>)> = panel
            .iter()
            .map(|r| (r.approach, windows(r, window)))
            .collect();
        let max_t = wins
            .iter()
            .flat_map(|(_, w)| w.iter().map(|x| x.start_ms))
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let max_y = wins
            .iter()
            .flat_map(|(_, w)| w.iter().map(|x| x.p99))
            .fold(1.0f64, f64::max)
            * 1.1;
        let x = |t: f64| left + t / max_t * pw;
        let y = |v: f64| y0 + pph - v / max_y * pph;
        writeln!(
            out,
            r##"<rect x="{left}" y="{y0}" width="{pw}" height="{pph}" fill="none" stroke="#999"/>"##
        )
        .unwrap();
        writeln!(
            out,
            r#"<text x="{}" y="{}" font-weight="bold">{n} workers</text>"#,
            left + 5.0,
            y0 + 14.0
        )
        .unwrap();
        for k in 0..=4 {
            let v = max_y * k as f64 / 4.0;
            writeln!(
                out,
                r##"<text x="{}" y="{}" text-anchor="end" fill="#555">{v:.1} ms</text>"##,
                left - 5.0,
                y(v) + 4.0
            )
            .unwrap();
        }
        writeln!(
            out,
            r##"<text x="{}" y="{}" text-anchor="end" fill="#555">{:.0} s</text>"##,
            left + pw,
            y0 + pph + 15.0,
            max_t / 1000.0
        )
        .unwrap();
        if let Some(r) = panel.first() {
            for rot in &r.rotations_ms {
                let rx = x(*rot as f64);
                writeln!(out, r##"<line x1="{rx}" y1="{y0}" x2="{rx}" y2="{}" stroke="#bbb" stroke-dasharray="4 3"/>"##, y0 + pph).unwrap();
            }
        }
        for (approach, ws) in &wins {
            let colour = match *approach {
                "vaultpool" => "#1565c0",
                "vaultpool-cold" => "#6a1b9a",
                "vaultpool-sqlx" => "#2e7d32",
                _ => "#e65100",
            };
            let pts: Vec<String> = ws
                .iter()
                .map(|wi| format!("{:.1},{:.1}", x(wi.start_ms as f64), y(wi.p99)))
                .collect();
            writeln!(
                out,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{}"/>"#,
                pts.join(" ")
            )
            .unwrap();
            for wi in ws.iter().filter(|wi| wi.errors > 0) {
                writeln!(out, r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="red"><title>{} errors</title></circle>"#, x(wi.start_ms as f64), y0 + pph - 6.0, wi.errors).unwrap();
            }
        }
        let (lx, ly) = (left + pw - 330.0, y0 + 14.0);
        writeln!(out, r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#1565c0" stroke-width="2"/><text x="{}" y="{}">vaultpool</text>"##, lx, ly - 4.0, lx + 25.0, ly - 4.0, lx + 30.0, ly).unwrap();
        writeln!(out, r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#e65100" stroke-width="2"/><text x="{}" y="{}">naive rebuild</text>"##, lx + 110.0, ly - 4.0, lx + 135.0, ly - 4.0, lx + 140.0, ly).unwrap();
        writeln!(out, r#"<circle cx="{}" cy="{}" r="4" fill="red"/><text x="{}" y="{}">failed queries</text>"#, lx + 240.0, ly - 4.0, lx + 248.0, ly).unwrap();
        writeln!(out, r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#6a1b9a" stroke-width="2"/><text x="{}" y="{}">vaultpool, no pre-warm</text><line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#2e7d32" stroke-width="2"/><text x="{}" y="{}">vaultpool (sqlx)</text>"##, lx, ly + 12.0, lx + 25.0, ly + 12.0, lx + 30.0, ly + 16.0, lx + 180.0, ly + 12.0, lx + 205.0, ly + 12.0, lx + 210.0, ly + 16.0).unwrap();
    }
    writeln!(out, "</svg>").unwrap();
    out
}

// ------------------------------------------------------------------ scale

/// The system allocator, counting the bytes allocated and not yet freed — what the scale
/// run divides by its leases. (RSS cannot tell: the allocator keeps freed pages and reuses
/// them, so an RSS delta can be 0 or far too high.)
struct Counting;

static LIVE_BYTES: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

// SAFETY: every call is passed through to `System` unchanged; only a counter is added.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new as isize - layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_bytes() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn scale(s: &Settings) -> (String, String) {
    let mut vault = common::PersistentVault::start("scale", "30s", "1h").await;
    let client = Client::builder()
        .address(&vault.addr)
        .token(&vault.root_token)
        .build()
        .unwrap();
    // Warm the client's connection pool and the runtime first, so their one-off
    // allocations are not counted per lease.
    Engine::builder(client.clone(), DatabaseRole::new("scale"))
        .build()
        .await
        .unwrap()
        .close()
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib();
    let bytes_before = live_bytes();
    let mut engines = Vec::new();
    let t = Instant::now();
    for _ in 0..s.scale_leases {
        engines.push(
            Engine::builder(client.clone(), DatabaseRole::new("scale"))
                .build()
                .await
                .unwrap(),
        );
    }
    let build_took = t.elapsed();
    // Let the first renewals' buffers come and go (responses read, connections back in
    // the client's pool) before counting what the engines hold.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let per_lease_bytes = (live_bytes() - bytes_before) as f64 / s.scale_leases as f64;
    let per_lease_rss = (rss_kib().saturating_sub(before)) as f64 / s.scale_leases as f64;
    // Vault requests = renewals + rotations + revocations, sampled each second.
    let total = |engines: &[Engine]| -> u64 {
        engines
            .iter()
            .map(|e| {
                let s = e.status();
                s.renewals + s.rotations + s.revocations + s.failures
            })
            .sum()
    };
    let mut csv = String::from("phase,second,vault_requests\n");
    let mut sample = |phase: &str, secs: u64, engines: &[Engine], last: &mut u64| -> u64 {
        let now = total(engines);
        let d = now - *last;
        *last = now;
        writeln!(csv, "{phase},{secs},{d}").unwrap();
        d
    };
    let mut last = total(&engines);
    let mut steady = Vec::new();
    for sec in 0..s.scale_run.as_secs() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        steady.push(sample("steady", sec, &engines, &mut last));
    }
    vault.kill();
    let mut outage = Vec::new();
    for sec in 0..s.outage.as_secs() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        outage.push(sample("outage", sec, &engines, &mut last));
    }
    vault.restart().await;
    let mut after = Vec::new();
    for sec in 0..15 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        after.push(sample("after_outage", sec, &engines, &mut last));
    }
    let serving = engines.iter().filter(|e| e.usable().is_ok()).count();
    // Why one that is not serving is not (for the report).
    let not_serving_why = engines
        .iter()
        .find(|e| e.usable().is_err())
        .and_then(|e| e.status().last_error)
        .map(|e| e.chars().take(300).collect::<String>());
    for e in &engines {
        e.close().await;
    }
    // Leases that ended while this Vault was down and were never revoked leave their
    // users in the shared PostgreSQL (1,000 per run: enough to break later leases there,
    // "row is too big" on the tables' ACLs). Revoke the whole prefix before this Vault goes.
    common::vault_write(
        &vault.addr,
        &vault.root_token,
        reqwest::Method::PUT,
        "sys/leases/revoke-prefix/database/creds/scale?sync=true",
        serde_json::json!({}),
    )
    .await;
    let stats = |v: &[u64]| {
        let mean = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
        let peak = *v.iter().max().unwrap_or(&0) as f64;
        (mean, peak)
    };
    let (sm, sp) = stats(&steady);
    let (am, ap) = stats(&after);
    let mut out = String::new();
    writeln!(
        out,
        "### Scale: {} leases (engines) in one process, one OpenBao, 30 s TTL\n",
        s.scale_leases
    )
    .unwrap();
    writeln!(out, "| measure | value |").unwrap();
    writeln!(out, "|---|---|").unwrap();
    writeln!(
        out,
        "| issuing all leases | {:.1} s |",
        build_took.as_secs_f64()
    )
    .unwrap();
    writeln!(
        out,
        "| memory per lease (heap bytes allocated and not freed, / leases) | {:.1} KiB (goal ≤ 10); RSS delta / leases {per_lease_rss:.1} KiB (the allocator's reuse hides or inflates it) |",
        per_lease_bytes / 1024.0
    )
    .unwrap();
    writeln!(out, "| Vault requests/s, steady ({} s) | mean {sm:.1}, peak {sp:.0}, peak/mean **{:.2}** (goal ≤ 1.5) |", steady.len(), sp / sm.max(0.001)).unwrap();
    writeln!(out, "| Vault down for {} s, then back: requests/s over the next 15 s | mean {am:.1}, peak {ap:.0}; the first 5 s: {:?} |", s.outage.as_secs(), &after[..5.min(after.len())]).unwrap();
    writeln!(
        out,
        "| engines serving 15 s after Vault returned | {serving} / {}{} |",
        s.scale_leases,
        not_serving_why
            .map(|w| format!(" (one not serving: {w})"))
            .unwrap_or_default()
    )
    .unwrap();
    (out, csv)
}

// ------------------------------------------------------------------ main

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    // `--only=scale` or `--only=load`: one part (a rerun of one figure).
    let only = std::env::args().find_map(|a| a.strip_prefix("--only=").map(str::to_owned));
    if let Some(o) = only.as_deref().filter(|o| !["scale", "load"].contains(o)) {
        eprintln!("--only={o}: use --only=scale or --only=load");
        std::process::exit(2);
    }
    let part = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let s = if smoke {
        Settings {
            smoke,
            workers: vec![8],
            run: Duration::from_secs(6),
            rotate_every: Duration::from_secs(2),
            window: Duration::from_millis(500),
            scale_leases: 20,
            scale_run: Duration::from_secs(3),
            outage: Duration::from_secs(3),
        }
    } else {
        Settings {
            smoke,
            workers: vec![8, 32, 128],
            run: Duration::from_secs(30),
            rotate_every: Duration::from_secs(5),
            window: Duration::from_millis(500),
            scale_leases: 1000,
            scale_run: Duration::from_secs(60),
            outage: Duration::from_secs(30),
        }
    };
    let role = common::create_role("1h", "2h").await;
    let mut report = String::new();
    if part("load") {
        writeln!(
            report,
            "{}",
            rotation_latency(&role, if s.smoke { 5 } else { 20 }).await
        )
        .unwrap();
    }

    let mut runs = Vec::new();
    for &n in s.workers.iter().filter(|_| part("load")) {
        // vaultpool with pre-warm (the default), without ("cold"), and the naive rebuild.
        for approach in ["vaultpool", "vaultpool-cold", "vaultpool-sqlx", "naive"] {
            eprintln!("load: {approach}, {n} workers, {:?}", s.run);
            runs.push(load_run(approach, &role, n, &s).await);
        }
    }
    if part("load") {
        writeln!(report, "### Rotation under load ({:?} per run, a rotation every {:?}; \"during rotation\" = the second after one starts)\n", s.run, s.rotate_every).unwrap();
        writeln!(
            report,
            "| workers | approach | queries | failed | p99 steady | p99 during rotation | ratio | max | rotation: issue / verify / warm (conns) / swap, median |"
        )
        .unwrap();
        writeln!(report, "|---|---|---|---|---|---|---|---|---|").unwrap();
    }
    let mut csv = String::from(
        "approach,workers,window_start_s,p50_ms,p99_ms,max_ms,queries,errors,rotation\n",
    );
    for run in &runs {
        let sm = summarize(run);
        writeln!(
            report,
            "| {} | {} | {} | {} | {:.2} ms | {:.2} ms | {:.2} | {:.1} ms | {} |",
            run.workers,
            run.approach,
            sm.queries,
            sm.errors,
            sm.steady_p99,
            sm.rotation_p99,
            sm.rotation_p99 / sm.steady_p99.max(0.001),
            sm.max,
            phases(&run.timings)
        )
        .unwrap();
        for w in windows(run, s.window) {
            writeln!(
                csv,
                "{},{},{:.1},{:.3},{:.3},{:.3},{},{},{}",
                run.approach,
                run.workers,
                w.start_ms as f64 / 1000.0,
                w.p50,
                w.p99,
                w.max,
                w.count,
                w.errors,
                w.rotation as u8
            )
            .unwrap();
        }
        if !run.errors.is_empty() {
            writeln!(
                report,
                "|  | first errors ({}) | {:?} | | | | | | |",
                run.approach,
                &run.errors[..run.errors.len().min(2)]
            )
            .unwrap();
        }
    }
    std::fs::create_dir_all("bench-results").unwrap();
    let suffix = if s.smoke { "-smoke" } else { "" };
    let mut wrote = Vec::new();
    if part("load") {
        std::fs::write(format!("bench-results/load{suffix}.csv"), csv).unwrap();
        std::fs::write(
            format!("bench-results/load{suffix}.svg"),
            svg(&runs, s.window),
        )
        .unwrap();
        wrote.extend([format!("load{suffix}.csv"), format!("load{suffix}.svg")]);
    }
    if part("scale") {
        let (scale_report, scale_csv) = scale(&s).await;
        writeln!(report, "\n{scale_report}").unwrap();
        std::fs::write(format!("bench-results/scale{suffix}.csv"), scale_csv).unwrap();
        wrote.push(format!("scale{suffix}.csv"));
    }
    let report_name = match &only {
        Some(o) => format!("report-{o}{suffix}.md"),
        None => format!("report{suffix}.md"),
    };
    std::fs::write(format!("bench-results/{report_name}"), &report).unwrap();
    wrote.push(report_name);
    println!("{report}");
    println!("wrote bench-results/{}", wrote.join(", bench-results/"));
    // The smoke run asserts what must hold whatever the machine: vaultpool lost nothing.
    let lost: usize = runs
        .iter()
        .filter(|r| r.approach.starts_with("vaultpool"))
        .map(|r| summarize(r).errors)
        .sum();
    if lost > 0 {
        eprintln!("vaultpool lost {lost} queries");
        std::process::exit(1);
    }
}
