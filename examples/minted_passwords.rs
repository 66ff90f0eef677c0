//! A credential source of your own, no Vault at all: the password of one PostgreSQL
//! user is minted here (from the OS's CSPRNG) and set with `ALTER ROLE … PASSWORD` as a
//! SCRAM verifier, so the plaintext never reaches the server (the verifier may reach its
//! log, as Vault's own statements do), with a 12 s lifetime. The engine
//! rotates before it ends, swaps, drains, as for Vault's credentials; a pool on it runs
//! under load and reports its failures (there should be none).
//!
//! The same shape fits an RDS IAM token (`issue` signs a 15-minute token), Cloud SQL or
//! Entra, or an in-memory fake in your own tests.
//!
//! Needs a PostgreSQL admin that may `ALTER ROLE` (here from `PGHOST`, `PGPORT`,
//! `MINT_ADMIN_USER` (default `postgres`) and `MINT_ADMIN_PASSWORD`, or the local stack's
//! `VAULTPOOL_PG_SUPER_PASSWORD`):
//! `set -a; . "$(scripts/stack.sh env)"; set +a; cargo run --features postgres --example minted_passwords`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vaultpool::credentials::{Credentials, Lease, Leased};
use vaultpool::lease::{BoxFuture, CredentialProvider, CredentialSource};
use vaultpool::postgres::{VaultPgPool, tokio_postgres};
use vaultpool::{Error, ErrorKind, Generation, Result};

/// Mints a new password for `user` on every `issue`.
pub struct MintedPasswords {
    admin: tokio_postgres::Client,
    user: String,
    lifetime: Duration,
    minted: AtomicU64,
}

impl CredentialProvider for MintedPasswords {
    fn issue(&self) -> BoxFuture<'_, Result<Leased<Credentials>>> {
        Box::pin(async move {
            // From the operating system's CSPRNG (not a fast PRNG: this is a password).
            let mut bytes = [0u8; 24];
            getrandom::fill(&mut bytes)
                .map_err(|e| Error::new(ErrorKind::Backend, format!("minting a password: {e}")))?;
            let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
            self.admin
                .batch_execute(&format!(
                    "ALTER ROLE {} PASSWORD '{verifier}'",
                    quote_ident(&self.user)
                ))
                .await
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Backend,
                        format!("minting a password for {}", self.user),
                    )
                    .with_source(e)
                })?;
            let n = self.minted.fetch_add(1, Ordering::Relaxed) + 1;
            Ok(Leased::new(
                Credentials::new(&self.user, password),
                // Not renewable: rotated to a newly minted password before it ends.
                Lease::new(format!("minted:{}#{n}", self.user), self.lifetime, false),
            ))
        })
    }
}

/// An SQL identifier, quoted.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What a run did.
#[derive(Debug)]
pub struct Report {
    /// Queries that succeeded.
    pub queries: u64,
    /// Queries that failed (printed).
    pub failed: Vec<String>,
    /// The generation serving at the end (1 + rotations).
    pub generation: Generation,
}

/// Where PostgreSQL is and who may `ALTER ROLE` there.
pub struct Target {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database (with an `items` table).
    pub database: String,
    /// An admin user that may `ALTER ROLE`.
    pub admin_user: String,
    /// Its password.
    pub admin_password: String,
}

impl Target {
    /// From `PGHOST`, `PGPORT`, `PGDATABASE`, `MINT_ADMIN_USER` and
    /// `MINT_ADMIN_PASSWORD` (or the local stack's `VAULTPOOL_PG_SUPER_PASSWORD`).
    pub fn from_env() -> std::result::Result<Self, Box<dyn std::error::Error>> {
        let var = |k: &str| std::env::var(k).ok();
        Ok(Self {
            host: var("PGHOST").unwrap_or_else(|| "127.0.0.1".into()),
            port: var("PGPORT").unwrap_or_else(|| "5432".into()).parse()?,
            database: var("PGDATABASE").unwrap_or_else(|| "adaptive_immunity".into()),
            admin_user: var("MINT_ADMIN_USER").unwrap_or_else(|| "postgres".into()),
            admin_password: var("MINT_ADMIN_PASSWORD")
                .or_else(|| var("VAULTPOOL_PG_SUPER_PASSWORD"))
                .ok_or("set MINT_ADMIN_PASSWORD")?,
        })
    }

    fn config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .dbname(&self.database)
            .ssl_mode(tokio_postgres::config::SslMode::Disable);
        c
    }
}

/// A pool on minted passwords for `user` (created if missing), `workers` tasks querying
/// it for `run_for`.
pub async fn run(
    target: &Target,
    user: &str,
    lifetime: Duration,
    workers: usize,
    run_for: Duration,
) -> std::result::Result<Report, Box<dyn std::error::Error>> {
    let mut admin_config = target.config();
    admin_config
        .user(&target.admin_user)
        .password(&target.admin_password);
    let (admin, connection) = admin_config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let ident = quote_ident(user);
    // The name as a bound parameter and a quoted identifier: nothing in it is SQL.
    let exists = admin
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&user])
        .await?
        .is_some();
    if !exists {
        admin
            .batch_execute(&format!("CREATE ROLE {ident} LOGIN"))
            .await?;
    }
    admin
        .batch_execute(&format!("GRANT SELECT ON items TO {ident}"))
        .await?;
    let source = CredentialSource::custom(
        format!("minted passwords for {user}"),
        MintedPasswords {
            admin,
            user: user.to_owned(),
            lifetime,
            minted: AtomicU64::new(0),
        },
    );
    // No Vault client, no VAULT_ADDR: the source needs none.
    let pool = VaultPgPool::builder_for(source)
        .pg_config(target.config())
        .max_size(4)
        .build()
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (pool, stop) = (pool.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let result = async {
                    let client = pool.get().await.map_err(|e| e.to_string())?;
                    client
                        .query_one("SELECT count(*) FROM items", &[])
                        .await
                        .map_err(|e| e.to_string())
                }
                .await;
                match result {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (ok, failed)
        }));
    }
    let started = Instant::now();
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut report = Report {
        queries: 0,
        failed: Vec::new(),
        generation: pool.engine().generation(),
    };
    for t in tasks {
        let (ok, failed) = t.await?;
        report.queries += ok;
        report.failed.extend(failed);
    }
    pool.close().await;
    Ok(report)
}

#[tokio::main]
async fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let report = run(
        &Target::from_env()?,
        "minted_app",
        Duration::from_secs(12),
        4,
        Duration::from_secs(30),
    )
    .await?;
    println!(
        "minted passwords, 12 s lifetime, 30 s under load: {} rotations, {} queries, {} failed",
        report.generation.0 - 1,
        report.queries,
        report.failed.len()
    );
    for e in report.failed.iter().take(5) {
        println!("  {e}");
    }
    if !report.failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
