//! What a change stream event looks like: one JSON object per commit log entry (or per
//! dataset in a replay), encoded once and sent as is to every sink.

use serde_json::{Map, Value};
use tandem_store::DatasetKey;
use tandem_store::{LogEntry, LogKind};

/// One event, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The log entry's id; the event's Redis Stream id is `<entry_id>-0`.
    pub entry_id: i64,
    /// Stable across redeliveries: consumers deduplicate on it.
    pub id: String,
    pub json: String,
}

/// A log entry as an event:
/// `{"id","type","pool","owner","dataset","syncCount","actor","deviceId"?,"time", …}` with
/// `records` (as written, `value` null for a removal) for an update, the whole live
/// `records` for a `snapshot` (written by a replay), `grantee` and
/// `access` (null for a revoke) for a grant or revoke, `fromOwner`, `fromName` and `keys`
/// for a merge; a delete has nothing more.
pub fn encode_entry(entry: &LogEntry) -> Event {
    let id = entry.id.to_string();
    let mut object = head(&id, entry.kind.as_str(), &entry.dataset, entry.sync_count);
    object.insert("actor".into(), Value::String(entry.actor.clone()));
    if let Some(device) = &entry.device_id {
        object.insert("deviceId".into(), Value::String(device.clone()));
    }
    object.insert("time".into(), Value::from(entry.server_time));
    let patches: Value = serde_json::from_str(&entry.patches).unwrap_or(Value::Null);
    match entry.kind {
        LogKind::Update | LogKind::Snapshot => {
            object.insert("records".into(), without_before(patches));
        }
        LogKind::Grant | LogKind::Revoke | LogKind::Merge => {
            if let Value::Object(fields) = patches {
                object.extend(fields);
            }
        }
        LogKind::Delete => {}
    }
    Event {
        entry_id: entry.id,
        id,
        json: Value::Object(object).to_string(),
    }
}

fn head(id: &str, kind: &str, dataset: &DatasetKey, sync_count: u64) -> Map<String, Value> {
    let mut object = Map::new();
    object.insert("id".into(), Value::String(id.to_owned()));
    object.insert("type".into(), Value::String(kind.to_owned()));
    object.insert("pool".into(), Value::String(dataset.pool.clone()));
    object.insert("owner".into(), Value::String(dataset.owner.clone()));
    object.insert("dataset".into(), Value::String(dataset.name.clone()));
    object.insert("syncCount".into(), Value::from(sync_count));
    object
}

/// The log keeps each written record's prior version for history; the stream sends what
/// was written only (consumers that want more read `history`).
fn without_before(mut records: Value) -> Value {
    if let Value::Array(items) = &mut records {
        for item in items {
            if let Value::Object(fields) = item {
                fields.remove("before");
            }
        }
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: LogKind, patches: &str) -> LogEntry {
        LogEntry {
            id: 42,
            dataset: DatasetKey::new("pool", "alice", "notes"),
            kind,
            sync_count: 7,
            actor: "bob".into(),
            device_id: Some("phone".into()),
            server_time: 1_767_225_600_000,
            patches: patches.into(),
        }
    }

    #[test]
    fn test_update_event_carries_records_without_before_images() {
        let e = encode_entry(&entry(
            LogKind::Update,
            r#"[{"key":"a","value":"1","syncCount":7,"before":{"value":"0","syncCount":3}}]"#,
        ));
        assert_eq!(e.id, "42");
        let v: Value = serde_json::from_str(&e.json).unwrap();
        assert_eq!(v["type"], "update");
        assert_eq!(v["owner"], "alice");
        assert_eq!(v["dataset"], "notes");
        assert_eq!(v["syncCount"], 7);
        assert_eq!(v["deviceId"], "phone");
        assert_eq!(v["records"][0]["value"], "1");
        assert!(v["records"][0].get("before").is_none());
    }

    #[test]
    fn test_grant_event_carries_grantee_and_access() {
        let e = encode_entry(&entry(
            LogKind::Grant,
            r#"{"grantee":"carol","access":"read"}"#,
        ));
        let v: Value = serde_json::from_str(&e.json).unwrap();
        assert_eq!(v["type"], "grant");
        assert_eq!(v["grantee"], "carol");
        assert_eq!(v["access"], "read");
        assert!(v.get("records").is_none());
    }
}
