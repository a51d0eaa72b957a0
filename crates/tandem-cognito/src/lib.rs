//! The foundation of Tandem's Cognito Sync and Cognito Identity compatibility
//! (`shared/COGNITO.md`): SigV4 verification of Sync requests ([`sigv4`]), the stateless
//! temporary credentials the Identity endpoint issues and the verifier accepts
//! ([`credentials`]), and the Cognito error shapes as the AWS SDKs parse them ([`error`]).
//!
//! It is pure: no HTTP types, no store, no clock of its own (every check takes `now`). The
//! routes, the store mapping and the access rule (an identity reaches only its own data, the
//! [`developer`] key any) belong to the gateway: its Cognito Identity endpoint issues
//! [`credentials`], its Sync API verifies them.

pub mod credentials;
pub mod developer;
pub mod error;
pub mod sigv4;

pub use credentials::{CredentialKeys, Credentials, SessionClaims};
pub use developer::DeveloperKey;
pub use error::{CognitoError, ErrorResponse, ErrorType};
pub use sigv4::{KeyQuery, SignedRequest, Verified, verify, verify_for};
