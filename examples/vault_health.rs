//! Example 7: A Vault health check for monitoring: prints one line and exits 0 (active or
//! standby), 1 (sealed, uninitialized, DR secondary) or 2 (unreachable) — the exit codes
//! Nagios-style checks expect.
//!
//! `VAULT_ADDR=… cargo run --example vault_health` (no token needed).

use std::process::ExitCode;

use vaultpool::vault::{Client, ServerState};

#[tokio::main]
async fn main() -> ExitCode {
    // sys/health needs no token; the builder still wants an auth method.
    let addr = std::env::var("VAULT_ADDR").unwrap_or_else(|_| "http://127.0.0.1:8200".into());
    let client = match Client::builder()
        .address(&addr)
        .token("unused")
        .max_retries(0)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            println!("CRITICAL: {e}");
            return ExitCode::from(2);
        }
    };
    let started = std::time::Instant::now();
    match client.health().await {
        Ok(h) => {
            let took = started.elapsed();
            let line = format!(
                "{:?} (HTTP {}, version {}, cluster {}) in {took:.1?}",
                h.state,
                h.status,
                h.version,
                h.cluster_name.as_deref().unwrap_or("-")
            );
            if h.state.can_serve() {
                println!("OK: vault {line}");
                ExitCode::SUCCESS
            } else {
                let warn = matches!(h.state, ServerState::Sealed | ServerState::Uninitialized);
                println!("{}: vault {line}", if warn { "WARNING" } else { "UNKNOWN" });
                ExitCode::from(1)
            }
        }
        Err(e) => {
            println!("CRITICAL: {e}");
            ExitCode::from(2)
        }
    }
}
