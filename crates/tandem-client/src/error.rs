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
    /// `sync` gave up after its retries; these keys are still unsynchronised.
    #[error("conflicts still unresolved after retries on keys {keys:?}")]
    Unresolved { keys: Vec<String> },
    /// The server answered with a frame this request does not expect.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// The server's error code, if the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}
