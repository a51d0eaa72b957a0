//! Reading a JWKS document (RFC 7517): the RS256 and ES256 signing keys it holds, each checked
//! as strictly as a configured PEM key. Entries that are not such keys are skipped, so a
//! document that also lists encryption keys or other algorithms still works; a document with
//! no usable key at all is refused, so a broken endpoint cannot empty the cache.

use super::super::keys::{check_p256, rsa_key_from_components};
use super::super::verify::base64url_decode;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

/// A usable signing key from a document.
#[derive(Clone)]
pub(in crate::auth) struct Jwk {
    pub(in crate::auth) kid: Option<String>,
    pub(in crate::auth) alg: Algorithm,
    pub(in crate::auth) key: DecodingKey,
    /// The public key's components as sent, to tell a rotated key from a re-listed one.
    pub(in crate::auth) material: Vec<u8>,
}

/// The keys of one document, and how many entries were skipped.
pub(in crate::auth) struct Document {
    pub(in crate::auth) keys: Vec<Jwk>,
    pub(in crate::auth) skipped: usize,
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

/// The members read from one entry; `deny_unknown_fields` is off on purpose, JWKs carry more.
#[derive(Deserialize)]
struct RawKey {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    key_ops: Option<Vec<String>>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

/// Parses a document of at most `max_keys` entries.
pub(in crate::auth) fn parse(bytes: &[u8], max_keys: usize) -> Result<Document, String> {
    let set: RawSet = serde_json::from_slice(bytes)
        .map_err(|_| "not a jwks document (json with a keys array)")?;
    if set.keys.len() > max_keys {
        return Err(format!(
            "document lists {} keys, more than max_keys {max_keys}",
            set.keys.len()
        ));
    }
    let total = set.keys.len();
    let keys: Vec<Jwk> = set.keys.into_iter().filter_map(signing_key).collect();
    if keys.is_empty() {
        return Err(format!(
            "document has no usable rs256 or es256 signing key ({total} entries skipped)"
        ));
    }
    Ok(Document {
        skipped: total - keys.len(),
        keys,
    })
}

/// The entry as a signing key, or `None` when it is not one this verifier uses.
fn signing_key(value: serde_json::Value) -> Option<Jwk> {
    let raw: RawKey = serde_json::from_value(value).ok()?;
    if raw.use_.as_deref().is_some_and(|use_| use_ != "sig")
        || raw
            .key_ops
            .as_ref()
            .is_some_and(|ops| !ops.iter().any(|op| op == "verify"))
    {
        return None;
    }
    // `oct` (a shared secret published in a key set) and every other type are never used.
    let (alg, alg_name, key, material) = match raw.kty.as_str() {
        "RSA" => {
            let n = base64url_decode(raw.n.as_deref()?)?;
            let e = base64url_decode(raw.e.as_deref()?)?;
            let key = rsa_key_from_components(&n, &e).ok()?;
            (Algorithm::RS256, "RS256", key, [n, e].concat())
        }
        "EC" if raw.crv.as_deref() == Some("P-256") => {
            let (x, y) = (raw.x.as_deref()?, raw.y.as_deref()?);
            let material = [base64url_decode(x)?, base64url_decode(y)?].concat();
            if material.len() != 64 {
                return None;
            }
            let key = check_p256(DecodingKey::from_ec_components(x, y).ok()?).ok()?;
            (Algorithm::ES256, "ES256", key, material)
        }
        _ => return None,
    };
    if raw.alg.as_deref().is_some_and(|named| named != alg_name) {
        return None;
    }
    Some(Jwk {
        kid: raw.kid,
        alg,
        key,
        material,
    })
}
