//! The stack's PostgreSQL: admin connections, database roles of a test's own, what is
//! left behind, and the small pool the fault tests share.

use super::*;

/// A superuser connection to the stack's PostgreSQL (database `db`).
pub async fn pg_admin(db: &str) -> tokio_postgres::Client {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(var("PGHOST"))
        .port(var("PGPORT").parse().unwrap())
        .user("postgres")
        .password(var("VAULTPOOL_PG_SUPER_PASSWORD"))
        .dbname(db);
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .expect("pg admin connect");
    tokio::spawn(conn);
    client
}

pub async fn pg_role_exists(name: &str) -> bool {
    let pg = pg_admin("postgres").await;
    let rows = pg
        .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .unwrap();
    !rows.is_empty()
}

/// The creation and revocation statements the stack uses (see scripts/stack.sh).
pub fn pg_statements() -> (String, String) {
    let creation = r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'; GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{{name}}"; GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{{name}}";"#;
    let revocation = r#"GRANT "{{name}}" TO vault_admin; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}'; REASSIGN OWNED BY "{{name}}" TO app_owner; DROP OWNED BY "{{name}}"; DROP ROLE IF EXISTS "{{name}}";"#;
    (creation.to_string(), revocation.to_string())
}

/// Every lease of `role` revoked within 10 s (builds refused, pools closed); panics
/// naming those left behind.
pub async fn assert_leases_gone(role: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = leases_of(role).await;
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "leases of {role} left behind: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A database role of the test's own on the stack's Vault (named `test-…`, which the
/// immune-system policy may lease), so revoke-prefix and counting stay per test.
pub async fn create_role(ttl: &str, max_ttl: &str) -> String {
    let name = format!("test-{}", unique());
    vault_write(
        &var("VAULT_ADDR"),
        &var("VAULTPOOL_ROOT_TOKEN"),
        reqwest::Method::POST,
        &format!("database/roles/{name}"),
        pg_role(ttl, max_ttl),
    )
    .await;
    name
}

/// A database role on `adaptive_immunity` with the stack's statements.
pub fn pg_role(ttl: &str, max_ttl: &str) -> serde_json::Value {
    let (creation, revocation) = pg_statements();
    serde_json::json!({
        "db_name": "adaptive_immunity",
        "default_ttl": ttl,
        "max_ttl": max_ttl,
        "creation_statements": creation,
        "revocation_statements": revocation,
    })
}

/// Lease ids Vault still holds under `database/creds/{role}/`.
pub async fn leases_of(role: &str) -> Vec<String> {
    let r = reqwest::Client::new()
        .request(
            reqwest::Method::from_bytes(b"LIST").unwrap(),
            format!(
                "{}/v1/sys/leases/lookup/database/creds/{role}/",
                var("VAULT_ADDR")
            ),
        )
        .header("X-Vault-Token", var("VAULTPOOL_ROOT_TOKEN"))
        .send()
        .await
        .unwrap();
    if r.status() == reqwest::StatusCode::NOT_FOUND {
        return Vec::new();
    }
    let v: serde_json::Value = r.json().await.unwrap();
    v["data"]["keys"]
        .as_array()
        .map(|a| a.iter().map(|k| k.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Which of `names` exist in pg_roles.
pub async fn roles_alive(pg: &tokio_postgres::Client, names: &[String]) -> Vec<String> {
    let rows = pg
        .query(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY($1)",
            &[&names],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

/// The stack's `adaptive_immunity` database as a tokio-postgres target (no login).
#[cfg(feature = "postgres")]
pub fn pg_target() -> vaultpool::postgres::tokio_postgres::Config {
    let mut c = vaultpool::postgres::tokio_postgres::Config::new();
    c.host(var("PGHOST"))
        .port(var("PGPORT").parse().unwrap())
        .dbname("adaptive_immunity")
        // Plaintext, as the plain pools it is compared with (the stack offers TLS).
        .ssl_mode(vaultpool::postgres::tokio_postgres::config::SslMode::Disable);
    c
}

/// The stack's TLS-only database (`hostssl` only), reached by `host` (its certificate
/// names localhost and 127.0.0.1) at the stack's address.
#[cfg(feature = "postgres")]
pub fn pg_tls_target(host: &str) -> vaultpool::postgres::tokio_postgres::Config {
    let mut c = vaultpool::postgres::tokio_postgres::Config::new();
    c.host(host)
        .hostaddr(var("PGHOST").parse().unwrap())
        .port(var("PGPORT").parse().unwrap())
        .dbname(var("VAULTPOOL_PG_TLS_DB"));
    c
}

/// A pool for `role` on `config` with the TLS settings `tls` (the stack's AppRole).
#[cfg(all(feature = "postgres", feature = "tls"))]
pub async fn build_tls_pool(
    role: &str,
    config: vaultpool::postgres::tokio_postgres::Config,
    tls: vaultpool::tls::PgTls,
) -> vaultpool::Result<vaultpool::postgres::VaultPgPool> {
    vaultpool::postgres::VaultPgPool::builder(role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(config)
        .ssl(tls)
        .build()
        .await
}

/// A 4-connection pool on the stack's `adaptive_immunity` database with quick retries.
#[cfg(feature = "postgres")]
pub async fn small_pool(role: &str, vault: Client) -> vaultpool::postgres::VaultPgPool {
    small_pool_with(role, vault, fast_policy()).await
}

/// [`small_pool`] with a policy of the test's own.
#[cfg(feature = "postgres")]
pub async fn small_pool_with(
    role: &str,
    vault: Client,
    policy: vaultpool::lease::Policy,
) -> vaultpool::postgres::VaultPgPool {
    vaultpool::postgres::VaultPgPool::builder(role)
        .vault(vault)
        .pg_config(pg_target())
        .policy(policy)
        .max_size(4)
        .build()
        .await
        .unwrap()
}

/// The stack's `adaptive_immunity` database reached through `proxy` (started with the
/// PostgreSQL address as upstream), to hold or delay its connections.
#[cfg(feature = "postgres")]
pub fn pg_target_via(proxy: &Proxy) -> vaultpool::postgres::tokio_postgres::Config {
    let (host, port) = proxy
        .addr
        .trim_start_matches("http://")
        .rsplit_once(':')
        .unwrap();
    let mut c = vaultpool::postgres::tokio_postgres::Config::new();
    c.host(host)
        .port(port.parse().unwrap())
        .dbname("adaptive_immunity")
        .ssl_mode(vaultpool::postgres::tokio_postgres::config::SslMode::Disable);
    c
}

/// A proxy in front of the stack's PostgreSQL.
pub async fn pg_proxy() -> Proxy {
    Proxy::start(&format!("{}:{}", var("PGHOST"), var("PGPORT")), "").await
}

/// Whether a session of `pool` is encrypted, as PostgreSQL sees it.
#[cfg(feature = "postgres")]
pub async fn encrypted(pool: &vaultpool::postgres::VaultPgPool) -> bool {
    pool.get()
        .await
        .unwrap()
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}
