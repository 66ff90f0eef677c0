//! The local stack (scripts/stack.sh): its env file, clients for its Vault, names and
//! ports for test objects.

use super::*;

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

pub fn env_file() -> PathBuf {
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

pub fn read_env(path: &PathBuf) -> Option<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

pub fn port_open(addr: &str) -> bool {
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

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// CA files of the test's own TLS servers, by address.
static TRUSTED: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());

/// Trust `ca` (a PEM file) for requests to `addr` made by [`vault_write`].
pub fn trust_ca(addr: &str, ca: &std::path::Path) {
    TRUSTED
        .lock()
        .unwrap()
        .push((addr.to_owned(), ca.to_owned()));
}

/// An HTTP client for `addr`: trusting its registered CA, if any.
pub fn http_for(addr: &str) -> reqwest::Client {
    let ca = TRUSTED
        .lock()
        .unwrap()
        .iter()
        .find(|(a, _)| a == addr)
        .map(|(_, ca)| ca.clone());
    match ca {
        Some(ca) => reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap()])
            .build()
            .unwrap(),
        None => reqwest::Client::new(),
    }
}

pub async fn vault_write(
    addr: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let r = http_for(addr)
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

/// The engine's default policy with retries capped at 1 s, so tests heal quickly.
pub fn fast_policy() -> vaultpool::lease::Policy {
    let mut p = vaultpool::lease::Policy::default();
    p.retry_max = Duration::from_secs(1);
    p
}

/// Poll `done` every 50 ms until it holds; fail the test with `what` after `within`.
pub async fn eventually(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} (waited {within:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
