//! Every way to log in to Vault, against the real `bao` binary: JWT (a key pair the test
//! generates), Kubernetes (OpenBao's real kubernetes auth method; only the Kubernetes
//! API's TokenReview endpoint it calls is a stand-in, see `common::TokenReview`), TLS
//! certificates (a TLS dev server), Vault Agent (AppRole auto-auth, a file sink) and
//! Vault Proxy (`use_auto_auth_token`). Each leases, renews, rotates and revokes under
//! a query load with short tokens, so that logins and token replacements happen during
//! the run.
#![cfg(feature = "postgres")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use vaultpool::ErrorKind;
use vaultpool::postgres::VaultPgPool;
use vaultpool::vault::{AuthMethod, Client};

/// What one run under load saw (printed for the notes; some fields asserted on).
#[derive(Debug)]
#[allow(dead_code)] // read through Debug
struct Figures {
    queries: u64,
    failed: u64,
    rotations: u64,
    renewals: u64,
    /// The client's logins at the end (0 for methods that do not log in).
    logins: u64,
    /// Distinct token accessors the client used.
    tokens: usize,
}

/// A pool through `client` on `role` (`None`: a role of its own on the stack's Vault,
/// 4 s leases renewable to 8 s: renewals and rotations every few seconds), 4 query loops
/// for `run_for`, calling `during` every second with the pool's lease status; then close, and (on the stack) every
/// lease of the role must be revoked.
async fn under_load(
    what: &str,
    client: Client,
    role: Option<String>,
    run_for: Duration,
    mut during: impl FnMut(u64, &vaultpool::lease::Status),
) -> Figures {
    let on_stack = role.is_none();
    let role = match role {
        Some(role) => role,
        None => create_role("4s", "8s").await,
    };
    let pool = VaultPgPool::builder(&role)
        .vault(client.clone())
        .pg_config(pg_target())
        .policy(fast_policy())
        .max_size(4)
        .build()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(&pool, 4, stop.clone());
    let started = Instant::now();
    let mut accessors = std::collections::HashSet::new();
    let mut second = 0;
    while started.elapsed() < run_for {
        if let Some(t) = client.token_info() {
            accessors.insert(t.accessor);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = started.elapsed().as_secs();
        if s > second {
            second = s;
            during(s, &pool.status().lease);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    let status = pool.status().lease;
    pool.close().await;
    let figures = Figures {
        queries: report.ok,
        failed: report.failed,
        rotations: status.rotations,
        renewals: status.renewals,
        logins: client.token_info().map_or(0, |t| t.logins),
        tokens: accessors.len(),
    };
    println!("{what}: {figures:?}");
    assert_eq!(report.failed, 0, "{what}: {:?}", report.errors);
    assert!(report.ok > 100, "{what}: only {} queries", report.ok);
    assert!(status.rotations >= 1, "{what}: no rotation");
    assert!(status.renewals >= 1, "{what}: no renewal");
    if on_stack {
        assert_leases_gone(&role).await;
    }
    figures
}

fn write_private(path: &std::path::Path, text: &str) {
    write_atomically(path, text, 0o600);
}

/// JWT login with the JWT in a file rewritten every 3 s (as a CI system or a sidecar
/// does): each login reads the current one. Then the mistakes: an expired JWT, a wrong
/// audience, an unknown role — typed errors naming the role and what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_login_reads_the_jwt_afresh_and_survives_token_replacement_under_load() {
    let mount = JwtMount::new("3s", "6s").await;
    let file = mount.dir.join("jwt");
    write_private(&file, &mount.jwt("vaultpool", epoch() + 300, 0));
    let client = builder()
        .auth(AuthMethod::jwt_file("app", &file).with_mount(&mount.path))
        .build()
        .unwrap();
    let mut written = 1;
    let f = under_load("JWT", client, None, Duration::from_secs(20), |s, _| {
        if s % 3 == 0 {
            write_private(&file, &mount.jwt("vaultpool", epoch() + 300, s));
            written += 1;
        }
    })
    .await;
    assert!(f.logins >= 3, "{f:?}");
    assert!(f.tokens >= 3, "{f:?}");
    println!("JWT: {written} JWTs written during the run");

    // The mistakes, each against the real method.
    let login = |jwt: String, role: &'static str| {
        let client = builder()
            .auth(AuthMethod::jwt_file(role, mount.file(&jwt)).with_mount(&mount.path))
            .build()
            .unwrap();
        async move {
            let e = client.login().await.unwrap_err();
            assert!(
                !format!("{e} {e:?}").contains(&jwt),
                "the JWT in the error: {e}"
            );
            e
        }
    };
    // Callers waiting on a login that fails share its failure: 20 at once, inside the
    // backoff that follows, send one login to Vault (two if the 1 s backoff passes).
    let counted = Proxy::start(&var("VAULT_ADDR"), "/login").await;
    let refused = Client::builder()
        .address(&counted.addr)
        .auth(
            AuthMethod::jwt_file("app", mount.file(&mount.jwt("vaultpool", epoch() - 120, 9)))
                .with_mount(&mount.path),
        )
        .build()
        .unwrap();
    let attempts = futures_util::future::join_all((0..20).map(|_| refused.login())).await;
    assert!(attempts.iter().all(Result::is_err));
    let logins = counted.hits().len();
    println!("JWT: 20 callers of a refused login, {logins} logins sent to Vault");
    assert!(logins <= 2, "{logins} logins for 20 callers");
    for (what, e, says) in [
        (
            "an expired JWT",
            login(mount.jwt("vaultpool", epoch() - 120, 1), "app").await,
            "has expired",
        ),
        (
            "a wrong audience",
            login(mount.jwt("someone-else", epoch() + 300, 2), "app").await,
            "audience",
        ),
        (
            "an unknown role",
            login(mount.jwt("vaultpool", epoch() + 300, 3), "nope").await,
            "role nope",
        ),
    ] {
        println!("JWT, {what}: {e}");
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{what}: {e}");
        assert!(e.to_string().contains(says), "{what}: {e}");
        assert!(e.to_string().contains(&mount.path), "{what}: {e}");
    }
}

/// Kubernetes login against OpenBao's real kubernetes auth method, with the
/// service-account token file replaced mid-run (projected tokens rotate) and the old
/// token then invalidated at the TokenReview stand-in: logins read the file each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_login_reads_the_service_account_token_at_every_login_under_load() {
    let review = TokenReview::start().await;
    let path = kubernetes_mount(&review, "3s", "6s").await;
    let (dir, key, _) = jwt_keys();
    let file = dir.join("token");
    let first = service_account_token(&key, 0);
    write_atomically(&file, &first, 0o644); // kubelet's default mode: not refused
    let client = builder()
        .auth(
            AuthMethod::kubernetes("app")
                .with_mount(&path)
                .with_token_path(&file),
        )
        .build()
        .unwrap();
    let watched = client.clone();
    let mut logins_at_swap = 0;
    let f = under_load(
        "Kubernetes",
        client,
        None,
        Duration::from_secs(20),
        |s, _| {
            if s == 8 {
                write_atomically(&file, &service_account_token(&key, 1), 0o644);
                review.revoke(&first);
                logins_at_swap = watched.token_info().map_or(0, |t| t.logins);
            }
        },
    )
    .await;
    let reviews = review.reviews.load(Ordering::Relaxed);
    println!(
        "Kubernetes: {reviews} TokenReview calls; {} logins after the token file was \
         replaced and the old token invalidated",
        f.logins - logins_at_swap
    );
    // Logins went on after the old service-account token was invalidated: each read the
    // new file (with the old token, the review would have refused them).
    assert!(
        f.logins >= logins_at_swap + 2,
        "{f:?}, {logins_at_swap} at the swap"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A userpass mount of its own on the stack's Vault with user `svc`, whose tokens live
/// `token_ttl`, renewable to `token_max_ttl`; its password in a private file. Returns the
/// mount, the temp dir and the file.
async fn userpass_mount(
    token_ttl: &str,
    token_max_ttl: &str,
) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let path = format!("userpass-{}", unique());
    enable_auth("userpass", &path).await;
    let policy = format!("policy-{path}");
    immune_policy(&policy).await;
    let password = format!("pw-{}", unique());
    root_write(
        reqwest::Method::POST,
        &format!("auth/{path}/users/svc"),
        serde_json::json!({
            "password": password,
            "token_policies": [policy],
            "token_ttl": token_ttl,
            "token_max_ttl": token_max_ttl,
        }),
    )
    .await;
    let dir = std::env::temp_dir().join(format!("vaultpool-userpass-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("password");
    write_private(&file, &password);
    (path, dir, file)
}

/// A login method that takes 25 s from its second login on (a custom `Login` waiting on
/// a cloud metadata service; the same as Kubernetes auth while the API server is slow),
/// wrapping the example's userpass login.
struct SlowAfterFirst {
    inner: custom_login::Userpass,
    logins: Arc<std::sync::atomic::AtomicU32>,
}

impl vaultpool::vault::Login for SlowAfterFirst {
    fn name(&self) -> &str {
        "slow userpass"
    }

    fn request(
        &self,
    ) -> vaultpool::BoxFuture<'_, vaultpool::Result<vaultpool::vault::LoginRequest>> {
        Box::pin(async move {
            if self.logins.fetch_add(1, Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_secs(25)).await;
            }
            self.inner.request().await
        })
    }
}

/// The client's re-login takes 25 s, started when its kept token has 40 s left (tokens
/// of 120 s, not renewable past that). Nobody waits for it: lease renewals and rotations
/// go on during the login, no query fails, no lease expires, and the login is made once
/// — not again by every worker step cut while it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_25_s_login_never_holds_up_lease_renewals() {
    use vaultpool::vault::Login as _;
    let (path, dir, file) = userpass_mount("120s", "120s").await;
    let logins = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let login = SlowAfterFirst {
        inner: custom_login::Userpass {
            mount: path.clone(),
            user: "svc".into(),
            password_file: file,
        },
        logins: logins.clone(),
    };
    assert_eq!(login.name(), "slow userpass");
    let client = builder().auth(AuthMethod::custom(login)).build().unwrap();
    client.login().await.unwrap();
    let first_login = Instant::now();
    let watched = client.clone();
    // Lease work (renewals + rotations) and logins started, while the slow login ran.
    let (mut at_start, mut at_end) = (None, None);
    let mut login_done = None;
    let mut errors = Vec::new();
    let f = under_load(
        "a 25 s login",
        client,
        None,
        // Past the old token's end (120 s), when the leases it issued die with it.
        Duration::from_secs(126),
        |_, status| {
            let since = first_login.elapsed();
            let work = status.renewals + status.rotations;
            let logins = logins.load(Ordering::Relaxed);
            if since >= Duration::from_secs(81) && at_start.is_none() {
                at_start = Some((since, work, logins));
            }
            if since >= Duration::from_secs(104) && at_end.is_none() {
                at_end = Some((since, work, logins));
            }
            if login_done.is_none() && watched.token_info().is_some_and(|t| t.logins >= 2) {
                login_done = Some(since);
                println!("a 25 s login: the second login done at {since:?}");
            }
            if let Some(e) = status.last_error.clone() {
                errors.push(e);
            }
        },
    )
    .await;
    let (start, end) = (at_start.unwrap(), at_end.unwrap());
    println!(
        "a 25 s login: lease renewals+rotations {} during it ({:?} → {:?}), logins started \
         {} → {}, the second login done at {login_done:?}; {f:?}",
        end.1 - start.1,
        start.0,
        end.0,
        start.2,
        end.2
    );
    let done = login_done.expect("the slow login never finished");
    assert!(
        done >= Duration::from_secs(100),
        "the second login was not slow: done at {done:?}"
    );
    // Leases of 4 s renewable to 8 s: several renewals or rotations in 23 s.
    assert!(
        end.1 >= start.1 + 3,
        "lease work stalled behind the login: {start:?} → {end:?}"
    );
    // One login in flight across the window, not one per cut step.
    assert_eq!(end.2, 2, "logins started: {start:?} → {end:?}");
    assert!(
        !errors.iter().any(|e| e.contains("expired")),
        "a lease expired: {errors:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Logins whose answer is slow (Vault waits on a slow TokenReview) and time out do not
/// open the client's circuit breaker while Vault itself answers: calls that need no login
/// go on. Six timed-out logins (the breaker opens after five transport failures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_timeouts_do_not_open_the_circuit_breaker() {
    let review = TokenReview::start().await;
    let path = kubernetes_mount(&review, "60s", "60s").await;
    let (dir, key, _) = jwt_keys();
    let file = dir.join("token");
    write_atomically(&file, &service_account_token(&key, 0), 0o644);
    review.delay_ms.store(3_000, Ordering::Relaxed);
    let client = builder()
        .auth(
            AuthMethod::kubernetes("app")
                .with_mount(&path)
                .with_token_path(&file),
        )
        .request_timeout(Duration::from_millis(500))
        .max_retries(0)
        .build()
        .unwrap();
    // Vault answers (a login timing out while Vault answers nothing at all still counts).
    client.health().await.unwrap();
    for attempt in 1..=6 {
        let e = client.login().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Transport, "login {attempt}: {e}");
        assert!(e.to_string().contains("timed out"), "login {attempt}: {e}");
        assert!(
            !client.circuit_open(),
            "login {attempt} timed out and the breaker opened: {e}"
        );
        // Without a valid token each call logs in again (a transient failure is not
        // shared inside the backoff: the client's retries pace those).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Vault answers calls that need no login.
    client.health().await.unwrap();
    assert!(!client.circuit_open());
    // And once the API server is quick again, the login goes through.
    review.delay_ms.store(0, Ordering::Relaxed);
    let info = client.login().await.unwrap();
    assert!(info.logins >= 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An AppRole whose tokens live 5 s, renewable to 10 s, as files in `dir`.
async fn short_approle(dir: &std::path::Path) {
    approle_files(dir, ("5s", "10s")).await;
}

/// Vault Agent with AppRole auto-auth and a file sink; its token lives 5 s renewable to
/// 10 s, so the Agent replaces it (shortly before the old one ends) several times during
/// the run. The client reads the
/// sink, never renews or revokes the Agent's token, and rotates leases issued under a
/// replaced token before its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_agent_token_file_replaced_during_the_run_loses_no_query() {
    let config = format!(
        "vault {{ address = \"{}\" }}\n{}",
        var("VAULT_ADDR"),
        AUTO_AUTH.replace(
            "SINK",
            r#"sink "file" { config = { path = "{dir}/token" mode = 0600 } }"#
        )
    );
    let agent = BaoHelper::prepare("agent", &config);
    short_approle(&agent.dir).await;
    let sink = agent.dir.join("token");
    let client = builder()
        .auth(AuthMethod::token_file(&sink))
        .build()
        .unwrap();
    // The first read starts before the Agent runs: it waits for the sink.
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.login().await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!sink.exists());
    let agent = agent.spawn();
    first
        .await
        .unwrap()
        .expect("the first read waited for the sink");
    let f = under_load(
        "Vault Agent",
        client.clone(),
        None,
        Duration::from_secs(25),
        |_, _| {},
    )
    .await;
    assert!(
        f.tokens >= 3,
        "the Agent's token was replaced only {} times: {f:?}",
        f.tokens - 1
    );
    assert_eq!(
        client.token_info().map(|t| t.renewals),
        Some(0),
        "renewed the Agent's token"
    );
    // A sink file every user can read is refused.
    use std::os::unix::fs::PermissionsExt;
    let open = agent.dir.join("open-token");
    std::fs::copy(&sink, &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = builder()
        .auth(AuthMethod::token_file(&open))
        .build()
        .unwrap()
        .login()
        .await
        .unwrap_err();
    println!("Agent, a world-readable sink: {e}");
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("every user"), "{e}");
    // A sink the Agent never writes: a typed error after the wait, no hang.
    let e = builder()
        .auth(AuthMethod::TokenFile {
            path: agent.dir.join("never"),
            wait: Duration::from_secs(1),
        })
        .build()
        .unwrap()
        .login()
        .await
        .unwrap_err();
    println!("Agent, a sink never written: {e}");
    assert_eq!(e.kind(), ErrorKind::CredentialsUnavailable, "{e}");
    drop(agent);
}

/// Vault Proxy with AppRole auto-auth and `use_auto_auth_token = true`: the client has no
/// token at all; leases are issued, renewed, rotated and revoked through the Proxy while
/// it replaces its token several times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_proxy_auto_auth_token_replaced_during_the_run_loses_no_query() {
    let port = free_port();
    let config = format!(
        "vault {{ address = \"{}\" }}\n{}\napi_proxy {{ use_auto_auth_token = true }}\n\
         listener \"tcp\" {{ address = \"127.0.0.1:{port}\" tls_disable = true }}\n",
        var("VAULT_ADDR"),
        AUTO_AUTH.replace("SINK", "")
    );
    let proxy = BaoHelper::prepare("proxy", &config);
    short_approle(&proxy.dir).await;
    let proxy = proxy.spawn();
    let addr = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(10), "the Proxy listening", || {
        port_open(&format!("127.0.0.1:{port}"))
    })
    .await;
    let client = Client::builder()
        .address(&addr)
        .auth(AuthMethod::ProxyAutoAuth)
        .build()
        .unwrap();
    let f = under_load(
        "Vault Proxy",
        client,
        None,
        Duration::from_secs(25),
        |_, _| {},
    )
    .await;
    assert!(
        f.tokens >= 3,
        "the Proxy's token was replaced only {} times: {f:?}",
        f.tokens - 1
    );
    drop(proxy);
}

/// TLS-certificate login on a TLS dev server: the client certificate (signed by the
/// stack's CA, which a cert role trusts) is presented on every connection; leases of the
/// dev server's own database engine under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificate_login_under_load() {
    let tls = TlsDev::start().await;
    let role = format!("cert-{}", unique());
    configure_database_engine(&tls.1, "root", &role, "4s", "8s").await;
    cert_mount(&tls, "3s", "6s").await;
    let client = Client::builder()
        .address(&tls.1)
        .ca_cert(tls.2.join("vault-ca.pem"))
        .client_cert(
            var("VAULTPOOL_TLS_CLIENT_CERT"),
            var("VAULTPOOL_TLS_CLIENT_KEY"),
        )
        .auth(AuthMethod::cert(Some("app".into())))
        .build()
        .unwrap();
    let f = under_load(
        "TLS certificate",
        client,
        Some(role),
        Duration::from_secs(15),
        |_, _| {},
    )
    .await;
    assert!(f.logins >= 2, "{f:?}");
}

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/custom_login.rs"]
mod custom_login;

/// The example's own auth method (userpass, the password read from a file at each
/// login), plugged in through `Login`: logs in again when its short token is capped,
/// under load, like the methods vaultpool ships.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_login_from_the_example_under_load() {
    let (path, dir, file) = userpass_mount("3s", "6s").await;
    let client = builder()
        .auth(AuthMethod::custom(custom_login::Userpass {
            mount: path.clone(),
            user: "svc".into(),
            password_file: file.clone(),
        }))
        .build()
        .unwrap();
    let f = under_load(
        "custom login (userpass)",
        client,
        None,
        Duration::from_secs(15),
        |_, _| {},
    )
    .await;
    assert!(f.logins >= 2, "{f:?}");
    // A wrong password: refused, named by the method's name and path.
    write_private(&file, "not-the-password");
    let e = builder()
        .auth(AuthMethod::custom(custom_login::Userpass {
            mount: path.clone(),
            user: "svc".into(),
            password_file: file,
        }))
        .build()
        .unwrap()
        .login()
        .await
        .unwrap_err();
    println!("custom login, a wrong password: {e}");
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("userpass"), "{e}");
    assert!(!e.to_string().contains("not-the-password"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
