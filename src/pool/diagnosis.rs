//! What a failed connection means, for every backend: the text of an error and its
//! causes, the TLS failures in it and what to fix for each ([`tls_diagnosis`] over a
//! backend's list of [`TlsSymptom`]s), the SQLSTATEs of a refused PostgreSQL login, and
//! the error a connection that verifies new credentials reports.

use crate::error::{Error, ErrorKind};

/// The SQLSTATEs of a refused PostgreSQL login: `invalid_password` (also what an expired,
/// dropped or unknown user gets) and `invalid_authorization_specification`.
#[cfg(any(feature = "postgres", feature = "sqlx"))]
pub(crate) const PG_AUTH_FAILURE: [&str; 2] = ["28P01", "28000"];

/// An error and its sources as one line, to look for what they say.
pub(crate) fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// What the backend (or the network) said, for a message, from the drivers this crate
/// knows (their errors never hold a password): the innermost cause's text —
/// `FATAL: too many connections for role "v-app-…"`, `database "x" does not exist`,
/// `Connection refused (os error 111)` — which a driver's own Display often hides
/// ("db error").
pub(crate) fn reason(e: &(dyn std::error::Error + 'static)) -> String {
    let mut root = e;
    while let Some(c) = root.source() {
        root = c;
    }
    root.to_string()
}

/// A TLS failure as an error's text shows it (rustls' words, the alerts a server sends,
/// the drivers' own), and what the backend's user should fix for it.
pub(crate) struct TlsSymptom {
    /// Whether the text, lowercased, shows it.
    pub(crate) seen: fn(&str) -> bool,
    /// What to fix, in the backend's terms (its variables and settings).
    pub(crate) fix: &'static str,
}

/// What to fix for the first of `symptoms` (each backend lists its own, in order) that
/// `text` shows; `None` when it shows none (not a TLS matter).
pub(crate) fn tls_diagnosis(symptoms: &[TlsSymptom], text: &str) -> Option<&'static str> {
    let t = text.to_ascii_lowercase();
    symptoms.iter().find(|s| (s.seen)(&t)).map(|s| s.fix)
}

/// The server's certificate does not name the host connected to.
pub(crate) fn names_another_host(t: &str) -> bool {
    t.contains("notvalidforname") || t.contains("not valid for name")
}

/// The server's certificate is not signed by a CA trusted here.
pub(crate) fn unknown_issuer(t: &str) -> bool {
    t.contains("unknownissuer") || t.contains("unknown issuer")
}

/// The server refused the client certificate as expired (its alert).
pub(crate) fn client_certificate_expired(t: &str) -> bool {
    t.contains("alert") && t.contains("certificateexpired")
}

/// The server refused the client certificate for its CA or as unusable (its alert).
pub(crate) fn client_certificate_refused(t: &str) -> bool {
    t.contains("alert") && (t.contains("unknownca") || t.contains("badcertificate"))
}

/// A certificate is expired or not yet valid (checked after the client's alert).
pub(crate) fn certificate_expired(t: &str) -> bool {
    t.contains("certificate")
        && (t.contains("expired") || t.contains("notvalidyet") || t.contains("not valid yet"))
}

/// What to fix when the server's certificate is expired or not yet valid.
pub(crate) const SERVER_CERTIFICATE_EXPIRED: &str =
    "the server's certificate is expired or not yet valid: renew it on the server";

/// The TLS failures of a PostgreSQL connection (both flavours), in the order they are
/// looked for.
#[cfg(any(feature = "postgres", feature = "sqlx"))]
const POSTGRES_TLS: [TlsSymptom; 7] = [
    TlsSymptom {
        seen: names_another_host,
        fix: "the server's certificate does not name the host connected to: connect by a name \
              the certificate holds, or use sslmode=verify-ca",
    },
    TlsSymptom {
        seen: unknown_issuer,
        fix: "the server's certificate is not signed by the root certificate given: set \
              PGSSLROOTCERT to the CA that signed it",
    },
    TlsSymptom {
        seen: |t| t.contains("without tls support"),
        fix: "sslmode asks for TLS: build vaultpool with its `tls` feature",
    },
    TlsSymptom {
        seen: |t| t.contains("server does not support tls") || t.contains("ssl is not enabled"),
        fix: "the server does not offer TLS: enable ssl on the server, or use sslmode=prefer \
              or disable",
    },
    TlsSymptom {
        seen: client_certificate_expired,
        fix: "the server refused the client certificate as expired: PGSSLCERT / PGSSLKEY are \
              read again when they change, and no newer usable pair was found there; check \
              that whatever renews them (cert-manager) writes it to these paths",
    },
    TlsSymptom {
        seen: client_certificate_refused,
        fix: "the server refused the client certificate: use one signed by a CA the server \
              trusts (its ssl_ca_file); PGSSLCERT / PGSSLKEY are read again when they change",
    },
    TlsSymptom {
        seen: |t| certificate_expired(t) && !t.contains("revocation"),
        fix: SERVER_CERTIFICATE_EXPIRED,
    },
];

/// What to fix when a connection to PostgreSQL failed for a TLS reason: a refusal by
/// the server (`sqlstate` given: only pg_hba's 28000 for a *plaintext* connection counts,
/// so a real login refusal is never taken for one; a refusal of a TLS connection is not
/// blamed on TLS — PostgreSQL names the encryption in every pg_hba refusal, and the
/// advice would be to weaken it) or a failed handshake (no SQLSTATE; rustls' and the
/// drivers' words).
#[cfg(any(feature = "postgres", feature = "sqlx"))]
pub(crate) fn postgres_tls_diagnosis(sqlstate: Option<&str>, text: &str) -> Option<&'static str> {
    if let Some(code) = sqlstate {
        let t = text.to_ascii_lowercase();
        return match code {
            "28000" if t.contains("requires a valid client certificate") => Some(
                "the server requires a client certificate here (pg_hba clientcert): set \
                 PGSSLCERT and PGSSLKEY (or sslcert and sslkey)",
            ),
            "28000" if t.contains("no encryption") || t.contains("ssl off") => Some(
                "no pg_hba.conf entry accepts this plaintext connection: if the server \
                 accepts only TLS connections here (pg_hba hostssl), set PGSSLMODE to require \
                 or verify-full (with PGSSLROOTCERT); otherwise pg_hba lacks an entry for \
                 this user and database",
            ),
            _ => None,
        };
    }
    tls_diagnosis(&POSTGRES_TLS, text)
}

/// The error of a connection that verifies new credentials and failed to open (`what`
/// names it): [`ErrorKind::Tls`] with what to fix when `tls_problem` finds a TLS reason,
/// else [`ErrorKind::AuthenticationFailed`] when `is_auth_failure` (the server refused
/// the credentials), else [`ErrorKind::Backend`].
pub(crate) fn verify_connect_error<E>(
    what: String,
    e: E,
    reason: Option<String>,
    tls_problem: impl FnOnce(&E) -> Option<String>,
    is_auth_failure: impl FnOnce(&E) -> bool,
) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    if let Some(fix) = tls_problem(&e) {
        return Error::new(ErrorKind::Tls, format!("{what}: {fix}"))
            .with_source(e)
            .fix_given();
    }
    let kind = if is_auth_failure(&e) {
        ErrorKind::AuthenticationFailed
    } else {
        ErrorKind::Backend
    };
    let what = match reason {
        Some(why) => format!("{what}: {why}"),
        None => what,
    };
    Error::new(kind, what).with_source(e)
}

#[cfg(all(test, any(feature = "postgres", feature = "sqlx")))]
mod tests {
    use super::postgres_tls_diagnosis as diagnose;

    #[test]
    fn tls_failures_are_explained() {
        let hba = "FATAL: pg_hba.conf rejects connection for host \"127.0.0.1\", user \"u\", \
                   database \"d\", no encryption";
        assert!(diagnose(Some("28000"), hba).unwrap().contains("PGSSLMODE"));
        // Over TLS, a pg_hba refusal (a missing entry for the user) is not blamed on TLS.
        let hba_tls = "FATAL: no pg_hba.conf entry for host \"127.0.0.1\", user \"v-app\", \
                       database \"d\", SSL encryption";
        assert!(diagnose(Some("28000"), hba_tls).is_none());
        // A client certificate the server refused as expired is the client's to renew.
        let expired = diagnose(None, "received fatal alert: CertificateExpired").unwrap();
        assert!(
            expired.contains("client certificate") && expired.contains("read again"),
            "{expired}"
        );
        assert!(!expired.contains("renew it"), "{expired}");
        assert!(
            diagnose(None, "received fatal alert: UnknownCA")
                .unwrap()
                .contains("ssl_ca_file")
        );
        assert!(
            diagnose(
                Some("28000"),
                "FATAL: connection requires a valid client certificate"
            )
            .unwrap()
            .contains("PGSSLCERT")
        );
        // A real login refusal is never taken for TLS, whatever the user's name says.
        assert!(
            diagnose(
                Some("28P01"),
                "password authentication failed for user \"v-unknownissuer-certificate-expired\""
            )
            .is_none()
        );
        assert!(
            diagnose(None, "invalid peer certificate: NotValidForName")
                .unwrap()
                .contains("verify-ca")
        );
        assert!(
            diagnose(None, "invalid peer certificate: UnknownIssuer")
                .unwrap()
                .contains("PGSSLROOTCERT")
        );
        assert!(diagnose(None, "invalid peer certificate: certificate not valid yet").is_some());
        assert!(diagnose(None, "connection refused").is_none());
    }
}
