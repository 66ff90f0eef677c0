//! Cancel keys: each client gets a key of the proxy's that stands for the server backend
//! its session is on (moved along with the session); a CancelRequest with it is sent on
//! to that backend. The client never learns the backend's own key.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::Mutex;

use super::server::{self, Server};

/// A cancel key the proxy gave a client: (process id, secret).
pub(crate) type CancelKey = (i32, i32);

/// The server backend a key stands for.
#[derive(Debug, Clone, Copy)]
struct Backend {
    addr: SocketAddr,
    pid: i32,
    secret: i32,
}

impl Backend {
    fn of(server: &Server) -> Self {
        Self {
            addr: server.addr,
            pid: server.pid,
            secret: server.secret,
        }
    }
}

/// The keys of the sessions open now (shared by every session task).
#[derive(Debug, Default)]
pub(crate) struct Cancels {
    keys: Mutex<HashMap<CancelKey, Backend>>,
}

impl Cancels {
    /// A fresh key for a session on `server`.
    pub(crate) fn register(&self, server: &Server) -> CancelKey {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // From the operating system's CSPRNG: a key lets whoever knows it cancel the
            // session's queries, without logging in.
            let key = ((random_i32() & i32::MAX).max(1), random_i32());
            if let Entry::Vacant(e) = keys.entry(key) {
                e.insert(Backend::of(server));
                return key;
            }
        }
    }

    /// The session with `key` moved to `server`.
    pub(crate) fn moved(&self, key: CancelKey, server: &Server) {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Backend::of(server));
    }

    /// The session with `key` ended.
    pub(crate) fn remove(&self, key: CancelKey) {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    /// Send a client's cancel request on to the backend its key stands for; an unknown
    /// key is ignored (as PostgreSQL does).
    pub(crate) async fn forward(&self, key: CancelKey) {
        let backend = self
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .copied();
        match backend {
            Some(Backend { addr, pid, secret }) => {
                if let Err(e) = server::cancel(addr, pid, secret).await {
                    tracing::warn!(%addr, error = %e, "forwarding a cancel request failed");
                }
            }
            None => tracing::debug!("cancel request with an unknown key ignored"),
        }
    }
}

/// A random `i32` from the operating system's CSPRNG.
fn random_i32() -> i32 {
    let mut b = [0u8; 4];
    super::random_bytes(&mut b);
    i32::from_be_bytes(b)
}
