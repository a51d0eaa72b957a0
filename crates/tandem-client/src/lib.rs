//! Tandem's Rust client SDK.
//!
//! - `Client` keeps a connection up (reconnect with backoff and jitter, re-subscription,
//!   token refresh) and hands out `Dataset` handles over a persistent offline cache: `get`,
//!   `put`, `remove` and `records` work offline; `sync` sends local changes with the sync
//!   counts they were based on, and conflicts go to a `ConflictHandler`. Nothing written
//!   locally is dropped unless the handler says so.
//! - `Connection` is the protocol underneath: one WebSocket, requests matched to replies by
//!   id, pushes as events. The end-to-end tests drive the server through it.
//! - Protocol features (docs/PROTOCOL.md §1): a `Client` asks for `delta` (pushes carry only
//!   the records a commit changed) and `lean` (records leave out fields their frame says) by
//!   default, and re-subscribes with `since` (the sync count of its cached copy) so that a
//!   reconnect fetches only the changes. A delta applies on the copy at its base; an old one
//!   is ignored; one after a gap makes the client fetch `changes` since its count. A whole
//!   snapshot below the `since` sent (the server's store was replaced by an older one)
//!   replaces the copy, lower count and all; local edits stay pending, rebased on it. Turn the
//!   features off with `ClientBuilder::features(Vec::<String>::new())` (whole `dataset`
//!   pushes, full records). `Connection::connect` asks for none; `connect_with_features` for
//!   some. Lean records are filled in on reading either way (`ServerFrame::from_json`).
//!
//! - Never stuck: the server's write limits (`ready.limits`, or learnt from an error's `max`;
//!   `Client::limits`) make `put` refuse at once a change that could never be stored
//!   (`ClientError::TooLarge`), and `sync` split updates at `max_patches` and
//!   `max_frame_bytes`. A change the server refuses for good (`too_large`, `bad_request`,
//!   `limit_exceeded` for `max_records`), or queued before the limits were known and breaking
//!   one, is set aside: kept and readable, still pending, reported once
//!   (`DatasetEvent::SetAside` with its key and reason), not sent again until edited, and
//!   dropped by `Dataset::discard(key)` or `Dataset::revert()`. It never blocks other keys.
//! - Keep following: after a remote delete the dataset's `OnDatasetDeleted` policy
//!   (`DeletedPolicy::KeepPending` by default, `KeepAll`, `Drop`, or a function) decides what
//!   stays of the local copy, and the client subscribes again at once, so a re-creation
//!   arrives live. After a revoke, `sync` answers `Revoked` until the dataset is followed
//!   again (`Dataset::subscribe`, reopening it, or the next reconnect) once it was shared
//!   again.
//! - History: `Client::history` pages through a dataset's commits (who, when, device, keys),
//!   `Client::read_at` reads it as it was at a sync count, and `Client::restore` makes it
//!   that again as one new commit (pushed to every subscriber, this client's datasets too).
//!
//! - Parity with the JavaScript SDK: sharing on `Client` (`grant`, `revoke`,
//!   `list_datasets`, `delete_dataset`), `Dataset::close` (unsubscribed, pending changes
//!   kept in the cache and sent when it is opened again), `Dataset::put_all`, auto-sync
//!   (`ClientBuilder::auto_sync`, `Dataset::set_auto_sync`: a debounced sync after local
//!   edits), `DatasetEvent::Pending` and `DatasetEvent::Synced`, and the server's record
//!   metadata (`LocalRecord::last_modified`, `last_modified_by`, `device_id`) kept in the
//!   local record and its cache. Remote changes are written to the cache by a background
//!   saver, off the dataset's lock and several in one write; `put` writes before it returns,
//!   so it can report a cache it cannot write.
//! - Sign-out and status: `Client::pending` counts every cached dataset's pending changes
//!   (closed ones, and ones an earlier run left); `Client::cached_datasets` lists them;
//!   `Client::wait_for_pending_writes` (or `flush`) sends and waits until what is pending now
//!   is acknowledged, across reconnects; `Client::wipe` deletes this identity's local cache
//!   and nothing else, refusing with `ClientError::PendingWrites` while changes are pending
//!   unless `wipe_forced`; `Client::sync_status` (`connected`, `uploading`, `pending`,
//!   `last_synced_at`, `has_synced`, `last_error`) changes as one value
//!   (`sync_status_changes`); `Client::pause` / `resume` take the client off the network and
//!   back.
//! - Local edits are events: every `put`, `remove`, `put_all`, and what `discard` or `revert`
//!   drop, is a `DatasetEvent::Changed` with `ChangeSource::Local` (a key already pending
//!   too), as remote changes are with `ChangeSource::Remote`. A dataset's snapshot
//!   (`DatasetSnapshot`: records, sync count, pending, `has_pending_writes`, `from_server`,
//!   and a `version` one higher per new snapshot) is the same `Arc` until that content
//!   changes: `Dataset::snapshot` reads it, `Dataset::snapshots` watches it (a `watch`
//!   receiver: one that falls behind sees the latest), `Dataset::on_snapshot` calls a
//!   function with it. A dataset open on a client is one handle with one conflict handler:
//!   `Client::open` again returns the same handle (`==`) when it names no handler
//!   (`None`: the client's `ClientBuilder::conflict_handler`) or the same one, and refuses
//!   another with `ClientError::OtherConflictHandler`; `Dataset::set_conflict_handler`
//!   replaces it for every handle.
//!
//! It never panics on what the server sends: unknown frame types are skipped, as the
//! protocol asks.

mod cache;
mod client;
mod conflict;
mod connection;
mod deleted;
mod error;
mod limits;
mod snapshot;
mod status;

pub use cache::{CachedDataset, DatasetCache, LocalRecord};
pub use client::{ChangeSource, Client, ClientBuilder, Dataset, DatasetEvent, Status, SyncOutcome};
pub use conflict::{ConflictCase, ConflictHandler, Resolution};
pub use connection::{Closed, Connection, HistoryPage, Snapshot, UpdateResult};
pub use deleted::{DeletedPolicy, OnDatasetDeleted};
pub use error::ClientError;
pub use limits::{Limits, SetAside};
pub use snapshot::{DatasetSnapshot, SnapshotListener};
pub use status::SyncStatus;
pub use tandem_protocol as protocol;
