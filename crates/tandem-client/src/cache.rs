//! The offline cache: per identity, one JSON file per dataset under the cache directory,
//! replaced atomically (write, fsync, rename) on every save, so a crash leaves either the
//! old or the new state, never half of one. Without a directory it is a map in memory, so
//! that a closed dataset's pending changes are still there when it is opened again.

use crate::limits::SetAside;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use tandem_protocol::{DatasetRef, Record};

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
    /// The edit this value is: every local edit takes the dataset's next version, never one
    /// given out before (also after the key was dropped), so an ack only cleans the edit it
    /// carried.
    #[serde(default)]
    pub version: u64,
    /// Present while the change is set aside: the server refused it for good (or it breaks a
    /// limit the server announced), so `sync` does not send it until the key is edited again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_aside: Option<SetAside>,
    /// The server's clock at the commit that wrote this value, ms since the Unix epoch;
    /// `None` while the value is a local edit the server has not acknowledged yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<i64>,
    /// Who wrote this value: the identity of the server's record, or this client's own for a
    /// local edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified_by: Option<String>,
    /// The device that wrote this value, when it named one (this client's for a local edit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

impl LocalRecord {
    /// A new local edit of a key this copy does not hold.
    pub(crate) fn blank() -> LocalRecord {
        LocalRecord {
            value: None,
            sync_count: 0,
            dirty: false,
            device_last_modified: None,
            version: 0,
            set_aside: None,
            last_modified: None,
            last_modified_by: None,
            device_id: None,
        }
    }

    /// The server's record, clean, with its metadata.
    pub(crate) fn from_server(record: &Record, version: u64) -> LocalRecord {
        let mut local = LocalRecord::blank();
        local.version = version;
        local.take_server(record);
        local
    }

    /// Takes the server's value, version and metadata (the record is clean afterwards only if
    /// the caller says so).
    pub(crate) fn take_server(&mut self, record: &Record) {
        self.value = record.value.clone();
        self.sync_count = record.sync_count;
        self.take_metadata(record);
        self.device_last_modified = record.device_last_modified;
    }

    /// Takes who, when and from which device the server's record was written: the local
    /// value is the server's (the same content, or just taken).
    pub(crate) fn take_metadata(&mut self, record: &Record) {
        self.device_last_modified = record.device_last_modified.or(self.device_last_modified);
        self.last_modified = Some(record.last_modified);
        self.last_modified_by = Some(record.last_modified_by.clone());
        self.device_id = record.device_id.clone();
    }
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

/// One dataset held in this identity's local cache (`Client::cached_datasets`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedDataset {
    pub dataset: DatasetRef,
    /// The highest sync count seen from the server.
    pub sync_count: u64,
    /// Live (not removed) records.
    pub records: usize,
    /// Local changes not yet acknowledged by the server.
    pub pending: usize,
    /// Open on this client now.
    pub open: bool,
}

impl CachedDataset {
    pub(crate) fn of(owner: &str, name: &str, data: &DatasetCache, open: bool) -> CachedDataset {
        CachedDataset {
            dataset: DatasetRef::new(owner, name),
            sync_count: data.sync_count,
            records: data.records.values().filter(|r| r.value.is_some()).count(),
            pending: data.dirty_count(),
            open,
        }
    }
}

pub(crate) struct Cache {
    /// `cache_dir/<identity>`; `None` keeps everything in `memory`.
    dir: Option<PathBuf>,
    memory: parking_lot::Mutex<HashMap<(String, String), DatasetCache>>,
    /// Saves done, for the tests of the background saver.
    #[cfg(test)]
    pub(crate) saves: std::sync::atomic::AtomicUsize,
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

/// The string `component` made this path component from; `None` for a name it cannot have
/// made (a file someone else put there).
fn uncomponent(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Cache {
    pub(crate) fn new(root: Option<&Path>, identity: &str) -> Cache {
        Cache {
            dir: root.map(|r| r.join(component(identity))),
            memory: parking_lot::Mutex::new(HashMap::new()),
            #[cfg(test)]
            saves: std::sync::atomic::AtomicUsize::new(0),
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
            let memory = self.memory.lock();
            let key = (owner.to_owned(), name.to_owned());
            return Ok(memory.get(&key).cloned().unwrap_or_default());
        };
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DatasetCache::default()),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn save(&self, owner: &str, name: &str, data: &DatasetCache) -> std::io::Result<()> {
        #[cfg(test)]
        self.saves.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let Some(path) = self.path(owner, name) else {
            let key = (owner.to_owned(), name.to_owned());
            self.memory.lock().insert(key, data.clone());
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

    /// Every dataset this identity's cache holds, by (owner, name). A file that cannot be
    /// read or decoded is an error: a wipe must not count it as nothing pending.
    pub(crate) fn list(&self) -> std::io::Result<Vec<(String, String, DatasetCache)>> {
        let Some(dir) = &self.dir else {
            let memory = self.memory.lock();
            return Ok(memory
                .iter()
                .map(|((owner, name), data)| (owner.clone(), name.clone(), data.clone()))
                .collect());
        };
        let owners = match std::fs::read_dir(dir) {
            Ok(owners) => owners,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for owner_dir in owners {
            let owner_dir = owner_dir?;
            if !owner_dir.file_type()?.is_dir() {
                continue;
            }
            let Some(owner) = owner_dir.file_name().to_str().and_then(uncomponent) else {
                continue;
            };
            for file in std::fs::read_dir(owner_dir.path())? {
                let file = file?;
                let file_name = file.file_name();
                // Leftover `.json.tmp` files of an interrupted save are not datasets.
                let Some(stem) = file_name.to_str().and_then(|f| f.strip_suffix(".json")) else {
                    continue;
                };
                let Some(name) = uncomponent(stem) else {
                    continue;
                };
                let data = self.load(&owner, &name)?;
                out.push((owner.clone(), name, data));
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        Ok(out)
    }

    /// Deletes everything this identity's cache holds (its directory, or its memory), and
    /// nothing of other identities.
    pub(crate) fn wipe(&self) -> std::io::Result<()> {
        let Some(dir) = &self.dir else {
            self.memory.lock().clear();
            return Ok(());
        };
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
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
                last_modified: Some(7),
                last_modified_by: Some("alice".into()),
                device_id: Some("phone".into()),
            },
        );
        cache.save("bob/x", "a:b", &data).unwrap();
        assert_eq!(cache.load("bob/x", "a:b").unwrap(), data);
        assert_eq!(cache.load("bob", "other").unwrap(), DatasetCache::default());
        // Everything stays inside the cache directory.
        assert_eq!(component("../alice"), "%2E.%2Falice");
        let root = dir.path().join("%2E.%2Falice");
        assert!(root.join("bob%2Fx").join("a%3Ab.json").exists());
        // Listed by the names it was saved under.
        let listed = cache.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].0.as_str(), listed[0].1.as_str()),
            ("bob/x", "a:b")
        );
        assert_eq!(listed[0].2, data);
    }

    #[test]
    fn test_cache_wipe_deletes_one_identity_only() {
        let dir = tempfile::tempdir().unwrap();
        let alice = Cache::new(Some(dir.path()), "alice");
        let bob = Cache::new(Some(dir.path()), "bob");
        let data = DatasetCache {
            sync_count: 1,
            ..DatasetCache::default()
        };
        alice.save("alice", "d", &data).unwrap();
        bob.save("bob", "d", &data).unwrap();
        alice.wipe().unwrap();
        assert!(alice.list().unwrap().is_empty());
        assert_eq!(alice.load("alice", "d").unwrap(), DatasetCache::default());
        assert_eq!(bob.list().unwrap().len(), 1);
        // Wiping what is already gone is fine.
        alice.wipe().unwrap();
    }

    #[test]
    fn test_cache_in_memory_keeps_what_was_saved() {
        let cache = Cache::new(None, "alice");
        let data = DatasetCache {
            sync_count: 2,
            ..DatasetCache::default()
        };
        cache.save("alice", "d", &data).unwrap();
        assert_eq!(cache.load("alice", "d").unwrap(), data);
        assert_eq!(cache.list().unwrap().len(), 1);
        cache.wipe().unwrap();
        assert_eq!(cache.load("alice", "d").unwrap(), DatasetCache::default());
    }

    #[test]
    fn test_cache_component_names_decode_back() {
        for s in ["../alice", "a:b", "eu-west-1:5c1e", "é%"] {
            assert_eq!(uncomponent(&component(s)).as_deref(), Some(s));
        }
        assert_eq!(uncomponent("%zz"), None);
    }
}
