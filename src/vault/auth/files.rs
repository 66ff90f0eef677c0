//! Credentials read from files, afresh at every use: the AppRole secret_id file, the
//! Kubernetes service-account token, a JWT file, Vault Agent's sink. A file that is
//! missing, unreadable or empty is a `Config` error naming it and what to check; a Vault
//! token file every user of the machine can read is refused.

use std::path::Path;
use std::time::{Duration, Instant};

use secrecy::SecretString;

use crate::error::{Error, ErrorKind, Result};

/// The longest a token file's first read waits for the file.
const TOKEN_FILE_WAIT_MAX: Duration = Duration::from_secs(3600);
/// How often a waiting first read looks for the token file (also the shortest wait
/// between two looks at a token that is not ours).
pub(super) const TOKEN_FILE_POLL: Duration = Duration::from_millis(100);

/// The AppRole secret_id from its file.
pub(super) fn read_secret_id(path: &Path) -> Result<SecretString> {
    read_credential(
        path,
        "the AppRole secret_id file",
        "check VAULT_SECRET_ID_FILE",
        false,
    )
}

/// The pod's Kubernetes service-account token (mounted 0644: not refused for that).
pub(super) fn read_service_account_token(path: &Path) -> Result<SecretString> {
    read_credential(
        path,
        "the Kubernetes service-account token",
        "check the pod's service account token mount (automountServiceAccountToken)",
        false,
    )
}

/// A JWT from its file.
pub(super) fn read_jwt_file(path: &Path) -> Result<SecretString> {
    read_credential(
        path,
        "the JWT",
        "check the path given (VAULT_JWT_FILE)",
        false,
    )
}

/// Wait up to `wait` (at most an hour) for Vault Agent's sink file to appear: the Agent
/// may not have written it yet when the client first reads it.
pub(super) async fn wait_for_token_file(path: &Path, wait: Duration) -> Result<()> {
    let deadline = Instant::now() + wait.min(TOKEN_FILE_WAIT_MAX);
    while !path.exists() && Instant::now() < deadline {
        tokio::time::sleep(TOKEN_FILE_POLL).await;
    }
    if !path.exists() {
        return Err(Error::new(
            ErrorKind::CredentialsUnavailable,
            format!(
                "reading the Vault token file {}: it does not exist after waiting {wait:?}; \
                 check that Vault Agent runs and that its file sink writes this path",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// The token in Vault Agent's sink file; refused if every user can read the file.
pub(super) fn read_sink_token(path: &Path) -> Result<SecretString> {
    read_credential(
        path,
        "the Vault token file",
        "check the Agent's file sink path (VAULT_TOKEN_FILE)",
        true,
    )
}

/// A credential from a file, trimmed: missing, unreadable or empty is a `Config` error
/// naming the file; `private` also refuses a file every user can read (a Vault token).
fn read_credential(path: &Path, what: &str, check: &str, private: bool) -> Result<SecretString> {
    let failed = |why: &str| {
        Error::new(
            ErrorKind::Config,
            format!("reading {what} {}: {why}; {check}", path.display()),
        )
    };
    let io = |e: std::io::Error| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "it does not exist",
            std::io::ErrorKind::PermissionDenied => "this process may not read it",
            _ => "it cannot be read",
        };
        failed(why).with_source(e)
    };
    // One handle for the mode and the text: the file cannot change in between.
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).map_err(io)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata().map_err(io)?.permissions().mode();
        if mode & 0o004 != 0 {
            return Err(failed(&format!(
                "every user of this machine can read it (mode {:o}); make it 0600 or 0640 \
                 (Vault Agent's sink `mode`)",
                mode & 0o777
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = private;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(failed("it is empty"));
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn credential_files_missing_empty_or_world_readable_are_config_errors() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("vaultpool-tok-{}", std::process::id()));
        let read = |private| read_credential(&path, "the Vault token file", "check it", private);
        let err = read(true).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("does not exist"), "{err}");
        std::fs::write(&path, "hvs.abc\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read(true).unwrap_err();
        assert!(
            err.to_string().contains("every user") && err.to_string().contains("644"),
            "{err}"
        );
        assert!(!err.to_string().contains("hvs.abc"), "{err}");
        // A Kubernetes service-account token is mounted 0644: not refused.
        assert_eq!(read(false).unwrap().expose_secret(), "hvs.abc");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(read(true).unwrap().expose_secret(), "hvs.abc");
        std::fs::write(&path, " \n").unwrap();
        assert!(read(true).unwrap_err().to_string().contains("empty"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn empty_secret_id_file_is_a_config_error() {
        let dir = std::env::temp_dir().join(format!("vaultpool-sid-{}", std::process::id()));
        std::fs::write(&dir, "  \n").unwrap();
        let err = read_secret_id(&dir).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("empty"));
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(read_secret_id(&dir).unwrap_err().kind(), ErrorKind::Config);
    }
}
