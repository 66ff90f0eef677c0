//! The lease journal against real OpenBao + PostgreSQL: a process holding a pool is
//! killed with SIGKILL again and again (a crash loop); each new process revokes what the
//! killed one held before it issues its own.
#![cfg(feature = "postgres")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use secrecy::ExposeSecret;
use vaultpool::postgres::VaultPgPool;

/// Set for the child process: `<role>\t<journal dir>`.
const CHILD: &str = "VAULTPOOL_JOURNAL_TEST_CHILD";

/// The child: a pool on the role with a journal, one query, then "ready <user>
/// <password>" on stdout, and it waits to be killed. Run only by the test below, as a
/// process of its own (ignored in a normal run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by a_pool_killed_20_times_leaves_no_user_behind"]
async fn journal_child() {
    let Ok(spec) = std::env::var(CHILD) else {
        println!("journal_child runs only as the journal test's child process");
        return;
    };
    let (role, dir) = spec.split_once('\t').unwrap();
    let pool = VaultPgPool::builder(role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_target())
        .max_size(2)
        .lease_journal(dir)
        .build()
        .await
        .unwrap();
    pool.get()
        .await
        .unwrap()
        .query_one("SELECT 1", &[])
        .await
        .unwrap();
    let current = pool.engine().current();
    println!(
        "ready {} {}",
        current.credentials.username,
        current.credentials.password.expose_secret()
    );
    tokio::time::sleep(Duration::from_secs(3600)).await;
}

/// A child process killed (SIGKILL) when dropped, also when the test fails midway.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A crash loop: 20 processes in a row, each holding a pool (1 h leases) and killed with
/// SIGKILL. With the journal, each new process revokes the killed one's lease before it
/// issues its own: when it serves, its user is the role's only one in `pg_roles`, and
/// within 5 s of each start exactly one lease is left under the role. The journal holds no password.
/// Without it, every kill left a user for the lease's hour (20 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_killed_20_times_leaves_no_user_behind() {
    let role = create_role("1h", "1h").await;
    let dir = std::env::temp_dir().join(format!("vaultpool-journal-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let pg = pg_admin("adaptive_immunity").await;
    let (mut users, mut passwords) = (Vec::new(), Vec::new());
    let mut most_alive = 0;
    let started = Instant::now();
    for round in 0..20 {
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "journal_child", "--nocapture"])
            .env(CHILD, format!("{role}\t{}", dir.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().unwrap();
        let ready = tokio::task::spawn_blocking(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .find_map(|l| l.strip_prefix("ready ").map(str::to_owned))
        });
        let line = tokio::time::timeout(Duration::from_secs(60), ready)
            .await
            .unwrap_or_else(|_| panic!("round {round}: the child never got ready"))
            .unwrap()
            .unwrap_or_else(|| panic!("round {round}: the child ended without serving"));
        let (user, password) = line.split_once(' ').unwrap();
        users.push(user.to_owned());
        passwords.push(password.to_owned());
        // The killed one's user was revoked before this one issued its own.
        let alive = roles_alive(&pg, &users).await;
        most_alive = most_alive.max(alive.len());
        assert_eq!(alive, [user.to_owned()], "round {round}: users alive");
        let since = Instant::now();
        loop {
            let leases = leases_of(&role).await;
            let alive = roles_alive(&pg, &users).await;
            if leases.len() == 1 && alive == [user.to_owned()] {
                break;
            }
            assert!(
                since.elapsed() < Duration::from_secs(5),
                "round {round}: 5 s after the start, leases {leases:?}, users alive {alive:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The journal: lease ids and ends, never a password.
        for entry in std::fs::read_dir(&dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            for p in &passwords {
                assert!(!text.contains(p.as_str()), "a password in the journal");
            }
        }
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
    }
    println!(
        "20 processes killed with SIGKILL in {:?}: at most {most_alive} users alive at once",
        started.elapsed()
    );
    // The last one's lease, revoked by one more engine on the journal that closes.
    let pool = VaultPgPool::builder(&role)
        .vault(approle_client("IMMUNE_SYSTEM"))
        .pg_config(pg_target())
        .max_size(1)
        .lease_journal(&dir)
        .build()
        .await
        .unwrap();
    pool.close().await;
    assert!(roles_alive(&pg, &users).await.is_empty());
    assert_leases_gone(&role).await;
    let _ = std::fs::remove_dir_all(&dir);
}
