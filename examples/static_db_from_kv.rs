//! Example 2: A static database login kept in KV v2 (`secret/postgres/main`): read it, connect
//! with tokio-postgres. (Dynamic credentials — `dynamic_db` — are the better path.)
//!
//! `scripts/demo.sh static_db_from_kv` (logs in as the `infrastructure` AppRole).

use secrecy::ExposeSecret;
use vaultpool::postgres::tokio_postgres;
use vaultpool::vault::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vault = Client::from_env()?;
    let kv = vault.read_kv("secret", "postgres/main").await?;
    let field = |k: &str| kv.require(k).map(|v| v.expose_secret().to_owned());
    let mut config = tokio_postgres::Config::new();
    config
        .host(field("host")?)
        .port(field("port")?.parse()?)
        .dbname(field("database")?)
        .user(field("username")?)
        .password(kv.require("password")?.expose_secret());
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .await?;
    let (user, db): (String, String) = (row.get(0), row.get(1));
    println!(
        "connected to {db} as {user} (static login from KV version {})",
        kv.version()
    );
    Ok(())
}
