//! The marker records that let a subscriber tell which writes a push contains without
//! parsing the whole dataset.
//!
//! Writer `i` of a dataset owns the key `lt<i>`; every update it sends replaces that key
//! with `<seq>:<scheduled_unix_nanos>`. The filler records that pad a document to its size
//! are `zpad` (one) or `zpad0000`, `zpad0001`, … (several; keys are ordered, so they come
//! after every marker) and their values are plain `x`s, so no marker pattern can appear
//! inside them.
//!
//! The scan works on every frame that carries records, whole (`snapshot`, `dataset`) or
//! `delta`, in the full or the lean encoding: a record always starts with its `key` and then
//! its `value`. A `delta` carries only the keys that changed, which is enough: each write
//! rewrites its writer's marker, so a delta covering a write shows that writer's marker at
//! (at least) that write's seq; a conflated delta keeps the newest version of each key.

/// The filler record's key when there is one.
pub const PAD_KEY: &str = "zpad";

/// The keys of `n` filler records.
pub fn pad_keys(n: usize) -> Vec<String> {
    match n {
        1 => vec![PAD_KEY.to_owned()],
        n => (0..n).map(|i| format!("{PAD_KEY}{i:04}")).collect(),
    }
}

/// The marker key of writer `index`.
pub fn key(index: usize) -> String {
    format!("lt{index}")
}

/// A marker value.
pub fn value(seq: u64, scheduled_unix_nanos: u64) -> String {
    format!("{seq}:{scheduled_unix_nanos}")
}

const RECORD_START: &str = "{\"key\":\"lt";
const VALUE_START: &str = "\",\"value\":\"";

/// Finds marker records in a `dataset`, `delta` or `snapshot` frame's text and calls `found(writer
/// index, seq)` for each, stopping after `want` of them. Returns how many it found.
pub fn scan(text: &str, want: usize, mut found: impl FnMut(usize, u64)) -> usize {
    let mut rest = text;
    let mut count = 0;
    while count < want {
        let Some(at) = rest.find(RECORD_START) else {
            break;
        };
        rest = &rest[at + RECORD_START.len()..];
        let (index, after) = leading_number(rest);
        let Some(index) = index else { continue };
        let Some(after) = after.strip_prefix(VALUE_START) else {
            continue;
        };
        let (seq, after) = leading_number(after);
        rest = after;
        let (Some(seq), Ok(index)) = (seq, usize::try_from(index)) else {
            continue;
        };
        found(index, seq);
        count += 1;
    }
    count
}

fn leading_number(s: &str) -> (Option<u64>, &str) {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, rest) = s.split_at(end);
    (digits.parse().ok(), rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_protocol::{DatasetRef, Encoding, Record, ServerFrame};

    fn record(key: &str, value: &str) -> Record {
        Record {
            key: key.into(),
            value: Some(value.into()),
            sync_count: 9,
            last_modified: 1,
            last_modified_by: "lt-x-w0".into(),
            device_id: None,
            device_last_modified: None,
        }
    }

    #[test]
    fn test_marker_scan_finds_every_writer_in_a_real_push() {
        let frame = ServerFrame::Dataset {
            dataset: DatasetRef::new("lt-x-w0", "lt-x-fan"),
            sync_count: 9,
            records: vec![
                record(&key(0), &value(17, 1_700_000_000_000_000_000)),
                record(&key(12), &value(3, 5)),
                record(PAD_KEY, &"x".repeat(100)),
            ],
        }
        .to_json();
        let mut seen = Vec::new();
        assert_eq!(scan(&frame, 2, |i, s| seen.push((i, s))), 2);
        assert_eq!(seen, [(0, 17), (12, 3)]);
    }

    #[test]
    fn test_marker_scan_reads_a_lean_delta() {
        // A conflated delta of two commits: writer 3's newest marker and a filler, lean
        // (the marker's count is the frame's, its author the owner: both left out).
        let mut by_owner = record(&key(3), &value(41, 1_700_000_000_000_000_000));
        by_owner.last_modified_by = "lt-x-w0".into();
        by_owner.sync_count = 12;
        let mut other = record(&key(7), &value(5, 9));
        other.last_modified_by = "lt-x-g0-u7".into();
        other.sync_count = 11;
        let frame = ServerFrame::Delta {
            dataset: DatasetRef::new("lt-x-w0", "lt-x-room0"),
            base_sync_count: 10,
            sync_count: 12,
            records: vec![by_owner, other, record("zpad0003", &"x".repeat(50))],
        };
        let text = frame.encode(Encoding::Lean);
        assert!(text.starts_with(r#"{"type":"delta""#), "{text}");
        assert!(
            text.contains(r#"{"key":"lt3","value":"41:1700000000000000000","lastModified""#),
            "not lean: {text}"
        );
        let mut seen = Vec::new();
        assert_eq!(scan(&text, 8, |i, s| seen.push((i, s))), 2);
        assert_eq!(seen, [(3, 41), (7, 5)]);
        // The same frame in the full encoding reads the same.
        let mut full = Vec::new();
        scan(&frame.encode(Encoding::Full), 8, |i, s| full.push((i, s)));
        assert_eq!(full, seen);
    }

    #[test]
    fn test_marker_pad_keys_sort_after_the_markers() {
        assert_eq!(pad_keys(1), ["zpad"]);
        let keys = pad_keys(19);
        assert_eq!(keys.len(), 19);
        assert_eq!(keys[0], "zpad0000");
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert!(key(999) < keys[0]);
    }

    #[test]
    fn test_marker_scan_stops_at_want_and_skips_lookalikes() {
        let text = r#"{"records":[{"key":"ltx","value":"1:1"},{"key":"lt1","value":"2:3"},{"key":"lt2","value":"4:5"}]}"#;
        let mut seen = Vec::new();
        assert_eq!(scan(text, 1, |i, s| seen.push((i, s))), 1);
        assert_eq!(seen, [(1, 2)]);
        assert_eq!(scan(r#"{"type":"dataset","records":[]}"#, 1, |_, _| {}), 0);
    }
}
