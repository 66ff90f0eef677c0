//! Certificate files renewed on disk while the pools run, as cert-manager renews them:
//! the client certificate of PostgreSQL (both flavours), of Redis and of Vault's cert
//! auth. Each test issues a client certificate that ends ~30 s later, starts the pool
//! on it under load, lets the server trust a new CA as well, replaces the certificate
//! and key on disk with a pair from that new CA, and after the old certificate's end
//! switches the server to trust only the new CA — then forces rotations, whose new
//! connections (or logins) must present the new certificate. Servers are the test's
//! own (a PostgreSQL, a Redis, a TLS OpenBao), so the stack's are never reconfigured.
#![cfg(all(
    feature = "postgres",
    feature = "sqlx",
    feature = "redis",
    feature = "tls"
))]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use vaultpool::postgres::VaultPgPool;
use vaultpool::redis::VaultRedisPool;
use vaultpool::sqlx::VaultSqlxPool;
use vaultpool::sqlx::sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use vaultpool::tls::{PgTls, RedisTls, SslMode};
use vaultpool::vault::{AuthMethod, Client};

/// How long the first client certificate lives (cert-manager's 24 h, shortened; counted
/// from before the test's servers start, so it leaves room for a slow start).
const FIRST_CERTIFICATE_FOR: Duration = Duration::from_secs(40);

/// Sleep until the wall-clock moment `t`.
async fn sleep_until(t: SystemTime) {
    if let Ok(left) = t.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
}

/// The CAs and the first client certificate of a test.
struct Certificates {
    dir: TempDir,
    server_ca: TestCa,
    old_ca: TestCa,
    new_ca: TestCa,
    /// When the first client certificate ends.
    old_end: SystemTime,
    first: (String, String),
}

impl Certificates {
    fn new(what: &str) -> Self {
        let dir = TempDir::new(what);
        let server_ca = TestCa::new(&dir.0, "server-ca");
        let old_ca = TestCa::new(&dir.0, "client-ca-1");
        let new_ca = TestCa::new(&dir.0, "client-ca-2");
        let old_end = SystemTime::now() + FIRST_CERTIFICATE_FOR;
        let first = old_ca.client("client-1", old_end);
        Self {
            dir,
            server_ca,
            old_ca,
            new_ca,
            old_end,
            first,
        }
    }

    /// The renewed certificate: from the new CA, for an hour.
    fn renewed(&self) -> (String, String) {
        self.new_ca
            .client("client-2", SystemTime::now() + Duration::from_secs(3600))
    }

    fn both_cas(&self) -> String {
        format!("{}{}", self.old_ca.pem(), self.new_ca.pem())
    }
}

/// What a run across a renewal saw.
#[derive(Debug)]
struct Figures {
    queries: u64,
    failed: u64,
    rotated: usize,
    refused: Vec<String>,
    errors: Vec<String>,
}

/// Three forced rotations a second apart: how many succeeded, and the errors.
async fn rotate_three_times(
    rotate: impl AsyncFn() -> vaultpool::Result<()>,
) -> (usize, Vec<String>) {
    let (mut rotated, mut refused) = (0, Vec::new());
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match rotate().await {
            Ok(()) => rotated += 1,
            Err(e) => refused.push(e.to_string()),
        }
    }
    (rotated, refused)
}

/// A PostgreSQL of the test's own that requires client certificates, trusting the first
/// CA; the first certificate mounted as a Kubernetes secret; a role on it.
async fn postgres_setup(what: &str) -> (Certificates, PrivatePostgres, SecretMount, String) {
    let certs = Certificates::new(what);
    let server = certs.server_ca.server("pg-server");
    let pg = PrivatePostgres::start(&certs.dir.0, &server, &certs.old_ca.pem());
    let mount = SecretMount::new(&certs.dir.0.join("secret"), &certs.first.0, &certs.first.1);
    let role = pg.vault_role("1h").await;
    (certs, pg, mount, role)
}

/// 8 workers on `pool` while the server comes to trust the new CA too, the files are
/// swapped for the new CA's pair, and after the old certificate's end the server trusts
/// only the new CA; then three forced rotations. The sessions' client certificates are
/// checked before close.
async fn postgres_across_a_renewal<P: TestPool>(
    flavour: &str,
    pool: P,
    (certs, mut pg, mut mount, role): (Certificates, PrivatePostgres, SecretMount, String),
    then: impl AsyncFnOnce(&P, &mut SecretMount, &Certificates),
) {
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(&pool, 8, stop.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;
    pg.trust_client_cas(&certs.both_cas());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cert, key) = certs.renewed();
    mount.swap(&cert, &key);
    sleep_until(certs.old_end + Duration::from_secs(2)).await;
    pg.trust_client_cas(&certs.new_ca.pem());
    let (rotated, refused) = rotate_three_times(async || pool.rotate().await.map(|_| ())).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dns = pg.client_dns();
    then(&pool, &mut mount, &certs).await;
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    pool.close().await;
    remove_vault_db_config(&role).await;
    let f = Figures {
        queries: report.ok,
        failed: report.failed,
        rotated,
        refused,
        errors: report.errors,
    };
    println!(
        "PostgreSQL ({flavour}), client certificate renewed on disk: {f:?}; sessions' \
         certificates at the end: {dns:?}; {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(f.failed, 0, "{:?}", f.errors);
    assert!(f.refused.is_empty(), "{:?}", f.refused);
    assert_eq!(f.rotated, 3, "{f:?}");
    assert!(f.queries > 100, "{f:?}");
    assert!(
        dns.iter().any(|dn| dn.contains("client-2")),
        "no session with the renewed certificate: {dns:?}"
    );
}

/// The deadpool flavour: its connector reads the certificate files again when they
/// change, and every new connection uses what is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_renewed_on_disk_keeps_the_deadpool_pool_serving() {
    let setup = postgres_setup("certs-deadpool").await;
    let (certs, pg, mount, role) = &setup;
    let mut target = vaultpool::postgres::tokio_postgres::Config::new();
    target.host("localhost").port(pg.port).dbname("appdb");
    let pool = VaultPgPool::builder(role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(target)
        .ssl(
            PgTls::new(SslMode::VerifyFull)
                .root_cert(&certs.server_ca.cert)
                .client_cert(mount.cert(), mount.key()),
        )
        .max_size(4)
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    postgres_across_a_renewal("deadpool", pool, setup, a_bad_renewal_is_named).await;
}

/// Under the same load: the certificate in use expires, and what is written in its place
/// is a pair that does not fit. A rotation's new connection is refused by the server
/// (the expired certificate is still the one in use), and the error names the files,
/// when the certificate in use ended, and why the new files cannot be used — never the
/// key itself. A good pair written next is used at once.
async fn a_bad_renewal_is_named(pool: &VaultPgPool, mount: &mut SecretMount, certs: &Certificates) {
    let short_end = SystemTime::now() + Duration::from_secs(5);
    let (cert, key) = certs.new_ca.client("client-3", short_end);
    mount.swap(&cert, &key);
    // Files are looked at as connections open: a rotation takes this pair into use.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pool.rotate().await.unwrap();
    sleep_until(short_end + Duration::from_secs(2)).await;
    let (cert, _) = certs
        .new_ca
        .client("client-4", SystemTime::now() + Duration::from_secs(3600));
    let (_, other_key) = certs
        .new_ca
        .client("client-5", SystemTime::now() + Duration::from_secs(3600));
    mount.swap(&cert, &other_key);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let e = pool.rotate().await.unwrap_err();
    println!(
        "PostgreSQL (deadpool), the certificate in use expired and its replacement does not fit: {e}"
    );
    let text = e.to_string();
    assert_eq!(e.kind(), vaultpool::ErrorKind::Tls, "{e}");
    for says in [
        "as expired",
        "(expired)",
        "cannot be used",
        "does not fit",
        mount.key().to_str().unwrap(),
    ] {
        assert!(text.contains(says), "{says}: {e}");
    }
    let key_body = other_key.lines().nth(1).unwrap();
    assert!(!text.contains(key_body), "the key's bytes in: {e}");
    let (cert, key) = certs.renewed();
    mount.swap(&cert, &key);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pool.rotate().await.unwrap();
}

/// The sqlx flavour: sqlx reads `ssl_client_cert`/`ssl_client_key` given as files at
/// every connection; a pair swapped whole (as kubelet swaps a mounted secret) is used at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_renewed_on_disk_keeps_the_sqlx_pool_serving() {
    let setup = postgres_setup("certs-sqlx").await;
    let (certs, pg, mount, role) = &setup;
    let pool = VaultSqlxPool::builder(role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .connect_options(
            PgConnectOptions::new_without_pgpass()
                .host("localhost")
                .port(pg.port)
                .database("appdb")
                .ssl_mode(PgSslMode::VerifyFull)
                .ssl_root_cert(&certs.server_ca.cert)
                .ssl_client_cert(mount.cert())
                .ssl_client_key(mount.key()),
        )
        .pool_options(PgPoolOptions::new().max_connections(4))
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    postgres_across_a_renewal("sqlx", pool, setup, async |_, _, _| {}).await;
}

/// Redis with `tls-auth-clients yes`: the renewed pair is copied over the old files in
/// place, certificate first and the key 1.5 s later (no atomic swap): while the two do
/// not fit, new connections keep the pair read before; then they use the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_copied_over_on_disk_keeps_the_redis_pool_serving() {
    let certs = Certificates::new("certs-redis");
    let server = certs.server_ca.server("redis-server");
    let mut redis = PrivateRedis::start(&certs.dir.0, &server, &certs.old_ca.pem()).await;
    let (cert_file, key_file) = (certs.dir.0.join("tls.crt"), certs.dir.0.join("tls.key"));
    std::fs::write(&cert_file, &certs.first.0).unwrap();
    std::fs::write(&key_file, &certs.first.1).unwrap();
    let role = redis.vault_role("1h").await;
    let pool = VaultRedisPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .address(format!("rediss://localhost:{}/0", redis.tls_port))
        .tls(
            RedisTls::new()
                .root_cert(&certs.server_ca.cert)
                .client_cert(&cert_file, &key_file),
        )
        .max_size(8)
        .policy(fast_policy())
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_redis_load(&pool, 8, "certs", stop.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;
    redis.trust_client_cas(&certs.both_cas()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cert, key) = certs.renewed();
    std::fs::write(&cert_file, cert).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::write(&key_file, key).unwrap();
    sleep_until(certs.old_end + Duration::from_secs(2)).await;
    redis.trust_client_cas(&certs.new_ca.pem()).await;
    let (rotated, refused) = rotate_three_times(async || pool.rotate().await.map(|_| ())).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, errors) = load.await.unwrap();
    pool.close().await;
    remove_vault_db_config(&role).await;
    let f = Figures {
        queries: ok,
        failed: errors.len() as u64,
        rotated,
        refused,
        errors: errors.into_iter().take(5).collect(),
    };
    println!(
        "Redis, client certificate copied over on disk: {f:?}; {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(f.failed, 0, "{:?}", f.errors);
    assert!(f.refused.is_empty(), "{:?}", f.refused);
    assert_eq!(f.rotated, 3, "{f:?}");
    assert!(f.queries > 100, "{f:?}");
}

/// Vault's cert auth: the login authenticates by the TLS connection's client
/// certificate. The cert role first trusts the old CA, then both, then (after the old
/// certificate's end) only the new one; tokens live 9 s (18 s at most), so the client
/// logs in every 12 s or so (shorter tokens leave the engine less time than it takes to
/// move off a lease before its token ends and Vault revokes it: #24, item 6). A login after the old certificate's end must succeed —
/// on a new connection, since a kept-alive one still presents the old certificate —
/// and the pool on the server's database engine keeps serving and rotating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_renewed_on_disk_keeps_vault_cert_logins_working() {
    const TOKEN_TTL: &str = "9s";
    const TOKEN_MAX_TTL: &str = "18s";
    let certs = Certificates::new("certs-vault");
    let mut mount = SecretMount::new(&certs.dir.0.join("secret"), &certs.first.0, &certs.first.1);
    let tls = TlsDev::start().await;
    let role = format!("cert-{}", unique());
    configure_database_engine(&tls.1, "root", &role, "1h", "1h").await;
    cert_mount_trusting(&tls, &certs.old_ca.pem(), TOKEN_TTL, TOKEN_MAX_TTL).await;
    let client = Client::builder()
        .address(&tls.1)
        .ca_cert(tls.2.join("vault-ca.pem"))
        .client_cert(mount.cert(), mount.key())
        .auth(AuthMethod::cert(Some("app".into())))
        .build()
        .unwrap();
    let pool = VaultPgPool::builder(&role)
        .vault(client.clone())
        .pg_config(pg_target())
        .policy(fast_policy())
        .max_size(4)
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(&pool, 8, stop.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;
    cert_role_trusting(&tls, &certs.both_cas(), TOKEN_TTL, TOKEN_MAX_TTL).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cert, key) = certs.renewed();
    mount.swap(&cert, &key);
    sleep_until(certs.old_end + Duration::from_secs(1)).await;
    cert_role_trusting(&tls, &certs.new_ca.pem(), TOKEN_TTL, TOKEN_MAX_TTL).await;
    // A login after the switch (the token in hand ends within 18 s).
    let logins = || client.token_info().map_or(0, |t| t.logins);
    let before = logins();
    let waited = Instant::now();
    while logins() == before && waited.elapsed() < Duration::from_secs(25) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logged_in_after_expiry = logins() > before;
    let last_error = pool.status().lease.last_error.clone();
    let (rotated, refused) = rotate_three_times(async || pool.rotate().await.map(|_| ())).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    pool.close().await;
    let f = Figures {
        queries: report.ok,
        failed: report.failed,
        rotated,
        refused,
        errors: report.errors,
    };
    println!(
        "Vault cert auth, client certificate renewed on disk: {f:?}; logins {} (one after \
         the old certificate's end: {logged_in_after_expiry}, waited {:.1} s); last error: \
         {last_error:?}; {:.1} s",
        logins(),
        waited.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        logged_in_after_expiry,
        "no login after the old certificate's end: {last_error:?}"
    );
    assert_eq!(f.failed, 0, "{:?}", f.errors);
    assert!(f.refused.is_empty(), "{:?}", f.refused);
    assert_eq!(f.rotated, 3, "{f:?}");
    assert!(f.queries > 100, "{f:?}");
}
