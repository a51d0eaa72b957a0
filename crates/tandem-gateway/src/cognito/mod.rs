//! Cognito compatibility (`shared/COGNITO.md`): the settings section ([`config`]) and the
//! Cognito Identity endpoint ([`identity`]). The wire pieces with no HTTP in them (SigV4,
//! credentials, error shapes) are `tandem-cognito`'s.

pub mod config;
pub(crate) mod identity;

pub use config::CognitoConfig;
