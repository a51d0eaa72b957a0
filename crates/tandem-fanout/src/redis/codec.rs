//! The envelope of a Redis message: an `Event` as bytes and back.

use crate::Event;
use bytes::Bytes;
use std::sync::Arc;
use tandem_store::DatasetKey;

// The message envelope: a version byte, a kind byte, the dataset as three length-prefixed
// strings, then for a commit the sync count, the delta frame as a length-prefixed string
// (length 0: none) and the dataset frame bytes verbatim (to the end of the message), for a
// delete the sync count and the frame verbatim, for a revoke the identity as a fourth string.
// Lengths and the sync count are big-endian u32 and u64. Version 2 added the commit's delta;
// this code still reads version 1, but a node of version 1 drops version-2 messages (see
// docs/OPERATIONS.md on upgrading).

pub(super) const VERSION: u8 = 2;
pub(super) const KIND_COMMIT: u8 = 1;
const KIND_DELETED: u8 = 2;
const KIND_REVOKED: u8 = 3;

pub(super) fn encode(event: &Event) -> Vec<u8> {
    let dataset = event.dataset();
    let tail = match event {
        Event::Commit { frame, delta, .. } => {
            12 + frame.len() + delta.as_ref().map_or(0, Bytes::len)
        }
        Event::Deleted { frame, .. } => 8 + frame.len(),
        Event::Revoked { identity, .. } => 4 + identity.len(),
    };
    let mut out = Vec::with_capacity(
        2 + 12 + dataset.pool.len() + dataset.owner.len() + dataset.name.len() + tail,
    );
    let kind = match event {
        Event::Commit { .. } => KIND_COMMIT,
        Event::Deleted { .. } => KIND_DELETED,
        Event::Revoked { .. } => KIND_REVOKED,
    };
    out.extend_from_slice(&[VERSION, kind]);
    for part in [&dataset.pool, &dataset.owner, &dataset.name] {
        put_str(&mut out, part);
    }
    match event {
        Event::Commit {
            sync_count,
            frame,
            delta,
            ..
        } => {
            out.extend_from_slice(&sync_count.to_be_bytes());
            put_bytes(&mut out, delta.as_deref().unwrap_or_default());
            out.extend_from_slice(frame);
        }
        Event::Deleted {
            sync_count, frame, ..
        } => {
            out.extend_from_slice(&sync_count.to_be_bytes());
            out.extend_from_slice(frame);
        }
        Event::Revoked { identity, .. } => put_str(&mut out, identity),
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Dataset parts, identities and frames (a dataset is at most a few MiB) are far below
    // 4 GiB.
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(b);
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum DecodeError {
    #[error("message truncated")]
    Truncated,
    #[error("unknown envelope version {0}")]
    Version(u8),
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("string is not utf-8")]
    Utf8,
    #[error("trailing bytes after a revoke")]
    Trailing,
}

pub(super) fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let mut reader = Reader(bytes);
    let version = reader.u8()?;
    // Version 1 (before commits carried a delta) is still read, so that a node upgraded
    // before the others hears their commits, deletes and revokes.
    if version != VERSION && version != 1 {
        return Err(DecodeError::Version(version));
    }
    let kind = reader.u8()?;
    if !matches!(kind, KIND_COMMIT | KIND_DELETED | KIND_REVOKED) {
        return Err(DecodeError::Kind(kind));
    }
    let pool = reader.string()?;
    let owner = reader.string()?;
    let name = reader.string()?;
    let dataset = Arc::new(DatasetKey::new(pool, owner, name));
    match kind {
        KIND_REVOKED => {
            let identity = reader.string()?;
            if !reader.0.is_empty() {
                return Err(DecodeError::Trailing);
            }
            Ok(Event::Revoked { dataset, identity })
        }
        KIND_COMMIT => {
            let sync_count = reader.u64()?;
            let delta = if version == 1 {
                &[][..]
            } else {
                reader.bytes()?
            };
            let delta = (!delta.is_empty()).then(|| Bytes::copy_from_slice(delta));
            let frame = Bytes::copy_from_slice(reader.0);
            Ok(Event::Commit {
                dataset,
                sync_count,
                frame,
                delta,
            })
        }
        _ => {
            let sync_count = reader.u64()?;
            let frame = Bytes::copy_from_slice(reader.0);
            Ok(Event::Deleted {
                dataset,
                sync_count,
                frame,
            })
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(buf))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let mut buf = [0u8; 4];
        buf.copy_from_slice(self.take(4)?);
        let len = u32::from_be_bytes(buf) as usize;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Utf8)
    }
}
