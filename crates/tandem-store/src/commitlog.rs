//! The commit log: every commit (an update that wrote, a delete, a grant, a revoke, a
//! dataset moved by a merge) appends one entry in the same transaction as the commit, so
//! the log never misses a commit and never holds one that did not happen. Hooks, the change
//! stream and history read it; compaction keeps it within the retention settings.
//!
//! What an entry holds is decided here once; each backend writes and reads the rows.

use crate::DatasetKey;
use serde::Serialize;
use tandem_protocol::{Access, Record};

/// What kind of commit an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogKind {
    Update,
    Delete,
    Grant,
    Revoke,
    /// A dataset written by a merge, on its target (the guest's copy is logged as a delete).
    Merge,
    /// A dataset's live records as they are, appended by a replay (`Store::log_snapshot`)
    /// for the change stream; it changes nothing.
    Snapshot,
}

impl LogKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LogKind::Update => "update",
            LogKind::Delete => "delete",
            LogKind::Grant => "grant",
            LogKind::Revoke => "revoke",
            LogKind::Merge => "merge",
            LogKind::Snapshot => "snapshot",
        }
    }

    pub fn parse(s: &str) -> Option<LogKind> {
        Some(match s {
            "update" => LogKind::Update,
            "delete" => LogKind::Delete,
            "grant" => LogKind::Grant,
            "revoke" => LogKind::Revoke,
            "merge" => LogKind::Merge,
            "snapshot" => LogKind::Snapshot,
            _ => return None,
        })
    }
}

/// One commit as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Store-wide and increasing: a consumer resumes after the last id it handled.
    pub id: i64,
    pub dataset: DatasetKey,
    pub kind: LogKind,
    /// The dataset's sync count after an update, delete or merge; its current one (0 if it
    /// never existed) at a grant or revoke.
    pub sync_count: u64,
    pub actor: String,
    pub device_id: Option<String>,
    /// Milliseconds since the epoch, by the server's clock.
    pub server_time: i64,
    /// JSON: for an update, the records as written (`[{"key","value","syncCount",
    /// "deviceLastModified"}]`, `value` null for a remove); for a delete, `[]`; for a grant
    /// or revoke, `{"grantee","access"}` (`access` null for a revoke); for a merge,
    /// `{"fromOwner","fromName"}`; for a snapshot, the live records as an update's.
    pub patches: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoggedRecord<'a> {
    key: &'a str,
    value: Option<&'a str>,
    sync_count: u64,
    device_last_modified: Option<i64>,
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serialising plain structs of strings and numbers cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// An update's patches as applied: the records it wrote, as stored.
pub(crate) fn records_json(records: &[Record]) -> String {
    let logged: Vec<LoggedRecord<'_>> = records
        .iter()
        .map(|r| LoggedRecord {
            key: &r.key,
            value: r.value.as_deref(),
            sync_count: r.sync_count,
            device_last_modified: r.device_last_modified,
        })
        .collect();
    to_json(&logged)
}

/// A grant's (`Some`) or revoke's (`None`) patches.
pub(crate) fn grant_json(grantee: &str, access: Option<Access>) -> String {
    #[derive(Serialize)]
    struct Grant<'a> {
        grantee: &'a str,
        access: Option<&'a str>,
    }
    to_json(&Grant {
        grantee,
        access: access.as_ref().map(|a| a.as_str()),
    })
}

/// A merged copy's patches: where it came from.
pub(crate) fn merge_json(from_owner: &str, from_name: &str) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Merge<'a> {
        from_owner: &'a str,
        from_name: &'a str,
    }
    to_json(&Merge {
        from_owner,
        from_name,
    })
}

pub(crate) const DELETE_JSON: &str = "[]";

/// How often a store compacts its log.
pub(crate) const COMPACT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
