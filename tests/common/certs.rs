//! Certificates of a test's own (openssl CLI, EC P-256): CAs, client certificates with an
//! exact end (`openssl ca -enddate`, to the second), server certificates; the files of a
//! mounted Kubernetes secret, swapped whole as kubelet does; and servers of a test's
//! own that check client certificates against a CA the test switches (a PostgreSQL, a
//! Redis), so the stack's shared servers are never reconfigured.

use std::path::Path;
use std::time::SystemTime;

use super::*;

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `t` as openssl's `-startdate`/`-enddate` want it (UTCTime, `YYMMDDHHMMSSZ`).
fn asn1_time(t: SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%y%m%d%H%M%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

const CA_CONFIG: &str = "[ ca ]
default_ca = local
[ local ]
dir = .
database = ./index.txt
new_certs_dir = ./issued
serial = ./serial
default_md = sha256
policy = anything
unique_subject = no
copy_extensions = none
x509_extensions = client
[ anything ]
commonName = supplied
[ client ]
basicConstraints = CA:FALSE
extendedKeyUsage = clientAuth
";

/// A CA of the test's own, in a directory of its own (an `openssl ca` database).
pub struct TestCa {
    pub name: String,
    pub dir: PathBuf,
    pub cert: PathBuf,
}

impl TestCa {
    /// A self-signed CA named `name` in `parent/name`, valid for a day.
    pub fn new(parent: &Path, name: &str) -> Self {
        let dir = parent.join(name);
        std::fs::create_dir_all(dir.join("issued")).unwrap();
        std::fs::write(dir.join("index.txt"), "").unwrap();
        std::fs::write(dir.join("serial"), "01\n").unwrap();
        std::fs::write(dir.join("ca.cnf"), CA_CONFIG).unwrap();
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
            &dir,
        );
        Self {
            name: name.to_owned(),
            cert: dir.join("ca.crt"),
            dir,
        }
    }

    /// The CA's certificate (PEM).
    pub fn pem(&self) -> String {
        std::fs::read_to_string(&self.cert).unwrap()
    }

    fn key_and_request(&self, cn: &str) -> String {
        openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{cn}.key"),
                "-out",
                &format!("{cn}.csr"),
            ],
            &self.dir,
        );
        std::fs::read_to_string(self.dir.join(format!("{cn}.key"))).unwrap()
    }

    /// A client certificate for `cn`, valid from a minute ago until `until` (to the
    /// second): (certificate PEM, key PEM).
    pub fn client(&self, cn: &str, until: SystemTime) -> (String, String) {
        let key = self.key_and_request(cn);
        let start = asn1_time(SystemTime::now() - Duration::from_secs(60));
        openssl(
            &[
                "ca",
                "-batch",
                "-config",
                "ca.cnf",
                "-cert",
                "ca.crt",
                "-keyfile",
                "ca.key",
                "-in",
                &format!("{cn}.csr"),
                "-out",
                &format!("{cn}.crt"),
                "-notext",
                "-startdate",
                &start,
                "-enddate",
                &asn1_time(until),
            ],
            &self.dir,
        );
        let cert = std::fs::read_to_string(self.dir.join(format!("{cn}.crt"))).unwrap();
        (cert, key)
    }

    /// A server certificate for localhost and 127.0.0.1, valid for a day:
    /// (certificate file, key file).
    pub fn server(&self, cn: &str) -> (PathBuf, PathBuf) {
        self.key_and_request(cn);
        std::fs::write(
            self.dir.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &format!("{cn}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "san.ext",
                "-out",
                &format!("{cn}.crt"),
            ],
            &self.dir,
        );
        (
            self.dir.join(format!("{cn}.crt")),
            self.dir.join(format!("{cn}.key")),
        )
    }
}

/// A certificate and key mounted as Kubernetes mounts a secret: `tls.crt` and `tls.key`
/// are links into `..data`, itself a link to a timestamped directory; a new version is
/// a new directory, and one rename of `..data` swaps both files at once (kubelet's
/// atomic writer; cert-manager's certificates arrive this way).
pub struct SecretMount {
    pub dir: PathBuf,
    version: u32,
}

impl SecretMount {
    pub fn new(dir: &Path, cert: &str, key: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut mount = Self {
            dir: dir.to_owned(),
            version: 0,
        };
        mount.swap(cert, key);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        mount
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }

    /// Both files replaced at once.
    pub fn swap(&mut self, cert: &str, key: &str) {
        use std::os::unix::fs::PermissionsExt;
        self.version += 1;
        let old = format!("..v{}", self.version - 1);
        let new = format!("..v{}", self.version);
        let version = self.dir.join(&new);
        std::fs::create_dir_all(&version).unwrap();
        std::fs::write(version.join("tls.crt"), cert).unwrap();
        std::fs::write(version.join("tls.key"), key).unwrap();
        std::fs::set_permissions(
            version.join("tls.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&new, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        let _ = std::fs::remove_dir_all(self.dir.join(old));
    }
}

/// A temp directory of the test's own, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vaultpool-{what}-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    (id("-u"), id("-g"))
}

/// A PostgreSQL 15 of the test's own on a free port: TLS with `server` (a certificate
/// for localhost), and every TLS login must present a client certificate signed by a
/// CA in its `ssl_ca_file` (`hostssl … clientcert=verify-ca`, on top of the password).
/// Only `vault_admin` (Vault's own connection) may log in without TLS. Database
/// `appdb` with a table `items`, and roles as the stack has them (`app_owner`,
/// `vault_admin`). Stopped on drop.
pub struct PrivatePostgres {
    pub port: u16,
    pub admin_password: String,
    dir: PathBuf,
    generation: u32,
}

impl PrivatePostgres {
    pub fn start(parent: &Path, server: &(PathBuf, PathBuf), client_cas: &str) -> Self {
        use std::os::unix::fs::{PermissionsExt, chown};
        let (uid, gid) = postgres_ids();
        let dir = parent.join("pg");
        std::fs::create_dir_all(&dir).unwrap();
        chown(parent, Some(uid), Some(gid)).unwrap();
        chown(&dir, Some(uid), Some(gid)).unwrap();
        let port = free_port();
        let data = dir.join("data");
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, "superpw\n").unwrap();
        chown(&pwfile, Some(uid), Some(gid)).unwrap();
        let as_postgres = |bin: &str, args: &[&str]| {
            let out = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(format!("{}/{bin}", var("VAULTPOOL_PG_BIN")))
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{bin} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        as_postgres(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                &format!("--pwfile={}", pwfile.display()),
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        );
        for (from, to) in [(&server.0, "server.crt"), (&server.1, "server.key")] {
            std::fs::copy(from, data.join(to)).unwrap();
            chown(data.join(to), Some(uid), Some(gid)).unwrap();
            std::fs::set_permissions(data.join(to), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        let mut pg = Self {
            port,
            admin_password: "vaultadminpw".into(),
            dir,
            generation: 0,
        };
        pg.write_client_cas(client_cas);
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             password_encryption = 'scram-sha-256'\nssl = on\nssl_cert_file = 'server.crt'\n\
             ssl_key_file = 'server.key'\nssl_ca_file = '{}'\nmax_connections = 60\n\
             log_connections = on\n",
            pg.dir.display(),
            pg.dir.join("client-ca.pem").display()
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), text).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostnossl all vault_admin 127.0.0.1/32 scram-sha-256\n\
             hostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n",
        )
        .unwrap();
        as_postgres(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                pg.dir.join("postgres.log").to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        pg.psql(
            "postgres",
            &format!(
                "CREATE ROLE app_owner NOLOGIN; \
                 CREATE ROLE vault_admin LOGIN CREATEROLE PASSWORD '{}'; \
                 GRANT app_owner TO vault_admin WITH ADMIN OPTION;",
                pg.admin_password
            ),
        );
        pg.psql("postgres", "CREATE DATABASE appdb OWNER app_owner");
        pg.psql(
            "appdb",
            "SET ROLE app_owner; CREATE TABLE items (id serial PRIMARY KEY, name text); \
             INSERT INTO items (name) VALUES ('a'), ('b'); GRANT SELECT ON items TO PUBLIC;",
        );
        pg
    }

    fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{}/psql", var("VAULTPOOL_PG_BIN")))
            .args(["-h", self.dir.to_str().unwrap()])
            .args([
                "-p",
                &self.port.to_string(),
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-Atc", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn write_client_cas(&mut self, pem: &str) {
        // A new file each time, renamed in: the server reads it whole at reload.
        self.generation += 1;
        let tmp = self.dir.join(format!("client-ca.{}", self.generation));
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, self.dir.join("client-ca.pem")).unwrap();
    }

    /// Trust only the CAs in `pem` for client certificates from now on (the server
    /// reads its TLS files again at `pg_reload_conf()`; open sessions are untouched).
    pub fn trust_client_cas(&mut self, pem: &str) {
        self.write_client_cas(pem);
        assert_eq!(self.psql("postgres", "SELECT pg_reload_conf()").trim(), "t");
    }

    /// The common names of the client certificates of the sessions open now.
    pub fn client_dns(&self) -> Vec<String> {
        let out = self.psql(
            "postgres",
            "SELECT DISTINCT client_dn FROM pg_stat_ssl WHERE client_dn IS NOT NULL",
        );
        out.lines().map(str::to_owned).collect()
    }

    /// A dynamic role on the stack's Vault (named `test-…`) whose users are made here:
    /// a database config of its own for this server, and the role.
    pub async fn vault_role(&self, ttl: &str) -> String {
        let name = format!("test-{}", unique());
        let write = async |path: String, body: serde_json::Value| {
            vault_write(
                &var("VAULT_ADDR"),
                &var("VAULTPOOL_ROOT_TOKEN"),
                reqwest::Method::POST,
                &path,
                body,
            )
            .await;
        };
        write(
            format!("database/config/{name}"),
            serde_json::json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": format!(
                    "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/appdb?sslmode=disable",
                    self.port
                ),
                "username": "vault_admin",
                "password": self.admin_password,
                "password_authentication": "scram-sha-256",
                "allowed_roles": name,
                "max_open_connections": 2,
            }),
        )
        .await;
        let mut role = pg_role(ttl, ttl);
        role["db_name"] = name.clone().into();
        write(format!("database/roles/{name}"), role).await;
        name
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{}/pg_ctl", var("VAULTPOOL_PG_BIN")))
            .args(["-D", self.dir.join("data").to_str().unwrap()])
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A Redis 7 of the test's own: a plaintext port (for Vault's admin connection and the
/// test's `CONFIG SET`) and a TLS port with `server` that requires a client
/// certificate signed by a CA in its `tls-ca-cert-file`. Killed on drop.
pub struct PrivateRedis {
    pub port: u16,
    pub tls_port: u16,
    pub password: String,
    dir: PathBuf,
    child: Child,
    generation: u32,
}

impl PrivateRedis {
    pub async fn start(parent: &Path, server: &(PathBuf, PathBuf), client_cas: &str) -> Self {
        let dir = parent.join("redis");
        std::fs::create_dir_all(&dir).unwrap();
        let (port, tls_port) = (free_port(), free_port());
        let ca = dir.join("client-ca.0.pem");
        std::fs::write(&ca, client_cas).unwrap();
        let password = "redisadminpw".to_owned();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--tls-port", &tls_port.to_string()])
            .arg("--tls-cert-file")
            .arg(&server.0)
            .arg("--tls-key-file")
            .arg(&server.1)
            .arg("--tls-ca-cert-file")
            .arg(&ca)
            .args(["--tls-auth-clients", "yes", "--requirepass", &password])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::fs::File::create(dir.join("redis.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server");
        let redis = Self {
            port,
            tls_port,
            password,
            dir,
            child,
            generation: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.command(&["PING"]).await.trim() != "+PONG" {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        redis
    }

    /// One command as `default` on the plaintext port; the raw reply.
    pub async fn command(&self, args: &[&str]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut sock) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return String::new();
        };
        let mut cmd = String::new();
        for parts in [&["AUTH", self.password.as_str()][..], args] {
            cmd.push_str(&format!("*{}\r\n", parts.len()));
            for p in parts {
                cmd.push_str(&format!("${}\r\n{p}\r\n", p.len()));
            }
        }
        sock.write_all(cmd.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        // Both replies in: "+OK\r\n" and the command's.
        while !String::from_utf8_lossy(&out)
            .strip_prefix("+OK\r\n")
            .is_some_and(|r| r.ends_with("\r\n"))
        {
            match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let text = String::from_utf8_lossy(&out).to_string();
        text.strip_prefix("+OK\r\n").unwrap_or(&text).to_owned()
    }

    /// Trust only the CAs in `pem` for client certificates of new connections (a new
    /// file each time: Redis reads it at `CONFIG SET`).
    pub async fn trust_client_cas(&mut self, pem: &str) {
        self.generation += 1;
        let ca = self.dir.join(format!("client-ca.{}.pem", self.generation));
        std::fs::write(&ca, pem).unwrap();
        let reply = self
            .command(&["CONFIG", "SET", "tls-ca-cert-file", ca.to_str().unwrap()])
            .await;
        assert_eq!(reply.trim(), "+OK", "CONFIG SET tls-ca-cert-file");
    }

    /// A Redis role on the stack's Vault (named `redis-test-…`) whose ACL users are made
    /// here: a database config of its own for this server, and the role.
    pub async fn vault_role(&self, ttl: &str) -> String {
        let name = format!("redis-test-{}", unique());
        let write = async |path: String, body: serde_json::Value| {
            vault_write(
                &var("VAULT_ADDR"),
                &var("VAULTPOOL_ROOT_TOKEN"),
                reqwest::Method::POST,
                &path,
                body,
            )
            .await;
        };
        write(
            format!("database/config/{name}"),
            serde_json::json!({
                "plugin_name": "redis-database-plugin",
                "host": "127.0.0.1",
                "port": self.port,
                "username": "default",
                "password": self.password,
                "tls": false,
                "allowed_roles": name,
            }),
        )
        .await;
        write(
            format!("database/roles/{name}"),
            serde_json::json!({
                "db_name": name,
                "default_ttl": ttl,
                "max_ttl": ttl,
                "creation_statements": REDIS_RULES,
            }),
        )
        .await;
        name
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Remove the database config `name` from the stack's Vault (after the pool on it was
/// closed), so the stack's Vault does not keep a connection to a server that is gone.
pub async fn remove_vault_db_config(name: &str) {
    let _ = http_for(&var("VAULT_ADDR"))
        .delete(format!("{}/v1/database/config/{name}", var("VAULT_ADDR")))
        .header("X-Vault-Token", var("VAULTPOOL_ROOT_TOKEN"))
        .send()
        .await;
}
