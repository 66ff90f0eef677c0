//! Log in with AppRole, read a KV v2 secret, lease database credentials, renew and revoke
//! the lease — printing only facts that are not secret.
//!
//! Run it against the local stack: `scripts/demo.sh` (or set VAULT_ADDR, VAULT_ROLE_ID,
//! VAULT_SECRET_ID yourself and `cargo run --example quickstart`).

use secrecy::ExposeSecret;
use vaultpool::vault::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "vaultpool=info".into()),
        )
        .init();

    let vault = Client::from_env()?;
    let health = vault.health().await?;
    println!(
        "vault        {} ({:?}, version {})",
        vault.address(),
        health.state,
        health.version
    );

    let token = vault.login().await?;
    println!(
        "logged in    policies {:?}, token ttl {:?}, renewable {}",
        token.policies, token.ttl, token.renewable
    );

    let kv = vault.read_kv("secret", "immune/postgres").await?;
    println!(
        "kv           secret/immune/postgres v{} keys {:?}",
        kv.version(),
        kv.keys().collect::<Vec<_>>()
    );
    let role = kv.require("role")?.expose_secret().to_owned();

    let creds = vault.database_creds("database", &role).await?;
    println!(
        "leased       role {role}: user {} (password: {} chars, not shown), lease {} for {:?}, renewable {}",
        creds.value.username,
        creds.value.password.expose_secret().len(),
        creds.lease.id,
        creds.lease.duration,
        creds.lease.renewable
    );

    // A renewal sets the expiry to now + increment: ask for the full TTL again, never
    // less (a shorter increment would shorten the lease).
    let renewed = vault
        .renew_lease(&creds.lease.id, Some(creds.lease.duration))
        .await?;
    println!("renewed      ttl now {:?}", renewed.duration);

    vault.revoke_lease(&creds.lease.id).await?;
    println!(
        "revoked      {} (the database user is dropped)",
        creds.lease.id
    );
    Ok(())
}
