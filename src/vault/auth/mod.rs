//! Authentication: how the client gets its Vault token, the token as a lease, and the
//! public calls about it ([`Client::login`](super::Client::login),
//! [`Client::token_info`](super::Client::token_info)).
//!
//! | method | credential | refreshed by |
//! |---|---|---|
//! | [`Token`](AuthMethod::Token) | a static token | renewal while renewable |
//! | [`AppRole`](AuthMethod::AppRole), [`Kubernetes`](AuthMethod::Kubernetes), [`Jwt`](AuthMethod::Jwt), [`Cert`](AuthMethod::Cert), [`Custom`](AuthMethod::Custom) | a login (`auth/<mount>/login`) | renewal, then a new login when the renewal is capped by the token's max TTL |
//! | [`TokenFile`](AuthMethod::TokenFile) | a token file (Vault Agent's file sink) | the file, read again when it changes; never renewed or revoked by us |
//! | [`ProxyAutoAuth`](AuthMethod::ProxyAutoAuth) | none: Vault Proxy adds its own (`use_auto_auth_token`) | the Proxy |
//!
//! Login credentials that live in files (the Kubernetes service-account token, a JWT, an
//! AppRole secret_id file) are read again at every login, never cached: projected tokens
//! rotate. One refresh runs at a time: concurrent callers wait for it and share its
//! result.
//!
//! Old tokens are not revoked on re-login: revoking a token revokes every lease issued
//! under it (database credentials included). They expire by their own TTL; the lease
//! engine rotates leases issued under a token before that token's end, once it is known
//! (a capped renewal, a replaced token file, a new token behind the Proxy).
//!
//! This file is what a user configures ([`AuthMethod`], [`Login`]) and the login request
//! each method makes. Beside it: `token.rs`, the token manager (the token kept like a
//! lease: renewal, re-login, backoff after failures, the known ends of replaced tokens);
//! `watch.rs`, the tokens that are not ours (Vault Agent's sink file, the Vault Proxy's
//! token); `files.rs`, reading credential files; `advice.rs`, what a refused login says
//! to fix.

mod advice;
mod files;
mod token;
mod watch;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use crate::BoxFuture;
use crate::error::{Error, ErrorKind, Result};
#[cfg(fuzzing)]
pub(crate) use token::LookupSelf;
pub use token::TokenInfo;
pub(crate) use token::TokenManager;

/// Where the Kubernetes service-account token is mounted by default.
pub const KUBERNETES_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// How the client authenticates to Vault.
#[derive(Clone)]
#[non_exhaustive]
pub enum AuthMethod {
    /// A token, used as is (e.g. `VAULT_TOKEN`). Renewed while renewable.
    Token(SecretString),
    /// AppRole login (`auth/{mount}/login`) with a role_id and a secret_id.
    AppRole {
        /// Where the AppRole auth method is mounted. Default `approle`.
        mount: String,
        /// The role_id.
        role_id: SecretString,
        /// The secret_id, given or read from a file at each login.
        secret_id: SecretIdSource,
    },
    /// Kubernetes login (`auth/{mount}/login` with `role` and the pod's service-account
    /// token, read from `token_path` at every login: projected tokens rotate).
    Kubernetes {
        /// Where the Kubernetes auth method is mounted. Default `kubernetes`.
        mount: String,
        /// The Vault role bound to this service account.
        role: String,
        /// The service-account token file. Default [`KUBERNETES_TOKEN_PATH`].
        token_path: PathBuf,
    },
    /// JWT/OIDC login (`auth/{mount}/login` with `role` and a JWT read afresh at every
    /// login).
    Jwt {
        /// Where the JWT auth method is mounted. Default `jwt`.
        mount: String,
        /// The Vault role (`role_type=jwt`).
        role: String,
        /// Where the JWT comes from.
        jwt: JwtSource,
    },
    /// TLS-certificate login (`auth/{mount}/login`): the credential is the client
    /// certificate the client presents on every connection to Vault
    /// ([`ClientBuilder::client_cert`](super::ClientBuilder::client_cert),
    /// `VAULT_CLIENT_CERT`/`VAULT_CLIENT_KEY`).
    Cert {
        /// Where the cert auth method is mounted. Default `cert`.
        mount: String,
        /// The certificate role to log in against; `None` lets Vault pick the one that
        /// matches.
        name: Option<String>,
    },
    /// A token file that another process owns and replaces — Vault Agent's file sink.
    /// Read again to see whether it changed (every second at most, more often as the
    /// token nears its end); the token is never renewed or revoked by vaultpool (the
    /// Agent does that). Leases issued under a token that the Agent replaced rotate
    /// before that token's end.
    TokenFile {
        /// The sink file.
        path: PathBuf,
        /// How long the first read waits for the file to appear (the Agent may not have
        /// written it yet; at most an hour); later reads do not wait. Default 30 s.
        wait: Duration,
    },
    /// No token at all: requests go to a Vault Proxy with `use_auto_auth_token = true`,
    /// which adds its own. The token behind it is looked up (through the Proxy) to learn
    /// when it changes; leases issued under a replaced token rotate before its end. The
    /// Proxy's token must be allowed `auth/token/lookup-self` (Vault's default policy is).
    ProxyAutoAuth,
    /// A login of your own (AWS IAM, GCP, Azure, …): see [`Login`].
    Custom(Arc<dyn Login>),
}

/// Where an AppRole secret_id comes from.
#[derive(Clone)]
#[non_exhaustive]
pub enum SecretIdSource {
    /// The secret_id itself.
    Value(SecretString),
    /// A file holding it, read at each login (so an agent can replace it).
    File(PathBuf),
}

/// Where a JWT comes from; read at every login.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum JwtSource {
    /// A file holding the JWT (e.g. a projected token, or one a CI system writes).
    File(PathBuf),
    /// An environment variable of this process holding the JWT (e.g. a CI job's OIDC
    /// token), read at every login — also when the client was configured with
    /// [`ClientBuilder::from_lookup`](super::ClientBuilder::from_lookup) (`VAULT_JWT`).
    Env(String),
}

/// A login request: the path (`auth/aws/login`) and the JSON body Vault's auth method
/// expects. The body is sent as is and never logged. Made with [`LoginRequest::new`]
/// (more may be added, e.g. headers).
#[derive(Clone)]
#[non_exhaustive]
pub struct LoginRequest {
    /// The login path, without `/v1/`: e.g. `auth/aws/login`.
    pub path: String,
    /// The body, e.g. `{"role": "app", "iam_request_body": "…", …}`.
    pub body: serde_json::Value,
}

impl LoginRequest {
    /// A `PUT` of `body` to `path` (e.g. `auth/aws/login`).
    pub fn new(path: impl Into<String>, body: serde_json::Value) -> Self {
        Self {
            path: path.into(),
            body,
        }
    }
}

impl fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginRequest")
            .field("path", &self.path)
            .field("body", &"[REDACTED]")
            .finish()
    }
}

/// An auth method vaultpool does not ship, as an extension point: build the login
/// request (fresh credentials each time — a signed AWS request, a GCP or Azure identity
/// token), and the client does the rest — sends it, renews the token it gets, logs in
/// again when the renewal is capped or Vault says the token is gone, and the lease
/// engine rotates leases before that token's end.
///
/// ```
/// use vaultpool::BoxFuture;
/// use vaultpool::vault::{AuthMethod, Client, Login, LoginRequest};
///
/// /// GCP-style login: a role and an identity token fetched at each login.
/// struct Gcp { role: String }
///
/// impl Login for Gcp {
///     fn name(&self) -> &str { "gcp" }
///     fn request(&self) -> BoxFuture<'_, vaultpool::Result<LoginRequest>> {
///         Box::pin(async move {
///             let jwt = String::from("…"); // e.g. from the metadata server
///             Ok(LoginRequest::new(
///                 "auth/gcp/login",
///                 serde_json::json!({ "role": self.role, "jwt": jwt }),
///             ))
///         })
///     }
/// }
///
/// let client = Client::builder()
///     .address("https://vault.internal:8200")
///     .auth(AuthMethod::custom(Gcp { role: "app".into() }))
///     .build()?;
/// # let _ = client; Ok::<(), vaultpool::Error>(())
/// ```
pub trait Login: Send + Sync + 'static {
    /// A short name for logs and errors ("aws", "gcp").
    fn name(&self) -> &str;

    /// The request for one login, built afresh each time.
    ///
    /// # Errors
    /// Whatever prevents building it (a credential that cannot be read): it fails the
    /// login with that error.
    fn request(&self) -> BoxFuture<'_, Result<LoginRequest>>;
}

impl AuthMethod {
    /// A static token.
    pub fn token(token: impl Into<String>) -> Self {
        Self::Token(SecretString::from(token.into()))
    }

    /// AppRole at the default mount `approle`.
    pub fn app_role(role_id: impl Into<String>, secret_id: impl Into<String>) -> Self {
        Self::AppRole {
            mount: "approle".into(),
            role_id: SecretString::from(role_id.into()),
            secret_id: SecretIdSource::Value(SecretString::from(secret_id.into())),
        }
    }

    /// AppRole at the default mount, with the secret_id read from `path` at each login.
    pub fn app_role_file(role_id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self::AppRole {
            mount: "approle".into(),
            role_id: SecretString::from(role_id.into()),
            secret_id: SecretIdSource::File(path.into()),
        }
    }

    /// Kubernetes login as `role` at the mount `kubernetes`, with the service-account
    /// token from [`KUBERNETES_TOKEN_PATH`] (change it with
    /// [`with_token_path`](Self::with_token_path)).
    pub fn kubernetes(role: impl Into<String>) -> Self {
        Self::Kubernetes {
            mount: "kubernetes".into(),
            role: role.into(),
            token_path: KUBERNETES_TOKEN_PATH.into(),
        }
    }

    /// JWT login as `role` at the mount `jwt`, the JWT read from `path` at every login.
    pub fn jwt_file(role: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self::Jwt {
            mount: "jwt".into(),
            role: role.into(),
            jwt: JwtSource::File(path.into()),
        }
    }

    /// JWT login as `role` at the mount `jwt`, the JWT read from the environment
    /// variable `var` at every login.
    pub fn jwt_env(role: impl Into<String>, var: impl Into<String>) -> Self {
        Self::Jwt {
            mount: "jwt".into(),
            role: role.into(),
            jwt: JwtSource::Env(var.into()),
        }
    }

    /// TLS-certificate login at the mount `cert`, against the certificate role `name`
    /// (or whichever matches, for `None`). The client certificate is set on the builder.
    pub fn cert(name: Option<String>) -> Self {
        Self::Cert {
            mount: "cert".into(),
            name,
        }
    }

    /// The token in Vault Agent's file sink at `path` (waits up to 30 s for it at the
    /// first read).
    pub fn token_file(path: impl Into<PathBuf>) -> Self {
        Self::TokenFile {
            path: path.into(),
            wait: Duration::from_secs(30),
        }
    }

    /// A login of your own.
    pub fn custom(login: impl Login) -> Self {
        Self::Custom(Arc::new(login))
    }

    /// The same method at another mount (the methods that log in; a token, a token file
    /// and the Proxy have none).
    #[must_use]
    pub fn with_mount(mut self, new_mount: impl Into<String>) -> Self {
        match &mut self {
            Self::AppRole { mount, .. }
            | Self::Kubernetes { mount, .. }
            | Self::Jwt { mount, .. }
            | Self::Cert { mount, .. } => *mount = new_mount.into(),
            _ => {}
        }
        self
    }

    /// The same Kubernetes method with the service-account token read from `path`.
    #[must_use]
    pub fn with_token_path(mut self, path: impl Into<PathBuf>) -> Self {
        if let Self::Kubernetes { token_path, .. } = &mut self {
            *token_path = path.into();
        }
        self
    }

    /// The name for logs and errors.
    pub(crate) fn name(&self) -> String {
        match self {
            Self::Token(_) => "token".into(),
            Self::AppRole { .. } => "approle".into(),
            Self::Kubernetes { .. } => "kubernetes".into(),
            Self::Jwt { .. } => "jwt".into(),
            Self::Cert { .. } => "cert".into(),
            Self::TokenFile { .. } => "token file".into(),
            Self::ProxyAutoAuth => "proxy auto-auth".into(),
            Self::Custom(l) => l.name().to_owned(),
        }
    }

    /// Whether the client gets its token by logging in (and can log in again).
    fn logs_in(&self) -> bool {
        matches!(
            self,
            Self::AppRole { .. }
                | Self::Kubernetes { .. }
                | Self::Jwt { .. }
                | Self::Cert { .. }
                | Self::Custom(_)
        )
    }
}

impl fmt::Debug for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Token(_) => f.write_str("Token([REDACTED])"),
            Self::AppRole {
                mount, secret_id, ..
            } => f
                .debug_struct("AppRole")
                .field("mount", mount)
                .field("role_id", &"[REDACTED]")
                .field("secret_id", secret_id)
                .finish(),
            Self::Kubernetes {
                mount,
                role,
                token_path,
            } => f
                .debug_struct("Kubernetes")
                .field("mount", mount)
                .field("role", role)
                .field("token_path", token_path)
                .finish(),
            Self::Jwt { mount, role, jwt } => f
                .debug_struct("Jwt")
                .field("mount", mount)
                .field("role", role)
                .field("jwt", jwt)
                .finish(),
            Self::Cert { mount, name } => f
                .debug_struct("Cert")
                .field("mount", mount)
                .field("name", name)
                .finish(),
            Self::TokenFile { path, wait } => f
                .debug_struct("TokenFile")
                .field("path", path)
                .field("wait", wait)
                .finish(),
            Self::ProxyAutoAuth => f.write_str("ProxyAutoAuth"),
            Self::Custom(l) => f.debug_tuple("Custom").field(&l.name()).finish(),
        }
    }
}

impl fmt::Debug for SecretIdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(_) => f.write_str("[REDACTED]"),
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

/// How long a custom [`Login::request`] may take.
const CUSTOM_LOGIN_BOUND: Duration = Duration::from_secs(30);

impl AuthMethod {
    /// The request for one login, credentials read afresh.
    async fn login_request(&self) -> Result<LoginRequest> {
        let body = match self {
            AuthMethod::AppRole {
                role_id, secret_id, ..
            } => {
                let secret_id = match secret_id {
                    SecretIdSource::Value(v) => v.clone(),
                    SecretIdSource::File(path) => files::read_secret_id(path)?,
                };
                json!({
                    "role_id": role_id.expose_secret(),
                    "secret_id": secret_id.expose_secret(),
                })
            }
            AuthMethod::Kubernetes {
                role, token_path, ..
            } => {
                let jwt = files::read_service_account_token(token_path)?;
                json!({ "role": role, "jwt": jwt.expose_secret() })
            }
            AuthMethod::Jwt { role, jwt, .. } => {
                let jwt = match jwt {
                    JwtSource::File(path) => files::read_jwt_file(path)?,
                    JwtSource::Env(var) => std::env::var(var)
                        .ok()
                        .map(|v| v.trim().to_owned())
                        .filter(|v| !v.is_empty())
                        .map(SecretString::from)
                        .ok_or_else(|| {
                            Error::new(
                                ErrorKind::Config,
                                format!(
                                    "reading the JWT from the environment variable {var}: it \
                                     is not set or empty; set it, or give a file"
                                ),
                            )
                        })?,
                };
                json!({ "role": role, "jwt": jwt.expose_secret() })
            }
            AuthMethod::Cert { name, .. } => match name {
                Some(name) => json!({ "name": name }),
                None => json!({}),
            },
            AuthMethod::Custom(login) => {
                // Bounded: it runs under the refresh lock that every Vault call may wait on.
                return match tokio::time::timeout(CUSTOM_LOGIN_BOUND, login.request()).await {
                    Ok(r) => r.map_err(|e| {
                        e.context(format!("building the {} login request", login.name()))
                    }),
                    Err(_) => Err(Error::new(
                        ErrorKind::CredentialsUnavailable,
                        format!(
                            "building the {} login request: no answer within \
                             {CUSTOM_LOGIN_BOUND:?}",
                            login.name()
                        ),
                    )),
                };
            }
            AuthMethod::Token(_) | AuthMethod::TokenFile { .. } | AuthMethod::ProxyAutoAuth => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "logging in to Vault: the {} method has no login",
                        self.name()
                    ),
                ));
            }
        };
        let mount = match self {
            AuthMethod::AppRole { mount, .. }
            | AuthMethod::Kubernetes { mount, .. }
            | AuthMethod::Jwt { mount, .. }
            | AuthMethod::Cert { mount, .. } => mount.trim_matches('/'),
            _ => "",
        };
        Ok(LoginRequest::new(format!("auth/{mount}/login"), body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_role_or_secret_id_or_token() {
        let m = AuthMethod::app_role("role-1234", "secret-5678");
        let d = format!("{m:?}");
        assert!(
            !d.contains("role-1234") && !d.contains("secret-5678"),
            "{d}"
        );
        let t = AuthMethod::token("hvs.tokentoken");
        assert!(!format!("{t:?}").contains("tokentoken"));
        let f = AuthMethod::app_role_file("r", "/run/secret_id").with_mount("ar");
        assert!(format!("{f:?}").contains("/run/secret_id"));
    }

    #[test]
    fn new_methods_never_show_secrets_and_name_their_mounts() {
        let k = AuthMethod::kubernetes("app").with_mount("k8s");
        assert!(
            format!("{k:?}").contains("k8s") && format!("{k:?}").contains(KUBERNETES_TOKEN_PATH)
        );
        let r = LoginRequest::new("auth/aws/login", json!({"iam_request_body": "s3cr3t-sig"}));
        assert!(!format!("{r:?}").contains("s3cr3t"), "{r:?}");
        assert_eq!(AuthMethod::ProxyAutoAuth.name(), "proxy auto-auth");
        assert!(AuthMethod::jwt_env("r", "CI_JWT").logs_in());
        assert!(!AuthMethod::token_file("/run/sink").logs_in());
    }
}
