//! One server connection: where it goes ([`Target`]), logging in to PostgreSQL with a
//! lease's credentials (plaintext or TLS, cleartext/MD5/SCRAM), the queries the proxy
//! runs on it itself (settings, `DISCARD ALL`, a hand-over's reads and replays), and the
//! CancelRequest that reaches its backend.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
#[cfg(feature = "tls")]
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use secrecy::ExposeSecret;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::config;
use crate::credentials::{Credentials, Generation};
use crate::error::Result;
#[cfg(not(feature = "tls"))]
use crate::error::{Error, ErrorKind};
use crate::lease::ConnectionGuard;

/// A byte stream both ways (plaintext or TLS).
pub(crate) trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// A server connection's stream.
pub(crate) type Io = Pin<Box<dyn Duplex>>;

/// Where a route's server connections go.
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) dbname: String,
    /// `None`: plaintext. With a config: TLS, required unless `tls_optional`.
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    #[cfg(feature = "tls")]
    pub(crate) tls_optional: bool,
    pub(crate) connect_timeout: Duration,
}

impl Target {
    /// Where `db`'s server connections go, and how (its sslmode).
    ///
    /// # Errors
    /// [`ErrorKind::Config`](crate::ErrorKind::Config): an sslmode or CA file that
    /// cannot be used.
    pub(crate) fn from_config(db: &config::Database) -> Result<Self> {
        #[cfg(feature = "tls")]
        let (tls, tls_optional) = {
            use crate::tls::{PgTls, SslMode};
            let mode: SslMode = db.sslmode.as_deref().unwrap_or("disable").parse()?;
            let mut settings = PgTls::new(mode);
            if let Some(ca) = &db.sslrootcert {
                settings = settings.root_cert(ca);
            }
            let config = settings.rustls_config()?.map(Arc::new);
            (config, matches!(mode, SslMode::Allow | SslMode::Prefer))
        };
        #[cfg(not(feature = "tls"))]
        if db
            .sslmode
            .as_deref()
            .is_some_and(|m| m != "disable" && m != "prefer" && m != "allow")
        {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "[[database]] \"{}\": sslmode {} needs vaultpool built with its `tls` feature",
                    db.name,
                    db.sslmode.as_deref().unwrap_or_default()
                ),
            ));
        }
        Ok(Self {
            host: db.host.clone().unwrap_or_else(|| "127.0.0.1".into()),
            port: db.port.unwrap_or(5432),
            dbname: db.dbname.clone().unwrap_or_else(|| db.name.clone()),
            #[cfg(feature = "tls")]
            tls,
            #[cfg(feature = "tls")]
            tls_optional,
            connect_timeout: Duration::from_secs(10),
        })
    }

    /// `host:port/dbname`, for messages.
    pub(crate) fn describe(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }
}

/// Why a login to the server failed.
#[derive(Debug)]
pub(crate) enum LoginError {
    /// Unreachable, cut, or timed out.
    Io(io::Error),
    /// The server refused: its `ErrorResponse`, to forward to the client verbatim, and
    /// its SQLSTATE.
    Server {
        raw: BytesMut,
        code: String,
        message: String,
    },
    /// TLS required but refused, or the handshake failed (only with the `tls` feature).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    Tls(String),
    /// Something the proxy does not speak (an auth method, a broken message).
    Protocol(String),
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Server { code, message, .. } => write!(f, "{message} (SQLSTATE {code})"),
            Self::Tls(e) => write!(f, "TLS: {e}"),
            Self::Protocol(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for LoginError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl LoginError {
    /// The server refused the credentials (they may have been revoked behind our back).
    pub(crate) fn is_auth_failure(&self) -> bool {
        matches!(self, Self::Server { code, .. } if code == "28P01")
    }

    fn protocol(what: impl std::fmt::Display) -> Self {
        Self::Protocol(what.to_string())
    }
}

/// A logged-in server connection.
pub(crate) struct Server {
    pub(crate) io: Io,
    /// Bytes read past the last message the proxy handled itself.
    pub(crate) pending: BytesMut,
    /// What the server reported at login (`server_version`, `TimeZone`, ...).
    pub(crate) params: Vec<(String, String)>,
    pub(crate) pid: i32,
    pub(crate) secret: i32,
    pub(crate) addr: SocketAddr,
    /// The user it logged in as (the lease's).
    pub(crate) user: String,
    pub(crate) generation: Generation,
    pub(crate) idle_since: Instant,
    /// Counts it in its generation (none for the verifying login).
    _guard: Option<ConnectionGuard>,
}

/// Read from `io` until `buf` holds one whole backend message, and parse it.
async fn next_message(
    io: &mut Io,
    buf: &mut BytesMut,
) -> std::result::Result<backend::Message, LoginError> {
    loop {
        // The raw bytes stay in `buf` until parsed, for an ErrorResponse forwarded as is.
        if let Some(m) = backend::Message::parse(buf).map_err(LoginError::protocol)? {
            return Ok(m);
        }
        if io.read_buf(buf).await? == 0 {
            return Err(LoginError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// The raw bytes of the next message if it is an `ErrorResponse` (kept for forwarding).
fn peek_error(buf: &BytesMut) -> Option<BytesMut> {
    if buf.first() != Some(&b'E') || buf.len() < 5 {
        return None;
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize + 1;
    (buf.len() >= len).then(|| BytesMut::from(&buf[..len]))
}

fn server_error(raw: BytesMut, body: &backend::ErrorResponseBody) -> LoginError {
    use fallible_iterator::FallibleIterator;
    let (mut code, mut message) = (String::new(), String::new());
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    LoginError::Server { raw, code, message }
}

/// Open a connection to `target` and log in as `creds`.
pub(crate) async fn login(
    target: &Target,
    creds: &Credentials,
    generation: Generation,
    guard: Option<ConnectionGuard>,
) -> std::result::Result<Server, LoginError> {
    let addr = format!("{}:{}", target.host, target.port);
    let tcp = tokio::time::timeout(target.connect_timeout, TcpStream::connect(&addr))
        .await
        .map_err(|_| timed_out(format!("connecting to {addr}: no answer"), target))??;
    tcp.set_nodelay(true)?;
    let peer = tcp.peer_addr()?;
    tokio::time::timeout(target.connect_timeout, async move {
        let mut io = negotiate_tls(target, tcp).await?;
        let (params, pid, secret, pending) = startup(&mut io, target, creds).await?;
        Ok(Server {
            io,
            pending,
            params,
            pid,
            secret,
            addr: peer,
            user: creds.username.clone(),
            generation,
            idle_since: Instant::now(),
            _guard: guard,
        })
    })
    .await
    .map_err(|_| timed_out(format!("logging in to {addr}: not done"), target))?
}

/// `what` did not happen within the target's connect timeout.
fn timed_out(what: String, target: &Target) -> LoginError {
    LoginError::Io(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what} within {:?}", target.connect_timeout),
    ))
}

#[cfg(feature = "tls")]
async fn negotiate_tls(target: &Target, mut tcp: TcpStream) -> std::result::Result<Io, LoginError> {
    let Some(config) = target.tls.clone() else {
        return Ok(Box::pin(tcp));
    };
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await?;
    match tcp.read_u8().await? {
        b'S' => {
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| LoginError::Tls(format!("{}: {e}", target.host)))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    // rustls' reason is in the source chain.
                    let mut text = e.to_string();
                    let mut cause = std::error::Error::source(&e);
                    while let Some(c) = cause {
                        text = format!("{text}: {c}");
                        cause = c.source();
                    }
                    LoginError::Tls(text)
                })?;
            Ok(Box::pin(tls))
        }
        b'N' if target.tls_optional => Ok(Box::pin(tcp)),
        b'N' => Err(LoginError::Tls(format!(
            "the server at {} does not offer TLS, and sslmode requires it",
            target.describe()
        ))),
        other => Err(LoginError::protocol(format!(
            "unexpected answer {:?} to SSLRequest",
            other as char
        ))),
    }
}

#[cfg(not(feature = "tls"))]
async fn negotiate_tls(_: &Target, tcp: TcpStream) -> std::result::Result<Io, LoginError> {
    Ok(Box::pin(tcp))
}

type Startup = (Vec<(String, String)>, i32, i32, BytesMut);

async fn startup(
    io: &mut Io,
    target: &Target,
    creds: &Credentials,
) -> std::result::Result<Startup, LoginError> {
    let mut out = BytesMut::new();
    frontend::startup_message(
        [
            ("user", creds.username.as_str()),
            ("database", target.dbname.as_str()),
        ],
        &mut out,
    )
    .map_err(LoginError::protocol)?;
    io.write_all(&out).await?;
    let password = creds.password.expose_secret().as_bytes();
    let mut buf = BytesMut::with_capacity(1024);
    let mut scram: Option<ScramSha256> = None;
    let (mut params, mut pid, mut secret) = (Vec::new(), 0, 0);
    loop {
        let raw_error = peek_error(&buf);
        let msg = next_message(io, &mut buf).await;
        let msg = match msg {
            Ok(m) => m,
            Err(e) => return Err(e),
        };
        out.clear();
        match msg {
            backend::Message::AuthenticationOk => {}
            backend::Message::AuthenticationCleartextPassword => {
                frontend::password_message(password, &mut out).map_err(LoginError::protocol)?;
            }
            backend::Message::AuthenticationMd5Password(body) => {
                let hash = postgres_protocol::authentication::md5_hash(
                    creds.username.as_bytes(),
                    password,
                    body.salt(),
                );
                frontend::password_message(hash.as_bytes(), &mut out)
                    .map_err(LoginError::protocol)?;
            }
            backend::Message::AuthenticationSasl(body) => {
                use fallible_iterator::FallibleIterator;
                let mut mechanisms = body.mechanisms();
                let mut has = false;
                while let Some(m) = mechanisms.next().map_err(LoginError::protocol)? {
                    has |= m == sasl::SCRAM_SHA_256;
                }
                if !has {
                    return Err(LoginError::protocol("the server offers no SCRAM-SHA-256"));
                }
                let s = ScramSha256::new(password, ChannelBinding::unsupported());
                frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut out)
                    .map_err(LoginError::protocol)?;
                scram = Some(s);
            }
            backend::Message::AuthenticationSaslContinue(body) => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| LoginError::protocol("SASL out of order"))?;
                s.update(body.data()).map_err(LoginError::protocol)?;
                frontend::sasl_response(s.message(), &mut out).map_err(LoginError::protocol)?;
            }
            backend::Message::AuthenticationSaslFinal(body) => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| LoginError::protocol("SASL out of order"))?;
                s.finish(body.data()).map_err(LoginError::protocol)?;
            }
            backend::Message::ParameterStatus(body) => {
                let name = body.name().map_err(LoginError::protocol)?.to_owned();
                let value = body.value().map_err(LoginError::protocol)?.to_owned();
                params.retain(|(k, _): &(String, String)| *k != name);
                params.push((name, value));
            }
            backend::Message::BackendKeyData(body) => {
                pid = body.process_id();
                secret = body.secret_key();
            }
            backend::Message::NoticeResponse(_) => {}
            backend::Message::ErrorResponse(body) => {
                return Err(server_error(raw_error.unwrap_or_default(), &body));
            }
            backend::Message::ReadyForQuery(_) => return Ok((params, pid, secret, buf)),
            _ => {
                return Err(LoginError::protocol(
                    "an unexpected message from the server during login (an authentication \
                     method vaultpool-proxy does not speak: use scram-sha-256, md5 or password)",
                ));
            }
        }
        if !out.is_empty() {
            io.write_all(&out).await?;
        }
    }
}

impl Server {
    /// Send `out`, then read up to ReadyForQuery: `each` sees every message but the
    /// first ErrorResponse (returned, raw for forwarding, once the server is ready
    /// again) and ReadyForQuery (its status is returned). What the proxy's own queries
    /// share.
    async fn exchange(
        &mut self,
        out: &[u8],
        mut each: impl FnMut(backend::Message),
    ) -> std::result::Result<u8, LoginError> {
        self.io.write_all(out).await?;
        let mut buf = std::mem::take(&mut self.pending);
        let mut error = None;
        loop {
            let raw_error = peek_error(&buf);
            match next_message(&mut self.io, &mut buf).await? {
                backend::Message::ErrorResponse(body) => {
                    error.get_or_insert_with(|| server_error(raw_error.unwrap_or_default(), &body));
                }
                backend::Message::ReadyForQuery(body) => {
                    self.pending = buf;
                    return error.map_or(Ok(body.status()), Err);
                }
                m => each(m),
            }
        }
    }

    /// Run `sql` as a simple query: its `ParameterStatus` changes, or the server's error
    /// (raw, for forwarding).
    pub(crate) async fn simple(
        &mut self,
        sql: &str,
    ) -> std::result::Result<Vec<(String, String)>, LoginError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(LoginError::protocol)?;
        let mut changed = Vec::new();
        // Results, notices, notifications: not the proxy's.
        let status = self
            .exchange(&out, |m| {
                if let backend::Message::ParameterStatus(body) = m
                    && let (Ok(name), Ok(value)) = (body.name(), body.value())
                {
                    changed.push((name.to_owned(), value.to_owned()));
                }
            })
            .await?;
        if status != b'I' {
            return Err(LoginError::protocol(
                "the session is not idle after a query",
            ));
        }
        for (k, v) in &changed {
            self.params.retain(|(n, _)| n != k);
            self.params.push((k.clone(), v.clone()));
        }
        Ok(changed)
    }

    /// Run `sql` (one statement) as a simple query and return its rows as text.
    pub(crate) async fn rows(
        &mut self,
        sql: &str,
    ) -> std::result::Result<Vec<Vec<Option<String>>>, LoginError> {
        use fallible_iterator::FallibleIterator;
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(LoginError::protocol)?;
        let mut rows = Vec::new();
        let mut broken = None;
        self.exchange(&out, |m| {
            if let backend::Message::DataRow(body) = m {
                let mut row = Vec::new();
                let mut ranges = body.ranges();
                loop {
                    match ranges.next() {
                        Ok(Some(r)) => row.push(
                            r.map(|r| String::from_utf8_lossy(&body.buffer()[r]).into_owned()),
                        ),
                        Ok(None) => break,
                        Err(e) => {
                            broken = Some(LoginError::protocol(e));
                            break;
                        }
                    }
                }
                rows.push(row);
            }
        })
        .await?;
        broken.map_or(Ok(rows), Err)
    }

    /// Prepare `statements` (name, query, parameter type OIDs) with the extended
    /// protocol, as a client's Parse messages did on another connection.
    pub(crate) async fn prepare(
        &mut self,
        statements: &[(String, String, Vec<u32>)],
    ) -> std::result::Result<(), LoginError> {
        let mut out = BytesMut::new();
        for (name, query, types) in statements {
            frontend::parse(name, query, types.iter().copied(), &mut out)
                .map_err(LoginError::protocol)?;
        }
        frontend::sync(&mut out);
        self.exchange(&out, |_| {}).await.map(|_| ())
    }

    /// Send one Parse message with this body (a client's, kept as it was sent) and a
    /// Sync; its ParseComplete and ReadyForQuery stay with the proxy.
    pub(crate) async fn parse_raw(&mut self, body: &[u8]) -> std::result::Result<(), LoginError> {
        let mut out = BytesMut::with_capacity(body.len() + 10);
        out.extend_from_slice(b"P");
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(body);
        frontend::sync(&mut out);
        self.exchange(&out, |_| {}).await.map(|_| ())
    }

    /// Set `pairs` for the session, as its startup packet would (see [`set_config_sql`]).
    pub(crate) async fn set_config(
        &mut self,
        pairs: &[(String, String)],
    ) -> std::result::Result<(), LoginError> {
        if pairs.is_empty() {
            return Ok(());
        }
        self.simple(&set_config_sql(pairs)).await.map(|_| ())
    }

    /// Send `Terminate` and close (best effort).
    pub(crate) async fn terminate(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.io.write_all(&out).await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

/// Ask the server to cancel what backend `pid` runs (PostgreSQL's CancelRequest, on a new
/// connection, as libpq does).
pub(crate) async fn cancel(addr: SocketAddr, pid: i32, secret: i32) -> io::Result<()> {
    let mut tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting to cancel"))??;
    let mut out = BytesMut::new();
    frontend::cancel_request(pid, secret, &mut out);
    tcp.write_all(&out).await?;
    // The server closes the connection once it has read the request.
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut sink)).await;
    Ok(())
}

/// One query that sets `pairs` for the session as the startup packet would: with
/// `set_config`, which reads each value in its setting's own syntax (a list such as
/// `search_path` stays a list; `SET x = '...'` would make it one quoted name).
pub(crate) fn set_config_sql(pairs: &[(String, String)]) -> String {
    let calls: Vec<String> = pairs
        .iter()
        .map(|(n, v)| {
            format!(
                "set_config({}, {}, false)",
                quote_literal(n),
                quote_literal(v)
            )
        })
        .collect();
    format!("SELECT {}", calls.join(", "))
}

/// A SQL string literal.
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
impl Server {
    /// A server connection over `io` that is logged in already (for the relay's tests).
    pub(crate) fn for_tests(io: Io, generation: Generation) -> Self {
        Self {
            io,
            pending: BytesMut::new(),
            params: Vec::new(),
            pid: 1,
            secret: 2,
            addr: SocketAddr::from(([127, 0, 0, 1], 5432)),
            user: "test".into(),
            generation,
            idle_since: Instant::now(),
            _guard: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_one_quoted_set_config_batch() {
        let pairs = [
            ("application_name".to_owned(), "it's".to_owned()),
            ("search_path".to_owned(), "x, y".to_owned()),
        ];
        assert_eq!(
            set_config_sql(&pairs),
            "SELECT set_config('application_name', 'it''s', false), \
             set_config('search_path', 'x, y', false)"
        );
    }
}
