//! The keys a [`Verifier`](super::Verifier) checks signatures with, parsed and checked once
//! from an [`AuthConfig`], with the validation rules for each algorithm.

use super::config::MAX_LEEWAY_SECS;
use super::{AuthConfig, AuthError};
use jsonwebtoken::crypto::rust_crypto;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tandem_token::{check_secret, ensure_crypto_provider};

/// The smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;

/// Everything a `Verifier` checks with, parsed and checked once.
pub(super) struct Keys {
    pub(super) hs256: Option<DecodingKey>,
    pub(super) rs256: Vec<DecodingKey>,
    pub(super) es256: Vec<DecodingKey>,
    pub(super) hs256_validation: Validation,
    pub(super) rs256_validation: Validation,
    pub(super) es256_validation: Validation,
    pub(super) issuer: Option<String>,
    pub(super) audience: Option<String>,
    pub(super) leeway_secs: u64,
}

impl Keys {
    /// Parses and checks every key; see [`Verifier::new`](super::Verifier::new).
    pub(super) fn load(config: &AuthConfig) -> Result<Keys, AuthError> {
        ensure_crypto_provider();

        if config.hs256_secret.is_none()
            && config.rs256_public_keys.is_empty()
            && config.es256_public_keys.is_empty()
        {
            return Err(AuthError::NoKeys);
        }
        if config.leeway_secs > MAX_LEEWAY_SECS {
            return Err(AuthError::InvalidLeeway(config.leeway_secs));
        }

        let hs256 = match &config.hs256_secret {
            Some(secret) => {
                check_secret(secret)?;
                Some(DecodingKey::from_secret(secret))
            }
            None => None,
        };
        let rs256 = config
            .rs256_public_keys
            .iter()
            .enumerate()
            .map(|(index, pem)| rsa_public_key(index, pem))
            .collect::<Result<Vec<_>, _>>()?;
        let es256 = config
            .es256_public_keys
            .iter()
            .enumerate()
            .map(|(index, pem)| ec_public_key(index, pem))
            .collect::<Result<Vec<_>, _>>()?;

        let validation = |alg| validation_for(alg, config);
        Ok(Keys {
            hs256,
            rs256,
            es256,
            hs256_validation: validation(Algorithm::HS256),
            rs256_validation: validation(Algorithm::RS256),
            es256_validation: validation(Algorithm::ES256),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway_secs: config.leeway_secs,
        })
    }
}

fn rsa_public_key(index: usize, pem: &[u8]) -> Result<DecodingKey, AuthError> {
    let bad = |why: &str| AuthError::BadKey(format!("rs256 public key {index}: {why}"));
    let key = DecodingKey::from_rsa_pem(pem).map_err(|_| bad("not an rsa pem key"))?;
    let der = key
        .try_get_as_bytes()
        .map_err(|_| bad("not an rsa pem key"))?;
    // `from_rsa_pem` also accepts private keys and defers parsing to each verification;
    // parse the public key now so a bad one fails at startup, not on every request.
    let (n, e) = (rust_crypto::DEFAULT_PROVIDER
        .key_utils
        .rsa_pub_components_from_public_key)(der)
    .map_err(|_| bad("not an rsa public key"))?;
    if modulus_bits(&n) < MIN_RSA_BITS {
        return Err(bad("rsa key shorter than 2048 bits"));
    }
    Ok(DecodingKey::from_rsa_raw_components(&n, &e))
}

fn ec_public_key(index: usize, pem: &[u8]) -> Result<DecodingKey, AuthError> {
    let bad = |why: &str| AuthError::BadKey(format!("es256 public key {index}: {why}"));
    let key = DecodingKey::from_ec_pem(pem).map_err(|_| bad("not an ec public key pem"))?;
    // Building a verifier decodes the point on P-256, which rejects other curves.
    (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(&Algorithm::ES256, &key)
        .map_err(|_| bad("not a p-256 public key"))?;
    Ok(key)
}

fn modulus_bits(n: &[u8]) -> usize {
    let leading_zero_bytes = n.iter().take_while(|b| **b == 0).count();
    match n.get(leading_zero_bytes) {
        Some(first) => (n.len() - leading_zero_bytes) * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

fn validation_for(alg: Algorithm, config: &AuthConfig) -> Validation {
    let mut validation = Validation::new(alg);
    let mut required = vec!["exp", "sub"];
    validation.leeway = config.leeway_secs;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    if let Some(issuer) = &config.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    match &config.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            validation.validate_aud = true;
            required.push("aud");
        }
        // jsonwebtoken rejects any token carrying `aud` when no audience is set.
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}
