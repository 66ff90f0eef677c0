//! `vaultpool-proxy`: a PostgreSQL-protocol sidecar, so services in any language get
//! rotating Vault credentials without holding a database password (feature `proxy`).
//!
//! - Clients (psql, libpq, psycopg, asyncpg, JDBC, ...) connect to the proxy on loopback
//!   TCP or a Unix socket. On the socket, peers whose uid is allowed log in without a
//!   password (`SO_PEERCRED`); everyone else proves the proxy's local secret with
//!   SCRAM-SHA-256. No client ever sees a database password.
//! - Each configured database is a *route*: a lease engine on its Vault role, and the
//!   server connections logged in with the lease's credentials. **Session pooling:** a
//!   client session owns one server connection from startup to the end; the connection
//!   is then reset (`DISCARD ALL`) and kept for the next session. Transaction pooling is
//!   not offered.
//! - **Rotation:** new sessions get the new generation at once; a session already open
//!   is moved to it between transactions (its settings and prepared statements with it),
//!   or — holding what cannot move — goes on untouched on the old one; the old lease is
//!   revoked when its last session ends (or at its lease's end).
//! - Cancel requests reach the server backend of the session they name; the client knows
//!   only a key of the proxy's.
//!
//! The files, from the outside in:
//!
//! | file | what it is |
//! |---|---|
//! | `mod.rs` | [`Proxy`]: start (routes, listeners), run, shutdown |
//! | `config.rs` | [`Config`]: TOML and environment |
//! | `listen.rs` | binding the listeners; the one accept loop they all run |
//! | `http.rs` | `/health` and `/metrics` |
//! | `session.rs` | one client session's life: handshake, relay and hand-overs, the end |
//! | `handshake.rs` | a client's startup, authentication, checkout and welcome |
//! | `scram.rs` | the server side of SCRAM-SHA-256 (the local secret) |
//! | `relay.rs` | bytes both ways, shown to the session's tracker |
//! | `handover.rs` | moving an idle session to the serving generation |
//! | `cancel.rs` | the proxy's cancel keys and the backends they stand for |
//! | `route.rs` | one database: its lease engine and its pool of server connections |
//! | `server.rs` | one server connection: login, the proxy's own queries, cancel |
//! | `protocol/` | the wire protocol; `protocol/tracker.rs` is the pure session tracker |

pub mod config;

mod cancel;
mod handover;
mod handshake;
mod http;
mod listen;
mod protocol;
mod relay;
mod route;
mod scram;
mod server;
mod session;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::error::{Error, ErrorKind, Result};
use crate::lease::Engine;
use crate::vault::Client;
use cancel::Cancels;
use listen::Listeners;
use route::Route;
use server::Target;

/// What every session of the proxy shares: routes, who may log in, cancel keys.
pub(crate) struct ProxyState {
    routes: Vec<Arc<Route>>,
    allowed_uids: Vec<u32>,
    scram: Option<scram::Verifier>,
    startup_timeout: Duration,
    /// Cancelled when the shutdown timeout has passed: sessions still open end.
    closing: CancellationToken,
    cancels: Cancels,
}

/// A running proxy's handle: its addresses, and a way to stop it.
pub struct Proxy {
    shared: Arc<ProxyState>,
    config: Config,
    listeners: Listeners,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("tcp", &self.tcp_addr())
            .field(
                "unix",
                &self.listeners.socket_file.as_ref().map(|s| &s.path),
            )
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
            .map(Target::from_config)
            .collect::<Result<Vec<_>>>()?;
        let listeners = listen::bind(&config.listen).await?;
        // Then lease, database by database; a failure gives back what was leased.
        let mut routes: Vec<Arc<Route>> = Vec::new();
        for (db, target) in config.databases.iter().zip(targets) {
            match Route::start(db, target, vault.clone()).await {
                Ok(route) => routes.push(Arc::new(route)),
                Err(e) => {
                    for r in &routes {
                        r.engine.close().await;
                    }
                    return Err(e);
                }
            }
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
                cancels: Cancels::default(),
            }),
            config,
            listeners,
        })
    }

    /// The TCP address clients connect to.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.listeners
            .tcp
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The HTTP address of `/health` and `/metrics`.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.listeners
            .http
            .as_ref()
            .and_then(|l| l.local_addr().ok())
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
            listeners,
        } = self;
        let sessions = tokio_util::task::TaskTracker::new();
        let accept = CancellationToken::new();
        for route in &shared.routes {
            route.clone().follow_rotations(accept.clone());
        }
        if let Some(l) = listeners.tcp {
            let serve = session::on_connection(shared.clone(), sessions.clone());
            listen::spawn(l, accept.clone(), serve);
        }
        if let Some(l) = listeners.unix {
            let serve = session::on_connection(shared.clone(), sessions.clone());
            listen::spawn(l, accept.clone(), serve);
        }
        if let Some(l) = listeners.http {
            listen::spawn(l, accept.clone(), http::on_connection(shared.clone()));
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
        // Every route at once: one after another, the last ones' revocations could land
        // after the grace period's SIGKILL.
        futures_util::future::join_all(shared.routes.iter().map(|r| r.engine.close())).await;
        if let Some(file) = listeners.socket_file {
            file.remove();
        }
        tracing::info!("vaultpool-proxy stopped; every lease revoked");
    }
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

fn read_secret(path: &Path) -> Result<String> {
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

/// The session tracker and the startup parser over arbitrary bytes, for the fuzz target
/// in `fuzz/` (`cargo fuzz run proxy_protocol`): none may panic; the tracker must end
/// the same however the bytes are cut, and never say a busy session can move.
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn fuzz_protocol(data: &[u8]) {
    if let Ok(protocol::startup::Startup::Session(params)) = protocol::startup::parse_startup(data)
        && let Ok(settings) = protocol::startup::settings(&params)
    {
        assert!(settings.pairs.len() <= params.len() + data.len());
    }
    protocol::fuzz_tracker(data);
}
