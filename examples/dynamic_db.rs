//! Example 3: Dynamic database credentials with `VaultPgPool` — the recommended path.
//!
//! `scripts/demo.sh dynamic_db` (logs in as the `immune-system` AppRole; PostgreSQL from
//! PGHOST/PGPORT/PGDATABASE).

use vaultpool::postgres::VaultPgPool;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pool = VaultPgPool::new("immune-readwrite").await?;
    let status = pool.status().lease;
    println!(
        "leased {} as generation {} (lease {}, {:.0?} left, renewable {})",
        pool.engine().current().credentials.username,
        status.generation,
        status.lease_id,
        status.ttl_remaining.unwrap_or_default(),
        status.renewable
    );

    let client = pool.get().await?;
    let id: i64 = client
        .query_one(
            "INSERT INTO items (name) VALUES ($1) RETURNING id",
            &[&"from dynamic_db"],
        )
        .await?
        .get(0);
    println!("inserted item {id} on generation {}", client.generation());
    drop(client);

    // Force a rotation: new credentials, verified, swapped; the old lease is revoked
    // once its connection is gone.
    let generation = pool.rotate().await?;
    let client = pool.get().await?;
    let n: i64 = client
        .query_one("SELECT count(*) FROM items", &[])
        .await?
        .get(0);
    println!(
        "rotated to {generation}: {n} items, read as {}",
        pool.engine().current().credentials.username
    );
    drop(client);

    pool.close().await;
    println!("closed: every lease revoked, no database user left behind");
    Ok(())
}
