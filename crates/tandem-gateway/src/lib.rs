//! Tandem's gateway (being written).

pub mod auth;
