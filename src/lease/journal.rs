//! The lease journal: the ids and ends of the leases an engine holds (never a secret),
//! written to a file as they change, so that a process killed without `close()` (SIGKILL,
//! the OOM killer, a crash loop) leaves nothing behind for long: the next engine on the
//! same source and journal directory revokes what the dead one held, before it issues
//! its own.
//!
//! One journal per engine: `<dir>/<source>.<n>.leases`, with `<dir>/<source>.<n>.lock`
//! locked (an OS file lock) for as long as the engine lives. The kernel releases the lock
//! when the process dies, however it dies; an unlocked journal is therefore a dead run's.
//! The data file is rewritten whole and renamed into place (after an fsync) at each
//! change, so it is never half-written; it holds, per line, a lease id and its end (Unix
//! seconds). Files are created 0600.
//!
//! The journal wraps the engine's [`Source`]: an issued lease is recorded before anyone
//! uses it, a renewal moves its end, a revoke (or Vault saying the lease is gone) removes
//! it. Leases that end by themselves are dropped from the file at the next write.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::source::Source;
use crate::BoxFuture;
use crate::credentials::{Credentials, Lease, Leased};
use crate::error::{Error, ErrorKind, Result};

/// The environment variable that turns the journal on for every engine (a directory).
pub(crate) const JOURNAL_ENV: &str = "VAULTPOOL_LEASE_JOURNAL";

/// How many journals one source may have in a directory (one per live engine).
const MAX_SLOTS: usize = 64;
/// How long recovery waits for each revoke of a dead run's lease.
const RECOVERY_REVOKE_WAIT: Duration = Duration::from_secs(5);

/// An engine's journal: its slot (locked), and the leases it holds.
pub(crate) struct Journal {
    data: PathBuf,
    /// Held open, locked, for the engine's life.
    _lock: File,
    leases: Mutex<BTreeMap<String, u64>>,
    /// One write at a time, each of the state as it is when it starts (two writes side by
    /// side could rename in the wrong order and leave the older state).
    writing: tokio::sync::Mutex<()>,
}

impl Journal {
    /// Claim a journal in `dir` for the source named `name`, and revoke through `source`
    /// what dead runs on the same source left there. Their leases are first written to
    /// the new journal (a kill during the recovery loses none), then their journals are
    /// emptied, then the leases revoked side by side within [`RECOVERY_REVOKE_WAIT`];
    /// one whose revoke fails (or that Vault's revoke path does not know: a 404) stays
    /// in the journal for the next run.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when the directory cannot be created, written or locked.
    pub(crate) async fn open(dir: &Path, name: &str, source: &dyn Source) -> Result<Arc<Self>> {
        let (dir, stem) = (dir.to_owned(), file_stem(name));
        let Claimed {
            lock,
            data,
            left,
            dead,
        } = blocking(move || claim(&dir, &stem)).await?;
        let journal = Arc::new(Self {
            data,
            _lock: lock,
            leases: Mutex::new(BTreeMap::new()),
            writing: tokio::sync::Mutex::new(()),
        });
        let now = unix_now();
        let left: Vec<(String, u64)> = left.into_iter().filter(|(_, end)| *end > now).collect();
        journal.lock().extend(left.iter().cloned());
        journal.write().await?;
        blocking(move || dead.iter().try_for_each(|d| write_atomically(d, b""))).await?;
        let revokes = left.iter().map(|(id, end)| async move {
            let lease = Lease::new(id.clone(), Duration::from_secs(end - now), false);
            let result = tokio::time::timeout(RECOVERY_REVOKE_WAIT, source.revoke(&lease)).await;
            (id, result)
        });
        let (mut revoked, mut kept) = (0, 0);
        for (id, result) in futures_util::future::join_all(revokes).await {
            match result {
                Ok(Ok(())) => {
                    journal.lock().remove(id);
                    revoked += 1;
                }
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {RECOVERY_REVOKE_WAIT:?}"),
                    };
                    tracing::warn!(lease_id = %id, "revoking a lease a killed run left behind failed (kept in the journal for the next run): {why}");
                    kept += 1;
                }
            }
        }
        if revoked + kept > 0 {
            tracing::info!(
                source = name,
                revoked,
                kept,
                "revoked the leases an earlier run left behind (it ended without close())"
            );
            journal.write().await?;
        }
        Ok(journal)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record `lease` (or its new end); written in the background.
    fn record(self: &Arc<Self>, lease: &Lease) {
        let Some(end) = end_of(lease) else {
            return; // nothing to revoke: no lease, or no end known
        };
        self.lock().insert(lease.id.clone(), end);
        self.write_soon();
    }

    /// Forget `lease_id` (revoked, or gone in Vault); written in the background.
    fn forget(self: &Arc<Self>, lease_id: &str) {
        if self.lock().remove(lease_id).is_some() {
            self.write_soon();
        }
    }

    /// Forget every lease (the journal cannot be trusted with them); written in the
    /// background.
    fn clear(self: &Arc<Self>) {
        self.lock().clear();
        self.write_soon();
    }

    /// Write in a task of its own: the engine's path never waits on the disk (a stalled
    /// volume must not hold renewals or `close()`). Writes are one at a time, each of the
    /// state when it starts, so the last one written is the latest.
    fn write_soon(self: &Arc<Self>) {
        let journal = self.clone();
        tokio::spawn(async move {
            if let Err(e) = journal.write().await {
                tracing::warn!(
                    "the lease journal could not be written (a crash now leaves the leases it misses until their TTL): {e}"
                );
            }
        });
    }

    /// Write the journal as it is now (ended leases dropped): a temporary file, fsync,
    /// rename over the journal, fsync of the directory.
    async fn write(&self) -> Result<()> {
        let _one_at_a_time = self.writing.lock().await;
        let now = unix_now();
        let text: String = {
            let mut leases = self.lock();
            leases.retain(|_, end| *end > now);
            leases
                .iter()
                .map(|(id, end)| format!("{id}\t{end}\n"))
                .collect()
        };
        let data = self.data.clone();
        blocking(move || write_atomically(&data, text.as_bytes())).await
    }
}

/// Run `f` on the blocking pool (file I/O with fsync).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::new(
            ErrorKind::Config,
            "writing the lease journal: the task failed",
        )
        .with_source(e)
    })?
}

/// The seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// When `lease` ends, in Unix seconds (rounded up); `None` for no lease or no end.
fn end_of(lease: &Lease) -> Option<u64> {
    if lease.id.is_empty() || lease.duration.is_zero() {
        return None;
    }
    let left = lease
        .expires_at()?
        .saturating_duration_since(Instant::now());
    Some(unix_now() + left.as_secs() + 1)
}

/// `label` as a file name: letters, digits, `-` and `_` kept, the rest `_`.
fn file_stem(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What the journal directory error says.
fn config_error(what: String, e: std::io::Error) -> Error {
    Error::new(
        ErrorKind::Config,
        format!("{what}; give the lease journal a directory this process may write (VAULTPOOL_LEASE_JOURNAL or .lease_journal(…))"),
    )
    .with_source(e)
}

/// Open (creating, 0600) the file at `path`.
fn open_private(path: &Path, write: bool) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(write).create(write);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// A claimed slot: its lock (held), its data file, the leases dead runs left, and their
/// journals (emptied once those leases are in ours).
struct Claimed {
    lock: File,
    data: PathBuf,
    left: Vec<(String, u64)>,
    dead: Vec<PathBuf>,
}

/// Take over every unlocked journal of `stem` in `dir` (a dead run's) and claim the
/// first free slot: its lock (held) and data path, and the leases the dead runs left.
fn claim(dir: &Path, stem: &str) -> Result<Claimed> {
    std::fs::create_dir_all(dir).map_err(|e| {
        config_error(
            format!("creating the lease journal directory {}", dir.display()),
            e,
        )
    })?;
    let mut mine: Option<(File, PathBuf)> = None;
    let (mut left, mut dead) = (Vec::new(), Vec::new());
    for n in 0..MAX_SLOTS {
        let lock_path = dir.join(format!("{stem}.{n}.lock"));
        let data = dir.join(format!("{stem}.{n}.leases"));
        if mine.is_some() && !lock_path.exists() {
            continue; // nobody's: nothing to take over, and we have a slot
        }
        let lock = open_private(&lock_path, true).map_err(|e| {
            config_error(
                format!("opening the lease journal {}", lock_path.display()),
                e,
            )
        })?;
        match lock.try_lock() {
            Ok(()) => {
                // Free: new, or a dead run's — whose leases are ours to revoke.
                left.extend(read(&data));
                if mine.is_none() {
                    mine = Some((lock, data));
                } else {
                    dead.push(data);
                }
            }
            Err(TryLockError::WouldBlock) => {} // a live engine's
            Err(TryLockError::Error(e)) => {
                return Err(config_error(
                    format!("locking the lease journal {}", lock_path.display()),
                    e,
                ));
            }
        }
    }
    let (lock, data) = mine.ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            format!(
                "claiming a lease journal in {}: {MAX_SLOTS} engines on {stem} hold one each",
                dir.display()
            ),
        )
    })?;
    Ok(Claimed {
        lock,
        data,
        left,
        dead,
    })
}

/// The leases in a journal file; malformed lines are skipped.
fn read(path: &Path) -> Vec<(String, u64)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let (id, end) = line.split_once('\t')?;
            let end = end.trim().parse().ok()?;
            (!id.is_empty() && !id.contains(char::is_whitespace)).then(|| (id.to_owned(), end))
        })
        .collect()
}

/// Replace `path` with `bytes`: a temporary file beside it, fsync, rename, fsync of the
/// directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("leases.tmp");
    let fail = |e| config_error(format!("writing the lease journal {}", path.display()), e);
    let mut file = open_private(&tmp, true).map_err(fail)?;
    file.set_len(0).map_err(fail)?;
    file.write_all(bytes).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// A source whose leases are recorded in a [`Journal`].
pub(crate) struct Journaled {
    pub(crate) inner: Arc<dyn Source>,
    pub(crate) journal: Arc<Journal>,
    /// Set once a cache was seen in front of Vault: nothing is recorded from then on.
    pub(crate) off: std::sync::atomic::AtomicBool,
}

impl Journaled {
    /// Whether leases may be recorded: not behind a cache, which hands one lease to
    /// several processes — a crashed one's successor would revoke the others' credentials.
    fn recording(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.off.load(Ordering::Relaxed) {
            return false;
        }
        if self.inner.behind_cache() {
            self.off.store(true, Ordering::Relaxed);
            self.journal.clear();
            tracing::warn!(
                "the lease journal is off: Vault answers through a cache (a Vault Proxy or Agent \
                 with `cache {{}}`), which hands the same lease to several processes, and a \
                 crashed one's successor would revoke the credentials the others use"
            );
            return false;
        }
        true
    }
}

impl Source for Journaled {
    fn issue(&self) -> BoxFuture<'_, Result<Leased<Credentials>>> {
        Box::pin(async move {
            let leased = self.inner.issue().await?;
            if self.recording() {
                self.journal.record(&leased.lease);
            }
            Ok(leased)
        })
    }

    fn renew<'a>(&'a self, lease: &'a Lease, increment: Duration) -> BoxFuture<'a, Result<Lease>> {
        Box::pin(async move {
            let renewed = self.inner.renew(lease, increment).await;
            match &renewed {
                Ok(new) if self.recording() => {
                    let recorded = Lease {
                        id: lease.id.clone(),
                        ..new.clone()
                    };
                    self.journal.record(&recorded);
                }
                Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::LeaseExpired) => {
                    self.journal.forget(&lease.id);
                }
                _ => {}
            }
            renewed
        })
    }

    fn revoke<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let revoked = self.inner.revoke(lease).await;
            if revoked.is_ok() {
                self.journal.forget(&lease.id);
            }
            revoked
        })
    }

    fn behind_cache(&self) -> bool {
        self.inner.behind_cache()
    }

    fn issuing_token(&self) -> Option<String> {
        self.inner.issuing_token()
    }

    fn token_end(&self, accessor: &str) -> Option<Instant> {
        self.inner.token_end(accessor)
    }

    fn token_refresh_at(&self) -> Option<Instant> {
        self.inner.token_refresh_at()
    }

    fn refresh_token(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.refresh_token()
    }

    fn token_failure(&self) -> Option<(u32, Error)> {
        self.inner.token_failure()
    }

    fn poll_interval(&self) -> Option<Duration> {
        self.inner.poll_interval()
    }

    fn changed<'a>(&'a self, current: &'a Lease) -> BoxFuture<'a, Result<bool>> {
        self.inner.changed(current)
    }

    fn poll_delay(&self) -> Option<Duration> {
        self.inner.poll_delay()
    }

    fn polls_when_due(&self) -> bool {
        self.inner.polls_when_due()
    }

    fn issues_unique_leases(&self) -> bool {
        self.inner.issues_unique_leases()
    }

    fn preflight(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.preflight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journals_are_read_back_and_malformed_lines_skipped() {
        let dir = std::env::temp_dir().join(format!("vaultpool-journal-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.0.leases");
        write_atomically(
            &path,
            b"database/creds/app/abc\t4102444800\nbroken line\n\t5\nid with space\t9\n",
        )
        .unwrap();
        assert_eq!(
            read(&path),
            [("database/creds/app/abc".to_owned(), 4_102_444_800)]
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
        assert_eq!(file_stem("database/creds app"), "database_creds_app");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A live engine's journal (locked) is never taken over; a dead one's (unlocked) is,
    /// with its leases.
    #[test]
    fn only_unlocked_journals_are_taken_over() {
        let dir = std::env::temp_dir().join(format!("vaultpool-journal-{}", fastrand::u64(..)));
        let live = claim(&dir, "app").unwrap();
        assert!(live.left.is_empty());
        write_atomically(&live.data, b"live/lease\t4102444800\n").unwrap();
        // A second engine beside it: another slot, nothing to take over.
        let second = claim(&dir, "app").unwrap();
        assert_ne!(second.data, live.data);
        assert!(
            second.left.is_empty(),
            "took a live engine's leases: {:?}",
            second.left
        );
        write_atomically(&second.data, b"dead/lease\t4102444800\n").unwrap();
        let second_data = second.data.clone();
        drop(second); // that engine dies
        let third = claim(&dir, "app").unwrap();
        assert_eq!(third.data, second_data);
        assert_eq!(third.left, [("dead/lease".to_owned(), 4_102_444_800)]);
        // Another source's journals are not this one's.
        let other = claim(&dir, "other").unwrap();
        assert!(other.left.is_empty());
        drop((live, third, other));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
