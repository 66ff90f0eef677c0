//! Test harness: the real local stack (scripts/stack.sh), throwaway OpenBao dev servers
//! for tests that seal or stop Vault, and a tiny TCP server for faults no real server
//! shows (malformed JSON, a hanging socket).
#![allow(dead_code, unreachable_pub)]

pub mod scenarios;

use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vaultpool::vault::{Client, ClientBuilder};

/// The stack's env file, as key/value pairs. Starts the stack if it is not running.
/// Also turns on log output when RUST_LOG is set.
pub fn stack() -> &'static HashMap<String, String> {
    static STACK: OnceLock<HashMap<String, String>> = OnceLock::new();
    STACK.get_or_init(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let path = env_file();
        let parsed = read_env(&path);
        let up = parsed.as_ref().is_some_and(|env| {
            port_open(&env["VAULT_ADDR"])
                && port_open(&format!("x://{}:{}", env["PGHOST"], env["PGPORT"]))
        });
        if !up {
            let status = Command::new("bash")
                .arg(repo().join("scripts/stack.sh"))
                .arg("up")
                .status()
                .expect("running scripts/stack.sh up");
            assert!(status.success(), "scripts/stack.sh up failed");
        }
        read_env(&path).expect("the stack wrote no env file")
    })
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_file() -> PathBuf {
    if let Ok(p) = std::env::var("VAULTPOOL_STACK_ENV") {
        return p.into();
    }
    let dir = std::env::var("VAULTPOOL_STACK_DIR").unwrap_or_else(|_| {
        format!(
            "{}/vaultpool-stack",
            std::env::var("TMPDIR").unwrap_or("/tmp".into())
        )
    });
    PathBuf::from(dir).join("stack.env")
}

fn read_env(path: &PathBuf) -> Option<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn port_open(addr: &str) -> bool {
    let hostport = addr
        .split("://")
        .nth(1)
        .unwrap_or(addr)
        .trim_end_matches('/');
    std::net::TcpStream::connect_timeout(&hostport.parse().unwrap(), Duration::from_millis(300))
        .is_ok()
}

pub fn var(key: &str) -> String {
    stack()
        .get(key)
        .unwrap_or_else(|| panic!("{key} missing from the stack env file"))
        .clone()
}

/// A builder pointed at the stack's Vault with test-friendly retry settings.
pub fn builder() -> ClientBuilder {
    Client::builder().address(var("VAULT_ADDR"))
}

pub fn root_client() -> Client {
    builder()
        .token(var("VAULTPOOL_ROOT_TOKEN"))
        .build()
        .unwrap()
}

/// An AppRole client of the stack; `prefix` is e.g. `IMMUNE_SYSTEM`.
pub fn approle_client(prefix: &str) -> Client {
    approle_builder(prefix).build().unwrap()
}

pub fn approle_builder(prefix: &str) -> ClientBuilder {
    builder().app_role(
        var(&format!("{prefix}_ROLE_ID")),
        var(&format!("{prefix}_SECRET_ID")),
    )
}

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

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway `bao server -dev` of the test's own, killed on drop. Use it to seal,
/// unseal or stop Vault without disturbing other tests.
pub struct DevVault {
    child: Child,
    pub addr: String,
    pub unseal_key: String,
    log: PathBuf,
}

impl DevVault {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("vaultpool-devvault-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("bao.log");
        let child = Command::new(var("VAULTPOOL_BAO_BIN"))
            .args([
                "server",
                "-dev",
                "-dev-root-token-id=root",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
                "-dev-no-store-token",
            ])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning bao server -dev");
        let addr = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let unseal_key = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.starts_with("Unseal Key: ")) {
                if port_open(&addr) {
                    break line["Unseal Key: ".len()..].trim().to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "bao dev server did not start: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Self {
            child,
            addr,
            unseal_key,
            log,
        }
    }

    pub fn client(&self) -> ClientBuilder {
        Client::builder().address(&self.addr).token("root")
    }

    async fn admin(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        reqwest::Client::new()
            .put(format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", "root")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn seal(&self) {
        let r = self.admin("sys/seal", serde_json::json!({})).await;
        assert!(r.status().is_success(), "seal: {}", r.status());
    }

    pub async fn unseal(&self) {
        let r = self
            .admin("sys/unseal", serde_json::json!({ "key": self.unseal_key }))
            .await;
        assert!(r.status().is_success(), "unseal: {}", r.status());
    }

    /// Enable the database engine with the stack's Redis and a role `role`.
    pub async fn configure_redis(&self, role: &str, ttl: &str) {
        for (path, body) in [
            (
                "sys/mounts/database",
                serde_json::json!({"type": "database"}),
            ),
            (
                "database/config/redis",
                serde_json::json!({
                    "plugin_name": "redis-database-plugin",
                    "host": var("REDIS_HOST"),
                    "port": var("REDIS_PORT").parse::<u16>().unwrap(),
                    "username": "default",
                    "password": var("VAULTPOOL_REDIS_ADMIN_PASSWORD"),
                    "tls": false,
                    "allowed_roles": "*",
                }),
            ),
            (
                &format!("database/roles/{role}"),
                serde_json::json!({
                    "db_name": "redis",
                    "default_ttl": ttl,
                    "max_ttl": "24h",
                    "creation_statements": REDIS_RULES,
                }),
            ),
        ] {
            let r = self.admin(path, body).await;
            assert!(r.status().is_success(), "{path}: {}", r.status());
        }
    }

    pub async fn kv_put(&self, path: &str, data: serde_json::Value) {
        let r = self
            .admin(
                &format!("secret/data/{path}"),
                serde_json::json!({ "data": data }),
            )
            .await;
        assert!(r.status().is_success(), "kv put: {}", r.status());
    }
}

impl Drop for DevVault {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Write a KV v2 secret on the stack's Vault with the root token.
pub async fn kv_put(path: &str, data: serde_json::Value) {
    let r = reqwest::Client::new()
        .put(format!("{}/v1/secret/data/{path}", var("VAULT_ADDR")))
        .header("X-Vault-Token", var("VAULTPOOL_ROOT_TOKEN"))
        .json(&serde_json::json!({ "data": data }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "kv put {path}: {}", r.status());
}

/// The stack with its Kafka broker (built and started on first use).
pub fn kafka() -> &'static str {
    static UP: OnceLock<String> = OnceLock::new();
    UP.get_or_init(|| {
        let has_kafka = stack()
            .get("KAFKA_BOOTSTRAP")
            .is_some_and(|addr| std::net::TcpStream::connect(addr).is_ok());
        if !has_kafka {
            let status = Command::new("bash")
                .arg(repo().join("scripts/stack.sh"))
                .args(["up", "--kafka"])
                .status()
                .unwrap();
            assert!(status.success(), "scripts/stack.sh up --kafka failed");
        }
        let env =
            std::fs::read_to_string(format!("{}/stack.env", var("VAULTPOOL_STACK_DIR"))).unwrap();
        env.lines()
            .find_map(|l| l.strip_prefix("KAFKA_BOOTSTRAP="))
            .expect("KAFKA_BOOTSTRAP in the env file")
            .to_owned()
    })
}

/// The KV data of Kafka SASL settings for the stack's broker (plaintext SASL on loopback).
pub fn kafka_secret(
    bootstrap: &str,
    user: &str,
    password: &str,
    mechanism: &str,
) -> serde_json::Value {
    serde_json::json!({
        "bootstrap_servers": bootstrap,
        "sasl_username": user,
        "sasl_password": password,
        "sasl_mechanism": mechanism,
        "security_protocol": "SASL_PLAINTEXT",
    })
}

/// Run scripts/kafka_admin.py (broker-side admin over the Kafka protocol).
pub fn kafka_admin(args: &[&str]) -> String {
    let dir = var("VAULTPOOL_STACK_DIR");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -a; . {dir}/stack.env; set +a; exec python3 {} \"$@\"",
            repo().join("scripts/kafka_admin.py").display()
        ))
        .arg("kafka_admin")
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() || args[0] == "check",
        "kafka_admin {}: {}",
        args[0],
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A TCP proxy in front of a real server, for faults the server cannot show by itself:
/// latency (`delay_ms` before each client→server chunk; a huge value hangs) and a log of
/// when each request whose first line contains `marker` went through.
pub struct Proxy {
    pub addr: String,
    pub delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    hits: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
}

impl Proxy {
    pub async fn start(upstream: &str, marker: &'static str) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let hits = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (delay, log) = (delay_ms.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (upstream, delay, log) = (upstream.clone(), delay.clone(), log.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return; // server down: the client sees the connection close
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let wait = delay.load(Ordering::Relaxed);
                            if wait > 0 {
                                tokio::time::sleep(Duration::from_millis(wait)).await;
                            }
                            let chunk = &buf[..n];
                            let text = String::from_utf8_lossy(&chunk[..n.min(256)]);
                            if text.lines().next().is_some_and(|l| l.contains(marker)) {
                                log.lock().unwrap().push(Instant::now());
                            }
                            if sw.write_all(chunk).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Self {
            addr,
            delay_ms,
            hits,
        }
    }

    /// When each marked request went through, in order.
    pub fn hits(&self) -> Vec<Instant> {
        self.hits.lock().unwrap().clone()
    }
}

/// A one-line unique suffix for test objects.
pub fn unique() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// A local TCP server that answers every connection with `response` bytes (or, if
/// `None`, accepts and never answers). For faults a real Vault cannot show.
pub async fn tiny_server(response: Option<&'static [u8]>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = sock.read(&mut buf).await;
                match response {
                    Some(bytes) => {
                        let _ = sock.write_all(bytes).await;
                        let _ = sock.shutdown().await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(3600)).await,
                }
            });
        }
    });
    addr
}

/// The creation and revocation statements the stack uses (see scripts/stack.sh).
pub fn pg_statements() -> (String, String) {
    let creation = r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'; GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{{name}}"; GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{{name}}";"#;
    let revocation = r#"GRANT "{{name}}" TO vault_admin; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}'; REASSIGN OWNED BY "{{name}}" TO app_owner; DROP OWNED BY "{{name}}"; DROP ROLE IF EXISTS "{{name}}";"#;
    (creation.to_string(), revocation.to_string())
}

pub async fn vault_write(
    addr: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let r = reqwest::Client::new()
        .request(method, format!("{addr}/v1/{path}"))
        .header("X-Vault-Token", token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
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

/// `sys/init` with one key share: (unseal key, root token).
pub async fn init_vault(addr: &str) -> (String, String) {
    let init: serde_json::Value = reqwest::Client::new()
        .put(format!("{addr}/v1/sys/init"))
        .json(&serde_json::json!({"secret_shares": 1, "secret_threshold": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        init["keys"][0].as_str().unwrap().to_owned(),
        init["root_token"].as_str().unwrap().to_owned(),
    )
}

/// Mount the database secrets engine on a Vault of the test's own, connected to the
/// stack's `adaptive_immunity` database, with one role.
pub async fn configure_database_engine(
    addr: &str,
    token: &str,
    role: &str,
    ttl: &str,
    max_ttl: &str,
) {
    let put = async |path: &str, body: serde_json::Value| {
        vault_write(addr, token, reqwest::Method::POST, path, body).await;
    };
    put(
        "sys/mounts/database",
        serde_json::json!({"type": "database"}),
    )
    .await;
    put(
        "database/config/adaptive_immunity",
        serde_json::json!({
            "plugin_name": "postgresql-database-plugin",
            "connection_url": format!("postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/adaptive_immunity?sslmode=disable", var("PGPORT")),
            "username": "vault_admin",
            "password": var("VAULTPOOL_PG_VAULT_ADMIN_PASSWORD"),
            "password_authentication": "scram-sha-256",
            "allowed_roles": "*",
            "max_open_connections": 4,
        }),
    )
    .await;
    put(&format!("database/roles/{role}"), pg_role(ttl, max_ttl)).await;
}

/// A single-node OpenBao with raft storage of the test's own: it can be killed and
/// started again with its leases intact (a dev server forgets everything). Configured
/// with the database engine on the stack's PostgreSQL and one role.
pub struct PersistentVault {
    child: Option<Child>,
    pub addr: String,
    pub root_token: String,
    unseal_key: String,
    dir: PathBuf,
    port: u16,
}

impl PersistentVault {
    pub async fn start(role: &str, ttl: &str, max_ttl: &str) -> Self {
        let port = free_port();
        let cluster_port = free_port();
        let dir = std::env::temp_dir().join(format!("vaultpool-pvault-{}", unique()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        // OpenBao 2.x has no file storage: single-node raft keeps state across restarts.
        // `performance_multiplier = 1` keeps the election after an unseal or a restart at
        // about a second instead of up to 15 s (INFRA.md §5).
        std::fs::write(
            dir.join("config.hcl"),
            format!(
                r#"storage "raft" {{
  path = "{data}"
  node_id = "n1"
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{cluster_port}"
"#,
                data = dir.join("data").display()
            ),
        )
        .unwrap();
        let mut v = Self {
            child: None,
            addr: format!("http://127.0.0.1:{port}"),
            root_token: String::new(),
            unseal_key: String::new(),
            dir,
            port,
        };
        v.spawn().await;
        (v.unseal_key, v.root_token) = init_vault(&v.addr).await;
        v.unseal().await;
        configure_database_engine(&v.addr, &v.root_token, role, ttl, max_ttl).await;
        v
    }

    async fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("bao.log")).unwrap();
        let child = Command::new(var("VAULTPOOL_BAO_BIN"))
            .args([
                "server",
                &format!("-config={}", self.dir.join("config.hcl").display()),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning bao server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !port_open(&self.addr) {
            assert!(Instant::now() < deadline, "bao server did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Seal it (root token); calls then answer 503 "Vault is sealed" until `unseal`.
    pub async fn seal(&self) {
        vault_write(
            &self.addr,
            &self.root_token,
            reqwest::Method::PUT,
            "sys/seal",
            serde_json::json!({}),
        )
        .await;
    }

    pub async fn unseal(&self) {
        let r = reqwest::Client::new()
            .put(format!("{}/v1/sys/unseal", self.addr))
            .json(&serde_json::json!({ "key": self.unseal_key }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        // Wait until it serves (active).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = reqwest::Client::new()
                .get(format!("{}/v1/sys/health", self.addr))
                .send()
                .await
                .is_ok_and(|r| r.status() == reqwest::StatusCode::OK);
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "vault did not become active");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9: connections are refused until `restart`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port and storage, and unseal.
    pub async fn restart(&mut self) {
        self.spawn().await;
        self.unseal().await;
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A root client for this server with a 1 s breaker cooldown, so tests that kill and
    /// restart it see it again quickly.
    pub fn client(&self) -> Client {
        let mut breaker = vaultpool::vault::BreakerConfig::default();
        breaker.cooldown = Duration::from_secs(1);
        Client::builder()
            .address(&self.addr)
            .token(&self.root_token)
            .breaker(breaker)
            .request_timeout(Duration::from_secs(2))
            .build()
            .unwrap()
    }
}

/// The stack's `adaptive_immunity` database as a tokio-postgres target (no login).
#[cfg(feature = "postgres")]
pub fn pg_target() -> vaultpool::postgres::tokio_postgres::Config {
    let mut c = vaultpool::postgres::tokio_postgres::Config::new();
    c.host(var("PGHOST"))
        .port(var("PGPORT").parse().unwrap())
        .dbname("adaptive_immunity");
    c
}

/// The engine's default policy with retries capped at 1 s, so tests heal quickly.
pub fn fast_policy() -> vaultpool::lease::Policy {
    let mut p = vaultpool::lease::Policy::default();
    p.retry_max = Duration::from_secs(1);
    p
}

impl Drop for PersistentVault {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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

/// What a query load saw: queries that succeeded, the errors of those that failed, and
/// the slowest checkout.
#[cfg(feature = "postgres")]
pub type LoadResult = (u64, Vec<String>, Duration);

/// `tasks` workers running `SELECT count(*) FROM items` through `pool` until `stop`.
#[cfg(feature = "postgres")]
pub fn query_load(
    pool: &vaultpool::postgres::VaultPgPool,
    tasks: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<LoadResult>> {
    (0..tasks)
        .map(|_| {
            let (pool, stop) = (pool.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed, mut slowest) = (0u64, Vec::new(), Duration::ZERO);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    let result = async {
                        let c = pool.get().await.map_err(|e| e.to_string())?;
                        slowest = slowest.max(t.elapsed());
                        c.query_one("SELECT count(*) FROM items", &[])
                            .await
                            .map_err(|e| e.to_string())
                    }
                    .await;
                    match result {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (ok, failed, slowest)
            })
        })
        .collect()
}

/// Wait for the workers of [`query_load`] and add up what they saw.
#[cfg(feature = "postgres")]
pub async fn finish_load(workers: Vec<tokio::task::JoinHandle<LoadResult>>) -> LoadResult {
    let (mut ok, mut failed, mut slowest) = (0, Vec::new(), Duration::ZERO);
    for w in workers {
        let (o, f, s) = w.await.unwrap();
        ok += o;
        failed.extend(f);
        slowest = slowest.max(s);
    }
    (ok, failed, slowest)
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
