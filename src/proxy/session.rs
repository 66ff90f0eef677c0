//! One client session: startup, authentication, a server connection of the route's
//! current generation, the relay, and the reset (`DISCARD ALL`) that lets the next
//! session reuse the server connection.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::upstream::{CheckoutError, LoginError, Route, Upstream};
use super::wire::{self, Seen, Startup, StartupError};
use super::{CancelKey, ProxyState};

/// Who is on the other end.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Peer {
    /// A TCP client (password only).
    Tcp,
    /// A Unix-socket client with this uid (if the kernel told).
    Unix(Option<u32>),
}

/// Serve one client connection until it ends. Never panics on client input; every
/// failure ends this session only.
pub(crate) async fn serve<S>(shared: Arc<ProxyState>, mut client: S, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let started =
        tokio::time::timeout(shared.startup_timeout, start(&shared, &mut client, peer)).await;
    let (route, mut up, permit, key, custom_settings) = match started {
        Ok(Ok(Some(s))) => s,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "client session ended during startup");
            return;
        }
        Err(_) => {
            // Never finished its startup: tell it (it may be a slow client) and close.
            let mut out = BytesMut::new();
            wire::error_response(
                &mut out,
                "FATAL",
                "08P01",
                &format!(
                    "vaultpool-proxy: the session did not start within {:?}",
                    shared.startup_timeout
                ),
            );
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), client.write_all(&out))
                .await;
            return;
        }
    };
    route.stats.sessions_active.fetch_add(1, Ordering::Relaxed);
    route.stats.sessions_total.fetch_add(1, Ordering::Relaxed);
    // Relay; between transactions after a rotation, hand the session over to the serving
    // generation (see `hand_over`), so its old lease can go.
    let mut movable = true;
    let known = Known::default();
    known.opaque.store(custom_settings, Ordering::Relaxed);
    let outcome = loop {
        match relay(
            &mut client,
            &mut up,
            &route,
            movable,
            &known,
            &shared.closing,
        )
        .await
        {
            Ok(Ending::HandOver) => match hand_over(&route, &mut up, &known).await {
                Moved::To(new) => {
                    let old = std::mem::replace(&mut up, new);
                    shared
                        .cancels
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, (up.addr, up.pid, up.secret));
                    route.stats.handovers.fetch_add(1, Ordering::Relaxed);
                    route.checkin(old); // closes it: retired generation
                }
                Moved::Stay(why) => {
                    tracing::info!(database = %route.name, reason = %why, "session stays on its retired generation");
                    route
                        .stats
                        .handovers_refused
                        .fetch_add(1, Ordering::Relaxed);
                    movable = false;
                }
                Moved::Broken(why) => {
                    // The old connection failed mid-read: its state is unknown; say so.
                    tracing::warn!(database = %route.name, reason = %why, "session ended while being moved to new credentials");
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(1),
                        fatal(
                            &mut client,
                            "08006",
                            &format!(
                                "vaultpool-proxy: the server connection of database \"{}\" \
                                 failed while the session was moved to new credentials: {why}",
                                route.name
                            ),
                        ),
                    )
                    .await;
                    break Ok(Ending::ServerGone);
                }
            },
            other => break other,
        }
    };
    shared
        .cancels
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&key);
    match outcome {
        Ok(Ending::Idle) if up.generation == route.engine.generation() => {
            // Reset for the next session; a connection that does not come back idle
            // within the bound is closed instead.
            let reset =
                tokio::time::timeout(std::time::Duration::from_secs(5), up.simple("DISCARD ALL"))
                    .await;
            if matches!(reset, Ok(Ok(_))) {
                route.checkin(up);
            } else {
                tokio::spawn(up.terminate());
            }
        }
        Ok(Ending::Idle) => route.checkin(up), // closes it: retired generation
        Ok(Ending::Busy) | Err(_) => {
            // The client left with a query running (or the stream broke): cancel it on
            // the server, then close the connection (its state is unknown).
            let (addr, pid, secret) = (up.addr, up.pid, up.secret);
            tokio::spawn(async move {
                let _ = super::upstream::cancel(addr, pid, secret).await;
            });
            drop(up);
        }
        Ok(Ending::ServerGone | Ending::HandOver) => drop(up),
        Ok(Ending::Shutdown) => {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                fatal(
                    &mut client,
                    "57P01",
                    "terminating connection: vaultpool-proxy is shutting down",
                ),
            )
            .await;
            tokio::spawn(up.terminate());
        }
    }
    drop(permit);
    route.stats.sessions_active.fetch_sub(1, Ordering::Relaxed);
}

/// A started session: its route, server connection, slot, cancel key, and whether its
/// startup settings include custom ones (`app.x`, which no hand-over can read back).
type Started = (
    Arc<Route>,
    Upstream,
    tokio::sync::OwnedSemaphorePermit,
    CancelKey,
    bool,
);

async fn fatal<S: AsyncWrite + Unpin>(client: &mut S, code: &str, msg: &str) -> io::Result<()> {
    let mut out = BytesMut::new();
    wire::error_response(&mut out, "FATAL", code, msg);
    client.write_all(&out).await?;
    client.flush().await
}

async fn start<S>(
    shared: &Arc<ProxyState>,
    client: &mut S,
    peer: Peer,
) -> io::Result<Option<Started>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // 1. The startup packet (after at most one SSL and one GSSENC request).
    let mut requests = 0;
    let params = loop {
        match wire::read_startup(client).await {
            Ok(Startup::Ssl | Startup::GssEnc) if requests < 2 => {
                requests += 1;
                client.write_all(b"N").await?;
            }
            Ok(Startup::Ssl | Startup::GssEnc) => {
                fatal(
                    client,
                    "08P01",
                    "vaultpool-proxy: too many encryption requests",
                )
                .await?;
                return Ok(None);
            }
            Ok(Startup::Cancel { pid, secret }) => {
                shared.cancel((pid, secret)).await;
                return Ok(None);
            }
            Ok(Startup::Session(p)) => break p,
            Err(StartupError::Closed) => return Ok(None),
            Err(StartupError::Io(e)) => return Err(e),
            Err(e) => {
                fatal(client, "08P01", &format!("vaultpool-proxy: {e}")).await?;
                return Ok(None);
            }
        }
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let Some(user) = get("user").filter(|u| !u.is_empty()) else {
        fatal(
            client,
            "28000",
            "vaultpool-proxy: no user name given in the startup packet",
        )
        .await?;
        return Ok(None);
    };
    let database = get("database").filter(|d| !d.is_empty()).unwrap_or(user);
    if get("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
        fatal(
            client,
            "08P01",
            "vaultpool-proxy does not proxy replication connections",
        )
        .await?;
        return Ok(None);
    }
    let (sets, custom_settings) = match settings(&params) {
        Ok(s) => s,
        Err(msg) => {
            fatal(client, "08P01", &format!("vaultpool-proxy: {msg}")).await?;
            return Ok(None);
        }
    };

    // 2. Who the client is: a trusted uid on the Unix socket, or the local secret.
    let trusted = matches!(peer, Peer::Unix(Some(uid)) if shared.allowed_uids.contains(&uid));
    if !trusted {
        let Some(verifier) = &shared.scram else {
            let msg = match peer {
                Peer::Unix(Some(uid)) => format!(
                    "vaultpool-proxy: uid {uid} is not among the allowed_uids, and no \
                     scram_secret_file is configured for password logins"
                ),
                _ => "vaultpool-proxy: password logins need listen.scram_secret_file; connect \
                      through the Unix socket as an allowed uid instead"
                    .to_owned(),
            };
            fatal(client, "28000", &msg).await?;
            return Ok(None);
        };
        if !scram_login(client, verifier, user).await? {
            return Ok(None);
        }
    }

    // 3. The route.
    let Some(route) = shared.routes.iter().find(|r| r.name == database).cloned() else {
        fatal(
            client,
            "3D000",
            &format!("vaultpool-proxy: no database \"{database}\" is configured"),
        )
        .await?;
        return Ok(None);
    };
    if !route.users.is_empty() && !route.users.iter().any(|u| u == user) {
        fatal(
            client,
            "28000",
            &format!("vaultpool-proxy: user \"{user}\" may not use database \"{database}\""),
        )
        .await?;
        return Ok(None);
    }

    // 4. A server connection of the current generation, with the client's settings.
    let (permit, mut up) = match route.checkout().await {
        Ok(x) => x,
        Err(CheckoutError::Timeout) => {
            fatal(
                client,
                "53300",
                &format!(
                    "vaultpool-proxy: all {} connections of database \"{database}\" are in use; \
                     waited {:?}",
                    route.max_connections, route.wait_timeout
                ),
            )
            .await?;
            return Ok(None);
        }
        Err(CheckoutError::Credentials(e)) => {
            fatal(client, "08006", &format!("vaultpool-proxy: {e}")).await?;
            return Ok(None);
        }
        Err(CheckoutError::Login(e)) => {
            forward_login_error(client, &route, e).await?;
            return Ok(None);
        }
    };
    if !sets.is_empty()
        && let Err(e) = up.simple(&sets).await
    {
        // Its settings are in doubt: close it rather than hand it to the next session.
        tokio::spawn(up.terminate());
        forward_login_error(client, &route, e).await?;
        return Ok(None);
    }

    // 5. Tell the client it is in: the server's parameters, a key of ours, ready.
    let mut out = BytesMut::new();
    wire::auth_ok(&mut out);
    for (k, v) in &up.params {
        wire::parameter_status(&mut out, k, v);
    }
    let key = shared.register_cancel(&up);
    wire::backend_key_data(&mut out, key.0, key.1);
    wire::ready_for_query(&mut out);
    if let Err(e) = client.write_all(&out).await {
        shared
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        // The client's settings are on it: never to the next session without a reset.
        tokio::spawn(up.terminate());
        return Err(e);
    }
    Ok(Some((route, up, permit, key, custom_settings)))
}

/// The client's startup settings (`application_name`, `client_encoding`, `-c` options)
/// as one `SET` batch for the server connection.
/// Also whether any of them is a custom setting (`app.x`): no hand-over can read those
/// back. (Judged by the names: a value with a dot, `application_name = 'api.v2'`, is no
/// reason to keep a session where it is.)
fn settings(params: &[(String, String)]) -> Result<(String, bool), String> {
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
    Ok((set_config(&pairs), custom))
}

/// One query that sets `pairs` for the session as the startup packet would: with
/// `set_config`, which reads each value in its setting's own syntax (a list such as
/// `search_path` stays a list; `SET x = '...'` would make it one quoted name).
fn set_config(pairs: &[(String, String)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let calls: Vec<String> = pairs
        .iter()
        .map(|(n, v)| format!("set_config({}, {}, false)", quote(n), quote(v)))
        .collect();
    format!("SELECT {}", calls.join(", "))
}

/// A refused or failed server login, told to the client: the server's own error when it
/// sent one (verbatim), else the proxy's.
async fn forward_login_error<S: AsyncWrite + Unpin>(
    client: &mut S,
    route: &Route,
    e: LoginError,
) -> io::Result<()> {
    tracing::warn!(database = %route.name, target = %route.target.describe(), error = %e, "server login failed");
    match e {
        LoginError::Server { raw, .. } if !raw.is_empty() => {
            client.write_all(&raw).await?;
            client.flush().await
        }
        other => {
            fatal(
                client,
                "08006",
                &format!(
                    "vaultpool-proxy: cannot connect to PostgreSQL at {}: {other}",
                    route.target.describe()
                ),
            )
            .await
        }
    }
}

/// SCRAM-SHA-256 against the local secret. `Ok(false)`: refused (the client was told).
async fn scram_login<S>(
    client: &mut S,
    verifier: &super::scram::Verifier,
    user: &str,
) -> io::Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    wire::auth_sasl(&mut out);
    client.write_all(&out).await?;
    let refuse = |why: &str| {
        tracing::info!(user, reason = why, "password login refused");
        format!("password authentication failed for user \"{user}\"")
    };
    // SASLInitialResponse: mechanism, length, data.
    let (tag, body) = wire::read_message(client, wire::MAX_AUTH_MESSAGE).await?;
    let initial = (|| {
        if tag != b'p' {
            return None;
        }
        let end = body.iter().position(|&b| b == 0)?;
        if &body[..end] != b"SCRAM-SHA-256" || body.len() < end + 5 {
            return None;
        }
        let len = i32::from_be_bytes(body[end + 1..end + 5].try_into().ok()?);
        let data = &body[end + 5..];
        (len as usize == data.len()).then(|| data.to_vec())
    })();
    let Some(initial) = initial else {
        fatal(
            client,
            "28P01",
            &refuse("not a SCRAM-SHA-256 initial response"),
        )
        .await?;
        return Ok(false);
    };
    let (server_first, exchange) = match verifier.first(&initial) {
        Ok(x) => x,
        Err(why) => {
            fatal(client, "28P01", &refuse(why)).await?;
            return Ok(false);
        }
    };
    out.clear();
    wire::auth_sasl_data(&mut out, 11, server_first.as_bytes());
    client.write_all(&out).await?;
    let (tag, body) = wire::read_message(client, wire::MAX_AUTH_MESSAGE).await?;
    if tag != b'p' {
        fatal(client, "28P01", &refuse("not a SASL response")).await?;
        return Ok(false);
    }
    match verifier.finish(&exchange, &body) {
        Ok(server_final) => {
            out.clear();
            wire::auth_sasl_data(&mut out, 12, server_final.as_bytes());
            client.write_all(&out).await?;
            Ok(true)
        }
        Err(why) => {
            fatal(client, "28P01", &refuse(why)).await?;
            Ok(false)
        }
    }
}

/// How long a hand-over may take (reading the state, a login, replaying it).
const HAND_OVER_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Move an idle session to a server connection of the serving generation: its settings
/// (`SET`, startup parameters) and prepared statements (protocol and SQL) are read from
/// the old connection and replayed on the new one. Refused — the session then stays,
/// untouched, on its old connection — when it holds what cannot move: `LISTEN`, an
/// open cursor, an advisory lock, or a temporary table.
async fn hand_over(route: &Route, old: &mut Upstream, known: &Known) -> Moved {
    // 1. Read the session's state from the old connection. A failure here leaves that
    //    connection in doubt: the session ends.
    let read = tokio::time::timeout(READ_STATE_WITHIN, read_state(old)).await;
    let state = match read {
        Ok(Ok(Ok(state))) => state,
        Ok(Ok(Err(why))) => return Moved::Stay(why),
        Ok(Err(e)) => return Moved::Broken(e.to_string()),
        Err(_) => {
            return Moved::Broken(format!("reading its state took over {READ_STATE_WITHIN:?}"));
        }
    };
    // 2. A new connection with that state. A failure here leaves the old connection as it
    //    was: the session stays on it.
    let unnamed = known
        .unnamed_parse
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let replay = async {
        let mut new = match route.connection().await {
            Ok(up) => up,
            Err(CheckoutError::Login(e)) => return Err(e.to_string()),
            Err(CheckoutError::Credentials(e)) => return Err(e.to_string()),
            Err(CheckoutError::Timeout) => return Err("no connection".into()),
        };
        let text = |e: LoginError| e.to_string();
        if !state.settings.is_empty() {
            new.simple(&set_config(&state.settings))
                .await
                .map_err(text)?;
        }
        if !state.prepared.is_empty() {
            new.prepare(&state.prepared).await.map_err(text)?;
        }
        if let Some(body) = unnamed {
            new.parse_raw(&body).await.map_err(text)?;
        }
        Ok(new)
    };
    match tokio::time::timeout(HAND_OVER_WITHIN, replay).await {
        Ok(Ok(new)) => Moved::To(new),
        Ok(Err(why)) => Moved::Stay(why),
        Err(_) => Moved::Stay(format!(
            "the new connection was not ready within {HAND_OVER_WITHIN:?}"
        )),
    }
}

/// How long reading a session's state from its old connection may take.
const READ_STATE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// What a hand-over did.
enum Moved {
    /// The session now runs on this connection (of the serving generation).
    To(Upstream),
    /// The session stays, untouched, on its connection (why).
    Stay(String),
    /// The old connection failed while its state was read: the session ends.
    Broken(String),
}

/// A session's state as the server knows it.
struct State {
    settings: Vec<(String, String)>,
    prepared: Vec<(String, String, Vec<u32>)>,
}

/// Read what a hand-over carries; `Ok(Err(why))` when the session holds what cannot
/// move. Catalogs are named with their schema: a client's own `pg_settings` view earlier
/// on its search_path must not answer.
async fn read_state(old: &mut Upstream) -> Result<Result<State, String>, LoginError> {
    // What cannot move: LISTEN, cursors, advisory locks, temporary objects, a changed
    // role or session user, SQL-level PREPAREs (their text may hold other statements),
    // more prepared statements than a hand-over should carry.
    let blockers = old
        .rows(&format!(
            "SELECT (SELECT count(*) FROM pg_catalog.pg_listening_channels()) \
             + (SELECT count(*) FROM pg_catalog.pg_cursors) \
             + (SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
                AND pid = pg_catalog.pg_backend_pid()) \
             + (CASE WHEN pg_catalog.pg_my_temp_schema() = 0 THEN 0 ELSE 1 END) \
             + (CASE WHEN pg_catalog.current_setting('role') = 'none' \
                AND current_user = session_user AND session_user::text = {} \
                THEN 0 ELSE 1 END) \
             + (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql) \
             + (SELECT CASE WHEN count(*) > 1000 \
                OR coalesce(sum(length(statement)), 0) > 1048576 \
                THEN 1 ELSE 0 END FROM pg_catalog.pg_prepared_statements)",
            quote_literal(&old.user)
        ))
        .await?;
    if blockers
        .first()
        .and_then(|r| r.first())
        .cloned()
        .flatten()
        .as_deref()
        != Some("0")
    {
        return Ok(Err(
            "it holds state that cannot move (LISTEN, a cursor, an advisory lock, a temporary \
             table, SET ROLE or SESSION AUTHORIZATION, a SQL PREPARE, or over 1,000 prepared \
             statements)"
                .into(),
        ));
    }
    let settings = old
        .rows(
            "SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings \
             WHERE source IN ('session', 'client') AND name NOT LIKE 'transaction%'",
        )
        .await?
        .into_iter()
        .filter_map(|row| match row.as_slice() {
            [Some(name), Some(value)] => Some((name.clone(), value.clone())),
            _ => None,
        })
        .collect();
    let mut prepared = Vec::new();
    for row in old
        .rows(
            "SELECT name, statement, parameter_types::pg_catalog.oid[]::text \
             FROM pg_catalog.pg_prepared_statements",
        )
        .await?
    {
        if let [Some(name), Some(statement), Some(types)] = row.as_slice() {
            let oids = types
                .trim_matches(['{', '}'])
                .split(',')
                .filter(|t| !t.is_empty())
                .map(|t| t.trim().parse::<u32>())
                .collect::<Result<Vec<_>, _>>();
            match oids {
                Ok(oids) => prepared.push((name.clone(), statement.clone(), oids)),
                Err(_) => return Ok(Err(format!("parameter types {types:?} unreadable"))),
            }
        }
    }
    Ok(Ok(State { settings, prepared }))
}

/// A SQL string literal.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// What the proxy has learnt about a session from its messages, across hand-overs.
#[derive(Debug, Default)]
struct Known {
    /// Extended-protocol messages sent since the last Sync.
    unsynced: std::sync::atomic::AtomicBool,
    /// The last statement was started by Execute (not by a simple Query).
    extended_exec: std::sync::atomic::AtomicBool,
    /// The client used what a hand-over cannot read back from the server (custom
    /// settings such as `app.tenant_id`, `set_config`, `LISTEN`): it is never moved.
    opaque: std::sync::atomic::AtomicBool,
    /// The last unnamed statement the client parsed (its Parse body), still bindable
    /// until a simple query: a hand-over parses it again on the new connection.
    unnamed_parse: std::sync::Mutex<Option<Vec<u8>>>,
    /// An unnamed statement too large to keep (over 64 KiB of Parse): not movable while
    /// it may be bound.
    unnamed_unknown: std::sync::atomic::AtomicBool,
    /// In COPY FROM STDIN (the server sent CopyInResponse; the client has not yet sent
    /// CopyDone or CopyFail).
    copy_in: std::sync::atomic::AtomicBool,
    /// Syncs sent since the last Execute: those of an Execute that starts a COPY FROM
    /// STDIN are ignored by the server (no ReadyForQuery comes for them).
    syncs_after_exec: std::sync::atomic::AtomicI64,
}

/// The largest unnamed Parse kept for a hand-over.
const MAX_UNNAMED_PARSE: usize = 64 * 1024;

/// Looks through query text as it streams past for what makes a session opaque to a
/// hand-over: `set_config(`, `LISTEN`, and `SET [SESSION|LOCAL] name.with.dot`
/// (custom settings, which `pg_settings` does not list). Conservative: a false alarm
/// only keeps a session where it is.
#[derive(Debug, Default)]
struct Scanner {
    /// The end of the text seen so far (patterns across chunk boundaries), then the chunk
    /// being looked at: one buffer for the whole session, not two allocations per chunk.
    text: Vec<u8>,
}

impl Scanner {
    const KEEP: usize = 160;

    /// Feed more text; whether something opaque was seen.
    fn feed(&mut self, chunk: &[u8]) -> bool {
        self.text.extend(chunk.iter().map(u8::to_ascii_lowercase));
        let found = Self::opaque(&self.text);
        let done = self.text.len().saturating_sub(Self::KEEP);
        self.text.drain(..done);
        found
    }

    /// Start on a new message.
    fn reset(&mut self) {
        self.text.clear();
    }

    fn opaque(t: &[u8]) -> bool {
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
        let find = |needle: &[u8]| t.windows(needle.len()).position(|w| w == needle).is_some();
        if find(b"set_config") {
            return true;
        }
        // LISTEN as a word (not `listener_id`): notifications could arrive while the
        // hand-over reads the session's state.
        let mut at = 0;
        while let Some(p) = t[at..].windows(6).position(|w| w == b"listen") {
            let start = at + p;
            at = start + 6;
            let before = start == 0 || !word(t[start - 1]);
            let after = t.get(start + 6).is_none_or(|b| b.is_ascii_whitespace());
            if before && after {
                return true;
            }
        }
        let mut at = 0;
        while let Some(p) = t[at..].windows(3).position(|w| w == b"set") {
            let start = at + p;
            at = start + 3;
            if start > 0 && word(t[start - 1]) {
                continue;
            }
            let mut i = start + 3;
            if i >= t.len() || !t[i].is_ascii_whitespace() {
                continue;
            }
            let skip_ws = |mut i: usize| {
                while i < t.len() && t[i].is_ascii_whitespace() {
                    i += 1;
                }
                i
            };
            i = skip_ws(i);
            for kw in [&b"session"[..], b"local"] {
                if t[i..].starts_with(kw)
                    && t.get(i + kw.len()).is_some_and(u8::is_ascii_whitespace)
                {
                    i = skip_ws(i + kw.len());
                }
            }
            let name_end = t[i..]
                .iter()
                .position(|&b| !(word(b) || b == b'.' || b == b'"'))
                .map_or(t.len(), |n| i + n);
            if t[i..name_end].contains(&b'.') {
                return true;
            }
        }
        false
    }
}

/// How a relayed session ended.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// The proxy is shutting down and the session outlived the shutdown timeout.
    Shutdown,
    /// Idle after a rotation: to be handed over to the serving generation.
    HandOver,
    /// The client said goodbye (or left) between queries, outside a transaction.
    Idle,
    /// The client left with a query or transaction open.
    Busy,
    /// The server closed the connection.
    ServerGone,
}

/// Forward bytes both ways until the client terminates or either side closes. The
/// client's `Terminate` is not forwarded (the server connection stays open for reuse).
async fn relay<S>(
    client: &mut S,
    up: &mut Upstream,
    route: &Route,
    movable: bool,
    known: &Known,
    closing: &tokio_util::sync::CancellationToken,
) -> io::Result<Ending>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let generation = up.generation;
    // Bytes the proxy read past its own last message (a notice after ReadyForQuery):
    // the client's.
    let pending = std::mem::take(&mut up.pending);
    let mut generations = route.engine.subscribe();
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = tokio::io::split(&mut up.io);
    // Queries sent (Query, Sync, FunctionCall) whose ReadyForQuery has not come back.
    let outstanding = std::sync::atomic::AtomicI64::new(0);
    let status = std::sync::atomic::AtomicU8::new(b'I');
    let mut server_frames = wire::Frames::default();
    // Mid-message or writing, per direction: no hand-over then.
    let client_busy = std::sync::atomic::AtomicBool::new(false);
    let server_busy = std::sync::atomic::AtomicBool::new(false);
    let server_mid_message = std::sync::atomic::AtomicBool::new(false);
    let retired = || {
        movable
            && !known.opaque.load(Ordering::Relaxed)
            && !known.unnamed_unknown.load(Ordering::Relaxed)
            && route.engine.generation() != generation
    };
    // Between transactions: every query answered, outside a transaction, no extended-
    // protocol message waiting for its Sync, nothing half through either way.
    let idle = |frames_at_boundary: bool| {
        outstanding.load(Ordering::Relaxed) == 0
            && status.load(Ordering::Relaxed) == b'I'
            && !known.unsynced.load(Ordering::Relaxed)
            && !known.copy_in.load(Ordering::Relaxed)
            && frames_at_boundary
            && !client_busy.load(Ordering::Relaxed)
    };
    if !pending.is_empty() {
        server_frames.feed(&pending, |_| {})?;
        cw.write_all(&pending).await?;
    }

    let client_to_server = async {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let mut body_left = 0usize;
        // The text of a Query or Parse passing through, looked at for what a hand-over
        // could not carry; the first body byte of a Parse (its name: empty = unnamed).
        let mut scanning = false;
        let mut parse_name_next = false;
        let mut scanner = Scanner::default();
        // An unnamed Parse being kept (its body so far), for a hand-over.
        let mut unnamed: Option<Vec<u8>> = None;
        loop {
            client_busy.store(!buf.is_empty() || body_left > 0, Ordering::Relaxed);
            if cr.read_buf(&mut buf).await? == 0 {
                return Ok::<_, io::Error>(false); // left without Terminate
            }
            client_busy.store(true, Ordering::Relaxed);
            let mut i = 0;
            let mut end = 0;
            loop {
                if body_left > 0 {
                    let n = body_left.min(buf.len() - i);
                    if n > 0 && parse_name_next {
                        parse_name_next = false;
                        if buf[i] == 0 {
                            unnamed = Some(Vec::new());
                        }
                    }
                    if let Some(body) = unnamed.as_mut() {
                        if body.len() + n <= MAX_UNNAMED_PARSE {
                            body.extend_from_slice(&buf[i..i + n]);
                        } else {
                            unnamed = None;
                            *known
                                .unnamed_parse
                                .lock()
                                .unwrap_or_else(|p| p.into_inner()) = None;
                            known.unnamed_unknown.store(true, Ordering::Relaxed);
                        }
                    }
                    if body_left == n
                        && let Some(body) = unnamed.take()
                    {
                        *known
                            .unnamed_parse
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(body);
                        known.unnamed_unknown.store(false, Ordering::Relaxed);
                    }
                    // Once opaque, always: nothing left to look for.
                    if scanning
                        && !known.opaque.load(Ordering::Relaxed)
                        && scanner.feed(&buf[i..i + n])
                    {
                        known.opaque.store(true, Ordering::Relaxed);
                    }
                    i += n;
                    body_left -= n;
                    end = i;
                }
                if i == buf.len() || buf.len() - i < 5 {
                    break; // an incomplete header is held back
                }
                let tag = buf[i];
                let len = i32::from_be_bytes([buf[i + 1], buf[i + 2], buf[i + 3], buf[i + 4]]);
                if len < 4 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a client message of invalid length",
                    ));
                }
                if tag == b'X' {
                    sw.write_all(&buf[..i]).await?;
                    return Ok(true);
                }
                let copying = known.copy_in.load(Ordering::Relaxed);
                match tag {
                    b'Q' => {
                        // A simple query ends the unnamed statement.
                        *known
                            .unnamed_parse
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = None;
                        known.unnamed_unknown.store(false, Ordering::Relaxed);
                        known.extended_exec.store(false, Ordering::Relaxed);
                    }
                    b'S' => {
                        known.unsynced.store(false, Ordering::Relaxed);
                        known.syncs_after_exec.fetch_add(1, Ordering::Relaxed);
                    }
                    b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {
                        known.unsynced.store(true, Ordering::Relaxed);
                        if tag == b'E' {
                            known.extended_exec.store(true, Ordering::Relaxed);
                            known.syncs_after_exec.store(0, Ordering::Relaxed);
                        }
                    }
                    // CopyDone, CopyFail: the copy is over.
                    b'c' | b'f' => known.copy_in.store(false, Ordering::Relaxed),
                    // A function call by OID: it may set what cannot be read back.
                    b'F' => known.opaque.store(true, Ordering::Relaxed),
                    _ => {}
                }
                // During COPY FROM STDIN the server ignores Sync: no ReadyForQuery for it.
                if matches!(tag, b'Q' | b'F') || (tag == b'S' && !copying) {
                    outstanding.fetch_add(1, Ordering::Relaxed);
                }
                scanning = matches!(tag, b'Q' | b'P');
                parse_name_next = tag == b'P';
                scanner.reset();
                i += 5;
                body_left = len as usize - 4;
                end = i;
            }
            sw.write_all(&buf[..end]).await?;
            // Keep the one buffer (split_to would share it and soon allocate anew).
            if end == buf.len() {
                buf.clear();
            } else {
                bytes::Buf::advance(&mut buf, end);
            }
        }
    };
    let server_to_client = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = sr.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, io::Error>(false);
            }
            server_busy.store(true, Ordering::Relaxed);
            server_frames.feed(&buf[..n], |seen| match seen {
                Seen::Ready(s) => {
                    status.store(s, Ordering::Relaxed);
                    outstanding.fetch_sub(1, Ordering::Relaxed);
                }
                // COPY FROM STDIN started by Execute: the Sync sent with it is ignored
                // during copy-in (PostgreSQL answers only the one after CopyDone).
                Seen::Tag(b'G') => {
                    known.copy_in.store(true, Ordering::Relaxed);
                    if known.extended_exec.load(Ordering::Relaxed) {
                        let ignored = known.syncs_after_exec.swap(0, Ordering::Relaxed);
                        outstanding.fetch_sub(ignored, Ordering::Relaxed);
                    }
                }
                Seen::Tag(_) => {}
            })?;
            server_mid_message.store(!server_frames.at_boundary(), Ordering::Relaxed);
            cw.write_all(&buf[..n]).await?;
            server_busy.store(false, Ordering::Relaxed);
            if retired() && idle(server_frames.at_boundary()) {
                return Ok(true); // hand over now, between transactions
            }
        }
    };
    // A rotation while the session sits idle: hand over without waiting for a query.
    let rotated = async {
        loop {
            if generations.changed().await.is_err() {
                return std::future::pending::<()>().await;
            }
            if retired()
                && !server_busy.load(Ordering::Relaxed)
                && idle(!server_mid_message.load(Ordering::Relaxed))
            {
                return;
            }
        }
    };
    tokio::select! {
        r = client_to_server => {
            r?;
            let idle = outstanding.load(Ordering::Relaxed) == 0
                && status.load(Ordering::Relaxed) == b'I'
                && !known.unsynced.load(Ordering::Relaxed)
                && !known.copy_in.load(Ordering::Relaxed)
                && server_frames.at_boundary();
            Ok(if idle { Ending::Idle } else { Ending::Busy })
        }
        () = closing.cancelled() => Ok(Ending::Shutdown),
        r = server_to_client => {
            Ok(if r? { Ending::HandOver } else { Ending::ServerGone })
        }
        () = rotated => Ok(Ending::HandOver),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scanner_finds_what_a_hand_over_cannot_carry_across_any_split() {
        let opaque = [
            "SET app.tenant_id = 'acme'",
            "set session  \"app\".\"tenant\" to 1",
            "SELECT set_config('app.x', '1', false)",
            "listen news",
            "BEGIN; SET LOCAL app.x = 1; COMMIT",
        ];
        let plain = [
            "SET search_path = public",
            "UPDATE t SET a.b = 1",
            "SELECT offset, reset FROM t",
            "SELECT 'settings.x'",
        ];
        for (text, want) in opaque
            .iter()
            .map(|t| (t, true))
            .chain(plain.iter().map(|t| (t, false)))
        {
            for split in 1..text.len() {
                let mut s = Scanner::default();
                let mut got = false;
                for chunk in text.as_bytes().chunks(split) {
                    got |= s.feed(chunk);
                }
                // "UPDATE t SET a.b" is a false alarm the scanner accepts (it only keeps a
                // session where it is); everything opaque must be found.
                if want {
                    assert!(got, "{text:?} split {split}");
                } else if *text != "UPDATE t SET a.b = 1" {
                    assert!(!got, "{text:?} split {split}");
                }
            }
        }
    }

    #[test]
    fn startup_settings_become_one_quoted_set_batch() {
        let p = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            settings(&p(&[
                ("user", "u"),
                ("application_name", "it's"),
                ("options", "-c search_path=x --work-mem=64kB")
            ]))
            .unwrap(),
            (
                "SELECT set_config('application_name', 'it''s', false), set_config('search_path', \
                 'x', false), set_config('work_mem', '64kB', false)"
                    .to_owned(),
                false
            )
        );
        // A custom setting is known by its name, not by a dot in some value.
        assert!(!settings(&p(&[("application_name", "api.v2")])).unwrap().1);
        assert!(
            settings(&p(&[("options", "-c app.tenant_id=42")]))
                .unwrap()
                .1
        );
        assert!(settings(&p(&[("app.tenant_id", "42")])).unwrap().1);
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
