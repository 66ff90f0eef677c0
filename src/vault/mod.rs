//! The Vault/OpenBao HTTP client.
//!
//! [`Client`] is a cheap, cloneable handle. It authenticates (a static token or AppRole),
//! keeps its own token alive (renew-self before it runs out, a fresh login once renewal is
//! capped by the token's max TTL), retries transient failures with capped, jittered
//! exponential backoff, and guards Vault with a circuit breaker.
//!
//! ```no_run
//! # async fn demo() -> vaultpool::Result<()> {
//! use vaultpool::vault::Client;
//! use secrecy::ExposeSecret;
//!
//! let client = Client::from_env()?; // VAULT_ADDR, VAULT_TOKEN or VAULT_ROLE_ID/VAULT_SECRET_ID
//! let creds = client.database_creds("database", "immune-readwrite").await?;
//! println!("user {} for {:?}", creds.value.username, creds.lease.duration);
//! let kv = client.read_kv("secret", "maximus_ai/anthropic").await?;
//! let _api_key = kv.get("api_key").map(|k| k.expose_secret().len());
//! # Ok(()) }
//! ```

mod auth;
mod breaker;
mod config;
mod database;
mod envelope;
mod kv;
mod path;
mod sys;
mod transport;

use std::sync::Arc;
use std::time::Instant;

pub use crate::credentials::KvSecret;
pub use auth::{
    AuthMethod, JwtSource, KUBERNETES_TOKEN_PATH, Login, LoginRequest, SecretIdSource, TokenInfo,
};
pub use breaker::BreakerConfig;
pub use config::{ClientBuilder, RetryConfig};
pub use database::StaticCreds;
pub use kv::KvMetadata;
pub use sys::{LeaseInfo, ServerHealth, ServerState};

use crate::error::Result;
use breaker::Breaker;
pub(crate) use path::check_name;
pub(crate) use transport::Call;
#[cfg(fuzzing)]
use transport::status_error;

/// A Vault/OpenBao client: cheap to clone, safe to share between tasks.
///
/// Build one with [`Client::from_env`] or [`Client::builder`].
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientState>,
}

/// What every clone of a [`Client`] shares: the HTTP client, the addresses and which one
/// is in use, the settings, the circuit breaker, the token manager and the KV cache.
struct ClientState {
    /// The HTTP client, made again when the TLS files it was made from change.
    http: crate::watched::Watched<reqwest::Client>,
    /// Every node's address (one for a single server); `current` indexes the one in use.
    addrs: Vec<url::Url>,
    current: std::sync::atomic::AtomicUsize,
    namespace: Option<String>,
    retry: RetryConfig,
    breaker: Breaker,
    auth: auth::TokenManager,
    kv_cache: kv::Cache,
    /// An answer came through a cache in front of Vault (a Vault Proxy or Agent with
    /// `cache {}`): revocations are sent in the form that cache evicts.
    behind_cache: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.address())
            .field("namespace", &self.inner.namespace)
            .field("auth", &self.inner.auth.method_name())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A builder with every default (see [`ClientBuilder`]).
    pub fn builder() -> ClientBuilder {
        ClientBuilder::new()
    }

    /// A client configured from the Vault CLI's environment variables
    /// (see [`ClientBuilder::from_env`]).
    ///
    /// # Errors
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) when `VAULT_ADDR` is missing or invalid, no auth method is
    /// configured, or a CA file cannot be read.
    pub fn from_env() -> Result<Self> {
        ClientBuilder::from_env()?.build()
    }

    /// The Vault address this client talks to now (with several addresses, the one it
    /// moved to last).
    pub fn address(&self) -> &str {
        self.base().1.as_str()
    }

    /// Every address the client knows, in the order given.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.inner.addrs.iter().map(url::Url::as_str)
    }

    /// When the token with this accessor ends for good, if known (it was replaced by a
    /// fresh login, or its renewal was capped by its max TTL).
    /// Whether Vault's answers come through a cache (a Vault Proxy or Agent with
    /// `cache {}`, seen by its `X-Cache` header).
    pub(crate) fn behind_cache(&self) -> bool {
        self.inner
            .behind_cache
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn token_end(&self, accessor: &str) -> Option<Instant> {
        self.inner.auth.end_of(accessor)
    }

    /// When the client's token is due for renewal or re-login, if it has one.
    pub(crate) fn token_refresh_at(&self) -> Option<Instant> {
        self.inner.auth.refresh_at()
    }

    /// Whether the circuit breaker is currently open (calls fail fast).
    pub fn circuit_open(&self) -> bool {
        self.inner.breaker.is_open()
    }
}

/// Every decoder of Vault answers over one body, for the fuzz target in `fuzz/`
/// (`cargo fuzz run envelope`): none may panic, and no error message may grow with the
/// body (messages never quote a value).
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn fuzz_decode(body: &[u8]) {
    use envelope::Envelope;
    use reqwest::StatusCode;
    use serde_json::Value;
    fn check<T>(r: Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                let shown = format!("{e} {e:?}");
                assert!(
                    shown.len() < 2048,
                    "an error message grew with the body: {shown}"
                );
                None
            }
        }
    }
    let what = "GET fuzz";
    if let Some(env) = check(Envelope::<database::CredsData>::decode(body, what)) {
        if let Some((_, parts)) = check(env.into_data(what)) {
            check(parts.into_lease(Instant::now(), what));
        }
    }
    check(Envelope::<kv::DataBlock>::decode(body, what));
    check(Envelope::<kv::MetadataBlock>::decode(body, what));
    check(Envelope::<auth::LookupSelf>::decode(body, what));
    check(Envelope::<sys::LookupData>::decode(body, what));
    check(Envelope::<Value>::decode(body, what));
    check(envelope::decode_json::<sys::HealthBody>(body, what));
    for status in [400, 403, 404, 429, 500, 503] {
        let e = status_error(what.into(), StatusCode::from_u16(status).unwrap(), body);
        check::<()>(Err(e));
    }
}
