//! Tandem's Rust client SDK. `Connection` speaks the v1 wire protocol over one WebSocket:
//! it authenticates, matches replies to requests by id, and hands live pushes (`dataset`,
//! `deleted`, `unsubscribed`) to the caller as events.
//!
//! It does not reconnect or cache; those build on top of it. It never panics on what the
//! server sends: unknown frame types are skipped, as the protocol asks.

mod connection;
mod error;

pub use connection::{Closed, Connection, UpdateResult};
pub use error::ClientError;
pub use tandem_protocol as protocol;
