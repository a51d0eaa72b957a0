//! A SigV4 signer for Cognito Sync requests, written from the AWS rules (COGNITO.md §5.5)
//! the way botocore signs: dot segments removed, the already-encoded path encoded once more, the query sorted,
//! `host`, `x-amz-date` and the session token signed, the body's SHA-256 in the hash.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::time::{SystemTime, UNIX_EPOCH};

/// Temporary credentials from GetCredentialsForIdentity, or a static key (an empty
/// `session_token`: the header is then neither sent nor signed).
#[derive(Debug, Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_key: String,
    pub session_token: String,
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes a key of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return [0; 32],
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// `YYYYMMDDTHHMMSSZ` of `t` (UTC).
pub fn amz_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The `Authorization` header for a request to `host` (as sent in `Host`) signed at `date`
/// (`amz_date`) in `region`.
pub fn authorization(
    creds: &Credentials,
    region: &str,
    method: &str,
    host: &str,
    path_and_query: &str,
    body: &[u8],
    date: &str,
) -> String {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    // `.` and `..` segments go, as botocore removes them before signing.
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    let path = format!("/{}", segments.join("/"));
    let mut canonical_uri = String::with_capacity(path.len() + 16);
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            canonical_uri.push(char::from(b));
        } else {
            canonical_uri.push_str(&format!("%{b:02X}"));
        }
    }
    let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    pairs.sort_unstable();
    let canonical_query = pairs.join("&");
    // No session token: a static key (Tandem's developer key), signed without the header.
    let (signed_headers, token_line) = if creds.session_token.is_empty() {
        ("host;x-amz-date", String::new())
    } else {
        (
            "host;x-amz-date;x-amz-security-token",
            format!("x-amz-security-token:{}\n", creds.session_token),
        )
    };
    let canonical = format!(
        "{method}\n{canonical_uri}\n{canonical_query}\nhost:{host}\nx-amz-date:{date}\n{token_line}\n{signed_headers}\n{}",
        hex(&Sha256::digest(body))
    );
    let day = date.get(..8).unwrap_or(date);
    let scope = format!("{day}/{region}/cognito-sync/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let k_date = hmac(
        format!("AWS4{}", creds.secret_key).as_bytes(),
        day.as_bytes(),
    );
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, b"cognito-sync");
    let k_signing = hmac(&k_service, b"aws4_request");
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={}",
        creds.access_key_id,
        hex(&hmac(&k_signing, to_sign.as_bytes()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn test_amz_date_is_utc_civil_time() {
        let t = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        assert_eq!(amz_date(t), "20150830T123600Z");
    }

    /// The AWS SigV4 test suite's key derivation example (secret, date, region, service).
    #[test]
    fn test_signing_key_matches_the_aws_example() {
        let k_date = hmac(b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", b"20150830");
        let k_region = hmac(&k_date, b"us-east-1");
        let k_service = hmac(&k_region, b"iam");
        let k_signing = hmac(&k_service, b"aws4_request");
        assert_eq!(
            hex(&k_signing),
            "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
        );
    }
}
