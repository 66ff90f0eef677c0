//! What a refused or failed login says: which method, path and role, and what to fix
//! when Vault's own words say it.

use super::{AuthMethod, JwtSource};
use crate::error::{Error, ErrorKind};

/// A login refused or failed: say which method, path and role, and what to fix when
/// Vault's words say it; for a refused client certificate, `tls_files` (what the
/// certificate files held when last read) too.
pub(super) fn login_error(
    method: &AuthMethod,
    path: &str,
    e: Error,
    tls_files: Option<String>,
) -> Error {
    // Only Vault's own words count: a TLS or transport failure says "certificate" or
    // "expired" about something else (the server's certificate).
    let text = if e.vault_status().is_some() {
        e.vault_errors().join("; ").to_ascii_lowercase()
    } else {
        String::new()
    };
    let (what, fix): (String, Option<String>) = match method {
        AuthMethod::AppRole { .. } => (format!("logging in to Vault with AppRole ({path})"), None),
        AuthMethod::Kubernetes {
            role, token_path, ..
        } => (
            format!(
                "logging in to Vault with Kubernetes as role {role} ({path}, service-account \
                 token {})",
                token_path.display()
            ),
            if text.contains("role")
                && (text.contains("not found") || text.contains("invalid role"))
            {
                Some(format!("no role {role} at {path}: check the role name"))
            } else if text.contains("service account") || text.contains("namespace") {
                Some(format!(
                    "role {role} does not bind this pod's service account or namespace \
                     (bound_service_account_names / _namespaces)"
                ))
            } else {
                None
            },
        ),
        AuthMethod::Jwt { role, jwt, .. } => (
            format!(
                "logging in to Vault with a JWT as role {role} ({path}, JWT from {})",
                match jwt {
                    JwtSource::File(p) => p.display().to_string(),
                    JwtSource::Env(v) => format!("${v}"),
                }
            ),
            if text.contains("expired") {
                Some(
                    "the JWT has expired: its issuer must provide a fresh one (it is read again \
                     at every login)"
                        .to_owned(),
                )
            } else if text.contains("audience") || text.contains("aud)") {
                Some(format!(
                    "the JWT's audience (aud) is not one role {role} accepts (bound_audiences)"
                ))
            } else if text.contains("role") && text.contains("could not be found") {
                Some(format!("no role {role} at {path}: check the role name"))
            } else {
                None
            },
        ),
        AuthMethod::Cert { name, .. } => (
            format!(
                "logging in to Vault with a TLS client certificate ({path}{})",
                name.as_deref()
                    .map(|n| format!(", role {n}"))
                    .unwrap_or_default()
            ),
            (text.contains("certificate") || text.contains("permission denied")).then(|| {
                let files = tls_files.map(|f| format!("; {f}")).unwrap_or_default();
                format!(
                    "Vault did not accept the client certificate (VAULT_CLIENT_CERT): check \
                     that a cert role at this mount trusts the CA that signed it, and that the \
                     certificate and key match{files}"
                )
            }),
        ),
        other => (
            format!("logging in to Vault with {} ({path})", other.name()),
            None,
        ),
    };
    // A login Vault answered with 4xx is a refused credential, whatever the method's
    // own words (an expired JWT, an unknown certificate are 400s).
    let e = if e.kind() == ErrorKind::InvalidRequest {
        e.with_kind(ErrorKind::PermissionDenied)
    } else {
        e
    };
    match fix {
        Some(fix) => e.context(format!("{what}: {fix}")).fix_given(),
        None => e.context(what),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_advice_comes_only_from_vaults_answer() {
        let jwt = AuthMethod::jwt_file("app", "/run/jwt");
        // A TLS failure reaching Vault says "certificate ... expired": not the JWT's.
        let tls = Error::new(
            ErrorKind::Tls,
            "TLS handshake: invalid peer certificate: Expired",
        );
        let e = login_error(&jwt, "auth/jwt/login", tls, None);
        assert_eq!(e.kind(), ErrorKind::Tls);
        assert!(!e.to_string().contains("the JWT has expired"), "{e}");
        let answered = Error::new(ErrorKind::InvalidRequest, "PUT auth/jwt/login")
            .with_vault(400, vec!["error validating token: token is expired".into()]);
        let e = login_error(&jwt, "auth/jwt/login", answered, None);
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("the JWT has expired"), "{e}");
    }
}
