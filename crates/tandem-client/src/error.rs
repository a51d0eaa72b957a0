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
