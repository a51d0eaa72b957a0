//! Stable error codes (the `code` of an `error` frame) and limit codes (its `limit`).

use serde::{Deserialize, Serialize};
use std::fmt;

/// The class of an error. Clients switch on this; the strings never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is malformed: not JSON, an unknown type, a missing or mistyped field, a
    /// dataset name or key outside the pattern, a key twice in one object. Fix the request;
    /// the connection stays open unless too many of these come in a short time (close 4503).
    BadRequest,
    /// No valid authentication yet, or the token was refused.
    Unauthorized,
    /// Authenticated, but without the access this request needs.
    Forbidden,
    /// The dataset (or grant) does not exist.
    NotFound,
    /// A stale sync count; sent as a `conflict` frame, listed here for completeness.
    Conflict,
    /// A count limit was reached (datasets per identity, records per dataset, patches per
    /// update, subscriptions per connection); `limit` names which.
    LimitExceeded,
    /// A size limit was passed (dataset bytes, key length, frame bytes); `limit` names which.
    TooLarge,
    /// More requests per second on this connection than `max_requests_per_second` allows;
    /// the refused frame was not decoded (only its `id` read, to answer with it); retry
    /// after the delay the message gives.
    RateLimited,
    /// A backing service (the store) is unreachable; nothing was written; retry later.
    Unavailable,
    /// A fault in the server; nothing was acknowledged; retry later.
    Internal,
    /// The deployment's sync hook refused the update (its message says why); nothing was
    /// written. Not retriable as is.
    Rejected,
    /// `read_at` or `restore` asked for a sync count the commit log no longer reaches back
    /// to (compaction dropped entries after it, or they predate before-images). Not
    /// retriable; `history` shows what is still there.
    HistoryUnavailable,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::LimitExceeded,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::Rejected,
        ErrorCode::HistoryUnavailable,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Rejected => "rejected",
            ErrorCode::HistoryUnavailable => "history_unavailable",
        }
    }

    /// Whether the same request may succeed if simply retried later.
    pub const fn retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited | ErrorCode::Unavailable | ErrorCode::Internal
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every configurable limit has its own code, carried in an `error` frame's `limit` field
/// next to the class in `code`, with the limit's value in `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitCode {
    /// Datasets one identity may own (default 20).
    MaxDatasets,
    /// Live records in one dataset (default 1024).
    MaxRecords,
    /// Bytes of keys and values in one dataset (default 1 MiB).
    MaxDatasetBytes,
    /// Characters in a record key (default 1024).
    MaxKeyLength,
    /// Bytes in one WebSocket frame (default 2 MiB).
    MaxFrameBytes,
    /// Patches in one update (default 1024).
    MaxPatches,
    /// Datasets one connection may subscribe to (default 100).
    MaxSubscriptions,
    /// Characters in a device id (default 128).
    MaxDeviceIdLength,
    /// Requests (frames) one connection may send per second, with bursts of as many
    /// (default 1000).
    MaxRequestsPerSecond,
    /// WebSocket connections one node serves at once (default 20,000); the upgrade is
    /// refused with HTTP 503.
    MaxConnections,
    /// Sessions one identity may hold on one node at once (default 100); the session is
    /// closed with 4005.
    MaxConnectionsPerIdentity,
    /// Connections that have not authenticated yet, on one node (default 1,000); the upgrade
    /// is refused with HTTP 503.
    MaxUnauthenticatedConnections,
    /// Bytes a connection may send before it authenticates (default 64 KiB); past them it is
    /// closed with 4501.
    MaxUnauthenticatedBytes,
    /// Connections from one IP address at once (default 500); the upgrade is refused with
    /// HTTP 429.
    MaxConnectionsPerIp,
    /// New connections from one IP address per second, in bursts of as many (default 50);
    /// the upgrade is refused with HTTP 429 and `Retry-After`.
    MaxNewConnectionsPerIp,
    /// Grants on one dataset name, existing or not (default 10,000); changing a grant's
    /// access does not count as a new one.
    MaxGrantsPerDataset,
    /// Grants one owner has made across all its dataset names, existing or not (default
    /// 20,000).
    MaxGrantsPerOwner,
    /// Bytes in one REST API request body (default 64 KiB); refused with HTTP 413.
    MaxRestBodyBytes,
    /// REST API requests one identity may make per second on one node, in bursts of as many
    /// (default 100); refused with HTTP 429 and `Retry-After`.
    MaxRestRequestsPerSecond,
    /// A limit this build does not know (a newer server's); the frame's `code` still says
    /// what class of error it is. Never sent.
    #[serde(other)]
    Unknown,
}

impl LimitCode {
    /// The error class this limit reports under.
    pub const fn error_code(self) -> ErrorCode {
        match self {
            LimitCode::MaxDatasets
            | LimitCode::MaxRecords
            | LimitCode::MaxPatches
            | LimitCode::MaxSubscriptions
            | LimitCode::MaxConnections
            | LimitCode::MaxConnectionsPerIdentity
            | LimitCode::MaxUnauthenticatedConnections
            | LimitCode::MaxConnectionsPerIp
            | LimitCode::MaxGrantsPerDataset
            | LimitCode::MaxGrantsPerOwner => ErrorCode::LimitExceeded,
            LimitCode::MaxUnauthenticatedBytes => ErrorCode::TooLarge,
            LimitCode::MaxNewConnectionsPerIp => ErrorCode::RateLimited,
            LimitCode::MaxDatasetBytes
            | LimitCode::MaxKeyLength
            | LimitCode::MaxFrameBytes
            | LimitCode::MaxDeviceIdLength => ErrorCode::TooLarge,
            LimitCode::MaxRequestsPerSecond | LimitCode::MaxRestRequestsPerSecond => {
                ErrorCode::RateLimited
            }
            LimitCode::MaxRestBodyBytes => ErrorCode::TooLarge,
            LimitCode::Unknown => ErrorCode::LimitExceeded,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            LimitCode::MaxDatasets => "max_datasets",
            LimitCode::MaxRecords => "max_records",
            LimitCode::MaxDatasetBytes => "max_dataset_bytes",
            LimitCode::MaxKeyLength => "max_key_length",
            LimitCode::MaxFrameBytes => "max_frame_bytes",
            LimitCode::MaxPatches => "max_patches",
            LimitCode::MaxSubscriptions => "max_subscriptions",
            LimitCode::MaxDeviceIdLength => "max_device_id_length",
            LimitCode::MaxRequestsPerSecond => "max_requests_per_second",
            LimitCode::MaxConnections => "max_connections",
            LimitCode::MaxConnectionsPerIdentity => "max_connections_per_identity",
            LimitCode::MaxUnauthenticatedConnections => "max_unauthenticated_connections",
            LimitCode::MaxUnauthenticatedBytes => "max_unauthenticated_bytes",
            LimitCode::MaxConnectionsPerIp => "max_connections_per_ip",
            LimitCode::MaxNewConnectionsPerIp => "max_new_connections_per_ip",
            LimitCode::MaxGrantsPerDataset => "max_grants_per_dataset",
            LimitCode::MaxGrantsPerOwner => "max_grants_per_owner",
            LimitCode::MaxRestBodyBytes => "max_rest_body_bytes",
            LimitCode::MaxRestRequestsPerSecond => "max_rest_requests_per_second",
            LimitCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for LimitCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_error_code_serialises_as_its_stable_string() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
        let json = serde_json::to_string(&LimitCode::MaxDatasetBytes).unwrap();
        assert_eq!(json, "\"max_dataset_bytes\"");
        // A newer server's limit still decodes, so the request it refused is answered.
        let later: LimitCode = serde_json::from_str("\"max_something_new\"").unwrap();
        assert_eq!(later, LimitCode::Unknown);
    }
}
