//! The relay: bytes both ways as they come, each chunk shown to the session's
//! [`Tracker`] on its way. It stops when the client leaves, when the server closes, when
//! the proxy shuts down, or — after a rotation — between transactions, for a hand-over.
//!
//! One loop in the session's task: each turn takes whichever comes first of the client's
//! bytes, writing them to the server, the server's bytes, writing them to the client, and
//! a rotation. Neither direction waits for the other (a client that sends while its
//! results stream back cannot stall the server), and the state is plain fields.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::protocol::{Forward, Tracker};
use super::server::Server;
use crate::credentials::Generation;

/// How a relayed session stopped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The proxy is shutting down and the session outlived the shutdown timeout.
    Shutdown,
    /// Between transactions after a rotation: to be handed over to the serving
    /// generation.
    HandOver,
    /// The client said goodbye (or left) between transactions.
    Idle,
    /// The client left with a query or transaction open.
    Busy,
    /// The server closed the connection.
    ServerGone,
}

/// Bytes read at a time, each way.
const CHUNK: usize = 16 * 1024;

/// Relay between `client` and `server` until the session ends or, when `rotations` is
/// given, the server's generation is retired and the tracker says the session can move.
/// The client's `Terminate` is not forwarded (the server connection stays open for
/// reuse).
///
/// # Errors
/// Either connection failed, or its bytes are not the protocol.
pub(crate) async fn relay<C>(
    client: &mut C,
    server: &mut Server,
    tracker: &mut Tracker,
    mut rotations: Option<&mut watch::Receiver<Generation>>,
    closing: &CancellationToken,
) -> io::Result<Ending>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let generation = server.generation;
    // The server's bytes the proxy read past its own last message (a notice after a
    // ReadyForQuery) are the client's.
    let mut to_client = Pipe::new(std::mem::take(&mut server.pending));
    tracker.server_sent(&to_client.buf).map_err(invalid)?;
    let mut to_server = Pipe::new(BytesMut::new());
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = tokio::io::split(&mut server.io);
    // The client sent Terminate: what came before it goes to the server, then it ends.
    let mut terminated = false;
    loop {
        if to_server.is_empty() {
            if terminated {
                return Ok(left(tracker));
            }
            let retired = rotations.as_ref().is_some_and(|r| *r.borrow() > generation);
            if retired && to_client.is_empty() && tracker.can_move().is_ok() {
                return Ok(Ending::HandOver);
            }
        }
        tokio::select! {
            () = closing.cancelled() => return Ok(Ending::Shutdown),
            step = to_server.pump(&mut client_read, &mut server_write, !terminated) => {
                match step? {
                    Step::Read(0) => return Ok(left(tracker)), // without a Terminate
                    Step::Read(n) => {
                        let read = &to_server.buf[..n];
                        if let Forward::Until(at) = tracker.client_sent(read).map_err(invalid)? {
                            to_server.buf.truncate(at);
                            terminated = true;
                        }
                    }
                    Step::Wrote | Step::Flushed => {}
                }
            }
            step = to_client.pump(&mut server_read, &mut client_write, true) => {
                match step? {
                    Step::Read(0) => return Ok(Ending::ServerGone),
                    Step::Read(n) => {
                        tracker.server_sent(&to_client.buf[..n]).map_err(invalid)?;
                        if terminated {
                            to_client.buf.clear(); // the client said goodbye
                        }
                    }
                    Step::Wrote | Step::Flushed => {}
                }
            }
            changed = changed(&mut rotations) => {
                if changed.is_err() {
                    rotations = None; // the engine is gone: no more rotations
                }
            }
        }
    }
}

/// How a session whose client left ends: idle, or with work under way on the server.
fn left(tracker: &Tracker) -> Ending {
    if tracker.is_idle() {
        Ending::Idle
    } else {
        Ending::Busy
    }
}

fn invalid(e: super::protocol::frames::BadLength) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The next rotation (never, without `rotations`).
async fn changed(
    rotations: &mut Option<&mut watch::Receiver<Generation>>,
) -> Result<(), watch::error::RecvError> {
    match rotations {
        Some(r) => r.changed().await,
        None => std::future::pending().await,
    }
}

/// One direction: bytes read and not yet written (and flushed) the other way.
struct Pipe {
    buf: BytesMut,
    unflushed: bool,
}

/// What one turn of a [`Pipe`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Read this many bytes (0: the end of the stream), now in the buffer.
    Read(usize),
    /// Wrote some of the buffer (taken off it).
    Wrote,
    /// Flushed what was written.
    Flushed,
}

impl Pipe {
    fn new(buf: BytesMut) -> Self {
        Self {
            buf,
            unflushed: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty() && !self.unflushed
    }

    /// Write what is buffered, else flush it, else (if `may_read`) read more: a future
    /// the relay may drop at any await (each of these is cancel-safe, and the buffer
    /// changes only once one completes).
    async fn pump<R, W>(&mut self, from: &mut R, to: &mut W, may_read: bool) -> io::Result<Step>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if !self.buf.is_empty() {
            let n = to.write(&self.buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            if n == self.buf.len() {
                self.buf.clear(); // keeps the whole allocation for the next read
            } else {
                self.buf.advance(n);
            }
            self.unflushed = true;
            return Ok(Step::Wrote);
        }
        if self.unflushed {
            to.flush().await?;
            self.unflushed = false;
            return Ok(Step::Flushed);
        }
        if !may_read {
            return std::future::pending().await;
        }
        self.buf.reserve(CHUNK);
        from.read_buf(&mut self.buf).await.map(Step::Read)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }
    fn query() -> Vec<u8> {
        msg(b'Q', b"SELECT 1\0")
    }
    fn answer() -> Vec<u8> {
        [msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat()
    }

    /// The proxy's side of a relay: its ends of both streams, a session on generation 1.
    struct Proxy {
        client: DuplexStream,
        server: Server,
        tracker: Tracker,
    }

    impl Proxy {
        async fn relay(
            &mut self,
            rotations: Option<&mut watch::Receiver<Generation>>,
        ) -> io::Result<Ending> {
            let closing = CancellationToken::new();
            relay(
                &mut self.client,
                &mut self.server,
                &mut self.tracker,
                rotations,
                &closing,
            )
            .await
        }
    }

    /// The proxy's side, the client's end and the server's end, over `buffer`-byte pipes.
    fn ends(buffer: usize) -> (Proxy, DuplexStream, DuplexStream) {
        let (client, proxy_client) = duplex(buffer);
        let (server, proxy_server) = duplex(buffer);
        let proxy = Proxy {
            client: proxy_client,
            server: Server::for_tests(Box::pin(proxy_server), Generation(1)),
            tracker: Tracker::new(),
        };
        (proxy, client, server)
    }

    async fn read_exactly(s: &mut DuplexStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .expect("the bytes come")
            .unwrap();
        buf
    }

    #[tokio::test]
    async fn a_rotation_before_the_relay_starts_moves_an_idle_session_at_once() {
        // Subscribed at checkout; the rotation comes before the relay runs (the old relay
        // subscribed only then, and the session waited for its next query).
        let (mut proxy, _client, _server) = ends(1024);
        let (rotate, mut rotations) = watch::channel(Generation(1));
        rotate.send_replace(Generation(2));
        let ending =
            tokio::time::timeout(Duration::from_secs(2), proxy.relay(Some(&mut rotations)))
                .await
                .expect("handed over without waiting for a query");
        assert_eq!(ending.unwrap(), Ending::HandOver);
        // Even a watch that has seen the rotation already (no change to wait for): the
        // relay looks at the generation as it starts.
        let (mut proxy, _client, _server) = ends(1024);
        let mut seen = rotate.subscribe();
        let ending = tokio::time::timeout(Duration::from_secs(2), proxy.relay(Some(&mut seen)))
            .await
            .expect("handed over without waiting for a query or a change");
        assert_eq!(ending.unwrap(), Ending::HandOver);
    }

    #[tokio::test]
    async fn a_rotation_during_a_query_moves_the_session_once_the_reply_is_through() {
        let (mut proxy, mut client, mut server) = ends(1024);
        let (rotate, mut rotations) = watch::channel(Generation(1));
        client.write_all(&query()).await.unwrap();
        let (ending, ()) = tokio::join!(proxy.relay(Some(&mut rotations)), async {
            assert_eq!(read_exactly(&mut server, query().len()).await, query());
            // Half the reply, the rotation, a pause: the session must not move now.
            let reply = answer();
            server.write_all(&reply[..7]).await.unwrap();
            rotate.send_replace(Generation(2));
            tokio::time::sleep(Duration::from_millis(200)).await;
            server.write_all(&reply[7..]).await.unwrap();
            assert_eq!(read_exactly(&mut client, reply.len()).await, reply);
        });
        assert_eq!(ending.unwrap(), Ending::HandOver);
    }

    #[tokio::test]
    async fn a_session_that_stays_is_not_moved_and_its_terminate_is_not_forwarded() {
        let (mut proxy, mut client, mut server) = ends(1024);
        let (rotate, _) = watch::channel(Generation(1));
        rotate.send_replace(Generation(2));
        client.write_all(&query()).await.unwrap();
        let (ending, (), ()) = tokio::join!(
            proxy.relay(None),
            async {
                assert_eq!(read_exactly(&mut server, query().len()).await, query());
                server.write_all(&answer()).await.unwrap();
            },
            async {
                assert_eq!(read_exactly(&mut client, answer().len()).await, answer());
                client.write_all(&msg(b'X', b"")).await.unwrap();
            }
        );
        assert_eq!(ending.unwrap(), Ending::Idle);
        // Nothing more reached the server: no Terminate.
        let mut rest = [0u8; 1];
        let more = tokio::time::timeout(Duration::from_millis(100), server.read(&mut rest)).await;
        assert!(more.is_err(), "{more:?}");
    }

    #[tokio::test]
    async fn pipelined_queries_then_terminate_are_forwarded_and_the_session_is_busy() {
        let (mut proxy, mut client, mut server) = ends(1024);
        let bytes = [query(), query(), msg(b'X', b"")].concat();
        client.write_all(&bytes).await.unwrap();
        let ending = proxy.relay(None).await.unwrap();
        assert_eq!(ending, Ending::Busy, "two replies outstanding");
        let forwarded = read_exactly(&mut server, 2 * query().len()).await;
        assert_eq!(forwarded, [query(), query()].concat());
    }

    #[tokio::test]
    async fn a_client_that_sends_while_its_results_stream_back_never_stalls_the_relay() {
        // Small buffers: the server writes all its replies before it reads a byte (as
        // PostgreSQL blocked on a full socket does); the client reads as it writes. A
        // relay that waited on one direction before serving the other would stall.
        let (mut proxy, client, mut server) = ends(256);
        let notice = msg(b'N', &[b'x'; 100]);
        let queries = query().repeat(2000);
        let replies = notice.repeat(2000);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let all_read = tokio::sync::Notify::new();
        let run = async {
            tokio::join!(
                proxy.relay(None),
                async {
                    client_write.write_all(&queries).await.unwrap();
                    // Goodbye once every reply is in.
                    all_read.notified().await;
                    client_write.write_all(&msg(b'X', b"")).await.unwrap();
                },
                async {
                    let mut got = vec![0; replies.len()];
                    client_read.read_exact(&mut got).await.unwrap();
                    assert!(got == replies);
                    all_read.notify_one();
                },
                async {
                    server.write_all(&replies).await.unwrap();
                    let mut got = vec![0; queries.len()];
                    server.read_exact(&mut got).await.unwrap();
                    assert!(got == queries);
                },
            )
        };
        let (ending, (), (), ()) = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the relay kept both directions moving");
        assert_eq!(ending.unwrap(), Ending::Busy, "2000 queries unanswered");
    }

    #[tokio::test]
    async fn a_server_that_closes_or_speaks_garbage_ends_the_relay() {
        let (mut proxy, _client, mut server) = ends(1024);
        server.shutdown().await.unwrap();
        assert_eq!(proxy.relay(None).await.unwrap(), Ending::ServerGone);
        let (mut proxy, _client, mut server) = ends(1024);
        server.write_all(&[b'Z', 0, 0, 0, 1]).await.unwrap();
        let err = proxy.relay(None).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
