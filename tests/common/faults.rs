//! Servers for faults no real server shows: a TCP proxy that delays or hangs, and a tiny
//! server answering fixed bytes (malformed JSON) or nothing.

use super::*;

/// A TCP proxy in front of a real server, for faults the server cannot show by itself:
/// latency (`delay_ms` before each client→server chunk; a huge value hangs) and a log of
/// when each request whose first line contains `marker` went through.
pub struct Proxy {
    pub addr: String,
    pub delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
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
        let (delay, log) = (delay_ms.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
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
