//! SigV4 verification of a Cognito Sync request (COGNITO.md §5), in the order §5 gives:
//! the `Authorization` header, the credential scope, the clock skew, the access key and its
//! session token (through a caller's lookup), then the signature over the canonical request.
//!
//! The canonical request is rebuilt from the request as received, never from a decoded
//! form: all three SDKs sign the path they send percent-encoded a second time (`%3A` signs
//! as `%253A`), so a verifier that decodes first rejects every SDK. The verifier knows
//! nothing of where secrets come from: [`verify`] asks the caller's lookup for the secret
//! of an access key id, and the lookup checks the session token (see
//! [`crate::credentials::CredentialKeys::lookup`]).

use crate::error::{CognitoError, ErrorType};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;

/// The service name a Cognito Sync signature must be scoped to.
pub const SERVICE: &str = "cognito-sync";
/// How far `X-Amz-Date` may be from the server's clock, either way.
pub const MAX_SKEW: Duration = Duration::from_secs(5 * 60);

const ALGORITHM: &str = "AWS4-HMAC-SHA256";
const MISMATCH: &str = "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.";

type HmacSha256 = Hmac<Sha256>;

/// A request as received, before any decoding.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    /// The method, as sent (`GET`, `POST`, …).
    pub method: &'a str,
    /// The path exactly as received, still percent-encoded.
    pub path: &'a str,
    /// The raw query string, without the `?`; empty when there is none.
    pub query: &'a str,
    /// Every header as received, in order; a name may repeat.
    pub headers: &'a [(&'a str, &'a [u8])],
    /// The raw body.
    pub body: &'a [u8],
}

/// What a lookup is asked: the access key id of the signature and the session token sent
/// with it, if any.
#[derive(Debug, Clone, Copy)]
pub struct KeyQuery<'a> {
    /// `AKID` from the credential scope.
    pub access_key_id: &'a str,
    /// The `X-Amz-Security-Token` header.
    pub session_token: Option<&'a str>,
}

/// A verified request: who signed it and under which scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<P> {
    /// What the lookup returned for the key: the identity behind the credentials.
    pub principal: P,
    /// The access key id that signed.
    pub access_key_id: String,
    /// The region of the credential scope.
    pub region: String,
}

/// Verifies `request` at `now`. `lookup` maps the signature's access key id and session
/// token to the secret access key and a principal, or to the error the client sees
/// (`UnrecognizedClientException`, `ExpiredTokenException`, `NotAuthorizedException`).
pub fn verify<P>(
    request: &SignedRequest<'_>,
    now: SystemTime,
    lookup: impl FnOnce(KeyQuery<'_>) -> Result<(String, P), CognitoError>,
) -> Result<Verified<P>, CognitoError> {
    verify_for(SERVICE, request, now, lookup)
}

/// [`verify`] for a signature scoped to `service` (`cognito-identity` for the Identity
/// API's developer operations).
pub fn verify_for<P>(
    service: &str,
    request: &SignedRequest<'_>,
    now: SystemTime,
    lookup: impl FnOnce(KeyQuery<'_>) -> Result<(String, P), CognitoError>,
) -> Result<Verified<P>, CognitoError> {
    let authorization = header_str(request.headers, "authorization")?.ok_or_else(|| {
        CognitoError::new(
            ErrorType::MissingAuthenticationToken,
            "Missing Authentication Token",
        )
    })?;
    let auth = parse_authorization(authorization)?;
    if !auth.signed_headers.contains(&"host") {
        return Err(incomplete(
            "'Host' must be a 'SignedHeader' in the AWS Authorization.",
        ));
    }
    let amz_date = header_str(request.headers, "x-amz-date")?.ok_or_else(|| {
        incomplete(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
        )
    })?;
    let signed_at = parse_amz_date(amz_date).ok_or_else(|| {
        incomplete(format!(
            "Date must be in ISO-8601 'basic format'. Got '{amz_date}'."
        ))
    })?;

    if auth.service != service {
        return Err(invalid(format!(
            "Credential should be scoped to correct service: '{service}'. "
        )));
    }
    if auth.date != &amz_date[..8] {
        return Err(invalid(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{}' != '{}', from '{amz_date}'.",
            auth.date,
            &amz_date[..8]
        )));
    }
    check_skew(signed_at, now)?;

    let session_token = header_str(request.headers, "x-amz-security-token")?;
    let (secret, principal) = lookup(KeyQuery {
        access_key_id: auth.access_key_id,
        session_token,
    })?;

    let canonical = canonical_request(request, &auth.signed_headers);
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let string_to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let key = signing_key(&secret, auth.date, auth.region, auth.service);
    let expected = hex(&hmac(&key, string_to_sign.as_bytes()));
    if !bool::from(expected.as_bytes().ct_eq(auth.signature.as_bytes())) {
        return Err(invalid(MISMATCH));
    }
    Ok(Verified {
        principal,
        access_key_id: auth.access_key_id.to_owned(),
        region: auth.region.to_owned(),
    })
}

/// The parts of an `Authorization` header.
struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Result<Authorization<'_>, CognitoError> {
    let rest = value
        .strip_prefix(ALGORITHM)
        .filter(|rest| rest.starts_with(' '))
        .ok_or_else(|| {
            incomplete(format!(
                "Authorization header requires the '{ALGORITHM}' algorithm."
            ))
        })?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (name, value) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| incomplete("Authorization header is malformed."))?;
        match name {
            "Credential" => credential = Some(value),
            "SignedHeaders" => signed_headers = Some(value),
            "Signature" => signature = Some(value),
            _ => return Err(incomplete("Authorization header is malformed.")),
        }
    }
    let credential = credential
        .ok_or_else(|| incomplete("Authorization header requires 'Credential' parameter."))?;
    let signed_headers = signed_headers
        .ok_or_else(|| incomplete("Authorization header requires 'SignedHeaders' parameter."))?;
    let signature = signature
        .ok_or_else(|| incomplete("Authorization header requires 'Signature' parameter."))?;

    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, terminator] = scope[..] else {
        return Err(incomplete(format!(
            "Credential should have 5 parts: AKID/YYYYMMDD/region/service/aws4_request. Got '{credential}'."
        )));
    };
    if access_key_id.is_empty()
        || date.len() != 8
        || !date.bytes().all(|b| b.is_ascii_digit())
        || region.is_empty()
        || terminator != "aws4_request"
    {
        return Err(incomplete(format!(
            "Credential should be of the form AKID/YYYYMMDD/region/service/aws4_request. Got '{credential}'."
        )));
    }
    if signature.len() != 64
        || !signature
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(incomplete(
            "Signature must be 64 lowercase hexadecimal characters.",
        ));
    }
    let signed_headers: Vec<&str> = signed_headers.split(';').collect();
    if signed_headers
        .iter()
        .any(|h| h.is_empty() || h.bytes().any(|b| b.is_ascii_uppercase()))
    {
        return Err(incomplete(
            "SignedHeaders must be lowercase names separated by ';'.",
        ));
    }
    Ok(Authorization {
        access_key_id,
        date,
        region,
        service,
        signed_headers,
        signature,
    })
}

fn check_skew(signed_at: u64, now: SystemTime) -> Result<(), CognitoError> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let skew = MAX_SKEW.as_secs();
    // AWS's own wording: aws-sdk v2 retries when the code contains "Signature" and the
    // message contains "expired" (COGNITO.md §8), after correcting its clock from `Date`.
    if signed_at + skew < now {
        return Err(invalid(format!(
            "Signature expired: {} is now earlier than {} ({} - 5 min.)",
            format_amz_date(signed_at),
            format_amz_date(now - skew),
            format_amz_date(now)
        )));
    }
    if signed_at > now + skew {
        return Err(invalid(format!(
            "Signature not yet current: {} is still later than {} ({} + 5 min.)",
            format_amz_date(signed_at),
            format_amz_date(now + skew),
            format_amz_date(now)
        )));
    }
    Ok(())
}

/// The canonical request of COGNITO.md §5.5.
fn canonical_request(request: &SignedRequest<'_>, signed_headers: &[&str]) -> String {
    let mut out = String::with_capacity(256 + request.path.len() + request.query.len());
    out.push_str(request.method);
    out.push('\n');
    out.push_str(&canonical_uri(request.path));
    out.push('\n');
    out.push_str(&canonical_query(request.query));
    out.push('\n');
    for name in signed_headers {
        out.push_str(name);
        out.push(':');
        out.push_str(&canonical_header_value(request.headers, name));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed_headers.join(";"));
    out.push('\n');
    out.push_str(&hex(&Sha256::digest(request.body)));
    out
}

/// The raw path with dot and empty segments removed (as botocore's `remove_dot_segments`,
/// keeping a trailing `/`), then every byte outside `A-Za-z0-9-_.~/` percent-encoded.
fn canonical_uri(raw_path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in raw_path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    let mut path = String::from("/");
    path.push_str(&segments.join("/"));
    if raw_path.ends_with('/') && !segments.is_empty() {
        path.push('/');
    }
    let mut out = String::with_capacity(path.len() + 16);
    percent_encode(path.as_bytes(), true, &mut out);
    out
}

/// The query split on `&` and the first `=`, each side decoded (`+` stays `+`) and
/// re-encoded with the unreserved set, sorted by name then value.
fn canonical_query(raw_query: &str) -> String {
    let mut pairs: Vec<(String, String)> = raw_query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let mut encoded_name = String::new();
            let mut encoded_value = String::new();
            percent_encode(&percent_decode(name), false, &mut encoded_name);
            percent_encode(&percent_decode(value), false, &mut encoded_value);
            (encoded_name, encoded_value)
        })
        .collect();
    pairs.sort();
    let mut out = String::with_capacity(raw_query.len() + 16);
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(value);
    }
    out
}

/// Every value of header `name`, each trimmed with inner runs of whitespace collapsed to
/// one space, joined with `,`. A signed header that is absent signs as empty, which then
/// fails as a mismatch.
fn canonical_header_value(headers: &[(&str, &[u8])], name: &str) -> String {
    let mut out = String::new();
    let mut first = true;
    for (_, value) in headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)) {
        if !first {
            out.push(',');
        }
        first = false;
        let value = String::from_utf8_lossy(value);
        let mut words = value.split_ascii_whitespace();
        if let Some(word) = words.next() {
            out.push_str(word);
        }
        for word in words {
            out.push(' ');
            out.push_str(word);
        }
    }
    out
}

fn percent_encode(bytes: &[u8], keep_slash: bool, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// Decodes `%XX`; a `%` not followed by two hex digits stays literal.
fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|b| hex_value(*b)),
                bytes.get(i + 2).and_then(|b| hex_value(*b)),
            )
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    hmac(&k_service, b"aws4_request")
}

pub(crate) fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("hmac accepts any key length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// The first value of header `name` as text; a value that is not UTF-8 is malformed.
fn header_str<'a>(
    headers: &[(&str, &'a [u8])],
    name: &str,
) -> Result<Option<&'a str>, CognitoError> {
    match headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
        None => Ok(None),
        Some((_, value)) => std::str::from_utf8(value)
            .map(|v| Some(v.trim()))
            .map_err(|_| incomplete(format!("Header '{name}' is not valid UTF-8."))),
    }
}

fn incomplete(message: impl Into<String>) -> CognitoError {
    CognitoError::new(ErrorType::IncompleteSignature, message)
}

fn invalid(message: impl Into<String>) -> CognitoError {
    CognitoError::new(ErrorType::InvalidSignature, message)
}

/// `YYYYMMDDTHHMMSSZ` to seconds since the epoch.
fn parse_amz_date(value: &str) -> Option<u64> {
    let b = value.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u64> {
        let digits = value.get(range)?;
        if !digits.bytes().all(|d| d.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hour, minute, second) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(year as i64, month as i64, day as i64);
    let days = u64::try_from(days).ok()?;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Seconds since the epoch to `YYYYMMDDTHHMMSSZ`.
fn format_amz_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// Howard Hinnant's civil-date algorithms: exact for the proleptic Gregorian calendar, and
// small enough that a date crate is not worth pulling in for one header.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests;
