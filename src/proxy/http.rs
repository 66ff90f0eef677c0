//! The HTTP listener: `GET /health` (200 when every database has usable credentials,
//! else 503) and `GET /metrics` (Prometheus text), for probes and scrapers.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::ProxyState;
use super::listen::Peer;
use super::route::Route;

/// How many requests are served at a time; beyond that, a connection is closed at once
/// (the accept loop never waits on a slow client).
const SLOTS: usize = 16;

/// What the accept loop does with each HTTP connection.
pub(crate) fn on_connection(
    shared: Arc<ProxyState>,
) -> impl FnMut(TcpStream, Peer) + Send + 'static {
    let slots = Arc::new(Semaphore::new(SLOTS));
    move |s, _| {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            return; // dropped: closed
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            serve(shared, s).await;
            drop(slot);
        });
    }
}

/// One HTTP request on the health/metrics listener: `GET /health` or `GET /metrics`.
async fn serve(shared: Arc<ProxyState>, mut s: tokio::net::TcpStream) {
    let mut buf = Vec::with_capacity(1024);
    let read = tokio::time::timeout(Duration::from_secs(1), async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    let line =
        String::from_utf8_lossy(buf.split(|&b| b == b'\n').next().unwrap_or_default()).into_owned();
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        "/health" => health(&shared),
        "/metrics" => ("200 OK", metrics(&shared)),
        _ => (
            "404 Not Found",
            "not found: GET /health or /metrics\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), s.write_all(response.as_bytes())).await;
}

/// 200 when every database has usable credentials, else 503; one line per database.
fn health(shared: &ProxyState) -> (&'static str, String) {
    let mut ok = true;
    let mut body = String::new();
    for r in &shared.routes {
        match r.engine.usable() {
            Ok(c) => {
                let _ = writeln!(body, "{}: serving, generation {}", r.name, c.generation.0);
            }
            Err(e) => {
                ok = false;
                let _ = writeln!(body, "{}: unavailable: {e}", r.name);
            }
        }
    }
    (
        if ok {
            "200 OK"
        } else {
            "503 Service Unavailable"
        },
        body,
    )
}

/// One metric family: its name after `vaultpool_proxy_` (a counter if it ends in
/// `_total`, else a gauge), its help, and its value for a route.
type Family = (&'static str, &'static str, fn(&Route) -> f64);

fn load(counter: &AtomicU64) -> f64 {
    counter.load(Ordering::Relaxed) as f64
}

/// What `/metrics` shows, one line per database each.
const FAMILIES: [Family; 13] = [
    ("sessions_active", "Client sessions open.", |r| {
        load(&r.stats.sessions_active)
    }),
    ("sessions_total", "Client sessions started.", |r| {
        load(&r.stats.sessions_total)
    }),
    (
        "server_idle",
        "Idle server connections kept for reuse.",
        |r| r.idle_count() as f64,
    ),
    ("server_logins_total", "Server logins.", |r| {
        load(&r.stats.server_logins)
    }),
    (
        "server_login_failures_total",
        "Server logins that failed.",
        |r| load(&r.stats.server_login_failures),
    ),
    (
        "server_reused_total",
        "Sessions served by a reused server connection.",
        |r| load(&r.stats.server_reused),
    ),
    (
        "wait_seconds_total",
        "Time sessions waited for a free connection.",
        |r| load(&r.stats.wait_ns) / 1e9,
    ),
    ("waits_total", "Sessions that had to wait.", |r| {
        load(&r.stats.waits)
    }),
    (
        "wait_timeouts_total",
        "Sessions refused after waiting.",
        |r| load(&r.stats.wait_timeouts),
    ),
    (
        "handovers_total",
        "Sessions moved to the serving generation between transactions.",
        |r| load(&r.stats.handovers),
    ),
    (
        "handovers_refused_total",
        "Sessions left on a retired generation (state that cannot move).",
        |r| load(&r.stats.handovers_refused),
    ),
    ("generation", "The credentials generation serving.", |r| {
        r.engine.generation().0 as f64
    }),
    ("rotations_total", "Rotations.", |r| {
        r.engine.status().rotations as f64
    }),
];

/// Prometheus text format.
fn metrics(shared: &ProxyState) -> String {
    let mut out = String::new();
    for (name, help, value) in FAMILIES {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(
            out,
            "# HELP vaultpool_proxy_{name} {help}\n# TYPE vaultpool_proxy_{name} {kind}"
        );
        for r in &shared.routes {
            let database = r.name.replace(['"', '\\', '\n'], "_");
            let _ = writeln!(
                out,
                "vaultpool_proxy_{name}{{database=\"{database}\"}} {}",
                value(r)
            );
        }
    }
    out
}
