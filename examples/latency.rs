//! Measure the client's latency against a running Vault: AppRole login, KV read (cache
//! off), database creds issue, lease renew and revoke — median, min and max of 20 each.
//!
//! `scripts/demo.sh latency` runs it against the local stack.

use std::time::{Duration, Instant};

use vaultpool::vault::{ClientBuilder, RetryConfig};

fn stats(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{:>7.2} {:>7.2} {:>7.2}",
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(*samples.last().unwrap())
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    const N: usize = 20;
    let role = std::env::var("VAULTPOOL_ROLE").unwrap_or_else(|_| "immune-readwrite".into());
    let builder = ClientBuilder::from_env()?
        .kv_cache_ttl(Duration::ZERO)
        .retry(RetryConfig::default());

    let mut login = Vec::new();
    for _ in 0..N {
        let client = builder.clone().build()?;
        let t = Instant::now();
        client.login().await?;
        login.push(t.elapsed());
    }
    let client = builder.build()?;
    client.login().await?;

    let mut kv = Vec::new();
    for _ in 0..N {
        let t = Instant::now();
        client.read_kv("secret", "immune/postgres").await?;
        kv.push(t.elapsed());
    }
    let (mut issue, mut renew, mut revoke) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..N {
        let t = Instant::now();
        let creds = client.database_creds("database", &role).await?;
        issue.push(t.elapsed());
        let t = Instant::now();
        client
            .renew_lease(&creds.lease.id, Some(Duration::from_secs(3600)))
            .await?;
        renew.push(t.elapsed());
        let t = Instant::now();
        client.revoke_lease(&creds.lease.id).await?;
        revoke.push(t.elapsed());
    }
    println!("operation (ms, n={N})         min  median     max");
    println!("AppRole login (new client) {}", stats(login));
    println!("KV v2 read                 {}", stats(kv));
    println!("database/creds/{role:<11} {}", stats(issue));
    println!("sys/leases/renew           {}", stats(renew));
    println!("sys/leases/revoke          {}", stats(revoke));
    Ok(())
}
