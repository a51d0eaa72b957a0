//! Conflict handlers: what to do when the server refused a local change because the record
//! changed there since this device last saw it.

use crate::cache::LocalRecord;
use std::sync::Arc;
use tandem_protocol::Record;

/// The handler's decision for one conflicting key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Write the local value over the server's (retried on top of the server's version).
    KeepLocal,
    /// Drop the local change and take the server's record.
    TakeRemote,
    /// Write this value instead (`None` removes the key), on top of the server's version.
    Merge(Option<String>),
}

/// A conflict as the handler sees it.
#[derive(Debug, Clone)]
pub struct ConflictCase<'a> {
    pub key: &'a str,
    /// The local, unacknowledged change.
    pub local: &'a LocalRecord,
    /// The server's current record (`None` if the key does not exist there; a tombstone has
    /// `value: None`).
    pub server: Option<&'a Record>,
}

type CustomHandler = Arc<dyn Fn(&ConflictCase<'_>) -> Resolution + Send + Sync>;

/// How a dataset resolves conflicts.
#[derive(Clone, Default)]
pub enum ConflictHandler {
    /// The local change wins.
    KeepLocal,
    /// The server's record wins; the local change is dropped.
    TakeRemote,
    /// The change with the later device time wins (the server's device time, or its commit
    /// time when the writer sent none). Ties keep the server's.
    #[default]
    LatestDeviceTime,
    /// Your function decides.
    Custom(CustomHandler),
}

impl std::fmt::Debug for ConflictHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConflictHandler::KeepLocal => "KeepLocal",
            ConflictHandler::TakeRemote => "TakeRemote",
            ConflictHandler::LatestDeviceTime => "LatestDeviceTime",
            ConflictHandler::Custom(_) => "Custom",
        })
    }
}

/// The same handler: the same built-in one, or clones of one `custom` handler (two
/// `custom` calls make two handlers, even of the same function). `Client::open` compares
/// them so that a dataset is never open with two handlers.
impl PartialEq for ConflictHandler {
    fn eq(&self, other: &ConflictHandler) -> bool {
        match (self, other) {
            (ConflictHandler::Custom(a), ConflictHandler::Custom(b)) => Arc::ptr_eq(a, b),
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        }
    }
}

impl ConflictHandler {
    pub fn custom(f: impl Fn(&ConflictCase<'_>) -> Resolution + Send + Sync + 'static) -> Self {
        ConflictHandler::Custom(Arc::new(f))
    }

    pub fn resolve(&self, case: &ConflictCase<'_>) -> Resolution {
        match self {
            ConflictHandler::KeepLocal => Resolution::KeepLocal,
            ConflictHandler::TakeRemote => Resolution::TakeRemote,
            ConflictHandler::LatestDeviceTime => {
                let local = case.local.device_last_modified.unwrap_or(i64::MIN);
                let server = case.server.map_or(i64::MIN, |r| {
                    r.device_last_modified.unwrap_or(r.last_modified)
                });
                if local > server {
                    Resolution::KeepLocal
                } else {
                    Resolution::TakeRemote
                }
            }
            ConflictHandler::Custom(f) => f(case),
        }
    }
}
