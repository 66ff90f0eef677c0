//! Validation of what goes into a Vault URL path: mount and role names, KV paths, lease
//! ids. One place, so every call refuses the same inputs with the same kind of message.

use crate::error::{Error, ErrorKind, Result};

/// Role and mount names Vault accepts in a path: letters, digits, `-`, `_`, `.`.
pub(crate) fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Config,
            format!("{what} {name:?} is not a valid name (letters, digits, '-', '_', '.')"),
        ))
    }
}

pub(crate) fn check_segment(what: &str, value: &str) -> Result<()> {
    if value.is_empty() || value.split('/').any(|s| s == ".." || s == ".") {
        return Err(Error::new(
            ErrorKind::Config,
            format!("{what} {value:?} is not a valid Vault path"),
        ));
    }
    Ok(())
}

pub(crate) fn check_lease_id(what: &str, lease_id: &str) -> Result<()> {
    if lease_id.is_empty() || lease_id.split('/').any(|s| s == ".." || s.is_empty()) {
        return Err(Error::new(
            ErrorKind::Config,
            format!("{what}: {lease_id:?} is not a lease id"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("role", "immune-readwrite").is_ok());
        assert!(check_name("role", "a.b_c").is_ok());
        for bad in ["", "..", "a/b", "a?b", "rôle", "a b"] {
            assert_eq!(
                check_name("role", bad).unwrap_err().kind(),
                ErrorKind::Config,
                "{bad}"
            );
        }
    }

    #[test]
    fn lease_ids_are_checked() {
        assert!(check_lease_id("x", "database/creds/app/AbC123").is_ok());
        for bad in ["", "database/../sys", "a//b"] {
            assert!(check_lease_id("x", bad).is_err(), "{bad}");
        }
    }
}
