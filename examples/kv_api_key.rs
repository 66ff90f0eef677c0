//! Example 1: Read an API key from KV v2 (`secret/maximus_ai/anthropic`) without ever printing it.
//!
//! `scripts/demo.sh kv_api_key` (logs in as the `maximus-ai` AppRole).

use secrecy::ExposeSecret;
use vaultpool::vault::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vault = Client::from_env()?;
    let secret = vault.read_kv("secret", "maximus_ai/anthropic").await?;
    // Debug shows path, version and key names only.
    println!("read {secret:?}");
    let api_key = secret.require("api_key")?;
    // Hand the key to the client library that needs it; never log it.
    let header = format!("x-api-key: {}", api_key.expose_secret());
    println!(
        "api_key: {} characters (not shown); request header built ({} bytes)",
        api_key.expose_secret().len(),
        header.len()
    );
    // A second read within the cache TTL (default 5 min) does not reach Vault.
    let again = vault.read_kv("secret", "maximus_ai/anthropic").await?;
    println!("cached read: version {}", again.version());
    Ok(())
}
