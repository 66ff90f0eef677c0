//! The wire watch: every connection's stream from the server is read through
//! [`Watched`], which notices an `ErrorResponse` of severity `FATAL` or `PANIC` — the
//! server's last word before it closes the session (`pg_terminate_backend`, a revoke
//! that ends sessions, a shutdown). A connection that received one is never handed out
//! again, even before tokio-postgres has read the end of the stream (`is_closed()` is
//! still false then, and a plain deadpool-postgres pool hands the dead connection to the
//! next caller, whose query fails too).
//!
//! Over TLS, the TLS stream (whatever connector) is wrapped. Plaintext (`sslmode=disable`,
//! or `prefer` without a TLS connector, to a host name) goes through [`Plain`], a connector that encrypts nothing: with
//! `sslnegotiation=direct`, tokio-postgres hands it the socket without asking the server
//! for TLS, and speaks the protocol through it unchanged — the only way to see the
//! plaintext stream with tokio-postgres' own connect (host lookup, timeouts, keepalives,
//! several hosts). Not watched: `sslmode=prefer` when the server has no TLS, and Unix
//! sockets; there, `is_closed()` decides as in deadpool-postgres.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::Socket;
use tokio_postgres::config::{Host, SslMode, SslNegotiation};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, NoTls, TlsConnect, TlsStream};

use crate::lease::BoxFuture;

/// Set once the server sent a fatal error on the connection.
pub(super) type Fatal = Arc<AtomicBool>;

/// The flag of the latest attempt of one connect: tokio-postgres tries hosts (and each
/// host's addresses) one after another, and a refused attempt (a FATAL at login) must not
/// mark the connection a later attempt makes.
type Latest = Arc<Mutex<Fatal>>;

/// A fresh flag for a new attempt, made the latest.
fn new_attempt(latest: &Latest) -> Fatal {
    let fatal = Fatal::default();
    *latest.lock().unwrap_or_else(|p| p.into_inner()) = fatal.clone();
    fatal
}

/// Opens tokio-postgres connections whose server stream is watched for fatal errors.
pub(super) trait Dial: Send + Sync + 'static {
    /// Connect with `config`.
    fn dial<'a>(
        &'a self,
        config: &'a tokio_postgres::Config,
    ) -> BoxFuture<'a, Result<Dialed, tokio_postgres::Error>>;
}

/// A connection as dialed.
pub(super) struct Dialed {
    /// The client, its connection driven by a task of its own.
    pub(super) client: deadpool_postgres::ClientWrapper,
    /// Set when the server sends a fatal error on it (never set for a connection that
    /// is not watched).
    pub(super) fatal: Fatal,
    /// Plaintext through [`Plain`]: a cancel request must go the same way.
    pub(super) plain: bool,
}

/// The connector a cancel request of a [`Plain`] connection needs (its cancel token
/// asks for `sslnegotiation=direct`, which only [`Plain`] answers without TLS).
pub(super) fn plain_for_cancel() -> Plain {
    Plain {
        latest: Latest::default(),
    }
}

/// A [`Dial`] over a TLS connector of any kind, or over none ([`NoTls`]).
pub(super) struct Dialer<T> {
    tls: Option<T>,
}

impl Dialer<NoTls> {
    /// Plaintext only.
    pub(super) fn plaintext() -> Self {
        Self { tls: None }
    }
}

impl<T> Dialer<T> {
    /// TLS through `tls` (with the config's `sslmode`).
    pub(super) fn tls(tls: T) -> Self {
        Self { tls: Some(tls) }
    }
}

impl<T> Dial for Dialer<T>
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    fn dial<'a>(
        &'a self,
        config: &'a tokio_postgres::Config,
    ) -> BoxFuture<'a, Result<Dialed, tokio_postgres::Error>> {
        Box::pin(async move {
            let latest = Latest::default();
            let dialed = |client, plain| Dialed {
                client,
                fatal: latest.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                plain,
            };
            let mode = config.get_ssl_mode();
            let to_names = !config.get_hosts().is_empty()
                && config.get_hosts().iter().all(|h| matches!(h, Host::Tcp(_)));
            // Plaintext for sure: `disable`, or no TLS connector (`prefer` means
            // plaintext then). `require` without a connector fails as tokio-postgres says.
            let plaintext =
                mode == SslMode::Disable || (self.tls.is_none() && mode == SslMode::Prefer);
            if plaintext && to_names {
                let mut config = config.clone();
                config
                    .ssl_mode(SslMode::Require)
                    .ssl_negotiation(SslNegotiation::Direct);
                let plain = Plain {
                    latest: latest.clone(),
                };
                let (client, connection) = config.connect(plain).await?;
                return Ok(dialed(wrap(client, connection), true));
            }
            match &self.tls {
                Some(tls) if mode != SslMode::Disable => {
                    let watch = Watch {
                        inner: tls.clone(),
                        latest: latest.clone(),
                    };
                    let (client, connection) = config.connect(watch).await?;
                    Ok(dialed(wrap(client, connection), false))
                }
                _ => {
                    let (client, connection) = config.connect(NoTls).await?;
                    Ok(dialed(wrap(client, connection), false))
                }
            }
        })
    }
}

/// The client, with its connection driven by a task of its own.
fn wrap<F>(client: tokio_postgres::Client, connection: F) -> deadpool_postgres::ClientWrapper
where
    F: Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("PostgreSQL connection ended: {e}");
        }
    });
    deadpool_postgres::ClientWrapper::new(client, task)
}

/// A TLS connector whose streams are watched.
#[derive(Clone)]
struct Watch<T> {
    inner: T,
    latest: Latest,
}

impl<T> MakeTlsConnect<Socket> for Watch<T>
where
    T: MakeTlsConnect<Socket>,
{
    type Stream = Watched<T::Stream>;
    type TlsConnect = Watch<T::TlsConnect>;
    type Error = T::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        Ok(Watch {
            inner: self.inner.make_tls_connect(domain)?,
            latest: self.latest.clone(),
        })
    }
}

impl<T> TlsConnect<Socket> for Watch<T>
where
    T: TlsConnect<Socket>,
{
    type Stream = Watched<T::Stream>;
    type Error = T::Error;
    type Future = Handshake<T::Future>;

    fn connect(self, stream: Socket) -> Self::Future {
        Handshake {
            inner: Box::pin(self.inner.connect(stream)),
            fatal: new_attempt(&self.latest),
        }
    }
}

/// A connector's TLS handshake, whose stream is then watched.
pub(super) struct Handshake<F> {
    inner: Pin<Box<F>>,
    fatal: Fatal,
}

impl<F, S, E> Future for Handshake<F>
where
    F: Future<Output = Result<S, E>>,
{
    type Output = Result<Watched<S>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.inner.as_mut().poll(cx) {
            Poll::Ready(Ok(stream)) => Poll::Ready(Ok(Watched::new(stream, self.fatal.clone()))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The plaintext "connector": no encryption, only the watch (see the module's docs).
#[derive(Clone)]
pub(super) struct Plain {
    latest: Latest,
}

impl MakeTlsConnect<Socket> for Plain {
    type Stream = Watched<PlainSocket>;
    type TlsConnect = Plain;
    type Error = io::Error;

    fn make_tls_connect(&mut self, _domain: &str) -> io::Result<Plain> {
        Ok(self.clone())
    }
}

impl TlsConnect<Socket> for Plain {
    type Stream = Watched<PlainSocket>;
    type Error = io::Error;
    type Future = std::future::Ready<io::Result<Watched<PlainSocket>>>;

    fn connect(self, stream: Socket) -> Self::Future {
        std::future::ready(Ok(Watched::new(
            PlainSocket(stream),
            new_attempt(&self.latest),
        )))
    }
}

/// Whether an `ErrorResponse` body (its fields) has severity `FATAL` or `PANIC`.
fn is_fatal(body: &[u8]) -> bool {
    // `V` (never localized, since 9.6) decides when present; `S` (localized, FATAL/PANIC
    // in the default English) only without it.
    let (mut v, mut s) = (None, None);
    let mut fields = body;
    while let Some((&code, rest)) = fields.split_first() {
        if code == 0 {
            break;
        }
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        match code {
            b'V' => v = Some(&rest[..end]),
            b'S' => s = Some(&rest[..end]),
            _ => {}
        }
        fields = rest.get(end + 1..).unwrap_or_default();
    }
    v.or(s)
        .is_some_and(|sev| sev == b"FATAL" || sev == b"PANIC")
}

/// The longest `ErrorResponse` read in full; a longer one is judged by its beginning
/// (severity comes first).
const ERROR_KEPT: usize = 4096;

/// Where the reader is in the server's message stream.
enum Framing {
    /// Reading a message header: tag and length (5 bytes).
    Header { got: usize, header: [u8; 5] },
    /// Skipping (or, for an `ErrorResponse`, keeping) the rest of a message.
    Body { left: usize, error: Option<Vec<u8>> },
}

/// A server stream read through the watch.
pub(super) struct Watched<S> {
    inner: S,
    fatal: Fatal,
    framing: Framing,
}

impl<S> Watched<S> {
    fn new(inner: S, fatal: Fatal) -> Self {
        Self {
            inner,
            fatal,
            framing: Framing::Header {
                got: 0,
                header: [0; 5],
            },
        }
    }

    /// Follow the message framing through `bytes` read from the server.
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.framing {
                Framing::Header { got, header } => {
                    let n = (5 - *got).min(bytes.len());
                    header[*got..*got + n].copy_from_slice(&bytes[..n]);
                    *got += n;
                    bytes = &bytes[n..];
                    if *got == 5 {
                        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                        let left = (len as usize).saturating_sub(4);
                        let error = (header[0] == b'E').then(Vec::new);
                        self.framing = Framing::Body { left, error };
                        self.end_of_body();
                    }
                }
                Framing::Body { left, error } => {
                    let n = (*left).min(bytes.len());
                    if let Some(kept) = error {
                        let room = ERROR_KEPT.saturating_sub(kept.len());
                        kept.extend_from_slice(&bytes[..n.min(room)]);
                    }
                    *left -= n;
                    bytes = &bytes[n..];
                    self.end_of_body();
                }
            }
        }
    }

    /// At a message's end: judge an `ErrorResponse`, and read the next header.
    fn end_of_body(&mut self) {
        if let Framing::Body { left: 0, error } = &self.framing {
            if error.as_deref().is_some_and(is_fatal) {
                self.fatal.store(true, Ordering::Release);
            }
            self.framing = Framing::Header {
                got: 0,
                header: [0; 5],
            };
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let this = &mut *self;
            this.observe(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: TlsStream + Unpin> TlsStream for Watched<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}

/// The plaintext socket, as a "TLS stream" with nothing to bind a channel to.
pub(super) struct PlainSocket(Socket);

impl AsyncRead for PlainSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PlainSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl TlsStream for PlainSocket {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none() // no TLS: nothing to bind to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server message: tag, length, body.
    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn error(severity: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (code, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', "57P01"),
            (b'M', "terminating connection due to administrator command"),
        ] {
            body.push(code);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        message(b'E', &body)
    }

    /// Fed in pieces of every size: messages split anywhere are followed.
    fn fatal_after(stream: &[u8], piece: usize) -> bool {
        let fatal = Fatal::default();
        let mut watched = Watched::new((), fatal.clone());
        for chunk in stream.chunks(piece) {
            watched.observe(chunk);
        }
        fatal.load(Ordering::Acquire)
    }

    /// tokio-postgres tries hosts one after another: an attempt refused with a FATAL
    /// (a user not yet on a replica, `57P03` starting up) must not mark the connection
    /// the next attempt makes.
    #[test]
    fn a_refused_attempt_does_not_mark_the_next_one() {
        let latest = Latest::default();
        new_attempt(&latest).store(true, Ordering::Release);
        let second = new_attempt(&latest);
        let kept = latest.lock().unwrap().clone();
        assert!(Arc::ptr_eq(&kept, &second));
        assert!(!kept.load(Ordering::Acquire));
    }

    /// `V` decides when present (a localized `S` says nothing then).
    #[test]
    fn the_unlocalized_severity_decides() {
        let body = |fields: &[(u8, &str)]| {
            let mut b = Vec::new();
            for (code, value) in fields {
                b.push(*code);
                b.extend_from_slice(value.as_bytes());
                b.push(0);
            }
            b.push(0);
            b
        };
        assert!(is_fatal(&body(&[(b'S', "FATAL")])));
        assert!(!is_fatal(&body(&[(b'S', "FATAL"), (b'V', "ERROR")])));
        assert!(is_fatal(&body(&[(b'S', "SCHWERWIEGEND"), (b'V', "FATAL")])));
    }

    #[test]
    fn a_fatal_error_is_noticed_wherever_the_reads_split_the_stream() {
        let ready = message(b'Z', b"I");
        let data_row = message(b'D', &[0, 1, 0, 0, 0, 1, b'1']);
        let mut stream = [ready.clone(), data_row.clone(), error("ERROR"), ready].concat();
        for piece in 1..stream.len() {
            assert!(!fatal_after(&stream, piece), "an ERROR taken for fatal");
        }
        stream.extend(error("FATAL"));
        stream.extend(data_row); // never comes, but must not confuse the framing
        for piece in 1..stream.len() {
            assert!(
                fatal_after(&stream, piece),
                "FATAL missed in pieces of {piece}"
            );
        }
        assert!(fatal_after(&error("PANIC"), 7));
        // An error whose text holds the word is not fatal.
        let mut body = b"SERROR\0VERROR\0MFATAL mistake\0\0".to_vec();
        assert!(!fatal_after(&message(b'E', &body), 3));
        body.truncate(0);
        assert!(!fatal_after(&message(b'E', &body), 3), "empty error body");
    }
}
