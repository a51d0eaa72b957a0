//! Where connections get their tokens: minted per load-test identity from an HS256 secret,
//! or read from a file (one token per line, handed out round-robin by connection slot).

use crate::cli::Common;
use crate::error::LoadError;
use std::time::Duration;

#[derive(Clone)]
pub enum Tokens {
    /// Mint a token for each identity the scenario names.
    Mint {
        secret: Vec<u8>,
        ttl: Duration,
        issuer: Option<String>,
        audience: Option<String>,
    },
    /// Fixed tokens; identities are whatever they name (learned from `ready`).
    File(Vec<String>),
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokens::Mint { ttl, .. } => f.debug_struct("Mint").field("ttl", ttl).finish(),
            Tokens::File(lines) => f.debug_tuple("File").field(&lines.len()).finish(),
        }
    }
}

impl Tokens {
    /// From the options; `ttl` should outlast the whole run.
    pub fn from_options(common: &Common, ttl: Duration) -> Result<Tokens, LoadError> {
        if let Some(path) = &common.token_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| LoadError::Tokens(format!("cannot read {}: {e}", path.display())))?;
            let lines: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            if lines.is_empty() {
                return Err(LoadError::Tokens(format!(
                    "{} holds no tokens",
                    path.display()
                )));
            }
            return Ok(Tokens::File(lines));
        }
        let secret = match (&common.secret, &common.secret_file) {
            (Some(secret), _) => secret.as_bytes().to_vec(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| LoadError::Tokens(format!("cannot read {}: {e}", path.display())))?
                .trim()
                .as_bytes()
                .to_vec(),
            (None, None) => {
                return Err(LoadError::Options(
                    "give --secret (or TANDEM_JWT_SECRET), --secret-file or --token-file".into(),
                ));
            }
        };
        let tokens = Tokens::Mint {
            secret,
            ttl,
            issuer: common.jwt_issuer.clone(),
            audience: common.jwt_audience.clone(),
        };
        // Fail on a bad secret now rather than once per connection.
        tokens.token(0, "tandem-loadtest-probe")?;
        Ok(tokens)
    }

    /// The token for connection `slot`, which the scenario calls `identity`.
    pub fn token(&self, slot: usize, identity: &str) -> Result<String, LoadError> {
        match self {
            Tokens::Mint {
                secret,
                ttl,
                issuer,
                audience,
            } => tandem_token::mint_hs256(
                secret,
                identity,
                *ttl,
                issuer.as_deref(),
                audience.as_deref(),
            )
            .map_err(|e| LoadError::Tokens(format!("cannot mint a token: {e}"))),
            Tokens::File(lines) => Ok(lines[slot % lines.len()].clone()),
        }
    }
}
