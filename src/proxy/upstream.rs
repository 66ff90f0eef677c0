//! Server connections: logging in to PostgreSQL with a lease's credentials (plaintext or
//! TLS, cleartext/MD5/SCRAM), the simple queries the proxy runs itself (`SET`,
//! `DISCARD ALL`), and one [`Route`] per configured database — its lease engine, its
//! idle connections and its limit.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use secrecy::ExposeSecret;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::credentials::{Credentials, Generation};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{ConnectionGuard, Engine};

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
pub(crate) struct Upstream {
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
) -> std::result::Result<Upstream, LoginError> {
    let addr = format!("{}:{}", target.host, target.port);
    let tcp = tokio::time::timeout(target.connect_timeout, TcpStream::connect(&addr))
        .await
        .map_err(|_| {
            LoginError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "connecting to {addr}: no answer within {:?}",
                    target.connect_timeout
                ),
            ))
        })??;
    tcp.set_nodelay(true)?;
    let peer = tcp.peer_addr()?;
    tokio::time::timeout(target.connect_timeout, async move {
        let mut io = negotiate_tls(target, tcp).await?;
        let (params, pid, secret, pending) = startup(&mut io, target, creds).await?;
        Ok(Upstream {
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
    .map_err(|_| {
        LoginError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "logging in to {addr}: not done within {:?}",
                target.connect_timeout
            ),
        ))
    })?
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

impl Upstream {
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

/// Counters of one route, for `/metrics` and `/health`.
#[derive(Debug, Default)]
pub(crate) struct RouteStats {
    pub(crate) sessions_active: AtomicUsize,
    pub(crate) sessions_total: AtomicU64,
    pub(crate) server_logins: AtomicU64,
    pub(crate) server_login_failures: AtomicU64,
    pub(crate) server_reused: AtomicU64,
    pub(crate) waits: AtomicU64,
    pub(crate) wait_ns: AtomicU64,
    pub(crate) wait_timeouts: AtomicU64,
    pub(crate) handovers: AtomicU64,
    pub(crate) handovers_refused: AtomicU64,
}

/// One configured database: what clients ask for, the lease behind it, the server
/// connections it keeps.
pub(crate) struct Route {
    pub(crate) name: String,
    pub(crate) users: Vec<String>,
    pub(crate) engine: Engine,
    pub(crate) target: Arc<Target>,
    idle: Mutex<Vec<Upstream>>,
    permits: Arc<Semaphore>,
    pub(crate) max_connections: usize,
    pub(crate) wait_timeout: Duration,
    pub(crate) stats: RouteStats,
}

/// An idle server connection unused for longer than this is checked before reuse.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(30);

/// Why no server connection could be had.
pub(crate) enum CheckoutError {
    /// All `max_connections` in use for the whole wait.
    Timeout,
    /// The credentials are unusable (lease expired, engine closed).
    Credentials(Error),
    /// The server refused or could not be reached.
    Login(LoginError),
}

impl Route {
    pub(crate) fn new(
        name: String,
        users: Vec<String>,
        engine: Engine,
        target: Arc<Target>,
        max_connections: usize,
        wait_timeout: Duration,
    ) -> Self {
        Self {
            name,
            users,
            engine,
            target,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            wait_timeout,
            stats: RouteStats::default(),
        }
    }

    /// A server connection for one client session, with its slot.
    pub(crate) async fn checkout(
        &self,
    ) -> std::result::Result<(OwnedSemaphorePermit, Upstream), CheckoutError> {
        let started = Instant::now();
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.stats.waits.fetch_add(1, Ordering::Relaxed);
                let got =
                    tokio::time::timeout(self.wait_timeout, self.permits.clone().acquire_owned())
                        .await;
                self.stats
                    .wait_ns
                    .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                match got {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) | Err(_) => {
                        self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                        return Err(CheckoutError::Timeout);
                    }
                }
            }
        };
        self.connection().await.map(|up| (permit, up))
    }

    /// A server connection of the serving generation, outside the limit (the caller holds
    /// a slot already: a checkout, or a session handed over to a new generation).
    pub(crate) async fn connection(&self) -> std::result::Result<Upstream, CheckoutError> {
        loop {
            let candidate = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some(mut up) = candidate else { break };
            if up.generation != self.engine.generation() {
                tokio::spawn(up.terminate());
                continue;
            }
            if up.idle_since.elapsed() > CHECK_IDLE_AFTER {
                let alive = tokio::time::timeout(Duration::from_secs(5), up.simple("")).await;
                if !matches!(alive, Ok(Ok(_))) {
                    continue;
                }
            }
            self.stats.server_reused.fetch_add(1, Ordering::Relaxed);
            return Ok(up);
        }
        self.open().await
    }

    /// Log in with the current credentials; after a refusal (revoked behind our back),
    /// once more with new ones.
    async fn open(&self) -> std::result::Result<Upstream, CheckoutError> {
        let current = self.engine.usable().map_err(CheckoutError::Credentials)?;
        self.stats.server_logins.fetch_add(1, Ordering::Relaxed);
        match login(
            &self.target,
            &current.credentials,
            current.generation,
            Some(current.track()),
        )
        .await
        {
            Ok(up) => Ok(up),
            Err(e) if e.is_auth_failure() => {
                self.engine.report_auth_failure(current.generation);
                let now = self
                    .engine
                    .wait_newer(current.generation, Duration::from_secs(5))
                    .await;
                if now == current.generation {
                    self.stats
                        .server_login_failures
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(CheckoutError::Login(e));
                }
                let current = self.engine.usable().map_err(CheckoutError::Credentials)?;
                login(
                    &self.target,
                    &current.credentials,
                    current.generation,
                    Some(current.track()),
                )
                .await
                .map_err(|e| {
                    self.stats
                        .server_login_failures
                        .fetch_add(1, Ordering::Relaxed);
                    CheckoutError::Login(e)
                })
            }
            Err(e) => {
                self.stats
                    .server_login_failures
                    .fetch_add(1, Ordering::Relaxed);
                Err(CheckoutError::Login(e))
            }
        }
    }

    /// A session ended cleanly with this connection: keep it for the next one if it is
    /// of the serving generation, else close it (its lease drains).
    pub(crate) fn checkin(&self, mut up: Upstream) {
        if up.generation != self.engine.generation() || !up.pending.is_empty() {
            tokio::spawn(up.terminate());
            return;
        }
        up.idle_since = Instant::now();
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(up);
    }

    /// Close idle connections of retired generations (at every rotation), or all.
    pub(crate) fn close_idle(&self, all: bool) {
        let current = self.engine.generation();
        let closing: Vec<Upstream> = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let (keep, close) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|u| !all && u.generation == current);
            *idle = keep;
            close
        };
        for up in closing {
            tokio::spawn(up.terminate());
        }
    }

    /// Idle server connections.
    pub(crate) fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A verifier for the route's engine: log in with the new credentials and leave.
pub(crate) fn verifier(target: Arc<Target>) -> crate::lease::Verifier {
    Arc::new(move |creds: Credentials| {
        let target = target.clone();
        Box::pin(async move {
            // Not counted in any generation: it closes before the swap.
            match login(&target, &creds, Generation(0), None).await {
                Ok(up) => {
                    up.terminate().await;
                    Ok(())
                }
                Err(e) => {
                    let kind = match &e {
                        e if e.is_auth_failure() => ErrorKind::AuthenticationFailed,
                        LoginError::Tls(_) => ErrorKind::Tls,
                        _ => ErrorKind::Backend,
                    };
                    Err(Error::new(
                        kind,
                        format!(
                            "verifying new credentials against PostgreSQL at {}: {e}",
                            target.describe()
                        ),
                    ))
                }
            }
        }) as crate::lease::BoxFuture<'static, Result<()>>
    })
}
