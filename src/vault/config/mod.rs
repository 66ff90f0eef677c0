//! [`ClientBuilder`]: every setting of the client, from code or from the Vault CLI's
//! environment variables (read in `env.rs`), and [`ClientBuilder::build`], which checks
//! them and makes the HTTP client.

mod env;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::auth::{AuthMethod, TokenManager};
use super::breaker::{Breaker, BreakerConfig};
use super::{Client, ClientState, kv};
use crate::error::{Error, ErrorKind, Result};
use crate::watched::{FileKind, Watched, WatchedFile};

/// Retry settings for transient failures (connect errors, timeouts, HTTP 5xx and 429).
/// 4xx answers are never retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Retries after the first attempt. Default 3 (`VAULT_MAX_RETRIES`). Zero disables.
    pub max_retries: usize,
    /// First backoff delay. Default 100 ms; it doubles per retry, with full jitter.
    pub min_delay: Duration,
    /// Cap on one backoff delay. Default 2 s.
    pub max_delay: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 3,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

/// Builds a [`Client`]. Start from [`ClientBuilder::new`] (all defaults) or
/// [`ClientBuilder::from_env`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ClientBuilder {
    address: Option<String>,
    namespace: Option<String>,
    auth: Option<AuthMethod>,
    ca_cert: Option<PathBuf>,
    ca_pem: Option<Vec<u8>>,
    client_cert: Option<(PathBuf, PathBuf)>,
    skip_verify: bool,
    connect_timeout: Duration,
    request_timeout: Duration,
    retry: RetryConfig,
    breaker: BreakerConfig,
    kv_cache_ttl: Duration,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientBuilder {
    /// A builder with no address, no auth, and these defaults: TLS verification on with
    /// the platform's roots, connect timeout 3 s, request timeout 15 s, 3 retries
    /// (100 ms … 2 s, jittered), breaker opens after 5 consecutive transport failures for
    /// 5 s, KV cache TTL 5 min.
    pub fn new() -> Self {
        Self {
            address: None,
            namespace: None,
            auth: None,
            ca_cert: None,
            ca_pem: None,
            client_cert: None,
            skip_verify: false,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(15),
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
            kv_cache_ttl: Duration::from_secs(300),
        }
    }

    /// The Vault address (`https://host:8200`). Required; no default.
    ///
    /// For an HA cluster give every node, comma-separated (`VAULT_ADDR` takes the same
    /// form) or with [`addresses`](Self::addresses): requests go to one node (standbys
    /// serve reads and forward writes); when a node cannot be reached the client moves to
    /// the next one, and the retry goes there.
    pub fn address(mut self, addr: impl Into<String>) -> Self {
        self.address = Some(addr.into());
        self
    }

    /// Every node of an HA cluster, tried in this order (see [`address`](Self::address)).
    pub fn addresses<I, S>(self, addrs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let joined: Vec<String> = addrs.into_iter().map(Into::into).collect();
        self.address(joined.join(","))
    }

    /// How to authenticate. Required; no default.
    pub fn auth(mut self, auth: AuthMethod) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Shorthand for `auth(AuthMethod::token(token))`.
    pub fn token(self, token: impl Into<String>) -> Self {
        self.auth(AuthMethod::token(token))
    }

    /// Shorthand for `auth(AuthMethod::app_role(role_id, secret_id))`.
    pub fn app_role(self, role_id: impl Into<String>, secret_id: impl Into<String>) -> Self {
        self.auth(AuthMethod::app_role(role_id, secret_id))
    }

    /// The Vault Enterprise / OpenBao namespace. Default: none.
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = Some(ns.into());
        self
    }

    /// Trust only the CA certificate(s) in this PEM file (like `VAULT_CACERT`), read
    /// again when it changes (looked at no more than once a second, as requests go out).
    /// Default: the platform's roots.
    pub fn ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_cert = Some(path.into());
        self
    }

    /// A client certificate and its key (PEM files, like `VAULT_CLIENT_CERT` and
    /// `VAULT_CLIENT_KEY`), presented on every connection to Vault: the credential of
    /// [`AuthMethod::Cert`], and what a listener with `tls_require_and_verify_client_cert`
    /// asks of every client. Default: none.
    ///
    /// The files are read again when they change (cert-manager renews them on disk):
    /// looked at no more than once a second as requests go out; the HTTP client is then
    /// made again, so new connections (and the next login) present the new certificate.
    /// A pair that does not fit (a copy under way) keeps the previous one in use and is
    /// tried again a second later.
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// Trust only these PEM CA certificate(s). Default: the platform's roots.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Disable TLS certificate verification. Default `false`. Only for local testing.
    pub fn danger_skip_verify(mut self, skip: bool) -> Self {
        self.skip_verify = skip;
        self
    }

    /// TCP connect timeout. Default 3 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Timeout of one HTTP request, connect included. Default 15 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Retry settings. Default [`RetryConfig::default`].
    pub fn retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// Retries after the first attempt. Default 3.
    pub fn max_retries(mut self, n: usize) -> Self {
        self.retry.max_retries = n;
        self
    }

    /// Circuit breaker settings. Default [`BreakerConfig::default`].
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.breaker = breaker;
        self
    }

    /// How long a KV v2 read is served from the cache. Default 5 min; `Duration::ZERO`
    /// turns the cache off. A secret is never served past this TTL.
    pub fn kv_cache_ttl(mut self, ttl: Duration) -> Self {
        self.kv_cache_ttl = ttl;
        self
    }

    /// Build the client. No request is sent yet; call [`Client::login`] to check the
    /// credentials at startup.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when the address is missing or not an http(s) URL, no auth
    /// method is set, or the CA certificate cannot be read or parsed.
    pub fn build(self) -> Result<Client> {
        let raw = self.address.ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "building the Vault client: no address; call .address(…) or set VAULT_ADDR",
            )
        })?;
        let addrs = raw
            .split(',')
            .filter(|a| !a.trim().is_empty())
            .map(parse_address)
            .collect::<Result<Vec<_>>>()?;
        if addrs.is_empty() {
            return Err(parse_address(&raw).err().unwrap_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    "building the Vault client: the address is empty",
                )
            }));
        }
        let auth = self.auth.ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "building the Vault client: no auth method; set VAULT_TOKEN, or VAULT_AUTH_METHOD, or \
                 VAULT_ROLE_ID and VAULT_SECRET_ID, or call .auth(…)",
            )
        })?;
        if self.client_cert.is_none() && matches!(auth, AuthMethod::Cert { .. }) {
            return Err(Error::new(
                ErrorKind::Config,
                "building the Vault client: TLS-certificate login needs a client \
                 certificate; set VAULT_CLIENT_CERT and VAULT_CLIENT_KEY, or call \
                 .client_cert(…)",
            ));
        }
        if self.skip_verify {
            tracing::warn!("TLS verification of Vault is disabled (VAULT_SKIP_VERIFY)");
        }
        let tls = HttpSettings {
            ca_pem: self.ca_pem,
            ca_cert: self.ca_cert,
            client_cert: self.client_cert,
            skip_verify: self.skip_verify,
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
        };
        // The files given by path are read again when they change (cert-manager renews
        // them on disk); a new HTTP client then replaces the old one, and with it the
        // kept-alive connections that present the old certificate.
        let http = Watched::new(tls.what(), tls.files(), move || tls.http_client())?;
        let cache_ttl = (!self.kv_cache_ttl.is_zero()).then_some(self.kv_cache_ttl);
        Ok(Client {
            inner: Arc::new(ClientState {
                http,
                addrs,
                current: std::sync::atomic::AtomicUsize::new(0),
                namespace: self.namespace,
                retry: self.retry,
                breaker: Breaker::new(self.breaker),
                auth: TokenManager::new(auth),
                kv_cache: kv::Cache::new(cache_ttl),
                behind_cache: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }
}

/// What the HTTP client to Vault is made of: the TLS files and settings, and the timeouts.
struct HttpSettings {
    ca_pem: Option<Vec<u8>>,
    ca_cert: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
    skip_verify: bool,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl HttpSettings {
    /// What the files are, for messages.
    fn what(&self) -> &'static str {
        if self.client_cert.is_some() {
            "the Vault client certificate"
        } else {
            "the Vault CA certificate"
        }
    }

    /// The files given by path, watched for changes (PEM given as bytes is not a file).
    fn files(&self) -> Vec<WatchedFile> {
        let mut files = Vec::new();
        if let (None, Some(ca)) = (&self.ca_pem, &self.ca_cert) {
            files.push(WatchedFile::new(ca, "VAULT_CACERT", FileKind::Ca));
        }
        if let Some((cert, key)) = &self.client_cert {
            files.push(WatchedFile::new(
                cert,
                "VAULT_CLIENT_CERT",
                FileKind::Certificate,
            ));
            files.push(WatchedFile::new(key, "VAULT_CLIENT_KEY", FileKind::Key));
        }
        files
    }

    /// The HTTP client, the files read now.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] naming the file that cannot be read or used.
    fn http_client(&self) -> Result<reqwest::Client> {
        let mut http = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("vaultpool/", env!("CARGO_PKG_VERSION")));
        let pem = match (&self.ca_pem, &self.ca_cert) {
            (Some(pem), _) => Some((pem.clone(), "the given CA PEM".to_owned())),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    Error::new(
                        ErrorKind::Config,
                        format!(
                            "reading the CA certificate file {} (VAULT_CACERT)",
                            path.display()
                        ),
                    )
                    .with_source(e)
                })?;
                Some((pem, format!("the CA certificate file {}", path.display())))
            }
            (None, None) => None,
        };
        if let Some((pem, what)) = pem {
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!(
                            "loading {what}: it holds no PEM certificate; point VAULT_CACERT \
                             (or ClientBuilder::ca_cert) at the PEM file of Vault's CA"
                        ),
                    )
                })?;
            http = http.tls_certs_only(certs);
        }
        if let Some((cert, key)) = &self.client_cert {
            http = http.identity(client_identity(cert, key)?);
        }
        if self.skip_verify {
            http = http.tls_danger_accept_invalid_certs(true);
        }
        http.build().map_err(|e| {
            let what = match &self.client_cert {
                // reqwest checks the pair only here: name the files.
                Some((cert, key)) => format!(
                    "building the HTTP client for Vault with the client certificate {} and the \
                     key {}: check that they are a PEM certificate and private key that belong \
                     together (VAULT_CLIENT_CERT / VAULT_CLIENT_KEY)",
                    cert.display(),
                    key.display()
                ),
                None => "building the HTTP client for Vault".to_owned(),
            };
            Error::new(ErrorKind::Config, what).with_source(e)
        })
    }
}

/// The client certificate and key as reqwest's identity; a `Config` error names the file.
fn client_identity(cert: &std::path::Path, key: &std::path::Path) -> Result<reqwest::Identity> {
    let read = |path: &std::path::Path, var: &str| {
        std::fs::read(path).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "reading the Vault client certificate file {} ({var})",
                    path.display()
                ),
            )
            .with_source(e)
        })
    };
    let mut pem = read(cert, "VAULT_CLIENT_CERT")?;
    pem.push(b'\n');
    pem.extend(read(key, "VAULT_CLIENT_KEY")?);
    reqwest::Identity::from_pem(&pem).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!(
                "loading the Vault client certificate {} with the key {}: not a PEM certificate \
                 and private key that belong together (VAULT_CLIENT_CERT / VAULT_CLIENT_KEY)",
                cert.display(),
                key.display()
            ),
        )
        .with_source(e)
    })
}

fn parse_address(raw: &str) -> Result<url::Url> {
    // An address with user info may carry a password: never echo it.
    let shown = if raw.contains('@') {
        "(not shown: it has user info)"
    } else {
        raw
    };
    let bad = |why: &str| {
        Error::new(
            ErrorKind::Config,
            format!(
                "parsing the Vault address {shown:?} (VAULT_ADDR): {why}; expected e.g. \
                 https://vault.internal:8200"
            ),
        )
    };
    let mut url = url::Url::parse(raw.trim()).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("it must not carry credentials"));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_addresses_are_config_errors() {
        for raw in [
            "",
            "not a url",
            "ftp://x:1",
            "http://",
            "http://u:p@host:1",
            "127.0.0.1:8200",
        ] {
            let err = Client::builder()
                .address(raw)
                .token("t")
                .build()
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{raw}");
            assert!(!err.to_string().contains("u:p@"), "{err}");
        }
    }

    #[test]
    fn address_gets_a_trailing_slash() {
        assert_eq!(parse_address("http://h:1").unwrap().as_str(), "http://h:1/");
        assert_eq!(
            parse_address("http://h:1/proxy").unwrap().as_str(),
            "http://h:1/proxy/"
        );
    }

    #[test]
    fn several_addresses_make_an_ha_client() {
        let c = Client::builder()
            .address("http://a:8200, http://b:8200,")
            .token("t")
            .build()
            .unwrap();
        assert_eq!(
            c.addresses().collect::<Vec<_>>(),
            ["http://a:8200/", "http://b:8200/"]
        );
        assert_eq!(c.address(), "http://a:8200/");
        let c = Client::builder()
            .addresses(["http://a:1", "https://b:2"])
            .token("t")
            .build()
            .unwrap();
        assert_eq!(c.addresses().count(), 2);
        for bad in ["http://a:1,ftp://b", ",", "http://a:1,not a url"] {
            let e = Client::builder()
                .address(bad)
                .token("t")
                .build()
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{bad}: {e}");
        }
    }

    #[test]
    fn missing_auth_is_a_config_error() {
        let err = Client::builder()
            .address("http://127.0.0.1:1")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("VAULT_TOKEN"), "{err}");
    }

    #[test]
    fn unreadable_or_empty_ca_file_is_a_config_error() {
        let err = Client::builder()
            .address("https://127.0.0.1:1")
            .token("t")
            .ca_cert("/nonexistent/ca.pem")
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let err = Client::builder()
            .address("https://127.0.0.1:1")
            .token("t")
            .ca_pem(b"not a certificate".to_vec())
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }
}
