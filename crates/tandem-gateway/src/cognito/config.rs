//! The Cognito settings section: one field per setting, its default written once in
//! [`CognitoConfig`]'s `Default`; with the `clap` feature the same fields are `tandem serve`
//! flags and `TANDEM_*` variables, as in [`crate::GatewayConfig`].

use crate::config::duration;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// The Cognito Identity endpoint's settings (`shared/COGNITO.md` §3).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct CognitoConfig {
    /// The Cognito identity pool id this node answers for, `<region>:<uuid>`; its identities
    /// are the store's `default` pool. Unset, the Cognito Identity endpoint (`POST /`) is off
    /// and answers 404.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_COGNITO_IDENTITY_POOL"))]
    pub cognito_identity_pool: Option<String>,
    /// Whether GetId gives out guest (unauthenticated) identities to callers without Logins;
    /// off, they get `NotAuthorizedException`.
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            env = "TANDEM_COGNITO_GUESTS",
            num_args = 0..=1,
            default_missing_value = "true",
            action = clap::ArgAction::Set
        )
    )]
    pub cognito_guests: bool,
    /// A file holding the secret the temporary credentials are derived from; every node of a
    /// deployment must share it. Unset, the HS256 JWT secret is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_COGNITO_SECRET_FILE"))]
    pub cognito_secret_file: Option<PathBuf>,
    /// Bytes in one Cognito Identity request body; a larger one gets
    /// `InvalidParameterException` (`cognito_max_request_bytes`). Ten login tokens of 8 KiB
    /// fit.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_COGNITO_MAX_REQUEST_BYTES"))]
    pub cognito_max_request_bytes: usize,
    /// Cognito Sync requests one caller (an identity, or the developer key) may make per
    /// second on this node, in bursts of as many; more get HTTP 429
    /// `TooManyRequestsException`, as AWS throttles; 0 = unlimited.
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_COGNITO_MAX_REQUESTS_PER_SECOND")
    )]
    pub cognito_max_requests_per_second: u32,
    /// The developer key, `AKID:SECRET`: a request SigV4-signed with it and no session token
    /// may address any identity of the pool and the developer operations (ListIdentities,
    /// DescribeIdentity, SetCognitoEvents, BulkPublish, …). Unset, they answer
    /// `NotAuthorizedException`. Use `TANDEM_COGNITO_ADMIN_KEY` rather than the flag, so it
    /// is not in the process list.
    #[serde(skip_serializing, deserialize_with = "deserialize_admin_key")]
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            env = "TANDEM_COGNITO_ADMIN_KEY",
            hide_env_values = true,
            value_parser = parse_admin_key
        )
    )]
    pub cognito_admin_key: Option<String>,
    /// How long a node keeps a pool's SyncTrigger URL (set with SetCognitoEvents on any node)
    /// before it reads it from the store again: a change reaches every node within this.
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_COGNITO_EVENTS_REFRESH", value_parser = duration::parse)
    )]
    pub cognito_events_refresh: Duration,
    /// How long a BulkPublish may wait for the change stream's sinks to take the pool's data
    /// before it is reported FAILED.
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_COGNITO_BULK_PUBLISH_TIMEOUT", value_parser = duration::parse)
    )]
    pub cognito_bulk_publish_timeout: Duration,
    /// This node's change stream sinks (`webhook:NAME`, `redis:KEY`), which BulkPublish
    /// needs and GetIdentityPoolConfiguration reports. Set by the binary, never read from
    /// settings.
    #[serde(skip)]
    #[cfg_attr(feature = "clap", arg(skip))]
    pub stream_sinks: Vec<String>,
    /// The secret the credential keys are derived from: the file's, else the HS256 secret.
    /// Set by the binary, never read from settings.
    #[serde(skip)]
    #[cfg_attr(feature = "clap", arg(skip))]
    pub credential_secret: Option<Vec<u8>>,
    /// How GetOpenIdToken mints: the node's HS256 secret, with the default keys' `iss` and
    /// `aud`, so that `/v1/sync` accepts the token. `None` without an HS256 secret. Set by
    /// the binary, never read from settings.
    #[serde(skip)]
    #[cfg_attr(feature = "clap", arg(skip))]
    pub open_id: Option<OpenIdMint>,
}

/// What GetOpenIdToken signs with.
#[derive(Clone, PartialEq, Eq)]
pub struct OpenIdMint {
    pub hs256_secret: Vec<u8>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

impl Default for CognitoConfig {
    fn default() -> Self {
        CognitoConfig {
            cognito_identity_pool: None,
            cognito_guests: true,
            cognito_secret_file: None,
            cognito_max_request_bytes: 128 * 1024,
            cognito_max_requests_per_second: 0,
            cognito_admin_key: None,
            cognito_events_refresh: Duration::from_secs(5),
            cognito_bulk_publish_timeout: Duration::from_secs(3600),
            stream_sinks: Vec::new(),
            credential_secret: None,
            open_id: None,
        }
    }
}

impl std::fmt::Debug for CognitoConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CognitoConfig")
            .field("cognito_identity_pool", &self.cognito_identity_pool)
            .field("cognito_guests", &self.cognito_guests)
            .field("cognito_secret_file", &self.cognito_secret_file)
            .field("cognito_max_request_bytes", &self.cognito_max_request_bytes)
            .field(
                "cognito_max_requests_per_second",
                &self.cognito_max_requests_per_second,
            )
            .field("cognito_admin_key", &self.cognito_admin_key.is_some())
            .field("cognito_events_refresh", &self.cognito_events_refresh)
            .field(
                "cognito_bulk_publish_timeout",
                &self.cognito_bulk_publish_timeout,
            )
            .field("stream_sinks", &self.stream_sinks)
            .field("credential_secret", &self.credential_secret.is_some())
            .field("open_id", &self.open_id.is_some())
            .finish()
    }
}

/// `--cognito-admin-key`, checked as [`tandem_cognito::DeveloperKey::parse`] does.
pub fn parse_admin_key(s: &str) -> Result<String, String> {
    tandem_cognito::DeveloperKey::parse(s).map(|_| s.to_owned())
}

fn deserialize_admin_key<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|key| parse_admin_key(&key).map_err(serde::de::Error::custom))
        .transpose()
}

/// Checks an identity pool id: `<region>:<lowercase uuid>`, the form identity ids take too.
pub fn validate_pool_id(pool: &str) -> Result<(), String> {
    tandem_store::validate_identity_id(pool).map_err(|_| {
        format!("invalid cognito identity pool `{pool}`: expected <region>:<lowercase uuid>")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cognito_pool_id_validation() {
        assert!(validate_pool_id("us-east-1:0f6a6b1e-2d7c-4f1b-9a55-3c8e9e2b7a10").is_ok());
        for bad in [
            "",
            "us-east-1",
            "us-east-1:NOT-A-UUID",
            ":0f6a6b1e-2d7c-4f1b-9a55-3c8e9e2b7a10",
        ] {
            assert!(validate_pool_id(bad).is_err(), "{bad}");
        }
    }
}
