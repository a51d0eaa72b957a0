//! `SyncStatus`: what an app shows in a sync indicator, in one value that changes as one
//! event (`Client::sync_status_changes`), like PowerSync's and Firebase's status objects.

use crate::ClientError;

/// The client's sync state at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStatus {
    /// Authenticated on a live connection (false while paused).
    pub connected: bool,
    /// An update is on its way to the server.
    pub uploading: bool,
    /// Local changes not yet acknowledged, across every dataset this identity's cache holds
    /// (closed ones and ones cached by an earlier run included): `Client::pending`.
    pub pending: usize,
    /// When (this device's clock, ms since the Unix epoch) the client was last in step with
    /// the server on some dataset: an update acknowledged, or a subscribe's snapshot merged.
    pub last_synced_at: Option<i64>,
    /// Whether that ever happened since the client started.
    pub has_synced: bool,
    /// The last error a sync (the app's, auto-sync's, the reconnect catch-up's), a change set
    /// aside or a connection attempt met; cleared when the client is in step again (a sync
    /// or subscribe succeeds) or comes online.
    pub last_error: Option<ClientError>,
}
