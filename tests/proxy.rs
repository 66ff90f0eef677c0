//! vaultpool-proxy against the real stack, driven by clients nobody here wrote: psql,
//! pgbench, tokio-postgres (its CancelRequest), Python's psycopg; and by raw bytes for
//! bad input.
#![cfg(all(feature = "proxy", feature = "postgres"))]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use vaultpool::lease::Engine;
use vaultpool::proxy::{Config, Proxy};

const SECRET: &str = "local-only proxy secret";

/// A proxy of the test's own, in this process.
struct Running {
    tcp: SocketAddr,
    http: SocketAddr,
    dir: PathBuf,
    port: u16,
    engine: Engine,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn config_text(dir: &Path, role: &str, extra_listen: &str, extra_db: &str) -> String {
    std::fs::write(dir.join("secret"), format!("{SECRET}\n")).unwrap();
    format!(
        r#"
        [listen]
        tcp = "127.0.0.1:0"
        unix_dir = "{dir}"
        scram_secret_file = "{dir}/secret"
        http = "127.0.0.1:0"
        {extra_listen}

        [[database]]
        name = "app"
        users = ["app"]
        role = "{role}"
        host = "{host}"
        port = {port}
        dbname = "adaptive_immunity"
        {extra_db}
        "#,
        dir = dir.display(),
        host = var("PGHOST"),
        port = var("PGPORT"),
    )
}

async fn start(role: &str, extra_listen: &str, extra_db: &str) -> Running {
    let dir = std::env::temp_dir().join(format!("vaultpool-proxy-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = Config::parse(&config_text(&dir, role, extra_listen, extra_db), "test").unwrap();
    let proxy = Proxy::start(config, approle_client("IMMUNE_SYSTEM"))
        .await
        .unwrap();
    let tcp = proxy.tcp_addr().unwrap();
    let http = proxy.http_addr().unwrap();
    let engine = proxy.engine("app").unwrap().clone();
    let stop = CancellationToken::new();
    let task = tokio::spawn(proxy.run(stop.clone()));
    Running {
        tcp,
        http,
        port: tcp.port(),
        dir,
        engine,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the proxy stops")
            .unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// A client command with the proxy's address (Unix socket) and nothing inherited.
    fn client(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        for (k, _) in std::env::vars() {
            if k.starts_with("PG") {
                c.env_remove(k);
            }
        }
        c.env("PGHOST", &self.dir)
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "app")
            .env("PGDATABASE", "app");
        c
    }

    async fn metrics(&self) -> String {
        http_get(self.http, "/metrics").await
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

fn output(mut c: Command) -> (bool, String, String) {
    let o = c.output().expect("run a client");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_logs_in_on_the_socket_without_a_password_and_over_tcp_with_the_local_secret() {
    let role = create_role("1h", "2h").await;
    let proxy = start(&role, "", "").await;

    // Unix socket, our own uid: no password.
    let mut c = proxy.client("psql");
    c.args(["-Atc", "SELECT current_user, current_database()"]);
    let (ok, out, err) = output(c);
    assert!(ok, "{err}");
    assert!(out.starts_with("v-"), "logged in as the leased user: {out}");
    assert!(out.trim_end().ends_with("|adaptive_immunity"), "{out}");

    // TCP: SCRAM-SHA-256 with the local secret.
    let mut c = proxy.client("psql");
    c.env("PGHOST", "127.0.0.1")
        .env("PGPASSWORD", SECRET)
        .args(["-Atc", "SELECT 1"]);
    let (ok, out, err) = output(c);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "1");
    // A wrong secret, an unknown database, an unknown user: refused, with PostgreSQL's
    // kind of message.
    let refusals: [(&[(&str, &str)], &str); 3] = [
        (
            &[("PGHOST", "127.0.0.1"), ("PGPASSWORD", "guess")],
            "password authentication failed for user \"app\"",
        ),
        (
            &[("PGDATABASE", "nope")],
            "no database \"nope\" is configured",
        ),
        (
            &[("PGUSER", "mallory")],
            "user \"mallory\" may not use database \"app\"",
        ),
    ];
    for (env, want) in refusals {
        let mut c = proxy.client("psql");
        c.envs(env.iter().copied()).args(["-Atc", "SELECT 1"]);
        let (ok, _, err) = output(c);
        assert!(!ok && err.contains(want), "{want}: {err}");
    }
    // Startup settings reach the server session.
    let mut c = proxy.client("psql");
    c.env("PGAPPNAME", "through-the-proxy")
        .env("PGOPTIONS", "-c search_path=pg_catalog")
        .args(["-Atc", "SHOW application_name; SHOW search_path"]);
    let (ok, out, err) = output(c);
    assert!(ok, "{err}");
    assert_eq!(out, "through-the-proxy\npg_catalog\n");
    // ... and do not leak into the next session on the same server connection.
    let mut c = proxy.client("psql");
    c.args(["-Atc", "SHOW search_path"]);
    let (_, out, _) = output(c);
    assert_eq!(
        out.trim(),
        "\"$user\", public",
        "DISCARD ALL between sessions"
    );

    // The last session's reset may still run when psql has exited.
    let mut m = proxy.metrics().await;
    for _ in 0..40 {
        if metric(&m, "vaultpool_proxy_sessions_active") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = proxy.metrics().await;
    }
    println!("{m}");
    assert!(
        metric(&m, "vaultpool_proxy_server_reused_total") >= 1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "vaultpool_proxy_sessions_active"), 0.0, "{m}");
    assert!(
        http_get(proxy.http, "/health")
            .await
            .starts_with("HTTP/1.1 200")
    );
    proxy.stop().await;
    assert_leases_gone(&role).await;
}

/// The schema `bench` in `adaptive_immunity` with pgbench's tables and the COPY test's,
/// made once, owned by `app_owner`, usable by everyone through grants to PUBLIC — not in
/// `public`, whose tables every leased user gets a grant on (each grant is an ACL entry on
/// the table: with 1,000 users alive that makes every lease slower, and past ~2,000 a
/// table's catalog row no longer fits).
async fn bench_schema() {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let pg = pg_admin("adaptive_immunity").await;
        pg.batch_execute(
            "SET ROLE app_owner; CREATE SCHEMA IF NOT EXISTS bench; \
             CREATE TABLE IF NOT EXISTS bench.proxy_copy (x int); RESET ROLE",
        )
        .await
        .unwrap();
        let exists = pg
            .query_opt(
                "SELECT 1 FROM pg_tables WHERE schemaname = 'bench' AND tablename = 'pgbench_accounts'",
                &[],
            )
            .await
            .unwrap()
            .is_some();
        if !exists {
            let status = Command::new("pgbench")
                .args(["-i", "-s", "1", "-q"])
                .env("PGHOST", var("PGHOST"))
                .env("PGPORT", var("PGPORT"))
                .env("PGUSER", "postgres")
                .env("PGPASSWORD", var("VAULTPOOL_PG_SUPER_PASSWORD"))
                .env("PGDATABASE", "adaptive_immunity")
                .env("PGOPTIONS", "-c role=app_owner -c search_path=bench")
                .status()
                .unwrap();
            assert!(status.success(), "pgbench -i");
        }
        pg.batch_execute(
            "SET ROLE app_owner; GRANT USAGE ON SCHEMA bench TO PUBLIC; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA bench TO PUBLIC; \
             RESET ROLE",
        )
        .await
        .unwrap();
    })
    .await;
}

/// pgbench's report: (transactions processed, failed transactions, tps).
fn pgbench_report(out: &str) -> (u64, u64, f64) {
    let field = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {prefix:?} in {out}"))
            .to_owned()
    };
    let processed = field("number of transactions actually processed:")
        .parse()
        .unwrap();
    let failed = field("number of failed transactions:").parse().unwrap();
    let tps = out
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    (processed, failed, tps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_the_proxy_across_scheduled_and_forced_rotations_fails_no_transaction() {
    bench_schema().await;
    // 12 s leases that cannot be renewed past 12 s: a scheduled rotation about every 7 s,
    // and a forced one every 10 s on top. A connection per transaction (-C): every new
    // session takes the serving generation.
    let role = create_role("12s", "12s").await;
    let proxy = start(&role, "", "max_connections = 16").await;
    let mut c = proxy.client("pgbench");
    c.env("PGOPTIONS", "-c search_path=bench")
        .args(["-c", "16", "-j", "2", "-T", "60", "-C", "-n"]);
    let bench = tokio::task::spawn_blocking(move || output(c));
    let forcer = {
        let engine = proxy.engine.clone();
        tokio::spawn(async move {
            let mut forced = 0;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(55) {
                tokio::time::sleep(Duration::from_secs(10)).await;
                engine.rotate().await.unwrap();
                forced += 1;
            }
            forced
        })
    };
    let (ok, out, err) = bench.await.unwrap();
    let forced = forcer.await.unwrap();
    let status = proxy.engine.status();
    println!("{out}\n{err}");
    let (processed, failed, tps) = pgbench_report(&out);
    println!(
        "pgbench -C through the proxy: {processed} transactions, {failed} failed, {tps:.0} tps; \
         rotations {} ({forced} forced), revocations {}",
        status.rotations, status.revocations
    );
    assert!(ok, "pgbench failed: {err}");
    assert_eq!(failed, 0);
    assert!(processed > 500, "{processed}");
    assert!(status.rotations >= 8, "{status:?}");
    assert!(forced >= 5);

    // Sessions held for the whole run (no -C), far longer than any 12 s lease: between
    // transactions they are handed over to the serving generation, so no lease's end
    // (revocation ends its sessions) reaches them.
    let before = proxy.engine.status().rotations;
    let mut c = proxy.client("pgbench");
    c.env("PGOPTIONS", "-c search_path=bench")
        .args(["-c", "16", "-j", "2", "-T", "60", "-n"]);
    let bench = tokio::task::spawn_blocking(move || output(c));
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        proxy.engine.rotate().await.unwrap();
    }
    let (ok, out, err) = bench.await.unwrap();
    let (processed, failed, tps) = pgbench_report(&out);
    let m = proxy.metrics().await;
    let rotations = proxy.engine.status().rotations - before;
    println!(
        "pgbench (16 sessions held 60 s) through the proxy: {processed} transactions, {failed} \
         failed, {tps:.0} tps; rotations {rotations}; hand-overs {}",
        metric(&m, "vaultpool_proxy_handovers_total")
    );
    assert!(ok, "pgbench failed: {err}");
    assert_eq!(failed, 0);
    assert!(rotations >= 10, "{rotations}");
    assert!(metric(&m, "vaultpool_proxy_handovers_total") >= 16.0 * 5.0);
    proxy.stop().await;
    assert_leases_gone(&role).await;
}

/// A tokio-postgres client through the proxy's TCP port with the local secret.
async fn tokio_client(port: u16) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user("app")
        .dbname("app")
        .password(SECRET)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_reaches_the_backend_of_its_session_and_no_other() {
    let role = create_role("1h", "2h").await;
    let proxy = start(&role, "", "").await;
    let (a, b) = (
        tokio_client(proxy.port).await,
        tokio_client(proxy.port).await,
    );
    let a_pid: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let token = a.cancel_token();
    let sleeping_a = tokio::spawn(async move { a.query_one("SELECT pg_sleep(30)", &[]).await });
    let sleeping_b =
        tokio::spawn(async move { b.query_one("SELECT pg_sleep(3)", &[]).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Instant::now();
    // tokio-postgres sends the CancelRequest to where it connected: the proxy.
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), sleeping_a)
        .await
        .expect("the cancel ended the query")
        .unwrap()
        .unwrap_err();
    println!("cancelled backend {a_pid} in {:?}: {e}", sent.elapsed());
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{e}"
    );
    // The other session's query was not touched.
    sleeping_b
        .await
        .unwrap()
        .expect("the other session's query completes");
    proxy.stop().await;
    assert_leases_gone(&role).await;
}

/// Raw bytes to the proxy's TCP port; what comes back before it closes (bounded).
async fn raw(proxy: &Running, bytes: &[u8], hold: Duration) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(proxy.tcp).await.unwrap();
    s.write_all(bytes).await.unwrap();
    tokio::time::sleep(hold).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_get_an_error_or_a_closed_socket_and_everyone_else_is_served() {
    let role = create_role("1h", "2h").await;
    let proxy = start(&role, "startup_timeout_secs = 1", "").await;
    // Someone keeps querying all along.
    let good = tokio_client(proxy.port).await;
    let steady = tokio::spawn(async move {
        let mut n = 0u64;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(8) {
            good.query_one("SELECT 1", &[])
                .await
                .expect("the good client is served");
            n += 1;
        }
        n
    });
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let cases: Vec<(&str, Vec<u8>, Duration, &str)> = vec![
        (
            "garbage",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            Duration::ZERO,
            "invalid startup packet length",
        ),
        (
            "oversized startup",
            1_000_000i32.to_be_bytes().to_vec(),
            Duration::ZERO,
            "invalid startup packet length",
        ),
        (
            "old protocol",
            [8i32.to_be_bytes(), 0x0002_0000i32.to_be_bytes()].concat(),
            Duration::ZERO,
            "unsupported frontend protocol 2.0",
        ),
        (
            "no user",
            startup(&[("database", "app")]),
            Duration::ZERO,
            "no user name",
        ),
        (
            "half a startup packet, then silence",
            100i32.to_be_bytes().to_vec(),
            Duration::ZERO,
            "did not start within 1s",
        ),
        (
            "replication",
            startup(&[("user", "app"), ("replication", "true")]),
            Duration::ZERO,
            "replication",
        ),
        (
            "a setting that is not a name",
            startup(&[("user", "app"), ("a;b", "c")]),
            Duration::ZERO,
            "not a setting name",
        ),
    ];
    for (what, bytes, hold, want) in cases {
        let got = text(&raw(&proxy, &bytes, hold).await);
        println!("{what}: {got:?}");
        assert!(got.contains(want), "{what}: {got:?}");
    }
    // Connect and say nothing: cut at the startup timeout.
    let started = Instant::now();
    let got = raw(&proxy, b"", Duration::ZERO).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(text(&got).contains("did not start within"), "{got:?}");
    // A password login that never answers the SASL challenge: cut too.
    let got = text(
        &raw(
            &proxy,
            &startup(&[("user", "app"), ("database", "app")]),
            Duration::ZERO,
        )
        .await,
    );
    assert!(got.contains("did not start within"), "{got:?}");

    // A client that disappears mid-query (killed: its socket closes under it): its query
    // is cancelled on the server.
    let mut c = proxy.client("psql");
    c.args(["-Atc", "SELECT pg_sleep(60) /* abandoned */"]);
    let mut child = c.spawn().unwrap();
    let admin = pg_admin("postgres").await;
    let running = "SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60) /* abandoned */%' \
                   AND state = 'active' AND pid <> pg_backend_pid()";
    let mut pid: Option<i32> = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        pid = admin
            .query_opt(running, &[])
            .await
            .unwrap()
            .map(|r| r.get(0));
        if pid.is_some() {
            break;
        }
    }
    let pid = pid.expect("the query runs on the server");
    child.kill().unwrap();
    child.wait().unwrap();
    let mut still = true;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        still = admin.query_opt(running, &[]).await.unwrap().is_some();
        if !still {
            break;
        }
    }
    assert!(!still, "the abandoned query still runs on backend {pid}");

    let served = steady.await.unwrap();
    println!("the good client ran {served} queries meanwhile");
    assert!(served > 100);
    // Nothing left: no session counted, every server connection accounted for.
    let mut m = proxy.metrics().await;
    for _ in 0..40 {
        if metric(&m, "vaultpool_proxy_sessions_active") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = proxy.metrics().await;
    }
    assert_eq!(metric(&m, "vaultpool_proxy_sessions_active"), 0.0, "{m}");
    proxy.stop().await;
    assert_leases_gone(&role).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_psycopg_queries_and_transactions_across_rotations_without_an_error() {
    let python = std::env::var("VAULTPOOL_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_psycopg = Command::new(&python)
        .args(["-c", "import psycopg"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_psycopg,
        "psycopg is not installed: scripts/stack.sh installs it (pip)"
    );
    let role = create_role("10s", "10s").await;
    let proxy = start(&role, "", "").await;
    let script = r#"
import json, sys, time, threading, psycopg
dsn = sys.argv[1]
stats = {"queries": 0, "transactions": 0, "errors": [], "error_count": 0}
lock = threading.Lock()
def work(kind):
    end = time.time() + 25
    # One connection held all along (autocommit: a transaction left open across its
    # lease's end could not survive any proxy), and new ones per transaction.
    held = psycopg.connect(dsn, autocommit=True) if kind == "held" else None
    while time.time() < end:
        try:
            if kind == "held":
                held.execute("SELECT count(*) FROM items").fetchone()
                with lock: stats["queries"] += 1
            else:
                with psycopg.connect(dsn) as conn:
                    with conn.transaction():
                        conn.execute("SELECT count(*) FROM items").fetchone()
                        conn.execute("SELECT pg_sleep(0.01)")
                    with lock: stats["transactions"] += 1
        except Exception as e:
            with lock:
                stats["error_count"] += 1
                if len(stats["errors"]) < 5: stats["errors"].append(repr(e))
            if kind == "held":
                held = psycopg.connect(dsn, autocommit=True)
threads = [threading.Thread(target=work, args=(k,)) for k in ["held", "new", "new", "new"]]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(stats))
"#;
    let dsn = format!(
        "host={} port={} user=app dbname=app",
        proxy.dir.display(),
        proxy.port
    );
    let mut c = proxy.client(&python);
    c.args(["-c", script, &dsn]);
    let run = tokio::task::spawn_blocking(move || output(c));
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        proxy.engine.rotate().await.unwrap();
    }
    let (ok, out, err) = run.await.unwrap();
    let m = proxy.metrics().await;
    println!(
        "psycopg: {} {err}\nhandovers {} (refused {}), server logins {}",
        out.chars().take(600).collect::<String>(),
        metric(&m, "vaultpool_proxy_handovers_total"),
        metric(&m, "vaultpool_proxy_handovers_refused_total"),
        metric(&m, "vaultpool_proxy_server_logins_total")
    );
    assert!(ok, "{err}");
    let stats: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(stats["error_count"], 0, "{stats}");
    assert!(stats["transactions"].as_u64().unwrap() > 100, "{stats}");
    assert!(stats["queries"].as_u64().unwrap() > 100, "{stats}");
    assert!(proxy.engine.status().rotations >= 4);
    proxy.stop().await;
    assert_leases_gone(&role).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_lets_open_sessions_finish_and_revokes_every_lease() {
    let role = create_role("1h", "2h").await;
    let dir = std::env::temp_dir().join(format!("vaultpool-proxy-bin-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let text = config_text(&dir, &role, "", "").replace(
        "127.0.0.1:0\"\n        unix_dir",
        &format!("127.0.0.1:{port}\"\n        unix_dir"),
    );
    std::fs::write(dir.join("proxy.toml"), &text).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vaultpool-proxy"))
        .args(["--config", dir.join("proxy.toml").to_str().unwrap()])
        .env("VAULT_ADDR", var("VAULT_ADDR"))
        .env("VAULT_ROLE_ID", var("IMMUNE_SYSTEM_ROLE_ID"))
        .env("VAULT_SECRET_ID", var("IMMUNE_SYSTEM_SECRET_ID"))
        .env_remove("VAULT_TOKEN")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line),
    )
    .await
    .expect("the proxy says it is ready")
    .unwrap();
    assert!(line.contains("ready"), "{line}");
    let client = tokio_client(port).await;
    client
        .batch_execute("BEGIN; SELECT count(*) FROM items")
        .await
        .unwrap();

    let pid = child.id().unwrap();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // No new session...
    let refused = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user("app")
        .dbname("app")
        .password(SECRET)
        .connect_timeout(Duration::from_secs(2))
        .connect(tokio_postgres::NoTls)
        .await;
    assert!(refused.is_err(), "a new session after SIGTERM");
    // ... the open one finishes its transaction.
    client
        .batch_execute("SELECT 1; COMMIT")
        .await
        .expect("the open session finishes");
    drop(client);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the proxy exits once its last session ended")
        .unwrap();
    assert!(status.success(), "{status}");
    assert_leases_gone(&role).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_to_the_new_generation_with_its_settings_and_prepared_statements() {
    let role = create_role("1h", "2h").await;
    let proxy = start(&role, "", "").await;
    let client = tokio_client(proxy.port).await;
    let listener = tokio_client(proxy.port).await;
    client
        .batch_execute("SET search_path = pg_catalog, public")
        .await
        .unwrap();
    // A protocol-level prepared statement (Parse with a name), as drivers make them.
    let stmt = client.prepare("SELECT $1::int4 * 2").await.unwrap();
    let before: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    listener.batch_execute("LISTEN news").await.unwrap();
    // A custom setting (row-level security's tenant, say) cannot be read back from the
    // server: that session must stay where it is.
    let tenant = tokio_client(proxy.port).await;
    tenant
        .batch_execute("SET app.tenant_id = 'acme'")
        .await
        .unwrap();
    let tenant_before: i32 = tenant
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // A SQL PREPARE: its text may hold other statements, so it is not replayed.
    let sql_prepared = tokio_client(proxy.port).await;
    sql_prepared
        .batch_execute("PREPARE by_sql AS SELECT 40 + 2")
        .await
        .unwrap();
    let temp = tokio_client(proxy.port).await;
    temp.batch_execute("CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (7)")
        .await
        .unwrap();
    let listener_before: i32 = listener
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    let old_user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    proxy.engine.rotate().await.unwrap();
    // Idle at the rotation: handed over without waiting for a query.
    let mut m = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        m = proxy.metrics().await;
        if metric(&m, "vaultpool_proxy_handovers_total") >= 1.0
            && metric(&m, "vaultpool_proxy_handovers_refused_total") >= 2.0
        {
            break;
        }
    }
    assert_eq!(metric(&m, "vaultpool_proxy_handovers_total"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "vaultpool_proxy_handovers_refused_total"),
        2.0,
        "the sessions with a temporary table and a SQL PREPARE are looked at and stay (the \
         LISTEN and the tenant sessions are known to stay without a look)"
    );
    let after: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let new_user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(before, after, "a new server connection");
    assert_ne!(old_user, new_user, "of the new generation");
    let doubled: i32 = client.query_one(&stmt, &[&21i32]).await.unwrap().get(0);
    assert_eq!(doubled, 42, "the prepared statement moved along");
    let path: String = client
        .query_one("SHOW search_path", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(path, "pg_catalog, public", "the setting moved along");
    // The LISTEN session is where it was, and works.
    let listener_after: i32 = listener
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listener_before, listener_after);
    let tenant_after: i32 = tenant
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let id: String = tenant
        .query_one("SELECT current_setting('app.tenant_id')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        (tenant_before, id.as_str()),
        (tenant_after, "acme"),
        "never moved without its tenant"
    );
    let kept: i32 = temp
        .query_one("SELECT x FROM scratch", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 7, "the temporary table is still there");
    let by_sql: i32 = sql_prepared
        .query_one("EXECUTE by_sql", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(by_sql, 42, "the SQL PREPARE session kept its statement");
    drop((client, listener, tenant, temp, sql_prepared));
    proxy.stop().await;
    assert_leases_gone(&role).await;
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_server_with_verify_full_and_a_wrong_ca_refused_at_start() {
    let role = create_role("1h", "2h").await;
    // The stack's TLS-only database (hostssl), its certificate for localhost.
    let tls_db = |ca: &str| {
        format!(
            "[[database]]\nname = \"secure\"\nrole = \"{role}\"\nhost = \"localhost\"\nport = {}\n\
             dbname = \"{}\"\nsslmode = \"verify-full\"\nsslrootcert = \"{ca}\"\n",
            var("PGPORT"),
            var("VAULTPOOL_PG_TLS_DB")
        )
    };
    let dir = std::env::temp_dir().join(format!("vaultpool-proxy-tls-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "{}\n{}",
        config_text(&dir, &role, "", ""),
        tls_db(&var("VAULTPOOL_PG_CA"))
    );
    let proxy = Proxy::start(
        Config::parse(&text, "test").unwrap(),
        approle_client("IMMUNE_SYSTEM"),
    )
    .await
    .unwrap();
    let port = proxy.tcp_addr().unwrap().port();
    let stop = CancellationToken::new();
    let task = tokio::spawn(proxy.run(stop.clone()));
    let mut c = Command::new("psql");
    c.env("PGHOST", &dir)
        .env("PGPORT", port.to_string())
        .env("PGUSER", "app")
        .env("PGDATABASE", "secure")
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .args([
            "-Atc",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ]);
    let (ok, out, err) = output(c);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "t", "the server session is encrypted");
    stop.cancel();
    task.await.unwrap();

    // A CA that did not sign the server's certificate: the proxy does not start, and says
    // why (the first login verifies).
    let text = format!(
        "{}\n{}",
        config_text(&dir, &role, "", ""),
        tls_db(&var("VAULTPOOL_PG_OTHER_CA"))
    );
    let e = Proxy::start(
        Config::parse(&text, "test").unwrap(),
        approle_client("IMMUNE_SYSTEM"),
    )
    .await
    .unwrap_err();
    println!("{e}");
    assert_eq!(e.kind(), vaultpool::ErrorKind::Tls, "{e}");
    assert!(e.to_string().contains("secure"), "names the database: {e}");
    let _ = std::fs::remove_dir_all(&dir);
    assert_leases_gone(&role).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_across_a_rotation_completes_and_the_session_moves_after_it() {
    bench_schema().await;
    let role = create_role("1h", "2h").await;
    let proxy = start(&role, "", "").await;
    let client = tokio_client(proxy.port).await;
    let before: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // COPY FROM STDIN through the extended protocol (tokio-postgres: Parse, Bind,
    // Execute, Sync, then CopyData...): the Sync sent with it is ignored by the server.
    let sink = client
        .copy_in::<_, bytes::Bytes>("COPY bench.proxy_copy FROM STDIN")
        .await
        .unwrap();
    use futures_util::SinkExt;
    let mut sink = Box::pin(sink);
    sink.send(bytes::Bytes::from_static(b"1\n2\n"))
        .await
        .unwrap();
    // A rotation in the middle of the copy: the session must not be moved now.
    proxy.engine.rotate().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sink.send(bytes::Bytes::from_static(b"3\n")).await.unwrap();
    let rows = sink.as_mut().finish().await.unwrap();
    assert_eq!(rows, 3);
    // After the copy the session is idle: moved at its next query at the latest.
    let after: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let mut moved = after != before;
    for _ in 0..20 {
        if moved {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        moved = pid != before;
    }
    assert!(moved, "the session moved once its copy was done");
    // Queries pipelined on one client (several in flight at once) are answered in order.
    let (a, b, c) = tokio::join!(
        client.query_one("SELECT 1::int4", &[]),
        client.query_one("SELECT 2::int4", &[]),
        client.query_one("SELECT 3::int4", &[])
    );
    let got: Vec<i32> = [a, b, c].into_iter().map(|r| r.unwrap().get(0)).collect();
    assert_eq!(got, vec![1, 2, 3]);
    drop(client);
    proxy.stop().await;
    assert_leases_gone(&role).await;
}

/// A raw protocol session on the proxy's Unix socket (a trusted uid: no password),
/// logged in and ready.
async fn raw_session(proxy: &Running) -> tokio::net::UnixStream {
    let path = proxy.dir.join(format!(".s.PGSQL.{}", proxy.port));
    let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
    s.write_all(&startup(&[("user", "app"), ("database", "app")]))
        .await
        .unwrap();
    until_ready(&mut s).await;
    s
}

/// The messages (tag, body) up to and including the next ReadyForQuery.
async fn until_ready(s: &mut tokio::net::UnixStream) -> Vec<(u8, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        let read = async {
            let tag = s.read_u8().await?;
            let len = s.read_i32().await?;
            let mut body = vec![0; len as usize - 4];
            s.read_exact(&mut body).await?;
            Ok::<_, std::io::Error>((tag, body))
        };
        let (tag, body) = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the proxy answers")
            .unwrap();
        got.push((tag, body));
        if tag == b'Z' {
            return got;
        }
    }
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_stays_after_a_rotation_can_still_bind_its_unnamed_statement() {
    let role = create_role("1h", "2h").await;
    let proxy = start(&role, "", "").await;
    let mut s = raw_session(&proxy).await;
    // A session-level advisory lock: the session cannot move.
    s.write_all(&message(b'Q', b"SELECT pg_advisory_lock(42)\0"))
        .await
        .unwrap();
    until_ready(&mut s).await;
    // The unnamed statement, parsed now and bound after the rotation.
    let parse = message(b'P', b"\0SELECT $1::int4 * 2\0\0\x01\0\0\0\x17");
    s.write_all(&[parse, message(b'S', b"")].concat())
        .await
        .unwrap();
    let parsed = until_ready(&mut s).await;
    assert_eq!(parsed[0].0, b'1', "ParseComplete: {parsed:?}");

    proxy.engine.rotate().await.unwrap();
    // Idle at the rotation: the proxy reads its state (simple queries, which end the
    // unnamed statement on that connection), finds the lock, and leaves it there.
    let mut m = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        m = proxy.metrics().await;
        if metric(&m, "vaultpool_proxy_handovers_refused_total") >= 1.0 {
            break;
        }
    }
    assert_eq!(
        metric(&m, "vaultpool_proxy_handovers_refused_total"),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "vaultpool_proxy_handovers_total"), 0.0, "{m}");

    // Bind the unnamed statement with 21 (text), execute it.
    let bind = message(b'B', b"\0\0\0\x01\0\0\0\x01\0\0\0\x0221\0\x01\0\0");
    let execute = message(b'E', b"\0\0\0\0\0");
    s.write_all(&[bind, execute, message(b'S', b"")].concat())
        .await
        .unwrap();
    let answer = until_ready(&mut s).await;
    let error = answer.iter().find(|(t, _)| *t == b'E');
    assert!(
        error.is_none(),
        "the unnamed statement is gone: {:?}",
        error.map(|(_, b)| String::from_utf8_lossy(b))
    );
    let row = answer.iter().find(|(t, _)| *t == b'D').expect("a row");
    assert!(row.1.ends_with(b"42"), "{row:?}");
    s.write_all(&message(b'X', b"")).await.unwrap();
    drop(s);
    proxy.stop().await;
    assert_leases_gone(&role).await;
}

/// Every connection of the route in use: a second client waits the route's
/// `wait_timeout` and is told 53300 (as documented), counted in `wait_timeouts_total` —
/// not cut by the startup timeout with 08P01 "did not start within" (before: 08P01 at
/// exactly the startup timeout, 0 wait timeouts counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_route_answers_53300_after_its_wait_timeout() {
    let role = create_role("5m", "1h").await;
    let proxy = start(
        &role,
        "startup_timeout_secs = 3",
        "max_connections = 1\nwait_timeout_secs = 5",
    )
    .await;
    let held = tokio_client(proxy.port).await;
    held.simple_query("SELECT 1").await.unwrap();
    let started = Instant::now();
    let refused = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(proxy.port)
        .user("app")
        .dbname("app")
        .password(SECRET)
        .connect(tokio_postgres::NoTls)
        .await
        .map(|_| ())
        .unwrap_err();
    let took = started.elapsed();
    println!("second client on a full route: {refused:?} after {took:?}");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
        "{refused:?}"
    );
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(9),
        "{took:?}"
    );
    assert_eq!(
        metric(
            &proxy.metrics().await,
            "vaultpool_proxy_wait_timeouts_total"
        ),
        1.0
    );
    drop(held);
    proxy.stop().await;
}

/// `SELECT current_user` by psql run as `nobody` on the proxy's socket, never asking
/// for a password; (success, stdout, stderr).
fn psql_as_nobody(proxy: &Running) -> (bool, String, String) {
    let mut psql = Command::new("runuser");
    psql.args(["-u", "nobody", "--", "psql", "-X", "-tA", "-w"])
        .arg("-h")
        .arg(&proxy.dir)
        .args(["-p", &proxy.port.to_string(), "-U", "app", "-d", "app"])
        .args(["-c", "SELECT current_user"]);
    for (k, _) in std::env::vars() {
        if k.starts_with("PG") {
            psql.env_remove(k);
        }
    }
    output(psql)
}

/// The usual sidecar layout: the proxy runs as one uid, the service as another, listed
/// in `allowed_uids`. psql as `nobody` (uid 65534) logs in on the socket without a
/// password: the socket is 0777 (as PostgreSQL's default) whatever the umask; who may
/// log in is still the uid list's (and the secret's) to decide. Before, the socket had
/// the umask's 0755 and the allowed uid got "Permission denied".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_uid_other_than_the_proxys_connects_on_the_socket() {
    let me = output({
        let mut c = Command::new("id");
        c.arg("-u");
        c
    });
    assert_eq!(
        me.1.trim(),
        "0",
        "this test runs as root (it runs psql as nobody)"
    );
    let role = create_role("5m", "1h").await;
    let proxy = start(&role, "allowed_uids = [0, 65534]", "").await;
    let socket = proxy.dir.join(format!(".s.PGSQL.{}", proxy.port));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o777, "socket mode {mode:o}");
    }
    let (ok, out, err) = psql_as_nobody(&proxy);
    println!("psql as nobody on the socket: ok={ok} out={out:?} err={err:?}");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), proxy.engine.current().credentials.username);
    proxy.stop().await;
    // The 0777 socket lets anyone connect, not log in: a uid not in the list is refused
    // (no password given; the secret would be asked over SCRAM).
    let proxy = start(&role, "allowed_uids = [0]", "").await;
    let (ok, out, err) = psql_as_nobody(&proxy);
    println!("psql as nobody, not allowed: ok={ok} out={out:?} err={err:?}");
    assert!(!ok && out.is_empty(), "a uid not listed logged in: {out}");
    proxy.stop().await;
}
