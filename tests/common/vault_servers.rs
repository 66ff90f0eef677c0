//! OpenBao servers of a test's own: a dev server to seal or stop, a raft-backed one that
//! survives a restart.

use super::*;

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
            if let Some(line) = text.lines().find(|l| l.starts_with("Unseal Key: "))
                && port_open(&addr)
            {
                break line["Unseal Key: ".len()..].trim().to_string();
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

impl Drop for PersistentVault {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An AppRole `name` on the Vault at `addr` (enabling the auth method if needed) whose
/// tokens carry the policy `policy_hcl` (plus Vault's default policy) and live
/// `token_ttl`/`token_max_ttl`. Returns its role_id and a secret_id.
pub async fn approle(
    addr: &str,
    root: &str,
    name: &str,
    policy_hcl: &str,
    (token_ttl, token_max_ttl): (&str, &str),
) -> (String, String) {
    use reqwest::Method;
    let mounts = reqwest::Client::new()
        .get(format!("{addr}/v1/sys/auth"))
        .header("X-Vault-Token", root)
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    if mounts.get("approle/").is_none() && mounts["data"].get("approle/").is_none() {
        vault_write(
            addr,
            root,
            Method::POST,
            "sys/auth/approle",
            serde_json::json!({"type": "approle"}),
        )
        .await;
    }
    vault_write(
        addr,
        root,
        Method::PUT,
        &format!("sys/policies/acl/{name}"),
        serde_json::json!({ "policy": policy_hcl }),
    )
    .await;
    vault_write(
        addr,
        root,
        Method::POST,
        &format!("auth/approle/role/{name}"),
        serde_json::json!({ "token_policies": [name], "token_ttl": token_ttl, "token_max_ttl": token_max_ttl }),
    )
    .await;
    let role_id = vault_write(
        addr,
        root,
        Method::GET,
        &format!("auth/approle/role/{name}/role-id"),
        serde_json::json!({}),
    )
    .await;
    let secret_id = vault_write(
        addr,
        root,
        Method::POST,
        &format!("auth/approle/role/{name}/secret-id"),
        serde_json::json!({}),
    )
    .await;
    (
        role_id["data"]["role_id"].as_str().unwrap().to_owned(),
        secret_id["data"]["secret_id"].as_str().unwrap().to_owned(),
    )
}

/// `bao server -dev -dev-tls`: (process, https address, the dir holding `vault-ca.pem`).
/// Its CA is registered, so [`vault_write`] to it is trusted.
pub struct TlsDev(pub Child, pub String, pub std::path::PathBuf);

impl TlsDev {
    pub async fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("vaultpool-tls-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(var("VAULTPOOL_BAO_BIN"))
            .args([
                "server",
                "-dev",
                "-dev-tls",
                &format!("-dev-tls-cert-dir={}", dir.display()),
                "-dev-root-token-id=root",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
                "-dev-no-store-token",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let ca = dir.join("vault-ca.pem");
        for _ in 0..400 {
            if ca.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ca.exists(), "no CA written in {}", dir.display());
        let addr = format!("https://127.0.0.1:{port}");
        trust_ca(&addr, &ca);
        Self(child, addr, dir)
    }
}

impl Drop for TlsDev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.2);
    }
}
