//! Kafka SASL settings kept in KV v2, watched for new versions.
//!
//! Kafka has no dynamic secrets engine: the SASL user and password live in a KV v2 secret
//! (by default `secret/kafka/main`) and are rotated by writing a new version after the
//! broker's SCRAM credentials changed. [`KafkaSasl`] is a lease [`Engine`] over that
//! secret ([`KvCredentials`]): it polls the metadata (one cheap call, jittered), reads,
//! parses and verifies each new version and publishes it; [`KafkaSasl::current`] gives it
//! as a [`SaslConfig`].
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
//! let sasl = KafkaSasl::builder(Client::from_env()?).build().await?; // secret/kafka/main
//! let mut updates = sasl.subscribe();
//! println!("Kafka at {} as {}", sasl.current().bootstrap_servers, sasl.current().username);
//! while updates.changed().await.is_ok() {
//!     println!("KV version {} published", sasl.current().version);
//! }
//! # Ok(()) }
//! ```

#[cfg(feature = "rdkafka")]
mod live;

use std::fmt;
use std::sync::{Arc, Mutex};

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;

use crate::credentials::{Credentials, Generation};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{self, BoxFuture, Engine, KvCredentials, Verifier};
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
    /// The settings of credentials read from KV by a [`KvCredentials`] source.
    fn from_credentials(creds: &Credentials, default_protocol: &str) -> Result<Self> {
        let kv = creds.kv_secret().ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "reading Kafka SASL settings: the credentials were not read from KV v2",
            )
        })?;
        Self::from_kv(kv, default_protocol)
    }

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
    secret: KvCredentials,
    security_protocol: String,
    verify: Option<SaslVerifier>,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("secret", &self.secret)
            .field("security_protocol", &self.security_protocol)
            .field("verify", &self.verify.is_some())
            .finish()
    }
}

impl Builder {
    /// Where the settings live and how often they are checked for a new version.
    /// Default `KvCredentials::new("kafka/main")`: `secret/kafka/main`, polled every
    /// 30 s (jittered ±10%). The keys are always `sasl_username` and `sasl_password`.
    pub fn secret(mut self, secret: KvCredentials) -> Self {
        self.secret = secret;
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
    /// newer one is written. Default: none (a version is still parsed and checked for
    /// missing keys). With the `rdkafka` feature, [`verifier`] authenticates against the
    /// brokers.
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
        let secret = self.secret.keys("sasl_username", "sasl_password");
        let target = format!("{}/{}", secret.get_mount(), secret.get_path());
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
        let protocol = self.security_protocol;
        let verify: Verifier = {
            let (protocol, user_verify) = (protocol.clone(), self.verify);
            Arc::new(move |creds: Credentials| {
                let (protocol, user_verify) = (protocol.clone(), user_verify.clone());
                Box::pin(async move {
                    let config = Arc::new(SaslConfig::from_credentials(&creds, &protocol)?);
                    match user_verify {
                        Some(verify) => verify(config.clone()).await.map_err(|e| {
                            e.context(format!(
                                "verifying Kafka SASL settings {} version {}",
                                creds.kv_secret().map_or("", |kv| kv.path()),
                                config.version
                            ))
                        }),
                        None => Ok(()),
                    }
                }) as BoxFuture<'static, Result<()>>
            })
        };
        let engine = Engine::builder(self.client, secret)
            .verify_with(verify)
            .build()
            .await?;
        let first = engine.current();
        let config = Arc::new(SaslConfig::from_credentials(&first.credentials, &protocol)?);
        tracing::info!(path = %target, version = config.version, user = %config.username, "Kafka SASL settings published");
        Ok(KafkaSasl {
            inner: Arc::new(SaslState {
                engine,
                target,
                protocol,
                published: Mutex::new((first.generation, config)),
            }),
        })
    }
}

/// Kafka SASL settings from KV v2, re-read when the secret gets a new version.
///
/// It is a lease [`Engine`] over a [`KvCredentials`] source (the same poll, verify,
/// swap and status as every other source), seen as [`SaslConfig`]s. Cheap to clone.
/// Polling stops on [`close`](Self::close) or when the last clone is dropped.
#[derive(Clone)]
pub struct KafkaSasl {
    inner: Arc<SaslState>,
}

/// What the clones of a [`KafkaSasl`] share: the engine polling the secret, and the
/// settings last parsed from it.
struct SaslState {
    engine: Engine,
    target: String,
    protocol: String,
    /// The generation last parsed, and its settings.
    published: Mutex<(Generation, Arc<SaslConfig>)>,
}

impl KafkaSasl {
    /// A builder reading `secret/kafka/main` through `client`.
    pub fn builder(client: Client) -> Builder {
        Builder {
            client,
            secret: KvCredentials::new("kafka/main"),
            security_protocol: PROTOCOLS[0].into(),
            verify: None,
        }
    }

    /// The settings published now.
    pub fn current(&self) -> Arc<SaslConfig> {
        let current = self.inner.engine.current();
        let mut published = self
            .inner
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Only ever forward: a caller that loaded an older generation before taking the
        // lock must not replace a newer one.
        if current.generation > published.0 {
            // The engine verified exactly this parse before swapping it in.
            match SaslConfig::from_credentials(&current.credentials, &self.inner.protocol) {
                Ok(config) => *published = (current.generation, Arc::new(config)),
                Err(e) => tracing::error!(path = %self.inner.target, "Kafka SASL settings: {e}"),
            }
        }
        published.1.clone()
    }

    /// A receiver that sees every newly published version; read it with
    /// [`current`](Self::current).
    pub fn subscribe(&self) -> watch::Receiver<Generation> {
        self.inner.engine.subscribe()
    }

    /// Poll now instead of waiting for the next tick. `Ok(true)` when a new version was
    /// published.
    ///
    /// # Errors
    /// As [`Builder::build`], for the new version; the published one stays.
    pub async fn check_now(&self) -> Result<bool> {
        self.inner.engine.check_now().await
    }

    /// The engine's status: `polls`, `rotations` (new versions published after the
    /// first), `last_error` (a poll, a read, a version that failed verification, until
    /// the next success).
    pub fn status(&self) -> lease::Status {
        self.inner.engine.status()
    }

    /// The lease engine behind the settings.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Where the settings are read from (`mount/path`).
    pub fn target(&self) -> String {
        self.inner.target.clone()
    }

    /// Stop polling. The published settings stay readable; receivers see no more changes.
    /// Calling it twice is harmless.
    pub async fn close(&self) {
        self.inner.engine.close().await;
    }
}

impl fmt::Debug for KafkaSasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSasl")
            .field("target", &self.inner.target)
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

/// The credentials behind it (e.g. for a health check).
impl AsRef<Engine> for KafkaSasl {
    fn as_ref(&self) -> &Engine {
        self.engine()
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
