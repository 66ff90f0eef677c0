//! A client's way in: its startup packet (after at most one SSL and one GSSENC request,
//! or a CancelRequest instead), who it is (a trusted uid on the Unix socket, or the local
//! secret over SCRAM-SHA-256), its route, a server connection with its settings, and the
//! proxy's welcome (the server's parameters, a cancel key of the proxy's, ready).

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::ProxyState;
use super::cancel::CancelKey;
use super::listen::Peer;
use super::protocol::messages::{self, fatal};
use super::protocol::startup::{self, Startup, StartupError};
use super::route::{CheckoutError, Route};
use super::scram;
use super::server::{LoginError, Server};
use crate::credentials::Generation;

/// A session that has started: what the rest of its life needs.
pub(crate) struct Started {
    pub(crate) route: Arc<Route>,
    pub(crate) server: Server,
    /// Its place among the route's `max_connections`.
    pub(crate) slot: OwnedSemaphorePermit,
    pub(crate) key: CancelKey,
    /// The route's rotations, watched from before the checkout: one that comes before
    /// the relay starts is not missed.
    pub(crate) rotations: watch::Receiver<Generation>,
    /// Its startup settings include a custom one (`app.x`), which no hand-over can read
    /// back.
    pub(crate) custom_settings: bool,
}

/// A client that said who it is and where it goes (steps 1–3 of [`start`]).
pub(crate) struct Identified {
    route: Arc<Route>,
    database: String,
    settings: startup::Settings,
}

/// Take a client from its first byte to its route: startup packet, authentication,
/// route (steps 1–3; the part the startup timeout bounds). `Ok(None)`: it was told why
/// not (or asked only to cancel), and the connection ends.
///
/// # Errors
/// The client's connection failed.
pub(crate) async fn identify<S>(
    shared: &Arc<ProxyState>,
    client: &mut S,
    peer: Peer,
) -> io::Result<Option<Identified>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // 1. The startup packet (after at most one SSL and one GSSENC request).
    let mut requests = 0;
    let params = loop {
        match startup::read_startup(client).await {
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
                shared.cancels.forward((pid, secret)).await;
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
    let settings = match startup::settings(&params) {
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

    Ok(Some(Identified {
        route,
        database: database.to_owned(),
        settings,
    }))
}

impl Identified {
    /// How long its checkout may wait for a slot.
    pub(crate) fn wait_timeout(&self) -> std::time::Duration {
        self.route.wait_timeout
    }
}

/// Take an identified client to ReadyForQuery (steps 4–5): a server connection of the
/// route's serving generation — waiting up to the route's `wait_timeout` for a slot, then
/// told 53300 — with its settings, and the welcome. `Ok(None)`: it was told why not.
pub(crate) async fn start<S>(
    shared: &Arc<ProxyState>,
    client: &mut S,
    who: Identified,
) -> io::Result<Option<Started>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Identified {
        route,
        database,
        settings,
    } = who;
    // 4. A server connection of the current generation, with the client's settings.
    // Rotations are watched from here on: one during the checkout is seen by the relay.
    let rotations = route.engine.subscribe();
    let (slot, mut server) = match route.checkout().await {
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
    if let Err(e) = server.set_config(&settings.pairs).await {
        // Its settings are in doubt: close it rather than hand it to the next session.
        tokio::spawn(server.terminate());
        forward_login_error(client, &route, e).await?;
        return Ok(None);
    }

    // 5. Tell the client it is in: the server's parameters, a key of ours, ready.
    let mut out = BytesMut::new();
    messages::auth_ok(&mut out);
    for (k, v) in &server.params {
        messages::parameter_status(&mut out, k, v);
    }
    let key = shared.cancels.register(&server);
    messages::backend_key_data(&mut out, key.0, key.1);
    messages::ready_for_query(&mut out);
    if let Err(e) = client.write_all(&out).await {
        shared.cancels.remove(key);
        // The client's settings are on it: never to the next session without a reset.
        tokio::spawn(server.terminate());
        return Err(e);
    }
    Ok(Some(Started {
        route,
        server,
        slot,
        key,
        rotations,
        custom_settings: settings.custom,
    }))
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
async fn scram_login<S>(client: &mut S, verifier: &scram::Verifier, user: &str) -> io::Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    messages::auth_sasl(&mut out);
    client.write_all(&out).await?;
    let refuse = |why: &str| {
        tracing::info!(user, reason = why, "password login refused");
        format!("password authentication failed for user \"{user}\"")
    };
    // SASLInitialResponse: mechanism, length, data.
    let (tag, body) = messages::read_message(client, messages::MAX_AUTH_MESSAGE).await?;
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
    messages::auth_sasl_data(&mut out, 11, server_first.as_bytes());
    client.write_all(&out).await?;
    let (tag, body) = messages::read_message(client, messages::MAX_AUTH_MESSAGE).await?;
    if tag != b'p' {
        fatal(client, "28P01", &refuse("not a SASL response")).await?;
        return Ok(false);
    }
    match verifier.finish(&exchange, &body) {
        Ok(server_final) => {
            out.clear();
            messages::auth_sasl_data(&mut out, 12, server_final.as_bytes());
            client.write_all(&out).await?;
            Ok(true)
        }
        Err(why) => {
            fatal(client, "28P01", &refuse(why)).await?;
            Ok(false)
        }
    }
}
