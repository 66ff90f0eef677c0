//! rdkafka clients on rotating SASL settings.
//!
//! When only the username or password changes, a running client takes the new ones with
//! `rd_kafka_sasl_set_credentials` (librdkafka ≥ 1.9): no rebuild, no lost message, open
//! connections stay up and the next authentication uses the new credentials. When the
//! brokers, mechanism or protocol change, the client is rebuilt from the same base
//! configuration and swapped in; a retired producer is flushed first.

use std::ffi::{CStr, CString};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rdkafka::bindings;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseProducer, FutureProducer, Partitioner, Producer, ProducerContext, ThreadedProducer,
};
use rdkafka::util::AsyncRuntime;
use secrecy::ExposeSecret;
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
    let result = tokio::task::spawn_blocking(move || {
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
    })
    .await
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
        /// Called on a client that a rebuild replaced (producers flush).
        fn retire(&self, _timeout: std::time::Duration) {}
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
            fn retire(&self, timeout: Duration) {
                if let Err(e) = self.flush(timeout) {
                    tracing::warn!(error = %e, "flushing a retired Kafka producer");
                }
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
/// skipped); a replaced producer is flushed.
///
/// [`get`](Self::get) returns the client serving now; take it per operation (or per
/// batch) rather than keeping it forever, so that a rebuilt client is picked up. Work
/// already handed to a replaced producer is flushed before it is dropped.
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
    inner: Arc<Inner<C>>,
}

struct Inner<C> {
    client: ArcSwap<C>,
    applied: Mutex<Arc<SaslConfig>>,
    base: ClientConfig,
    build: Box<Build<C>>,
    target: String,
    credential_updates: AtomicU64,
    rebuilds: AtomicU64,
    last_error: Mutex<Option<String>>,
    cancel: CancellationToken,
}

impl<C: SaslClient> RotatingClient<C> {
    /// Build the client from `base` plus the current SASL settings, and follow every new
    /// version of `sasl` until [`close`](Self::close) or drop.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when rdkafka refuses the configuration.
    pub fn new(
        sasl: &KafkaSasl,
        base: ClientConfig,
        build: impl Fn(&ClientConfig) -> KafkaResult<C> + Send + Sync + 'static,
    ) -> Result<Self> {
        let current = sasl.current();
        let target = sasl.target();
        let client = create(&build, &base, &current, &target)?;
        let inner = Arc::new(Inner {
            client: ArcSwap::from_pointee(client),
            applied: Mutex::new(current),
            base,
            build: Box::new(build),
            target,
            credential_updates: AtomicU64::new(0),
            rebuilds: AtomicU64::new(0),
            last_error: Mutex::new(None),
            cancel: CancellationToken::new(),
        });
        tokio::spawn(follow(
            Arc::downgrade(&inner),
            sasl.clone(),
            inner.cancel.clone(),
        ));
        Ok(Self { inner })
    }

    /// The client serving now.
    pub fn get(&self) -> Arc<C> {
        self.inner.client.load_full()
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

impl<C> Drop for Inner<C> {
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

/// How long a retired producer may take to deliver what it holds.
const RETIRE_FLUSH: Duration = Duration::from_secs(30);

/// Follow `sasl` (kept alive by this task, so its poller runs as long as the client
/// follows it) until the client is closed or dropped.
async fn follow<C: SaslClient>(
    inner: std::sync::Weak<Inner<C>>,
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
        if let Err(e) = inner.apply(next) {
            tracing::warn!(target = %inner.target, error = %e, "Kafka client kept its credentials");
            *inner.last_error.lock().expect("error lock") = Some(e.to_string());
        }
    }
}

impl<C: SaslClient> Inner<C> {
    fn apply(&self, next: Arc<SaslConfig>) -> Result<()> {
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
            // Created first (it can fail without side effects); the serving consumer
            // leaves its group at once, while the new one is still connecting.
            let fresh = create(&*self.build, &self.base, &next, &self.target)?;
            self.client.load().before_replace();
            let old = self.client.swap(Arc::new(fresh));
            self.rebuilds.fetch_add(1, Ordering::Relaxed);
            tracing::info!(target = %self.target, version = next.version, "Kafka client rebuilt for new brokers/mechanism");
            tokio::task::spawn_blocking(move || old.retire(RETIRE_FLUSH));
        }
        *self.applied.lock().expect("applied lock") = next;
        *self.last_error.lock().expect("error lock") = None;
        Ok(())
    }
}
