//! JWT authentication: a [`Verifier`] built once from an [`AuthConfig`] that turns a bearer
//! token into an [`Identity`]. Minting tokens is `tandem-token`'s job; the secret and subject
//! rules come from there, so a minted token always meets them.
//!
//! Algorithms are pinned: HS256 with a shared secret, RS256 and ES256 with PEM public keys.
//! The algorithm named in a token's header only ever selects among the keys configured for
//! exactly that algorithm, so `alg: none`, other algorithms and algorithm confusion (an
//! HS256 token "signed" with an RSA public key's PEM bytes) are refused. `exp` and `sub` are
//! required, `nbf` is honoured, `iss` and `aud` are required and checked when configured.
//!
//! This module does not read configuration from the environment, does not log, and does not
//! decide what an identity may access.
//!
//! By job: `config` (what a verifier accepts), `keys` (loading and checking the keys once),
//! `verify` (a token in, an identity out) and `error`.

mod config;
mod error;
mod keys;
#[cfg(test)]
mod tests;
mod verify;

pub use config::{AuthConfig, DEFAULT_LEEWAY_SECS, MAX_LEEWAY_SECS};
pub use error::AuthError;
pub use tandem_token::{MAX_SUBJECT_BYTES, MIN_HS256_SECRET_BYTES};
pub use verify::{Identity, MAX_TOKEN_BYTES, Verifier};
