//! `vaultpool-proxy`: a PostgreSQL-protocol sidecar on rotating Vault credentials.
//!
//! ```text
//! vaultpool-proxy --config /etc/vaultpool/proxy.toml
//! ```
//!
//! The configuration file is described in `vaultpool::proxy::config`; Vault comes from
//! the usual variables (`VAULT_ADDR`, and `VAULT_AUTH_METHOD` with its settings). Logs go
//! to stderr (`RUST_LOG`, default `info`). SIGTERM or SIGINT: stop accepting, let open
//! sessions finish (up to the shutdown timeout), revoke every lease, exit 0.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use vaultpool::proxy::{Config, Proxy};
use vaultpool::vault::Client;

fn usage() -> ExitCode {
    eprintln!(
        "usage: vaultpool-proxy --config <file.toml>\n       (or VAULTPOOL_PROXY_CONFIG=<file.toml>)"
    );
    ExitCode::from(2)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let mut path: Option<PathBuf> = std::env::var_os("VAULTPOOL_PROXY_CONFIG").map(Into::into);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => match args.next() {
                Some(p) => path = Some(p.into()),
                None => return usage(),
            },
            "--help" | "-h" => {
                usage();
                return ExitCode::SUCCESS;
            }
            _ => return usage(),
        }
    }
    let Some(path) = path else { return usage() };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vaultpool-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let vault = match Client::from_env() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vaultpool-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let proxy = match Proxy::start(config, vault).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vaultpool-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    // One line tests and scripts wait for.
    println!(
        "vaultpool-proxy ready: tcp {} http {}",
        proxy.tcp_addr().map_or("-".into(), |a| a.to_string()),
        proxy.http_addr().map_or("-".into(), |a| a.to_string())
    );
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            stop.cancel();
        });
    }
    proxy.run(stop).await;
    ExitCode::SUCCESS
}
