//! `vaultpool-proxy`: a PostgreSQL-protocol sidecar, so services in any language get
//! rotating Vault credentials without holding a database password (feature `proxy`).
//!
//! - Clients (psql, libpq, psycopg, asyncpg, JDBC, ...) connect to the proxy on loopback
//!   TCP or a Unix socket. On the socket, peers whose uid is allowed log in without a
//!   password (`SO_PEERCRED`); everyone else proves the proxy's local secret with
//!   SCRAM-SHA-256. No client ever sees a database password.
//! - Each configured database is a *route* (`upstream.rs`): a lease engine on its
//!   Vault role, and the server connections logged in with the lease's credentials.
//!   **Session pooling:** a client session owns one server connection from startup to
//!   the end; the connection is then reset (`DISCARD ALL`) and kept for the next session.
//!   Transaction pooling is not offered.
//! - **Rotation:** new sessions get the new generation at once; sessions already open go
//!   on untouched on the old one; the old lease is revoked when its last session ends
//!   (or at its lease's end). A session's connection of a retired generation is closed,
//!   not reused.
//! - Cancel requests reach the server backend of the session they name; the client knows
//!   only a key of the proxy's.
//!
//! Layout: `wire.rs` (the protocol as far as the proxy reads it), `scram.rs` (the server
//! side of SCRAM), `upstream.rs` (server logins and routes), `session.rs` (one client
//! session and the relay), `config.rs` (TOML and environment), this file (listeners,
//! cancel keys, `/health` and `/metrics`, shutdown).

pub mod config;
mod scram;
mod session;
mod upstream;
mod wire;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::error::{Error, ErrorKind, Result};
use crate::lease::{DatabaseRole, Engine, StaticRole};
use crate::vault::Client;
use upstream::{Route, Target, Upstream};

/// A cancel key the proxy gave a client: (process id, secret).
pub(crate) type CancelKey = (i32, i32);

/// What every session of the proxy shares: routes, who may log in, cancel keys.
pub(crate) struct ProxyState {
    routes: Vec<Arc<Route>>,
    allowed_uids: Vec<u32>,
    scram: Option<scram::Verifier>,
    startup_timeout: Duration,
    /// Cancelled when the shutdown timeout has passed: sessions still open end.
    closing: CancellationToken,
    /// The proxy's keys → the server backend they stand for.
    cancels: Mutex<HashMap<CancelKey, (SocketAddr, i32, i32)>>,
}

impl ProxyState {
    /// A fresh key for a session on `up`.
    fn register_cancel(&self, up: &Upstream) -> CancelKey {
        let mut map = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // From the operating system's CSPRNG: a key lets whoever knows it cancel the
            // session's queries, without logging in.
            let key = ((random_i32() & i32::MAX).max(1), random_i32());
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry(key) {
                e.insert((up.addr, up.pid, up.secret));
                return key;
            }
        }
    }

    /// Forward a client's cancel request to the backend its key stands for; an unknown
    /// key is ignored (as PostgreSQL does).
    async fn cancel(&self, key: CancelKey) {
        let target = self
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .copied();
        match target {
            Some((addr, pid, secret)) => {
                if let Err(e) = upstream::cancel(addr, pid, secret).await {
                    tracing::warn!(%addr, error = %e, "forwarding a cancel request failed");
                }
            }
            None => tracing::debug!("cancel request with an unknown key ignored"),
        }
    }
}

/// A running proxy's handle: its addresses, and a way to stop it.
pub struct Proxy {
    shared: Arc<ProxyState>,
    config: Config,
    tcp: Option<TcpListener>,
    /// The listener, its path, and the socket file's inode (removed at the end only if
    /// it is still ours).
    unix: Option<(UnixListener, PathBuf, u64)>,
    http: Option<TcpListener>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("tcp", &self.tcp_addr())
            .field("unix", &self.unix.as_ref().map(|u| &u.1))
            .field(
                "routes",
                &self
                    .shared
                    .routes
                    .iter()
                    .map(|r| &r.name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Proxy {
    /// Lease the first credentials of every database (each verified with one login),
    /// bind the listeners.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for an unusable configuration (a listener that cannot bind, a
    /// secret file that cannot be read); whatever leasing or the verifying login fails
    /// with, naming the database.
    pub async fn start(config: Config, vault: Client) -> Result<Self> {
        config.validate()?;
        let scram = match &config.listen.scram_secret_file {
            Some(path) => Some(scram::Verifier::new(read_secret(path)?.as_bytes())),
            None => None,
        };
        // Everything that can fail without a lease first: targets, then the listeners.
        let targets = config
            .databases
            .iter()
            .map(|db| target_for(db).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        let bind_err = |what: &str, e: std::io::Error| {
            Error::new(
                ErrorKind::Config,
                format!("vaultpool-proxy: binding {what}"),
            )
            .with_source(e)
        };
        let tcp = match config.listen.tcp.as_str() {
            "" => None,
            addr => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| bind_err(addr, e))?,
            ),
        };
        let unix = match &config.listen.unix_dir {
            Some(dir) => {
                let port = config
                    .listen
                    .unix_port
                    .or_else(|| {
                        tcp.as_ref()
                            .and_then(|l| l.local_addr().ok())
                            .map(|a| a.port())
                    })
                    .unwrap_or(6432);
                let path = dir.join(format!(".s.PGSQL.{port}"));
                // A socket left by a proxy that died: remove it — never a socket someone
                // still listens on, never another kind of file.
                if std::fs::symlink_metadata(&path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    // Only a refused connection says nobody listens (a full backlog or a
                    // permission error says nothing).
                    let stale = matches!(
                        std::os::unix::net::UnixStream::connect(&path),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
                    );
                    if !stale {
                        return Err(Error::new(
                            ErrorKind::Config,
                            format!(
                                "vaultpool-proxy: another process listens on {}; stop it or use \
                                 another unix_dir or port",
                                path.display()
                            ),
                        ));
                    }
                    let _ = std::fs::remove_file(&path);
                }
                let l = UnixListener::bind(&path)
                    .map_err(|e| bind_err(&path.display().to_string(), e))?;
                let inode = std::fs::symlink_metadata(&path)
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                    .unwrap_or(0);
                Some((l, path, inode))
            }
            None => None,
        };
        let http = match &config.listen.http {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| bind_err(addr, e))?,
            ),
            None => None,
        };
        // Then lease, database by database; a failure gives back what was leased.
        let mut routes: Vec<Arc<Route>> = Vec::new();
        for (db, target) in config.databases.iter().zip(targets) {
            let source: crate::lease::CredentialSource = if db.static_role {
                StaticRole::new(&db.role).mount(&db.mount).into()
            } else {
                DatabaseRole::new(&db.role).mount(&db.mount).into()
            };
            let built = Engine::builder(vault.clone(), source)
                .verify_with(upstream::verifier(target.clone()))
                .build()
                .await;
            let engine = match built {
                Ok(engine) => engine,
                Err(e) => {
                    for r in &routes {
                        r.engine.close().await;
                    }
                    return Err(Error::new(
                        e.kind(),
                        format!("starting database \"{}\" of the proxy", db.name),
                    )
                    .with_source(e));
                }
            };
            routes.push(Arc::new(Route::new(
                db.name.clone(),
                db.users.clone(),
                engine,
                target,
                db.max_connections,
                Duration::from_secs(db.wait_timeout_secs.clamp(0, 3600)),
            )));
        }
        let allowed_uids = config
            .listen
            .allowed_uids
            .clone()
            .unwrap_or_else(|| vec![current_uid()]);
        Ok(Self {
            shared: Arc::new(ProxyState {
                routes,
                allowed_uids,
                scram,
                startup_timeout: config.startup_timeout(),
                closing: CancellationToken::new(),
                cancels: Mutex::new(HashMap::new()),
            }),
            config,
            tcp,
            unix,
            http,
        })
    }

    /// The TCP address clients connect to.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The HTTP address of `/health` and `/metrics`.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The lease engine of database `name` (its status, or a forced rotation).
    pub fn engine(&self, name: &str) -> Option<&Engine> {
        self.shared
            .routes
            .iter()
            .find(|r| r.name == name)
            .map(|r| &r.engine)
    }

    /// Serve until `stop` is cancelled; then stop accepting, let sessions finish (up to
    /// the shutdown timeout), close the server connections and revoke every lease.
    pub async fn run(self, stop: CancellationToken) {
        let Self {
            shared,
            config,
            tcp,
            unix,
            http,
        } = self;
        let sessions = tokio_util::task::TaskTracker::new();
        let accept = CancellationToken::new();
        // Idle connections of retired generations close at once, so old leases drain.
        for route in &shared.routes {
            let (route, accept) = (route.clone(), accept.clone());
            tokio::spawn(async move {
                let mut generations = route.engine.subscribe();
                loop {
                    tokio::select! {
                        () = accept.cancelled() => return,
                        changed = generations.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            route.close_idle(false);
                        }
                    }
                }
            });
        }
        if let Some(l) = tcp {
            let (shared, sessions, accept) = (shared.clone(), sessions.clone(), accept.clone());
            tokio::spawn(async move {
                loop {
                    let conn = tokio::select! {
                        () = accept.cancelled() => return,
                        c = l.accept() => c,
                    };
                    match conn {
                        Ok((s, _)) => {
                            let _ = s.set_nodelay(true);
                            sessions.spawn(session::serve(shared.clone(), s, session::Peer::Tcp));
                        }
                        Err(e) => {
                            // Out of file descriptors, say: back off instead of spinning.
                            tracing::warn!(error = %e, "accepting a TCP client failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        let socket_path = unix.as_ref().map(|u| (u.1.clone(), u.2));
        if let Some((l, _, _)) = unix {
            let (shared, sessions, accept) = (shared.clone(), sessions.clone(), accept.clone());
            tokio::spawn(async move {
                loop {
                    let conn = tokio::select! {
                        () = accept.cancelled() => return,
                        c = l.accept() => c,
                    };
                    match conn {
                        Ok((s, _)) => {
                            let uid = s.peer_cred().ok().map(|c| c.uid());
                            sessions.spawn(session::serve(
                                shared.clone(),
                                s,
                                session::Peer::Unix(uid),
                            ));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "accepting a Unix-socket client failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        if let Some(l) = http {
            let (shared, accept) = (shared.clone(), accept.clone());
            let http_slots = Arc::new(tokio::sync::Semaphore::new(16));
            tokio::spawn(async move {
                loop {
                    let conn = tokio::select! {
                        () = accept.cancelled() => return,
                        c = l.accept() => c,
                    };
                    if let Ok((s, _)) = conn {
                        // At most 16 requests at a time; beyond that, closed at once (the
                        // accept loop never waits on a slow client).
                        let Ok(permit) = http_slots.clone().try_acquire_owned() else {
                            drop(s);
                            continue;
                        };
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            http_request(shared, s).await;
                            drop(permit);
                        });
                    } else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            });
        }
        stop.cancelled().await;
        tracing::info!("vaultpool-proxy stopping: no new sessions; waiting for open ones");
        accept.cancel();
        sessions.close();
        if tokio::time::timeout(config.shutdown_timeout(), sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?config.shutdown_timeout(),
                "sessions still open at the shutdown timeout: closing them"
            );
            shared.closing.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), sessions.wait()).await;
        }
        for route in &shared.routes {
            route.close_idle(true);
        }
        // Sessions still running hold connections; closing the engine revokes regardless.
        for route in &shared.routes {
            route.engine.close().await;
        }
        if let Some((p, inode)) = socket_path
            && std::fs::symlink_metadata(&p)
                .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == inode)
        {
            let _ = std::fs::remove_file(p);
        }
        tracing::info!("vaultpool-proxy stopped; every lease revoked");
    }
}

/// A random `i32` from the operating system's CSPRNG.
pub(crate) fn random_i32() -> i32 {
    let mut b = [0u8; 4];
    random_bytes(&mut b);
    i32::from_be_bytes(b)
}

/// Fill `buf` from the operating system's CSPRNG (salts, nonces, cancel keys).
pub(crate) fn random_bytes(buf: &mut [u8]) {
    if getrandom::fill(buf).is_err() {
        // No OS randomness at all (never on Linux): refuse to make guessable values.
        panic!("vaultpool-proxy: the operating system's random number generator failed");
    }
}

fn current_uid() -> u32 {
    // The owner of our own /proc entry is our uid (no libc call needed).
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(u32::MAX)
}

fn read_secret(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("reading the proxy's scram_secret_file {}", path.display()),
        )
        .with_source(e)
    })?;
    let secret = text.trim_end_matches(['\n', '\r']).to_owned();
    if secret.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            format!("the proxy's scram_secret_file {} is empty", path.display()),
        ));
    }
    Ok(secret)
}

fn target_for(db: &config::Database) -> Result<Target> {
    #[cfg(feature = "tls")]
    let (tls, tls_optional) = {
        use crate::tls::{PgTls, SslMode};
        let mode: SslMode = db.sslmode.as_deref().unwrap_or("disable").parse()?;
        let mut settings = PgTls::new(mode);
        if let Some(ca) = &db.sslrootcert {
            settings = settings.root_cert(ca);
        }
        let config = settings.rustls_config()?.map(Arc::new);
        (config, matches!(mode, SslMode::Allow | SslMode::Prefer))
    };
    #[cfg(not(feature = "tls"))]
    if db
        .sslmode
        .as_deref()
        .is_some_and(|m| m != "disable" && m != "prefer" && m != "allow")
    {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "[[database]] \"{}\": sslmode {} needs vaultpool built with its `tls` feature",
                db.name,
                db.sslmode.as_deref().unwrap_or_default()
            ),
        ));
    }
    Ok(Target {
        host: db.host.clone().unwrap_or_else(|| "127.0.0.1".into()),
        port: db.port.unwrap_or(5432),
        dbname: db.dbname.clone().unwrap_or_else(|| db.name.clone()),
        #[cfg(feature = "tls")]
        tls,
        #[cfg(feature = "tls")]
        tls_optional,
        connect_timeout: Duration::from_secs(10),
    })
}

/// One HTTP request on the health/metrics listener: `GET /health` or `GET /metrics`.
async fn http_request(shared: Arc<ProxyState>, mut s: tokio::net::TcpStream) {
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

/// Prometheus text format.
fn metrics(shared: &ProxyState) -> String {
    let mut out = String::new();
    type Metric = (&'static str, &'static str, &'static str, fn(&Route) -> f64);
    let metrics: [Metric; 12] = [
        (
            "vaultpool_proxy_sessions_active",
            "gauge",
            "Client sessions open.",
            |r| r.stats.sessions_active.load(Ordering::Relaxed) as f64,
        ),
        (
            "vaultpool_proxy_sessions_total",
            "counter",
            "Client sessions started.",
            |r| r.stats.sessions_total.load(Ordering::Relaxed) as f64,
        ),
        (
            "vaultpool_proxy_server_idle",
            "gauge",
            "Idle server connections kept for reuse.",
            |r| r.idle_count() as f64,
        ),
        (
            "vaultpool_proxy_server_logins_total",
            "counter",
            "Server logins.",
            |r| r.stats.server_logins.load(Ordering::Relaxed) as f64,
        ),
        (
            "vaultpool_proxy_server_login_failures_total",
            "counter",
            "Server logins that failed.",
            |r| r.stats.server_login_failures.load(Ordering::Relaxed) as f64,
        ),
        (
            "vaultpool_proxy_server_reused_total",
            "counter",
            "Sessions served by a reused server connection.",
            |r| r.stats.server_reused.load(Ordering::Relaxed) as f64,
        ),
        (
            "vaultpool_proxy_wait_seconds_total",
            "counter",
            "Time sessions waited for a free connection.",
            |r| r.stats.wait_ns.load(Ordering::Relaxed) as f64 / 1e9,
        ),
        (
            "vaultpool_proxy_waits_total",
            "counter",
            "Sessions that had to wait.",
            |r| r.stats.waits.load(Ordering::Relaxed) as f64,
        ),
        (
            "vaultpool_proxy_wait_timeouts_total",
            "counter",
            "Sessions refused after waiting.",
            |r| r.stats.wait_timeouts.load(Ordering::Relaxed) as f64,
        ),
        (
            "vaultpool_proxy_handovers_total",
            "counter",
            "Sessions moved to the serving generation between transactions.",
            |r| r.stats.handovers.load(Ordering::Relaxed) as f64,
        ),
        (
            "vaultpool_proxy_handovers_refused_total",
            "counter",
            "Sessions left on a retired generation (state that cannot move).",
            |r| r.stats.handovers_refused.load(Ordering::Relaxed) as f64,
        ),
        (
            "vaultpool_proxy_generation",
            "gauge",
            "The credentials generation serving.",
            |r| r.engine.generation().0 as f64,
        ),
    ];
    for (name, kind, help, value) in metrics {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for r in &shared.routes {
            let _ = writeln!(
                out,
                "{name}{{database=\"{}\"}} {}",
                r.name.replace(['"', '\\', '\n'], "_"),
                value(r)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP vaultpool_proxy_rotations_total Rotations.\n# TYPE vaultpool_proxy_rotations_total counter"
    );
    for r in &shared.routes {
        let s = r.engine.status();
        let _ = writeln!(
            out,
            "vaultpool_proxy_rotations_total{{database=\"{}\"}} {}",
            r.name.replace(['"', '\\', '\n'], "_"),
            s.rotations
        );
    }
    out
}
