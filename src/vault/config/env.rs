//! [`ClientBuilder::from_env`]: the settings the Vault CLI's environment variables give
//! (`VAULT_X`, or OpenBao's `BAO_X`), the auth method among them.

use std::time::Duration;

use secrecy::SecretString;

use super::ClientBuilder;
use crate::error::{Error, ErrorKind, Result};
use crate::vault::{AuthMethod, JwtSource, KUBERNETES_TOKEN_PATH, SecretIdSource};

impl ClientBuilder {
    /// Settings from the environment variables the Vault CLI reads (each `VAULT_X` may
    /// also be spelled `BAO_X`, OpenBao's name, which wins when both are set):
    ///
    /// | variable | meaning |
    /// |---|---|
    /// | `VAULT_ADDR` | address, e.g. `https://vault.internal:8200` (required) |
    /// | `VAULT_AUTH_METHOD` | `token`, `approle`, `kubernetes`, `jwt`, `cert`, `agent` (a token file) or `proxy` (no token: Vault Proxy's auto-auth); unset: AppRole if `VAULT_ROLE_ID` is set, else `VAULT_TOKEN`, else `VAULT_TOKEN_FILE` |
    /// | `VAULT_TOKEN` | a token (`token`) |
    /// | `VAULT_ROLE_ID` + `VAULT_SECRET_ID` or `VAULT_SECRET_ID_FILE` | AppRole login |
    /// | `VAULT_APPROLE_MOUNT` | AppRole mount, default `approle` |
    /// | `VAULT_AUTH_MOUNT` | the mount of `kubernetes`, `jwt`, `cert` (default: the method's name) and `approle` |
    /// | `VAULT_AUTH_ROLE` | the role to log in as (`kubernetes`, `jwt`; optional for `cert`) |
    /// | `VAULT_KUBERNETES_TOKEN_PATH` | the service-account token, default `/var/run/secrets/kubernetes.io/serviceaccount/token` |
    /// | `VAULT_JWT_FILE`, or `VAULT_JWT` | the JWT's file, or the variable holding it (read again at every login) |
    /// | `VAULT_TOKEN_FILE` | Vault Agent's file sink (`agent`) |
    /// | `VAULT_CLIENT_CERT` + `VAULT_CLIENT_KEY` | a client certificate presented on every connection to Vault (required by `cert`) |
    /// | `VAULT_NAMESPACE` | namespace header |
    /// | `VAULT_CACERT` | PEM file of the CA(s) to trust instead of the platform roots |
    /// | `VAULT_SKIP_VERIFY` | `true`/`1` disables TLS verification (never in production) |
    /// | `VAULT_CLIENT_TIMEOUT` | request timeout: `15`, `15s`, `500ms`, `2m` |
    /// | `VAULT_MAX_RETRIES` | retries of transient failures |
    ///
    /// # Errors
    /// [`ErrorKind::Config`] naming the variable that is missing or malformed.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// [`from_env`](Self::from_env) with another source of variables (tests, config maps).
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        // BAO_X wins over VAULT_X when set and not empty (an empty one hides nothing).
        let var = |name: &str| {
            let bao = format!("BAO_{}", name.trim_start_matches("VAULT_"));
            lookup(&bao)
                .filter(|v| !v.trim().is_empty())
                .or_else(|| lookup(name).filter(|v| !v.trim().is_empty()))
        };
        let mut b = Self::new();
        let addr = var("VAULT_ADDR").ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "configuring the Vault client: VAULT_ADDR is not set; set it to the Vault \
                 address, e.g. VAULT_ADDR=https://vault.internal:8200",
            )
        })?;
        b = b.address(addr);
        if let Some(ns) = var("VAULT_NAMESPACE") {
            b = b.namespace(ns);
        }
        if let Some(ca) = var("VAULT_CACERT") {
            b = b.ca_cert(ca);
        }
        if let Some(skip) = var("VAULT_SKIP_VERIFY") {
            b = b.danger_skip_verify(parse_bool("VAULT_SKIP_VERIFY", &skip)?);
        }
        if let Some(t) = var("VAULT_CLIENT_TIMEOUT") {
            b = b.request_timeout(parse_duration("VAULT_CLIENT_TIMEOUT", &t)?);
        }
        if let Some(n) = var("VAULT_MAX_RETRIES") {
            let n = n.trim().parse().map_err(|_| {
                Error::new(
                    ErrorKind::Config,
                    format!("reading VAULT_MAX_RETRIES: {n:?} is not a whole number"),
                )
            })?;
            b.retry.max_retries = n;
        }
        match (var("VAULT_CLIENT_CERT"), var("VAULT_CLIENT_KEY")) {
            (Some(cert), Some(key)) => b = b.client_cert(cert, key),
            (None, None) => {}
            _ => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "configuring the Vault client certificate: set both VAULT_CLIENT_CERT and \
                     VAULT_CLIENT_KEY, or neither",
                ));
            }
        }
        let auth = auth_from(&var)?;
        if let Some(auth) = auth {
            b = b.auth(auth);
        }
        Ok(b)
    }
}

/// The auth method the variables name (see [`ClientBuilder::from_env`]); `None` when
/// they name none.
fn auth_from(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<AuthMethod>> {
    let missing = |what: &str, needs: &str| {
        Error::new(
            ErrorKind::Config,
            format!("configuring {what} login (VAULT_AUTH_METHOD): {needs} is not set; set it"),
        )
    };
    let method = match var("VAULT_AUTH_METHOD") {
        Some(m) => m.trim().to_ascii_lowercase(),
        None if var("VAULT_ROLE_ID").is_some() => "approle".into(),
        None if var("VAULT_TOKEN").is_some() => "token".into(),
        None if var("VAULT_TOKEN_FILE").is_some() => "agent".into(),
        None => return Ok(None),
    };
    let mount = |default: &str| var("VAULT_AUTH_MOUNT").unwrap_or_else(|| default.into());
    let role = |what: &str| var("VAULT_AUTH_ROLE").ok_or_else(|| missing(what, "VAULT_AUTH_ROLE"));
    Ok(Some(match method.as_str() {
        "token" => {
            AuthMethod::token(var("VAULT_TOKEN").ok_or_else(|| missing("token", "VAULT_TOKEN"))?)
        }
        "approle" => {
            let mount = var("VAULT_APPROLE_MOUNT").unwrap_or_else(|| mount("approle"));
            let role_id =
                var("VAULT_ROLE_ID").ok_or_else(|| missing("AppRole", "VAULT_ROLE_ID"))?;
            let secret_id = match (var("VAULT_SECRET_ID"), var("VAULT_SECRET_ID_FILE")) {
                (Some(v), _) => SecretIdSource::Value(SecretString::from(v)),
                (None, Some(file)) => SecretIdSource::File(file.into()),
                (None, None) => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        "configuring AppRole login: VAULT_ROLE_ID is set but neither \
                         VAULT_SECRET_ID nor VAULT_SECRET_ID_FILE is",
                    ));
                }
            };
            AuthMethod::AppRole {
                mount,
                role_id: SecretString::from(role_id),
                secret_id,
            }
        }
        "kubernetes" => AuthMethod::Kubernetes {
            mount: mount("kubernetes"),
            role: role("Kubernetes")?,
            token_path: var("VAULT_KUBERNETES_TOKEN_PATH")
                .unwrap_or_else(|| KUBERNETES_TOKEN_PATH.into())
                .into(),
        },
        "jwt" => AuthMethod::Jwt {
            mount: mount("jwt"),
            role: role("JWT")?,
            jwt: match (var("VAULT_JWT_FILE"), var("VAULT_JWT")) {
                (Some(file), _) => JwtSource::File(file.into()),
                (None, Some(_)) => JwtSource::Env(
                    if var("BAO_JWT").is_some() {
                        "BAO_JWT"
                    } else {
                        "VAULT_JWT"
                    }
                    .into(),
                ),
                (None, None) => return Err(missing("JWT", "VAULT_JWT_FILE (or VAULT_JWT)")),
            },
        },
        "cert" => AuthMethod::Cert {
            mount: mount("cert"),
            name: var("VAULT_AUTH_ROLE"),
        },
        "agent" | "token_file" => AuthMethod::token_file(
            var("VAULT_TOKEN_FILE").ok_or_else(|| missing("Vault Agent", "VAULT_TOKEN_FILE"))?,
        ),
        "proxy" => AuthMethod::ProxyAutoAuth,
        other => {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "reading VAULT_AUTH_METHOD: unknown method {other:?}; use token, approle, \
                     kubernetes, jwt, cert, agent or proxy"
                ),
            ));
        }
    }))
}

fn parse_bool(name: &str, v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::new(
            ErrorKind::Config,
            format!("reading {name}: {v:?} is not a boolean (true/false)"),
        )),
    }
}

pub(crate) fn parse_duration(name: &str, v: &str) -> Result<Duration> {
    let v = v.trim();
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = num.parse().map_err(|_| {
        Error::new(
            ErrorKind::Config,
            format!("reading {name}: {v:?} is not a duration (e.g. 30s, 500ms, 2m)"),
        )
    })?;
    let seconds = |per: u64| {
        n.checked_mul(per).map(Duration::from_secs).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("reading {name}: {v:?} is too long a duration"),
            )
        })
    };
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => seconds(60)?,
        "h" => seconds(3600)?,
        _ => {
            return Err(Error::new(
                ErrorKind::Config,
                format!("reading {name}: unknown unit in {v:?} (use ms, s, m or h)"),
            ));
        }
    };
    if d.is_zero() {
        // A zero timeout ends every request at once.
        return Err(Error::new(
            ErrorKind::Config,
            format!("reading {name}: {v:?} is zero; give a duration above zero (e.g. 15s)"),
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lookup;

    #[test]
    fn missing_addr_names_the_variable() {
        let err = ClientBuilder::from_lookup(lookup(&[("VAULT_TOKEN", "t")])).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("VAULT_ADDR"), "{err}");
    }

    #[test]
    fn approle_wins_over_token_and_bao_names_work() {
        let b = ClientBuilder::from_lookup(lookup(&[
            ("BAO_ADDR", "http://127.0.0.1:8200"),
            ("VAULT_TOKEN", "tok"),
            ("VAULT_ROLE_ID", "r"),
            ("VAULT_SECRET_ID_FILE", "/x"),
        ]))
        .unwrap();
        assert!(matches!(
            b.auth,
            Some(AuthMethod::AppRole {
                secret_id: SecretIdSource::File(_),
                ..
            })
        ));
        assert_eq!(b.address.as_deref(), Some("http://127.0.0.1:8200"));
    }

    #[test]
    fn the_auth_method_variables_pick_the_method() {
        let with = |pairs: &'static [(&'static str, &'static str)]| {
            let mut all = vec![("VAULT_ADDR", "http://x:1")];
            all.extend_from_slice(pairs);
            let all: &'static [(&'static str, &'static str)] = Box::leak(all.into_boxed_slice());
            ClientBuilder::from_lookup(lookup(all))
        };
        let b = with(&[
            ("VAULT_AUTH_METHOD", "kubernetes"),
            ("VAULT_AUTH_ROLE", "app"),
            ("VAULT_TOKEN", "ignored"),
        ])
        .unwrap();
        assert!(
            matches!(&b.auth, Some(AuthMethod::Kubernetes { mount, role, token_path })
            if mount == "kubernetes" && role == "app" && token_path.to_str() == Some(KUBERNETES_TOKEN_PATH))
        );
        let b = with(&[
            ("VAULT_AUTH_METHOD", "JWT"),
            ("VAULT_AUTH_ROLE", "ci"),
            ("VAULT_AUTH_MOUNT", "gitlab"),
            ("VAULT_JWT_FILE", "/run/jwt"),
        ])
        .unwrap();
        assert!(
            matches!(&b.auth, Some(AuthMethod::Jwt { mount, jwt: JwtSource::File(_), .. }) if mount == "gitlab")
        );
        let b = with(&[
            ("VAULT_AUTH_METHOD", "jwt"),
            ("VAULT_AUTH_ROLE", "ci"),
            ("VAULT_JWT", "e30"),
        ])
        .unwrap();
        assert!(
            matches!(&b.auth, Some(AuthMethod::Jwt { jwt: JwtSource::Env(v), .. }) if v == "VAULT_JWT")
        );
        let b = with(&[("VAULT_TOKEN_FILE", "/run/sink")]).unwrap();
        assert!(matches!(&b.auth, Some(AuthMethod::TokenFile { .. })));
        let b = with(&[("VAULT_AUTH_METHOD", "proxy")]).unwrap();
        assert!(matches!(&b.auth, Some(AuthMethod::ProxyAutoAuth)));
        let b = with(&[
            ("VAULT_AUTH_METHOD", "cert"),
            ("VAULT_CLIENT_CERT", "/c.pem"),
            ("VAULT_CLIENT_KEY", "/k.pem"),
        ])
        .unwrap();
        assert!(matches!(&b.auth, Some(AuthMethod::Cert { name: None, .. })));
        assert!(b.client_cert.is_some());
        for (pairs, says) in [
            (
                &[("VAULT_AUTH_METHOD", "kubernetes")][..],
                "VAULT_AUTH_ROLE",
            ),
            (
                &[("VAULT_AUTH_METHOD", "jwt"), ("VAULT_AUTH_ROLE", "r")][..],
                "VAULT_JWT_FILE",
            ),
            (&[("VAULT_AUTH_METHOD", "agent")][..], "VAULT_TOKEN_FILE"),
            (&[("VAULT_AUTH_METHOD", "ldap")][..], "unknown method"),
            (
                &[("VAULT_CLIENT_CERT", "/c.pem"), ("VAULT_TOKEN", "t")][..],
                "VAULT_CLIENT_KEY",
            ),
        ] {
            let err = with(Box::leak(pairs.to_vec().into_boxed_slice())).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.to_string().contains(says), "{says}: {err}");
        }
        // Cert login without a client certificate is refused at build.
        let err = ClientBuilder::new()
            .address("http://x:1")
            .auth(AuthMethod::cert(None))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("VAULT_CLIENT_CERT"), "{err}");
    }

    #[test]
    fn role_id_without_secret_id_is_an_error() {
        let err = ClientBuilder::from_lookup(lookup(&[
            ("VAULT_ADDR", "http://x:1"),
            ("VAULT_ROLE_ID", "r"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("VAULT_SECRET_ID"), "{err}");
    }

    #[test]
    fn durations_and_booleans_parse() {
        assert_eq!(parse_duration("X", "15").unwrap(), Duration::from_secs(15));
        assert_eq!(
            parse_duration("X", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration("X", "2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("X", "fast").is_err());
        assert!(parse_duration("X", "5y").is_err());
        // No overflow (it panicked in debug builds), no zero (every request would end at
        // once): typed errors that name the variable.
        for bad in [
            "18446744073709551615h",
            "999999999999999999m",
            "0",
            "0ms",
            "0h",
        ] {
            let e = parse_duration("VAULT_CLIENT_TIMEOUT", bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{bad}: {e}");
            assert!(e.to_string().contains("VAULT_CLIENT_TIMEOUT"), "{bad}: {e}");
        }
        assert!(parse_bool("X", "TRUE").unwrap());
        assert!(parse_bool("X", "maybe").is_err());
    }
}
