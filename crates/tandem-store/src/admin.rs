//! What a pool's developer (an administrator, not an identity) reads and configures: the
//! identities of a pool a page at a time, the pool's usage, and the pool's settings, a small
//! map of named values every node reads from the store (a per-pool sync hook, the state of a
//! bulk publish). The types and the validation every backend runs before any I/O; the SQL
//! lives in each backend's `admin` module.
//!
//! A setting is written only through a compare-and-swap ([`Expect`]), so two nodes racing to
//! start the same pool-wide job cannot both win; what a value means is the caller's.

use crate::{StoreError, validate_identity};

/// The longest setting name, in bytes.
pub const MAX_SETTING_NAME: usize = 128;
/// The longest setting value, in bytes.
pub const MAX_SETTING_VALUE: usize = 64 * 1024;
/// The most identities one page may ask for.
pub const MAX_IDENTITY_PAGE: usize = 1000;

/// An identity as a developer lists it: merged-away identities are not listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySummary {
    pub id: String,
    /// The providers of its linked logins, distinct, ordered.
    pub providers: Vec<String>,
    /// When it was created (ms).
    pub created_at: i64,
    /// When it last changed: its creation or its latest linked login (ms).
    pub last_modified: i64,
}

/// A pool's usage: its live (not merged-away) identities and live datasets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    pub identities: u64,
    pub datasets: u64,
    /// The live records' bytes over all live datasets (`record_bytes`).
    pub bytes: u64,
    /// The latest change of a live dataset (ms), if there is one.
    pub last_modified: Option<i64>,
}

/// What a setting must hold for [`crate::Store::put_pool_setting`] to write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect<'a> {
    /// Whatever it holds.
    Any,
    /// Exactly this value (`None`: the setting is unset).
    Value(Option<&'a str>),
}

/// Checks a setting call before any I/O: a pool, a name of 1 to 128 bytes and a value of at
/// most 64 KiB, neither with NUL (PostgreSQL's `text` cannot hold it).
pub(crate) fn validate_setting(
    pool: &str,
    name: &str,
    values: &[Option<&str>],
) -> Result<(), StoreError> {
    validate_identity(pool)?;
    if name.is_empty() || name.len() > MAX_SETTING_NAME || name.chars().any(char::is_control) {
        return Err(StoreError::BadRequest(format!(
            "a pool setting name must be 1 to {MAX_SETTING_NAME} bytes without control characters"
        )));
    }
    for value in values.iter().flatten() {
        if value.len() > MAX_SETTING_VALUE || value.contains('\0') {
            return Err(StoreError::BadRequest(format!(
                "a pool setting value must be at most {MAX_SETTING_VALUE} bytes without NUL"
            )));
        }
    }
    Ok(())
}

/// The values an [`Expect`] names, for validation.
pub(crate) fn expected_values<'a>(expect: &Expect<'a>) -> Option<&'a str> {
    match expect {
        Expect::Any | Expect::Value(None) => None,
        Expect::Value(Some(v)) => Some(v),
    }
}

/// Checks a page request: a pool, an identity id to start after (if any), 1 to 1000 rows.
pub(crate) fn validate_identity_page(
    pool: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<(), StoreError> {
    validate_identity(pool)?;
    if let Some(after) = after {
        crate::validate_identity_id(after)?;
    }
    if limit == 0 || limit > MAX_IDENTITY_PAGE {
        return Err(StoreError::BadRequest(format!(
            "an identity page holds 1 to {MAX_IDENTITY_PAGE} identities"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_validate_setting_bounds_name_and_value() {
        assert!(validate_setting("default", "events.SyncTrigger", &[Some("x")]).is_ok());
        assert!(validate_setting("default", "", &[None]).is_err());
        assert!(validate_setting("default", &"n".repeat(129), &[None]).is_err());
        let big = "v".repeat(MAX_SETTING_VALUE + 1);
        assert!(validate_setting("default", "n", &[Some(&big)]).is_err());
        assert!(validate_setting("default", "n", &[None, Some("a\0b")]).is_err());
    }

    #[test]
    fn test_validate_identity_page_bounds() {
        assert!(validate_identity_page("default", None, 60).is_ok());
        assert!(validate_identity_page("default", None, 0).is_err());
        assert!(validate_identity_page("default", Some("not an id"), 1).is_err());
        assert!(
            validate_identity_page(
                "default",
                Some("us-east-1:0f6a6b1e-2d7c-4f1b-9a55-3c8e9e2b7a10"),
                MAX_IDENTITY_PAGE + 1
            )
            .is_err()
        );
    }
}
