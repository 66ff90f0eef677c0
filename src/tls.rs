//! TLS to PostgreSQL with libpq's meaning of `sslmode` (feature `tls`, rustls), and the
//! certificate files for Redis' `rediss://` ([`RedisTls`], with the `redis` feature).
//!
//! [`PgTls`] holds what libpq reads from `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT` and
//! `PGSSLKEY` (or the `sslmode`, `sslrootcert`, `sslcert`, `sslkey` parameters of
//! `DATABASE_URL`), and gives the deadpool flavour its connector. The sqlx flavour reads
//! the same variables through sqlx's own TLS support.
//!
//! | mode | encrypts | checks the CA | checks the host name |
//! |---|---|---|---|
//! | `disable` | no | – | – |
//! | `allow`, `prefer` (default) | if the server offers it | only with a root certificate | no |
//! | `require` | yes, or fails | only with a root certificate (then as `verify-ca`, as libpq does) | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |
//!
//! Where several places name a mode (`DATABASE_URL`, `PGSSLMODE`, a `tokio_postgres`
//! config's own), the strongest wins: a setting is never weakened by another. One
//! difference from libpq: `allow` tries TLS first (as `prefer`), where libpq tries
//! plaintext first; both end connected to a server that accepts either. The root
//! certificate is a PEM file, or `system` for the operating system's store (which, as in
//! libpq 16, makes `verify-full` the default and refuses anything weaker); `verify-ca`
//! and `verify-full` need one (libpq's default `~/.postgresql/root.crt` and
//! `postgresql.crt`/`.key` are not read). Certificate files are read when the pool is
//! built, and again when they change (cert-manager renews them on disk): see
//! [`PgConnector`] and [`RedisTls`].
//!
//! The sqlx flavour uses sqlx's own TLS, which differs: its `verify-ca` and `verify-full`
//! trust the public CAs as well as the root certificate given, so `verify-ca` (any
//! public certificate for any name would pass) and `sslrootcert=system` are refused at
//! build; `allow` is plaintext only; `require` never checks the certificate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::error::{Error, ErrorKind, Result};
pub use crate::libpq::SslMode;
#[cfg(any(feature = "postgres", feature = "redis"))]
use crate::watched::{FileKind, Watched, WatchedFile};

/// Where the certificates that sign the server's come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    File(PathBuf),
    System,
}

/// TLS settings for PostgreSQL, as libpq reads them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PgTls {
    mode: SslMode,
    roots: Option<Roots>,
    client: Option<(PathBuf, PathBuf)>,
}

impl PgTls {
    /// These settings with `mode` and nothing else.
    pub fn new(mode: SslMode) -> Self {
        Self {
            mode,
            ..Self::default()
        }
    }

    /// The root certificate(s), a PEM file (libpq's `sslrootcert`), read again when it
    /// changes ([`PgConnector`]).
    #[must_use]
    pub fn root_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.roots = Some(Roots::File(path.into()));
        self
    }

    /// Trust the operating system's certificate store (libpq's `sslrootcert=system`).
    #[must_use]
    pub fn system_roots(mut self) -> Self {
        self.roots = Some(Roots::System);
        self
    }

    /// A client certificate and its key, PEM files (libpq's `sslcert`, `sslkey`), read
    /// again when they change ([`PgConnector`]).
    #[must_use]
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client = Some((cert.into(), key.into()));
        self
    }

    /// The mode.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// These settings merged with `other` (the environment's): the stronger mode when
    /// `other_named` (it named one), and each certificate file from `other` where these
    /// have none.
    #[cfg(feature = "postgres")]
    pub(crate) fn merged_with(self, other: Self, other_named: bool) -> Self {
        Self {
            mode: if other_named {
                self.mode.max(other.mode)
            } else {
                self.mode
            },
            roots: self.roots.or(other.roots),
            client: self.client.or(other.client),
        }
    }

    /// Whether the root certificates are the system's (`sslrootcert=system`).
    #[cfg(feature = "postgres")]
    pub(crate) fn uses_system_roots(&self) -> bool {
        self.roots == Some(Roots::System)
    }

    /// The same settings, with `mode` if it is stronger (never weaker).
    #[must_use]
    pub fn at_least(mut self, mode: SslMode) -> Self {
        self.mode = self.mode.max(mode);
        self
    }

    /// From `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY` and `url_params` (those
    /// of `DATABASE_URL`): the strongest `sslmode` of all; for the files, the URL's win.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for an unknown mode, or a certificate without its key.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
        url_params: &[(String, String)],
    ) -> Result<Self> {
        let get = |param: &str, var: &str| {
            url_params
                .iter()
                .rev()
                .find(|(k, _)| k == param)
                .map(|(_, v)| v.clone())
                .or_else(|| lookup(var))
                .filter(|v| !v.trim().is_empty())
        };
        // Never weaker than any place that names a mode: the URL's parameter and
        // PGSSLMODE may both be set.
        let named: Vec<String> = url_params
            .iter()
            .filter(|(k, _)| k == "sslmode")
            .map(|(_, v)| v.clone())
            .chain(lookup("PGSSLMODE"))
            .filter(|v| !v.trim().is_empty())
            .collect();
        let mode = SslMode::strongest(named.iter().map(String::as_str), "sslmode")?;
        let root = get("sslrootcert", "PGSSLROOTCERT");
        let system = root.as_deref().is_some_and(|r| r.trim() == "system");
        // libpq 16: sslrootcert=system makes verify-full the default.
        let mut tls = Self::new(mode.unwrap_or(if system {
            SslMode::VerifyFull
        } else {
            SslMode::Prefer
        }));
        if let Some(root) = root {
            tls = if system {
                tls.system_roots()
            } else {
                tls.root_cert(root.trim())
            };
        }
        match (get("sslcert", "PGSSLCERT"), get("sslkey", "PGSSLKEY")) {
            (Some(cert), Some(key)) => tls = tls.client_cert(cert.trim(), key.trim()),
            (None, None) => {}
            _ => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "reading the PostgreSQL client certificate: set both PGSSLCERT and \
                     PGSSLKEY (or sslcert and sslkey), or neither",
                ));
            }
        }
        Ok(tls)
    }

    /// The rustls configuration for these settings, `None` for `disable`.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when `verify-ca`/`verify-full` has no root certificate, or a
    /// file cannot be read or holds no certificate or key (the message names the file).
    pub fn rustls_config(&self) -> Result<Option<rustls::ClientConfig>> {
        if self.mode == SslMode::Disable {
            return Ok(None);
        }
        self.enabled_config().map(Some)
    }

    /// [`rustls_config`](Self::rustls_config) for any mode but `disable`.
    fn enabled_config(&self) -> Result<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = client_config_builder(provider.clone(), "PostgreSQL")?;
        let verifier: Arc<dyn ServerCertVerifier> = match (&self.roots, self.mode) {
            (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "configuring TLS for PostgreSQL: sslmode={} needs the certificate that \
                         signed the server's; set PGSSLROOTCERT (or sslrootcert) to its PEM \
                         file, or to `system` for the system's store",
                        self.mode
                    ),
                ));
            }
            (None, _) => Arc::new(AnyHostName {
                roots: None,
                provider,
            }),
            (Some(Roots::System), mode) if mode != SslMode::VerifyFull => {
                // As libpq 16: any public CA can sign a certificate for some name, so the
                // system's store means nothing without the name check.
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "configuring TLS for PostgreSQL: sslrootcert=system needs \
                         sslmode=verify-full (it is {}); the system's store trusts every \
                         public CA",
                        self.mode
                    ),
                ));
            }
            (Some(roots), mode) => {
                let roots = Arc::new(root_store(roots, PG_CERT_VARS, "PostgreSQL")?);
                if mode == SslMode::VerifyFull {
                    let verifier: Arc<dyn ServerCertVerifier> =
                        rustls::client::WebPkiServerVerifier::builder_with_provider(
                            roots, provider,
                        )
                        .build()
                        .map_err(|e| {
                            Error::new(ErrorKind::Config, "configuring TLS for PostgreSQL")
                                .with_source(e)
                        })?;
                    verifier
                } else {
                    Arc::new(AnyHostName {
                        roots: Some(roots),
                        provider,
                    })
                }
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        Ok(match &self.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => with_client_cert(
                builder,
                (cert, key),
                (PG_CERT_VARS, "PGSSLKEY"),
                "PostgreSQL",
            )?,
        })
    }

    /// The files these settings name (the root certificate unless `system`, the client
    /// certificate and key), for watching.
    #[cfg(feature = "postgres")]
    fn files(&self) -> Vec<WatchedFile> {
        let mut files = Vec::new();
        if let Some(Roots::File(path)) = &self.roots {
            files.push(WatchedFile::new(path, "PGSSLROOTCERT", FileKind::Ca));
        }
        if let Some((cert, key)) = &self.client {
            files.push(WatchedFile::new(cert, "PGSSLCERT", FileKind::Certificate));
            files.push(WatchedFile::new(key, "PGSSLKEY", FileKind::Key));
        }
        files
    }

    /// The connector for tokio-postgres, `None` for `disable`: it reads the certificate
    /// files again when they change ([`PgConnector`]).
    ///
    /// # Errors
    /// As [`rustls_config`](Self::rustls_config).
    #[cfg(feature = "postgres")]
    pub fn connector(&self) -> Result<Option<PgConnector>> {
        if self.mode == SslMode::Disable {
            return Ok(None);
        }
        let settings = self.clone();
        let what = if self.client.is_some() {
            "the PostgreSQL client certificate"
        } else {
            "the PostgreSQL root certificate"
        };
        let config = Watched::new(what, self.files(), move || {
            settings
                .enabled_config()
                .map(tokio_postgres_rustls::MakeRustlsConnect::new)
        })?;
        Ok(Some(PgConnector { config }))
    }
}

/// The TLS connector for tokio-postgres made by [`PgTls::connector`]: rustls with
/// libpq's meaning of the settings, whose certificate files (`PGSSLROOTCERT`,
/// `PGSSLCERT`, `PGSSLKEY`) are read again when they change — looked at no more than
/// once a second, as a connection is opened. New connections use the new files; open
/// ones keep the session they have. Files that changed but cannot be used (a new
/// certificate beside the old key while a copy is under way) leave the previous ones in
/// use, with a warning naming them, and are tried again at the next look.
#[cfg(feature = "postgres")]
#[derive(Clone)]
pub struct PgConnector {
    config: Watched<tokio_postgres_rustls::MakeRustlsConnect>,
}

#[cfg(feature = "postgres")]
impl fmt::Debug for PgConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConnector")
            .field("files", &self.config)
            .finish()
    }
}

#[cfg(feature = "postgres")]
impl PgConnector {
    /// What the certificate files held when last read (and why changed ones cannot be
    /// used), for the message of a connection the server refused for its certificate;
    /// `None` without files.
    pub(crate) fn describe(&self) -> Option<String> {
        self.config.watches_files().then(|| self.config.describe())
    }
}

#[cfg(feature = "postgres")]
impl<S> tokio_postgres::tls::MakeTlsConnect<S> for PgConnector
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Stream;
    type TlsConnect = <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::TlsConnect;
    type Error =
        <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Error;

    fn make_tls_connect(
        &mut self,
        domain: &str,
    ) -> std::result::Result<Self::TlsConnect, Self::Error> {
        tokio_postgres::tls::MakeTlsConnect::<S>::make_tls_connect(
            &mut (*self.config.get()).clone(),
            domain,
        )
    }
}

/// TLS settings for Redis (`rediss://`, feature `redis` too): the CA that signed the
/// server's certificate (default: the operating system's store) and an optional client
/// certificate. The server's certificate and host name are always checked (redis'
/// `#insecure` is refused).
///
/// Read from `REDIS_TLS_CA_FILE`, `REDIS_TLS_CERT_FILE` and `REDIS_TLS_KEY_FILE` when none
/// is set on the builder ([`redis::Builder::tls`](crate::redis::Builder::tls)); files
/// are read when the pool is built, and again when they change (looked at no more than
/// once a second, as a connection is opened): new connections use what is on disk. Files
/// that changed but cannot be used (a new certificate beside the old key while a copy is
/// under way) leave the previous ones in use, with a warning naming them, and are tried
/// again at the next look.
///
/// **Process-wide side effect:** redis builds its TLS configuration with rustls'
/// process-default crypto provider. When the application has installed none by the
/// first `rediss://` connection, vaultpool installs aws-lc-rs (the one it uses itself);
/// an application that wants another (ring, a FIPS build) must install it *before*
/// building the pool — installing one afterwards fails (`install_default` returns an
/// error; `.expect(…)` on it would panic).
#[cfg(feature = "redis")]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RedisTls {
    root_cert: Option<PathBuf>,
    client: Option<(PathBuf, PathBuf)>,
}

#[cfg(feature = "redis")]
impl RedisTls {
    /// The system's store, no client certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// The CA certificate(s) that sign the server's, a PEM file (`redis-cli --cacert`).
    #[must_use]
    pub fn root_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.root_cert = Some(path.into());
        self
    }

    /// A client certificate and its key, PEM files (`redis-cli --cert`, `--key`), for a
    /// server with `tls-auth-clients yes`.
    #[must_use]
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client = Some((cert.into(), key.into()));
        self
    }

    /// From `REDIS_TLS_CA_FILE`, `REDIS_TLS_CERT_FILE` and `REDIS_TLS_KEY_FILE`; `None`
    /// when none is set.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a certificate without its key, or a key without its
    /// certificate.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let get = |k: &str| {
            lookup(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let root = get("REDIS_TLS_CA_FILE");
        let client = match (get("REDIS_TLS_CERT_FILE"), get("REDIS_TLS_KEY_FILE")) {
            (Some(cert), Some(key)) => Some((cert.into(), key.into())),
            (None, None) => None,
            _ => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "reading the Redis client certificate: set both REDIS_TLS_CERT_FILE and \
                     REDIS_TLS_KEY_FILE, or neither",
                ));
            }
        };
        Ok((root.is_some() || client.is_some()).then(|| Self {
            root_cert: root.map(PathBuf::from),
            client,
        }))
    }

    /// The files read and checked, in the form redis takes them, and read again when
    /// they change (see [`Watched`]): each new connection takes the current ones.
    pub(crate) fn watched_certificates(&self) -> Result<Watched<::redis::TlsCertificates>> {
        let mut files = Vec::new();
        if let Some(path) = &self.root_cert {
            files.push(WatchedFile::new(path, "REDIS_TLS_CA_FILE", FileKind::Ca));
        }
        let what = match &self.client {
            Some((cert, key)) => {
                files.push(WatchedFile::new(
                    cert,
                    "REDIS_TLS_CERT_FILE",
                    FileKind::Certificate,
                ));
                files.push(WatchedFile::new(key, "REDIS_TLS_KEY_FILE", FileKind::Key));
                "the Redis client certificate"
            }
            None => "the Redis CA certificate",
        };
        let settings = self.clone();
        Watched::new(what, files, move || settings.certificates())
    }

    /// The files read and checked (a CA that parses, a key that fits its certificate), in
    /// the form redis takes them.
    fn certificates(&self) -> Result<::redis::TlsCertificates> {
        const VARS: &str = "REDIS_TLS_CA_FILE / REDIS_TLS_CERT_FILE";
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "reading the Redis TLS file {}: check the path ({VARS})",
                        path.display()
                    ),
                )
                .with_source(e)
            })
        };
        let root_cert = match &self.root_cert {
            Some(path) => {
                root_store(&Roots::File(path.clone()), VARS, "Redis")?;
                Some(read(path)?)
            }
            None => None,
        };
        let client_tls = match &self.client {
            Some((cert, key)) => {
                // Checked here (the files parse, the key fits the certificate); redis is
                // given the files' bytes and builds its own configuration from them.
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let builder = client_config_builder(provider, "Redis")?
                    .with_root_certificates(rustls::RootCertStore::empty());
                with_client_cert(builder, (cert, key), (VARS, "REDIS_TLS_KEY_FILE"), "Redis")?;
                Some(::redis::ClientTlsConfig {
                    client_cert: read(cert)?,
                    client_key: read(key)?,
                })
            }
            None => None,
        };
        Ok(::redis::TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

/// redis builds its rustls configuration with the process's default crypto provider:
/// install aws-lc-rs (the one vaultpool uses) when the application has chosen none, so
/// that two providers compiled in and none chosen cannot panic inside redis.
#[cfg(feature = "redis")]
pub(crate) fn ensure_default_provider() {
    if CryptoProvider::get_default().is_none() {
        // Another thread may install one between the check and here: either is fine.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

/// The root store for `roots`; `vars` and `what` ("PostgreSQL") for messages.
fn root_store(roots: &Roots, vars: &str, what: &str) -> Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            for cert in certificates(path, vars)? {
                store.add(cert).map_err(|e| {
                    Error::new(
                        ErrorKind::Config,
                        format!(
                            "reading the {what} root certificate {}: not a usable CA \
                             certificate",
                            path.display()
                        ),
                    )
                    .with_source(e)
                })?;
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(Error::new(
                    ErrorKind::Config,
                    "reading the system's certificate store for PostgreSQL (sslrootcert=system): \
                     no certificate found; install ca-certificates or give a PEM file",
                ));
            }
        }
    }
    Ok(store)
}

/// A rustls client configuration builder on `provider`'s safe default protocol
/// versions; `what` ("PostgreSQL") names the server, for messages.
fn client_config_builder(
    provider: Arc<CryptoProvider>,
    what: &str,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>> {
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| {
            Error::new(ErrorKind::Config, format!("configuring TLS for {what}")).with_source(e)
        })
}

/// `builder` finished with the client certificate `cert` and its key `key` (PEM files),
/// which must fit each other; `vars` and `key_var` name the settings that give them and
/// `what` ("PostgreSQL") the server, for messages.
fn with_client_cert(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    (cert, key): (&Path, &Path),
    (vars, key_var): (&str, &str),
    what: &str,
) -> Result<rustls::ClientConfig> {
    builder
        .with_client_auth_cert(certificates(cert, vars)?, private_key(key, key_var)?)
        .map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "configuring the {what} client certificate {}: the key {} does not fit it",
                    cert.display(),
                    key.display()
                ),
            )
            .with_source(e)
        })
}

/// The variables that name PostgreSQL's certificate files, for messages.
const PG_CERT_VARS: &str = "PGSSLROOTCERT / PGSSLCERT";

fn certificates(path: &Path, vars: &str) -> Result<Vec<CertificateDer<'static>>> {
    let read = |e: &dyn fmt::Display| {
        Error::new(
            ErrorKind::Config,
            format!(
                "reading the certificate file {}: {e}; check the path ({vars}) and that it \
                 holds PEM certificates",
                path.display()
            ),
        )
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(&e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| read(&e))?;
    if certs.is_empty() {
        return Err(read(&"no certificate in it"));
    }
    Ok(certs)
}

fn private_key(path: &Path, var: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!(
                "reading the client key file {}: {e}; check {var} and that it holds a PEM \
                 private key",
                path.display()
            ),
        )
    })
}

/// `verify-ca` (with `roots`): the chain must lead to the root certificate; the name is
/// not checked. The chain is verified directly (not by mapping a name error of the full
/// check to success), so no other failure can pass for a name mismatch.
/// `prefer`/`require` without a root certificate (`roots` none): encrypted, the
/// certificate not checked (libpq's behaviour). Either way the handshake's signatures are.
#[derive(Debug)]
struct AnyHostName {
    roots: Option<Arc<rustls::RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl AnyHostName {
    /// The provider's algorithms, which check the handshake's signatures.
    fn algorithms(&self) -> &rustls::crypto::WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

impl ServerCertVerifier for AnyHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms().all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "postgres")]
    #[test]
    fn settings_given_in_code_merge_with_the_environment_never_weaker() {
        let env = PgTls::new(SslMode::VerifyFull)
            .root_cert("/etc/ca.pem")
            .client_cert("/c", "/k");
        // A weaker mode given in code does not win over one the environment named; the
        // environment's files fill what the code did not give.
        let m = PgTls::new(SslMode::Prefer).merged_with(env.clone(), true);
        assert_eq!(m.mode(), SslMode::VerifyFull);
        assert_eq!(m.roots, Some(Roots::File("/etc/ca.pem".into())));
        assert!(m.client.is_some());
        // The code's own files win; libpq's default `prefer` (named by nobody) is no floor.
        let m = PgTls::new(SslMode::Disable)
            .root_cert("/mine.pem")
            .merged_with(PgTls::new(SslMode::Prefer), false);
        assert_eq!(m.mode(), SslMode::Disable);
        assert_eq!(m.roots, Some(Roots::File("/mine.pem".into())));
        assert!(
            PgTls::from_lookup(|k| (k == "PGSSLROOTCERT").then(|| "system".into()), &[])
                .unwrap()
                .uses_system_roots()
        );
    }
    use crate::test_util::lookup;

    #[test]
    fn libpq_variables_and_url_parameters_are_read() {
        let tls = PgTls::from_lookup(
            lookup(&[("PGSSLMODE", "verify-ca"), ("PGSSLROOTCERT", "/etc/ca.pem")]),
            &[("sslmode".into(), "verify-full".into())],
        )
        .unwrap();
        assert_eq!(tls.mode(), SslMode::VerifyFull, "the stronger wins");
        let weaker_env = PgTls::from_lookup(
            lookup(&[("PGSSLMODE", "disable")]),
            &[("sslmode".into(), "require".into())],
        )
        .unwrap();
        assert_eq!(weaker_env.mode(), SslMode::Require, "never weakened");
        assert_eq!(tls.roots, Some(Roots::File("/etc/ca.pem".into())));
        assert_eq!(
            PgTls::from_lookup(lookup(&[]), &[]).unwrap().mode(),
            SslMode::Prefer
        );
        let system = PgTls::from_lookup(lookup(&[("PGSSLROOTCERT", "system")]), &[]).unwrap();
        assert_eq!(system.roots, Some(Roots::System));
        assert_eq!(
            system.mode(),
            SslMode::VerifyFull,
            "libpq 16's default with system"
        );
        let e = PgTls::new(SslMode::VerifyCa)
            .system_roots()
            .rustls_config()
            .unwrap_err();
        assert!(e.to_string().contains("verify-full"), "{e}");
    }

    #[test]
    fn bad_settings_are_config_errors_that_say_what_to_do() {
        let e = PgTls::from_lookup(lookup(&[("PGSSLMODE", "verify")]), &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("verify-full"), "{e}");
        let e = PgTls::from_lookup(lookup(&[("PGSSLCERT", "/c.pem")]), &[]).unwrap_err();
        assert!(e.to_string().contains("PGSSLKEY"), "{e}");
        let e = PgTls::new(SslMode::VerifyFull).rustls_config().unwrap_err();
        assert!(e.to_string().contains("PGSSLROOTCERT"), "{e}");
        let e = PgTls::new(SslMode::VerifyFull)
            .root_cert("/nonexistent/ca.pem")
            .rustls_config()
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        assert!(
            PgTls::new(SslMode::Disable)
                .rustls_config()
                .unwrap()
                .is_none()
        );
        assert!(
            PgTls::new(SslMode::Require)
                .rustls_config()
                .unwrap()
                .is_some()
        );
    }
}
