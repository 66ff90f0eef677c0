//! Bad input, each a typed error whose message names what to fix — never a panic, never
//! a secret. Real servers where a real server can show the fault (the stack's OpenBao, a
//! sealed dev server, an uninitialized raft server, a TLS dev server); a tiny TCP server
//! only for bodies no real Vault sends. The table of messages is printed for the notes.
mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{DevVault, TlsDev, builder, free_port, root_client, tiny_server, unique, var};
use vaultpool::vault::{Client, RetryConfig};
use vaultpool::{Error, ErrorKind};

const SECRETS: [&str; 3] = [
    "s3cr3t-token-xyz",
    "bad-secret-id-777",
    "wrong-root-token-q",
];

struct Row {
    input: &'static str,
    expect: ErrorKind,
    /// Words the message must contain: what failed and what to fix.
    words: &'static [&'static str],
    result: Result<String, Error>,
}

fn no_retry() -> RetryConfig {
    let mut r = RetryConfig::default();
    r.max_retries = 0;
    r
}

/// An HTTP/1.1 200 answer with `body`, for the tiny server.
fn http_200(body: &str) -> &'static [u8] {
    Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
        .into_boxed_slice(),
    )
}

async fn creds_from(body: &str) -> Result<String, Error> {
    let addr = tiny_server(Some(http_200(body))).await;
    let client = Client::builder()
        .address(&addr)
        .token("t")
        .retry(no_retry())
        .build()?;
    client
        .database_creds("database", "app")
        .await
        .map(|c| format!("{:?}", c.lease.expires_at().map(|_| "expires")))
}

fn lookup(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |k| {
        pairs
            .iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_string())
    }
}

/// `bao server` on raft storage that nobody initialized.
struct Uninitialized(Child, String);

impl Uninitialized {
    async fn start() -> Self {
        let (port, cluster) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("vaultpool-uninit-{}", unique()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(
            dir.join("config.hcl"),
            format!(
                "storage \"raft\" {{\n  path = \"{}\"\n  node_id = \"u1\"\n}}\nlistener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  tls_disable = true\n}}\napi_addr = \"http://127.0.0.1:{port}\"\ncluster_addr = \"http://127.0.0.1:{cluster}\"\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(var("VAULTPOOL_BAO_BIN"))
            .args([
                "server",
                &format!("-config={}", dir.join("config.hcl").display()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..200 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self(child, format!("http://{addr}"))
    }
}

impl Drop for Uninitialized {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_a_typed_error_that_says_what_to_fix() {
    let stack = root_client();
    let sealed = DevVault::start();
    sealed.seal().await;
    let uninit = Uninitialized::start().await;
    let tls = TlsDev::start().await;
    let not_a_ca = std::env::temp_dir().join(format!("not-a-ca-{}.pem", unique()));
    std::fs::write(&not_a_ca, "this is not a PEM certificate\n").unwrap();
    // A real, valid CA that did not sign the server's certificate: the stack's dev
    // server has none, so use a second TLS dev server's CA.
    let other_tls = TlsDev::start().await;
    let huge = format!(r#"{{"errors":["{}"]}}"#, "x".repeat(5 * 1024 * 1024));

    #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
    let mut rows = vec![
        Row {
            input: "unknown role",
            expect: ErrorKind::NotFound,
            words: &["database/creds/no-such-role", "check the mount, path or role"],
            result: stack.database_creds("database", "no-such-role").await.map(|_| String::new()),
        },
        Row {
            input: "VAULT_ADDR missing",
            expect: ErrorKind::Config,
            words: &["VAULT_ADDR"],
            result: vaultpool::vault::ClientBuilder::from_lookup(lookup(&[("VAULT_TOKEN", "t")]))
                .and_then(|b| b.build())
                .map(|_| String::new()),
        },
        Row {
            input: "VAULT_ADDR not a URL",
            expect: ErrorKind::Config,
            words: &["VAULT_ADDR", "not a url"],
            result: vaultpool::vault::ClientBuilder::from_lookup(lookup(&[
                ("VAULT_ADDR", "not a url"),
                ("VAULT_TOKEN", "t"),
            ]))
            .and_then(|b| b.build())
            .map(|_| String::new()),
        },
        Row {
            input: "VAULT_ADDR with another scheme",
            expect: ErrorKind::Config,
            words: &["ftp://127.0.0.1:8200", "http"],
            result: Client::builder()
                .address("ftp://127.0.0.1:8200")
                .token("t")
                .build()
                .map(|_| String::new()),
        },
        Row {
            input: "unreachable address",
            expect: ErrorKind::Transport,
            words: &["127.0.0.1:9", "check VAULT_ADDR"],
            result: Client::builder()
                .address("http://127.0.0.1:9")
                .token("t")
                .retry(no_retry())
                .build()
                .unwrap()
                .health()
                .await
                .map(|_| String::new()),
        },
        Row {
            input: "bad token",
            expect: ErrorKind::PermissionDenied,
            words: &["secret/redis/main", "token or AppRole is valid"],
            result: builder()
                .token(SECRETS[0])
                .build()
                .unwrap()
                .read_kv("secret", "redis/main")
                .await
                .map(|_| String::new()),
        },
        Row {
            input: "bad role_id/secret_id",
            expect: ErrorKind::PermissionDenied,
            words: &["auth/approle/login", "token or AppRole is valid"],
            result: builder()
                .app_role(var("IMMUNE_SYSTEM_ROLE_ID"), SECRETS[1])
                .build()
                .unwrap()
                .login()
                .await
                .map(|_| String::new()),
        },
        Row {
            input: "403 policy denial",
            expect: ErrorKind::PermissionDenied,
            words: &["secret/data/maximus_ai/anthropic", "policies grant this path"],
            result: common::approle_client("IMMUNE_SYSTEM")
                .read_kv("secret", "maximus_ai/anthropic")
                .await
                .map(|_| String::new()),
        },
        Row {
            input: "sealed",
            expect: ErrorKind::Sealed,
            words: &["Vault is sealed", "unseal"],
            result: sealed
                .client()
                .retry(no_retry())
                .build()
                .unwrap()
                .read_kv("secret", "x")
                .await
                .map(|_| String::new()),
        },
        Row {
            input: "uninitialized",
            expect: ErrorKind::Uninitialized,
            words: &["not initialized", "bao operator init"],
            result: Client::builder()
                .address(&uninit.1)
                .token(SECRETS[2])
                .retry(no_retry())
                .build()
                .unwrap()
                .read_kv("secret", "x")
                .await
                .map(|_| String::new()),
        },
        Row {
            input: "404 mount",
            expect: ErrorKind::NotFound,
            words: &["no-such-mount/creds/app", "check the mount"],
            result: stack.database_creds("no-such-mount", "app").await.map(|_| String::new()),
        },
        Row {
            input: "non-JSON body",
            expect: ErrorKind::Decode,
            words: &["database/creds/app", "unexpected response"],
            result: creds_from("<html>proxy error</html>").await,
        },
        Row {
            input: "JSON without data",
            expect: ErrorKind::Decode,
            words: &["database/creds/app", "data"],
            result: creds_from(r#"{"lease_id":"l","lease_duration":60,"renewable":true}"#).await,
        },
        Row {
            input: "JSON data without password",
            expect: ErrorKind::Decode,
            words: &["database/creds/app", "password"],
            result: creds_from(r#"{"lease_id":"l","lease_duration":60,"data":{"username":"u"}}"#)
                .await,
        },
        Row {
            input: "wrong-typed lease_duration",
            expect: ErrorKind::Decode,
            words: &["database/creds/app", "lease_duration"],
            result: creds_from(
                r#"{"lease_id":"l","lease_duration":"ten","data":{"username":"u","password":"p"}}"#,
            )
            .await,
        },
        Row {
            input: "negative TTL",
            expect: ErrorKind::Decode,
            words: &["database/creds/app", "lease_duration"],
            result: creds_from(
                r#"{"lease_id":"l","lease_duration":-5,"data":{"username":"u","password":"p"}}"#,
            )
            .await,
        },
        Row {
            input: "implausible TTL (10^12 s)",
            expect: ErrorKind::Decode,
            words: &["database/creds/app", "not plausible"],
            result: creds_from(
                r#"{"lease_id":"l","lease_duration":1000000000000,"data":{"username":"u","password":"p"}}"#,
            )
            .await,
        },
        Row {
            input: "oversized body (5 MiB)",
            expect: ErrorKind::Decode,
            words: &["database/creds/app", "larger than"],
            result: creds_from(&huge).await,
        },
        Row {
            input: "TLS: server's CA not trusted",
            expect: ErrorKind::Tls,
            words: &["https://127.0.0.1", "certificate", "VAULT_CACERT"],
            result: Client::builder()
                .address(&tls.1)
                .token("root")
                .retry(no_retry())
                .build()
                .unwrap()
                .health()
                .await
                .map(|_| String::new()),
        },
        Row {
            input: "TLS: the wrong CA file",
            expect: ErrorKind::Tls,
            words: &["https://127.0.0.1", "certificate", "VAULT_CACERT"],
            result: Client::builder()
                .address(&tls.1)
                .token("root")
                .ca_cert(other_tls.2.join("vault-ca.pem"))
                .retry(no_retry())
                .build()
                .unwrap()
                .health()
                .await
                .map(|_| String::new()),
        },
        Row {
            input: "CA file that is not PEM",
            expect: ErrorKind::Config,
            words: &["not-a-ca-", "VAULT_CACERT"],
            result: Client::builder()
                .address(&tls.1)
                .token("root")
                .ca_cert(&not_a_ca)
                .build()
                .map(|_| String::new()),
        },
        Row {
            input: "CA file missing",
            expect: ErrorKind::Config,
            words: &["/nonexistent/ca.pem", "VAULT_CACERT"],
            result: Client::builder()
                .address(&tls.1)
                .token("root")
                .ca_cert("/nonexistent/ca.pem")
                .build()
                .map(|_| String::new()),
        },
    ];
    #[cfg(feature = "postgres")]
    rows.push(Row {
        input: "empty DATABASE_URL",
        expect: ErrorKind::Config,
        words: &["DATABASE_URL", "empty"],
        result: vaultpool::postgres::pg_config_from_lookup(lookup(&[("DATABASE_URL", "")]))
            .map(|_| String::new()),
    });

    #[cfg(all(feature = "postgres", feature = "tls"))]
    rows.extend(database_tls_rows().await);
    #[cfg(all(feature = "redis", feature = "tls"))]
    rows.extend(redis_tls_rows().await);
    rows.extend(auth_rows(&tls).await);

    // The right CA works: the TLS rows fail for the reason they name.
    let ok = Client::builder()
        .address(&tls.1)
        .token("root")
        .ca_cert(tls.2.join("vault-ca.pem"))
        .build()
        .unwrap()
        .health()
        .await;
    assert!(ok.is_ok(), "{ok:?}");

    let mut failures = Vec::new();
    println!("| input | kind | message |\n|---|---|---|");
    for row in &rows {
        match &row.result {
            Ok(v) => failures.push(format!("{}: succeeded ({v})", row.input)),
            Err(e) => {
                let msg = e.to_string();
                let chain = format!("{msg} {e:?}");
                println!(
                    "| {} | {:?} | {} |",
                    row.input,
                    e.kind(),
                    msg.replace('|', "/")
                );
                if e.kind() != row.expect {
                    failures.push(format!(
                        "{}: kind {:?}, want {:?}: {msg}",
                        row.input,
                        e.kind(),
                        row.expect
                    ));
                }
                for w in row.words {
                    if !chain.to_lowercase().contains(&w.to_lowercase()) {
                        failures.push(format!("{}: message lacks {w:?}: {msg}", row.input));
                    }
                }
                for s in SECRETS {
                    if chain.contains(s) {
                        failures.push(format!("{}: the message holds a secret", row.input));
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_file(&not_a_ca);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Logging in to Vault (#13): the mistakes of each method, against the real methods on
/// the stack's Vault (and cert auth on the TLS dev server `tls`).
async fn auth_rows(tls: &TlsDev) -> Vec<Row> {
    use common::{
        JwtMount, TokenReview, cert_mount, epoch, jwt_keys, kubernetes_mount, stranger_certificate,
        write_atomically,
    };
    use vaultpool::vault::{AuthMethod, ClientBuilder};
    let login = async |auth: AuthMethod| -> Result<String, Error> {
        builder()
            .auth(auth)
            .build()?
            .login()
            .await
            .map(|t| t.accessor)
    };
    let dir = std::env::temp_dir().join(format!("vaultpool-auth-rows-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str, mode: u32| {
        let path = dir.join(name);
        write_atomically(&path, text, mode);
        path
    };
    let jwt = JwtMount::new("1m", "1m").await;
    let review = TokenReview::start().await;
    let k8s = kubernetes_mount(&review, "1m", "1m").await;
    let (keys, key, _) = jwt_keys();
    let sa_token = file("sa-token", &common::service_account_token(&key, 0), 0o644);
    cert_mount(tls, "1m", "1m").await;
    let (stranger_dir, stranger_cert, stranger_key) = stranger_certificate();
    let cert_login = |cert: std::path::PathBuf, key: std::path::PathBuf| {
        Client::builder()
            .address(&tls.1)
            .ca_cert(tls.2.join("vault-ca.pem"))
            .client_cert(cert, key)
            .auth(AuthMethod::cert(Some("app".into())))
            .build()
    };
    let rows = vec![
        Row {
            input: "Agent sink not yet written (waits, then fails)",
            expect: ErrorKind::CredentialsUnavailable,
            words: &[
                "sink-never-written",
                "does not exist after waiting",
                "Vault Agent",
            ],
            result: login(AuthMethod::TokenFile {
                path: dir.join("sink-never-written"),
                wait: Duration::from_secs(1),
            })
            .await,
        },
        Row {
            input: "token file unreadable (a directory)",
            expect: ErrorKind::Config,
            words: &["cannot be read", "VAULT_TOKEN_FILE"],
            result: login(AuthMethod::token_file(&dir)).await,
        },
        Row {
            input: "token file empty",
            expect: ErrorKind::Config,
            words: &["empty-sink", "it is empty"],
            result: login(AuthMethod::token_file(file("empty-sink", "\n", 0o600))).await,
        },
        Row {
            input: "token file world-readable",
            expect: ErrorKind::Config,
            words: &["open-sink", "every user", "0600"],
            result: login(AuthMethod::token_file(file(
                "open-sink",
                "s3cr3t-token-xyz",
                0o644,
            )))
            .await,
        },
        Row {
            input: "JWT expired",
            expect: ErrorKind::PermissionDenied,
            words: &["role app", "has expired", "auth/jwt-"],
            result: login(
                AuthMethod::jwt_file("app", jwt.file(&jwt.jwt("vaultpool", epoch() - 60, 1)))
                    .with_mount(&jwt.path),
            )
            .await,
        },
        Row {
            input: "JWT with a wrong audience",
            expect: ErrorKind::PermissionDenied,
            words: &["audience", "bound_audiences"],
            result: login(
                AuthMethod::jwt_file("app", jwt.file(&jwt.jwt("elsewhere", epoch() + 60, 2)))
                    .with_mount(&jwt.path),
            )
            .await,
        },
        Row {
            input: "JWT role unknown",
            expect: ErrorKind::PermissionDenied,
            words: &["no role nope", "check the role name"],
            result: login(
                AuthMethod::jwt_file("nope", jwt.file(&jwt.jwt("vaultpool", epoch() + 60, 3)))
                    .with_mount(&jwt.path),
            )
            .await,
        },
        Row {
            input: "Kubernetes role unknown",
            expect: ErrorKind::PermissionDenied,
            words: &["no role nope", "auth/kubernetes-"],
            result: login(
                AuthMethod::kubernetes("nope")
                    .with_mount(&k8s)
                    .with_token_path(&sa_token),
            )
            .await,
        },
        Row {
            input: "Kubernetes service-account token missing",
            expect: ErrorKind::Config,
            words: &["service-account token", "does not exist"],
            result: login(
                AuthMethod::kubernetes("app")
                    .with_mount(&k8s)
                    .with_token_path(dir.join("no-token")),
            )
            .await,
        },
        Row {
            input: "client certificate no cert role trusts",
            expect: ErrorKind::PermissionDenied,
            words: &["client certificate", "VAULT_CLIENT_CERT", "auth/cert/login"],
            result: match cert_login(stranger_cert.clone(), stranger_key) {
                Ok(c) => c.login().await.map(|t| t.accessor),
                Err(e) => Err(e),
            },
        },
        Row {
            input: "client certificate and key that do not belong together",
            expect: ErrorKind::Config,
            words: &["belong together", "VAULT_CLIENT_KEY"],
            result: cert_login(stranger_cert, var("VAULTPOOL_TLS_CLIENT_KEY").into())
                .map(|_| String::new()),
        },
        Row {
            input: "cert login without a client certificate",
            expect: ErrorKind::Config,
            words: &["VAULT_CLIENT_CERT"],
            result: Client::builder()
                .address(&tls.1)
                .auth(AuthMethod::cert(None))
                .build()
                .map(|_| String::new()),
        },
        Row {
            input: "proxy mode pointed at Vault itself (no use_auto_auth_token)",
            expect: ErrorKind::PermissionDenied,
            words: &["use_auto_auth_token"],
            result: login(AuthMethod::ProxyAutoAuth).await,
        },
        Row {
            input: "VAULT_AUTH_METHOD unknown",
            expect: ErrorKind::Config,
            words: &["VAULT_AUTH_METHOD", "ldap", "kubernetes"],
            result: ClientBuilder::from_lookup(lookup(&[
                ("VAULT_ADDR", "http://127.0.0.1:8200"),
                ("VAULT_AUTH_METHOD", "ldap"),
            ]))
            .map(|_| String::new()),
        },
        Row {
            input: "VAULT_AUTH_METHOD=kubernetes without a role",
            expect: ErrorKind::Config,
            words: &["VAULT_AUTH_ROLE"],
            result: ClientBuilder::from_lookup(lookup(&[
                ("VAULT_ADDR", "http://127.0.0.1:8200"),
                ("VAULT_AUTH_METHOD", "kubernetes"),
            ]))
            .map(|_| String::new()),
        },
    ];
    for d in [&dir, &keys, &stranger_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
    rows
}

/// TLS to PostgreSQL (the stack's TLS-only database): the mistakes a deployment makes,
/// each refused at build.
#[cfg(all(feature = "postgres", feature = "tls"))]
async fn database_tls_rows() -> Vec<Row> {
    use common::{create_role, pg_tls_target};
    use vaultpool::tls::{PgTls, SslMode};
    let role = create_role("1h", "1h").await;
    let build = |host: &'static str, tls: PgTls| {
        let role = role.clone();
        async move {
            common::build_tls_pool(&role, pg_tls_target(host), tls)
                .await
                .map(|p| format!("{:?}", p.status()))
        }
    };
    let ca = var("VAULTPOOL_PG_CA");
    let rows = vec![
        Row {
            input: "PostgreSQL TLS: a host name the certificate does not hold",
            expect: ErrorKind::Tls,
            words: &["wrong.example", "does not name the host"],
            result: build(
                "wrong.example",
                PgTls::new(SslMode::VerifyFull).root_cert(&ca),
            )
            .await,
        },
        Row {
            input: "PostgreSQL TLS: an untrusted CA",
            expect: ErrorKind::Tls,
            words: &["not signed by the root certificate", "PGSSLROOTCERT"],
            result: build(
                "localhost",
                PgTls::new(SslMode::VerifyFull).root_cert(var("VAULTPOOL_PG_OTHER_CA")),
            )
            .await,
        },
        Row {
            input: "PostgreSQL TLS: plaintext to a TLS-only database",
            expect: ErrorKind::Tls,
            words: &["accepts only TLS", "PGSSLMODE"],
            result: build("localhost", PgTls::new(SslMode::Disable)).await,
        },
        Row {
            input: "PostgreSQL TLS: verify-full without a root certificate",
            expect: ErrorKind::Config,
            words: &["verify-full", "PGSSLROOTCERT"],
            result: PgTls::from_lookup(lookup(&[("PGSSLMODE", "verify-full")]), &[])
                .and_then(|t| t.rustls_config())
                .map(|_| String::new()),
        },
        Row {
            input: "PostgreSQL TLS: an unknown PGSSLMODE",
            expect: ErrorKind::Config,
            words: &["verify_full", "verify-full"],
            result: PgTls::from_lookup(lookup(&[("PGSSLMODE", "verify_full")]), &[])
                .map(|_| String::new()),
        },
        Row {
            input: "PostgreSQL TLS: PGSSLCERT without PGSSLKEY",
            expect: ErrorKind::Config,
            words: &["PGSSLKEY"],
            result: PgTls::from_lookup(lookup(&[("PGSSLCERT", "/etc/client.crt")]), &[])
                .map(|_| String::new()),
        },
        // The backend's own reason in the message (before: "backend failed" only).
        Row {
            input: "PostgreSQL: a database that does not exist",
            expect: ErrorKind::Backend,
            words: &["database \"vaultpool_no_such_db\" does not exist"],
            result: vaultpool::postgres::VaultPgPool::builder(&role)
                .vault(common::approle_client("IMMUNE_SYSTEM"))
                .pg_config({
                    let mut c = common::pg_target();
                    c.dbname("vaultpool_no_such_db");
                    c
                })
                .build()
                .await
                .map(|p| format!("{:?}", p.status())),
        },
    ];
    common::assert_leases_gone(&role).await;
    rows
}

/// TLS to Redis (the stack's TLS port, which requires a client certificate): the
/// mistakes a deployment makes, each refused at build.
#[cfg(all(feature = "redis", feature = "tls"))]
async fn redis_tls_rows() -> Vec<Row> {
    use common::{approle_client, create_redis_role};
    use vaultpool::redis::VaultRedisPool;
    use vaultpool::tls::RedisTls;
    let role = create_redis_role("1h", "1h").await;
    let tls_port = var("VAULTPOOL_REDIS_TLS_PORT");
    let client = || {
        RedisTls::new().client_cert(
            var("VAULTPOOL_TLS_CLIENT_CERT"),
            var("VAULTPOOL_TLS_CLIENT_KEY"),
        )
    };
    let url = |scheme: &str, host: &str| format!("{scheme}://{host}:{tls_port}/0");
    let build = |url: String, tls: RedisTls| {
        let role = role.clone();
        async move {
            VaultRedisPool::builder(&role)
                .vault(approle_client("IMMUNE_SYSTEM"))
                .address(url)
                .tls(tls)
                .build()
                .await
                .map(|p| format!("{:?}", p.status()))
        }
    };
    let ca = var("VAULTPOOL_PG_CA");
    let rows = vec![
        Row {
            input: "Redis TLS: a host name the certificate does not hold",
            expect: ErrorKind::Tls,
            words: &["127.0.0.1", "does not name the host"],
            result: build(url("rediss", "127.0.0.1"), client().root_cert(&ca)).await,
        },
        Row {
            input: "Redis TLS: an untrusted CA",
            expect: ErrorKind::Tls,
            words: &["not signed by a trusted CA", "REDIS_TLS_CA_FILE"],
            result: build(
                url("rediss", "localhost"),
                client().root_cert(var("VAULTPOOL_PG_OTHER_CA")),
            )
            .await,
        },
        Row {
            input: "Redis TLS: no client certificate for tls-auth-clients yes",
            expect: ErrorKind::Tls,
            words: &["requires a client certificate", "REDIS_TLS_CERT_FILE"],
            result: build(url("rediss", "localhost"), RedisTls::new().root_cert(&ca)).await,
        },
        Row {
            input: "Redis TLS: rediss://…#insecure",
            expect: ErrorKind::Config,
            words: &["#insecure", "REDIS_TLS_CA_FILE"],
            result: build(
                format!("{}#insecure", url("rediss", "localhost")),
                client().root_cert(&ca),
            )
            .await,
        },
        Row {
            input: "Redis TLS: a CA given with a plaintext redis:// address",
            expect: ErrorKind::Config,
            words: &["use rediss://"],
            result: build(url("redis", "localhost"), RedisTls::new().root_cert(&ca)).await,
        },
        Row {
            input: "Redis TLS: REDIS_TLS_CERT_FILE without REDIS_TLS_KEY_FILE",
            expect: ErrorKind::Config,
            words: &["REDIS_TLS_KEY_FILE"],
            result: RedisTls::from_lookup(lookup(&[("REDIS_TLS_CERT_FILE", "/etc/c.pem")]))
                .map(|_| String::new()),
        },
    ];
    common::assert_leases_gone(&role).await;
    rows
}

/// A refused certificate is an answer from a live server: when it is the breaker's probe
/// (after a dead node opened it), the breaker closes and later calls go out again —
/// instead of "circuit breaker open" for ever (a probe that settled nothing).
#[tokio::test]
async fn a_tls_refusal_on_the_breakers_probe_settles_the_breaker() {
    let tls = TlsDev::start().await;
    let mut breaker = vaultpool::vault::BreakerConfig::default();
    breaker.failure_threshold = 1;
    breaker.cooldown = Duration::from_millis(200);
    let client = Client::builder()
        .addresses([format!("http://127.0.0.1:{}", free_port()), tls.1.clone()])
        .token("root")
        .breaker(breaker)
        .retry(no_retry())
        .build()
        .unwrap();
    let first = client.health().await.unwrap_err();
    assert_eq!(first.kind(), ErrorKind::Transport, "{first}");
    assert_eq!(
        client.health().await.unwrap_err().kind(),
        ErrorKind::CircuitOpen
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The probe goes to the TLS node (the client moved there) and is refused.
    let probe = client.health().await.unwrap_err();
    assert_eq!(probe.kind(), ErrorKind::Tls, "{probe}");
    // The breaker closed on that answer: the next call is sent (to the next address, the
    // dead node again) and fails there, rather than being refused by the breaker.
    let next = client.health().await.unwrap_err();
    assert_eq!(next.kind(), ErrorKind::Transport, "{next}");
}

#[tokio::test]
async fn a_lease_duration_of_zero_is_a_lease_without_expiry() {
    let got = creds_from(
        r#"{"lease_id":"database/creds/app/x","lease_duration":0,"renewable":false,"data":{"username":"u","password":"p"}}"#,
    )
    .await
    .unwrap();
    assert_eq!(got, "None", "a zero TTL must mean no expiry, not 'expired'");
}
