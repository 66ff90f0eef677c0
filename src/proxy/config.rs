//! The proxy's configuration: a TOML file, then environment overrides.
//!
//! ```toml
//! [listen]
//! tcp = "127.0.0.1:6432"              # VAULTPOOL_PROXY_LISTEN
//! unix_dir = "/run/vaultpool"         # VAULTPOOL_PROXY_UNIX_DIR: socket .s.PGSQL.<port>
//! allowed_uids = [1000]               # VAULTPOOL_PROXY_ALLOWED_UIDS (default: the proxy's own)
//! scram_secret_file = "/run/secrets/vaultpool-proxy"  # VAULTPOOL_PROXY_SECRET_FILE
//! http = "127.0.0.1:9187"             # VAULTPOOL_PROXY_HTTP: /health and /metrics
//!
//! [[database]]
//! name = "app"                         # what clients connect to
//! users = ["app"]                      # the user names they may give (default: any)
//! role = "immune-readwrite"            # Vault database role (dynamic credentials)
//! host = "db.internal"                 # default PGHOST, else 127.0.0.1
//! port = 5432                          # default PGPORT, else 5432
//! dbname = "adaptive_immunity"         # default: name
//! sslmode = "verify-full"              # default PGSSLMODE, else disable
//! sslrootcert = "/etc/ssl/db-ca.pem"   # default PGSSLROOTCERT
//! max_connections = 20
//! ```
//!
//! Vault is configured as for every vaultpool client: `VAULT_ADDR` and the login
//! variables ([`ClientBuilder::from_env`](crate::vault::ClientBuilder::from_env)).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Where clients connect, and how they authenticate.
    #[serde(default)]
    pub listen: Listen,
    /// The databases served (at least one).
    #[serde(default, rename = "database")]
    pub databases: Vec<Database>,
}

/// Listeners and client authentication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Listen {
    /// TCP address (loopback: the proxy is a sidecar). Default `127.0.0.1:6432`;
    /// `""` turns TCP off.
    #[serde(default = "default_tcp")]
    pub tcp: String,
    /// Directory for the Unix socket `.s.PGSQL.<port>` (libpq's layout: `psql -h <dir>
    /// -p <port>`). Default: none.
    pub unix_dir: Option<PathBuf>,
    /// The port in the socket's name. Default: the TCP port, else 6432.
    pub unix_port: Option<u16>,
    /// The Unix socket's permissions, in octal (`"0770"`). Default `"0777"`, as
    /// PostgreSQL's `unix_socket_permissions`: who may log in is decided by
    /// `allowed_uids` and the local secret, and a client with another uid than the
    /// proxy's (the usual sidecar layout) must be able to connect at all.
    pub unix_socket_mode: Option<String>,
    /// The group that owns the Unix socket (a name from /etc/group, or a gid), for a
    /// mode such as `"0770"`. Default: the proxy's.
    pub unix_socket_group: Option<String>,
    /// Peers on the Unix socket with these uids log in without a password
    /// (`SO_PEERCRED`). Default: the proxy's own uid.
    pub allowed_uids: Option<Vec<u32>>,
    /// A file holding the local secret TCP clients (and other uids) give as their
    /// password, checked with SCRAM-SHA-256. Default: none (only trusted peers).
    pub scram_secret_file: Option<PathBuf>,
    /// Address for `/health` and `/metrics`. Default: none.
    pub http: Option<String>,
    /// How long a client may take to start a session (startup and authentication).
    /// Default 10 s.
    #[serde(default = "default_startup_secs")]
    pub startup_timeout_secs: u64,
    /// On SIGTERM, how long sessions may go on before the proxy closes them and revokes
    /// every lease. Default 20 s (the stop then fits a 30 s grace period).
    #[serde(default = "default_shutdown_secs")]
    pub shutdown_timeout_secs: u64,
}

fn default_tcp() -> String {
    "127.0.0.1:6432".into()
}
fn default_startup_secs() -> u64 {
    10
}
/// 20 s: with the 5 s given to sessions cut at the end and the revocations after it, the
/// stop fits in Kubernetes' default grace period (30 s from SIGTERM to SIGKILL).
fn default_shutdown_secs() -> u64 {
    20
}
fn default_max_connections() -> usize {
    20
}
fn default_wait_secs() -> u64 {
    10
}
fn default_mount() -> String {
    "database".into()
}

impl Listen {
    /// The Unix socket's permissions (`unix_socket_mode`, default 0o777).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a mode that is not octal up to 0777.
    pub fn socket_mode(&self) -> Result<u32> {
        let Some(text) = &self.unix_socket_mode else {
            return Ok(0o777);
        };
        u32::from_str_radix(text.trim(), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "listen.unix_socket_mode {text:?} is not a mode: give it in octal, \
                         e.g. \"0770\" (owner and group) or \"0777\" (everyone)"
                    ),
                )
            })
    }
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            tcp: default_tcp(),
            unix_dir: None,
            unix_port: None,
            unix_socket_mode: None,
            unix_socket_group: None,
            allowed_uids: None,
            scram_secret_file: None,
            http: None,
            startup_timeout_secs: default_startup_secs(),
            shutdown_timeout_secs: default_shutdown_secs(),
        }
    }
}

/// One database served: what clients ask for, and the leased login behind it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Database {
    /// The database name clients give.
    pub name: String,
    /// The user names clients may give. Default: any (the client is identified by its
    /// uid or the local secret, not by this name).
    #[serde(default)]
    pub users: Vec<String>,
    /// The Vault database role whose credentials log in.
    pub role: String,
    /// The database secrets engine's mount. Default `database`.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// A static role (`static-creds/<role>`) instead of a dynamic one. Default false.
    #[serde(default)]
    pub static_role: bool,
    /// The server. Default `PGHOST`, else `127.0.0.1`.
    pub host: Option<String>,
    /// Default `PGPORT`, else 5432.
    pub port: Option<u16>,
    /// The server-side database. Default: `name`.
    pub dbname: Option<String>,
    /// libpq's sslmode. Default `PGSSLMODE`, else `disable`.
    pub sslmode: Option<String>,
    /// Default `PGSSLROOTCERT`.
    pub sslrootcert: Option<PathBuf>,
    /// At most this many server connections (= concurrent client sessions). Default 20.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How long a session waits for a free connection before it is refused. Default 10 s.
    #[serde(default = "default_wait_secs")]
    pub wait_timeout_secs: u64,
}

impl Config {
    /// Read `path` (TOML), then apply the environment overrides.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] naming the file and the field.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("reading the proxy configuration {}", path.display()),
            )
            .with_source(e)
        })?;
        let mut config = Self::parse(&text, &path.display().to_string())?;
        config.apply_env(|k| std::env::var(k).ok());
        config.validate()?;
        Ok(config)
    }

    /// Parse TOML text (`what` names it in errors).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] with the line and field.
    pub fn parse(text: &str, what: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "reading the proxy configuration {what}: {}",
                    e.to_string().trim()
                ),
            )
        })
    }

    /// Apply `VAULTPOOL_PROXY_*` overrides and PG defaults from `lookup`.
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = get("VAULTPOOL_PROXY_LISTEN") {
            self.listen.tcp = v;
        }
        if let Some(v) = get("VAULTPOOL_PROXY_UNIX_DIR") {
            self.listen.unix_dir = Some(v.into());
        }
        if let Some(v) = get("VAULTPOOL_PROXY_HTTP") {
            self.listen.http = Some(v);
        }
        if let Some(v) = get("VAULTPOOL_PROXY_SECRET_FILE") {
            self.listen.scram_secret_file = Some(v.into());
        }
        if let Some(v) = get("VAULTPOOL_PROXY_ALLOWED_UIDS") {
            self.listen.allowed_uids =
                Some(v.split(',').filter_map(|u| u.trim().parse().ok()).collect());
        }
        for db in &mut self.databases {
            if db.host.is_none() {
                db.host = get("PGHOST");
            }
            if db.port.is_none() {
                db.port = get("PGPORT").and_then(|p| p.trim().parse().ok());
            }
            if db.sslmode.is_none() {
                db.sslmode = get("PGSSLMODE");
            }
            if db.sslrootcert.is_none() {
                db.sslrootcert = get("PGSSLROOTCERT").map(Into::into);
            }
        }
    }

    /// Check what TOML cannot.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] saying what to fix.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::new(ErrorKind::Config, what));
        if self.databases.is_empty() {
            return bad(
                "the proxy configuration has no [[database]]: add one with name and role".into(),
            );
        }
        if self.listen.tcp.is_empty() && self.listen.unix_dir.is_none() {
            return bad("the proxy listens nowhere: set listen.tcp or listen.unix_dir".into());
        }
        self.listen.socket_mode()?;
        if !self.listen.tcp.is_empty() {
            match self.listen.tcp.parse::<SocketAddr>() {
                Err(e) => {
                    return bad(format!(
                        "listen.tcp {:?} is not an address (ip:port): {e}",
                        self.listen.tcp
                    ));
                }
                // Clients speak plaintext to the proxy: it is a sidecar, on loopback.
                Ok(a) if !a.ip().is_loopback() => {
                    return bad(format!(
                        "listen.tcp {a} is not a loopback address: vaultpool-proxy is a \
                         sidecar and speaks plaintext to its clients; listen on 127.0.0.1 or \
                         ::1, or on a Unix socket"
                    ));
                }
                Ok(_) => {}
            }
        }
        for (i, a) in self.databases.iter().enumerate() {
            if a.name.is_empty() || a.role.is_empty() {
                return bad(format!(
                    "[[database]] #{}: name and role are required",
                    i + 1
                ));
            }
            if self.databases[..i].iter().any(|b| b.name == a.name) {
                return bad(format!("[[database]] {:?} is configured twice", a.name));
            }
            if a.max_connections == 0 || a.max_connections > 10_000 {
                return bad(format!(
                    "[[database]] {:?}: max_connections {} must be 1 to 10000",
                    a.name, a.max_connections
                ));
            }
        }
        Ok(())
    }

    /// The startup timeout.
    pub fn startup_timeout(&self) -> Duration {
        Duration::from_secs(self.listen.startup_timeout_secs.clamp(1, 3600))
    }

    /// The shutdown timeout.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.listen.shutdown_timeout_secs.min(3600))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses_and_env_overrides_it() {
        let mut c = Config::parse(
            r#"
            [listen]
            tcp = "127.0.0.1:7000"
            [[database]]
            name = "app"
            role = "rw"
            [[database]]
            name = "reports"
            role = "ro"
            host = "db"
            port = 6000
            users = ["reporter"]
            "#,
            "test",
        )
        .unwrap();
        c.apply_env(|k| match k {
            "VAULTPOOL_PROXY_LISTEN" => Some("127.0.0.1:7001".into()),
            "PGHOST" => Some("pg".into()),
            "VAULTPOOL_PROXY_ALLOWED_UIDS" => Some("1, 2".into()),
            _ => None,
        });
        c.validate().unwrap();
        assert_eq!(c.listen.tcp, "127.0.0.1:7001");
        assert_eq!(c.listen.allowed_uids, Some(vec![1, 2]));
        assert_eq!(c.databases[0].host.as_deref(), Some("pg"));
        assert_eq!(
            c.databases[1].host.as_deref(),
            Some("db"),
            "the file wins over PGHOST"
        );
        assert_eq!(c.databases[0].max_connections, 20);
        assert_eq!(c.databases[0].mount, "database");
    }

    #[test]
    fn bad_files_say_what_to_fix() {
        let cases = [
            ("", "no [[database]]"),
            ("[[database]]\nname = \"a\"\n", "role"),
            (
                "[[database]]\nname = \"a\"\nrole = \"r\"\ncolour = 1\n",
                "colour",
            ),
            (
                "[listen]\ntcp = \"nowhere\"\n[[database]]\nname = \"a\"\nrole = \"r\"\n",
                "not an address",
            ),
            (
                "[[database]]\nname = \"a\"\nrole = \"r\"\n[[database]]\nname = \"a\"\nrole = \"s\"\n",
                "twice",
            ),
            (
                "[[database]]\nname = \"a\"\nrole = \"r\"\nmax_connections = 0\n",
                "max_connections",
            ),
            (
                "[listen]\ntcp = \"0.0.0.0:6432\"\n[[database]]\nname = \"a\"\nrole = \"r\"\n",
                "not a loopback address",
            ),
        ];
        for (text, want) in cases {
            let e = Config::parse(text, "t")
                .and_then(|c| c.validate())
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config);
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
    }
}
