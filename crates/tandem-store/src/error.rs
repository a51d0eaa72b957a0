//! The store's one error type; every variant maps to a stable protocol error code.

use tandem_protocol::{ErrorCode, LimitCode, NameError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("invalid dataset name `{name}`: {reason}")]
    InvalidName { name: String, reason: NameError },
    #[error("{0}")]
    BadRequest(String),
    #[error("{identity} has no {needed} access to {dataset}")]
    Forbidden {
        identity: String,
        dataset: String,
        needed: &'static str,
    },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{message}")]
    Limit {
        limit: LimitCode,
        max: u64,
        message: String,
    },
    /// `create_identity` with an id that is taken.
    #[error("identity {0} exists already")]
    IdentityExists(String),
    /// The identity was merged into another one and answers for nothing any more.
    #[error("identity {identity} was merged into {into}")]
    IdentityMerged { identity: String, into: String },
    /// A login to link is linked to another identity already; nothing was linked.
    #[error("login {login} is linked to identity {identity} already")]
    LoginLinked { login: String, identity: String },
    /// Logins that should name one identity name two.
    #[error("the logins are linked to two identities, {first} and {second}")]
    LoginsConflict { first: String, second: String },
    /// The commit log no longer holds (or never held, with before-images) every commit after
    /// this sync count, so the dataset as it was then cannot be read back.
    #[error(
        "the history of {dataset} at sync count {sync_count} is no longer available (the commit log keeps a bounded history)"
    )]
    HistoryUnavailable { dataset: String, sync_count: u64 },
    /// The backing database cannot be reached; nothing was written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store fault: {0}")]
    Internal(String),
}

impl StoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::InvalidName { .. } | StoreError::BadRequest(_) => ErrorCode::BadRequest,
            StoreError::Forbidden { .. } => ErrorCode::Forbidden,
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::IdentityExists(_)
            | StoreError::LoginLinked { .. }
            | StoreError::LoginsConflict { .. } => ErrorCode::Conflict,
            StoreError::IdentityMerged { .. } => ErrorCode::Forbidden,
            StoreError::Limit { limit, .. } => limit.error_code(),
            StoreError::HistoryUnavailable { .. } => ErrorCode::HistoryUnavailable,
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
            StoreError::Internal(_) => ErrorCode::Internal,
        }
    }

    pub fn forbidden(dataset: &crate::DatasetKey, identity: &str, needed: &'static str) -> Self {
        StoreError::Forbidden {
            identity: identity.to_owned(),
            dataset: dataset.to_string(),
            needed,
        }
    }

    pub fn limit(limit: LimitCode, max: u64, message: impl Into<String>) -> Self {
        StoreError::Limit {
            limit,
            max,
            message: message.into(),
        }
    }
}
