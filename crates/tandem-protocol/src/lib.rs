//! Tandem's wire contract, version 1: the JSON frames a client and a gateway exchange over a
//! WebSocket, the stable error codes and limit codes carried in `error` frames, and the
//! close codes that tell a client whether reconnecting makes sense.
//!
//! This crate is serde only: no I/O, no tokio, no axum. It owns the names on the wire and
//! the validation of names that are part of the contract (dataset names, record keys). It
//! does not own limits' values (the store does) nor what a request does (the gateway does).
//! `docs/PROTOCOL.md` is the human reference for everything here.

mod close;
mod error;
mod frame;
pub mod lean;
mod model;
mod strict;

pub use close::{CloseCode, should_reconnect};
pub use error::{ErrorCode, LimitCode};
pub use frame::{
    ClientFrame, DecodeError, Encoding, FEATURE_DELTA, FEATURE_LEAN, ServerFrame,
    UnsubscribeReason, WriteLimits, decode_client_frame, peek_request_id,
};
pub use model::{
    Access, CommitKind, Conflict, DatasetInfo, DatasetRef, HistoryEntry, NameError, Patch, PatchOp,
    Record, RequestId, validate_dataset_name, validate_key,
};

/// The protocol version this crate speaks; sent in `ready`.
pub const PROTOCOL_VERSION: u32 = 1;
