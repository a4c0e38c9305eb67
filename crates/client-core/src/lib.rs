//! Kalandra client library.
//!
//! - [`mls`]: MLS (RFC 9420) through OpenMLS — seeded provider, device
//!   identity, key packages, room groups.
#![forbid(unsafe_code)]

pub mod connection;
pub mod mls;
pub mod sender_keys;
pub mod state;
pub mod tls;
