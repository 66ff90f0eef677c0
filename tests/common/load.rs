//! The one query-load harness: `tasks` workers running `SELECT count(*) FROM items`
//! through a pool until told to stop, counting what succeeded and what failed, and the
//! slowest query (checkout included). [`TestPool`] is the little every pool flavour offers the harness and
//! the scenarios (`VaultPool` covers deadpool-postgres; sqlx is a pool of its own).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vaultpool::Generation;
use vaultpool::lease::Engine;

use super::*;

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the harness and the scenarios need of a pool.
pub trait TestPool: Clone + Send + Sync + 'static {
    fn engine(&self) -> &Engine;
    fn rotate(&self) -> BoxFut<'_, vaultpool::Result<Generation>>;
    /// Check out a connection and run `SELECT count(*) FROM items`; the error names
    /// whether the checkout or the query failed.
    fn query(&self) -> BoxFut<'_, std::result::Result<i64, String>>;
    fn close(&self) -> BoxFut<'_, ()>;
}

#[cfg(feature = "postgres")]
impl TestPool for vaultpool::postgres::VaultPgPool {
    fn engine(&self) -> &Engine {
        vaultpool::postgres::VaultPgPool::engine(self)
    }
    fn rotate(&self) -> BoxFut<'_, vaultpool::Result<Generation>> {
        Box::pin(vaultpool::postgres::VaultPgPool::rotate(self))
    }
    fn query(&self) -> BoxFut<'_, std::result::Result<i64, String>> {
        Box::pin(async move {
            let client = self.get().await.map_err(|e| format!("get: {e}"))?;
            let row = client
                .query_one("SELECT count(*) FROM items", &[])
                .await
                .map_err(|e| {
                    format!(
                        "query (gen {}): {e} ({})",
                        client.generation().0,
                        std::error::Error::source(&e)
                            .map(ToString::to_string)
                            .unwrap_or_default()
                    )
                })?;
            Ok(row.get(0))
        })
    }
    fn close(&self) -> BoxFut<'_, ()> {
        Box::pin(vaultpool::postgres::VaultPgPool::close(self))
    }
}

#[cfg(feature = "sqlx")]
impl TestPool for vaultpool::sqlx::VaultSqlxPool {
    fn engine(&self) -> &Engine {
        vaultpool::sqlx::VaultSqlxPool::engine(self)
    }
    fn rotate(&self) -> BoxFut<'_, vaultpool::Result<Generation>> {
        Box::pin(vaultpool::sqlx::VaultSqlxPool::rotate(self))
    }
    fn query(&self) -> BoxFut<'_, std::result::Result<i64, String>> {
        Box::pin(async move {
            let mut conn = self.acquire().await.map_err(|e| format!("acquire: {e}"))?;
            vaultpool::sqlx::sqlx::query_scalar("SELECT count(*) FROM items")
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| format!("query: {e}"))
        })
    }
    fn close(&self) -> BoxFut<'_, ()> {
        Box::pin(vaultpool::sqlx::VaultSqlxPool::close(self))
    }
}

/// What a load saw.
#[derive(Debug)]
pub struct LoadReport {
    /// Queries that succeeded.
    pub ok: u64,
    /// Queries that failed.
    pub failed: u64,
    /// The first ten errors.
    pub errors: Vec<String>,
    /// The slowest query (checkout included) that succeeded or failed.
    pub slowest: Duration,
}

/// `tasks` query loops until `stop`, a short pause between queries.
pub fn spawn_load<P: TestPool>(
    pool: &P,
    tasks: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<LoadReport> {
    let pool = pool.clone();
    tokio::spawn(async move {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let slowest_ns = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let (pool, stop, ok, failed, slowest_ns, errors) = (
                pool.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                slowest_ns.clone(),
                errors.clone(),
            );
            handles.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let result = pool.query().await;
                    slowest_ns.fetch_max(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    match result {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            let mut errs = errors.lock().unwrap();
                            if errs.len() < 10 {
                                errs.push(e);
                            }
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        let errors = errors.lock().unwrap().clone();
        LoadReport {
            ok: ok.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
            errors,
            slowest: Duration::from_nanos(slowest_ns.load(Ordering::Relaxed)),
        }
    })
}
