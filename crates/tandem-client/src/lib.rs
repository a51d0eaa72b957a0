//! Tandem's Rust client SDK.
//!
//! - `Client` keeps a connection up (reconnect with backoff and jitter, re-subscription,
//!   token refresh) and hands out `Dataset` handles over a persistent offline cache: `get`,
//!   `put`, `remove` and `records` work offline; `sync` sends local changes with the sync
//!   counts they were based on, and conflicts go to a `ConflictHandler`. Nothing written
//!   locally is dropped unless the handler says so.
//! - `Connection` is the protocol underneath: one WebSocket, requests matched to replies by
//!   id, pushes as events. The end-to-end tests drive the server through it.
//!
//! It never panics on what the server sends: unknown frame types are skipped, as the
//! protocol asks.

mod cache;
mod client;
mod conflict;
mod connection;
mod error;

pub use cache::{DatasetCache, LocalRecord};
pub use client::{Client, ClientBuilder, Dataset, DatasetEvent, Status, SyncOutcome};
pub use conflict::{ConflictCase, ConflictHandler, Resolution};
pub use connection::{Closed, Connection, Snapshot, UpdateResult};
pub use error::ClientError;
pub use tandem_protocol as protocol;
