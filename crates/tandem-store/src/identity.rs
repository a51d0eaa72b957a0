//! Cognito-style identities in a pool, the logins linked to them, and the merge of a guest
//! into another identity: the types, the validation every backend runs before any I/O, and
//! the decisions every backend shares (which identity a set of logins names, which logins a
//! link adds, the name a merged dataset takes). The SQL lives in each backend; nothing here
//! touches a database.
//!
//! An identity is a guest until a login is linked to it. A merged identity keeps its row
//! with `merged_into`, so a caller can tell "merged away" from "never existed"; it can no
//! longer be linked, merged or merged into.

use crate::{StoreError, validate_identity};
use std::collections::BTreeSet;
use tandem_protocol::validate_dataset_name;

/// The longest identity id: the Cognito model's maximum.
pub const MAX_IDENTITY_ID: usize = 55;

/// The longest login provider name or subject, in bytes.
pub const MAX_LOGIN_PART: usize = 256;

/// The longest dataset name, which a merged copy's name is cut to.
const MAX_DATASET_NAME: usize = 128;

/// A login: a provider (the Logins map's key, e.g. `accounts.google.com`) and the subject
/// the provider's verified token names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Login {
    pub provider: String,
    pub subject: String,
}

impl Login {
    pub fn new(provider: impl Into<String>, subject: impl Into<String>) -> Self {
        Login {
            provider: provider.into(),
            subject: subject.into(),
        }
    }
}

impl std::fmt::Display for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.provider, self.subject)
    }
}

/// An identity as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    /// No login was ever linked to it.
    pub guest: bool,
    /// The identity it was merged into; it answers for nothing any more.
    pub merged_into: Option<String>,
    /// Its linked logins, ordered.
    pub logins: Vec<Login>,
}

/// What a merge did: every live dataset of the guest, where it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeOutcome {
    /// In the guest's name order.
    pub moved: Vec<MovedDataset>,
}

impl MergeOutcome {
    /// The names of the copies made because the target already had a dataset of that name.
    pub fn renamed(&self) -> Vec<&str> {
        self.moved
            .iter()
            .filter(|m| m.from_name != m.to_name)
            .map(|m| m.to_name.as_str())
            .collect()
    }
}

/// One dataset a merge moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovedDataset {
    /// Its name under the guest.
    pub from_name: String,
    /// Its name under the target: the same, or `<name>.<guest's uuid>` on a clash.
    pub to_name: String,
    /// The target dataset's sync count after the merge (the one commit that wrote it).
    pub sync_count: u64,
}

/// Checks an identity id: `<region>:<lowercase uuid>`, at most 55 characters, as the Cognito
/// model's pattern `[\w-]+:[0-9a-f-]+` and Tandem's generated ids require. The uuid must be
/// in its canonical 8-4-4-4-12 form; its version nibble is not checked.
pub fn validate_identity_id(id: &str) -> Result<(), StoreError> {
    let bad = |why: &str| StoreError::BadRequest(format!("invalid identity id: {why}"));
    if id.len() > MAX_IDENTITY_ID {
        return Err(bad("longer than 55 characters"));
    }
    let Some((region, uuid)) = id.split_once(':') else {
        return Err(bad("expected <region>:<uuid>"));
    };
    if region.is_empty()
        || !region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(bad("the region must be letters, digits, `_` or `-`"));
    }
    let canonical = uuid.len() == 36
        && uuid.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => matches!(c, '0'..='9' | 'a'..='f'),
        });
    if !canonical {
        return Err(bad("the uuid must be lowercase 8-4-4-4-12 hex"));
    }
    Ok(())
}

/// The uuid part of a valid identity id.
fn uuid_of(id: &str) -> &str {
    id.split_once(':').map_or(id, |(_, uuid)| uuid)
}

/// Checks a pool and an identity id.
pub fn validate_identity_call(pool: &str, id: &str) -> Result<(), StoreError> {
    validate_identity(pool)?;
    validate_identity_id(id)
}

/// Checks a pool and logins.
pub fn validate_logins_call(pool: &str, logins: &[Login]) -> Result<(), StoreError> {
    validate_identity(pool)?;
    validate_logins(logins)
}

/// Checks logins: at least one, each part 1 to 256 bytes without control characters.
pub fn validate_logins(logins: &[Login]) -> Result<(), StoreError> {
    if logins.is_empty() {
        return Err(StoreError::BadRequest(
            "at least one login is needed".into(),
        ));
    }
    for login in logins {
        for (what, part) in [("provider", &login.provider), ("subject", &login.subject)] {
            if part.is_empty() || part.len() > MAX_LOGIN_PART {
                return Err(StoreError::BadRequest(format!(
                    "login {what} must be 1 to {MAX_LOGIN_PART} bytes"
                )));
            }
            if part.chars().any(char::is_control) {
                return Err(StoreError::BadRequest(format!(
                    "login {what} must not contain control characters"
                )));
            }
        }
    }
    Ok(())
}

/// Checks a merge's arguments: valid ids, not the same identity.
pub fn validate_merge(pool: &str, from_guest: &str, into: &str) -> Result<(), StoreError> {
    validate_identity_call(pool, from_guest)?;
    validate_identity_id(into)?;
    if from_guest == into {
        return Err(StoreError::BadRequest(
            "an identity cannot be merged into itself".into(),
        ));
    }
    Ok(())
}

/// The identity a set of logins names, from the identity each linked login points to
/// (`found`, unlinked logins left out): none, one, or `LoginsConflict` when they name two.
pub(crate) fn one_identity(found: &[(Login, String)]) -> Result<Option<String>, StoreError> {
    let ids: BTreeSet<&str> = found.iter().map(|(_, id)| id.as_str()).collect();
    let mut ids = ids.into_iter();
    match (ids.next(), ids.next()) {
        (None, _) => Ok(None),
        (Some(id), None) => Ok(Some(id.to_owned())),
        (Some(a), Some(b)) => Err(StoreError::LoginsConflict {
            first: a.to_owned(),
            second: b.to_owned(),
        }),
    }
}

/// The logins a link adds to `id`, given the identity each already-linked one points to:
/// those not linked yet, or `LoginLinked` (nothing to write) if one is linked elsewhere.
pub(crate) fn logins_to_link(
    id: &str,
    logins: &[Login],
    found: &[(Login, String)],
) -> Result<Vec<Login>, StoreError> {
    if let Some((login, other)) = found.iter().find(|(_, owner)| owner != id) {
        return Err(StoreError::LoginLinked {
            login: login.to_string(),
            identity: other.clone(),
        });
    }
    let linked: BTreeSet<&Login> = found.iter().map(|(login, _)| login).collect();
    let new: BTreeSet<Login> = logins
        .iter()
        .filter(|l| !linked.contains(l))
        .cloned()
        .collect();
    Ok(new.into_iter().collect())
}

/// Checks, under the backend's locks, that a merge may go ahead: the guest exists, is a
/// guest and was not merged; the target exists and was not merged.
pub(crate) fn check_merge(
    from: Option<&Identity>,
    into: Option<&Identity>,
    from_id: &str,
    into_id: &str,
) -> Result<(), StoreError> {
    let from = from.ok_or_else(|| StoreError::NotFound(format!("identity {from_id}")))?;
    let into = into.ok_or_else(|| StoreError::NotFound(format!("identity {into_id}")))?;
    for identity in [from, into] {
        check_not_merged(identity)?;
    }
    if !from.guest {
        return Err(StoreError::BadRequest(format!(
            "{from_id} is not a guest: only a guest is merged into another identity"
        )));
    }
    Ok(())
}

/// `IdentityMerged` if the identity was merged away.
pub(crate) fn check_not_merged(identity: &Identity) -> Result<(), StoreError> {
    match &identity.merged_into {
        Some(into) => Err(StoreError::IdentityMerged {
            identity: identity.id.clone(),
            into: into.clone(),
        }),
        None => Ok(()),
    }
}

/// The names a guest's dataset may take under the target, in order: the first with no live
/// dataset of the target is the one. Its own name; else the copy `<name>.<guest's uuid>`
/// cut to 128 characters; else, when that cut lost part of the uuid (a name over 91
/// characters) and the result is taken, the name cut instead so that the whole uuid fits.
pub(crate) fn merge_target_names(name: &str, from_guest: &str) -> Vec<String> {
    let uuid = uuid_of(from_guest);
    // Dataset names and uuids are ASCII (the name pattern), so bytes are characters.
    debug_assert!(validate_dataset_name(name).is_ok());
    let copy: String = format!("{name}.{uuid}")
        .chars()
        .take(MAX_DATASET_NAME)
        .collect();
    let keep = MAX_DATASET_NAME.saturating_sub(uuid.len() + 1);
    let whole_uuid = format!("{}.{uuid}", name.chars().take(keep).collect::<String>());
    let mut names = vec![name.to_owned(), copy];
    if !names.contains(&whole_uuid) {
        names.push(whole_uuid);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "us-east-1:0f8fad5b-d9cb-469f-a165-70867728950e";

    #[test]
    fn test_identity_id_validation() {
        validate_identity_id(ID).unwrap();
        for bad in [
            "",
            "us-east-1",
            "us-east-1:0F8FAD5B-D9CB-469F-A165-70867728950E",
            "us-east-1:0f8fad5bd9cb469fa16570867728950e",
            ":0f8fad5b-d9cb-469f-a165-70867728950e",
            "us east:0f8fad5b-d9cb-469f-a165-70867728950e",
            "us-east-1-and-a-long-tail:0f8fad5b-d9cb-469f-a165-70867728950e",
        ] {
            assert!(
                matches!(validate_identity_id(bad), Err(StoreError::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn test_merge_target_names_are_cut_to_128_characters() {
        let copy = "d.0f8fad5b-d9cb-469f-a165-70867728950e";
        assert_eq!(merge_target_names("d", ID), vec!["d", copy]);
        let long = "n".repeat(120);
        let names = merge_target_names(&long, ID);
        assert_eq!(names.len(), 3);
        assert_eq!(names[1].len(), 128);
        assert!(names[1].starts_with(&format!("{long}.0f8fad")));
        assert_eq!(names[2], format!("{}.{}", "n".repeat(91), &ID[10..]));
        // A 128-character name's cut copy is the name itself.
        let full = "n".repeat(128);
        assert_eq!(merge_target_names(&full, ID)[1], full);
    }

    #[test]
    fn test_logins_decisions() {
        let g = Login::new("google", "1");
        let f = Login::new("facebook", "2");
        assert_eq!(one_identity(&[]).unwrap(), None);
        assert_eq!(
            one_identity(&[(g.clone(), "a".into()), (f.clone(), "a".into())]).unwrap(),
            Some("a".into())
        );
        assert!(matches!(
            one_identity(&[(g.clone(), "a".into()), (f.clone(), "b".into())]),
            Err(StoreError::LoginsConflict { .. })
        ));
        assert_eq!(
            logins_to_link("a", &[g.clone(), f.clone()], &[(g.clone(), "a".into())]).unwrap(),
            vec![f.clone()]
        );
        assert!(matches!(
            logins_to_link("a", &[g.clone(), f], &[(g, "b".into())]),
            Err(StoreError::LoginLinked { .. })
        ));
    }
}
