//! Example 8: Retries and the circuit breaker, against a Vault that is not there.
//!
//! Points a client at a loopback port nobody listens on and shows: the first call
//! retried with backoff and jitter then failing with a transport error; the breaker
//! opening and later calls failing fast without a request; the probe after the cooldown.
//! Then, if VAULT_ADDR is set, the same settings against the live server.
//!
//! `cargo run --example resilience` (add RUST_LOG=vaultpool=info to see each retry).

use std::time::{Duration, Instant};

use vaultpool::vault::{BreakerConfig, Client, RetryConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "vaultpool=warn".into()),
        )
        .init();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut retry = RetryConfig::default();
    retry.max_retries = 3;
    retry.min_delay = Duration::from_millis(100);
    retry.max_delay = Duration::from_secs(1);
    let mut breaker = BreakerConfig::default();
    breaker.failure_threshold = 4;
    breaker.cooldown = Duration::from_secs(2);
    let client = Client::builder()
        .address(format!("http://{dead}"))
        .token("unused")
        .retry(retry)
        .breaker(breaker)
        .build()?;

    println!("Vault at http://{dead} (nothing listens there)\n");
    let call = |what: &'static str| {
        let client = client.clone();
        async move {
            let t = Instant::now();
            let err = client.read_kv("secret", "app").await.unwrap_err();
            println!(
                "{what:<44} -> {:<12} in {:>9.1?}  (breaker open: {})",
                format!("{:?}", err.kind()),
                t.elapsed(),
                client.circuit_open()
            );
            err
        }
    };
    call("1st call: 1 try + 3 retries (100 ms doubling)").await;
    call("2nd call: breaker open, nothing sent").await;
    call("3rd call: still open").await;
    println!("... waiting 2 s (the breaker's cooldown)");
    tokio::time::sleep(Duration::from_secs(2)).await;
    call("4th call: one probe goes through, fails").await;
    let err = call("5th call: open again, fails fast").await;
    println!("\nthe error as a person reads it:\n  {err}");

    if let Ok(addr) = std::env::var("VAULT_ADDR") {
        let live = Client::builder().address(&addr).token("unused").build()?;
        let t = Instant::now();
        let h = live.health().await?;
        println!(
            "\nlive Vault at {addr}: {:?} in {:.1?}",
            h.state,
            t.elapsed()
        );
    }
    Ok(())
}
