//! The main demo: a steady query load on a `VaultPgPool` whose short-lived credentials
//! are renewed, rotated by schedule and rotated by force — with a live status line and a
//! one-screen summary. Every number is measured; no password is ever shown.
//!
//! `scripts/demo.sh` runs it against the local stack. Settings (env):
//! DEMO_SECONDS (45), DEMO_WORKERS (16), DEMO_ROLE (demo-rotating: lease 12 s, max 20 s),
//! DEMO_FORCE_EVERY (20 s; 0 = never).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vaultpool::postgres::VaultPgPool;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
}

const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const GREEN: &str = "\x1b[32m";
const CYAN: &str = "\x1b[36m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[31m";
const RESET: &str = "\x1b[0m";

struct Screen {
    tty: bool,
    started: Instant,
}

impl Screen {
    fn paint(&self, s: &str) -> String {
        if self.tty {
            s.to_string()
        } else {
            // Strip colours for logs.
            let mut out = String::new();
            let mut skip = false;
            for c in s.chars() {
                match (skip, c) {
                    (_, '\x1b') => skip = true,
                    (true, 'm') => skip = false,
                    (true, _) => {}
                    (false, c) => out.push(c),
                }
            }
            out
        }
    }

    /// A line above the live status line.
    fn event(&self, icon: &str, text: &str) {
        let line = format!(
            "{DIM}{:>6.1}s{RESET}  {icon}  {text}",
            self.started.elapsed().as_secs_f64()
        );
        if self.tty {
            print!("\r\x1b[2K{}\n", self.paint(&line));
        } else {
            println!("{}", self.paint(&line));
        }
        let _ = std::io::stdout().flush();
    }

    fn live(&self, text: &str) {
        if self.tty {
            print!("\r\x1b[2K{}", self.paint(text));
            let _ = std::io::stdout().flush();
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seconds: u64 = env_or("DEMO_SECONDS", 45);
    let workers: usize = env_or("DEMO_WORKERS", 16);
    let force_every: u64 = env_or("DEMO_FORCE_EVERY", 20);
    let role: String = env_or("DEMO_ROLE", "demo-rotating".to_string());
    let screen = Screen {
        tty: std::io::stdout().is_terminal(),
        started: Instant::now(),
    };

    let pool = VaultPgPool::builder(&role)
        .max_size(workers)
        .build()
        .await?;
    let first = pool.status().lease;
    println!(
        "{}",
        screen.paint(&format!(
            "{BOLD}vaultpool rotation demo{RESET} — role {CYAN}{role}{RESET}, {workers} workers, \
             {seconds} s, forced rotation every {}",
            if force_every == 0 {
                "never".into()
            } else {
                format!("{force_every} s")
            }
        ))
    );
    screen.event(
        &screen.paint(&format!("{GREEN}●{RESET}")),
        &format!(
            "gen {} serving: user {} · lease {:.0?} · renewable {}",
            first.generation.0,
            pool.engine().current().credentials.username,
            first.ttl_remaining.unwrap_or_default(),
            first.renewable
        ),
    );

    let counters = Arc::new(Counters {
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (pool, counters, stop) = (pool.clone(), counters.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(100_000);
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let result = async {
                    let client = pool.get().await?;
                    client
                        .query_one("SELECT count(*) FROM items", &[])
                        .await
                        .map_err(vaultpool::Error::query)
                }
                .await;
                match result {
                    Ok(_) => {
                        latencies.push(t.elapsed().as_micros() as u32);
                        counters.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        if errors.len() < 3 {
                            errors.push(e.to_string());
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (latencies, errors)
        }));
    }

    let mut generations = pool.engine().subscribe();
    let mut forced = 0u64;
    let mut forced_latency = Vec::new();
    let mut seen_revocations = 0;
    let mut seen_renewals = 0;
    let mut next_force = Instant::now() + Duration::from_secs(force_every.max(1));
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let (mut last_ok, mut last_t) = (0u64, Instant::now());
    let mut rate = 0.0;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut pending_force = None;
    while Instant::now() < deadline {
        tokio::select! {
            _ = tick.tick() => {}
            changed = generations.changed() => {
                if changed.is_err() { break; }
                let g = *generations.borrow_and_update();
                let status = pool.status().lease;
                let how = match pending_force.take() {
                    Some(took) => format!("forced, new credentials serving in {took:.0?}"),
                    None => "scheduled: the lease hit its max TTL".into(),
                };
                screen.event(
                    &screen.paint(&format!("{YELLOW}↻{RESET}")),
                    &format!(
                        "gen {} serving ({how}) · user {} · lease {:.0?}",
                        g.0,
                        pool.engine().current().credentials.username,
                        status.ttl_remaining.unwrap_or_default()
                    ),
                );
            }
        }
        let status = pool.status();
        let lease = &status.lease;
        if lease.revocations > seen_revocations {
            for _ in seen_revocations..lease.revocations {
                screen.event(
                    &screen.paint(&format!("{GREEN}✓{RESET}")),
                    "previous generation drained; its lease revoked, its database user dropped",
                );
            }
            seen_revocations = lease.revocations;
        }
        if lease.renewals > seen_renewals {
            screen.event(
                &screen.paint(&format!("{CYAN}⟳{RESET}")),
                &format!(
                    "gen {} lease renewed: {:.0?} left",
                    lease.generation.0,
                    lease.ttl_remaining.unwrap_or_default()
                ),
            );
            seen_renewals = lease.renewals;
        }
        if force_every > 0 && Instant::now() >= next_force {
            let t = Instant::now();
            pool.rotate().await?;
            pending_force = Some(t.elapsed());
            forced_latency.push(t.elapsed());
            forced += 1;
            next_force = Instant::now() + Duration::from_secs(force_every);
        }
        let ok = counters.ok.load(Ordering::Relaxed);
        let dt = last_t.elapsed().as_secs_f64();
        if dt >= 1.0 {
            rate = (ok - last_ok) as f64 / dt;
            last_ok = ok;
            last_t = Instant::now();
        }
        let failed = counters.failed.load(Ordering::Relaxed);
        let conns: Vec<String> = lease
            .generations
            .iter()
            .map(|g| {
                if g.retiring {
                    format!("{DIM}g{}:{}↓{RESET}", g.generation.0, g.connections)
                } else {
                    format!("g{}:{}", g.generation.0, g.connections)
                }
            })
            .collect();
        let fail_colour = if failed == 0 { GREEN } else { RED };
        screen.live(&format!(
            "{DIM}{:>6.1}s{RESET} │ {BOLD}gen {}{RESET} │ lease {:>5.1}s left │ conns {} │ \
             {:>6.0} q/s │ ok {:>8} │ {fail_colour}failed {failed}{RESET} │ rotations {}",
            screen.started.elapsed().as_secs_f64(),
            lease.generation.0,
            lease.ttl_remaining.unwrap_or_default().as_secs_f64(),
            conns.join(" "),
            rate,
            ok,
            lease.rotations
        ));
    }

    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    for h in handles {
        let (l, e) = h.await?;
        latencies.extend(l);
        errors.extend(e);
    }
    let elapsed = screen.started.elapsed();
    let status = pool.status().lease;
    pool.close().await;
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p) as usize)
            .map_or(0.0, |us| *us as f64 / 1000.0)
    };
    let ok = counters.ok.load(Ordering::Relaxed);
    let failed = counters.failed.load(Ordering::Relaxed);
    forced_latency.sort();
    let lines = [
        format!(
            "ran {:.1} s with {workers} workers on role {role}",
            elapsed.as_secs_f64()
        ),
        format!(
            "queries      {ok} ok, {failed} failed ({:.0} q/s)",
            ok as f64 / elapsed.as_secs_f64()
        ),
        format!(
            "latency      p50 {:.2} ms · p99 {:.2} ms · max {:.2} ms",
            pct(0.5),
            pct(0.99),
            pct(1.0)
        ),
        format!(
            "rotations    {} ({forced} forced, {} scheduled) → generation {}",
            status.rotations,
            status.rotations - forced,
            status.generation.0
        ),
        format!(
            "forced       new credentials serving in {}",
            if forced_latency.is_empty() {
                "-".into()
            } else {
                format!(
                    "{:.0?} (median of {})",
                    forced_latency[forced_latency.len() / 2],
                    forced_latency.len()
                )
            }
        ),
        format!(
            "leases       {} renewals · {} revoked during the run · all revoked at close",
            status.renewals, status.revocations
        ),
        "secrets      no password was printed, logged or stored by this demo".to_string(),
    ];
    let width = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    if screen.tty {
        print!("\r\x1b[2K");
    }
    println!("\n┌{}┐", "─".repeat(width + 2));
    for l in &lines {
        println!("│ {l:<width$} │");
    }
    println!("└{}┘", "─".repeat(width + 2));
    if failed > 0 {
        println!("first errors: {errors:?}");
        std::process::exit(1);
    }
    Ok(())
}
