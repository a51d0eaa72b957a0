//! The developer key (COGNITO.md §5.6): a static access key id and secret the deployment
//! configures (`--cognito-admin-key AKID:SECRET`). A request SigV4-signed with it and with no
//! session token is the pool's developer: it may address any identity of the pool and the
//! developer-only operations. The secret is never compared as such: it keys the signature,
//! which [`crate::sigv4::verify`] compares in constant time; the access key id is compared
//! in constant time too, so timing tells nothing about either.

use subtle::ConstantTimeEq;

/// The shortest secret accepted: a guessable developer secret would open every identity.
pub const MIN_SECRET_LEN: usize = 16;
/// The longest access key id or secret accepted.
pub const MAX_PART_LEN: usize = 128;

/// A configured developer key.
#[derive(Clone, PartialEq, Eq)]
pub struct DeveloperKey {
    access_key_id: String,
    secret: String,
}

impl std::fmt::Debug for DeveloperKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeveloperKey")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl DeveloperKey {
    /// `AKID:SECRET`: the id 1 to 128 of `[A-Za-z0-9_-]` (it sits in the credential scope,
    /// between `/`s), the secret 16 to 128 printable ASCII characters without spaces.
    pub fn parse(s: &str) -> Result<DeveloperKey, String> {
        let (id, secret) = s
            .split_once(':')
            .ok_or("invalid cognito admin key: expected AKID:SECRET")?;
        if id.is_empty()
            || id.len() > MAX_PART_LEN
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "invalid cognito admin key: the access key id must be 1 to {MAX_PART_LEN} of [A-Za-z0-9_-]"
            ));
        }
        if secret.len() < MIN_SECRET_LEN
            || secret.len() > MAX_PART_LEN
            || !secret.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(format!(
                "invalid cognito admin key: the secret must be {MIN_SECRET_LEN} to {MAX_PART_LEN} printable ASCII characters without spaces"
            ));
        }
        Ok(DeveloperKey {
            access_key_id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The access key id.
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    /// The secret access key, for a signature check.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Whether a signature's access key id is this key's (in constant time).
    pub fn is(&self, access_key_id: &str) -> bool {
        bool::from(
            self.access_key_id
                .as_bytes()
                .ct_eq(access_key_id.as_bytes()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_developer_key_parse() {
        let key = DeveloperKey::parse("AKIDEV123:0123456789abcdef/+=").unwrap();
        assert_eq!(key.access_key_id(), "AKIDEV123");
        assert_eq!(key.secret(), "0123456789abcdef/+=");
        assert!(key.is("AKIDEV123"));
        assert!(!key.is("AKIDEV12"));
        assert!(!format!("{key:?}").contains("0123456789abcdef"));
        for bad in [
            "no-colon",
            ":0123456789abcdef",
            "AK/ID:0123456789abcdef",
            "AKID:short",
            "AKID:0123456789 abcdef",
        ] {
            assert!(DeveloperKey::parse(bad).is_err(), "{bad}");
        }
    }
}
