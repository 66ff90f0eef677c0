//! # vaultpool
//!
//! Connection pools that never hold a long-lived password: they lease short-lived
//! credentials from HashiCorp Vault or OpenBao, keep the lease alive, rotate to fresh
//! credentials before it runs out, and revoke what they no longer use.
//!
//! This release ships the foundation: a Vault/OpenBao client ([`vault::Client`]) with
//! token and AppRole auth (its own token renewed and re-obtained as needed), KV v2 with a
//! TTL cache, the database secrets engine, lease renew/revoke/lookup and health; retries
//! with capped, jittered exponential backoff and a circuit breaker; typed errors.
//!
//! ## Quick start
//!
//! ```no_run
//! use secrecy::ExposeSecret;
//! use vaultpool::vault::Client;
//!
//! # async fn run() -> vaultpool::Result<()> {
//! // VAULT_ADDR, and VAULT_ROLE_ID + VAULT_SECRET_ID (AppRole) or VAULT_TOKEN.
//! let vault = Client::from_env()?;
//! vault.login().await?; // fail fast on bad credentials
//!
//! // Dynamic database credentials, with their lease.
//! let creds = vault.database_creds("database", "immune-readwrite").await?;
//! println!("user {} valid for {:?}", creds.value.username, creds.lease.duration);
//! vault.renew_lease(&creds.lease.id, Some(std::time::Duration::from_secs(3600))).await?;
//! vault.revoke_lease(&creds.lease.id).await?;
//!
//! // A KV v2 secret: values are `SecretString`s, redacted in Debug.
//! let anthropic = vault.read_kv("secret", "maximus_ai/anthropic").await?;
//! let key = anthropic.require("api_key")?;
//! assert!(!key.expose_secret().is_empty());
//! # Ok(()) }
//! ```
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
pub mod credentials;
pub mod error;
pub mod lease;
#[cfg(any(feature = "postgres", feature = "redis"))]
pub mod pool;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlx")]
pub mod sqlx;
pub mod vault;

pub use credentials::{Credentials, Generation, Lease, Leased};
pub use error::{Error, ErrorKind, Result};
pub use lease::RotatingCredentials;
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
