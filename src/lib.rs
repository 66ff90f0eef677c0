//! # vaultpool
//!
//! Connection pools that never hold a long-lived password: they lease short-lived
//! credentials from HashiCorp Vault or OpenBao, keep the lease alive, rotate to fresh
//! credentials before it runs out, and revoke what they no longer use.
//!
//! ## Quick start: a PostgreSQL pool on dynamic credentials
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use vaultpool::postgres::VaultPgPool;
//!
//! // Vault: VAULT_ADDR + VAULT_ROLE_ID/VAULT_SECRET_ID (or VAULT_TOKEN).
//! // PostgreSQL: PGHOST/PGPORT/PGDATABASE (or DATABASE_URL without a password).
//! let pool = VaultPgPool::new("immune-readwrite").await?;
//! let client = pool.get().await?; // like a deadpool-postgres object
//! let n: i64 = client.query_one("SELECT count(*) FROM items", &[]).await?.get(0);
//! # let _ = n;
//! drop(client);
//! pool.close().await; // drain, then revoke every lease
//! # Ok(()) }
//! ```
//!
//! ## The Vault client on its own
//!
//! ```no_run
//! use secrecy::ExposeSecret;
//! use vaultpool::vault::Client;
//!
//! # async fn run() -> vaultpool::Result<()> {
//! let vault = Client::from_env()?;
//! vault.login().await?; // fail fast on bad credentials
//!
//! // Dynamic database credentials, with their lease.
//! let creds = vault.database_creds("database", "immune-readwrite").await?;
//! println!("user {} valid for {:?}", creds.value.username, creds.lease.duration);
//! // A renewal sets the end to now + increment: ask for the full TTL, never less.
//! vault.renew_lease(&creds.lease.id, Some(creds.lease.duration)).await?;
//! vault.revoke_lease(&creds.lease.id).await?;
//!
//! // A KV v2 secret: values are `SecretString`s, redacted in Debug.
//! let anthropic = vault.read_kv("secret", "maximus_ai/anthropic").await?;
//! let key = anthropic.require("api_key")?;
//! assert!(!key.expose_secret().is_empty());
//! # Ok(()) }
//! ```
//!
//! ## Features
//!
//! | feature | adds |
//! |---|---|
//! | (always) | [`vault::Client`], [`lease::Engine`] |
//! | `postgres` | `postgres::VaultPgPool` (deadpool-postgres 0.14, tokio-postgres 0.7) |
//! | `sqlx` | `sqlx::VaultSqlxPool` (a real `sqlx::PgPool`, sqlx 0.9) |
//! | `redis` | `redis::VaultRedisPool` (redis 1.x; dynamic ACL users or KV v2) |
//! | `kafka` | `kafka::KafkaSasl`: Kafka SASL settings from KV v2, watched for new versions |
//! | `rdkafka` | `kafka::RotatingClient`: rdkafka producers/consumers that take new SASL credentials while running (rdkafka 0.39, bundled librdkafka) |
//! | `axum` | `axum::HealthCheck`, `axum::health`, `IntoResponse for Error`, `axum::shutdown_signal` |
//!
//! ## How rotation works
//!
//! The architecture is a client ([`vault`]), an engine ([`lease`]) on it, and thin
//! adapters (one module per backend) that only subscribe to the engine; imports only
//! point down (ARCHITECTURE.md draws the layers). The engine holds
//! the current credentials in an `ArcSwap` with a [`Generation`]; it renews the lease at
//! about ⅔ of its TTL (jittered), and when the lease cannot be renewed any further — max
//! TTL reached, or the Vault token that issued it is ending — it issues new credentials,
//! checks them with one real connection, swaps them in and bumps the generation. Pools
//! open new connections with the current credentials, close idle connections of older
//! generations at once and busy ones when returned, and the old lease is revoked once its
//! last connection is gone (or at the drain deadline). See [`lease`] for the timeline,
//! retries while Vault is down, and shutdown.
//!
//! ## Errors
//!
//! Every fallible call returns [`Error`]; match on [`Error::kind`] ([`ErrorKind`]).
//! Messages name the operation, the path or role, and the Vault address, plus a hint on
//! what to do; they never contain a token, password, secret_id or secret value.
//!
//! ## Security model
//!
//! - Secrets are [`secrecy::SecretString`]s: zeroized on drop, redacted in `Debug`.
//! - Tokens travel only in the `X-Vault-Token` header, marked sensitive.
//! - TLS verification is on by default; `VAULT_CACERT` replaces the platform roots.
//! - Log lines (`tracing`) carry lease ids, usernames, accessors and paths, never secrets.

#[cfg(feature = "axum")]
pub mod axum;
mod backoff;
pub mod credentials;
pub mod error;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod lease;
#[cfg(any(feature = "postgres", feature = "sqlx", feature = "tls"))]
mod libpq;
#[cfg(any(feature = "postgres", feature = "redis", feature = "sqlx"))]
pub mod pool;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "proxy")]
pub mod proxy;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlx")]
pub mod sqlx;
#[cfg(feature = "tls")]
pub mod tls;
pub mod vault;
mod watched;

pub use credentials::{Credentials, Generation, Lease, Leased};

/// A boxed future, as verifiers, credential providers and custom logins return (no
/// async-trait: the `Send` bound is spelled out).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
pub use error::{Error, ErrorKind, Result};
pub use secrecy;

/// Helpers for unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use std::collections::HashMap;

    /// An environment lookup over fixed pairs.
    pub(crate) fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }
}

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
