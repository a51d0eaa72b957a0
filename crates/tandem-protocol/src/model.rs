//! The data that frames carry: dataset references, records, patches, conflicts, grants.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A client-chosen request id, echoed in the reply: a string or a non-negative integer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    Num(u64),
    Str(String),
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestId::Num(n) => write!(f, "{n}"),
            RequestId::Str(s) => f.write_str(s),
        }
    }
}

/// Names a dataset. In requests `owner` may be left out and means the caller; in server
/// frames it is always filled in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DatasetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub name: String,
}

impl DatasetRef {
    pub fn new(owner: impl Into<String>, name: impl Into<String>) -> Self {
        DatasetRef {
            owner: Some(owner.into()),
            name: name.into(),
        }
    }

    /// A reference to one of the caller's own datasets.
    pub fn own(name: impl Into<String>) -> Self {
        DatasetRef {
            owner: None,
            name: name.into(),
        }
    }
}

/// One record as the server stores it. A removed record is a tombstone: `value` is null.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub key: String,
    pub value: Option<String>,
    /// The dataset's sync count at the commit that last changed this record. A lean record
    /// leaves it out when it equals its frame's; read as 0 until `lean::expand` fills it in.
    #[serde(default)]
    pub sync_count: u64,
    /// Server time of that commit, milliseconds since the Unix epoch.
    pub last_modified: i64,
    /// The identity that made that change. A lean record leaves it out when it is the
    /// dataset's owner; read as empty until `lean::expand` fills it in.
    #[serde(default)]
    pub last_modified_by: String,
    /// The device that made that change, when the client named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The client's clock when it made the change, milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_last_modified: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchOp {
    Replace,
    Remove,
}

/// One change in an `update`. `sync_count` is the record's sync count the client last saw
/// (0 for a key it believes does not exist).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Patch {
    pub op: PatchOp,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub sync_count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_last_modified: Option<i64>,
}

impl Patch {
    pub fn replace(key: impl Into<String>, value: impl Into<String>, sync_count: u64) -> Self {
        Patch {
            op: PatchOp::Replace,
            key: key.into(),
            value: Some(value.into()),
            sync_count,
            device_last_modified: None,
        }
    }

    pub fn remove(key: impl Into<String>, sync_count: u64) -> Self {
        Patch {
            op: PatchOp::Remove,
            key: key.into(),
            value: None,
            sync_count,
            device_last_modified: None,
        }
    }
}

/// A key whose patch was stale, with the server's current record (null if the key never
/// existed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub key: String,
    pub server: Option<Record>,
}

/// What an identity may do with a dataset. `Owner` is never granted; it is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Read,
    Write,
    Owner,
}

impl Access {
    pub const fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Access> {
        match s {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            "owner" => Some(Access::Owner),
            _ => None,
        }
    }

    pub const fn can_write(self) -> bool {
        matches!(self, Access::Write | Access::Owner)
    }
}

/// What kind of commit a `history` entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitKind {
    Update,
    /// The owner deleted the dataset.
    Delete,
    Grant,
    Revoke,
    /// A guest identity's dataset moved here when it was merged into the owner.
    Merge,
    /// A kind this build does not know (a newer server's). Never sent.
    #[serde(other)]
    Unknown,
}

/// One commit in a `history` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// The commit log entry's id: increasing, and what `history`'s `before` pages by.
    pub id: i64,
    pub kind: CommitKind,
    /// The dataset's sync count after an update, delete or merge; its current one at a grant
    /// or revoke (they do not change it).
    pub sync_count: u64,
    /// Who committed it (the owner for a delete, grant, revoke or merge).
    pub actor: String,
    /// The device the update named, if it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Server time of the commit, milliseconds since the Unix epoch.
    pub time: i64,
    /// The keys an update, delete or merge changed, ordered by key (absent where the log
    /// does not say: a grant, a revoke, an entry from before the server recorded them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
    /// The identity a grant or revoke was about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grantee: Option<String>,
    /// The access a grant gave (absent for a revoke).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
}

/// One row of a `datasets` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatasetInfo {
    pub dataset: DatasetRef,
    pub sync_count: u64,
    /// Live (non-removed) records.
    pub records: u64,
    /// Bytes of keys and values of live records, as counted against the size limit.
    pub bytes: u64,
    /// The caller's access: `owner`, `write` or `read`.
    pub access: Access,
    /// Server time of the last commit, milliseconds since the Unix epoch.
    pub last_modified: i64,
}

/// Why a dataset name or a key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong { max: usize },
    BadCharacter,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => f.write_str("must not be empty"),
            NameError::TooLong { max } => write!(f, "longer than {max} characters"),
            NameError::BadCharacter => f.write_str("has a character outside [a-zA-Z0-9_.:-]"),
        }
    }
}

/// The longest dataset name the contract allows.
pub const MAX_DATASET_NAME: usize = 128;

/// A dataset name is 1-128 characters of `[a-zA-Z0-9_.:-]`. (Owner identities come from
/// tokens and follow the store's identity rule instead: 1-256 bytes, no control characters.)
pub fn validate_dataset_name(name: &str) -> Result<(), NameError> {
    validate_pattern(name, MAX_DATASET_NAME)
}

pub(crate) fn validate_pattern(name: &str, max: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > max {
        return Err(NameError::TooLong { max });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
    {
        return Err(NameError::BadCharacter);
    }
    Ok(())
}

/// A record key is 1 to `max` characters (Unicode scalar values) of any kind.
pub fn validate_key(key: &str, max: usize) -> Result<(), NameError> {
    if key.is_empty() {
        return Err(NameError::Empty);
    }
    // Counting chars is O(n); skip it when the byte length already fits.
    if key.len() > max && key.chars().count() > max {
        return Err(NameError::TooLong { max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_dataset_name_pattern_and_length() {
        assert!(validate_dataset_name("settings").is_ok());
        assert!(validate_dataset_name("a.b:c-d_e9").is_ok());
        assert_eq!(validate_dataset_name(""), Err(NameError::Empty));
        assert_eq!(validate_dataset_name("a b"), Err(NameError::BadCharacter));
        assert_eq!(validate_dataset_name("é"), Err(NameError::BadCharacter));
        assert!(validate_dataset_name(&"x".repeat(128)).is_ok());
        assert_eq!(
            validate_dataset_name(&"x".repeat(129)),
            Err(NameError::TooLong { max: 128 })
        );
    }

    #[test]
    fn test_key_length_counts_characters() {
        assert!(validate_key("é".repeat(1024).as_str(), 1024).is_ok());
        assert!(validate_key("é".repeat(1025).as_str(), 1024).is_err());
        assert_eq!(validate_key("", 1024), Err(NameError::Empty));
    }

    #[test]
    fn test_record_uses_camel_case_and_null_tombstones() {
        let r = Record {
            key: "k".into(),
            value: None,
            sync_count: 3,
            last_modified: 1,
            last_modified_by: "u".into(),
            device_id: None,
            device_last_modified: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"key":"k","value":null,"syncCount":3,"lastModified":1,"lastModifiedBy":"u"})
        );
    }
}
