//! Client and server frames: JSON objects with a `type` field. Unknown fields are ignored in
//! both directions so that either side can add fields without breaking the other; a client
//! must also ignore server frame types it does not know. `delta` pushes and the lean record
//! encoding are opt-in features (see `lean` and docs/PROTOCOL.md §3).
//! A client frame with the same key twice in one object is refused rather than read
//! last-wins (see `strict`).

use crate::error::{ErrorCode, LimitCode};
use crate::model::{
    Access, Conflict, DatasetInfo, DatasetRef, HistoryEntry, Patch, Record, RequestId,
};
use crate::strict;
use serde::{Deserialize, Serialize};

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum ClientFrame {
    /// Authenticate; must be the first frame unless the upgrade request carried an
    /// `Authorization: Bearer` header. Sent again later with a fresh token for the same
    /// identity, it extends the session past the old token's expiry.
    Auth {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        token: String,
        /// Opt-in protocol features (`delta`, `lean`); unknown names are ignored. Every
        /// `auth` frame sets the session's features anew; `ready` names those accepted.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// Start receiving a dataset: answered with `snapshot`, then live `dataset` (or, with
    /// `delta`, `delta`) pushes.
    Subscribe {
        id: RequestId,
        dataset: DatasetRef,
        /// Pushes as `delta` frames (true) or whole `dataset` frames (false); absent means
        /// whatever the session's `delta` feature says.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delta: Option<bool>,
        /// The dataset's sync count the client already holds: the reply may then carry only
        /// what changed since (the `snapshot` says so with its own `since`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
    },
    /// Stop receiving a dataset: answered with `ack`.
    Unsubscribe { id: RequestId, dataset: DatasetRef },
    /// Apply patches atomically: answered with `ack` or `conflict`.
    Update {
        id: RequestId,
        dataset: DatasetRef,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_id: Option<String>,
        patches: Vec<Patch>,
    },
    /// Records changed after sync count `since`, tombstones included: answered with `changes`.
    Changes {
        id: RequestId,
        dataset: DatasetRef,
        #[serde(default)]
        since: u64,
    },
    /// The caller's datasets and those shared with it: answered with `datasets`.
    ListDatasets { id: RequestId },
    /// Delete one of the caller's datasets: answered with `ack`; subscribers get `deleted`.
    DeleteDataset { id: RequestId, dataset: DatasetRef },
    /// Give another identity `read` or `write` access to one of the caller's datasets.
    Grant {
        id: RequestId,
        dataset: DatasetRef,
        identity: String,
        access: Access,
    },
    /// Take an identity's access away; its live subscriptions end at once.
    Revoke {
        id: RequestId,
        dataset: DatasetRef,
        identity: String,
    },
    /// The dataset's commits, newest first, a page at a time: answered with `history`.
    /// Needs read access.
    History {
        id: RequestId,
        dataset: DatasetRef,
        /// Only entries with an id below this one: the previous reply's `next`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<i64>,
        /// Entries per page: default 50, at most the server's `max_history_page`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// The dataset's live records as they were right after the commit at `syncCount`:
    /// answered with `read_at`. Needs read access.
    ReadAt {
        id: RequestId,
        dataset: DatasetRef,
        sync_count: u64,
    },
    /// Makes the dataset what it was at `syncCount` again, as one new commit (history is
    /// kept): answered with `ack`. Needs write access.
    Restore {
        id: RequestId,
        dataset: DatasetRef,
        sync_count: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_id: Option<String>,
    },
    /// Answered with `pong`.
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
}

impl ClientFrame {
    pub fn to_json(&self) -> String {
        // Serialising these types cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn id(&self) -> Option<&RequestId> {
        match self {
            ClientFrame::Auth { id, .. } | ClientFrame::Ping { id } => id.as_ref(),
            ClientFrame::Subscribe { id, .. }
            | ClientFrame::Unsubscribe { id, .. }
            | ClientFrame::Update { id, .. }
            | ClientFrame::Changes { id, .. }
            | ClientFrame::ListDatasets { id }
            | ClientFrame::DeleteDataset { id, .. }
            | ClientFrame::Grant { id, .. }
            | ClientFrame::Revoke { id, .. }
            | ClientFrame::History { id, .. }
            | ClientFrame::ReadAt { id, .. }
            | ClientFrame::Restore { id, .. } => Some(id),
        }
    }
}

/// How records are written in server frames: `Full` (every field, protocol version 1's
/// default) or `Lean` (the `lean` feature: fields the frame implies are left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    #[default]
    Full,
    Lean,
}

/// The `auth` feature that turns on `delta` pushes for the session's subscriptions.
pub const FEATURE_DELTA: &str = "delta";
/// The `auth` feature that turns on the lean record encoding.
pub const FEATURE_LEAN: &str = "lean";

/// Why the server ended a subscription on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnsubscribeReason {
    /// The owner revoked the caller's access.
    Revoked,
}

/// The limits on an `update` a client can check before sending one (`ready.limits`); each
/// field is the configured value of the limit of the same name (docs/PROTOCOL.md §8.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteLimits {
    pub max_key_length: u64,
    pub max_patches: u64,
    pub max_records: u64,
    pub max_dataset_bytes: u64,
    pub max_device_id_length: u64,
    pub max_frame_bytes: u64,
}

/// A frame the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum ServerFrame {
    /// Authentication succeeded.
    Ready {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        identity: String,
        session: String,
        protocol: u32,
        /// When the token expires, milliseconds since the Unix epoch.
        expires_at: i64,
        /// The features of the `auth` frame this server supports, now on for the session.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
        /// The write limits this server enforces, so that a client can check and split its
        /// updates before sending them (absent from servers that do not announce them).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limits: Option<WriteLimits>,
    },
    /// The answer to `subscribe`: the whole dataset (live records only), or, when `since` is
    /// present, only the records changed after `since`, tombstones included.
    Snapshot {
        id: RequestId,
        dataset: DatasetRef,
        sync_count: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        records: Vec<Record>,
    },
    /// A live push after a commit: the whole dataset (live records only) at `sync_count`.
    Dataset {
        dataset: DatasetRef,
        sync_count: u64,
        records: Vec<Record>,
    },
    /// A live push to a subscriber that opted in to deltas: the records that changed between
    /// `baseSyncCount` and `syncCount`, tombstones included, ordered by key. Apply it only on
    /// top of exactly `baseSyncCount`; otherwise ask `changes` (or re-subscribe).
    Delta {
        dataset: DatasetRef,
        base_sync_count: u64,
        sync_count: u64,
        records: Vec<Record>,
    },
    /// A request succeeded. For `update`, `syncCount` is the dataset's new sync count and
    /// `records` the records the update changed, as stored.
    Ack {
        id: RequestId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dataset: Option<DatasetRef>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sync_count: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        records: Option<Vec<Record>>,
    },
    /// An update was refused because some patches were stale; nothing was written.
    Conflict {
        id: RequestId,
        dataset: DatasetRef,
        /// The dataset's current sync count.
        sync_count: u64,
        conflicts: Vec<Conflict>,
    },
    /// The answer to `changes`: records with a sync count above `since`, tombstones included.
    Changes {
        id: RequestId,
        dataset: DatasetRef,
        sync_count: u64,
        records: Vec<Record>,
    },
    /// A subscribed dataset was deleted by its owner; the subscription has ended.
    Deleted {
        dataset: DatasetRef,
        sync_count: u64,
    },
    /// The server ended a subscription (see `reason`).
    Unsubscribed {
        dataset: DatasetRef,
        reason: UnsubscribeReason,
    },
    /// The answer to `list_datasets`.
    Datasets {
        id: RequestId,
        datasets: Vec<DatasetInfo>,
    },
    /// The answer to `history`: entries newest first; `next` is the `before` of the next
    /// (older) page, null on the last one. `syncCount` is the dataset's current one.
    History {
        id: RequestId,
        dataset: DatasetRef,
        sync_count: u64,
        entries: Vec<HistoryEntry>,
        next: Option<i64>,
    },
    /// The answer to `read_at`: the live records as they were at `syncCount`, ordered by key.
    ReadAt {
        id: RequestId,
        dataset: DatasetRef,
        sync_count: u64,
        records: Vec<Record>,
    },
    /// The answer to `ping`.
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    /// A request failed, or (without `id`) a frame could not be read at all.
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        code: ErrorCode,
        message: String,
        /// Which limit, for `limit_exceeded` and `too_large`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<LimitCode>,
        /// That limit's configured value.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<u64>,
    },
}

impl ServerFrame {
    pub fn to_json(&self) -> String {
        // Serialising these types cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The frame as JSON in the given record encoding (see `lean`).
    pub fn encode(&self, encoding: Encoding) -> String {
        match encoding {
            Encoding::Full => self.to_json(),
            Encoding::Lean => crate::lean::to_json(self),
        }
    }

    /// Reads a server frame in either record encoding: fields a lean record left out are
    /// filled in from the frame (see `lean`).
    pub fn from_json(text: &str) -> serde_json::Result<ServerFrame> {
        let mut frame: ServerFrame = serde_json::from_str(text)?;
        crate::lean::expand(&mut frame);
        Ok(frame)
    }

    pub fn error(id: Option<RequestId>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            id,
            code,
            message: message.into(),
            limit: None,
            max: None,
        }
    }

    pub fn limit_error(
        id: Option<RequestId>,
        limit: LimitCode,
        max: u64,
        message: impl Into<String>,
    ) -> Self {
        ServerFrame::Error {
            id,
            code: limit.error_code(),
            message: message.into(),
            limit: Some(limit),
            max: Some(max),
        }
    }
}

/// A client frame that could not be decoded; `id` is filled in when the frame was a JSON
/// object with a usable `id`, so the error can be matched to the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub id: Option<RequestId>,
    pub message: String,
}

const CLIENT_TYPES: [&str; 13] = [
    "auth",
    "subscribe",
    "unsubscribe",
    "update",
    "changes",
    "list_datasets",
    "delete_dataset",
    "grant",
    "revoke",
    "history",
    "read_at",
    "restore",
    "ping",
];

/// Decodes a client text frame, with messages that say what was wrong. A frame with the
/// same key twice in any object is refused, like a malformed one.
pub fn decode_client_frame(text: &str) -> Result<ClientFrame, DecodeError> {
    let (value, duplicate) = strict::parse(text).map_err(|e| DecodeError {
        id: None,
        message: format!("malformed json: {e}"),
    })?;
    let serde_json::Value::Object(map) = &value else {
        return Err(DecodeError {
            id: None,
            message: "a frame must be a json object".into(),
        });
    };
    let id = map.get("id").and_then(|v| RequestId::deserialize(v).ok());
    if let Some(duplicate) = duplicate {
        // Two ids: either could be the one the client matches replies by, so neither is.
        let id = id.filter(|_| !(duplicate.parent.is_none() && duplicate.key == "id"));
        return Err(DecodeError {
            id,
            message: duplicate.to_string(),
        });
    }
    let kind = match map.get("type") {
        Some(serde_json::Value::String(kind)) => kind.as_str(),
        Some(_) => {
            return Err(DecodeError {
                id,
                message: "field `type` must be a string".into(),
            });
        }
        None => {
            return Err(DecodeError {
                id,
                message: "missing field `type`".into(),
            });
        }
    };
    if !CLIENT_TYPES.contains(&kind) {
        return Err(DecodeError {
            id,
            message: format!("unknown message type `{kind}`"),
        });
    }
    // The known type is kept for the message; the value itself moves into the frame.
    let kind = kind.to_owned();
    serde_json::from_value(value).map_err(|e| DecodeError {
        id,
        message: format!("invalid `{kind}` frame: {e}"),
    })
}

/// The `id` of a client frame, read without decoding the rest (no values are built): for a
/// frame refused before it is looked at, so the refusal can still be matched to its request.
pub fn peek_request_id(text: &str) -> Option<RequestId> {
    #[derive(Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: Option<RequestId>,
    }
    // A derived struct also reads from an array (`[1]`); a frame is an object.
    if !text.trim_start().starts_with('{') {
        return None;
    }
    serde_json::from_str::<IdOnly>(text).ok()?.id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PatchOp;
    use serde_json::json;

    #[test]
    fn test_decode_update_frame() {
        let f = decode_client_frame(
            r#"{"type":"update","id":7,"dataset":{"name":"todo"},"deviceId":"phone",
               "patches":[{"op":"replace","key":"a","value":"1","syncCount":0},
                          {"op":"remove","key":"b","syncCount":4}]}"#,
        )
        .unwrap();
        let ClientFrame::Update {
            id,
            dataset,
            device_id,
            patches,
        } = f
        else {
            panic!("not an update");
        };
        assert_eq!(id, RequestId::Num(7));
        assert_eq!(dataset, DatasetRef::own("todo"));
        assert_eq!(device_id.as_deref(), Some("phone"));
        assert_eq!(patches[1].op, PatchOp::Remove);
        assert_eq!(patches[1].sync_count, 4);
    }

    #[test]
    fn test_decode_errors_keep_the_id_when_they_can() {
        let e = decode_client_frame("{not json").unwrap_err();
        assert_eq!(e.id, None);
        assert!(e.message.starts_with("malformed json"));

        let e = decode_client_frame(r#"{"type":"frobnicate","id":"x"}"#).unwrap_err();
        assert_eq!(e.id, Some(RequestId::Str("x".into())));
        assert!(e.message.contains("unknown message type"));

        let e = decode_client_frame(r#"{"type":"subscribe","id":"y"}"#).unwrap_err();
        assert_eq!(e.id, Some(RequestId::Str("y".into())));
        assert!(e.message.contains("dataset"), "{}", e.message);

        assert!(decode_client_frame("[1]").is_err());
        assert!(decode_client_frame(r#"{"id":1}"#).is_err());
    }

    #[test]
    fn test_decode_refuses_a_duplicate_key_at_any_level_with_the_id() {
        let update = |dataset: &str, patch: &str, extra: &str| {
            format!(
                r#"{{"type":"update","id":"u1","dataset":{dataset},"patches":[{{"op":"remove","key":"a","syncCount":1}},{patch}]{extra}}}"#
            )
        };
        let ok_patch = r#"{"op":"replace","key":"b","value":"1","syncCount":0}"#;
        assert!(decode_client_frame(&update(r#"{"name":"t"}"#, ok_patch, "")).is_ok());
        let cases = [
            // Top level, a known field: last-wins would apply no patches where a first-wins
            // reader saw two.
            (
                update(r#"{"name":"t"}"#, ok_patch, r#","patches":[]"#),
                "duplicate key `patches`",
            ),
            (
                update(r#"{"name":"t","name":"other"}"#, ok_patch, ""),
                "duplicate key `name` in `dataset`",
            ),
            (
                update(
                    r#"{"name":"t"}"#,
                    r#"{"op":"replace","key":"b","value":"1","value":"2","syncCount":0}"#,
                    "",
                ),
                "duplicate key `value` in `patches`",
            ),
            // Unknown fields are ignored, but not when they come twice.
            (
                update(r#"{"name":"t"}"#, ok_patch, r#","later":1,"later":2"#),
                "duplicate key `later`",
            ),
            (
                update(
                    r#"{"name":"t"}"#,
                    ok_patch,
                    r#","later":{"x":{"y":1,"y":1}}"#,
                ),
                "duplicate key `y` in `x`",
            ),
        ];
        for (text, message) in cases {
            let e = decode_client_frame(&text).unwrap_err();
            assert_eq!(e.message, message, "{text}");
            assert_eq!(e.id, Some(RequestId::Str("u1".into())), "{text}");
        }
        // `type` twice is refused even when both agree.
        let e = decode_client_frame(r#"{"type":"ping","id":3,"type":"ping"}"#).unwrap_err();
        assert_eq!(e.message, "duplicate key `type`");
        assert_eq!(e.id, Some(RequestId::Num(3)));
        // With two ids the reply cannot say which request it answers.
        let e = decode_client_frame(r#"{"type":"ping","id":1,"id":2}"#).unwrap_err();
        assert_eq!(e.message, "duplicate key `id`");
        assert_eq!(e.id, None);
    }

    #[test]
    fn test_peek_request_id_reads_only_the_id() {
        assert_eq!(
            peek_request_id(r#"{"type":"update","id":"u1","patches":[{"x":[1,2,{}]}]}"#),
            Some(RequestId::Str("u1".into()))
        );
        assert_eq!(
            peek_request_id(r#"{"patches":{},"id":7}"#),
            Some(RequestId::Num(7))
        );
        for text in [
            r#"{"type":"ping"}"#,
            r#"{"id":-1}"#,
            r#"{"id":1,"id":2}"#,
            r#"{"id":1"#,
            "{not json",
            "[1]",
        ] {
            assert_eq!(peek_request_id(text), None, "{text}");
        }
    }

    #[test]
    fn test_history_frames_on_the_wire() {
        let f = decode_client_frame(
            r#"{"type":"history","id":1,"dataset":{"name":"todo"},"before":42,"limit":10}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            ClientFrame::History {
                id: RequestId::Num(1),
                dataset: DatasetRef::own("todo"),
                before: Some(42),
                limit: Some(10),
            }
        );
        let f = decode_client_frame(
            r#"{"type":"restore","id":2,"dataset":{"owner":"a","name":"t"},"syncCount":3}"#,
        )
        .unwrap();
        assert!(matches!(
            f,
            ClientFrame::Restore {
                sync_count: 3,
                device_id: None,
                ..
            }
        ));
        let f = decode_client_frame(r#"{"type":"read_at","id":3,"dataset":{"name":"t"}}"#);
        assert!(f.unwrap_err().message.contains("syncCount"));
        let reply = ServerFrame::History {
            id: RequestId::Num(1),
            dataset: DatasetRef::new("a", "todo"),
            sync_count: 3,
            entries: vec![crate::HistoryEntry {
                id: 7,
                kind: crate::CommitKind::Grant,
                sync_count: 3,
                actor: "a".into(),
                device_id: None,
                time: 1,
                keys: None,
                grantee: Some("b".into()),
                access: Some(Access::Read),
            }],
            next: None,
        };
        let v: serde_json::Value = serde_json::from_str(&reply.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"type":"history","id":1,"dataset":{"owner":"a","name":"todo"},"syncCount":3,
                   "entries":[{"id":7,"kind":"grant","syncCount":3,"actor":"a","time":1,
                               "grantee":"b","access":"read"}],
                   "next":null})
        );
        assert_eq!(ServerFrame::from_json(&reply.to_json()).unwrap(), reply);
    }

    #[test]
    fn test_unknown_fields_are_ignored() {
        let f = decode_client_frame(r#"{"type":"ping","future":true}"#).unwrap();
        assert_eq!(f, ClientFrame::Ping { id: None });
    }

    #[test]
    fn test_server_frames_round_trip() {
        let frames = vec![
            ServerFrame::Dataset {
                dataset: DatasetRef::new("u1", "todo"),
                sync_count: 3,
                records: vec![],
            },
            ServerFrame::limit_error(
                Some(RequestId::Num(1)),
                LimitCode::MaxRecords,
                1024,
                "too many",
            ),
            ServerFrame::Ack {
                id: RequestId::Num(2),
                dataset: None,
                sync_count: None,
                records: None,
            },
        ];
        for f in frames {
            let text = f.to_json();
            let back: ServerFrame = serde_json::from_str(&text).unwrap();
            assert_eq!(back, f);
        }
        let v: serde_json::Value = serde_json::from_str(
            &ServerFrame::Dataset {
                dataset: DatasetRef::new("u1", "todo"),
                sync_count: 3,
                records: vec![],
            }
            .to_json(),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"type":"dataset","dataset":{"owner":"u1","name":"todo"},"syncCount":3,"records":[]})
        );
    }
}
