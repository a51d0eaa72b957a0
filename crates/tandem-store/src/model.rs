//! The data model shared by every backend, and the validation every backend runs before it
//! touches the database.

use crate::StoreError;
use std::collections::HashSet;
use std::fmt;
use tandem_protocol::{
    Conflict, DatasetRef, LimitCode, Patch, PatchOp, Record, validate_dataset_name, validate_key,
};

/// The single pool (tenant/app namespace) there is today.
pub const DEFAULT_POOL: &str = "default";

/// The longest identity accepted, in bytes.
pub const MAX_IDENTITY: usize = 256;

/// Which dataset: (pool, owner identity, name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DatasetKey {
    pub pool: String,
    pub owner: String,
    pub name: String,
}

impl DatasetKey {
    pub fn new(pool: impl Into<String>, owner: impl Into<String>, name: impl Into<String>) -> Self {
        DatasetKey {
            pool: pool.into(),
            owner: owner.into(),
            name: name.into(),
        }
    }

    /// The wire form (the pool is implied by the connection).
    pub fn to_ref(&self) -> DatasetRef {
        DatasetRef::new(self.owner.clone(), self.name.clone())
    }

    /// Checks the name against the pattern and the owner against the identity rules.
    pub fn validate(&self) -> Result<(), StoreError> {
        validate_dataset_name(&self.name).map_err(|reason| StoreError::InvalidName {
            name: self.name.clone(),
            reason,
        })?;
        validate_identity(&self.owner)
    }
}

impl fmt::Display for DatasetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.pool, self.owner, self.name)
    }
}

/// Checks a call's dataset and acting identity, as every backend does before any I/O.
pub fn validate_call(dataset: &DatasetKey, actor: &str) -> Result<(), StoreError> {
    dataset.validate()?;
    validate_identity(actor)
}

/// Identities come from tokens; any non-empty string up to 256 bytes without control
/// characters is accepted.
pub fn validate_identity(identity: &str) -> Result<(), StoreError> {
    if identity.is_empty() || identity.len() > MAX_IDENTITY {
        return Err(StoreError::BadRequest(format!(
            "identity must be 1 to {MAX_IDENTITY} bytes"
        )));
    }
    if identity.chars().any(char::is_control) {
        return Err(StoreError::BadRequest(
            "identity must not contain control characters".into(),
        ));
    }
    Ok(())
}

/// A dataset (or the part of it a query asked for) at a sync count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub dataset: DatasetKey,
    pub sync_count: u64,
    pub records: Vec<Record>,
    /// The dataset was deleted (and not re-created since); `sync_count` is the delete's.
    pub deleted: bool,
}

/// An update: patches by `actor`, from `device_id` if the client named one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateRequest {
    pub dataset: DatasetKey,
    pub actor: String,
    pub device_id: Option<String>,
    pub patches: Vec<Patch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// Committed durably at `snapshot.sync_count`; `changed` are the records this update
    /// wrote, `snapshot` the whole dataset after the commit (what subscribers are pushed).
    Committed {
        changed: Vec<Record>,
        snapshot: Snapshot,
    },
    /// Nothing was written: these keys were stale. `sync_count` is the dataset's current one.
    Conflict {
        sync_count: u64,
        conflicts: Vec<Conflict>,
    },
}

/// Configurable limits (the defaults of the data limits are Cognito Sync's) and the store's
/// other settings. A settings section: read from a TOML file through serde, and with the
/// `clap` feature the `tandem serve` flags (the field's doc is its help), so a new limit is
/// one field and its default here.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Datasets one identity may own.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_DATASETS"))]
    pub max_datasets: u64,
    /// Live records in one dataset.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_RECORDS"))]
    pub max_records: u64,
    /// Bytes of keys and values in one dataset.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_DATASET_BYTES"))]
    pub max_dataset_bytes: u64,
    /// Characters in a record key.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_KEY_LENGTH"))]
    pub max_key_length: u64,
    /// Patches in one update.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_PATCHES"))]
    pub max_patches: u64,
    /// Characters in a device id.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_DEVICE_ID_LENGTH"))]
    pub max_device_id_length: u64,
    /// Grants on one dataset name, existing or not.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_GRANTS_PER_DATASET"))]
    pub max_grants_per_dataset: u64,
    /// Grants one owner has made across all its dataset names, existing or not.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_GRANTS_PER_OWNER"))]
    pub max_grants_per_owner: u64,
    /// SQLite only: bytes the write-ahead log file may reach before the writer checkpoints it
    /// and truncates it; the file stays under this plus one group commit.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_SQLITE_WAL_MAX_BYTES"))]
    pub sqlite_wal_max_bytes: u64,
    /// Seconds a commit log entry is kept; compaction deletes older ones.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_COMMIT_LOG_MAX_AGE_SECS"))]
    pub commit_log_max_age_secs: u64,
    /// Commit log entries kept per dataset; compaction deletes the oldest beyond it (at
    /// least one is always kept, so entry ids are never reused).
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_COMMIT_LOG_MAX_ENTRIES_PER_DATASET")
    )]
    pub commit_log_max_entries_per_dataset: u64,
    /// Commit log entries a change stream consumer may hold back from compaction: entries
    /// more than this many below the newest go as retention says even if a consumer has
    /// not acknowledged them (a warning and a count of forced drops say so).
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_COMMIT_LOG_HARD_CAP_ENTRIES")
    )]
    pub commit_log_hard_cap_entries: u64,
    /// Dead letters (events given up on) kept per change stream consumer; the oldest go
    /// beyond it.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_STREAM_DEAD_LETTER_MAX"))]
    pub stream_dead_letter_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_datasets: 20,
            max_records: 1024,
            max_dataset_bytes: 1024 * 1024,
            max_key_length: 1024,
            max_patches: 1024,
            max_device_id_length: 128,
            // A dataset shared with thousands (a live document, a big room) is the point of
            // sharing; the owner's bound is what stops grants on made-up names.
            max_grants_per_dataset: 10_000,
            max_grants_per_owner: 20_000,
            sqlite_wal_max_bytes: 64 * 1024 * 1024,
            commit_log_max_age_secs: 30 * 24 * 60 * 60,
            commit_log_max_entries_per_dataset: 10_000,
            commit_log_hard_cap_entries: 5_000_000,
            stream_dead_letter_max: 100_000,
        }
    }
}

/// A patch that passed validation: a replace always has a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedPatch {
    pub key: String,
    /// `None` for a remove.
    pub value: Option<String>,
    pub sync_count: u64,
    pub device_last_modified: Option<i64>,
}

impl ValidatedPatch {
    /// Whether `current` (the stored record, if any) is the version this patch was based on.
    /// A key that does not exist, or exists only as a tombstone, may be written with sync
    /// count 0 ("I believe it is absent") or with the tombstone's own sync count.
    pub fn matches(&self, current: Option<&Record>) -> bool {
        match current {
            None => self.sync_count == 0,
            Some(r) if r.value.is_none() => self.sync_count == 0 || self.sync_count == r.sync_count,
            Some(r) => self.sync_count == r.sync_count,
        }
    }
}

/// Checks everything about an update that does not need the database: names, keys, patch
/// count, duplicate keys, device id. Backends call this first, then check stored limits.
///
/// Keys, values and device ids must not contain U+0000: PostgreSQL's `text` cannot store it,
/// and every backend refuses the same updates.
pub fn validate_update(
    limits: &Limits,
    request: &UpdateRequest,
) -> Result<Vec<ValidatedPatch>, StoreError> {
    request.dataset.validate()?;
    validate_identity(&request.actor)?;
    if let Some(device) = &request.device_id
        && device.chars().count() as u64 > limits.max_device_id_length
    {
        return Err(StoreError::limit(
            LimitCode::MaxDeviceIdLength,
            limits.max_device_id_length,
            format!(
                "device id longer than {} characters",
                limits.max_device_id_length
            ),
        ));
    }
    if request
        .device_id
        .as_deref()
        .is_some_and(|device| device.contains('\0'))
    {
        return Err(StoreError::BadRequest(
            "device id must not contain the NUL character".into(),
        ));
    }
    if request.patches.is_empty() {
        return Err(StoreError::BadRequest(
            "an update needs at least one patch".into(),
        ));
    }
    if request.patches.len() as u64 > limits.max_patches {
        return Err(StoreError::limit(
            LimitCode::MaxPatches,
            limits.max_patches,
            format!("more than {} patches in one update", limits.max_patches),
        ));
    }
    let mut seen = HashSet::with_capacity(request.patches.len());
    let mut out = Vec::with_capacity(request.patches.len());
    for patch in &request.patches {
        let max_key = usize::try_from(limits.max_key_length).unwrap_or(usize::MAX);
        validate_key(&patch.key, max_key).map_err(|reason| match reason {
            tandem_protocol::NameError::TooLong { .. } => StoreError::limit(
                LimitCode::MaxKeyLength,
                limits.max_key_length,
                format!("key longer than {} characters", limits.max_key_length),
            ),
            other => StoreError::BadRequest(format!("invalid key: {other}")),
        })?;
        if patch.key.contains('\0') {
            return Err(StoreError::BadRequest(
                "invalid key: keys must not contain the NUL character".into(),
            ));
        }
        if !seen.insert(patch.key.as_str()) {
            return Err(StoreError::BadRequest(format!(
                "key `{}` appears twice in one update",
                truncate(&patch.key, 64)
            )));
        }
        let value = match (patch.op, &patch.value) {
            (PatchOp::Replace, Some(v)) if v.contains('\0') => {
                return Err(StoreError::BadRequest(format!(
                    "value of key `{}` must not contain the NUL character",
                    truncate(&patch.key, 64)
                )));
            }
            (PatchOp::Replace, Some(v)) => Some(v.clone()),
            (PatchOp::Replace, None) => {
                return Err(StoreError::BadRequest(format!(
                    "replace of key `{}` needs a string value",
                    truncate(&patch.key, 64)
                )));
            }
            (PatchOp::Remove, _) => None,
        };
        out.push(ValidatedPatch {
            key: patch.key.clone(),
            value,
            sync_count: patch.sync_count,
            device_last_modified: patch.device_last_modified,
        });
    }
    Ok(out)
}

/// Checks a revoke's arguments, the same for every backend: valid names, by the owner.
pub fn validate_revoke(dataset: &DatasetKey, actor: &str, grantee: &str) -> Result<(), StoreError> {
    validate_call(dataset, actor)?;
    validate_identity(grantee)?;
    if actor != dataset.owner {
        return Err(StoreError::forbidden(dataset, actor, "owner"));
    }
    Ok(())
}

/// Checks a grant's arguments, the same for every backend: a revoke's, plus `read` or
/// `write` only, not to the owner.
pub fn validate_grant(
    dataset: &DatasetKey,
    actor: &str,
    grantee: &str,
    access: tandem_protocol::Access,
) -> Result<(), StoreError> {
    validate_revoke(dataset, actor, grantee)?;
    if access == tandem_protocol::Access::Owner {
        return Err(StoreError::BadRequest(
            "access granted must be read or write".into(),
        ));
    }
    if grantee == dataset.owner {
        return Err(StoreError::BadRequest(
            "the owner cannot be granted access to its own dataset".into(),
        ));
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Milliseconds since the Unix epoch, by the server's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The bytes a live record counts against `max_dataset_bytes`: its key and value in UTF-8.
pub fn record_bytes(key: &str, value: &str) -> u64 {
    (key.len() + value.len()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(patches: Vec<Patch>) -> UpdateRequest {
        UpdateRequest {
            dataset: DatasetKey::new(DEFAULT_POOL, "u1", "ds"),
            actor: "u1".into(),
            device_id: None,
            patches,
        }
    }

    #[test]
    fn test_validate_update_rejects_duplicates_and_missing_values() {
        let limits = Limits::default();
        let dup = req(vec![Patch::replace("a", "1", 0), Patch::remove("a", 0)]);
        assert!(matches!(
            validate_update(&limits, &dup),
            Err(StoreError::BadRequest(_))
        ));
        let mut p = Patch::replace("a", "1", 0);
        p.value = None;
        assert!(matches!(
            validate_update(&limits, &req(vec![p])),
            Err(StoreError::BadRequest(_))
        ));
        assert!(matches!(
            validate_update(&limits, &req(vec![])),
            Err(StoreError::BadRequest(_))
        ));
    }

    #[test]
    fn test_validate_update_reports_each_limit() {
        let limits = Limits {
            max_patches: 2,
            max_key_length: 4,
            ..Limits::default()
        };
        let many = req(vec![
            Patch::replace("a", "1", 0),
            Patch::replace("b", "1", 0),
            Patch::replace("c", "1", 0),
        ]);
        assert!(matches!(
            validate_update(&limits, &many),
            Err(StoreError::Limit {
                limit: LimitCode::MaxPatches,
                max: 2,
                ..
            })
        ));
        let long = req(vec![Patch::replace("abcde", "1", 0)]);
        assert!(matches!(
            validate_update(&limits, &long),
            Err(StoreError::Limit {
                limit: LimitCode::MaxKeyLength,
                max: 4,
                ..
            })
        ));
    }

    #[test]
    fn test_patch_matches_tombstones_with_zero_or_their_count() {
        let p = |n| ValidatedPatch {
            key: "k".into(),
            value: Some("v".into()),
            sync_count: n,
            device_last_modified: None,
        };
        let live = Record {
            key: "k".into(),
            value: Some("x".into()),
            sync_count: 5,
            last_modified: 0,
            last_modified_by: "u".into(),
            device_id: None,
            device_last_modified: None,
        };
        let tomb = Record {
            value: None,
            ..live.clone()
        };
        assert!(p(0).matches(None));
        assert!(!p(1).matches(None));
        assert!(p(5).matches(Some(&live)));
        assert!(!p(0).matches(Some(&live)));
        assert!(p(0).matches(Some(&tomb)));
        assert!(p(5).matches(Some(&tomb)));
        assert!(!p(4).matches(Some(&tomb)));
    }
}
