//! Cognito compatibility (`shared/COGNITO.md`): the settings section ([`config`]), the
//! Cognito Identity endpoint ([`identity`]) and the Sync API ([`sync`]). The wire pieces with
//! no HTTP in them (SigV4, credentials, error shapes) are `tandem-cognito`'s.

mod admin;
mod caller;
pub mod config;
pub(crate) mod identity;
pub(crate) mod sync;
pub(crate) mod trigger;

pub use config::CognitoConfig;
