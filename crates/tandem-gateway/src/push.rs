//! One commit's push as a node shares it between its local subscribers: the whole-dataset
//! frame (lean encoding, as the broker carried it), the same frame in the full encoding for
//! sessions without `lean` (made once, on first use), and the commit's `delta` frame, a
//! separate shared [`Delta`] so that a slow subscriber's chain of pending deltas holds only
//! the deltas, not every commit's whole frame. Merged deltas are made from the deltas'
//! records when the subscriber's writer takes them.

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
    delta: Option<Arc<Delta>>,
}

/// One commit's `delta` frame.
pub(crate) struct Delta {
    pub sync_count: u64,
    pub frame: Utf8Bytes,
    /// The frame's records, read back for merging (`None`: it did not read back).
    records: OnceLock<Option<Vec<Record>>>,
}

impl Delta {
    fn records(&self) -> Option<&[Record]> {
        self.records
            .get_or_init(|| match ServerFrame::from_json(self.frame.as_str()) {
                Ok(ServerFrame::Delta { records, .. }) => Some(records),
                _ => None,
            })
            .as_deref()
    }
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
            delta: delta.map(|frame| {
                Arc::new(Delta {
                    sync_count,
                    frame,
                    records: OnceLock::new(),
                })
            }),
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

    pub fn delta(&self) -> Option<&Arc<Delta>> {
        self.delta.as_ref()
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
/// sync count) applied on `base`: the newest version of every key they wrote. `None` when a
/// part does not read back (then only the whole frame is right).
pub(crate) fn merge(dataset: &DatasetKey, base: u64, parts: &[Arc<Delta>]) -> Option<Utf8Bytes> {
    let last = parts.last()?;
    let mut newest: BTreeMap<&str, &Record> = BTreeMap::new();
    for part in parts {
        for record in part.records()? {
            newest.insert(&record.key, record);
        }
    }
    let frame = ServerFrame::Delta {
        dataset: dataset.to_ref(),
        base_sync_count: base,
        sync_count: last.sync_count,
        records: newest.into_values().cloned().collect(),
    };
    Some(Utf8Bytes::from(frame.encode(Encoding::Lean)))
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

    fn parts_key() -> DatasetKey {
        DatasetKey::new("default", "u1", "ds")
    }

    fn push(n: u64, changed: Vec<Record>, all: Vec<Record>) -> Arc<Push> {
        let key = Arc::new(parts_key());
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
        let parts: Vec<_> = parts.iter().map(|p| p.delta().unwrap().clone()).collect();
        let merged = merge(&parts_key(), 4, &parts).unwrap();
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

    #[test]
    fn test_push_merge_of_a_delta_that_does_not_read_back_is_none() {
        let bad = Arc::new(Push::new(
            Arc::new(parts_key()),
            5,
            "p5".into(),
            Some("not a frame".into()),
        ));
        assert!(merge(&parts_key(), 4, &[bad.delta().unwrap().clone()]).is_none());
    }
}
