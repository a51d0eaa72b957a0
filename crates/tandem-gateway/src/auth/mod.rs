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
//! Further issuers each bring their own keys (PEM keys, a JWKS file, or a JWKS URL fetched
//! over HTTPS into a cache that background tasks refresh) and audience; a token's `iss`
//! picks them. The same map from issuer to keys and audience serves login providers that
//! name the issuer themselves ([`Verifier::verify_issued_by`]).
//!
//! This module does not read configuration from the environment and does not decide what an
//! identity may access. Verification never waits on the network and never logs; only the
//! JWKS refresh tasks log, once per fetch outage.
//!
//! By job: `config` (what a verifier accepts), `keys` (loading and checking the keys once),
//! `jwks` (cached key sets and their refresh), `verify` (a token in, an identity out) and
//! `error`.

mod config;
mod error;
mod jwks;
mod keys;
#[cfg(test)]
mod tests;
mod verify;

pub use config::{
    AuthConfig, DEFAULT_JWKS_FETCH_TIMEOUT, DEFAULT_JWKS_MAX_DOCUMENT_BYTES, DEFAULT_JWKS_MAX_KEYS,
    DEFAULT_JWKS_REFRESH_INTERVAL, DEFAULT_JWKS_RETIRED_KEY_TTL, DEFAULT_JWKS_UNKNOWN_KID_COOLDOWN,
    DEFAULT_LEEWAY_SECS, IssuerConfig, JwksConfig, KeySource, MAX_LEEWAY_SECS,
};
pub use error::AuthError;
pub use jwks::JwksStats;
pub(crate) use jwks::client_tls;
pub use tandem_token::{MAX_SUBJECT_BYTES, MIN_HS256_SECRET_BYTES};
pub use verify::{Identity, MAX_TOKEN_BYTES, Verifier};
