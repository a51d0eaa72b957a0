//! The server's write limits as this client knows them, and what they mean for local changes:
//! which change can never be stored (refused when it is made, or set aside when it was
//! queued before the limits were known), and how pending changes are split into updates the
//! server takes (`max_patches`, `max_frame_bytes`). Never stuck: one change the server cannot
//! take must not hold up the others.

use serde::{Deserialize, Serialize};
use tandem_protocol::{
    ClientFrame, DatasetRef, ErrorCode, LimitCode, Patch, RequestId, WriteLimits,
};

/// The server's limits on an update, as last known: announced in `ready.limits`
/// (docs/PROTOCOL.md §3), or learnt from the `max` of the first error that names one (a
/// server that does not announce them). `None`: not known. Kept while offline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Characters (Unicode scalar values) in a key.
    pub max_key_length: Option<u64>,
    /// Patches in one update.
    pub max_patches: Option<u64>,
    /// Live records in one dataset.
    pub max_records: Option<u64>,
    /// UTF-8 bytes of the keys and values of one dataset.
    pub max_dataset_bytes: Option<u64>,
    pub max_device_id_length: Option<u64>,
    /// Bytes in one frame sent to the server.
    pub max_frame_bytes: Option<u64>,
}

impl Limits {
    /// What a `ready` announced replaces what was known (a zero is no limit to go by).
    pub(crate) fn announce(&mut self, limits: &WriteLimits) {
        let set = |field: &mut Option<u64>, value: u64| {
            if value >= 1 {
                *field = Some(value);
            }
        };
        set(&mut self.max_key_length, limits.max_key_length);
        set(&mut self.max_patches, limits.max_patches);
        set(&mut self.max_records, limits.max_records);
        set(&mut self.max_dataset_bytes, limits.max_dataset_bytes);
        set(&mut self.max_device_id_length, limits.max_device_id_length);
        set(&mut self.max_frame_bytes, limits.max_frame_bytes);
    }

    /// An error named `limit` with its value: remember it. Returns whether that changed what
    /// was known (then the refused update is worth splitting or checking again).
    pub(crate) fn learn(&mut self, limit: LimitCode, max: u64) -> bool {
        let field = match limit {
            LimitCode::MaxKeyLength => &mut self.max_key_length,
            LimitCode::MaxPatches => &mut self.max_patches,
            LimitCode::MaxRecords => &mut self.max_records,
            LimitCode::MaxDatasetBytes => &mut self.max_dataset_bytes,
            LimitCode::MaxDeviceIdLength => &mut self.max_device_id_length,
            LimitCode::MaxFrameBytes => &mut self.max_frame_bytes,
            _ => return false,
        };
        if max < 1 || *field == Some(max) {
            return false;
        }
        *field = Some(max);
        true
    }

    /// The known limit that a change of `key` to `value` breaks on its own, whatever else the
    /// dataset holds: the server would refuse it for good.
    pub(crate) fn breaks(
        &self,
        dataset: &DatasetRef,
        device_id: Option<&str>,
        key: &str,
        value: Option<&str>,
    ) -> Option<SetAside> {
        if let Some(max) = self.max_key_length
            && key.chars().count() as u64 > max
        {
            return Some(SetAside::local(
                LimitCode::MaxKeyLength,
                max,
                format!("key longer than {max} characters"),
            ));
        }
        let value = value?;
        if let Some(max) = self.max_dataset_bytes
            && (key.len() + value.len()) as u64 > max
        {
            return Some(SetAside::local(
                LimitCode::MaxDatasetBytes,
                max,
                format!("key and value larger than the {max} bytes a dataset may hold"),
            ));
        }
        if let Some(max) = self.max_frame_bytes {
            let patch = Patch {
                device_last_modified: Some(i64::MAX),
                ..Patch::replace(key, value, u64::MAX)
            };
            if frame_bytes(dataset, device_id, &[patch]) as u64 > max {
                return Some(SetAside::local(
                    LimitCode::MaxFrameBytes,
                    max,
                    format!("an update with this value is larger than the {max} bytes of a frame"),
                ));
            }
        }
        None
    }
}

/// Bytes of an update frame carrying `patches`, with the longest request id there is.
pub(crate) fn frame_bytes(
    dataset: &DatasetRef,
    device_id: Option<&str>,
    patches: &[Patch],
) -> usize {
    ClientFrame::Update {
        id: RequestId::Num(u64::MAX),
        dataset: dataset.clone(),
        device_id: device_id.map(str::to_owned),
        patches: patches.to_vec(),
    }
    .to_json()
    .len()
}

/// What one more patch adds to an update frame: its JSON and a comma.
pub(crate) fn patch_bytes(patch: &Patch) -> usize {
    serde_json::to_string(patch).map_or(0, |json| json.len()) + 1
}

/// Whether the server's refusal of an update that held only one change means that change can
/// never be stored (set it aside), rather than something not about a key (the device id, the
/// frame, the owner's dataset count, the patch count), or something that passes.
pub(crate) fn refused_for_good(code: ErrorCode, limit: Option<LimitCode>) -> bool {
    match code {
        ErrorCode::BadRequest => true,
        ErrorCode::TooLarge => !matches!(
            limit,
            Some(LimitCode::MaxDeviceIdLength | LimitCode::MaxFrameBytes)
        ),
        // max_records: the dataset has no room for one more key.
        ErrorCode::LimitExceeded => limit == Some(LimitCode::MaxRecords),
        _ => false,
    }
}

/// Why a local change is set aside: the server refused it for good (`too_large`,
/// `bad_request`, `limit_exceeded` for `max_records`), or it breaks a limit the server
/// announced. It stays (readable, pending) but is not sent again until the key is edited
/// again, discarded (`Dataset::discard`) or reverted (`Dataset::revert`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetAside {
    pub code: ErrorCode,
    /// Which limit, e.g. `max_key_length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<LimitCode>,
    /// That limit's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    pub message: String,
}

impl SetAside {
    fn local(limit: LimitCode, max: u64, message: String) -> SetAside {
        SetAside {
            code: limit.error_code(),
            limit: Some(limit),
            max: Some(max),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn small() -> Limits {
        let mut limits = Limits::default();
        limits.announce(&WriteLimits {
            max_key_length: 8,
            max_patches: 3,
            max_records: 8,
            max_dataset_bytes: 4096,
            max_device_id_length: 0,
            max_frame_bytes: 2048,
        });
        limits
    }

    #[test]
    fn test_limits_announce_skips_zero_and_learn_says_whether_it_changed() {
        let mut limits = small();
        assert_eq!(limits.max_device_id_length, None);
        assert!(!limits.learn(LimitCode::MaxPatches, 3), "already known");
        assert!(limits.learn(LimitCode::MaxPatches, 2));
        assert_eq!(limits.max_patches, Some(2));
        assert!(
            !limits.learn(LimitCode::MaxSubscriptions, 5),
            "not an update's"
        );
        assert!(!limits.learn(LimitCode::MaxRecords, 0));
    }

    #[test]
    fn test_limits_breaks_counts_key_characters_and_bytes_as_the_server_does() {
        let limits = small();
        let ds = DatasetRef::new("alice", "d");
        let broken = limits.breaks(&ds, None, "123456789", Some("x")).unwrap();
        assert_eq!(
            (broken.code, broken.limit, broken.max),
            (ErrorCode::TooLarge, Some(LimitCode::MaxKeyLength), Some(8))
        );
        // Eight emoji are 32 bytes but 8 characters.
        assert!(
            limits
                .breaks(&ds, None, &"😀".repeat(8), Some("x"))
                .is_none()
        );
        let big = "x".repeat(5000);
        let broken = limits.breaks(&ds, None, "big", Some(&big)).unwrap();
        assert_eq!(broken.limit, Some(LimitCode::MaxDatasetBytes));
        let wide = "x".repeat(2100);
        let broken = limits.breaks(&ds, None, "d", Some(&wide)).unwrap();
        assert_eq!(broken.limit, Some(LimitCode::MaxFrameBytes));
        // A removal carries no value: only its key can break a limit.
        assert!(limits.breaks(&ds, None, "short", None).is_none());
        assert!(
            Limits::default()
                .breaks(&ds, None, &"k".repeat(500), Some(&big))
                .is_none()
        );
    }

    #[test]
    fn test_refused_for_good_is_about_one_key_only() {
        assert!(refused_for_good(
            ErrorCode::TooLarge,
            Some(LimitCode::MaxKeyLength)
        ));
        assert!(refused_for_good(ErrorCode::BadRequest, None));
        assert!(refused_for_good(
            ErrorCode::LimitExceeded,
            Some(LimitCode::MaxRecords)
        ));
        assert!(!refused_for_good(
            ErrorCode::LimitExceeded,
            Some(LimitCode::MaxPatches)
        ));
        assert!(!refused_for_good(
            ErrorCode::LimitExceeded,
            Some(LimitCode::MaxDatasets)
        ));
        assert!(!refused_for_good(
            ErrorCode::TooLarge,
            Some(LimitCode::MaxFrameBytes)
        ));
        assert!(!refused_for_good(ErrorCode::Unavailable, None));
    }
}
