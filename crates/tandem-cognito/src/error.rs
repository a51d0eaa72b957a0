//! The Cognito error shapes (COGNITO.md §5, §6): the error types the SDKs recognise, the
//! HTTP status of each, the type of each Tandem error code, and how an error goes on the
//! wire. Every SDK reads the error code
//! from a different place first (the `x-amzn-ErrorType` header, body `__type`, body `code`),
//! so the rendered body carries `__type` and `message` only: a `code` member would be read
//! as the error code by v2 and botocore.

use serde::Serialize;
use std::fmt;
use tandem_protocol::{ErrorCode, LimitCode};

/// A Cognito error type: the shape name the SDKs match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorType {
    /// No `Authorization` header on a signed route (403).
    MissingAuthenticationToken,
    /// A malformed `Authorization` header, no `X-Amz-Date`, or `host` not signed (400).
    IncompleteSignature,
    /// Wrong scope, clock skew, or a signature that does not match (403).
    InvalidSignature,
    /// A session token with a bad MAC or for another access key id (403).
    UnrecognizedClient,
    /// A session token past its expiry; the SDKs refresh credentials and retry (403).
    ExpiredToken,
    /// Access to another identity, a merged-away identity, a bad login (403 on the Sync API,
    /// 400 on the Identity API).
    NotAuthorized,
    /// A bad parameter, name, body or SyncSessionToken (400).
    InvalidParameter,
    /// A dataset, record or size limit (400).
    LimitExceeded,
    /// A stale sync count on UpdateRecords (409).
    ResourceConflict,
    /// An unknown pool or a dataset that is not live (404).
    ResourceNotFound,
    /// Rate limited (429).
    TooManyRequests,
    /// An internal failure (500).
    InternalError,
    /// The store is unavailable: `InternalErrorException` with 503, so clients retry.
    Unavailable,
    /// An unknown Sync route (404).
    UnknownOperation,
    /// Push sync routes on a pool without push sync (400).
    InvalidConfiguration,
    /// The sync hook (Cognito's Sync Trigger) refused the update (400).
    LambdaRejected,
    /// The sync hook did not answer (timeout, failure, breaker open) (429, retried).
    LambdaThrottled,
    /// A pool's SyncTrigger refused the update or answered something that is not an event
    /// (400).
    InvalidLambdaOutput,
    /// A BulkPublish while one runs (400).
    DuplicateRequest,
}

impl ErrorType {
    /// The shape name, as sent in `x-amzn-ErrorType` and `__type`.
    pub fn shape(self) -> &'static str {
        match self {
            Self::MissingAuthenticationToken => "MissingAuthenticationTokenException",
            Self::IncompleteSignature => "IncompleteSignatureException",
            Self::InvalidSignature => "InvalidSignatureException",
            Self::UnrecognizedClient => "UnrecognizedClientException",
            Self::ExpiredToken => "ExpiredTokenException",
            Self::NotAuthorized => "NotAuthorizedException",
            Self::InvalidParameter => "InvalidParameterException",
            Self::LimitExceeded => "LimitExceededException",
            Self::ResourceConflict => "ResourceConflictException",
            Self::ResourceNotFound => "ResourceNotFoundException",
            Self::TooManyRequests => "TooManyRequestsException",
            Self::InternalError | Self::Unavailable => "InternalErrorException",
            Self::UnknownOperation => "UnknownOperationException",
            Self::InvalidConfiguration => "InvalidConfigurationException",
            Self::LambdaRejected => "LambdaRejectedException",
            Self::LambdaThrottled => "LambdaThrottledException",
            Self::InvalidLambdaOutput => "InvalidLambdaFunctionOutputException",
            Self::DuplicateRequest => "DuplicateRequestException",
        }
    }

    /// The HTTP status on the Sync API (rest-json). The Identity API answers 400 for every
    /// type but the internal ones (COGNITO.md §3); the caller picks that with
    /// [`CognitoError::render_json_1_1`].
    pub fn status(self) -> u16 {
        match self {
            Self::IncompleteSignature
            | Self::InvalidParameter
            | Self::LimitExceeded
            | Self::InvalidConfiguration
            | Self::LambdaRejected
            | Self::InvalidLambdaOutput
            | Self::DuplicateRequest => 400,
            Self::MissingAuthenticationToken
            | Self::InvalidSignature
            | Self::UnrecognizedClient
            | Self::ExpiredToken
            | Self::NotAuthorized => 403,
            Self::ResourceNotFound | Self::UnknownOperation => 404,
            Self::ResourceConflict => 409,
            Self::TooManyRequests | Self::LambdaThrottled => 429,
            Self::InternalError => 500,
            Self::Unavailable => 503,
        }
    }
}

impl ErrorType {
    /// The Cognito type of a Tandem error (COGNITO.md §6). `limit` tells a dataset that
    /// grew too large (`LimitExceededException`) from a key that is too long
    /// (`InvalidParameterException`).
    pub fn from_tandem(code: ErrorCode, limit: Option<LimitCode>) -> Self {
        match code {
            ErrorCode::BadRequest => Self::InvalidParameter,
            ErrorCode::TooLarge if limit == Some(LimitCode::MaxDatasetBytes) => Self::LimitExceeded,
            ErrorCode::TooLarge => Self::InvalidParameter,
            ErrorCode::LimitExceeded => Self::LimitExceeded,
            ErrorCode::Conflict => Self::ResourceConflict,
            ErrorCode::NotFound => Self::ResourceNotFound,
            ErrorCode::Unauthorized | ErrorCode::Forbidden => Self::NotAuthorized,
            ErrorCode::RateLimited => Self::TooManyRequests,
            ErrorCode::Unavailable => Self::Unavailable,
            ErrorCode::Internal => Self::InternalError,
            ErrorCode::Rejected => Self::LambdaRejected,
            // No Cognito operation reads history; were one to, the version it asks for is
            // gone, as a record that does not exist is.
            ErrorCode::HistoryUnavailable => Self::ResourceNotFound,
        }
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.shape())
    }
}

/// A Cognito error: its type and the message the client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error_type}: {message}")]
pub struct CognitoError {
    /// What the SDKs match on.
    pub error_type: ErrorType,
    /// Shown to the client verbatim; some are AWS's own wording, which SDKs match on.
    pub message: String,
}

/// An error as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    /// The HTTP status.
    pub status: u16,
    /// The value of the `x-amzn-ErrorType` header.
    pub error_type: &'static str,
    /// The JSON body, `{"__type":…,"message":…}`.
    pub body: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "__type")]
    error_type: &'a str,
    message: &'a str,
}

impl CognitoError {
    /// An error of `error_type` with `message`.
    pub fn new(error_type: ErrorType, message: impl Into<String>) -> Self {
        Self {
            error_type,
            message: message.into(),
        }
    }

    /// The HTTP status on the Sync API.
    pub fn status(&self) -> u16 {
        self.error_type.status()
    }

    /// The error as the Sync API (rest-json) sends it.
    pub fn render(&self) -> ErrorResponse {
        self.render_with_status(self.status())
    }

    /// The error as the Identity API (JSON 1.1) sends it: 400, or the internal status.
    pub fn render_json_1_1(&self) -> ErrorResponse {
        let status = match self.error_type {
            ErrorType::InternalError | ErrorType::Unavailable => self.status(),
            _ => 400,
        };
        self.render_with_status(status)
    }

    fn render_with_status(&self, status: u16) -> ErrorResponse {
        let body = ErrorBody {
            error_type: self.error_type.shape(),
            message: &self.message,
        };
        // Serialising two strings cannot fail; the fallback keeps the function total.
        let body = serde_json::to_string(&body)
            .unwrap_or_else(|_| format!(r#"{{"__type":"{}"}}"#, self.error_type.shape()));
        ErrorResponse {
            status,
            error_type: self.error_type.shape(),
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_render_has_header_type_and_message_and_no_code() {
        let err = CognitoError::new(
            ErrorType::ResourceConflict,
            "Current SyncCount for: k is: 2 not: 1",
        );
        let rendered = err.render();
        assert_eq!(rendered.status, 409);
        assert_eq!(rendered.error_type, "ResourceConflictException");
        let body: serde_json::Value = serde_json::from_str(&rendered.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "__type": "ResourceConflictException",
                "message": "Current SyncCount for: k is: 2 not: 1",
            })
        );
        let object = body.as_object().unwrap();
        assert!(!object.contains_key("code") && !object.contains_key("Code"));
    }

    #[test]
    fn test_render_statuses_follow_the_mapping() {
        let cases = [
            (ErrorType::MissingAuthenticationToken, 403),
            (ErrorType::IncompleteSignature, 400),
            (ErrorType::InvalidSignature, 403),
            (ErrorType::UnrecognizedClient, 403),
            (ErrorType::ExpiredToken, 403),
            (ErrorType::NotAuthorized, 403),
            (ErrorType::InvalidParameter, 400),
            (ErrorType::LimitExceeded, 400),
            (ErrorType::ResourceNotFound, 404),
            (ErrorType::TooManyRequests, 429),
            (ErrorType::InternalError, 500),
            (ErrorType::Unavailable, 503),
            (ErrorType::UnknownOperation, 404),
            (ErrorType::InvalidConfiguration, 400),
            (ErrorType::InvalidLambdaOutput, 400),
            (ErrorType::DuplicateRequest, 400),
            (ErrorType::LambdaThrottled, 429),
        ];
        for (error_type, status) in cases {
            assert_eq!(
                CognitoError::new(error_type, "m").render().status,
                status,
                "{error_type}"
            );
        }
        assert_eq!(ErrorType::Unavailable.shape(), "InternalErrorException");
    }

    #[test]
    fn test_from_tandem_follows_the_mapping() {
        let cases = [
            (
                ErrorCode::BadRequest,
                None,
                "InvalidParameterException",
                400,
            ),
            (
                ErrorCode::TooLarge,
                Some(LimitCode::MaxKeyLength),
                "InvalidParameterException",
                400,
            ),
            (
                ErrorCode::TooLarge,
                Some(LimitCode::MaxDatasetBytes),
                "LimitExceededException",
                400,
            ),
            (
                ErrorCode::LimitExceeded,
                Some(LimitCode::MaxRecords),
                "LimitExceededException",
                400,
            ),
            (ErrorCode::Conflict, None, "ResourceConflictException", 409),
            (ErrorCode::NotFound, None, "ResourceNotFoundException", 404),
            (ErrorCode::Forbidden, None, "NotAuthorizedException", 403),
            (
                ErrorCode::RateLimited,
                None,
                "TooManyRequestsException",
                429,
            ),
            (ErrorCode::Unavailable, None, "InternalErrorException", 503),
            (ErrorCode::Internal, None, "InternalErrorException", 500),
        ];
        for (code, limit, shape, status) in cases {
            let error_type = ErrorType::from_tandem(code, limit);
            assert_eq!(
                (error_type.shape(), error_type.status()),
                (shape, status),
                "{code:?}"
            );
        }
    }

    #[test]
    fn test_render_json_1_1_answers_400_but_for_internal_errors() {
        let err = CognitoError::new(
            ErrorType::NotAuthorized,
            "Access to Identity 'x' is forbidden.",
        );
        assert_eq!(err.render_json_1_1().status, 400);
        assert_eq!(err.render().status, 403);
        let internal = CognitoError::new(ErrorType::InternalError, "internal");
        assert_eq!(internal.render_json_1_1().status, 500);
    }
}
