//! The stack's Kafka broker (tansu): started on first use, SASL secrets, broker-side admin.

use super::*;

/// The stack with its Kafka broker (built and started on first use).
pub fn kafka() -> &'static str {
    static UP: OnceLock<String> = OnceLock::new();
    UP.get_or_init(|| {
        let has_kafka = stack()
            .get("KAFKA_BOOTSTRAP")
            .is_some_and(|addr| std::net::TcpStream::connect(addr).is_ok());
        if !has_kafka {
            let status = Command::new("bash")
                .arg(repo().join("scripts/stack.sh"))
                .args(["up", "--kafka"])
                .status()
                .unwrap();
            assert!(status.success(), "scripts/stack.sh up --kafka failed");
        }
        let env =
            std::fs::read_to_string(format!("{}/stack.env", var("VAULTPOOL_STACK_DIR"))).unwrap();
        env.lines()
            .find_map(|l| l.strip_prefix("KAFKA_BOOTSTRAP="))
            .expect("KAFKA_BOOTSTRAP in the env file")
            .to_owned()
    })
}

/// The KV data of Kafka SASL settings for the stack's broker (plaintext SASL on loopback).
pub fn kafka_secret(
    bootstrap: &str,
    user: &str,
    password: &str,
    mechanism: &str,
) -> serde_json::Value {
    serde_json::json!({
        "bootstrap_servers": bootstrap,
        "sasl_username": user,
        "sasl_password": password,
        "sasl_mechanism": mechanism,
        "security_protocol": "SASL_PLAINTEXT",
    })
}

/// Run scripts/kafka_admin.py (broker-side admin over the Kafka protocol).
pub fn kafka_admin(args: &[&str]) -> String {
    let dir = var("VAULTPOOL_STACK_DIR");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -a; . {dir}/stack.env; set +a; exec python3 {} \"$@\"",
            repo().join("scripts/kafka_admin.py").display()
        ))
        .arg("kafka_admin")
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() || args[0] == "check",
        "kafka_admin {}: {}",
        args[0],
        String::from_utf8_lossy(&out.stderr)
    );
    text
}
