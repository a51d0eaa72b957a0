//! The Cognito-compatible HTTP APIs on the WebSocket's listener (COGNITO.md): the Sync
//! API in [`sync`].

pub(crate) mod sync;
