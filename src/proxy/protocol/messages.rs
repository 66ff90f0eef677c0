//! The messages the proxy writes itself (authentication, errors, key data, ready), and
//! the few it reads whole (during authentication).

use std::io;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest message accepted during authentication (a SASL response is ~100 bytes).
pub(crate) const MAX_AUTH_MESSAGE: usize = 8_192;

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

/// Send the client a FATAL `ErrorResponse` with this SQLSTATE and message.
pub(crate) async fn fatal<S: AsyncWrite + Unpin>(
    client: &mut S,
    code: &str,
    msg: &str,
) -> io::Result<()> {
    let mut out = BytesMut::new();
    error_response(&mut out, "FATAL", code, msg);
    client.write_all(&out).await?;
    client.flush().await
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
