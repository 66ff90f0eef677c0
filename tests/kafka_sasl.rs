//! Kafka SASL settings from KV v2 against a real SASL/SCRAM broker (tansu 0.6.0, started
//! by `scripts/stack.sh up --kafka`), with rdkafka producers and consumers running across
//! rotations.
mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{kafka, kafka_admin as admin, kafka_secret, kv_put, unique};
use vaultpool::ErrorKind;
use vaultpool::kafka::rdkafka::config::ClientConfig;
use vaultpool::kafka::rdkafka::consumer::{Consumer, StreamConsumer};
use vaultpool::kafka::rdkafka::message::Message;
use vaultpool::kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use vaultpool::kafka::{KafkaSasl, RotatingClient, SaslConfig, verifier, verify};
use vaultpool::lease::KvCredentials;

/// A reader with the infrastructure AppRole (its policy reads `secret/kafka/*`).
fn vault() -> vaultpool::vault::Client {
    common::approle_client("INFRASTRUCTURE")
}

/// The SASL settings at `path`, polled every second, each version verified at the broker.
async fn watched(path: &str) -> KafkaSasl {
    KafkaSasl::builder(vault())
        .secret(KvCredentials::new(path).poll_interval(Duration::from_secs(1)))
        .verify_with(verifier(ClientConfig::new(), Duration::from_secs(10)))
        .build()
        .await
        .unwrap()
}

/// A consumer of `topic` (group `g-{id}`, from the earliest offset) following `sasl`.
fn consumer_of(sasl: &KafkaSasl, id: &str, topic: &str) -> RotatingClient<StreamConsumer> {
    let mut base = ClientConfig::new();
    base.set("group.id", format!("g-{id}"))
        .set("auto.offset.reset", "earliest");
    let topic = topic.to_owned();
    RotatingClient::new(sasl, base, move |c| {
        let consumer: StreamConsumer = c.create()?;
        consumer.subscribe(&[&topic])?;
        Ok(consumer)
    })
    .unwrap()
}

fn password() -> String {
    format!("pw-{}", fastrand::u64(..))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_under_a_running_producer_and_consumer_loses_no_message() {
    let bootstrap = kafka().to_owned();
    let id = unique();
    let (user, topic, path) = (
        format!("app-{id}"),
        format!("rot-{id}"),
        format!("kafka/rot-{id}"),
    );
    let (p1, p2, p3) = (password(), password(), password());
    admin(&["upsert-user", &user, &p1]);
    admin(&["create-topic", &topic]);
    kv_put(&path, kafka_secret(&bootstrap, &user, &p1, "SCRAM-SHA-512")).await;

    let sasl = watched(&path).await;
    let mut base = ClientConfig::new();
    base.set("acks", "all").set("message.timeout.ms", "60000");
    let producer: RotatingClient<FutureProducer> =
        RotatingClient::new(&sasl, base, |c| c.create()).unwrap();
    let consumer = consumer_of(&sasl, &id, &topic);

    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(Mutex::new(BTreeSet::new()));
    let consumed = Arc::new(Mutex::new(BTreeSet::new()));
    let produce = tokio::spawn({
        let (stop, delivered, producer, topic) = (
            stop.clone(),
            delivered.clone(),
            producer.clone(),
            topic.clone(),
        );
        async move {
            let mut failed = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let payload = n.to_string();
                let record = FutureRecord::to(&topic).key("k").payload(&payload);
                match producer.get().send(record, Duration::from_secs(30)).await {
                    Ok(_) => {
                        delivered.lock().unwrap().insert(n);
                    }
                    Err((e, _)) => failed.push(format!("message {n}: {e}")),
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (n, failed)
        }
    });
    let consume = tokio::spawn({
        let (stop, consumed, consumer) = (stop.clone(), consumed.clone(), consumer.clone());
        async move {
            let mut done_at: Option<Instant> = None;
            loop {
                if stop.load(Ordering::Relaxed) && done_at.is_none() {
                    done_at = Some(Instant::now());
                }
                if done_at.is_some_and(|t| t.elapsed() > Duration::from_secs(40)) {
                    return;
                }
                let client = consumer.get();
                match tokio::time::timeout(Duration::from_millis(500), client.recv()).await {
                    Ok(Ok(m)) => {
                        let n: u64 = std::str::from_utf8(m.payload().unwrap())
                            .unwrap()
                            .parse()
                            .unwrap();
                        consumed.lock().unwrap().insert(n);
                    }
                    Ok(Err(e)) => eprintln!("consumer: {e}"),
                    Err(_) => {}
                }
            }
        }
    });

    // Wait until messages flow end to end.
    let t0 = Instant::now();
    while consumed.lock().unwrap().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "nothing consumed in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("kafka: first message consumed after {:?}", t0.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v1 = sasl.current();

    // Rotation 1: a new password and another mechanism (the user has both): a rebuild.
    admin(&["upsert-user", &user, &p2]);
    let t = Instant::now();
    kv_put(&path, kafka_secret(&bootstrap, &user, &p2, "SCRAM-SHA-256")).await;
    wait_applied(
        &[&|| producer.applied_version(), &|| {
            consumer.applied_version()
        }],
        2,
    )
    .await;
    let rebuild_pickup = t.elapsed();
    assert_eq!((producer.rebuilds(), consumer.rebuilds()), (1, 1));

    // The old password no longer works on the broker; the typed error says so.
    let e = verify(v1.clone(), ClientConfig::new(), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AuthenticationFailed, "{e}");
    let old_refused = e.to_string();
    assert!(!old_refused.contains(&p1), "{old_refused}");
    tokio::time::sleep(Duration::from_secs(8)).await;

    // Rotation 2: only the password: the running clients take it, no rebuild.
    admin(&["upsert-user", &user, &p3]);
    let t = Instant::now();
    kv_put(&path, kafka_secret(&bootstrap, &user, &p3, "SCRAM-SHA-256")).await;
    wait_applied(
        &[&|| producer.applied_version(), &|| {
            consumer.applied_version()
        }],
        3,
    )
    .await;
    let live_pickup = t.elapsed();
    assert_eq!((producer.rebuilds(), consumer.rebuilds()), (1, 1));
    assert_eq!(
        (producer.credential_updates(), consumer.credential_updates()),
        (1, 1)
    );

    // Past tansu's 60 s session lifetime: the clients built in rotation 1 must
    // authenticate again, and only the password given to them live (p3) works by then.
    tokio::time::sleep(Duration::from_secs(62)).await;
    assert_eq!(
        admin(&["check", &user, &p2, "--mechanism", "SCRAM-SHA-256"])
            .trim()
            .split(':')
            .next(),
        Some("refused")
    );

    stop.store(true, Ordering::Relaxed);
    let (sent, failed) = produce.await.unwrap();
    let delivered = delivered.lock().unwrap().clone();
    let t = Instant::now();
    while !delivered.is_subset(&consumed.lock().unwrap()) && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let consumed_now = consumed.lock().unwrap().clone();
    let lost: Vec<_> = delivered.difference(&consumed_now).take(20).collect();
    println!(
        "kafka rotation: {sent} messages sent over {:?}, {} delivered, {} failed, {} consumed, {} \
         lost; 2 rotations (mechanism+password → rebuild picked up in {rebuild_pickup:?}, \
         password only → live in {live_pickup:?}); old password: {old_refused}",
        t0.elapsed(),
        delivered.len(),
        failed.len(),
        consumed_now.len(),
        delivered.difference(&consumed_now).count()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(lost.is_empty(), "delivered but never consumed: {lost:?}");
    assert_eq!(delivered.len() as u64, sent);
    assert!(producer.last_error().is_none() && consumer.last_error().is_none());
    stop.store(true, Ordering::Relaxed);
    consume.abort();
    producer.close().await;
    consumer.close().await;
    sasl.close().await;
}

/// Wait until every client (its applied KV version) has reached `version`.
async fn wait_applied(clients: &[&dyn Fn() -> u64], version: u64) {
    let t = Instant::now();
    while clients.iter().any(|applied| applied() < version) {
        let now: Vec<u64> = clients.iter().map(|applied| applied()).collect();
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "version {version} not applied: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_wrong_password_or_unknown_user_is_a_typed_error() {
    let bootstrap = kafka().to_owned();
    let id = unique();
    let (user, good) = (format!("app-{id}"), password());
    admin(&["upsert-user", &user, &good]);
    for (who, pw, expect) in [
        (&user, "wrong-password-x", "invalid-proof"),
        (&format!("nobody-{id}"), "whatever-pw-y", "unknown-user"),
    ] {
        let path = format!("kafka/bad-{id}");
        kv_put(&path, kafka_secret(&bootstrap, who, pw, "SCRAM-SHA-512")).await;
        let e = KafkaSasl::builder(vault())
            .secret(KvCredentials::new(&path))
            .verify_with(verifier(ClientConfig::new(), Duration::from_secs(10)))
            .build()
            .await
            .unwrap_err();
        let msg = e.to_string();
        println!("kafka, {expect}: {msg}");
        assert_eq!(e.kind(), ErrorKind::AuthenticationFailed, "{msg}");
        assert!(
            msg.contains(who.as_str()) && msg.contains(&bootstrap) && msg.contains(&path),
            "{msg}"
        );
        assert!(!msg.contains(pw), "{msg}");
    }
    // The right one passes.
    let path = format!("kafka/good-{id}");
    kv_put(
        &path,
        kafka_secret(&bootstrap, &user, &good, "SCRAM-SHA-512"),
    )
    .await;
    KafkaSasl::builder(vault())
        .secret(KvCredentials::new(&path))
        .verify_with(verifier(ClientConfig::new(), Duration::from_secs(10)))
        .build()
        .await
        .unwrap()
        .close()
        .await;
}

#[tokio::test]
async fn a_new_kv_version_is_published_within_the_poll_interval() {
    let path = format!("kafka/poll-{}", unique());
    let v = |n: u32| kafka_secret("broker-1:9092", "svc", &format!("pw-{n}"), "SCRAM-SHA-512");
    kv_put(&path, v(1)).await;
    let every = Duration::from_secs(2);
    let sasl = KafkaSasl::builder(vault())
        .secret(KvCredentials::new(&path).poll_interval(every))
        .build()
        .await
        .unwrap();
    let mut rx = sasl.subscribe();
    rx.borrow_and_update();
    assert_eq!(sasl.current().version, 1);
    let mut seen = Vec::new();
    for n in 2..=4 {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..1500))).await;
        let polls_before = sasl.status().polls;
        kv_put(&path, v(n)).await;
        let t = Instant::now();
        tokio::time::timeout(every * 10, rx.changed())
            .await
            .expect("no new version published")
            .unwrap();
        let picked = t.elapsed();
        // Seen by the first poll that began after the write: at most one poll (one that
        // was already under way) passes it by. Counted in polls, not seconds, so a loaded
        // machine cannot make it flaky; the times are printed below.
        let polls = sasl.status().polls - polls_before;
        assert!(polls <= 2, "version {n} published after {polls} polls");
        rx.borrow_and_update();
        let config: Arc<SaslConfig> = sasl.current();
        assert_eq!(config.version, u64::from(n));
        assert_eq!(sasl.current().version, u64::from(n));
        seen.push((picked, polls));
    }
    let status = sasl.status();
    println!(
        "kafka KV poll every {every:?}: new versions seen after (time, polls since the write) \
         {seen:?}; {} polls, {} changes",
        status.polls, status.rotations
    );
    assert_eq!(status.rotations, 3);
    assert_eq!(sasl.current().version, 4);

    // A broken version is not published; the good one stays, the error is reported.
    kv_put(&path, serde_json::json!({ "bootstrap_servers": "nope", "sasl_username": "svc", "sasl_password": "x" })).await;
    let e = sasl.check_now().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("bootstrap_servers"), "{e}");
    assert_eq!(sasl.current().version, 4);
    assert!(sasl.status().last_error.is_some());
    sasl.close().await;
}

/// A service that builds its client in a setup function and drops its `KafkaSasl`: the
/// client keeps the poller alive and still picks up a new password (live, no rebuild),
/// then produces with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_kafka_sasl_was_dropped_still_picks_up_a_new_password() {
    let bootstrap = kafka().to_owned();
    let id = unique();
    let (user, topic, path) = (
        format!("app-{id}"),
        format!("orphan-{id}"),
        format!("kafka/orphan-{id}"),
    );
    let (p1, p2) = (password(), password());
    admin(&["upsert-user", &user, &p1]);
    admin(&["create-topic", &topic]);
    kv_put(&path, kafka_secret(&bootstrap, &user, &p1, "SCRAM-SHA-512")).await;
    let producer: RotatingClient<FutureProducer> = {
        let sasl = KafkaSasl::builder(vault())
            .secret(KvCredentials::new(&path).poll_interval(Duration::from_secs(1)))
            .build()
            .await
            .unwrap();
        RotatingClient::new(&sasl, ClientConfig::new(), |c| c.create()).unwrap()
        // `sasl` dropped here
    };
    admin(&["upsert-user", &user, &p2]);
    let t = Instant::now();
    kv_put(&path, kafka_secret(&bootstrap, &user, &p2, "SCRAM-SHA-512")).await;
    wait_applied(&[&|| producer.applied_version()], 2).await;
    let picked_up = t.elapsed();
    assert_eq!(producer.credential_updates(), 1);
    assert!(producer.last_error().is_none());
    producer
        .ready()
        .await
        .send(
            FutureRecord::to(&topic).key("k").payload("after"),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    println!(
        "kafka client with its KafkaSasl dropped: new password applied {picked_up:?} after the KV write"
    );
    producer.close().await;
}

/// A rebuild (new mechanism) under a keyed producer that pipelines its sends through
/// `ready()`, and a consumer reading with `stream()`: every message is delivered, in
/// order, and the same stream keeps receiving after its consumer was replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_keeps_keyed_order_and_the_consumer_stream_keeps_receiving() {
    use futures_util::StreamExt;
    let bootstrap = kafka().to_owned();
    let id = unique();
    let (user, topic, path) = (
        format!("app-{id}"),
        format!("order-{id}"),
        format!("kafka/order-{id}"),
    );
    let (p1, p2) = (password(), password());
    admin(&["upsert-user", &user, &p1]);
    admin(&["create-topic", &topic]);
    kv_put(&path, kafka_secret(&bootstrap, &user, &p1, "SCRAM-SHA-512")).await;
    let sasl = watched(&path).await;
    let mut base = ClientConfig::new();
    // Batches linger, so messages sit in the producer's queue when the rebuild comes.
    base.set("acks", "all")
        .set("linger.ms", "200")
        .set("message.timeout.ms", "60000");
    let producer: RotatingClient<FutureProducer> =
        RotatingClient::new(&sasl, base, |c| c.create()).unwrap();
    let consumer = consumer_of(&sasl, &id, &topic);

    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(Mutex::new(Vec::<(u64, Instant)>::new()));
    let consume = tokio::spawn({
        let (consumer, received) = (consumer.clone(), received.clone());
        async move {
            let mut stream = std::pin::pin!(consumer.stream());
            while let Some(m) = stream.next().await {
                match m {
                    Ok(m) => {
                        let n: u64 = std::str::from_utf8(m.payload().unwrap())
                            .unwrap()
                            .parse()
                            .unwrap();
                        received.lock().unwrap().push((n, Instant::now()));
                    }
                    Err(e) => eprintln!("consumer: {e}"),
                }
            }
        }
    });
    let produce = tokio::spawn({
        let (producer, stop, topic) = (producer.clone(), stop.clone(), topic.clone());
        async move {
            // Pipelined: each send is queued before the previous is acknowledged.
            let mut pending = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let payload = n.to_string();
                let client = producer.ready().await;
                let record = FutureRecord::to(&topic).key("same-key").payload(&payload);
                match client.send_result(record) {
                    Ok(delivery) => pending.push((n, delivery)),
                    Err((e, _)) => panic!("queueing message {n}: {e}"),
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut failed = Vec::new();
            for (n, delivery) in pending {
                match delivery.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => failed.push(format!("{n}: {e}")),
                    Err(_) => failed.push(format!("{n}: cancelled")),
                }
            }
            (n, failed)
        }
    });
    // Flowing end to end, then the rebuild.
    let t0 = Instant::now();
    while received.lock().unwrap().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "nothing consumed in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    admin(&["upsert-user", &user, &p2]);
    let rebuild_at = Instant::now();
    let mut rebuilt = consumer.rebuilt();
    kv_put(&path, kafka_secret(&bootstrap, &user, &p2, "SCRAM-SHA-256")).await;
    wait_applied(
        &[&|| producer.applied_version(), &|| {
            consumer.applied_version()
        }],
        2,
    )
    .await;
    assert_eq!((producer.rebuilds(), consumer.rebuilds()), (1, 1));
    // Counted from the consumer's swap: what arrives after it came through the new one.
    rebuilt.changed().await.unwrap();
    let swapped_at = Instant::now();
    // Keep producing for a while on the new clients.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let (sent, failed) = produce.await.unwrap();
    // Everything sent arrives (the consumer stream was never restarted by us).
    let t = Instant::now();
    while received.lock().unwrap().len() < sent as usize && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consume.abort();
    let got = received.lock().unwrap().clone();
    let mut seen = BTreeSet::new();
    let (mut out_of_order, mut last) = (0, None);
    for (n, _) in &got {
        if seen.insert(*n) {
            if last.is_some_and(|l| *n < l) {
                out_of_order += 1;
            }
            last = Some(*n);
        }
    }
    let missing = (0..sent).filter(|n| !seen.contains(n)).count();
    let after_rebuild = got.iter().filter(|(_, at)| *at > swapped_at).count();
    let first_after = got
        .iter()
        .find(|(_, at)| *at > swapped_at)
        .map(|(_, at)| *at - rebuild_at);
    println!(
        "kafka rebuild under a keyed pipelined producer and a consumer stream: {sent} sent, \
         {} failed, {} received ({} distinct, {} redelivered), {missing} missing, \
         {out_of_order} out of order; {after_rebuild} received after the consumer's swap, the \
         first {first_after:?} after the KV write",
        failed.len(),
        got.len(),
        seen.len(),
        got.len() - seen.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(missing, 0, "messages never received");
    assert_eq!(out_of_order, 0, "messages of one key out of order");
    assert!(after_rebuild > 0, "the stream stopped at the rebuild");
    producer.close().await;
    consumer.close().await;
    sasl.close().await;
}

/// A `transactional.id` is refused: a rebuild would fence the old producer mid-transaction.
#[tokio::test]
async fn a_transactional_producer_is_refused() {
    let path = format!("kafka/tx-{}", unique());
    kv_put(
        &path,
        kafka_secret("broker-1:9092", "svc", "pw-1", "SCRAM-SHA-512"),
    )
    .await;
    let sasl = KafkaSasl::builder(vault())
        .secret(KvCredentials::new(&path))
        .build()
        .await
        .unwrap();
    let mut base = ClientConfig::new();
    base.set("transactional.id", "orders-1");
    let e = RotatingClient::<FutureProducer>::new(&sasl, base, |c| c.create()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("transactional.id"), "{e}");
    sasl.close().await;
}
