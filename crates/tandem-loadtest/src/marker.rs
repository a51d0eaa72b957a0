//! The marker records that let a subscriber tell which writes a push contains without
//! parsing the whole dataset.
//!
//! Writer `i` of a dataset owns the key `lt<i>`; every update it sends replaces that key
//! with `<seq>:<scheduled_unix_nanos>`. The filler record that pads a document to its size
//! is `zpad` (keys are ordered, so it comes after every marker and a scan can stop early)
//! and its value is plain `x`s, so no marker pattern can appear inside it.

/// The filler record's key.
pub const PAD_KEY: &str = "zpad";

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

/// Finds marker records in a `dataset` or `snapshot` frame's text and calls `found(writer
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
    use tandem_protocol::{DatasetRef, Record, ServerFrame};

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
    fn test_marker_scan_stops_at_want_and_skips_lookalikes() {
        let text = r#"{"records":[{"key":"ltx","value":"1:1"},{"key":"lt1","value":"2:3"},{"key":"lt2","value":"4:5"}]}"#;
        let mut seen = Vec::new();
        assert_eq!(scan(text, 1, |i, s| seen.push((i, s))), 1);
        assert_eq!(seen, [(1, 2)]);
        assert_eq!(scan(r#"{"type":"dataset","records":[]}"#, 1, |_, _| {}), 0);
    }
}
