//! Files read again when they change: the certificates, keys and CA bundles that
//! cert-manager (or kubelet, or Vault Agent) replaces on disk while the process runs.
//!
//! A [`Watched`] holds what was built from its files — an HTTP client, a rustls
//! configuration, the bytes a driver takes — and the files' stamps (modification and
//! change time, size, inode) as they were when it was built. [`Watched::get`] looks at
//! the files at most once a second ([`LOOK_EVERY`]; one atomic load and a clock read
//! otherwise): when a stamp changed it builds again, and the new value replaces the old
//! one only if the build succeeds. A half-replaced pair (a new certificate beside the
//! old key, while a copy is under way) keeps the old value, logs a warning naming the
//! files (at once, then at most once a minute while the same failure lasts) and is
//! tried again at the next look. What the files held, and why new ones could not be
//! used, is in [`Watched::describe`], for the messages of failed connections.
//!
//! Nothing here is ever printed from a file's contents: messages name paths, times and
//! the parser's verdict.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use crate::error::Result;

/// How often the files are looked at, at most.
pub(crate) const LOOK_EVERY: Duration = Duration::from_secs(1);
/// While the same rebuild keeps failing, its warning is repeated at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// While the certificate in use is past its end and its file unchanged, the warning
/// saying so is repeated at most this often.
const EXPIRED_WARN_EVERY: Duration = Duration::from_secs(300);

/// What a watched file holds, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    /// A client certificate (its first certificate's validity is shown in messages).
    Certificate,
    /// A private key.
    Key,
    /// CA certificates to trust.
    Ca,
}

/// One file a [`Watched`] value is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WatchedFile {
    pub(crate) path: PathBuf,
    /// The setting that names it (`PGSSLCERT`), for messages.
    pub(crate) var: &'static str,
    pub(crate) kind: FileKind,
}

impl WatchedFile {
    /// `path`, named by the setting `var`, holding `kind`.
    pub(crate) fn new(path: impl Into<PathBuf>, var: &'static str, kind: FileKind) -> Self {
        Self {
            path: path.into(),
            var,
            kind,
        }
    }
}

impl fmt::Display for WatchedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.path.display(), self.var)
    }
}

/// A value built from files, built again when they change. Cheap to clone (shared).
pub(crate) struct Watched<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Watched<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watched")
            .field("what", &self.shared.what)
            .field("files", &self.shared.files)
            .finish_non_exhaustive()
    }
}

type Build<T> = Box<dyn Fn() -> Result<T> + Send + Sync>;

struct Shared<T> {
    /// What is built, for messages: "the PostgreSQL client certificate".
    what: String,
    files: Vec<WatchedFile>,
    build: Build<T>,
    loaded: ArcSwap<Loaded<T>>,
    /// The time base of `next_look_ms`.
    epoch: Instant,
    /// When the files are looked at next, in ms since `epoch`.
    next_look_ms: AtomicU64,
    every: Duration,
    /// Held by the one caller looking at the files (`try_lock`: nobody waits for it).
    look: Mutex<Warnings>,
    /// The last rebuild that failed, while the files stay unusable.
    failure: Mutex<Option<Failure>>,
}

/// The value in use and what it was built from.
struct Loaded<T> {
    value: Arc<T>,
    /// How many times the value was built again (0: as first built).
    version: u64,
    stamps: Vec<Option<Stamp>>,
    read_at: SystemTime,
    /// The validity of the client certificate, if one of the files is one.
    validity: Option<Validity>,
    /// A hash of the files' bytes when they were read (`None`: one could not be read).
    contents: Option<u64>,
}

#[derive(Clone)]
struct Failure {
    at: SystemTime,
    error: String,
}

/// When warnings were last logged (throttling).
#[derive(Default)]
struct Warnings {
    failed: Option<(Instant, String)>,
    expired: Option<Instant>,
}

/// A certificate's validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Validity {
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
}

/// A hash of the bytes of `files` (change detection only, not a secret digest: it is
/// kept in memory, never shown); `None` when one cannot be read.
fn contents_hash(files: &[WatchedFile]) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        std::fs::read(&f.path).ok()?.hash(&mut hasher);
    }
    Some(hasher.finish())
}

/// A file's identity and version, as `stat` gives them: a rename over it (kubelet's
/// atomic writer, cert-manager's CSI driver) changes the inode, a write in place the
/// times and usually the size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: (u64, u64),
    #[cfg(unix)]
    changed: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    // Follows symlinks: Kubernetes mounts a secret's files as links into a directory
    // it swaps whole.
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    use std::os::unix::fs::MetadataExt;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        #[cfg(unix)]
        inode: (m.dev(), m.ino()),
        #[cfg(unix)]
        changed: (m.ctime(), m.ctime_nsec()),
    })
}

/// What one look at the files did (for tests and the caller's logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Looked {
    /// Not due, or another caller is looking.
    NotDue,
    Unchanged,
    Rebuilt,
    /// The files changed and could not be used; the previous value stays.
    Failed,
}

impl<T: Send + Sync + 'static> Watched<T> {
    /// Build the value from `files` with `build` (which reads them) and watch them;
    /// `what` names it in messages ("the PostgreSQL client certificate").
    ///
    /// # Errors
    /// Whatever the first build fails with.
    pub(crate) fn new(
        what: impl Into<String>,
        files: Vec<WatchedFile>,
        build: impl Fn() -> Result<T> + Send + Sync + 'static,
    ) -> Result<Self> {
        let stamps = files.iter().map(|f| stamp(&f.path)).collect();
        let contents = contents_hash(&files);
        let value = build()?;
        let validity = certificate_validity(&files);
        Ok(Self {
            shared: Arc::new(Shared {
                what: what.into(),
                files,
                build: Box::new(build),
                loaded: ArcSwap::from_pointee(Loaded {
                    value: Arc::new(value),
                    version: 0,
                    stamps,
                    read_at: SystemTime::now(),
                    validity,
                    contents,
                }),
                epoch: Instant::now(),
                next_look_ms: AtomicU64::new(0),
                every: LOOK_EVERY,
                look: Mutex::new(Warnings::default()),
                failure: Mutex::new(None),
            }),
        })
    }

    /// The same, looking at the files every `every` (tests: zero looks at every call).
    #[cfg(test)]
    fn with_interval(self, every: Duration) -> Self {
        let mut shared = Arc::into_inner(self.shared).expect("not shared yet");
        shared.every = every;
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The current value, built again first if the files changed (looked at no more
    /// than once a second; a stat per file).
    pub(crate) fn get(&self) -> Arc<T> {
        self.look();
        self.shared.loaded.load().value.clone()
    }

    /// Look at the files if it is time, and rebuild if they changed.
    pub(crate) fn look(&self) -> Looked {
        let s = &*self.shared;
        if s.files.is_empty() {
            return Looked::NotDue;
        }
        let now_ms = u64::try_from(s.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        if now_ms < s.next_look_ms.load(Ordering::Acquire) {
            return Looked::NotDue;
        }
        // A panic in a build poisons the lock: looking must go on regardless.
        let mut warnings = match s.look.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Looked::NotDue,
        };
        if now_ms < s.next_look_ms.load(Ordering::Acquire) {
            return Looked::NotDue; // looked at by another caller just now
        }
        let every_ms = u64::try_from(s.every.as_millis()).unwrap_or(u64::MAX);
        s.next_look_ms
            .store(now_ms.saturating_add(every_ms), Ordering::Release);
        let stamps: Vec<_> = s.files.iter().map(|f| stamp(&f.path)).collect();
        let loaded = s.loaded.load_full();
        // The same stamps, or other stamps over the same bytes (a chmod, kubelet writing
        // the same secret again): nothing new — no rebuild, no new version (a new version
        // means a new certificate to log in with).
        let contents = contents_hash(&s.files);
        if stamps == loaded.stamps || contents.is_some_and(|c| Some(c) == loaded.contents) {
            if stamps != loaded.stamps {
                s.loaded.store(Arc::new(Loaded {
                    value: loaded.value.clone(),
                    version: loaded.version,
                    stamps,
                    read_at: loaded.read_at,
                    validity: loaded.validity,
                    contents: loaded.contents,
                }));
            }
            *s.failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
            warnings.failed = None;
            self.warn_if_expired(&loaded, &mut warnings);
            return Looked::Unchanged;
        }
        match (s.build)() {
            Ok(value) => {
                let validity = certificate_validity(&s.files);
                tracing::info!(
                    files = %self.files_text(),
                    valid_until = validity.map(|v| utc(v.not_after)).unwrap_or_default(),
                    "{} changed on disk: read again, new connections use it",
                    s.what
                );
                s.loaded.store(Arc::new(Loaded {
                    value: Arc::new(value),
                    version: loaded.version + 1,
                    stamps,
                    read_at: SystemTime::now(),
                    validity,
                    contents,
                }));
                *s.failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
                *warnings = Warnings::default();
                Looked::Rebuilt
            }
            Err(e) => {
                let error = e.to_string();
                let repeat = warnings
                    .failed
                    .as_ref()
                    .is_some_and(|(at, last)| *last == error && at.elapsed() < WARN_EVERY);
                if !repeat {
                    tracing::warn!(
                        files = %self.files_text(),
                        "{} changed on disk but cannot be used (tried again every {:?}); the \
                         one read at {} stays in use{}: {error}",
                        s.what,
                        s.every,
                        utc(loaded.read_at),
                        expiry_note(loaded.validity),
                    );
                    warnings.failed = Some((Instant::now(), error.clone()));
                }
                *s.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(Failure {
                    at: SystemTime::now(),
                    error,
                });
                Looked::Failed
            }
        }
    }

    fn warn_if_expired(&self, loaded: &Loaded<T>, warnings: &mut Warnings) {
        let Some(v) = loaded.validity else { return };
        if SystemTime::now() <= v.not_after
            || warnings
                .expired
                .is_some_and(|at| at.elapsed() < EXPIRED_WARN_EVERY)
        {
            return;
        }
        warnings.expired = Some(Instant::now());
        tracing::warn!(
            files = %self.files_text(),
            "{}: the certificate expired at {} and its file has not been replaced; check \
             that whatever renews it (cert-manager) writes the new one to this path",
            self.shared.what,
            utc(v.not_after),
        );
    }

    /// The files, for messages: "/p/tls.crt (PGSSLCERT), /p/tls.key (PGSSLKEY)".
    fn files_text(&self) -> String {
        let names: Vec<String> = self.shared.files.iter().map(ToString::to_string).collect();
        names.join(", ")
    }

    /// How many times the value was built again since the first build: a new number
    /// means new files are in use (a client certificate with another identity).
    pub(crate) fn version(&self) -> u64 {
        self.shared.loaded.load().version
    }

    /// Whether any file is watched (none: the value never changes).
    pub(crate) fn watches_files(&self) -> bool {
        !self.shared.files.is_empty()
    }

    /// What the files held when last read and, if changed files cannot be used, why —
    /// facts for the message of a connection the server refused for its certificate
    /// (the advice is the caller's): "the certificate in use is from /p/tls.crt
    /// (PGSSLCERT), read at …, valid from … until … (expired); the files changed at …
    /// and cannot be used: …".
    pub(crate) fn describe(&self) -> String {
        let s = &*self.shared;
        let loaded = s.loaded.load();
        let read = format!(
            "read at {} (and again whenever the files change)",
            utc(loaded.read_at)
        );
        let mut text = match (
            s.files.iter().find(|f| f.kind == FileKind::Certificate),
            loaded.validity,
        ) {
            (Some(file), Some(v)) => format!(
                "the certificate in use is from {file}, {read}, valid from {} until {}{}",
                utc(v.not_before),
                utc(v.not_after),
                if SystemTime::now() > v.not_after {
                    " (expired)"
                } else {
                    ""
                }
            ),
            _ => format!("{} in use: {}, {read}", s.what, self.files_text()),
        };
        if let Some(f) = &*s.failure.lock().unwrap_or_else(|p| p.into_inner()) {
            text.push_str(&format!(
                "; the files changed at {} and cannot be used: {}",
                utc(f.at),
                f.error
            ));
        }
        text
    }
}

/// Whether an error's text (lowercased) shows the peer refusing the certificate this
/// side presented: a TLS alert it sent ("received fatal alert: CertificateExpired",
/// "UnknownCA", "BadCertificate" …), as rustls words it. A failure to verify the
/// peer's own certificate reads "invalid peer certificate" instead.
pub(crate) fn peer_refused_our_certificate(t: &str) -> bool {
    const ALERTS: [&str; 7] = [
        "badcertificate",
        "unsupportedcertificate",
        "certificaterevoked",
        "certificateexpired",
        "certificateunknown",
        "unknownca",
        "certificaterequired",
    ];
    t.contains("received fatal alert") && ALERTS.iter().any(|a| t.contains(a))
}

/// ", and it expired at …" when `validity` ended.
fn expiry_note(validity: Option<Validity>) -> String {
    match validity {
        Some(v) if SystemTime::now() > v.not_after => {
            format!(" although it expired at {}", utc(v.not_after))
        }
        Some(v) => format!(" (valid until {})", utc(v.not_after)),
        None => String::new(),
    }
}

/// The validity of the first certificate in the first [`FileKind::Certificate`] file.
fn certificate_validity(files: &[WatchedFile]) -> Option<Validity> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let file = files.iter().find(|f| f.kind == FileKind::Certificate)?;
    let first = CertificateDer::pem_file_iter(&file.path)
        .ok()?
        .next()?
        .ok()?;
    validity(first.as_ref())
}

/// A moment as "2026-11-03 12:00:41 UTC".
pub(crate) fn utc(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The validity period of a DER certificate (X.509: `Certificate` → `tbsCertificate` →
/// `validity`), or `None` if it cannot be read.
pub(crate) fn validity(der: &[u8]) -> Option<Validity> {
    let (cert, _) = tlv(der, Some(0x30))?;
    let (mut tbs, _) = tlv(cert, Some(0x30))?;
    if tbs.first() == Some(&0xA0) {
        tbs = tlv(tbs, None)?.1; // [0] version
    }
    for _ in 0..3 {
        tbs = tlv(tbs, None)?.1; // serialNumber, signature, issuer
    }
    let (period, _) = tlv(tbs, Some(0x30))?;
    let (not_before, rest) = time(period)?;
    let (not_after, _) = time(rest)?;
    Some(Validity {
        not_before,
        not_after,
    })
}

/// One DER element of tag `tag` (any tag for `None`): its contents and what follows.
fn tlv(input: &[u8], tag: Option<u8>) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if tag.is_some_and(|want| want != t) {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(n)?;
        rest = after;
        bytes
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b))
    };
    rest.split_at_checked(len)
}

/// A UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) and what follows.
fn time(input: &[u8]) -> Option<(SystemTime, &[u8])> {
    let tag = *input.first()?;
    let (text, rest) = tlv(input, None)?;
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, text) = match (tag, text.len()) {
        (0x17, 12) => {
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        (0x18, 14) => (text.get(..4)?.parse().ok()?, &text[4..]),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { text.get(i..i + 2)?.parse().ok() };
    let (month, day) = (field(0)?, field(2)?);
    let secs =
        days_from_civil(year, month, day) * 86_400 + field(4)? * 3600 + field(6)? * 60 + field(8)?;
    let at = if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    };
    Some((at, rest))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (the inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::error::{Error, ErrorKind};

    /// Made with `openssl ca -startdate 260102030405Z -enddate 20510607080910Z`: a
    /// UTCTime start and a GeneralizedTime end.
    const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBeDCCAR6gAwIBAgIBAjAKBggqhkjOPQQDAjAUMRIwEAYDVQQDDAl0ZXN0IENB
IEEwIBcNMjYwMTAyMDMwNDA1WhgPMjA1MTA2MDcwODA5MTBaMBExDzANBgNVBAMM
BmNsaWVudDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABNU8d08GGQ3Rcumkrdxh
nafI427AWNj3LHyJ3suhz98fawe/OXA3AP2dpf36kU5/5k2iQoY+iR7gG2Lftl+1
GLujYjBgMBMGA1UdJQQMMAoGCCsGAQUFBwMCMAkGA1UdEwQCMAAwHQYDVR0OBBYE
FDlzmTBHDJtvM24D/V5gzORNcnEFMB8GA1UdIwQYMBaAFChtq2CkGRbIwxhWiwaG
4EiUeGIFMAoGCCqGSM49BAMCA0gAMEUCIQCrHuNkmhO6FO2NEP+c61sYcZOchRB7
Hf2Ap+DYg/W2cgIgT0QI33k5PMBOOAKs0nTFWgzA9JbCAbLwghAnFHugFEA=
-----END CERTIFICATE-----
";

    #[test]
    fn a_certificates_validity_is_read_from_its_der() {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap();
        let v = validity(der.as_ref()).unwrap();
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        // `date -u -d "2026-01-02 03:04:05" +%s` and the same for the end.
        assert_eq!(v.not_before, at(1_767_323_045));
        assert_eq!(v.not_after, at(2_569_738_150));
        assert_eq!(utc(v.not_before), "2026-01-02 03:04:05 UTC");
        assert_eq!(utc(v.not_after), "2051-06-07 08:09:10 UTC");
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        // Anything cut short or malformed is `None`, never a panic.
        for cut in 0..der.len() {
            let _ = validity(&der[..cut]);
        }
        assert_eq!(validity(b"not der"), None);
        assert_eq!(validity(&[]), None);
    }

    /// A temp dir with a "certificate" and a "key" whose texts must match ("pair N"
    /// in both) for a build to succeed, like a certificate and its key.
    struct Pair {
        dir: PathBuf,
        builds: Arc<AtomicUsize>,
    }

    impl Pair {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("vaultpool-watched-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let pair = Self {
                dir,
                builds: Arc::default(),
            };
            pair.write("cert", "pair 1");
            pair.write("key", "pair 1");
            pair
        }
        fn path(&self, name: &str) -> PathBuf {
            self.dir.join(name)
        }
        /// In place (not atomic): same inode, new times.
        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.path(name), text).unwrap();
        }
        /// Atomically, as kubelet: a new file renamed over the old.
        fn rename_in(&self, name: &str, text: &str) {
            let tmp = self.path(&format!("{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(tmp, self.path(name)).unwrap();
        }
        fn watched(&self) -> Result<Watched<String>> {
            let (cert, key, builds) = (self.path("cert"), self.path("key"), self.builds.clone());
            Watched::new(
                "the test pair",
                vec![
                    WatchedFile::new(&cert, "TEST_CERT", FileKind::Certificate),
                    WatchedFile::new(&key, "TEST_KEY", FileKind::Key),
                ],
                move || {
                    builds.fetch_add(1, Ordering::Relaxed);
                    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
                    let (c, k) = (read(&cert), read(&key));
                    if c == k {
                        Ok(c)
                    } else {
                        Err(Error::new(
                            ErrorKind::Config,
                            format!("the key {} does not fit the certificate", key.display()),
                        ))
                    }
                },
            )
        }
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The same bytes written again (kubelet refreshing a projected volume, a chmod):
    /// new stamps, no rebuild and no new version — a new version is a new certificate
    /// to log in with.
    #[test]
    fn the_same_bytes_written_again_are_no_new_version() {
        let pair = Pair::new("same");
        let w = pair.watched().unwrap().with_interval(Duration::ZERO);
        pair.rename_in("cert", "pair 1");
        pair.rename_in("key", "pair 1");
        assert_eq!(w.look(), Looked::Unchanged);
        assert_eq!(w.version(), 0);
        assert_eq!(
            pair.builds.load(Ordering::Relaxed),
            1,
            "rebuilt for the same bytes"
        );
        pair.rename_in("cert", "pair 2");
        pair.rename_in("key", "pair 2");
        assert_eq!(w.look(), Looked::Rebuilt);
        assert_eq!(w.version(), 1);
    }

    #[test]
    fn files_replaced_in_place_or_by_rename_are_read_again() {
        let pair = Pair::new("replace");
        let w = pair.watched().unwrap().with_interval(Duration::ZERO);
        assert_eq!(*w.get(), "pair 1");
        assert_eq!(w.look(), Looked::Unchanged);
        assert_eq!(
            pair.builds.load(Ordering::Relaxed),
            1,
            "no rebuild while unchanged"
        );
        // Atomic, as kubelet does it: both renamed in.
        pair.rename_in("cert", "pair 2");
        pair.rename_in("key", "pair 2");
        assert_eq!(*w.get(), "pair 2");
        // In place, with the same length: the times and size still tell.
        pair.write("cert", "pair 3");
        pair.write("key", "pair 3");
        assert_eq!(*w.get(), "pair 3");
        assert_eq!(pair.builds.load(Ordering::Relaxed), 3);
        assert_eq!(w.version(), 2, "two rebuilds");
    }

    #[test]
    fn a_half_replaced_pair_keeps_the_old_value_and_is_tried_again() {
        let pair = Pair::new("half");
        let w = pair.watched().unwrap().with_interval(Duration::ZERO);
        // The new certificate beside the old key (a copy under way).
        pair.write("cert", "pair 2");
        assert_eq!(w.look(), Looked::Failed);
        assert_eq!(*w.get(), "pair 1", "the old value stays");
        assert_eq!(w.version(), 0, "a failed rebuild is no new version");
        let said = w.describe();
        assert!(
            said.contains("cannot be used") && said.contains("does not fit"),
            "{said}"
        );
        assert!(
            said.contains(&pair.path("cert").display().to_string()),
            "{said}"
        );
        // Tried again at each look while it fails, and taken once the key is there.
        let builds = pair.builds.load(Ordering::Relaxed);
        assert_eq!(w.look(), Looked::Failed);
        assert_eq!(pair.builds.load(Ordering::Relaxed), builds + 1);
        pair.write("key", "pair 2");
        assert_eq!(*w.get(), "pair 2");
        assert!(!w.describe().contains("cannot be used"), "{}", w.describe());
        // A file missing for a moment (a swap by delete and create) is the same.
        std::fs::remove_file(pair.path("key")).unwrap();
        assert_eq!(w.look(), Looked::Failed);
        assert_eq!(*w.get(), "pair 2");
        // Changed back to what is loaded: nothing to report.
        pair.write("key", "pair 2");
        assert!(matches!(w.look(), Looked::Unchanged | Looked::Rebuilt));
        assert!(!w.describe().contains("cannot be used"));
    }

    #[test]
    fn the_files_are_looked_at_no_more_than_once_an_interval() {
        let pair = Pair::new("interval");
        let w = pair.watched().unwrap();
        assert_eq!(w.look(), Looked::Unchanged, "the first look is due");
        pair.rename_in("cert", "pair 2");
        pair.rename_in("key", "pair 2");
        // Within the interval, no stat: the old value (the next look picks it up).
        for _ in 0..1000 {
            assert_eq!(*w.get(), "pair 1");
        }
        assert_eq!(w.look(), Looked::NotDue);
        assert_eq!(pair.builds.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_bad_first_read_is_the_builds_error() {
        let pair = Pair::new("first");
        pair.write("key", "pair 2");
        let e = pair.watched().unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
    }

    #[test]
    fn the_certificate_in_use_is_described_with_its_validity() {
        let pair = Pair::new("describe");
        pair.write("cert", CERT);
        pair.write("key", CERT);
        let w = pair.watched().unwrap();
        let said = w.describe();
        assert!(
            said.contains("valid from 2026-01-02 03:04:05 UTC"),
            "{said}"
        );
        assert!(said.contains("until 2051-06-07 08:09:10 UTC"), "{said}");
        assert!(said.contains("TEST_CERT"), "{said}");
        assert!(!said.contains("MIIB"), "never the file's contents: {said}");
    }
}
