//! Servers for faults no real server shows: a TCP proxy that delays or hangs, and a tiny
//! server answering fixed bytes (malformed JSON) or nothing.

use super::*;

/// A TCP proxy in front of a real server, for faults the server cannot show by itself:
/// latency (`delay_ms` before each client→server chunk; a huge value hangs) and a log of
/// when each request whose first line contains `marker` went through.
pub struct Proxy {
    pub addr: String,
    pub delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Connections accepted (requests tried), whether or not the server was up.
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// While set, new connections are closed at once (the server "cannot be reached").
    pub blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
    hits: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
}

impl Proxy {
    pub async fn start(upstream: &str, marker: &'static str) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let hits = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let blocked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (delay, log, count, block) = (
            delay_ms.clone(),
            hits.clone(),
            accepted.clone(),
            blocked.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::Relaxed);
                if block.load(Ordering::Relaxed) {
                    continue; // dropped: the client sees the connection closed
                }
                let (upstream, delay, log) = (upstream.clone(), delay.clone(), log.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return; // server down: the client sees the connection close
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let wait = delay.load(Ordering::Relaxed);
                            if wait > 0 {
                                tokio::time::sleep(Duration::from_millis(wait)).await;
                            }
                            let chunk = &buf[..n];
                            let text = String::from_utf8_lossy(&chunk[..n.min(256)]);
                            if text.lines().next().is_some_and(|l| l.contains(marker)) {
                                log.lock().unwrap().push(Instant::now());
                            }
                            if sw.write_all(chunk).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Self {
            addr,
            delay_ms,
            accepted,
            blocked,
            hits,
        }
    }

    /// When each marked request went through, in order.
    pub fn hits(&self) -> Vec<Instant> {
        self.hits.lock().unwrap().clone()
    }
}

/// A local TCP server that answers every connection with `response` bytes (or, if
/// `None`, accepts and never answers). For faults a real Vault cannot show.
pub async fn tiny_server(response: Option<&'static [u8]>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = sock.read(&mut buf).await;
                match response {
                    Some(bytes) => {
                        let _ = sock.write_all(bytes).await;
                        let _ = sock.shutdown().await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(3600)).await,
                }
            });
        }
    });
    addr
}

/// Counts the lines a `tracing` subscriber writes, keeping the first few to print.
#[derive(Clone, Default)]
pub struct LineCounter {
    pub lines: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub sample: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl std::io::Write for LineCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.iter().filter(|b| **b == b'\n').count() as u64;
        self.lines
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        let mut sample = self.sample.lock().unwrap();
        if sample.len() < 5 {
            sample.push(String::from_utf8_lossy(buf).trim_end().to_owned());
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LineCounter {
    /// A subscriber writing vaultpool's warnings and errors into this counter; make it
    /// the thread's default (`tracing::subscriber::set_default`) in a current-thread test.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + use<> {
        let me = self.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("vaultpool=warn"))
            .with_ansi(false)
            .with_writer(move || me.clone())
            .finish()
    }

    pub fn count(&self) -> u64 {
        self.lines.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// CPU time (user + system) this process has used, from /proc/self/stat.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ")".
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}
