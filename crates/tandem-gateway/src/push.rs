//! One commit's push as a node shares it between its local subscribers: the whole-dataset
//! frame (lean encoding, as the broker carried it), the same frame in the full encoding for
//! sessions without `lean` (made once, on first use), and the commit's `delta` frame. A
//! subscriber's outbox holds these by reference; merged deltas of a slow subscriber are made
//! from the commits' records when its writer takes them.

use axum::extract::ws::Utf8Bytes;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use tandem_protocol::{Encoding, Record, ServerFrame};
use tandem_store::DatasetKey;

pub(crate) struct Push {
    pub dataset: Arc<DatasetKey>,
    pub sync_count: u64,
    /// The `dataset` frame, lean encoding.
    lean: Utf8Bytes,
    /// The `dataset` frame, full encoding.
    full: OnceLock<Utf8Bytes>,
    /// The `delta` frame from `sync_count - 1`, when the committing node sent one.
    delta: Option<Utf8Bytes>,
    /// The delta's records, read back for merging.
    delta_records: OnceLock<Vec<Record>>,
}

impl std::fmt::Debug for Push {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Push")
            .field("dataset", &self.dataset)
            .field("sync_count", &self.sync_count)
            .finish_non_exhaustive()
    }
}

impl Push {
    pub fn new(
        dataset: Arc<DatasetKey>,
        sync_count: u64,
        lean: Utf8Bytes,
        delta: Option<Utf8Bytes>,
    ) -> Push {
        Push {
            dataset,
            sync_count,
            lean,
            full: OnceLock::new(),
            delta,
            delta_records: OnceLock::new(),
        }
    }

    /// The whole-dataset frame in a session's encoding.
    pub fn whole(&self, lean: bool) -> Utf8Bytes {
        if lean {
            return self.lean.clone();
        }
        self.full
            .get_or_init(|| match ServerFrame::from_json(self.lean.as_str()) {
                Ok(frame) => Utf8Bytes::from(frame.encode(Encoding::Full)),
                // Frames come from this code base; if one does not read back, the lean
                // bytes are still a correct frame for any reader that fills in fields.
                Err(_) => self.lean.clone(),
            })
            .clone()
    }

    /// Bytes of the whole frame (lean): what a merged delta is measured against.
    pub fn whole_len(&self) -> usize {
        self.lean.len()
    }

    pub fn delta(&self) -> Option<&Utf8Bytes> {
        self.delta.as_ref()
    }

    fn delta_records(&self) -> &[Record] {
        self.delta_records.get_or_init(|| {
            match self
                .delta
                .as_ref()
                .map(|d| ServerFrame::from_json(d.as_str()))
            {
                Some(Ok(ServerFrame::Delta { records, .. })) => records,
                _ => Vec::new(),
            }
        })
    }
}

/// Encodes the lean `dataset` push of a dataset at a sync count.
pub(crate) fn whole_frame(dataset: &DatasetKey, sync_count: u64, records: Vec<Record>) -> String {
    ServerFrame::Dataset {
        dataset: dataset.to_ref(),
        sync_count,
        records,
    }
    .encode(Encoding::Lean)
}

/// Encodes the `delta` push of one commit: `records` (ordered by key) are what it wrote.
pub(crate) fn delta_frame(dataset: &DatasetKey, sync_count: u64, records: Vec<Record>) -> String {
    ServerFrame::Delta {
        dataset: dataset.to_ref(),
        base_sync_count: sync_count.saturating_sub(1),
        sync_count,
        records,
    }
    .encode(Encoding::Lean)
}

/// One `delta` frame for consecutive commits `parts` (each one's base the previous one's
/// sync count) applied on `base`: the newest version of every key they wrote.
pub(crate) fn merge(base: u64, parts: &[Arc<Push>]) -> Utf8Bytes {
    let Some(last) = parts.last() else {
        return Utf8Bytes::from_static("");
    };
    let mut newest: BTreeMap<&str, &Record> = BTreeMap::new();
    for part in parts {
        for record in part.delta_records() {
            newest.insert(&record.key, record);
        }
    }
    let frame = ServerFrame::Delta {
        dataset: last.dataset.to_ref(),
        base_sync_count: base,
        sync_count: last.sync_count,
        records: newest.into_values().cloned().collect(),
    };
    Utf8Bytes::from(frame.encode(Encoding::Lean))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, value: Option<&str>, sync_count: u64) -> Record {
        Record {
            key: key.into(),
            value: value.map(Into::into),
            sync_count,
            last_modified: 10 + sync_count as i64,
            last_modified_by: "u1".into(),
            device_id: None,
            device_last_modified: None,
        }
    }

    fn push(n: u64, changed: Vec<Record>, all: Vec<Record>) -> Arc<Push> {
        let key = Arc::new(DatasetKey::new("default", "u1", "ds"));
        Arc::new(Push::new(
            key.clone(),
            n,
            whole_frame(&key, n, all).into(),
            Some(delta_frame(&key, n, changed).into()),
        ))
    }

    #[test]
    fn test_push_merges_deltas_newest_wins_tombstones_kept() {
        let parts = [
            push(
                5,
                vec![record("a", Some("1"), 5), record("b", Some("x"), 5)],
                vec![],
            ),
            push(6, vec![record("a", Some("2"), 6)], vec![]),
            push(
                7,
                vec![record("b", None, 7), record("c", Some("3"), 7)],
                vec![],
            ),
        ];
        let merged = merge(4, &parts);
        let frame = ServerFrame::from_json(merged.as_str()).unwrap();
        assert_eq!(
            frame,
            ServerFrame::Delta {
                dataset: tandem_protocol::DatasetRef::new("u1", "ds"),
                base_sync_count: 4,
                sync_count: 7,
                records: vec![
                    record("a", Some("2"), 6),
                    record("b", None, 7),
                    record("c", Some("3"), 7),
                ],
            }
        );
    }

    #[test]
    fn test_push_full_encoding_is_made_from_the_lean_frame() {
        let all = vec![record("a", Some("1"), 3), record("b", Some("2"), 5)];
        let p = push(5, vec![record("b", Some("2"), 5)], all.clone());
        let full = p.whole(false);
        assert!(
            full.as_str()
                .contains(r#""syncCount":5,"lastModified":15,"lastModifiedBy":"u1""#)
        );
        assert_eq!(
            ServerFrame::from_json(full.as_str()).unwrap(),
            ServerFrame::from_json(p.whole(true).as_str()).unwrap()
        );
        assert!(p.whole(true).len() < full.len());
    }
}
