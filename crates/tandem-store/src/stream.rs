//! What the change stream keeps in the store: each consumer's position in the commit log
//! and the lease that lets one node at a time deliver to it, and the events a consumer gave
//! up delivering (dead letters). The delivery itself (webhooks, Redis Streams) is the
//! gateway's; the store only makes the lease and the position safe across nodes.

/// A change stream consumer as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConsumer {
    pub name: String,
    /// The last commit log id the consumer acknowledged; it gets the entries above it.
    pub position: i64,
    /// The node that holds the delivery lease, if one does (it may have expired).
    pub lease_holder: Option<String>,
    /// Milliseconds since the epoch when the lease ends (0 when released).
    pub lease_until: i64,
}

/// An event a consumer gave up delivering, kept for an operator to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The commit log entry the event came from (a consumer keeps one letter per entry).
    pub entry_id: i64,
    /// The event as it would have been delivered.
    pub event: String,
    /// The last delivery error.
    pub error: String,
    pub attempts: u32,
    /// Milliseconds since the epoch when it was given up.
    pub time: i64,
}

/// The longest consumer or node name accepted, in bytes.
pub const MAX_STREAM_NAME: usize = 256;

/// Checks a consumer's or a node's name, as every backend does before any I/O: 1 to
/// [`MAX_STREAM_NAME`] bytes, no control characters.
pub(crate) fn validate_name(what: &str, name: &str) -> Result<(), crate::StoreError> {
    if name.is_empty() || name.len() > MAX_STREAM_NAME || name.chars().any(char::is_control) {
        return Err(crate::StoreError::BadRequest(format!(
            "a stream {what} name must be 1 to {MAX_STREAM_NAME} bytes without control \
             characters"
        )));
    }
    Ok(())
}

/// Checks dead letters before any I/O: no NUL (PostgreSQL's `text` cannot hold it).
pub(crate) fn validate_letters(letters: &[DeadLetter]) -> Result<(), crate::StoreError> {
    if letters
        .iter()
        .any(|l| l.event.contains('\0') || l.error.contains('\0'))
    {
        return Err(crate::StoreError::BadRequest(
            "a dead letter must not contain the NUL character".into(),
        ));
    }
    Ok(())
}
