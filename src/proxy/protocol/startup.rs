//! The packets a client may open with (startup, SSLRequest, GSSENCRequest,
//! CancelRequest), and the settings a startup packet asks for. Parsing is pure (fuzzed
//! with the tracker); [`read_startup`] only reads the bytes.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol 3.0, the only one spoken.
pub(crate) const PROTOCOL_3: i32 = 196_608;
/// The request codes that share the startup packet's layout.
pub(crate) const SSL_REQUEST: i32 = 80_877_103;
pub(crate) const GSSENC_REQUEST: i32 = 80_877_104;
pub(crate) const CANCEL_REQUEST: i32 = 80_877_102;
/// PostgreSQL refuses larger startup packets (`MAX_STARTUP_PACKET_LENGTH`).
pub(crate) const MAX_STARTUP: usize = 10_000;

/// What a client opened with.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Startup {
    /// A session: the startup parameters (`user`, `database`, `application_name`, ...).
    Session(Vec<(String, String)>),
    /// Asks for TLS (answered `N`: the proxy listens on loopback and a Unix socket).
    Ssl,
    /// Asks for GSSAPI encryption (answered `N`).
    GssEnc,
    /// Cancel the query of the session with this key.
    Cancel { pid: i32, secret: i32 },
}

/// Why a startup packet was refused (the client gets an error, or just a closed socket).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartupError {
    #[error("the client closed the connection")]
    Closed,
    #[error("reading the startup packet: {0}")]
    Io(#[from] io::Error),
    #[error("invalid startup packet length {0} (must be 8 to {MAX_STARTUP} bytes)")]
    Length(i64),
    #[error("unsupported frontend protocol {}.{}: vaultpool-proxy speaks 3.0", .0 >> 16, .0 & 0xffff)]
    Protocol(i32),
    #[error("invalid startup packet: {0}")]
    Malformed(&'static str),
}

/// Read one startup-layout packet (length, code, body).
pub(crate) async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<Startup, StartupError> {
    let len = match r.read_i32().await {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(StartupError::Closed),
        Err(e) => return Err(e.into()),
    };
    if !(8..=MAX_STARTUP as i32).contains(&len) {
        return Err(StartupError::Length(len.into()));
    }
    let mut body = vec![0u8; len as usize - 4];
    r.read_exact(&mut body).await?;
    parse_startup(&body)
}

/// A startup-layout packet after its length: the code, then what the code says.
pub(crate) fn parse_startup(body: &[u8]) -> Result<Startup, StartupError> {
    let Some((code, rest)) = body.split_first_chunk::<4>() else {
        return Err(StartupError::Malformed("a packet without its code"));
    };
    match i32::from_be_bytes(*code) {
        SSL_REQUEST if rest.is_empty() => Ok(Startup::Ssl),
        GSSENC_REQUEST if rest.is_empty() => Ok(Startup::GssEnc),
        CANCEL_REQUEST if rest.len() == 8 => Ok(Startup::Cancel {
            pid: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
            secret: i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
        }),
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => Err(StartupError::Malformed(
            "a request packet of the wrong length",
        )),
        PROTOCOL_3 => parse_params(rest).map(Startup::Session),
        other => Err(StartupError::Protocol(other)),
    }
}

/// `key\0value\0...\0`.
fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params = Vec::new();
    let cstr = |rest: &mut &[u8]| -> Result<String, StartupError> {
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(StartupError::Malformed(
                "a parameter without its terminating zero",
            ))?;
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| StartupError::Malformed("a parameter that is not UTF-8"))?
            .to_owned();
        *rest = &rest[end + 1..];
        Ok(s)
    };
    loop {
        let key = cstr(&mut rest)?;
        if key.is_empty() {
            if !rest.is_empty() {
                return Err(StartupError::Malformed("bytes after the parameter list"));
            }
            return Ok(params);
        }
        let value = cstr(&mut rest)?;
        if params.iter().any(|(k, _)| *k == key) {
            return Err(StartupError::Malformed("a parameter given twice"));
        }
        params.push((key, value));
    }
}

/// What a startup packet asks to be set on the server connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    /// `application_name`, `client_encoding`, `-c` options ..., in order.
    pub(crate) pairs: Vec<(String, String)>,
    /// One of them is a custom setting (`app.x`): no hand-over can read those back.
    /// (Judged by the names: a value with a dot, `application_name = 'api.v2'`, is no
    /// reason to keep a session where it is.)
    pub(crate) custom: bool,
}

/// The client's startup settings (`application_name`, `client_encoding`, `-c` options).
///
/// # Errors
/// What the client is told: an option the proxy does not take, a name that is not a
/// setting's.
pub(crate) fn settings(params: &[(String, String)]) -> Result<Settings, String> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                // libpq: `-c name=value` or `--name=value`, space separated.
                let mut words = v.split_whitespace();
                while let Some(w) = words.next() {
                    let setting = if w == "-c" {
                        words.next().ok_or("an options \"-c\" without a setting")?
                    } else if let Some(s) = w.strip_prefix("-c") {
                        s
                    } else if let Some(s) = w.strip_prefix("--") {
                        s
                    } else {
                        return Err(format!(
                            "startup option {w:?} is not supported; use -c name=value"
                        ));
                    };
                    let (name, value) = setting
                        .split_once('=')
                        .ok_or_else(|| format!("startup option {setting:?} has no value"))?;
                    pairs.push((name.replace('-', "_"), value.to_owned()));
                }
            }
            _ => pairs.push((k.clone(), v.clone())),
        }
    }
    for (name, _) in &pairs {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(format!("startup parameter {name:?} is not a setting name"));
        }
    }
    let custom = pairs.iter().any(|(name, _)| name.contains('.'));
    Ok(Settings { pairs, custom })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn startup_packets_are_parsed_and_bad_ones_refused() {
        let mut ok = Vec::new();
        let body = b"user\0app\0database\0db\0\0";
        ok.extend_from_slice(&(8 + body.len() as i32).to_be_bytes());
        ok.extend_from_slice(&PROTOCOL_3.to_be_bytes());
        ok.extend_from_slice(body);
        assert_eq!(
            read_startup(&mut ok.as_slice()).await.unwrap(),
            Startup::Session(vec![
                ("user".into(), "app".into()),
                ("database".into(), "db".into())
            ])
        );
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "closed"),
            (1_000_000i32.to_be_bytes().to_vec(), "length"),
            (3i32.to_be_bytes().to_vec(), "length"),
            (
                [8i32.to_be_bytes(), 0x0002_0000i32.to_be_bytes()].concat(),
                "protocol",
            ),
            (
                [12i32.to_be_bytes(), PROTOCOL_3.to_be_bytes(), *b"use\0"].concat(),
                "zero",
            ),
            (
                [12i32.to_be_bytes(), SSL_REQUEST.to_be_bytes(), [0; 4]].concat(),
                "wrong length",
            ),
        ];
        for (bytes, want) in cases {
            let e = read_startup(&mut bytes.as_slice()).await.unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        assert!(matches!(
            parse_startup(&[1, 2]),
            Err(StartupError::Malformed(_))
        ));
    }

    #[test]
    fn startup_settings_are_checked_names_and_custom_ones_are_known_by_their_name() {
        let p = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let s = settings(&p(&[
            ("user", "u"),
            ("application_name", "it's"),
            ("options", "-c search_path=x --work-mem=64kB"),
        ]))
        .unwrap();
        assert_eq!(
            s.pairs,
            p(&[
                ("application_name", "it's"),
                ("search_path", "x"),
                ("work_mem", "64kB")
            ])
        );
        assert!(!s.custom);
        // A custom setting is known by its name, not by a dot in some value.
        assert!(
            !settings(&p(&[("application_name", "api.v2")]))
                .unwrap()
                .custom
        );
        assert!(
            settings(&p(&[("options", "-c app.tenant_id=42")]))
                .unwrap()
                .custom
        );
        assert!(settings(&p(&[("app.tenant_id", "42")])).unwrap().custom);
        for bad in [
            p(&[("a;DROP", "x")]),
            p(&[("options", "-x")]),
            p(&[("options", "-c")]),
            p(&[("options", "-c novalue")]),
        ] {
            assert!(settings(&bad).is_err(), "{bad:?}");
        }
    }
}
