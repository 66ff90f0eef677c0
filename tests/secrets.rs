//! Not one secret in any log line, error string or Debug print: a full rotation scenario
//! with every log at TRACE captured, every error and the Debug of every public type
//! collected, then searched for each password, secret_id, KV value and token.
#![cfg(feature = "postgres")]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use secrecy::ExposeSecret;
use serde_json::json;
#[cfg(feature = "rdkafka")]
use vaultpool::lease::KvCredentials;
use vaultpool::postgres::VaultPgPool;
use vaultpool::vault::{AuthMethod, Client};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

/// OpenBao service tokens: `s.` + 24 characters (or `hvs.`/`hvb.` + more).
fn looks_like_token(text: &str) -> Option<String> {
    for (i, _) in text.match_indices("s.") {
        let before = text[..i].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric()) {
            continue;
        }
        let rest: String = text[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        if rest.len() >= 24 {
            return Some(format!("s.{rest}"));
        }
    }
    None
}

#[test]
fn a_full_rotation_scenario_leaks_no_secret_anywhere() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(capture.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut secrets: Vec<String> = Vec::new();
    let mut seen: Vec<String> = Vec::new(); // every Display / Debug we produced

    rt.block_on(async {
        let secret_id = var("IMMUNE_SYSTEM_SECRET_ID");
        secrets.push(secret_id.clone());
        let kv_value = format!("kv-secret-value-{}", unique());
        secrets.push(kv_value.clone());
        let kv_path = format!("immune/leak-{}", unique());
        kv_put(&kv_path, json!({ "password": kv_value })).await;

        let builder = approle_builder("IMMUNE_SYSTEM");
        seen.push(format!("{builder:?}"));
        let client = builder.build().unwrap();
        seen.push(format!("{client:?}"));
        seen.push(format!("{:?}", client.login().await.unwrap()));
        let kv = client.read_kv("secret", &kv_path).await.unwrap();
        seen.push(format!("{kv:?}"));
        seen.push(format!("{:?}", kv.require("password").unwrap()));
        seen.push(format!("{:?}", AuthMethod::app_role("rid", &secret_id)));

        // Dynamic credentials through a pool: rotations, renewals, revocations.
        let role = create_role("1h", "2h").await;
        let pool = VaultPgPool::builder(&role)
            .vault(client.clone())
            .pg_config(pg_target())
            .build()
            .await
            .unwrap();
        for _ in 0..3 {
            let current = pool.engine().current();
            secrets.push(current.credentials.password.expose_secret().to_owned());
            seen.push(format!("{current:?}"));
            seen.push(format!("{:?}", current.credentials));
            let c = pool.get().await.unwrap();
            c.query_one("SELECT 1", &[]).await.unwrap();
            seen.push(format!("{c:?}"));
            drop(c);
            pool.rotate().await.unwrap();
        }
        secrets.push(
            pool.engine()
                .current()
                .credentials
                .password
                .expose_secret()
                .to_owned(),
        );
        seen.push(format!("{pool:?}"));
        seen.push(format!("{:?}", pool.status()));
        seen.push(format!("{:?}", pool.engine()));
        let leased = client.database_creds("database", &role).await.unwrap();
        secrets.push(leased.value.password.expose_secret().to_owned());
        seen.push(format!("{leased:?}"));
        seen.push(format!(
            "{:?}",
            client.renew_lease(&leased.lease.id, None).await.unwrap()
        ));
        client.revoke_lease(&leased.lease.id).await.unwrap();
        pool.close().await;

        // Errors, as people and logs see them.
        let wrong_secret = format!("wrong-secret-id-{}", unique());
        secrets.push(wrong_secret.clone());
        let e = builder_with(&wrong_secret)
            .build()
            .unwrap()
            .login()
            .await
            .unwrap_err();
        seen.push(format!("{e} | {e:?}"));
        let bad_token = format!("s.{}", "Z".repeat(24));
        secrets.push(bad_token.clone());
        let e = Client::builder()
            .address(var("VAULT_ADDR"))
            .token(&bad_token)
            .build()
            .unwrap()
            .read_kv("secret", &kv_path)
            .await
            .unwrap_err();
        seen.push(format!("{e} | {e:?}"));
        let e = Client::builder()
            .address(format!("http://user:{wrong_secret}@127.0.0.1:1"))
            .token("t")
            .build()
            .unwrap_err();
        seen.push(format!("{e} | {e:?}"));
        let e = vaultpool::postgres::pg_config_from_lookup(|k| {
            (k == "DATABASE_URL").then(|| format!("postgres://app:{wrong_secret}@db/app"))
        })
        .unwrap_err();
        seen.push(format!("{e} | {e:?}"));

        #[cfg(feature = "rdkafka")]
        kafka_part(&mut secrets, &mut seen).await;
    });

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("rotated credentials"),
        "the capture saw no engine events"
    );
    assert!(logs.lines().count() > 50, "too few log lines captured");
    let everything = format!("{logs}\n{}", seen.join("\n"));
    for secret in &secrets {
        assert!(secret.len() >= 8, "a secret too short to search for");
        assert!(
            !everything.contains(secret.as_str()),
            "a secret of {} characters leaked",
            secret.len()
        );
    }
    assert_eq!(looks_like_token(&everything), None, "a token leaked");
    println!(
        "secrets: searched {} log lines and {} Debug/Display strings for {} secrets: none found",
        logs.lines().count(),
        seen.len(),
        secrets.len()
    );
}

fn builder_with(secret_id: &str) -> vaultpool::vault::ClientBuilder {
    builder().app_role(var("IMMUNE_SYSTEM_ROLE_ID"), secret_id)
}

#[test]
fn the_token_detector_finds_tokens() {
    assert!(looks_like_token("x-vault-token: s.AbCdEfGhIjKlMnOpQrStUvWx ok").is_some());
    assert!(looks_like_token("vaultpool::vault::sys: renewed lease").is_none());
}

/// Kafka: SASL settings through two KV versions, a live client given the new password,
/// and the broker refusing a wrong one.
#[cfg(feature = "rdkafka")]
async fn kafka_part(secrets: &mut Vec<String>, seen: &mut Vec<String>) {
    use std::time::Duration;
    use vaultpool::kafka::rdkafka::config::ClientConfig;
    use vaultpool::kafka::rdkafka::producer::BaseProducer;
    use vaultpool::kafka::{KafkaSasl, RotatingClient, verifier};

    let bootstrap = kafka().to_owned();
    let user = format!("leak-{}", unique());
    let (p1, p2) = (
        format!("kafka-pw-{}", unique()),
        format!("kafka-pw-{}", unique()),
    );
    secrets.extend([p1.clone(), p2.clone()]);
    kafka_admin(&["upsert-user", &user, &p1]);
    let path = format!("kafka/leak-{}", unique());
    let secret = |pw: &str| kafka_secret(&bootstrap, &user, pw, "SCRAM-SHA-512");
    kv_put(&path, secret(&p1)).await;
    let sasl = KafkaSasl::builder(root_client())
        .secret(KvCredentials::new(&path).poll_interval(Duration::from_secs(1)))
        .verify_with(verifier(ClientConfig::new(), Duration::from_secs(10)))
        .build()
        .await
        .unwrap();
    let producer: RotatingClient<BaseProducer> =
        RotatingClient::new(&sasl, ClientConfig::new(), |c| c.create()).unwrap();
    seen.push(format!(
        "{sasl:?} {:?} {:?} {producer:?}",
        sasl.current(),
        sasl.status()
    ));
    kafka_admin(&["upsert-user", &user, &p2]);
    kv_put(&path, secret(&p2)).await;
    assert!(sasl.check_now().await.unwrap());
    for _ in 0..100 {
        if producer.applied_version() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(producer.applied_version(), 2);
    seen.push(format!(
        "{sasl:?} {:?} {:?} {producer:?}",
        sasl.current(),
        sasl.status()
    ));
    // The old password, now refused by the broker: verification fails, nothing published.
    kv_put(&path, secret(&p1)).await;
    let e = sasl.check_now().await.unwrap_err();
    seen.push(format!("{e} | {e:?} | {:?}", sasl.status()));
    producer.close().await;
    sasl.close().await;
}
