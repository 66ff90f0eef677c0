//! One client session's life, start to end:
//!
//! 1. `handshake.rs`: startup packet, authentication, a server connection of the route's
//!    serving generation (within the startup timeout);
//! 2. `relay.rs`: bytes both ways, watched by the session's `Tracker`; after a
//!    rotation, between transactions, `handover.rs` moves the session to the serving
//!    generation (or it stays where it is, and says why);
//! 3. the end: the server connection reset (`DISCARD ALL`) for the next session, or
//!    closed (its query cancelled first if the client left in the middle of one).

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::task::TaskTracker;

use super::ProxyState;
use super::handover::{Moved, hand_over};
use super::handshake::{self, Started};
use super::listen::Peer;
use super::protocol::messages::fatal;
use super::protocol::{Opaque, Tracker};
use super::relay::{Ending, relay};
use super::route::Route;
use super::server::{self, Server};

/// What the accept loop does with each client connection: a session, tracked so that
/// shutdown can wait for it.
pub(crate) fn on_connection<S>(
    shared: Arc<ProxyState>,
    sessions: TaskTracker,
) -> impl FnMut(S, Peer) + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    move |client, peer| {
        sessions.spawn(serve(shared.clone(), client, peer));
    }
}

/// Serve one client connection until it ends. Never panics on client input; every
/// failure ends this session only.
async fn serve<S>(shared: Arc<ProxyState>, mut client: S, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Some(Started {
        route,
        mut server,
        slot,
        key,
        mut rotations,
        custom_settings,
    }) = start(&shared, &mut client, peer).await
    else {
        return;
    };
    route.stats.sessions_active.fetch_add(1, Ordering::Relaxed);
    route.stats.sessions_total.fetch_add(1, Ordering::Relaxed);
    let mut tracker = Tracker::new();
    if custom_settings {
        tracker.mark_opaque(Opaque::StartupSetting);
    }
    // A hand-over was refused: the session stays on its generation to the end.
    let mut stays = false;
    let ending = loop {
        let watch = (!stays).then_some(&mut rotations);
        match relay(
            &mut client,
            &mut server,
            &mut tracker,
            watch,
            &shared.closing,
        )
        .await
        {
            Ok(Ending::HandOver) => {
                match hand_over(&route, &mut server, tracker.unnamed_statement()).await {
                    Moved::To(new) => {
                        let old = std::mem::replace(&mut server, new);
                        shared.cancels.moved(key, &server);
                        route.stats.handovers.fetch_add(1, Ordering::Relaxed);
                        route.checkin(old); // closes it: retired generation
                    }
                    Moved::Stay(why) => {
                        tracing::info!(database = %route.name, reason = %why, "session stays on its retired generation");
                        route
                            .stats
                            .handovers_refused
                            .fetch_add(1, Ordering::Relaxed);
                        stays = true;
                    }
                    Moved::Broken(why) => {
                        // The old connection failed while the proxy used it: its state is
                        // unknown; say so.
                        tracing::warn!(database = %route.name, reason = %why, "session ended while being moved to new credentials");
                        let msg = format!(
                            "vaultpool-proxy: the server connection of database \"{}\" failed \
                             while the session was moved to new credentials: {why}",
                            route.name
                        );
                        let _ = tokio::time::timeout(
                            SAY_GOODBYE_WITHIN,
                            fatal(&mut client, "08006", &msg),
                        )
                        .await;
                        break Ok(Ending::ServerGone);
                    }
                }
            }
            other => break other,
        }
    };
    shared.cancels.remove(key);
    finish(&route, server, ending, &mut client).await;
    drop(slot);
    route.stats.sessions_active.fetch_sub(1, Ordering::Relaxed);
}

/// How long the proxy's last words to a client may take.
const SAY_GOODBYE_WITHIN: Duration = Duration::from_secs(1);

/// How long the reset for the next session may take.
const RESET_WITHIN: Duration = Duration::from_secs(5);

/// The handshake: who the client is and where it goes within the startup timeout, then
/// a server connection within the route's own bounds (its `wait_timeout` for a slot,
/// answered 53300 as documented; the login and settings within another startup
/// timeout). `None`: the session does not start (the client was told why, if it is
/// still there).
async fn start<S>(shared: &Arc<ProxyState>, client: &mut S, peer: Peer) -> Option<Started>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let ended = |e: io::Error| {
        tracing::debug!(error = %e, "client session ended during startup");
        None
    };
    let who = match tokio::time::timeout(
        shared.startup_timeout,
        handshake::identify(shared, client, peer),
    )
    .await
    {
        Ok(Ok(Some(who))) => who,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => return ended(e),
        Err(_) => return too_slow(shared.startup_timeout, client).await,
    };
    let bound = who.wait_timeout().saturating_add(shared.startup_timeout);
    match tokio::time::timeout(bound, handshake::start(shared, client, who)).await {
        Ok(Ok(started)) => started,
        Ok(Err(e)) => ended(e),
        Err(_) => too_slow(bound, client).await,
    }
}

/// The session did not start within `bound`: tell the client (it may be a slow one) and
/// close.
async fn too_slow<S>(bound: Duration, client: &mut S) -> Option<Started>
where
    S: AsyncWrite + Unpin,
{
    let msg = format!("vaultpool-proxy: the session did not start within {bound:?}");
    let _ = tokio::time::timeout(SAY_GOODBYE_WITHIN, fatal(client, "08P01", &msg)).await;
    None
}

/// The session is over: its server connection goes back to the route, reset, or is
/// closed.
async fn finish<S>(route: &Route, mut server: Server, ending: io::Result<Ending>, client: &mut S)
where
    S: AsyncWrite + Unpin,
{
    match ending {
        Ok(Ending::Idle) if server.generation == route.engine.generation() => {
            // Reset for the next session; a connection that does not come back idle
            // within the bound is closed instead.
            let reset = tokio::time::timeout(RESET_WITHIN, server.simple("DISCARD ALL")).await;
            if matches!(reset, Ok(Ok(_))) {
                route.checkin(server);
            } else {
                tokio::spawn(server.terminate());
            }
        }
        Ok(Ending::Idle) => route.checkin(server), // closes it: retired generation
        Ok(Ending::Busy) | Err(_) => {
            // The client left with a query running (or the stream broke): cancel it on
            // the server, then close the connection (its state is unknown).
            let (addr, pid, secret) = (server.addr, server.pid, server.secret);
            tokio::spawn(async move {
                let _ = server::cancel(addr, pid, secret).await;
            });
            drop(server);
        }
        Ok(Ending::ServerGone | Ending::HandOver) => drop(server),
        Ok(Ending::Shutdown) => {
            let _ = tokio::time::timeout(
                SAY_GOODBYE_WITHIN,
                fatal(
                    client,
                    "57P01",
                    "terminating connection: vaultpool-proxy is shutting down",
                ),
            )
            .await;
            tokio::spawn(server.terminate());
        }
    }
}
