//! OpenBao HA: a 3-node integrated-raft cluster on loopback (facts: INFRA.md §5). The
//! active node is killed with SIGKILL while a VaultPgPool, given every node's address,
//! serves queries and rotates its credentials.
#![cfg(feature = "postgres")]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use vaultpool::Generation;

struct Node {
    child: Option<Child>,
    addr: String,
}

struct Cluster {
    nodes: Vec<Node>,
    root_token: String,
    dir: PathBuf,
}

async fn get_json(url: &str) -> Option<(u16, serde_json::Value)> {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.unwrap_or_default()))
}

async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let t = Instant::now();
    while !check().await {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Cluster {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("vaultpool-ha-{}", unique()));
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let mut nodes = Vec::new();
        for (i, (api, cluster)) in ports.iter().enumerate() {
            let data = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&data).unwrap();
            let joins: String = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (p, _))| {
                    format!(
                        "  retry_join {{\n    leader_api_addr = \"http://127.0.0.1:{p}\"\n  }}\n"
                    )
                })
                .collect();
            let config = format!(
                "storage \"raft\" {{\n  path = \"{}\"\n  node_id = \"n{i}\"\n  performance_multiplier = 1\n{joins}}}\n\
                 listener \"tcp\" {{\n  address = \"127.0.0.1:{api}\"\n  cluster_address = \"127.0.0.1:{cluster}\"\n  tls_disable = true\n}}\n\
                 api_addr = \"http://127.0.0.1:{api}\"\ncluster_addr = \"https://127.0.0.1:{cluster}\"\n",
                data.display()
            );
            let file = dir.join(format!("n{i}.hcl"));
            std::fs::write(&file, config).unwrap();
            let log = std::fs::File::create(dir.join(format!("n{i}.log"))).unwrap();
            let child = Command::new(var("VAULTPOOL_BAO_BIN"))
                .args(["server", &format!("-config={}", file.display())])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            nodes.push(Node {
                child: Some(child),
                addr: format!("http://127.0.0.1:{api}"),
            });
        }
        for n in &nodes {
            let url = format!("{}/v1/sys/health", n.addr);
            wait_for("node listening", Duration::from_secs(20), async || {
                get_json(&url).await.is_some()
            })
            .await;
        }
        let (key, root_token) = init_vault(&nodes[0].addr).await;
        let unseal = async |addr: &str| {
            reqwest::Client::new()
                .put(format!("{addr}/v1/sys/unseal"))
                .json(&serde_json::json!({ "key": key }))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false)
        };
        assert!(unseal(&nodes[0].addr).await);
        let leader = format!("{}/v1/sys/health", nodes[0].addr);
        wait_for("n0 active", Duration::from_secs(30), async || {
            get_json(&leader).await.is_some_and(|(s, _)| s == 200)
        })
        .await;
        // Promote new servers quickly (default stabilization is 10 s).
        vault_write(
            &nodes[0].addr,
            &root_token,
            reqwest::Method::POST,
            "sys/storage/raft/autopilot/configuration",
            serde_json::json!({"server_stabilization_time": "1s", "cleanup_dead_servers": false}),
        )
        .await;
        // Followers join through retry_join once unsealed (retried while they join).
        for n in &nodes[1..] {
            let health = format!("{}/v1/sys/health", n.addr);
            wait_for("follower unsealed", Duration::from_secs(60), async || {
                let sealed = get_json(&health)
                    .await
                    .is_none_or(|(_, h)| h["sealed"].as_bool() != Some(false));
                if sealed {
                    unseal(&n.addr).await;
                    return false;
                }
                true
            })
            .await;
        }
        let raft = format!("{}/v1/sys/storage/raft/configuration", nodes[0].addr);
        let token = root_token.clone();
        wait_for("three raft voters", Duration::from_secs(60), async || {
            let r = reqwest::Client::new()
                .get(&raft)
                .header("X-Vault-Token", &token)
                .send()
                .await;
            let Ok(r) = r else { return false };
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            v["data"]["config"]["servers"]
                .as_array()
                .is_some_and(|s| s.len() == 3 && s.iter().all(|n| n["voter"] == true))
        })
        .await;
        let c = Self {
            nodes,
            root_token,
            dir,
        };
        c.configure().await;
        c
    }

    async fn configure(&self) {
        // Leases that cannot be renewed past 16 s: a rotation every ~11 s.
        configure_database_engine(&self.nodes[0].addr, &self.root_token, "app", "16s", "16s").await;
    }

    fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_active_node_loses_no_query_and_rotation_goes_on_on_the_new_leader() {
    let t0 = Instant::now();
    let mut cluster = Cluster::start().await;
    let started_in = t0.elapsed();
    let mut breaker = vaultpool::vault::BreakerConfig::default();
    breaker.cooldown = Duration::from_secs(1);
    let client = vaultpool::vault::Client::builder()
        .addresses(cluster.addresses())
        .token(&cluster.root_token)
        .request_timeout(Duration::from_secs(2))
        .breaker(breaker)
        .build()
        .unwrap();
    let pool = small_pool("app", client.clone()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let workers = spawn_load(&pool, 4, stop.clone());

    // 16 s leases that cannot be renewed further: a rotation every ~11 s. Kill the active
    // node (n0) between two of them.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = pool.status().lease;
    cluster.kill(0);
    let killed = Instant::now();
    let mut new_leader = None;
    let mut moved_to = None;
    while killed.elapsed() < Duration::from_secs(35) {
        if moved_to.is_none() && client.address() != cluster.nodes[0].addr.clone() + "/" {
            moved_to = Some((killed.elapsed(), client.address().to_owned()));
        }
        if new_leader.is_none() {
            for n in &cluster.nodes[1..] {
                if get_json(&format!("{}/v1/sys/health", n.addr))
                    .await
                    .is_some_and(|(s, _)| s == 200)
                {
                    new_leader = Some((killed.elapsed(), n.addr.clone()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let LoadReport {
        ok, failed, errors, ..
    } = workers.await.unwrap();
    let after = pool.status().lease;
    let (elected_after, leader) = new_leader.expect("no new leader elected");
    println!(
        "HA (cluster up in {started_in:?}): active node killed at generation {}; client moved \
         to {moved_to:?}; new leader {leader} after {elected_after:?}; then {} rotations and \
         {} renewals on the new leader (generation {}); {ok} queries, {} failed",
        before.generation.0,
        after.rotations - before.rotations,
        after.renewals - before.renewals,
        after.generation.0,
        failed
    );
    assert_eq!(failed, 0, "{errors:?}");
    assert!(moved_to.is_some(), "the client never left the dead node");
    assert!(
        after.rotations >= before.rotations + 2,
        "rotation did not go on after the failover: {after:?}"
    );
    assert!(after.generation.0 >= before.generation.0 + 2);
    assert_ne!(after.generation, Generation(1));
    pool.close().await;
    // Every lease was revoked through the surviving nodes.
    let list = reqwest::Client::new()
        .request(
            reqwest::Method::from_bytes(b"LIST").unwrap(),
            format!("{leader}/v1/sys/leases/lookup/database/creds/app/"),
        )
        .header("X-Vault-Token", &cluster.root_token)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status().as_u16(), 404, "leases left behind");
}
