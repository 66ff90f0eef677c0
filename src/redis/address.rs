//! Where a Redis pool connects: `REDIS_URL` or `REDIS_HOST`/`REDIS_PORT`, or a KV
//! secret's `host`, `port` and `tls`; and the check that refuses an address that would
//! connect with less protection than asked.

use ::redis::IntoConnectionInfo;

use crate::error::{Error, ErrorKind, Result};

/// What a TLS address is told without the `tls` feature.
pub(super) const NO_TLS_FEATURE: &str = "TLS (rediss://) needs vaultpool's `tls` feature; enable it, or \
                              use redis:// on a trusted network";

/// The address in a KV secret: `host` (required), `port` (default 6379) and `tls`
/// (`true`/`false`; default `tls_default`: whether the pool uses TLS — then `false` is
/// refused).
pub(super) fn address_from_kv(
    kv: &crate::vault::KvSecret,
    tls_default: bool,
) -> Result<::redis::ConnectionInfo> {
    let field = |k: &str| {
        kv.get(k)
            .map(|v| secrecy::ExposeSecret::expose_secret(v).trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let Some(host) = field("host") else {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "reading the Redis address from KV {} (version {}): no `host`; add `host` \
                 (and `port`, default 6379) to the secret, or set .address(…) on the builder",
                kv.path(),
                kv.version()
            ),
        ));
    };
    let port = field("port").unwrap_or_else(|| "6379".into());
    let tls = match field("tls").map(|t| t.to_ascii_lowercase()).as_deref() {
        None => tls_default,
        Some("true" | "1" | "yes") => true,
        Some("false" | "0" | "no") if tls_default => {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "reading the Redis address from KV {} (version {}): `tls` is false but this \
                     pool uses TLS (TLS settings are given, or the first version's address \
                     used TLS); a pool never moves to plaintext: remove `tls`, or build a new \
                     pool",
                    kv.path(),
                    kv.version()
                ),
            ));
        }
        Some("false" | "0" | "no") => false,
        Some(_) => {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "reading the Redis address from KV {} (version {}): `tls` must be true or \
                     false",
                    kv.path(),
                    kv.version()
                ),
            ));
        }
    };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    let scheme = if tls { "rediss" } else { "redis" };
    redis_info_from_lookup(|k| (k == "REDIS_URL").then(|| format!("{scheme}://{host}:{port}/0")))
        .map_err(|e| {
            e.context(format!(
                "reading the Redis address from KV {} (version {})",
                kv.path(),
                kv.version()
            ))
        })
}

/// Refuses what would connect with less protection than asked: `rediss://` without the
/// `tls` feature, redis' `#insecure`, and TLS settings (`tls_given`) with a plaintext
/// address.
pub(super) fn check_tls_address(info: &::redis::ConnectionInfo, tls_given: bool) -> Result<()> {
    match info.addr() {
        ::redis::ConnectionAddr::TcpTls { .. } if cfg!(not(feature = "tls")) => Err(Error::new(
            ErrorKind::Config,
            format!("configuring Redis at {}: {NO_TLS_FEATURE}", info.addr()),
        )),
        ::redis::ConnectionAddr::TcpTls { insecure: true, .. } => Err(Error::new(
            ErrorKind::Config,
            format!(
                "configuring Redis at {}: #insecure turns off the server certificate check, \
                 which vaultpool does not do; give the CA that signed the server's certificate \
                 (REDIS_TLS_CA_FILE or RedisTls::root_cert) and remove #insecure",
                info.addr()
            ),
        )),
        ::redis::ConnectionAddr::TcpTls {
            tls_params: Some(_),
            ..
        } => Err(Error::new(
            ErrorKind::Config,
            format!(
                "configuring Redis at {}: the address carries redis' own TLS parameters \
                 (Client::build_with_tls), which vaultpool would replace; give the CA and \
                 client certificate as RedisTls (.tls(…)) and the address as a rediss:// URL",
                info.addr()
            ),
        )),
        ::redis::ConnectionAddr::Unix(_) if tls_given => Err(Error::new(
            ErrorKind::Config,
            format!(
                "configuring Redis at {}: TLS settings are given (REDIS_TLS_* or .tls(…)) but \
                 the address is a unix socket, which has no TLS; remove the TLS settings",
                info.addr()
            ),
        )),
        ::redis::ConnectionAddr::Tcp(..) if tls_given => Err(Error::new(
            ErrorKind::Config,
            format!(
                "configuring Redis at {}: TLS settings are given (REDIS_TLS_* or .tls(…)) but \
                 the address is plaintext redis://; use rediss:// (or remove the TLS settings)",
                info.addr()
            ),
        )),
        _ => Ok(()),
    }
}

/// Redis address from `REDIS_URL` (without credentials) or `REDIS_HOST` (default
/// `127.0.0.1`) and `REDIS_PORT` (default 6379).
///
/// # Errors
/// [`ErrorKind::Config`] when `REDIS_URL` is empty or unparsable.
pub fn redis_info_from_lookup(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<::redis::ConnectionInfo> {
    let url = match lookup("REDIS_URL") {
        Some(url) if url.trim().is_empty() => {
            return Err(Error::new(
                ErrorKind::Config,
                "reading REDIS_URL: it is set but empty; set it to e.g. redis://cache:6379/0 \
                 or unset it and use REDIS_HOST/REDIS_PORT",
            ));
        }
        Some(url) => url,
        None => format!(
            "redis://{}:{}/0",
            lookup("REDIS_HOST").unwrap_or_else(|| "127.0.0.1".into()),
            lookup("REDIS_PORT").unwrap_or_else(|| "6379".into())
        ),
    };
    let url = url.trim();
    if cfg!(not(feature = "tls")) && (url.starts_with("rediss://") || url.starts_with("valkeys://"))
    {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "reading the Redis address (REDIS_URL or REDIS_HOST/REDIS_PORT): {NO_TLS_FEATURE}"
            ),
        ));
    }
    url.into_connection_info().map_err(|e| {
        Error::new(
            ErrorKind::Config,
            "reading the Redis address (REDIS_URL or REDIS_HOST/REDIS_PORT): not a redis:// URL",
        )
        .with_source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_from_host_and_port() {
        let info = redis_info_from_lookup(|k| match k {
            "REDIS_HOST" => Some("cache".into()),
            "REDIS_PORT" => Some("6380".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(info.addr().to_string(), "cache:6380");
    }

    #[test]
    fn kv_address_takes_tls_from_the_secret_or_the_settings() {
        let kv = |tls: Option<&str>| {
            let mut fields = vec![("host", "cache")];
            fields.extend(tls.map(|t| ("tls", t)));
            crate::vault::KvSecret::for_test("secret", "redis/main", 4, &fields)
        };
        let is_tls = |info: ::redis::ConnectionInfo| {
            matches!(info.addr(), ::redis::ConnectionAddr::TcpTls { .. })
        };
        if cfg!(feature = "tls") {
            assert!(is_tls(address_from_kv(&kv(Some("true")), false).unwrap()));
            assert!(is_tls(address_from_kv(&kv(None), true).unwrap()));
        }
        assert!(!is_tls(address_from_kv(&kv(None), false).unwrap()));
        assert!(!is_tls(address_from_kv(&kv(Some("false")), false).unwrap()));
        let err = address_from_kv(&kv(Some("false")), true).unwrap_err();
        assert!(err.to_string().contains("`tls` is false"), "{err}");
        let err = address_from_kv(&kv(Some("maybe")), false).unwrap_err();
        assert!(err.to_string().contains("true or false"), "{err}");
    }

    #[test]
    fn kv_address_needs_a_host_and_defaults_the_port() {
        let kv = crate::vault::KvSecret::for_test("secret", "redis/main", 2, &[("port", "6380")]);
        let err = address_from_kv(&kv, false).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let msg = err.to_string();
        assert!(
            msg.contains("no `host`") && msg.contains("redis/main"),
            "{msg}"
        );
        let kv = crate::vault::KvSecret::for_test("secret", "redis/main", 3, &[("host", "cache")]);
        assert_eq!(
            address_from_kv(&kv, false).unwrap().addr().to_string(),
            "cache:6379"
        );
    }

    #[test]
    fn empty_or_bad_url_is_a_config_error() {
        let err = redis_info_from_lookup(|k| (k == "REDIS_URL").then(|| " ".into())).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let err = redis_info_from_lookup(|k| (k == "REDIS_URL").then(|| "http://nope".into()))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
    }
}
