//! The lean record encoding (the `lean` feature): a record in a server frame leaves out what
//! the frame already says. Two rules, the same for every frame that carries records
//! (`snapshot`, `dataset`, `delta`, `changes`, `read_at`, `ack`, `conflict`):
//!
//! - `syncCount` is left out when it equals the frame's `syncCount`;
//! - `lastModifiedBy` is left out when it is the dataset's owner.
//!
//! (`deviceId` and `deviceLastModified` are left out when absent in both encodings.) A reader
//! fills them back in from the frame; `ServerFrame::from_json` does it with [`expand`]. A
//! record's real sync count is never 0 and a real identity is never empty, so a missing field
//! is never mistaken for a present one.

use crate::frame::ServerFrame;
use crate::model::{Conflict, DatasetRef, Record, RequestId};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

/// Fills in the fields lean records left out, from the frame's sync count and owner. A frame
/// in the full encoding is left as it is.
pub fn expand(frame: &mut ServerFrame) {
    let (dataset, sync_count, records, conflicts) = match frame {
        ServerFrame::Snapshot {
            dataset,
            sync_count,
            records,
            ..
        }
        | ServerFrame::Dataset {
            dataset,
            sync_count,
            records,
        }
        | ServerFrame::Delta {
            dataset,
            sync_count,
            records,
            ..
        }
        | ServerFrame::Changes {
            dataset,
            sync_count,
            records,
            ..
        }
        | ServerFrame::ReadAt {
            dataset,
            sync_count,
            records,
            ..
        } => (&*dataset, *sync_count, Some(records), None),
        ServerFrame::Ack {
            dataset: Some(dataset),
            sync_count: Some(sync_count),
            records,
            ..
        } => (&*dataset, *sync_count, records.as_mut(), None),
        ServerFrame::Conflict {
            dataset,
            sync_count,
            conflicts,
            ..
        } => (&*dataset, *sync_count, None, Some(conflicts)),
        _ => return,
    };
    let owner = dataset.owner.as_deref().unwrap_or_default();
    let fill = |r: &mut Record| {
        if r.sync_count == 0 {
            r.sync_count = sync_count;
        }
        if r.last_modified_by.is_empty() {
            r.last_modified_by = owner.to_owned();
        }
    };
    if let Some(records) = records {
        records.iter_mut().for_each(fill);
    }
    if let Some(conflicts) = conflicts {
        conflicts
            .iter_mut()
            .filter_map(|c| c.server.as_mut())
            .for_each(fill);
    }
}

/// The frame as JSON with lean records; frames without records as in the full encoding.
pub(crate) fn to_json(frame: &ServerFrame) -> String {
    let lean = match frame {
        ServerFrame::Snapshot {
            id,
            dataset,
            sync_count,
            since,
            records,
        } => LeanFrame::Snapshot {
            id,
            dataset,
            sync_count: *sync_count,
            since: *since,
            records: Records::new(records, dataset, *sync_count),
        },
        ServerFrame::Dataset {
            dataset,
            sync_count,
            records,
        } => LeanFrame::Dataset {
            dataset,
            sync_count: *sync_count,
            records: Records::new(records, dataset, *sync_count),
        },
        ServerFrame::Delta {
            dataset,
            base_sync_count,
            sync_count,
            records,
        } => LeanFrame::Delta {
            dataset,
            base_sync_count: *base_sync_count,
            sync_count: *sync_count,
            records: Records::new(records, dataset, *sync_count),
        },
        ServerFrame::Changes {
            id,
            dataset,
            sync_count,
            records,
        } => LeanFrame::Changes {
            id,
            dataset,
            sync_count: *sync_count,
            records: Records::new(records, dataset, *sync_count),
        },
        ServerFrame::ReadAt {
            id,
            dataset,
            sync_count,
            records,
        } => LeanFrame::ReadAt {
            id,
            dataset,
            sync_count: *sync_count,
            records: Records::new(records, dataset, *sync_count),
        },
        ServerFrame::Ack {
            id,
            dataset: Some(dataset),
            sync_count: Some(sync_count),
            records,
        } => LeanFrame::Ack {
            id,
            dataset,
            sync_count: *sync_count,
            records: records
                .as_deref()
                .map(|r| Records::new(r, dataset, *sync_count)),
        },
        ServerFrame::Conflict {
            id,
            dataset,
            sync_count,
            conflicts,
        } => LeanFrame::Conflict {
            id,
            dataset,
            sync_count: *sync_count,
            conflicts: Conflicts {
                conflicts,
                owner: dataset.owner.as_deref().unwrap_or_default(),
                sync_count: *sync_count,
            },
        },
        other => return other.to_json(),
    };
    // Serialising these types cannot fail: every map key is a string.
    serde_json::to_string(&lean).unwrap_or_default()
}

/// The record-carrying server frames, field for field as `ServerFrame` writes them (same tag
/// and order), with lean records.
#[derive(Serialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
enum LeanFrame<'a> {
    Snapshot {
        id: &'a RequestId,
        dataset: &'a DatasetRef,
        sync_count: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        records: Records<'a>,
    },
    Dataset {
        dataset: &'a DatasetRef,
        sync_count: u64,
        records: Records<'a>,
    },
    Delta {
        dataset: &'a DatasetRef,
        base_sync_count: u64,
        sync_count: u64,
        records: Records<'a>,
    },
    Ack {
        id: &'a RequestId,
        dataset: &'a DatasetRef,
        sync_count: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        records: Option<Records<'a>>,
    },
    Conflict {
        id: &'a RequestId,
        dataset: &'a DatasetRef,
        sync_count: u64,
        conflicts: Conflicts<'a>,
    },
    Changes {
        id: &'a RequestId,
        dataset: &'a DatasetRef,
        sync_count: u64,
        records: Records<'a>,
    },
    ReadAt {
        id: &'a RequestId,
        dataset: &'a DatasetRef,
        sync_count: u64,
        records: Records<'a>,
    },
}

struct Records<'a> {
    records: &'a [Record],
    owner: &'a str,
    sync_count: u64,
}

impl<'a> Records<'a> {
    fn new(records: &'a [Record], dataset: &'a DatasetRef, sync_count: u64) -> Self {
        Records {
            records,
            owner: dataset.owner.as_deref().unwrap_or_default(),
            sync_count,
        }
    }
}

impl Serialize for Records<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.records.len()))?;
        for record in self.records {
            seq.serialize_element(&LeanRecord {
                record,
                owner: self.owner,
                sync_count: self.sync_count,
            })?;
        }
        seq.end()
    }
}

struct LeanRecord<'a> {
    record: &'a Record,
    owner: &'a str,
    sync_count: u64,
}

impl Serialize for LeanRecord<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.record;
        let mut map = s.serialize_map(None)?;
        // `key` then `value` first, as in the full encoding.
        map.serialize_entry("key", &r.key)?;
        map.serialize_entry("value", &r.value)?;
        if r.sync_count != self.sync_count {
            map.serialize_entry("syncCount", &r.sync_count)?;
        }
        map.serialize_entry("lastModified", &r.last_modified)?;
        if r.last_modified_by != self.owner {
            map.serialize_entry("lastModifiedBy", &r.last_modified_by)?;
        }
        if let Some(device) = &r.device_id {
            map.serialize_entry("deviceId", device)?;
        }
        if let Some(time) = r.device_last_modified {
            map.serialize_entry("deviceLastModified", &time)?;
        }
        map.end()
    }
}

struct Conflicts<'a> {
    conflicts: &'a [Conflict],
    owner: &'a str,
    sync_count: u64,
}

impl Serialize for Conflicts<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.conflicts.len()))?;
        for c in self.conflicts {
            seq.serialize_element(&LeanConflict {
                key: &c.key,
                server: c.server.as_ref().map(|record| LeanRecord {
                    record,
                    owner: self.owner,
                    sync_count: self.sync_count,
                }),
            })?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct LeanConflict<'a> {
    key: &'a str,
    server: Option<LeanRecord<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Encoding;

    fn record(key: &str, value: Option<&str>, sync_count: u64, by: &str) -> Record {
        Record {
            key: key.into(),
            value: value.map(Into::into),
            sync_count,
            last_modified: 1_767_225_600_000,
            last_modified_by: by.into(),
            device_id: None,
            device_last_modified: None,
        }
    }

    fn frames() -> Vec<ServerFrame> {
        let dataset = DatasetRef::new("alice", "groceries");
        let mut with_device = record("eggs", Some("12"), 8, "bob");
        with_device.device_id = Some("phone".into());
        with_device.device_last_modified = Some(5);
        let records = vec![
            with_device,
            record("milk", Some("2"), 3, "alice"),
            record("salt", None, 8, "alice"),
        ];
        vec![
            ServerFrame::Snapshot {
                id: RequestId::Num(2),
                dataset: dataset.clone(),
                sync_count: 8,
                since: Some(2),
                records: records.clone(),
            },
            ServerFrame::Dataset {
                dataset: dataset.clone(),
                sync_count: 8,
                records: records.clone(),
            },
            ServerFrame::Delta {
                dataset: dataset.clone(),
                base_sync_count: 7,
                sync_count: 8,
                records: records.clone(),
            },
            ServerFrame::Changes {
                id: RequestId::Str("c".into()),
                dataset: dataset.clone(),
                sync_count: 8,
                records: records.clone(),
            },
            ServerFrame::ReadAt {
                id: RequestId::Str("r".into()),
                dataset: dataset.clone(),
                sync_count: 8,
                records: records.clone(),
            },
            ServerFrame::Ack {
                id: RequestId::Num(4),
                dataset: Some(dataset.clone()),
                sync_count: Some(8),
                records: Some(records.clone()),
            },
            ServerFrame::Conflict {
                id: RequestId::Num(5),
                dataset,
                sync_count: 8,
                conflicts: vec![
                    Conflict {
                        key: "milk".into(),
                        server: Some(records[1].clone()),
                    },
                    Conflict {
                        key: "salt".into(),
                        server: Some(records[2].clone()),
                    },
                    Conflict {
                        key: "none".into(),
                        server: None,
                    },
                ],
            },
            ServerFrame::Deleted {
                dataset: DatasetRef::new("alice", "x"),
                sync_count: 3,
            },
        ]
    }

    #[test]
    fn test_lean_frames_read_back_equal_to_the_full_ones() {
        for frame in frames() {
            let lean = frame.encode(Encoding::Lean);
            let full = frame.encode(Encoding::Full);
            assert_eq!(ServerFrame::from_json(&lean).unwrap(), frame, "{lean}");
            assert_eq!(ServerFrame::from_json(&full).unwrap(), frame, "{full}");
            // The same top-level fields, only records shrink.
            let keys = |s: &str| {
                let v: serde_json::Value = serde_json::from_str(s).unwrap();
                v.as_object().unwrap().keys().cloned().collect::<Vec<_>>()
            };
            assert_eq!(keys(&lean), keys(&full));
        }
    }

    #[test]
    fn test_lean_record_leaves_out_what_the_frame_says() {
        let frame = &frames()[2];
        assert_eq!(
            frame.encode(Encoding::Lean),
            concat!(
                r#"{"type":"delta","dataset":{"owner":"alice","name":"groceries"},"#,
                r#""baseSyncCount":7,"syncCount":8,"records":["#,
                r#"{"key":"eggs","value":"12","lastModified":1767225600000,"lastModifiedBy":"bob","deviceId":"phone","deviceLastModified":5},"#,
                r#"{"key":"milk","value":"2","syncCount":3,"lastModified":1767225600000},"#,
                r#"{"key":"salt","value":null,"lastModified":1767225600000}]}"#
            )
        );
    }
}
