//! The offline cache: per identity, one JSON file per dataset under the cache directory,
//! replaced atomically (write, fsync, rename) on every change, so a crash leaves either the
//! old or the new state, never half of one.

use crate::limits::SetAside;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A record as this device knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalRecord {
    /// The local value; `None` means removed.
    pub value: Option<String>,
    /// The server sync count this value is based on (0: the key was never seen on the server).
    pub sync_count: u64,
    /// Changed locally and not yet acknowledged by the server.
    pub dirty: bool,
    /// This device's clock at the local change, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_last_modified: Option<i64>,
    /// Bumped on every local edit; an ack only cleans the edit it carried.
    #[serde(default)]
    pub version: u64,
    /// Present while the change is set aside: the server refused it for good (or it breaks a
    /// limit the server announced), so `sync` does not send it until the key is edited again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_aside: Option<SetAside>,
}

/// A dataset as this device knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatasetCache {
    /// The highest dataset sync count seen from the server.
    pub sync_count: u64,
    pub records: BTreeMap<String, LocalRecord>,
}

impl DatasetCache {
    pub fn dirty_count(&self) -> usize {
        self.records.values().filter(|r| r.dirty).count()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Cache {
    /// `cache_dir/<identity>`; `None` keeps everything in memory.
    dir: Option<PathBuf>,
}

/// Makes any string safe as one path component (identities and owners are arbitrary).
fn component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.starts_with('.') {
        out.replace_range(0..1, "%2E");
    }
    out
}

impl Cache {
    pub(crate) fn new(root: Option<&Path>, identity: &str) -> Cache {
        Cache {
            dir: root.map(|r| r.join(component(identity))),
        }
    }

    fn path(&self, owner: &str, name: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| {
            d.join(component(owner))
                .join(format!("{}.json", component(name)))
        })
    }

    pub(crate) fn load(&self, owner: &str, name: &str) -> std::io::Result<DatasetCache> {
        let Some(path) = self.path(owner, name) else {
            return Ok(DatasetCache::default());
        };
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DatasetCache::default()),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn save(&self, owner: &str, name: &str, data: &DatasetCache) -> std::io::Result<()> {
        let Some(path) = self.path(owner, name) else {
            return Ok(());
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(data).map_err(std::io::Error::other)?;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cache_round_trips_and_escapes_names() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(Some(dir.path()), "../alice");
        let mut data = DatasetCache {
            sync_count: 4,
            ..DatasetCache::default()
        };
        data.records.insert(
            "k".into(),
            LocalRecord {
                value: Some("v".into()),
                sync_count: 4,
                dirty: true,
                device_last_modified: Some(1),
                version: 2,
                // Set aside survives a restart: it is not sent again after one either.
                set_aside: Some(SetAside {
                    code: tandem_protocol::ErrorCode::TooLarge,
                    limit: Some(tandem_protocol::LimitCode::MaxKeyLength),
                    max: Some(8),
                    message: "key longer than 8 characters".into(),
                }),
            },
        );
        cache.save("bob/x", "a:b", &data).unwrap();
        assert_eq!(cache.load("bob/x", "a:b").unwrap(), data);
        assert_eq!(cache.load("bob", "other").unwrap(), DatasetCache::default());
        // Everything stays inside the cache directory.
        assert_eq!(component("../alice"), "%2E.%2Falice");
        let root = dir.path().join("%2E.%2Falice");
        assert!(root.join("bob%2Fx").join("a%3Ab.json").exists());
    }
}
