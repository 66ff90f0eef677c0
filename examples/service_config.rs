//! Example 6: A complete service configuration from one Vault client: PostgreSQL through dynamic
//! credentials (target from `secret/postgres/main`, login from `database/creds/…`), Redis
//! and Kafka SASL settings from KV v2 (`secret/redis/main`, `secret/kafka/main`).
//! Prints the configuration with every secret redacted.
//!
//! `scripts/demo.sh service_config` (logs in as the `infrastructure` AppRole).

use secrecy::{ExposeSecret, SecretString};
use vaultpool::postgres::{VaultPgPool, tokio_postgres};
use vaultpool::vault::Client;

#[derive(Debug)]
#[allow(dead_code)] // fields are read through Debug
struct RedisConfig {
    url_without_password: String,
    username: String,
    password: SecretString,
}

#[derive(Debug)]
#[allow(dead_code)]
struct KafkaConfig {
    bootstrap_servers: String,
    sasl_mechanism: String,
    sasl_username: String,
    sasl_password: SecretString,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vault = Client::from_env()?;
    vault.login().await?;

    // PostgreSQL: where from KV, who from the database secrets engine.
    let pg = vault.read_kv("secret", "postgres/main").await?;
    let text = |s: &SecretString| s.expose_secret().to_owned();
    let mut target = tokio_postgres::Config::new();
    target
        .host(text(pg.require("host")?))
        .port(text(pg.require("port")?).parse()?)
        .dbname(text(pg.require("database")?));
    let db = VaultPgPool::builder("vertice-readwrite")
        .vault(vault.clone())
        .pg_config(target)
        .build()
        .await?;

    let redis = vault.read_kv("secret", "redis/main").await?;
    let redis = RedisConfig {
        url_without_password: format!(
            "redis://{}:{}",
            text(redis.require("host")?),
            text(redis.require("port")?)
        ),
        username: text(redis.require("username")?),
        password: redis.require("password")?.clone(),
    };
    let kafka = vault.read_kv("secret", "kafka/main").await?;
    let kafka = KafkaConfig {
        bootstrap_servers: text(kafka.require("bootstrap_servers")?),
        sasl_mechanism: text(kafka.require("sasl_mechanism")?),
        sasl_username: text(kafka.require("sasl_username")?),
        sasl_password: kafka.require("sasl_password")?.clone(),
    };

    let status = db.status();
    println!("postgres  {:?}", status.lease);
    println!("redis     {redis:#?}");
    println!("kafka     {kafka:#?}");
    let client = db.get().await?;
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0);
    println!(
        "postgres  connected as {user} (generation {})",
        client.generation()
    );
    drop(client);
    db.close().await;
    Ok(())
}
