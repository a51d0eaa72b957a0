//! The client's error type.

use tandem_protocol::{ErrorCode, LimitCode};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The connection ended; `code` is the close code the server sent, if any.
    #[error("connection closed (code {code:?}): {reason}")]
    Closed { code: Option<u16>, reason: String },
    /// The server answered the request with an `error` frame.
    #[error("{code}: {message}")]
    Server {
        code: ErrorCode,
        message: String,
        limit: Option<LimitCode>,
        max: Option<u64>,
    },
    /// Not connected now; local reads and writes still work, `sync` must wait.
    /// No reply within the request timeout; the connection was dropped (it is presumed dead).
    #[error("no reply within {0:?}; connection dropped")]
    Timeout(std::time::Duration),
    #[error("offline")]
    Offline,
    /// The offline cache could not be read or written. From `put`/`remove`: the edit is
    /// kept in memory and syncs, but would not survive a restart.
    #[error("offline cache: {0}")]
    Cache(String),
    /// A local edit the server could never take (an empty key); nothing was changed.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A local edit that breaks one of the server's limits on its own (a key over
    /// `max_key_length`, a key and value over `max_dataset_bytes`, an update with only it
    /// over `max_frame_bytes`; see `Client::limits`), so the server could never store it;
    /// nothing was changed. Its error code is `too_large`.
    #[error("{key}: {message}; not written")]
    TooLarge {
        key: String,
        limit: LimitCode,
        max: u64,
        message: String,
    },
    /// The owner revoked this identity's access to the dataset: `sync` sends nothing until
    /// it is shared again and followed again (`Dataset::subscribe`). Local changes stay.
    #[error("access to the dataset was revoked")]
    Revoked,
    /// `Client::wipe` refused: this many local changes are not acknowledged yet and would
    /// be lost (`Client::wait_for_pending_writes` first, or `Client::wipe_forced`).
    #[error("{pending} local changes not yet synchronised; not wiped")]
    PendingWrites { pending: usize },
    /// The dataset was closed (`Dataset::close`, or a wipe): reads work, edits and syncs
    /// do not; open it again for a new handle.
    #[error("the dataset is closed")]
    DatasetClosed,
    /// `Client::open` of a dataset already open on this client named another conflict
    /// handler than the open handle's: a dataset has one handler, shared by every handle, so
    /// the open is refused rather than one of them silently ignored. Replace it with
    /// `Dataset::set_conflict_handler`. Its error code is `bad_request`, as in the JS SDK.
    #[error(
        "dataset {owner}/{name} is already open with another conflict handler: use Dataset::set_conflict_handler to replace it"
    )]
    OtherConflictHandler { owner: String, name: String },
    /// `sync` gave up after its retries; these keys are still unsynchronised.
    #[error("conflicts still unresolved after retries on keys {keys:?}")]
    Unresolved { keys: Vec<String> },
    /// The server answered with a frame this request does not expect.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// The server's error code, if the server refused the request, or would (`TooLarge`);
    /// `bad_request` for `OtherConflictHandler`, as the JS SDK says it.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            ClientError::TooLarge { limit, .. } => Some(limit.error_code()),
            ClientError::OtherConflictHandler { .. } => Some(ErrorCode::BadRequest),
            _ => None,
        }
    }
}
