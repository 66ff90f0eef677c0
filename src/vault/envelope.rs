//! Vault's JSON wrapper around every answer: lease data, warnings, `data` and `auth`.
//!
//! Decoding is strict about types (a `lease_duration` of `"ten"` is an error) and lenient
//! about absence (missing lease fields mean "no lease"), like Vault's own Go client.

use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::credentials::Lease;
use crate::error::{Error, ErrorKind, Result};

/// The largest TTL we accept from Vault (about 100 years); beyond it the answer is broken.
const MAX_TTL_SECS: u64 = 100 * 365 * 24 * 3600;

/// A decoded Vault response: `{request_id, lease_id, renewable, lease_duration, data,
/// auth, warnings}`.
#[derive(Debug, Deserialize)]
pub(crate) struct Envelope<T> {
    #[serde(default)]
    pub(crate) lease_id: String,
    #[serde(default)]
    pub(crate) renewable: bool,
    #[serde(default)]
    pub(crate) lease_duration: u64,
    pub(crate) data: Option<T>,
    pub(crate) auth: Option<AuthInfo>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub(crate) warnings: Vec<String>,
}

/// The `auth` block of a login or token renewal.
#[derive(Deserialize)]
pub(crate) struct AuthInfo {
    pub(crate) client_token: secrecy::SecretString,
    #[serde(default)]
    pub(crate) accessor: String,
    #[serde(default)]
    pub(crate) lease_duration: u64,
    #[serde(default)]
    pub(crate) renewable: bool,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub(crate) policies: Vec<String>,
}

impl std::fmt::Debug for AuthInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthInfo")
            .field("client_token", &"[REDACTED]")
            .field("accessor", &self.accessor)
            .field("lease_duration", &self.lease_duration)
            .field("renewable", &self.renewable)
            .field("policies", &self.policies)
            .finish()
    }
}

/// Vault's error body: `{"errors": ["…"]}`.
#[derive(Debug, Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub(crate) errors: Vec<String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

pub(crate) fn ttl(secs: u64, what: &str) -> Result<Duration> {
    if secs > MAX_TTL_SECS {
        return Err(Error::new(
            ErrorKind::Decode,
            format!("decoding {what}: a lease_duration of {secs} s is not plausible"),
        ));
    }
    Ok(Duration::from_secs(secs))
}

impl<T: DeserializeOwned> Envelope<T> {
    /// Decode a response body; `what` names the request for the error message.
    pub(crate) fn decode(body: &[u8], what: &str) -> Result<Self> {
        decode_json(body, what)
    }

    /// The `data` block, or a Decode error saying it is missing.
    pub(crate) fn into_data(self, what: &str) -> Result<(T, LeaseParts)> {
        let parts = LeaseParts {
            id: self.lease_id,
            duration: self.lease_duration,
            renewable: self.renewable,
            warnings: self.warnings,
        };
        match self.data {
            Some(d) => Ok((d, parts)),
            None => Err(Error::new(
                ErrorKind::Decode,
                format!("decoding {what}: the response has no `data`"),
            )),
        }
    }
}

/// The lease fields of an envelope, before they are stamped with the arrival time.
#[derive(Debug)]
pub(crate) struct LeaseParts {
    pub(crate) id: String,
    pub(crate) duration: u64,
    pub(crate) renewable: bool,
    pub(crate) warnings: Vec<String>,
}

impl LeaseParts {
    pub(crate) fn into_lease(self, received: Instant, what: &str) -> Result<Lease> {
        let wall = SystemTime::now() - received.elapsed();
        Ok(Lease {
            duration: ttl(self.duration, what)?,
            id: self.id,
            renewable: self.renewable,
            issued_at: received,
            issued_at_wall: wall,
            warnings: self.warnings,
        })
    }
}

/// Decode a JSON body. The error names the request, the field (`data.password`) and the
/// position, never a value: serde's messages quote the offending value (`invalid type:
/// string "hunter2"`), and a value in a Vault answer may be a secret.
pub(crate) fn decode_json<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        decode_error(what, &path, e.into_inner())
    })?;
    de.end().map_err(|e| decode_error(what, "", e))?;
    Ok(value)
}

fn decode_error(what: &str, path: &str, e: serde_json::Error) -> Error {
    use serde_json::error::Category;
    let at = format!("line {} column {}", e.line(), e.column());
    let detail = match e.classify() {
        Category::Syntax => format!("the body is not JSON ({at})"),
        Category::Eof => format!("the body ends too early ({at})"),
        Category::Io => format!("the body could not be read ({at})"),
        Category::Data => {
            let field = if path.is_empty() || path == "." {
                String::new()
            } else {
                format!("field {path}: ")
            };
            format!("{field}{}", redact_values(&e.to_string()))
        }
    };
    // No `source`: serde's error would repeat the value this message leaves out.
    Error::new(
        ErrorKind::Decode,
        format!("decoding the answer to {what}: {detail}"),
    )
}

/// Replace quoted values (`"…"`, `` `…` ``) in a serde message by `…`, keeping field
/// names (`missing field `password``, `unknown field `x``).
fn redact_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(['"', '`']) {
        let quote = rest[start..].chars().next().unwrap_or('"');
        let Some(len) = rest[start + 1..].find(quote) else {
            break;
        };
        let (before, quoted) = (&rest[..start], &rest[start..start + len + 2]);
        out.push_str(before);
        if before.ends_with("field ") || before.ends_with("variant ") {
            out.push_str(quoted);
        } else {
            out.push('…');
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// Parse `{"errors": [...]}`; a body that is not that shape yields no strings.
pub(crate) fn error_strings(body: &[u8]) -> Vec<String> {
    serde_json::from_slice::<ErrorBody>(body)
        .map(|b| b.errors)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use serde_json::Value;

    #[test]
    fn decodes_database_creds() {
        let body = br#"{"request_id":"r","lease_id":"database/creds/app/abc","renewable":true,
            "lease_duration":30,"data":{"username":"v-x","password":"p"},"wrap_info":null,
            "warnings":null,"auth":null}"#;
        let env: Envelope<Value> = Envelope::decode(body, "creds").unwrap();
        let (data, parts) = env.into_data("creds").unwrap();
        assert_eq!(data["username"], "v-x");
        assert_eq!(parts.id, "database/creds/app/abc");
        assert_eq!(parts.duration, 30);
        assert!(parts.renewable);
        assert!(parts.warnings.is_empty());
    }

    #[test]
    fn keeps_warnings_of_a_capped_renewal() {
        let body = br#"{"lease_id":"l","renewable":true,"lease_duration":120,
            "warnings":["TTL of \"10m\" exceeded the effective max_ttl of \"2m\"; TTL value is capped accordingly"]}"#;
        let env: Envelope<Value> = Envelope::decode(body, "renew").unwrap();
        assert_eq!(env.lease_duration, 120);
        assert_eq!(env.warnings.len(), 1);
    }

    #[test]
    fn decodes_auth_block_and_redacts_token() {
        let body =
            br#"{"auth":{"client_token":"s.supersecret","accessor":"acc","policies":["default"],
            "lease_duration":3600,"renewable":true}}"#;
        let env: Envelope<Value> = Envelope::decode(body, "login").unwrap();
        let auth = env.auth.unwrap();
        assert_eq!(auth.client_token.expose_secret(), "s.supersecret");
        assert!(!format!("{auth:?}").contains("supersecret"));
    }

    #[test]
    fn rejects_wrong_types_and_garbage() {
        for body in [
            &br#"{"lease_duration":"ten"}"#[..],
            br#"{"lease_duration":-5}"#,
            br#"{"renewable":"yes"}"#,
            br#"not json"#,
            br#""#,
            br#"[1,2]"#,
        ] {
            let err = Envelope::<Value>::decode(body, "renew").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Decode, "{body:?}");
            assert!(err.to_string().contains("renew"));
        }
    }

    #[test]
    fn decode_errors_name_the_field_but_never_a_value() {
        let cases: &[(&[u8], &str)] = &[
            (
                br#"{"lease_duration":"hunter2"}"#,
                "field lease_duration: invalid type: string …, expected u64",
            ),
            (
                br#"{"lease_duration":-7}"#,
                "field lease_duration: invalid value: integer …",
            ),
            (
                br#"{"data":{"password":12345}}"#,
                "field data.password: invalid type: integer …",
            ),
            (
                br#"{"data":{"username":"u"}}"#,
                "field data: missing field `password`",
            ),
            (br#"<html>"#, "the body is not JSON (line 1 column 1)"),
            (br#"{"data":{"#, "the body ends too early"),
            (br#"{} trailing"#, "the body is not JSON"),
        ];
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Creds {
            username: String,
            password: String,
        }
        for (body, expect) in cases {
            let e = Envelope::<Creds>::decode(body, "GET database/creds/app").unwrap_err();
            let text = format!("{e} {e:?}");
            assert_eq!(e.kind(), ErrorKind::Decode);
            assert!(text.contains(expect), "{text}");
            for secret in ["hunter2", "12345", "-7"] {
                assert!(!text.contains(secret), "{text}");
            }
        }
    }

    #[test]
    fn missing_data_is_a_decode_error() {
        let env: Envelope<Value> = Envelope::decode(b"{}", "creds").unwrap();
        assert_eq!(
            env.into_data("creds").unwrap_err().kind(),
            ErrorKind::Decode
        );
    }

    #[test]
    fn absurd_ttl_is_rejected() {
        assert!(ttl(u64::MAX, "x").is_err());
        assert_eq!(ttl(0, "x").unwrap(), Duration::ZERO);
    }

    #[test]
    fn error_strings_tolerate_any_body() {
        assert_eq!(error_strings(br#"{"errors":["a","b"]}"#), vec!["a", "b"]);
        assert!(error_strings(br#"{"errors":null}"#).is_empty());
        assert!(error_strings(b"<html>bad gateway</html>").is_empty());
    }
}
