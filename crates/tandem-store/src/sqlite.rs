//! SqliteStore: placeholder, being written.

/// The embedded store.
#[derive(Debug)]
pub struct SqliteStore;
