//! Test harness: the real local stack (scripts/stack.sh), throwaway OpenBao dev servers
//! for tests that seal or stop Vault, and a tiny TCP server for faults no real server
//! shows (malformed JSON, a hanging socket).
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vaultpool::vault::{Client, ClientBuilder};

/// The stack's env file, as key/value pairs. Starts the stack if it is not running.
pub fn stack() -> &'static HashMap<String, String> {
    static STACK: OnceLock<HashMap<String, String>> = OnceLock::new();
    STACK.get_or_init(|| {
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
