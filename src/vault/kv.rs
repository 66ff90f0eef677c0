//! KV v2: read a secret (data + version), read its metadata, and a TTL cache.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde::Deserialize;
use serde_json::Value;

use super::path::check_segment;
use super::{Call, Client};
use crate::credentials::KvSecret;
use crate::error::{Error, ErrorKind, Result};

/// A KV v2 secret's metadata: cheap to poll for a version change.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KvMetadata {
    /// The newest version.
    pub current_version: u64,
    /// The oldest version kept.
    pub oldest_version: u64,
    /// When the secret was first written (RFC 3339).
    pub created_time: String,
    /// When it was last written (RFC 3339).
    pub updated_time: String,
}

#[derive(Deserialize)]
pub(crate) struct DataBlock {
    data: Option<BTreeMap<String, Value>>,
    metadata: VersionMeta,
}

#[derive(Deserialize)]
struct VersionMeta {
    version: u64,
    #[serde(default)]
    created_time: String,
    #[serde(default)]
    deletion_time: String,
    #[serde(default)]
    destroyed: bool,
}

#[derive(Deserialize)]
pub(crate) struct MetadataBlock {
    current_version: u64,
    #[serde(default)]
    oldest_version: u64,
    #[serde(default)]
    created_time: String,
    #[serde(default)]
    updated_time: String,
}

/// Cache of KV reads, keyed by mount and path. Entries older than the TTL are never
/// served.
pub(crate) struct Cache {
    ttl: Option<Duration>,
    entries: Mutex<HashMap<(String, String), (Instant, KvSecret)>>,
}

impl Cache {
    pub(crate) fn new(ttl: Option<Duration>) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &(String, String)) -> Option<KvSecret> {
        let ttl = self.ttl?;
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some((at, secret)) if at.elapsed() < ttl => Some(secret.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&self, key: (String, String), at: Instant, secret: KvSecret) {
        if self.ttl.is_some() {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries.insert(key, (at, secret));
        }
    }

    fn remove(&self, key: &(String, String)) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(key);
    }
}

impl Client {
    /// Read the newest version of the KV v2 secret at `{mount}/data/{path}`, from the
    /// cache when a read younger than the cache TTL is there.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when there is no secret (or its newest version is
    /// deleted), [`ErrorKind::PermissionDenied`] when the policy does not allow it, and
    /// the transport kinds.
    pub async fn read_kv(&self, mount: &str, path: &str) -> Result<KvSecret> {
        let key = (mount.to_owned(), path.to_owned());
        if let Some(hit) = self.inner.kv_cache.get(&key) {
            tracing::trace!(mount, path, version = hit.version(), "kv cache hit");
            return Ok(hit);
        }
        let (secret, at) = self.fetch_kv(mount, path, None).await?;
        self.inner.kv_cache.put(key, at, secret.clone());
        Ok(secret)
    }

    /// Read one version of a KV v2 secret (never cached).
    ///
    /// # Errors
    /// As [`read_kv`](Self::read_kv).
    pub async fn read_kv_version(&self, mount: &str, path: &str, version: u64) -> Result<KvSecret> {
        Ok(self.fetch_kv(mount, path, Some(version)).await?.0)
    }

    /// Drop a cached KV read so the next [`read_kv`](Self::read_kv) asks Vault.
    pub fn invalidate_kv(&self, mount: &str, path: &str) {
        self.inner
            .kv_cache
            .remove(&(mount.to_owned(), path.to_owned()));
    }

    async fn fetch_kv(
        &self,
        mount: &str,
        path: &str,
        version: Option<u64>,
    ) -> Result<(KvSecret, Instant)> {
        check_segment("the KV mount", mount)?;
        check_segment("the KV path", path)?;
        let mut url_path = format!("{mount}/data/{path}");
        if let Some(v) = version {
            url_path.push_str(&format!("?version={v}"));
        }
        let what = format!("reading KV secret {mount}/{path}");
        let (env, received) = self
            .call::<DataBlock>(Call::get(&url_path))
            .await
            .map_err(|e| e.context(&what))?;
        let (block, _) = env.into_data(&what)?;
        let meta = block.metadata;
        let Some(raw) = block
            .data
            .filter(|_| !meta.destroyed && meta.deletion_time.is_empty())
        else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("{what}: version {} is deleted or destroyed", meta.version),
            ));
        };
        let data = raw
            .into_iter()
            .map(|(k, v)| {
                let s = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, SecretString::from(s))
            })
            .collect();
        tracing::debug!(mount, path, version = meta.version, "read KV secret");
        let secret = KvSecret::new(mount, path, meta.version, meta.created_time, data);
        Ok((secret, received))
    }

    /// Read the metadata of a KV v2 secret (`{mount}/metadata/{path}`): its current
    /// version, without reading any value. Never cached.
    ///
    /// # Errors
    /// As [`read_kv`](Self::read_kv).
    pub async fn read_kv_metadata(&self, mount: &str, path: &str) -> Result<KvMetadata> {
        check_segment("the KV mount", mount)?;
        check_segment("the KV path", path)?;
        let what = format!("reading KV metadata of {mount}/{path}");
        let (env, _) = self
            .call::<MetadataBlock>(Call::get(&format!("{mount}/metadata/{path}")))
            .await
            .map_err(|e| e.context(&what))?;
        let (m, _) = env.into_data(&what)?;
        Ok(KvMetadata {
            current_version: m.current_version,
            oldest_version: m.oldest_version,
            created_time: m.created_time,
            updated_time: m.updated_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(version: u64) -> KvSecret {
        KvSecret::new(
            "secret",
            "app",
            version,
            String::new(),
            [("password".to_string(), SecretString::from("s3cr3t-value"))].into(),
        )
    }

    #[test]
    fn debug_shows_keys_not_values() {
        let d = format!("{:?}", secret(3));
        assert!(d.contains("password") && d.contains('3'), "{d}");
        assert!(!d.contains("s3cr3t"), "{d}");
    }

    #[test]
    fn cache_never_serves_past_ttl() {
        let cache = Cache::new(Some(Duration::from_secs(60)));
        let key = ("secret".to_string(), "app".to_string());
        cache.put(key.clone(), Instant::now(), secret(1));
        assert_eq!(cache.get(&key).unwrap().version(), 1);
        cache.put(
            key.clone(),
            Instant::now() - Duration::from_secs(61),
            secret(2),
        );
        assert!(cache.get(&key).is_none());
    }

    #[test]
    fn disabled_cache_stores_nothing() {
        let cache = Cache::new(None);
        let key = ("secret".to_string(), "app".to_string());
        cache.put(key.clone(), Instant::now(), secret(1));
        assert!(cache.get(&key).is_none());
    }

    #[test]
    fn dot_segments_are_refused() {
        assert!(check_segment("p", "../sys/raw").is_err());
        assert!(check_segment("p", "").is_err());
        assert!(check_segment("p", "a/b").is_ok());
    }
}
