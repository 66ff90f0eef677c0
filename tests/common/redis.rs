//! The stack's Redis: ACL roles of a test's own, admin commands, which users exist.

use super::*;

/// The ACL rules the stack's Redis roles grant.
pub const REDIS_RULES: &str = r#"["~app:*", "+@all", "-@dangerous"]"#;

/// A Redis role of the test's own on the stack's Vault (named `redis-test-…`, which the
/// immune-system policy may lease).
pub async fn create_redis_role(ttl: &str, max_ttl: &str) -> String {
    let name = format!("redis-test-{}", unique());
    vault_write(
        &var("VAULT_ADDR"),
        &var("VAULTPOOL_ROOT_TOKEN"),
        reqwest::Method::POST,
        &format!("database/roles/{name}"),
        serde_json::json!({
            "db_name": "redis",
            "default_ttl": ttl,
            "max_ttl": max_ttl,
            "creation_statements": REDIS_RULES,
        }),
    )
    .await;
    name
}

/// The stack's Redis address, without credentials.
pub fn redis_url() -> String {
    format!("redis://{}:{}/0", var("REDIS_HOST"), var("REDIS_PORT"))
}

/// Run a command on the stack's Redis as the admin (`default`) user.
pub async fn redis_admin(args: &[&str]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock =
        tokio::net::TcpStream::connect(format!("{}:{}", var("REDIS_HOST"), var("REDIS_PORT")))
            .await
            .unwrap();
    let mut cmd = String::new();
    let mut push = |parts: &[&str]| {
        cmd.push_str(&format!("*{}\r\n", parts.len()));
        for p in parts {
            cmd.push_str(&format!("${}\r\n{p}\r\n", p.len()));
        }
    };
    push(&["AUTH", &var("VAULTPOOL_REDIS_ADMIN_PASSWORD")]);
    push(args);
    sock.write_all(cmd.as_bytes()).await.unwrap();
    // Read until both replies are in (the first is +OK).
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = tokio::time::timeout(Duration::from_millis(200), sock.read(&mut buf)).await;
        match n {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break,
            Err(_) if !out.is_empty() => break,
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "redis admin command timed out");
    }
    let text = String::from_utf8_lossy(&out).to_string();
    text.strip_prefix("+OK\r\n").unwrap_or(&text).to_string()
}

/// Which of `users` exist as Redis ACL users.
pub async fn redis_users_alive(users: &[String]) -> Vec<String> {
    let list = redis_admin(&["ACL", "USERS"]).await;
    users
        .iter()
        .filter(|u| list.lines().any(|l| l == u.as_str()))
        .cloned()
        .collect()
}

/// SET then GET `key` on a pooled connection; the error names the step.
#[cfg(feature = "redis")]
pub async fn redis_set_get(
    pool: &vaultpool::redis::VaultRedisPool,
    key: &str,
) -> Result<(), String> {
    use vaultpool::redis::redis::AsyncCommands;
    let mut conn = pool.get().await.map_err(|e| format!("get: {e}"))?;
    let _: () = conn
        .set(key, "v")
        .await
        .map_err(|e| format!("SET (gen {}): {e}", conn.generation().0))?;
    let v: String = conn.get(key).await.map_err(|e| format!("GET: {e}"))?;
    if v != "v" {
        return Err(format!("read back {v:?}"));
    }
    Ok(())
}

/// `tasks` loops of [`redis_set_get`] on keys `app:{prefix}-{i}` until `stop`: the
/// SET+GET pairs that succeeded and the errors of those that failed.
#[cfg(feature = "redis")]
pub fn spawn_redis_load(
    pool: &vaultpool::redis::VaultRedisPool,
    tasks: usize,
    prefix: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    use std::sync::atomic::Ordering;
    let pool = pool.clone();
    tokio::spawn(async move {
        let loops: Vec<_> = (0..tasks)
            .map(|i| {
                let (pool, stop) = (pool.clone(), stop.clone());
                tokio::spawn(async move {
                    let (key, mut ok, mut errors) = (format!("app:{prefix}-{i}"), 0, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        match redis_set_get(&pool, &key).await {
                            Ok(()) => ok += 1,
                            Err(e) => errors.push(e),
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    (ok, errors)
                })
            })
            .collect();
        let (mut ok, mut errors) = (0, Vec::new());
        for l in loops {
            let (o, e) = l.await.unwrap();
            ok += o;
            errors.extend(e);
        }
        (ok, errors)
    })
}
