//! Kafka SASL settings kept in KV v2, watched for new versions.
//!
//! Kafka has no dynamic secrets engine: the SASL user and password live in a KV v2 secret
//! (by default `secret/kafka/main`) and are rotated by writing a new version after the
//! broker's SCRAM credentials changed. [`KafkaSasl`] reads that secret, polls its
//! metadata (one cheap call, jittered) and publishes each new, verified version as a
//! [`SaslConfig`] on a [`watch`] channel.
//!
//! The password is a [`SecretString`]: redacted in `Debug`, never logged, and handed
//! only to the Kafka client library (with the `rdkafka` feature,
//! [`SaslConfig::client_config`] and [`RotatingClient`], which gives a running
//! producer or consumer the new credentials without rebuilding it).
//!
//! ## The secret
//!
//! | key | required | meaning |
//! |---|---|---|
//! | `bootstrap_servers` | yes | `host:port[,host:port…]` |
//! | `sasl_username` | yes | the SASL user |
//! | `sasl_password` | yes | its password |
//! | `sasl_mechanism` | no | `SCRAM-SHA-512` (default), `SCRAM-SHA-256` or `PLAIN` |
//! | `security_protocol` | no | `SASL_SSL` or `SASL_PLAINTEXT`; default [`Builder::security_protocol`] |
//!
//! ```no_run
//! # async fn run() -> vaultpool::Result<()> {
//! use vaultpool::kafka::KafkaSasl;
//! use vaultpool::vault::Client;
//!
//! let sasl = KafkaSasl::builder(Client::from_env()?).path("kafka/main").build().await?;
//! let mut updates = sasl.subscribe();
//! println!("Kafka at {} as {}", sasl.current().bootstrap_servers, sasl.current().username);
//! while updates.changed().await.is_ok() {
//!     let config = updates.borrow_and_update().clone();
//!     println!("KV version {} published", config.version);
//! }
//! # Ok(()) }
//! ```

#[cfg(feature = "rdkafka")]
mod live;

use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};
use crate::lease::BoxFuture;
use crate::vault::{Client, KvSecret};

/// The rdkafka crate this module builds on.
#[cfg(feature = "rdkafka")]
pub use ::rdkafka;
#[cfg(feature = "rdkafka")]
pub use live::{RotatingClient, SaslClient, verifier, verify};

/// SASL mechanisms that authenticate with a username and password.
const MECHANISMS: [&str; 3] = ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"];
const PROTOCOLS: [&str; 2] = ["SASL_SSL", "SASL_PLAINTEXT"];

/// One version of the Kafka SASL settings.
///
/// `Debug` shows everything but the password.
#[non_exhaustive]
pub struct SaslConfig {
    /// `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// `SCRAM-SHA-512`, `SCRAM-SHA-256` or `PLAIN`.
    pub mechanism: String,
    /// `SASL_SSL` or `SASL_PLAINTEXT`.
    pub security_protocol: String,
    /// The SASL user.
    pub username: String,
    /// Its password.
    pub password: SecretString,
    /// The KV version these settings were read from.
    pub version: u64,
}

impl SaslConfig {
    fn from_kv(kv: &KvSecret, default_protocol: &str) -> Result<Self> {
        let bad = |key: &str, why: String| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "reading Kafka SASL settings from KV {} (version {}): key {key} {why}",
                    kv.path(),
                    kv.version()
                ),
            )
        };
        let text = |key: &str| -> Result<String> {
            let value = kv.require(key)?.expose_secret().trim().to_owned();
            if value.is_empty() {
                return Err(bad(key, "is empty".into()));
            }
            Ok(value)
        };
        let choice = |key: &str, allowed: &[&str], default: &str| -> Result<String> {
            let value = kv
                .get(key)
                .map(|v| v.expose_secret().trim().to_ascii_uppercase())
                .unwrap_or_else(|| default.to_owned());
            if allowed.contains(&value.as_str()) {
                Ok(value)
            } else {
                Err(bad(key, format!("is {value:?}; use one of {allowed:?}")))
            }
        };
        let bootstrap_servers = text("bootstrap_servers")?;
        if bootstrap_servers.split(',').any(|s| {
            s.trim()
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
        }) {
            return Err(bad(
                "bootstrap_servers",
                format!("is {bootstrap_servers:?}; write host:port[,host:port…]"),
            ));
        }
        let password = kv.require("sasl_password")?.clone();
        if password.expose_secret().is_empty() {
            return Err(bad("sasl_password", "is empty".into()));
        }
        Ok(Self {
            bootstrap_servers,
            mechanism: choice("sasl_mechanism", &MECHANISMS, MECHANISMS[0])?,
            security_protocol: choice("security_protocol", &PROTOCOLS, default_protocol)?,
            username: text("sasl_username")?,
            password,
            version: kv.version(),
        })
    }

    /// Whether `other` reaches the same brokers the same way, so that only the username
    /// and password differ: a running client can then take them without a rebuild.
    pub fn same_connection(&self, other: &SaslConfig) -> bool {
        self.bootstrap_servers == other.bootstrap_servers
            && self.mechanism == other.mechanism
            && self.security_protocol == other.security_protocol
    }
}

impl fmt::Debug for SaslConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaslConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("mechanism", &self.mechanism)
            .field("security_protocol", &self.security_protocol)
            .field("username", &self.username)
            .field("password", &"[REDACTED]")
            .field("version", &self.version)
            .finish()
    }
}

/// Checks a new [`SaslConfig`] before it is published (e.g. [`verifier`]: connect and
/// authenticate to the brokers).
pub type SaslVerifier =
    Arc<dyn Fn(Arc<SaslConfig>) -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// Builds a [`KafkaSasl`].
#[must_use]
pub struct Builder {
    client: Client,
    mount: String,
    path: String,
    poll: Duration,
    security_protocol: String,
    verify: Option<SaslVerifier>,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("mount", &self.mount)
            .field("path", &self.path)
            .field("poll", &self.poll)
            .field("security_protocol", &self.security_protocol)
            .field("verify", &self.verify.is_some())
            .finish()
    }
}

impl Builder {
    /// The KV v2 mount. Default `secret`.
    pub fn mount(mut self, mount: impl Into<String>) -> Self {
        self.mount = mount.into();
        self
    }

    /// The secret's path below the mount. Default `kafka/main`.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// How often the secret's metadata is polled for a new version (each wait jittered
    /// by ±10% so that many services do not poll in step). Default 30 s.
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll = every;
        self
    }

    /// The security protocol when the secret has no `security_protocol` key. Default
    /// `SASL_SSL`; `SASL_PLAINTEXT` only for brokers on a trusted network.
    pub fn security_protocol(mut self, protocol: impl Into<String>) -> Self {
        self.security_protocol = protocol.into().to_ascii_uppercase();
        self
    }

    /// Check each version before publishing it (the first one included). A version that
    /// fails is not published, and is checked again at every poll until it passes or a
    /// newer one is written. Default: none. With the `rdkafka` feature,
    /// [`verifier`] authenticates against the brokers.
    pub fn verify_with(mut self, verify: SaslVerifier) -> Self {
        self.verify = Some(verify);
        self
    }

    /// Read (and verify) the current version, then start polling.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a poll interval of zero, an unknown security protocol or
    /// a secret whose keys are missing or invalid; [`ErrorKind::NotFound`] /
    /// [`ErrorKind::PermissionDenied`] / transport kinds from Vault; whatever the
    /// verifier returns (e.g. [`ErrorKind::AuthenticationFailed`]).
    pub async fn build(self) -> Result<KafkaSasl> {
        let target = format!("{}/{}", self.mount, self.path);
        if self.poll.is_zero() {
            return Err(Error::new(
                ErrorKind::Config,
                format!("watching Kafka SASL settings at {target}: the poll interval is zero"),
            ));
        }
        if !PROTOCOLS.contains(&self.security_protocol.as_str()) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "watching Kafka SASL settings at {target}: security protocol {:?}; use \
                     one of {PROTOCOLS:?}",
                    self.security_protocol
                ),
            ));
        }
        let reader = Reader {
            client: self.client,
            mount: self.mount,
            path: self.path,
            security_protocol: self.security_protocol,
            verify: self.verify,
        };
        let first = reader.read_verified().await?;
        tracing::info!(path = %reader.path, version = first.version, user = %first.username, "Kafka SASL settings published");
        let stats = SaslStatus {
            version: first.version,
            ..SaslStatus::default()
        };
        let inner = Arc::new(Inner {
            reader,
            poll: self.poll,
            tx: watch::channel(first).0,
            check: tokio::sync::Mutex::new(()),
            stats: Mutex::new(stats),
            cancel: CancellationToken::new(),
        });
        tokio::spawn(poll(Arc::downgrade(&inner), inner.cancel.clone()));
        Ok(KafkaSasl { inner })
    }
}

/// Kafka SASL settings from KV v2, re-read when the secret gets a new version.
///
/// Cheap to clone. Polling stops on [`close`](Self::close) or when the last clone is
/// dropped.
#[derive(Clone)]
pub struct KafkaSasl {
    inner: Arc<Inner>,
}

struct Inner {
    reader: Reader,
    poll: Duration,
    tx: watch::Sender<Arc<SaslConfig>>,
    /// One check at a time (the poller, `check_now`).
    check: tokio::sync::Mutex<()>,
    stats: Mutex<SaslStatus>,
    cancel: CancellationToken,
}

/// Reads (and verifies) the newest version of the secret.
struct Reader {
    client: Client,
    mount: String,
    path: String,
    security_protocol: String,
    verify: Option<SaslVerifier>,
}

/// What the watcher has done, for health endpoints and tests.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SaslStatus {
    /// The KV version published now.
    pub version: u64,
    /// Metadata polls made.
    pub polls: u64,
    /// New versions published after the first.
    pub changes: u64,
    /// When the last new version was published.
    pub last_change: Option<Instant>,
    /// The last failure (a poll, a read, a version that failed verification), if the
    /// watcher has not succeeded since.
    pub last_error: Option<String>,
}

impl KafkaSasl {
    /// A builder reading `secret/kafka/main` through `client`.
    pub fn builder(client: Client) -> Builder {
        Builder {
            client,
            mount: "secret".into(),
            path: "kafka/main".into(),
            poll: Duration::from_secs(30),
            security_protocol: PROTOCOLS[0].into(),
            verify: None,
        }
    }

    /// The settings published now.
    pub fn current(&self) -> Arc<SaslConfig> {
        self.inner.tx.borrow().clone()
    }

    /// A receiver that sees every newly published version.
    pub fn subscribe(&self) -> watch::Receiver<Arc<SaslConfig>> {
        self.inner.tx.subscribe()
    }

    /// Poll now instead of waiting for the next tick. `Ok(true)` when a new version was
    /// published.
    ///
    /// # Errors
    /// As [`Builder::build`], for the new version; the published one stays.
    pub async fn check_now(&self) -> Result<bool> {
        self.inner.check().await
    }

    /// The published version, counters and the last error.
    pub fn status(&self) -> SaslStatus {
        self.inner.stats.lock().expect("stats lock").clone()
    }

    /// Where the settings are read from (`mount/path`).
    pub fn target(&self) -> String {
        format!("{}/{}", self.inner.reader.mount, self.inner.reader.path)
    }

    /// Stop polling. The published settings stay readable; receivers see no more changes
    /// (their `changed()` ends once the last handle is dropped).
    pub fn close(&self) {
        self.inner.cancel.cancel();
    }
}

impl fmt::Debug for KafkaSasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSasl")
            .field("target", &self.target())
            .field("poll", &self.inner.poll)
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

impl Reader {
    async fn read_verified(&self) -> Result<Arc<SaslConfig>> {
        let what = || {
            format!(
                "reading Kafka SASL settings from {}/{}",
                self.mount, self.path
            )
        };
        // Always the newest version, never the cache.
        self.client.invalidate_kv(&self.mount, &self.path);
        let kv = self
            .client
            .read_kv(&self.mount, &self.path)
            .await
            .map_err(|e| e.context(what()))?;
        let config = Arc::new(SaslConfig::from_kv(&kv, &self.security_protocol)?);
        if let Some(verify) = &self.verify {
            verify(config.clone()).await.map_err(|e| {
                e.context(format!(
                    "verifying Kafka SASL settings {}/{} version {}",
                    self.mount, self.path, config.version
                ))
            })?;
        }
        Ok(config)
    }
}

impl Inner {
    fn publish(&self, config: Arc<SaslConfig>) {
        let mut stats = self.stats.lock().expect("stats lock");
        stats.changes += 1;
        stats.last_change = Some(Instant::now());
        stats.version = config.version;
        stats.last_error = None;
        drop(stats);
        tracing::info!(
            path = %self.reader.path,
            version = config.version,
            user = %config.username,
            "Kafka SASL settings published"
        );
        self.tx.send_replace(config);
    }

    async fn check(&self) -> Result<bool> {
        let _one = self.check.lock().await;
        let serving = self.tx.borrow().version;
        let reader = &self.reader;
        let result = async {
            let meta = reader
                .client
                .read_kv_metadata(&reader.mount, &reader.path)
                .await?;
            if meta.current_version == serving {
                return Ok(None);
            }
            reader.read_verified().await.map(Some)
        }
        .await;
        let mut stats = self.stats.lock().expect("stats lock");
        stats.polls += 1;
        match result {
            Ok(None) => {
                stats.last_error = None;
                Ok(false)
            }
            Ok(Some(config)) if config.version == serving => Ok(false),
            Ok(Some(config)) => {
                drop(stats);
                self.publish(config);
                Ok(true)
            }
            Err(e) => {
                stats.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }
}

async fn poll(inner: Weak<Inner>, cancel: CancellationToken) {
    loop {
        let Some(every) = inner.upgrade().map(|i| i.poll) else {
            return;
        };
        let wait = every.mul_f64(0.9 + fastrand::f64() * 0.2);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = inner.check().await {
            tracing::warn!(path = %inner.reader.path, error = %e, "Kafka SASL settings: poll failed; the published version stays");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> KvSecret {
        KvSecret::for_test("secret", "kafka/main", 3, pairs)
    }

    fn good() -> Vec<(&'static str, &'static str)> {
        vec![
            ("bootstrap_servers", "127.0.0.1:9092,broker-2:9093"),
            ("sasl_username", "vertice"),
            ("sasl_password", "s3cr3t-pw"),
        ]
    }

    #[test]
    fn reads_defaults_and_redacts() {
        let c = SaslConfig::from_kv(&kv(&good()), "SASL_SSL").unwrap();
        assert_eq!(c.mechanism, "SCRAM-SHA-512");
        assert_eq!(c.security_protocol, "SASL_SSL");
        assert_eq!(c.version, 3);
        let debug = format!("{c:?}");
        assert!(
            debug.contains("vertice") && !debug.contains("s3cr3t-pw"),
            "{debug}"
        );
    }

    #[test]
    fn bad_secrets_name_the_key() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("bootstrap_servers", Some("no-port"), "host:port"),
            ("bootstrap_servers", Some("h:99999"), "host:port"),
            ("bootstrap_servers", None, "\"bootstrap_servers\""),
            ("sasl_password", Some(""), "sasl_password is empty"),
            ("sasl_username", Some("  "), "sasl_username is empty"),
            ("sasl_mechanism", Some("GSSAPI"), "SCRAM-SHA-256"),
            ("security_protocol", Some("PLAINTEXT"), "SASL_PLAINTEXT"),
        ];
        for (key, value, expect) in cases {
            let mut pairs: Vec<_> = good().into_iter().filter(|(k, _)| k != key).collect();
            if let Some(v) = value {
                pairs.push((key, v));
            }
            let e = SaslConfig::from_kv(&kv(&pairs), "SASL_SSL").unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(expect) && msg.contains("kafka/main"),
                "{key}: {msg}"
            );
            assert!(!msg.contains("s3cr3t-pw"), "{msg}");
        }
    }

    #[test]
    fn lowercase_choices_are_accepted_and_connection_compared() {
        let mut pairs = good();
        pairs.push(("sasl_mechanism", "scram-sha-256"));
        let a = SaslConfig::from_kv(&kv(&pairs), "SASL_PLAINTEXT").unwrap();
        assert_eq!(a.mechanism, "SCRAM-SHA-256");
        let b = SaslConfig::from_kv(&kv(&good()), "SASL_PLAINTEXT").unwrap();
        assert!(!a.same_connection(&b));
        assert!(b.same_connection(&SaslConfig::from_kv(&kv(&good()), "SASL_PLAINTEXT").unwrap()));
    }
}
