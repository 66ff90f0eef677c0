//! An auth method of your own: vaultpool ships token, AppRole, Kubernetes, JWT, TLS
//! certificates, Vault Agent and Vault Proxy; anything else (AWS IAM, GCP, Azure, LDAP,
//! userpass, …) is a [`Login`]: build the login request afresh each time, and the client
//! does the rest — sends it, renews the token it gets, logs in again when the renewal is
//! capped or Vault says the token is gone; leases issued under a replaced token rotate
//! before its end.
//!
//! Here: OpenBao's `userpass` method, the password read from a file at every login (so
//! a secret manager can replace it). An AWS IAM login has the same shape: `request`
//! signs an `sts:GetCallerIdentity` request and returns `auth/aws/login` with
//! `iam_http_request_method`, `iam_request_url`, `iam_request_headers` and
//! `iam_request_body`.
//!
//! `VAULT_ADDR`, `USERPASS_USER`, `USERPASS_PASSWORD_FILE`, `USERPASS_MOUNT` (default
//! `userpass`), then a pool on `DB_ROLE` (default `immune-readwrite`) from the libpq
//! variables; it runs queries for 10 s and reports them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vaultpool::lease::BoxFuture;
use vaultpool::postgres::VaultPgPool;
use vaultpool::vault::{AuthMethod, Client, Login, LoginRequest};
use vaultpool::{Error, ErrorKind, Result};

/// Userpass login with the password read from `password_file` at every login.
pub struct Userpass {
    /// Where userpass is mounted.
    pub mount: String,
    /// The user.
    pub user: String,
    /// A file holding the password.
    pub password_file: PathBuf,
}

impl Login for Userpass {
    fn name(&self) -> &str {
        "userpass"
    }

    fn request(&self) -> BoxFuture<'_, Result<LoginRequest>> {
        Box::pin(async move {
            let password = std::fs::read_to_string(&self.password_file).map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "reading the userpass password file {}",
                        self.password_file.display()
                    ),
                )
                .with_source(e)
            })?;
            Ok(LoginRequest::new(
                format!("auth/{}/login/{}", self.mount, self.user),
                serde_json::json!({ "password": password.trim() }),
            ))
        })
    }
}

#[tokio::main]
async fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let env = |k: &str| std::env::var(k).map_err(|_| format!("{k} is not set"));
    let login = Userpass {
        mount: env("USERPASS_MOUNT").unwrap_or_else(|_| "userpass".into()),
        user: env("USERPASS_USER")?,
        password_file: env("USERPASS_PASSWORD_FILE")?.into(),
    };
    let vault = Client::builder()
        .address(env("VAULT_ADDR")?)
        .auth(AuthMethod::custom(login))
        .build()?;
    let role = env("DB_ROLE").unwrap_or_else(|_| "immune-readwrite".into());
    let pool = VaultPgPool::builder(&role)
        .vault(vault.clone())
        .build()
        .await?;
    let (started, mut queries) = (Instant::now(), 0u64);
    while started.elapsed() < Duration::from_secs(10) {
        let conn = pool.get().await?;
        conn.query_one("SELECT 1", &[]).await?;
        queries += 1;
    }
    let logins = vault.token_info().map_or(0, |t| t.logins);
    println!("custom login (userpass): {queries} queries, {logins} logins");
    pool.close().await;
    Ok(())
}
