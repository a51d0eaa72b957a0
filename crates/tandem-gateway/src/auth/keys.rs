//! The keys a [`Verifier`](super::Verifier) checks signatures with, parsed and checked once
//! from an [`AuthConfig`] and the [`IssuerConfig`]s, with the validation rules for each
//! issuer and algorithm.

use super::config::MAX_LEEWAY_SECS;
use super::jwks::{HttpFetcher, JwksCache};
use super::{AuthConfig, AuthError, IssuerConfig, JwksConfig, KeySource};
use jsonwebtoken::crypto::rust_crypto;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use tandem_token::{check_secret, check_subject, ensure_crypto_provider};

/// The smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;

/// Everything a `Verifier` checks with, parsed and checked once.
pub(super) struct Keys {
    /// The keys of [`AuthConfig`]; `None` when it holds none.
    pub(super) default: Option<IssuerKeys>,
    /// The further issuers, by their exact `iss`.
    pub(super) issuers: HashMap<String, IssuerKeys>,
    pub(super) leeway_secs: u64,
}

/// One issuer's keys and the claims its tokens must carry.
pub(super) struct IssuerKeys {
    pub(super) issuer: Option<String>,
    pub(super) audience: Option<String>,
    pub(super) subject_prefix: Option<String>,
    pub(super) hs256: Option<DecodingKey>,
    pub(super) rs256: Vec<DecodingKey>,
    pub(super) es256: Vec<DecodingKey>,
    pub(super) jwks: Option<Arc<JwksCache>>,
    pub(super) hs256_validation: Validation,
    pub(super) rs256_validation: Validation,
    pub(super) es256_validation: Validation,
}

impl Keys {
    /// Parses and checks every key; see [`Verifier::with_issuers`](super::Verifier::with_issuers).
    pub(super) fn load(
        config: &AuthConfig,
        issuers: &[IssuerConfig],
        jwks: &JwksConfig,
    ) -> Result<Keys, AuthError> {
        ensure_crypto_provider();
        if config.leeway_secs > MAX_LEEWAY_SECS {
            return Err(AuthError::InvalidLeeway(config.leeway_secs));
        }
        let default = default_keys(config)?;
        if default.is_none() && issuers.is_empty() {
            return Err(AuthError::NoKeys);
        }

        let mut by_issuer = HashMap::new();
        // One HTTP client for every JWKS URL, made only if there is one.
        let mut http = None;
        for issuer in issuers {
            let name = &issuer.issuer;
            let taken_by_default = default
                .as_ref()
                .is_some_and(|keys| keys.issuer.as_deref() == Some(name.as_str()));
            if taken_by_default || by_issuer.contains_key(name) {
                return Err(AuthError::BadIssuerConfig(format!(
                    "issuer {name:?}: configured twice (the default keys count as one)"
                )));
            }
            let keys = issuer_keys(issuer, config.leeway_secs, jwks, &mut http)?;
            by_issuer.insert(name.clone(), keys);
        }

        Ok(Keys {
            default,
            issuers: by_issuer,
            leeway_secs: config.leeway_secs,
        })
    }
}

/// The keys of [`AuthConfig`] itself, or `None` when it holds none.
fn default_keys(config: &AuthConfig) -> Result<Option<IssuerKeys>, AuthError> {
    if config.hs256_secret.is_none()
        && config.rs256_public_keys.is_empty()
        && config.es256_public_keys.is_empty()
    {
        return Ok(None);
    }
    let mut keys = IssuerKeys::new(
        config.issuer.clone(),
        config.audience.clone(),
        None,
        config.leeway_secs,
    );
    if let Some(secret) = &config.hs256_secret {
        check_secret(secret)?;
        keys.hs256 = Some(DecodingKey::from_secret(secret));
    }
    (keys.rs256, keys.es256) = pem_keys(&config.rs256_public_keys, &config.es256_public_keys)
        .map_err(AuthError::BadKey)?;
    Ok(Some(keys))
}

fn issuer_keys(
    issuer: &IssuerConfig,
    leeway_secs: u64,
    jwks: &JwksConfig,
    http: &mut Option<Arc<HttpFetcher>>,
) -> Result<IssuerKeys, AuthError> {
    let name = &issuer.issuer;
    let bad = |why: &str| AuthError::BadIssuerConfig(format!("issuer {name:?}: {why}"));
    if name.is_empty() {
        return Err(AuthError::BadIssuerConfig("an issuer is empty".to_owned()));
    }
    if let Some(prefix) = &issuer.subject_prefix {
        check_subject(prefix).map_err(|_| bad("subject prefix is not a valid subject"))?;
    }
    let mut keys = IssuerKeys::new(
        Some(name.clone()),
        issuer.audience.clone(),
        issuer.subject_prefix.clone(),
        leeway_secs,
    );
    match &issuer.keys {
        KeySource::Pem {
            rs256_public_keys,
            es256_public_keys,
        } => {
            if rs256_public_keys.is_empty() && es256_public_keys.is_empty() {
                return Err(bad("no keys"));
            }
            (keys.rs256, keys.es256) = pem_keys(rs256_public_keys, es256_public_keys)
                .map_err(|why| AuthError::BadKey(format!("issuer {name:?}: {why}")))?;
        }
        KeySource::JwksFile(path) => {
            check_jwks_config(jwks)?;
            let cache = JwksCache::from_file(name, path, jwks).map_err(|why| bad(&why))?;
            keys.jwks = Some(Arc::new(cache));
        }
        KeySource::JwksUrl(url) => {
            check_jwks_config(jwks)?;
            let client = match http {
                Some(client) => Arc::clone(client),
                None => {
                    Arc::clone(http.insert(Arc::new(HttpFetcher::new().map_err(|why| bad(&why))?)))
                }
            };
            let cache = JwksCache::from_url(name, url, client, jwks).map_err(|why| bad(&why))?;
            keys.jwks = Some(Arc::new(cache));
        }
    }
    Ok(keys)
}

impl IssuerKeys {
    /// An issuer's claim rules, without any key yet.
    fn new(
        issuer: Option<String>,
        audience: Option<String>,
        subject_prefix: Option<String>,
        leeway_secs: u64,
    ) -> IssuerKeys {
        let validation =
            |alg| validation_for(alg, issuer.as_deref(), audience.as_deref(), leeway_secs);
        IssuerKeys {
            hs256_validation: validation(Algorithm::HS256),
            rs256_validation: validation(Algorithm::RS256),
            es256_validation: validation(Algorithm::ES256),
            issuer,
            audience,
            subject_prefix,
            hs256: None,
            rs256: Vec::new(),
            es256: Vec::new(),
            jwks: None,
        }
    }
}

impl fmt::Debug for IssuerKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerKeys")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("subject_prefix", &self.subject_prefix)
            .field("hs256", &self.hs256.is_some())
            .field("rs256_keys", &self.rs256.len())
            .field("es256_keys", &self.es256.len())
            .field("jwks", &self.jwks.is_some())
            .finish()
    }
}

fn pem_keys(
    rs256: &[Vec<u8>],
    es256: &[Vec<u8>],
) -> Result<(Vec<DecodingKey>, Vec<DecodingKey>), String> {
    let rs256 = rs256
        .iter()
        .enumerate()
        .map(|(index, pem)| rsa_public_key(index, pem))
        .collect::<Result<Vec<_>, _>>()?;
    let es256 = es256
        .iter()
        .enumerate()
        .map(|(index, pem)| ec_public_key(index, pem))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((rs256, es256))
}

/// Zero would mean a fetch loop without pause, an empty document or no key ever kept.
fn check_jwks_config(jwks: &JwksConfig) -> Result<(), AuthError> {
    let bad = |why: &str| Err(AuthError::BadIssuerConfig(format!("jwks settings: {why}")));
    if jwks.refresh_interval.is_zero() {
        return bad("refresh interval must be above zero");
    }
    if jwks.fetch_timeout.is_zero() {
        return bad("fetch timeout must be above zero");
    }
    if jwks.max_document_bytes == 0 {
        return bad("max document bytes must be above zero");
    }
    if jwks.max_keys == 0 {
        return bad("max keys must be above zero");
    }
    Ok(())
}

fn rsa_public_key(index: usize, pem: &[u8]) -> Result<DecodingKey, String> {
    let bad = |why: &str| format!("rs256 public key {index}: {why}");
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
    rsa_key_from_components(&n, &e).map_err(bad)
}

/// An RS256 key from its modulus and exponent (big-endian), refused below 2048 bits.
pub(super) fn rsa_key_from_components(n: &[u8], e: &[u8]) -> Result<DecodingKey, &'static str> {
    if modulus_bits(n) < MIN_RSA_BITS {
        return Err("rsa key shorter than 2048 bits");
    }
    Ok(DecodingKey::from_rsa_raw_components(n, e))
}

fn ec_public_key(index: usize, pem: &[u8]) -> Result<DecodingKey, String> {
    let bad = |why: &str| format!("es256 public key {index}: {why}");
    let key = DecodingKey::from_ec_pem(pem).map_err(|_| bad("not an ec public key pem"))?;
    check_p256(key).map_err(bad)
}

/// Passes an ES256 key through if it is a point on P-256.
pub(super) fn check_p256(key: DecodingKey) -> Result<DecodingKey, &'static str> {
    // Building a verifier decodes the point on P-256, which rejects other curves.
    (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(&Algorithm::ES256, &key)
        .map_err(|_| "not a p-256 public key")?;
    Ok(key)
}

fn modulus_bits(n: &[u8]) -> usize {
    let leading_zero_bytes = n.iter().take_while(|b| **b == 0).count();
    match n.get(leading_zero_bytes) {
        Some(first) => (n.len() - leading_zero_bytes) * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

fn validation_for(
    alg: Algorithm,
    issuer: Option<&str>,
    audience: Option<&str>,
    leeway_secs: u64,
) -> Validation {
    let mut validation = Validation::new(alg);
    let mut required = vec!["exp", "sub"];
    validation.leeway = leeway_secs;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    if let Some(issuer) = issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    match audience {
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
