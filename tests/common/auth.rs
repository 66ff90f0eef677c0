//! Auth methods on the stack's OpenBao, each on a mount of the test's own: JWTs signed
//! with a key pair the test generates (openssl CLI), a stand-in for the Kubernetes
//! TokenReview API (the one part no real server here can play), and `bao agent` /
//! `bao proxy` processes with AppRole auto-auth.

use super::*;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The stack's immune-system policy: PostgreSQL test roles, revoke, lookup.
pub const IMMUNE_POLICY: &str = r#"
path "database/creds/test-*"  { capabilities = ["read"] }
path "sys/leases/revoke/database/creds/*" { capabilities = ["update"] }
path "sys/leases/lookup"        { capabilities = ["update"] }
"#;

/// Enable auth method `kind` at `path` on the stack's Vault.
pub async fn enable_auth(kind: &str, path: &str) {
    root_write(
        reqwest::Method::POST,
        &format!("sys/auth/{path}"),
        serde_json::json!({ "type": kind }),
    )
    .await;
}

/// A write with the stack's root token.
pub async fn root_write(
    method: reqwest::Method,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    vault_write(
        &var("VAULT_ADDR"),
        &var("VAULTPOOL_ROOT_TOKEN"),
        method,
        path,
        body,
    )
    .await
}

/// The policy `name` with [`IMMUNE_POLICY`] on the stack's Vault.
pub async fn immune_policy(name: &str) {
    root_write(
        reqwest::Method::PUT,
        &format!("sys/policies/acl/{name}"),
        serde_json::json!({ "policy": IMMUNE_POLICY }),
    )
    .await;
}

/// base64url without padding (JWT encoding).
pub fn b64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

/// An RSA key pair for signing JWTs: (dir, private key PEM path, public key PEM text).
pub fn jwt_keys() -> (PathBuf, PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("vaultpool-jwt-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key.pem");
    let ok = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&key)
        .arg("2048")
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl genrsa");
    let public = Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&key)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(public.status.success(), "openssl rsa -pubout");
    (dir, key, String::from_utf8(public.stdout).unwrap())
}

/// A JWT (RS256) with `claims`, signed with the private key at `key`.
pub fn sign_jwt(key: &std::path::Path, claims: &serde_json::Value) -> String {
    let header = b64url(br#"{"alg":"RS256","typ":"JWT"}"#);
    let payload = b64url(claims.to_string().as_bytes());
    let input = format!("{header}.{payload}");
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl dgst -sign");
    format!("{input}.{}", b64url(&out.stdout))
}

/// Seconds since the epoch.
pub fn epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Write `text` to `path` atomically (a rename, as kubelet and Vault Agent do), mode
/// `mode`.
pub fn write_atomically(path: &std::path::Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension(format!("tmp{}", unique()));
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A stand-in for the Kubernetes API's TokenReview endpoint (`POST
/// /apis/authentication.k8s.io/v1/tokenreviews`), which OpenBao's kubernetes auth
/// method calls to check a service-account token. No kube-apiserver can be installed
/// here; everything else in the login is the real OpenBao. It authenticates tokens
/// whose JWT claims name `namespace`/`name`/`uid` (as the API server would for tokens
/// it issued) unless the token was revoked with [`TokenReview::revoke`], and counts
/// the reviews.
pub struct TokenReview {
    pub addr: String,
    pub reviews: Arc<AtomicU64>,
    /// How long each review waits before it answers (a slow API server), in ms.
    pub delay_ms: Arc<AtomicU64>,
    revoked: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenReview {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let reviews = Arc::new(AtomicU64::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let revoked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let (r, v, d) = (reviews.clone(), revoked.clone(), delay_ms.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (r, v, d) = (r.clone(), v.clone(), d.clone());
                tokio::spawn(async move {
                    let _ = serve_review(sock, &r, &v, &d).await;
                });
            }
        });
        Self {
            addr,
            reviews,
            delay_ms,
            revoked,
            task,
        }
    }

    /// Tokens from now on reviewed as not authenticated.
    pub fn revoke(&self, token: &str) {
        self.revoked.lock().unwrap().push(token.to_owned());
    }
}

impl Drop for TokenReview {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_review(
    mut sock: tokio::net::TcpStream,
    reviews: &AtomicU64,
    revoked: &std::sync::Mutex<Vec<String>>,
    delay_ms: &AtomicU64,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let body = loop {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                break buf[end + 4..end + 4 + len].to_vec();
            }
        }
    };
    reviews.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(delay_ms.load(Ordering::Relaxed))).await;
    let review: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let claims = token
        .split('.')
        .nth(1)
        .and_then(b64url_decode)
        .and_then(|c| serde_json::from_slice::<serde_json::Value>(&c).ok())
        .unwrap_or_default();
    let k8s = &claims["kubernetes.io"];
    let ok = !revoked.lock().unwrap().contains(&token) && k8s["namespace"].is_string();
    let status = if ok {
        serde_json::json!({
            "authenticated": true,
            "user": {
                "username": format!(
                    "system:serviceaccount:{}:{}",
                    k8s["namespace"].as_str().unwrap_or_default(),
                    k8s["serviceaccount"]["name"].as_str().unwrap_or_default()
                ),
                "uid": k8s["serviceaccount"]["uid"],
                "groups": ["system:serviceaccounts"],
            },
            "audiences": review["spec"]["audiences"],
        })
    } else {
        serde_json::json!({ "authenticated": false, "error": "token has been invalidated" })
    };
    let answer = serde_json::json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": review["spec"],
        "status": status,
    })
    .to_string();
    sock.write_all(
        format!(
            "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
            answer.len()
        )
        .as_bytes(),
    )
    .await
}

fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// A `bao agent` or `bao proxy` of the test's own, killed on drop: `prepare` writes its
/// config (with `{dir}` replaced by its temp dir) so that files it reads can be put
/// there, `spawn` starts it.
pub struct BaoHelper {
    mode: String,
    child: Option<Child>,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl BaoHelper {
    pub fn prepare(mode: &str, config: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vaultpool-{mode}-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.hcl"),
            config.replace("{dir}", dir.to_str().unwrap()),
        )
        .unwrap();
        let log = dir.join("out.log");
        Self {
            mode: mode.to_owned(),
            child: None,
            dir,
            log,
        }
    }

    pub fn spawn(mut self) -> Self {
        let out = std::fs::File::create(&self.log).unwrap();
        self.child = Some(
            Command::new(var("VAULTPOOL_BAO_BIN"))
                .arg(&self.mode)
                .arg(format!("-config={}", self.dir.join("config.hcl").display()))
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap(),
        );
        self
    }

    /// What it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BaoHelper {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A JWT auth mount of the test's own on the stack's Vault: a key pair, role `app`
/// (`bound_audiences = vaultpool`, `user_claim = sub`) with tokens of `token_ttl`
/// renewable to `token_max_ttl`.
pub struct JwtMount {
    pub path: String,
    pub dir: PathBuf,
    key: PathBuf,
}

impl JwtMount {
    pub async fn new(token_ttl: &str, token_max_ttl: &str) -> Self {
        let path = format!("jwt-{}", unique());
        enable_auth("jwt", &path).await;
        let policy = format!("policy-{path}");
        immune_policy(&policy).await;
        let (dir, key, public) = jwt_keys();
        root_write(
            reqwest::Method::POST,
            &format!("auth/{path}/config"),
            serde_json::json!({ "jwt_validation_pubkeys": [public] }),
        )
        .await;
        root_write(
            reqwest::Method::POST,
            &format!("auth/{path}/role/app"),
            serde_json::json!({
                "role_type": "jwt",
                "user_claim": "sub",
                "bound_audiences": ["vaultpool"],
                "token_policies": [policy],
                "token_ttl": token_ttl,
                "token_max_ttl": token_max_ttl,
            }),
        )
        .await;
        Self { path, dir, key }
    }

    /// A JWT for audience `aud` ending at `exp` (epoch seconds), `n` its id.
    pub fn jwt(&self, aud: &str, exp: u64, n: u64) -> String {
        sign_jwt(
            &self.key,
            &serde_json::json!({
                "sub": "svc", "aud": aud, "iat": epoch(), "exp": exp, "jti": n.to_string()
            }),
        )
    }

    /// `jwt` written to a new file in the mount's dir (mode 0600); its path.
    pub fn file(&self, jwt: &str) -> PathBuf {
        let file = self.dir.join(format!("jwt-{}", unique()));
        write_atomically(&file, jwt, 0o600);
        file
    }
}

impl Drop for JwtMount {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Kubernetes auth mount of the test's own on the stack's Vault, reviewing tokens at
/// `review` (see [`TokenReview`]): role `app` for service account `app` in namespace
/// `payments`, tokens of `token_ttl` renewable to `token_max_ttl`. Its path.
pub async fn kubernetes_mount(
    review: &TokenReview,
    token_ttl: &str,
    token_max_ttl: &str,
) -> String {
    let path = format!("kubernetes-{}", unique());
    enable_auth("kubernetes", &path).await;
    let policy = format!("policy-{path}");
    immune_policy(&policy).await;
    root_write(
        reqwest::Method::POST,
        &format!("auth/{path}/config"),
        serde_json::json!({
            "kubernetes_host": review.addr,
            "disable_local_ca_jwt": true,
            // Required with disable_local_ca_jwt; unused on the stand-in's plain HTTP.
            "kubernetes_ca_cert": std::fs::read_to_string(var("VAULTPOOL_PG_CA")).unwrap(),
        }),
    )
    .await;
    root_write(
        reqwest::Method::POST,
        &format!("auth/{path}/role/app"),
        serde_json::json!({
            "bound_service_account_names": ["app"],
            "bound_service_account_namespaces": ["payments"],
            "token_policies": [policy],
            "token_ttl": token_ttl,
            "token_max_ttl": token_max_ttl,
        }),
    )
    .await;
    path
}

/// A projected service-account token for `payments/app` as kubelet writes it (the
/// nested `kubernetes.io` claims), signed with `key`; `n` its id.
pub fn service_account_token(key: &std::path::Path, n: u64) -> String {
    sign_jwt(
        key,
        &serde_json::json!({
            "iss": "https://kubernetes.default.svc",
            "sub": "system:serviceaccount:payments:app",
            "aud": ["https://kubernetes.default.svc"],
            "iat": epoch(),
            "exp": epoch() + 3600,
            "jti": format!("sa-{n}"),
            "kubernetes.io": {
                "namespace": "payments",
                "serviceaccount": { "name": "app", "uid": "6c9b2f5e-0000-4000-8000-000000000001" },
            },
        }),
    )
}

/// TLS-certificate auth on `tls` (a TLS dev server): cert role `app` trusting the
/// stack's CA (which signed the stack's client certificate), tokens of `token_ttl`
/// renewable to `token_max_ttl`, policy [`IMMUNE_POLICY`] for roles named `cert-*`.
pub async fn cert_mount(tls: &TlsDev, token_ttl: &str, token_max_ttl: &str) {
    let ca = std::fs::read_to_string(var("VAULTPOOL_PG_CA")).unwrap();
    cert_mount_trusting(tls, &ca, token_ttl, token_max_ttl).await;
}

/// [`cert_mount`] with a cert role `app` trusting the CA certificate(s) in `ca_pem`.
pub async fn cert_mount_trusting(tls: &TlsDev, ca_pem: &str, token_ttl: &str, token_max_ttl: &str) {
    let write = async |method, path: &str, body| {
        vault_write(&tls.1, "root", method, path, body).await;
    };
    write(
        reqwest::Method::POST,
        "sys/auth/cert",
        serde_json::json!({"type": "cert"}),
    )
    .await;
    write(
        reqwest::Method::PUT,
        "sys/policies/acl/app",
        serde_json::json!({ "policy": IMMUNE_POLICY.replace("test-*", "cert-*") }),
    )
    .await;
    cert_role_trusting(tls, ca_pem, token_ttl, token_max_ttl).await;
}

/// The cert role `app` of [`cert_mount_trusting`] (re)written to trust `ca_pem`.
pub async fn cert_role_trusting(tls: &TlsDev, ca_pem: &str, token_ttl: &str, token_max_ttl: &str) {
    vault_write(
        &tls.1,
        "root",
        reqwest::Method::POST,
        "auth/cert/certs/app",
        serde_json::json!({
            "certificate": ca_pem,
            "token_policies": ["app"],
            "token_ttl": token_ttl,
            "token_max_ttl": token_max_ttl,
        }),
    )
    .await;
}

/// A self-signed certificate (no cert role trusts it) and its key, in a new temp dir:
/// (dir, cert, key).
pub fn stranger_certificate() -> (PathBuf, PathBuf, PathBuf) {
    let (dir, key, _) = jwt_keys();
    let cert = dir.join("stranger.pem");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-new",
            "-days",
            "1",
            "-subj",
            "/CN=stranger",
            "-key",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .status()
        .unwrap();
    assert!(made.success(), "openssl req -x509");
    (dir, cert, key)
}

/// An AppRole of its own on the stack's Vault ([`IMMUNE_POLICY`]) whose tokens live
/// `token_ttl`, renewable to `token_max_ttl`, written as role_id / secret_id files in
/// `dir` for an Agent or Proxy to log in with ([`AUTO_AUTH`]).
pub async fn approle_files(dir: &std::path::Path, ttls: (&str, &str)) {
    let name = format!("agent-{}", unique());
    let (role_id, secret_id) = approle(
        &var("VAULT_ADDR"),
        &var("VAULTPOOL_ROOT_TOKEN"),
        &name,
        IMMUNE_POLICY,
        ttls,
    )
    .await;
    std::fs::write(dir.join("role_id"), role_id).unwrap();
    std::fs::write(dir.join("secret_id"), secret_id).unwrap();
}

/// The `auto_auth` stanza of an Agent's or Proxy's config: AppRole from the files
/// [`approle_files`] writes in `{dir}`; `SINK` is replaced by a sink (or nothing).
pub const AUTO_AUTH: &str = r#"
auto_auth {
  method "approle" {
    config = {
      role_id_file_path = "{dir}/role_id"
      secret_id_file_path = "{dir}/secret_id"
      remove_secret_id_file_after_reading = false
    }
  }
  SINK
}
"#;
