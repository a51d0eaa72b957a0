//! The fan-out error type.

use tandem_protocol::ErrorCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FanoutError {
    /// The broker cannot be reached now; the caller may go on, the store stays the truth.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker was closed at shutdown.
    #[error("broker closed")]
    Closed,
}

impl FanoutError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::Unavailable
    }
}
