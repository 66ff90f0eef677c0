//! The PostgreSQL wire protocol as far as the proxy reads it: the startup packets
//! (startup, SSLRequest, GSSENCRequest, CancelRequest), the messages it writes itself
//! (authentication, errors, key data), and a frame tracker for the relay, which forwards
//! bytes as they come and only looks at message boundaries.

use std::io;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol 3.0, the only one spoken.
pub(crate) const PROTOCOL_3: i32 = 196_608;
/// The request codes that share the startup packet's layout.
pub(crate) const SSL_REQUEST: i32 = 80_877_103;
pub(crate) const GSSENC_REQUEST: i32 = 80_877_104;
pub(crate) const CANCEL_REQUEST: i32 = 80_877_102;
/// PostgreSQL refuses larger startup packets (`MAX_STARTUP_PACKET_LENGTH`).
pub(crate) const MAX_STARTUP: usize = 10_000;
/// The largest message accepted during authentication (a SASL response is ~100 bytes).
pub(crate) const MAX_AUTH_MESSAGE: usize = 8_192;

/// What a client opened with.
#[derive(Debug)]
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
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
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

/// Read one regular message (`tag`, length, body) of at most `max` bytes.
pub(crate) async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> io::Result<(u8, Vec<u8>)> {
    let tag = r.read_u8().await?;
    let len = r.read_i32().await?;
    if len < 4 || len as usize - 4 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message {:?} of invalid length {len}", tag as char),
        ));
    }
    let mut body = vec![0u8; len as usize - 4];
    r.read_exact(&mut body).await?;
    Ok((tag, body))
}

fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(buf: &mut BytesMut, s: &str) {
    // A zero inside would end the string early: never in what the proxy writes, but
    // names from clients are echoed in messages.
    buf.put_slice(s.replace('\0', "").as_bytes());
    buf.put_u8(0);
}

/// An `ErrorResponse`: severity (`FATAL`, `ERROR`), SQLSTATE and message.
pub(crate) fn error_response(buf: &mut BytesMut, severity: &str, code: &str, msg: &str) {
    message(buf, b'E', |b| {
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', msg),
        ] {
            b.put_u8(field);
            cstr(b, value);
        }
        b.put_u8(0);
    });
}

/// `AuthenticationOk`.
pub(crate) fn auth_ok(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(0));
}

/// `AuthenticationSASL` offering SCRAM-SHA-256.
pub(crate) fn auth_sasl(buf: &mut BytesMut) {
    message(buf, b'R', |b| {
        b.put_i32(10);
        cstr(b, "SCRAM-SHA-256");
        b.put_u8(0);
    });
}

/// `AuthenticationSASLContinue` (11) or `AuthenticationSASLFinal` (12).
pub(crate) fn auth_sasl_data(buf: &mut BytesMut, code: i32, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(code);
        b.put_slice(data);
    });
}

/// `ParameterStatus`.
pub(crate) fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, b'S', |b| {
        cstr(b, name);
        cstr(b, value);
    });
}

/// `BackendKeyData`.
pub(crate) fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    message(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

/// `ReadyForQuery` with status `I` (idle).
pub(crate) fn ready_for_query(buf: &mut BytesMut) {
    message(buf, b'Z', |b| b.put_u8(b'I'));
}

/// Follows message boundaries in a byte stream that is forwarded as it arrives, without
/// holding messages back: for each chunk, the tags of the messages that start in it (and
/// the first byte of a `ReadyForQuery` body, its transaction status).
#[derive(Debug, Default)]
pub(crate) struct Frames {
    /// Header bytes of the message being read (tag + 4 length bytes), while incomplete.
    header: [u8; 5],
    header_len: usize,
    /// Body bytes of the current message still to come.
    body_left: usize,
    /// The current message is a `ReadyForQuery` whose status byte is still to come.
    want_status: bool,
}

/// What a chunk held, message by message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// A message with this tag started.
    Tag(u8),
    /// A `ReadyForQuery` with this transaction status (`I`, `T`, `E`) was completed.
    Ready(u8),
}

impl Frames {
    /// Feed the next chunk; `seen` is called for every message start and status.
    ///
    /// # Errors
    /// A length below 4: the stream is not the protocol (the relay ends the session).
    pub(crate) fn feed(&mut self, mut chunk: &[u8], mut seen: impl FnMut(Seen)) -> io::Result<()> {
        while !chunk.is_empty() {
            if self.body_left > 0 {
                if self.want_status {
                    seen(Seen::Ready(chunk[0]));
                    self.want_status = false;
                }
                let n = self.body_left.min(chunk.len());
                self.body_left -= n;
                chunk = &chunk[n..];
                continue;
            }
            let n = (5 - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk[..n]);
            self.header_len += n;
            chunk = &chunk[n..];
            if self.header_len == 5 {
                self.header_len = 0;
                let tag = self.header[0];
                let len = i32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                if len < 4 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("message {:?} with invalid length {len}", tag as char),
                    ));
                }
                seen(Seen::Tag(tag));
                self.body_left = len as usize - 4;
                self.want_status = tag == b'Z' && self.body_left > 0;
            }
        }
        Ok(())
    }

    /// Whether the stream stands at a message boundary.
    pub(crate) fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_are_followed_across_any_split() {
        let mut stream = msg(b'T', b"rowdesc");
        stream.extend(msg(b'D', &[7u8; 300]));
        stream.extend(msg(b'C', b"SELECT 1\0"));
        stream.extend(msg(b'Z', b"T"));
        stream.extend(msg(b'Z', b"I"));
        for split in 1..stream.len() {
            let mut f = Frames::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(split) {
                f.feed(chunk, |s| got.push(s)).unwrap();
            }
            assert!(f.at_boundary());
            assert_eq!(
                got,
                vec![
                    Seen::Tag(b'T'),
                    Seen::Tag(b'D'),
                    Seen::Tag(b'C'),
                    Seen::Tag(b'Z'),
                    Seen::Ready(b'T'),
                    Seen::Tag(b'Z'),
                    Seen::Ready(b'I')
                ],
                "split {split}"
            );
        }
    }

    #[test]
    fn a_length_below_four_is_an_error() {
        let mut f = Frames::default();
        assert!(f.feed(&[b'Q', 0, 0, 0, 3], |_| {}).is_err());
    }

    #[tokio::test]
    async fn startup_packets_are_parsed_and_bad_ones_refused() {
        let mut ok = Vec::new();
        let body = b"user\0app\0database\0db\0\0";
        ok.extend_from_slice(&(8 + body.len() as i32).to_be_bytes());
        ok.extend_from_slice(&PROTOCOL_3.to_be_bytes());
        ok.extend_from_slice(body);
        match read_startup(&mut ok.as_slice()).await.unwrap() {
            Startup::Session(p) => assert_eq!(
                p,
                vec![
                    ("user".into(), "app".into()),
                    ("database".into(), "db".into())
                ]
            ),
            other => panic!("{other:?}"),
        }
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
    }
}
