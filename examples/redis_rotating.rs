//! Example 4: Redis with rotating credentials — a `VaultRedisPool` on a dynamic ACL user
//! (`database/creds/redis-app`), a forced rotation, and the old ACL user gone after drain.
//!
//! `scripts/demo.sh redis_rotating` (logs in as the `immune-system` AppRole; Redis from
//! REDIS_HOST/REDIS_PORT).

use vaultpool::redis::VaultRedisPool;
use vaultpool::redis::redis::AsyncCommands;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pool = VaultRedisPool::new("redis-app").await?;
    let first = pool.engine().current().credentials.username.clone();
    println!("ACL user {first} ({})", pool.engine().generation());

    let mut conn = pool.get().await?;
    let _: () = conn.set("app:greeting", "hello from vaultpool").await?;
    let v: String = conn.get("app:greeting").await?;
    println!("GET app:greeting = {v:?}");
    drop(conn);

    let g = pool.rotate().await?;
    let mut conn = pool.get().await?;
    let v: String = conn.get("app:greeting").await?;
    println!(
        "rotated to {g}: ACL user {}, still reads {v:?}",
        pool.engine().current().credentials.username
    );
    drop(conn);
    // The old user is deleted (ACL DELUSER) once its last connection is gone.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    println!("revocations so far: {}", pool.status().lease.revocations);
    pool.close().await;
    println!("closed: every ACL user this pool created is deleted");
    Ok(())
}
