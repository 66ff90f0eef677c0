//! The listeners: binding them (a stale Unix socket of a proxy that died is replaced,
//! never one someone listens on), and the one accept loop each of them runs.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::config::Listen;
use crate::error::{Error, ErrorKind, Result};

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Peer {
    /// A TCP client (password only).
    Tcp,
    /// A Unix-socket client with this uid (if the kernel told).
    Unix(Option<u32>),
}

/// The Unix socket's file: removed at the end only if it is still the one bound (its
/// inode).
#[derive(Debug)]
pub(crate) struct SocketFile {
    pub(crate) path: PathBuf,
    inode: u64,
}

impl SocketFile {
    /// Remove the socket file if it is the one this proxy bound.
    pub(crate) fn remove(self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Every listener of the proxy.
#[derive(Debug)]
pub(crate) struct Listeners {
    pub(crate) tcp: Option<TcpListener>,
    pub(crate) unix: Option<UnixListener>,
    pub(crate) socket_file: Option<SocketFile>,
    /// `/health` and `/metrics`.
    pub(crate) http: Option<TcpListener>,
}

/// Give the Unix socket at `path` its mode (`unix_socket_mode`, default 0777: a client
/// with another uid must be able to connect; `allowed_uids` and the secret decide who
/// logs in) and group (`unix_socket_group`). `path` is in a directory of the proxy's
/// own (0700, see [`bind_socket`]): nobody can swap a symlink in for the socket, so
/// following links here cannot reach another file.
fn socket_access(path: &std::path::Path, listen: &Listen) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |what: String, e: io::Error| {
        Error::new(
            ErrorKind::Config,
            format!("vaultpool-proxy: {what} of the socket {}", path.display()),
        )
        .with_source(e)
    };
    let mode = listen.socket_mode()?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail(format!("setting the mode {mode:o}"), e))?;
    if let Some(group) = &listen.unix_socket_group {
        let gid = group_id(group).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "listen.unix_socket_group {group:?} is neither a gid nor a group in /etc/group"
                ),
            )
        })?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| fail(format!("giving the group {group}"), e))?;
    }
    Ok(())
}

/// A group's id: a number as it is, a name from /etc/group.
fn group_id(group: &str) -> Option<u32> {
    if let Ok(gid) = group.trim().parse() {
        return Some(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == group.trim())
            .then(|| fields.nth(1)?.parse().ok())
            .flatten()
    })
}

/// Bind the Unix socket at `path` with its mode and group: bound and given them in a
/// private directory beside it (0700), then renamed into place — in a shared directory
/// (a Kubernetes `emptyDir`, 0777) another container could otherwise swap a symlink in
/// between the bind and the chmod and have the proxy change the mode of a file it owns.
fn bind_socket(path: &std::path::Path, listen: &Listen) -> Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let fail = |what: &str, e: io::Error| {
        Error::new(
            ErrorKind::Config,
            format!("vaultpool-proxy: {what} for the socket {}", path.display()),
        )
        .with_source(e)
    };
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let private = dir.join(format!(".vaultpool-proxy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| fail("creating a private directory", e))?;
    let staged = private.join("socket");
    let bound = UnixListener::bind(&staged)
        .map_err(|e| fail("binding", e))
        .and_then(|l| socket_access(&staged, listen).map(|()| l))
        .and_then(|l| {
            std::fs::rename(&staged, path)
                .map(|()| l)
                .map_err(|e| fail("moving it into place", e))
        });
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Bind what `listen` asks for.
///
/// # Errors
/// [`ErrorKind::Config`]: an address that cannot be bound, a Unix socket another process
/// listens on.
pub(crate) async fn bind(listen: &Listen) -> Result<Listeners> {
    let bind_err = |what: &str, e: io::Error| {
        Error::new(
            ErrorKind::Config,
            format!("vaultpool-proxy: binding {what}"),
        )
        .with_source(e)
    };
    let tcp = match listen.tcp.as_str() {
        "" => None,
        addr => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| bind_err(addr, e))?,
        ),
    };
    let (unix, socket_file) = match &listen.unix_dir {
        Some(dir) => {
            let port = listen
                .unix_port
                .or_else(|| {
                    tcp.as_ref()
                        .and_then(|l| l.local_addr().ok())
                        .map(|a| a.port())
                })
                .unwrap_or(6432);
            let path = dir.join(format!(".s.PGSQL.{port}"));
            // A socket left by a proxy that died: remove it — never a socket someone
            // still listens on, never another kind of file.
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
                // Only a refused connection says nobody listens (a full backlog or a
                // permission error says nothing).
                let stale = matches!(
                    std::os::unix::net::UnixStream::connect(&path),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
                );
                if !stale {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "vaultpool-proxy: another process listens on {}; stop it or use \
                             another unix_dir or port",
                            path.display()
                        ),
                    ));
                }
                let _ = std::fs::remove_file(&path);
            }
            let listener = bind_socket(&path, listen)?;
            let inode = std::fs::symlink_metadata(&path)
                .map(|m| m.ino())
                .unwrap_or(0);
            (Some(listener), Some(SocketFile { path, inode }))
        }
        None => (None, None),
    };
    let http = match &listen.http {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| bind_err(addr, e))?,
        ),
        None => None,
    };
    Ok(Listeners {
        tcp,
        unix,
        socket_file,
        http,
    })
}

/// A listener the accept loop serves.
pub(crate) trait Accept: Send + Sync + 'static {
    /// A connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// What it is, for messages.
    const WHAT: &'static str;
    /// The next connection, and who is on its other end.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Peer)>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    const WHAT: &'static str = "TCP";

    async fn accept(&self) -> io::Result<(TcpStream, Peer)> {
        let (s, _) = TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok((s, Peer::Tcp))
    }
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    const WHAT: &'static str = "Unix-socket";

    async fn accept(&self) -> io::Result<(UnixStream, Peer)> {
        let (s, _) = UnixListener::accept(self).await?;
        let uid = s.peer_cred().ok().map(|c| c.uid());
        Ok((s, Peer::Unix(uid)))
    }
}

/// Accept connections on `listener` until `stop`, handing each to `serve` (which must
/// not wait: it spawns).
pub(crate) fn spawn<L: Accept>(
    listener: L,
    stop: CancellationToken,
    mut serve: impl FnMut(L::Stream, Peer) + Send + 'static,
) {
    tokio::spawn(async move {
        // Failures in a row, and when the last warning was given: out of file
        // descriptors lasts, and a warning every 100 ms for hours helps nobody.
        let (mut failing, mut warned) = (0_u64, None::<tokio::time::Instant>);
        loop {
            let conn = tokio::select! {
                () = stop.cancelled() => return,
                c = listener.accept() => c,
            };
            match conn {
                Ok((s, peer)) => {
                    if failing > 0 && warned.is_some() {
                        tracing::info!(
                            listener = L::WHAT,
                            after = failing,
                            "accepting clients again"
                        );
                    }
                    failing = 0;
                    serve(s, peer);
                }
                Err(e) => {
                    failing += 1;
                    if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!(listener = L::WHAT, error = %e, failing, "accepting a client failed (warned at most once a minute while it lasts)");
                        warned = Some(tokio::time::Instant::now());
                    }
                    // Back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

#[cfg(test)]
mod socket_tests {
    use super::*;

    #[test]
    fn socket_modes_and_groups_are_read_or_refused() {
        let with = |mode: Option<&str>| Listen {
            unix_socket_mode: mode.map(str::to_owned),
            ..Listen::default()
        };
        assert_eq!(with(None).socket_mode().unwrap(), 0o777);
        assert_eq!(with(Some("0770")).socket_mode().unwrap(), 0o770);
        for bad in ["rw-rw----", "1777", "0778", ""] {
            let e = with(Some(bad)).socket_mode().unwrap_err();
            assert!(e.to_string().contains("octal"), "{bad}: {e}");
        }
        assert_eq!(group_id("0"), Some(0));
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-vaultpool"), None);
    }
}
