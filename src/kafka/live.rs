//! rdkafka clients on rotating SASL settings.
//!
//! When only the username or password changes, a running client takes the new ones with
//! `rd_kafka_sasl_set_credentials` (librdkafka ≥ 1.9): no rebuild, no lost message, open
//! connections stay up and the next authentication uses the new credentials. When the
//! brokers, mechanism or protocol change, the client is rebuilt from the same base
//! configuration and swapped in:
//!
//! - a producer is flushed *before* the swap (so messages with the same key keep their
//!   order); [`RotatingClient::ready`] waits for that, [`RotatingClient::get`] still
//!   returns the old producer meanwhile. Use the client you are handed at once, for one
//!   send: a producer held across awaits may be a replaced one. A replaced producer is
//!   kept, and flushed, until its queue is empty or its messages reach their own
//!   `message.timeout.ms` (each then reported to its sender; none is dropped silently),
//!   so what reached it late is still delivered — only then not in order. If the flush
//!   before the swap cannot finish within 30 s (the old brokers are gone), the swap
//!   happens anyway. Continuous sends through `get()` during a rebuild keep the old
//!   queue from emptying and make the rebuild take those 30 s.
//! - a consumer leaves its group before its replacement joins (its stored offsets are
//!   committed; a message may be delivered twice, never skipped). A `recv()` pending on
//!   the replaced consumer would never return: [`RotatingClient::recv`] and
//!   [`RotatingClient::stream`] follow the rebuild, and [`RotatingClient::rebuilt`] lets
//!   your own loop do the same.
//! - a `transactional.id` in the base configuration is refused: a rebuilt producer with
//!   the same id would fence the old one in the middle of its transaction (one set by
//!   your `build` function cannot be seen: don't).

use std::ffi::{CStr, CString};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::Stream;
use rdkafka::bindings;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{
    BaseProducer, FutureProducer, Partitioner, Producer, ProducerContext, ThreadedProducer,
};
use rdkafka::util::AsyncRuntime;
use secrecy::ExposeSecret;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroize;

use super::{KafkaSasl, SaslConfig, SaslVerifier};
use crate::error::{Error, ErrorKind, Result};

impl SaslConfig {
    /// A `ClientConfig` for these settings: `bootstrap.servers`, `security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, `sasl.password`. Add your own keys (group id,
    /// acks, TLS files…) to it, or use [`apply_to`](Self::apply_to) on yours.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        self.apply_to(&mut config);
        config
    }

    /// Set the SASL keys of `config` from these settings (other keys are kept).
    ///
    /// rdkafka keeps its configuration as plain strings: the password is in `config` until
    /// it is dropped, so build clients from it and drop it.
    pub fn apply_to(&self, config: &mut ClientConfig) {
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("security.protocol", &self.security_protocol)
            .set("sasl.mechanism", &self.mechanism)
            .set("sasl.username", &self.username)
            .set("sasl.password", self.password.expose_secret());
    }
}

/// Records the errors librdkafka reports while a client verifies settings.
#[derive(Default)]
struct Recorder {
    errors: Mutex<Vec<(RDKafkaErrorCode, String)>>,
}

impl ClientContext for Recorder {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(code) = error.rdkafka_error_code() {
            self.errors
                .lock()
                .expect("recorder lock")
                .push((code, reason.to_owned()));
        }
    }
}

impl ProducerContext for Recorder {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, (): ()) {}
}

/// Connect to the brokers of `config` and authenticate, with the keys of `base` added
/// (TLS files, client id…). Waits at most `timeout`.
///
/// # Errors
/// [`ErrorKind::AuthenticationFailed`] when the broker refuses the user or password
/// (librdkafka's `SASL authentication error`, e.g. SCRAM `invalid-proof` or
/// `unknown-user`), [`ErrorKind::Backend`] when the brokers cannot be reached in time.
pub async fn verify(config: Arc<SaslConfig>, base: ClientConfig, timeout: Duration) -> Result<()> {
    let what = format!(
        "authenticating to Kafka at {} as {} with {} (KV version {})",
        config.bootstrap_servers, config.username, config.mechanism, config.version
    );
    let blocking = tokio::task::spawn_blocking(move || {
        let mut client_config = base;
        config.apply_to(&mut client_config);
        client_config.set_log_level(RDKafkaLogLevel::Emerg);
        let probe: BaseProducer<Recorder> =
            client_config.create_with_context(Recorder::default())?;
        drop(client_config);
        // Short metadata requests until one succeeds, the broker refuses the login, or
        // time is up. Error events (a refused login among them) reach the context only
        // when the main queue is served, hence the polls.
        let deadline = std::time::Instant::now() + timeout;
        let fetched = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let fetched = probe
                .client()
                .fetch_metadata(None, left.min(Duration::from_millis(500)))
                .map(|_| ());
            probe.poll(Duration::from_millis(10));
            let refused = probe
                .context()
                .errors
                .lock()
                .expect("recorder lock")
                .iter()
                .any(|(code, _)| *code == RDKafkaErrorCode::Authentication);
            if fetched.is_ok() || refused || left.is_zero() {
                break fetched;
            }
        };
        let errors = std::mem::take(&mut *probe.context().errors.lock().expect("recorder lock"));
        Ok::<_, KafkaError>((fetched, errors))
    });
    // Bounded even if librdkafka overstays (creating or destroying the probe client can
    // block on unresponsive brokers): the caller gets its answer in time, the blocking
    // thread finishes on its own.
    let bound = timeout.saturating_add(VERIFY_GRACE);
    let result = tokio::time::timeout(bound, blocking)
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Backend,
                format!("{what}: no answer within {bound:?}"),
            )
        })?
        .map_err(|e| Error::new(ErrorKind::Backend, what.clone()).with_source(e))?;
    let (fetched, errors) =
        result.map_err(|e| Error::new(ErrorKind::Config, what.clone()).with_source(e))?;
    let auth = errors
        .iter()
        .find(|(code, _)| *code == RDKafkaErrorCode::Authentication);
    match (fetched, auth) {
        (_, Some((_, reason))) => Err(Error::new(
            ErrorKind::AuthenticationFailed,
            format!("{what}: {reason}"),
        )),
        (Ok(()), None) => Ok(()),
        (Err(e), None) => {
            let seen: Vec<_> = errors.iter().map(|(_, r)| r.as_str()).collect();
            Err(Error::new(
                ErrorKind::Backend,
                format!("{what}: no answer within {timeout:?} ({})", seen.join("; ")),
            )
            .with_source(e))
        }
    }
}

/// What [`verify`] may take beyond its timeout (creating and destroying the probe).
const VERIFY_GRACE: Duration = Duration::from_secs(5);

/// A verifier for [`Builder::verify_with`](super::Builder::verify_with): [`verify`] with
/// `base` and `timeout`.
pub fn verifier(base: ClientConfig, timeout: Duration) -> SaslVerifier {
    Arc::new(move |config| Box::pin(verify(config, base.clone(), timeout)))
}

mod sealed {
    use rdkafka::types::RDKafka;

    pub trait Native {
        /// The librdkafka handle, valid while `self` is.
        fn native(&self) -> *mut RDKafka;
        /// Called on the serving client as its replacement starts (consumers leave their
        /// group, so the two do not share partitions).
        fn before_replace(&self) {}
        /// Deliver what the client holds, at most `timeout`; how many messages are left
        /// (producers; consumers hold none).
        fn flush_for(&self, _timeout: std::time::Duration) -> usize {
            0
        }
        /// Whether this is a producer (flushed before a swap).
        fn is_producer(&self) -> bool {
            false
        }
    }
}

/// An rdkafka client that [`RotatingClient`] can keep on rotating credentials: the
/// producers (`FutureProducer`, `BaseProducer`, `ThreadedProducer`) and consumers
/// (`StreamConsumer`, `BaseConsumer`) of rdkafka, with any context.
pub trait SaslClient: sealed::Native + Send + Sync + 'static {}

impl<T: sealed::Native + Send + Sync + 'static> SaslClient for T {}

macro_rules! native_producer {
    ($($ty:ty => [$($gen:tt)*] where [$($bound:tt)*];)*) => {$(
        impl<$($gen)*> sealed::Native for $ty where $($bound)* {
            fn native(&self) -> *mut rdkafka::types::RDKafka {
                self.client().native_ptr()
            }
            fn flush_for(&self, timeout: Duration) -> usize {
                if let Err(e) = self.flush(timeout) {
                    tracing::debug!(error = %e, "flushing a Kafka producer being replaced");
                }
                usize::try_from(self.in_flight_count()).unwrap_or(0)
            }
            fn is_producer(&self) -> bool {
                true
            }
        }
    )*};
}

native_producer! {
    FutureProducer<C, R, P> => [C, R, P] where [C: ClientContext + 'static, R: AsyncRuntime, P: Partitioner];
    BaseProducer<C, P> => [C, P] where [C: ProducerContext<P>, P: Partitioner];
    ThreadedProducer<C, P> => [C, P] where [C: ProducerContext<P> + 'static, P: Partitioner];
}

/// A consumer being replaced leaves its group first: its stored offsets are committed
/// on revocation, and its replacement resumes from them (messages it fetched but nobody
/// read are delivered again, never skipped).
macro_rules! native_consumer {
    ($($ty:ty => [$($gen:tt)*];)*) => {$(
        impl<$($gen)*> sealed::Native for $ty {
            fn native(&self) -> *mut rdkafka::types::RDKafka {
                self.client().native_ptr()
            }
            fn before_replace(&self) {
                self.unsubscribe();
            }
        }
    )*};
}

native_consumer! {
    StreamConsumer<C, R> => [C: ConsumerContext, R];
    BaseConsumer<C> => [C: ConsumerContext];
}

/// Give a running client new SASL credentials; librdkafka copies both strings.
#[allow(unsafe_code)]
fn set_credentials(
    client: &dyn sealed::Native,
    config: &SaslConfig,
) -> std::result::Result<(), String> {
    let username =
        CString::new(config.username.as_str()).map_err(|_| "the username holds a NUL byte")?;
    let mut password = CString::new(config.password.expose_secret())
        .map_err(|_| "the password holds a NUL byte")?
        .into_bytes_with_nul();
    // SAFETY: `client.native()` is the handle of a client borrowed for this whole call, so
    // it is alive. Both pointers are NUL-terminated buffers that outlive the call;
    // librdkafka copies them (rd_strdup) under its own lock, so the function is safe to
    // call from any thread while the client runs. A non-NULL result is an error object we
    // own: its string is copied before the object is destroyed, exactly once.
    let error = unsafe {
        let error = bindings::rd_kafka_sasl_set_credentials(
            client.native(),
            username.as_ptr(),
            password.as_ptr().cast(),
        );
        if error.is_null() {
            None
        } else {
            let message = CStr::from_ptr(bindings::rd_kafka_error_string(error))
                .to_string_lossy()
                .into_owned();
            bindings::rd_kafka_error_destroy(error);
            Some(message)
        }
    };
    password.zeroize();
    error.map_or(Ok(()), Err)
}

type Build<C> = dyn Fn(&ClientConfig) -> KafkaResult<C> + Send + Sync;

/// A long-lived rdkafka producer or consumer that follows a [`KafkaSasl`]: a new
/// password reaches the running client (no rebuild); new brokers, mechanism or protocol
/// rebuild it with the same `build` function and swap it in. A replaced consumer leaves
/// its group before the new one joins (so a message may be delivered twice, never
/// skipped); a replaced producer is flushed before the swap (order kept). It keeps its
/// [`KafkaSasl`] polling for as long as it follows it, even if you drop yours.
///
/// Producers: take the client per send with [`ready`](Self::ready) (it waits while a
/// rebuild flushes the old producer) or [`get`](Self::get) (never waits). Consumers:
/// read with `recv()` or `stream()` (on a `RotatingClient<StreamConsumer>`), which
/// follow a rebuild; a loop of your own on `get().recv()` must also watch
/// [`rebuilt`](Self::rebuilt).
///
/// ```no_run
/// # async fn run() -> vaultpool::Result<()> {
/// use std::time::Duration;
/// use rdkafka::config::ClientConfig;
/// use rdkafka::producer::{FutureProducer, FutureRecord};
/// use vaultpool::kafka::{KafkaSasl, RotatingClient, verifier};
///
/// let sasl = KafkaSasl::builder(vaultpool::vault::Client::from_env()?)
///     .verify_with(verifier(ClientConfig::new(), Duration::from_secs(10)))
///     .build()
///     .await?;
/// let mut base = ClientConfig::new();
/// base.set("acks", "all");
/// let producer: RotatingClient<FutureProducer> =
///     RotatingClient::new(&sasl, base, |config| config.create())?;
/// producer
///     .get()
///     .send(FutureRecord::to("events").key("k").payload("v"), Duration::from_secs(5))
///     .await
///     .map_err(|(e, _)| vaultpool::Error::query(e))?;
/// # Ok(()) }
/// ```
pub struct RotatingClient<C: SaslClient> {
    inner: Arc<ClientState<C>>,
}

/// What the clones of a [`RotatingClient`] share: the serving client, the settings it
/// uses, how to build another, and the counters and signals its followers read.
struct ClientState<C> {
    client: ArcSwap<C>,
    applied: Mutex<Arc<SaslConfig>>,
    base: ClientConfig,
    build: Box<Build<C>>,
    target: String,
    credential_updates: AtomicU64,
    rebuilds: AtomicU64,
    last_error: Mutex<Option<String>>,
    cancel: CancellationToken,
    /// The number of rebuilds swapped in; `recv`/`stream` follow it.
    epoch: watch::Sender<u64>,
    /// False while a producer rebuild flushes the old producer.
    ready: watch::Sender<bool>,
    /// How long a replaced producer is kept to deliver what it holds (its
    /// `message.timeout.ms`, librdkafka's default 300 s).
    message_timeout: Duration,
}

impl<C: SaslClient> RotatingClient<C> {
    /// Build the client from `base` plus the current SASL settings, and follow every new
    /// version of `sasl` until [`close`](Self::close) or drop.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when rdkafka refuses the configuration, or `base` sets a
    /// `transactional.id` (a rebuild would fence the old producer mid-transaction: build
    /// transactional producers yourself from [`KafkaSasl::current`]).
    pub fn new(
        sasl: &KafkaSasl,
        base: ClientConfig,
        build: impl Fn(&ClientConfig) -> KafkaResult<C> + Send + Sync + 'static,
    ) -> Result<Self> {
        let current = sasl.current();
        let target = sasl.target();
        if base.get("transactional.id").is_some() {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "following Kafka SASL settings {target}: the configuration sets \
                     transactional.id, and a rebuilt producer with the same id would fence \
                     the old one in the middle of its transaction; build transactional \
                     producers yourself from KafkaSasl::current() and recreate them between \
                     transactions"
                ),
            ));
        }
        // librdkafka: 0 means no limit; `delivery.timeout.ms` is an alias.
        let message_timeout = base
            .get("message.timeout.ms")
            .or_else(|| base.get("delivery.timeout.ms"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(DEFAULT_MESSAGE_TIMEOUT, |ms| match ms {
                0 => MAX_KEEP,
                ms => Duration::from_millis(ms).min(MAX_KEEP),
            });
        let client = create(&build, &base, &current, &target)?;
        let inner = Arc::new(ClientState {
            client: ArcSwap::from_pointee(client),
            applied: Mutex::new(current),
            base,
            build: Box::new(build),
            target,
            credential_updates: AtomicU64::new(0),
            rebuilds: AtomicU64::new(0),
            last_error: Mutex::new(None),
            cancel: CancellationToken::new(),
            epoch: watch::channel(0).0,
            ready: watch::channel(true).0,
            message_timeout,
        });
        tokio::spawn(follow(
            Arc::downgrade(&inner),
            sasl.clone(),
            inner.cancel.clone(),
        ));
        Ok(Self { inner })
    }

    /// The client serving now. Never waits: during a producer rebuild it is the old
    /// producer until that one is flushed (what you give it is flushed too).
    pub fn get(&self) -> Arc<C> {
        self.inner.client.load_full()
    }

    /// The client serving now, once no rebuild is flushing the old producer (at most
    /// ~30 s): messages sent through `ready()` keep their order across a rebuild. For a
    /// consumer, or between rebuilds, the same as [`get`](Self::get).
    pub async fn ready(&self) -> Arc<C> {
        let mut ready = self.inner.ready.subscribe();
        // The sender lives in `inner`, which `self` holds: `wait_for` cannot fail.
        let _ = ready.wait_for(|r| *r).await;
        self.get()
    }

    /// A receiver that changes after every rebuild (its value: how many so far). A
    /// `recv()` pending on a replaced consumer never returns; select on this to move to
    /// [`get`](Self::get)'s new client, or use `RotatingClient<StreamConsumer>::recv`.
    pub fn rebuilt(&self) -> watch::Receiver<u64> {
        self.inner.epoch.subscribe()
    }

    /// The KV version whose credentials the client uses.
    pub fn applied_version(&self) -> u64 {
        self.inner.applied.lock().expect("applied lock").version
    }

    /// How many new passwords reached the running client without a rebuild.
    pub fn credential_updates(&self) -> u64 {
        self.inner.credential_updates.load(Ordering::Relaxed)
    }

    /// How many times the client was rebuilt (brokers, mechanism or protocol changed).
    pub fn rebuilds(&self) -> u64 {
        self.inner.rebuilds.load(Ordering::Relaxed)
    }

    /// The last failure to apply a new version, if the next one has not succeeded.
    pub fn last_error(&self) -> Option<String> {
        self.inner.last_error.lock().expect("error lock").clone()
    }

    /// Stop following new versions. The client keeps working with the credentials it
    /// has. Calling it twice is harmless; dropping the last clone does the same.
    pub async fn close(&self) {
        self.inner.cancel.cancel();
    }
}

impl<C> Drop for ClientState<C> {
    fn drop(&mut self) {
        // The last handle is gone: stop the follow task (it holds only a `Weak`).
        self.cancel.cancel();
    }
}

impl<C: SaslClient> Clone for RotatingClient<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<C: SaslClient> fmt::Debug for RotatingClient<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingClient")
            .field("target", &self.inner.target)
            .field("applied_version", &self.applied_version())
            .field("credential_updates", &self.credential_updates())
            .field("rebuilds", &self.rebuilds())
            .finish_non_exhaustive()
    }
}

fn create<C>(
    build: &(impl Fn(&ClientConfig) -> KafkaResult<C> + ?Sized),
    base: &ClientConfig,
    config: &SaslConfig,
    target: &str,
) -> Result<C> {
    let mut client_config = base.clone();
    config.apply_to(&mut client_config);
    build(&client_config).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!(
                "creating a Kafka client for {} as {} (settings {target} version {})",
                config.bootstrap_servers, config.username, config.version
            ),
        )
        .with_source(e)
    })
}

/// How long the old producer is flushed before a rebuild's swap.
const REBUILD_FLUSH: Duration = Duration::from_secs(30);
/// librdkafka's default `message.timeout.ms`.
const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest a replaced producer is kept (for `message.timeout.ms` 0, "no limit").
const MAX_KEEP: Duration = Duration::from_secs(3600);

/// Keep a replaced producer, flushing in one-second slices, until it holds nothing, its
/// messages' timeout has passed, or the rotating client is gone (its drop purges the
/// rest, as dropping any rdkafka producer does), so a runtime shutting down is never
/// held for long.
fn keep_flushing<C: SaslClient>(
    old: Arc<C>,
    keep: Duration,
    alive: std::sync::Weak<ClientState<C>>,
) {
    let until = std::time::Instant::now() + keep;
    while std::time::Instant::now() < until && alive.strong_count() > 0 {
        if old.flush_for(Duration::from_secs(1)) == 0 {
            return;
        }
    }
}

/// Follow `sasl` (kept alive by this task, so its poller runs as long as the client
/// follows it) until the client is closed or dropped.
async fn follow<C: SaslClient>(
    inner: std::sync::Weak<ClientState<C>>,
    sasl: KafkaSasl,
    cancel: CancellationToken,
) {
    let mut updates = sasl.subscribe();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = updates.changed() => if changed.is_err() { return },
        }
        updates.borrow_and_update();
        let next = sasl.current();
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = inner.apply(next).await {
            tracing::warn!(target = %inner.target, error = %e, "Kafka client kept its credentials");
            *inner.last_error.lock().expect("error lock") = Some(e.to_string());
        }
    }
}

/// Lets `ready()` callers through again when dropped, however the rebuild ends.
struct Reopen<'a>(&'a watch::Sender<bool>);

impl Drop for Reopen<'_> {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl<C: SaslClient> ClientState<C> {
    async fn apply(self: &Arc<Self>, next: Arc<SaslConfig>) -> Result<()> {
        let applied = self.applied.lock().expect("applied lock").clone();
        if next.version == applied.version {
            return Ok(());
        }
        if next.same_connection(&applied) {
            set_credentials(&*self.client.load_full(), &next).map_err(|why| {
                Error::new(
                    ErrorKind::Backend,
                    format!(
                        "giving the running Kafka client the credentials of {} version {}: {why}",
                        self.target, next.version
                    ),
                )
            })?;
            self.credential_updates.fetch_add(1, Ordering::Relaxed);
            tracing::info!(target = %self.target, version = next.version, user = %next.username, "Kafka client: new SASL credentials applied");
        } else {
            // Created first (it can fail without side effects).
            let fresh = Arc::new(create(&*self.build, &self.base, &next, &self.target)?);
            let serving = self.client.load_full();
            if serving.is_producer() {
                // Flush before the swap, so that no message sent after the swap can
                // overtake one still queued in the old producer; `ready()` waits.
                let reopen = Reopen(&self.ready);
                self.ready.send_replace(false);
                let old = serving.clone();
                let left = tokio::task::spawn_blocking(move || old.flush_for(REBUILD_FLUSH))
                    .await
                    .unwrap_or(0);
                self.client.store(fresh);
                drop(reopen);
                if left > 0 {
                    // The old brokers cannot take them (often why the brokers changed).
                    tracing::warn!(
                        target = %self.target,
                        in_flight = left,
                        "Kafka producer rebuilt while the old one still held messages after \
                         {REBUILD_FLUSH:?}; kept until they are delivered or time out"
                    );
                }
                // Kept in any case: a send may have reached it after the flush (a client
                // taken just before the swap); dropping it would purge that message.
                let (keep, alive) = (self.message_timeout, Arc::downgrade(self));
                tokio::task::spawn_blocking(move || keep_flushing(serving, keep, alive));
            } else {
                // The serving consumer leaves its group at once, while the new one is
                // still connecting; callers following `epoch` move to the new one.
                serving.before_replace();
                self.client.store(fresh);
            }
            self.rebuilds.fetch_add(1, Ordering::Relaxed);
            self.epoch.send_modify(|e| *e += 1);
            tracing::info!(target = %self.target, version = next.version, "Kafka client rebuilt for new brokers/mechanism");
        }
        *self.applied.lock().expect("applied lock") = next;
        *self.last_error.lock().expect("error lock") = None;
        Ok(())
    }
}

impl<Ctx, R> RotatingClient<StreamConsumer<Ctx, R>>
where
    Ctx: ConsumerContext + 'static,
    R: AsyncRuntime,
    StreamConsumer<Ctx, R>: SaslClient,
{
    /// The next message, from whichever consumer is serving: a rebuild while this waits
    /// moves it to the new consumer (the replaced one would never answer).
    ///
    /// # Errors
    /// What rdkafka's `StreamConsumer::recv` returns.
    pub async fn recv(&self) -> KafkaResult<OwnedMessage> {
        let mut epoch = self.inner.epoch.subscribe();
        loop {
            epoch.borrow_and_update();
            let consumer = self.get();
            tokio::select! {
                message = consumer.recv() => {
                    return message.map(|m| m.detach());
                }
                // The sender lives in `inner`, which `self` holds: never an error.
                _ = epoch.changed() => {}
            }
        }
    }

    /// The messages as a stream that follows rebuilds (see [`recv`](Self::recv)); it
    /// never ends by itself.
    pub fn stream(&self) -> impl Stream<Item = KafkaResult<OwnedMessage>> + '_ {
        futures_util::stream::unfold(
            self,
            |client| async move { Some((client.recv().await, client)) },
        )
    }
}
