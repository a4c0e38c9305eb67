//! Kalandra client library.
//!
//! - [`mls`]: MLS (RFC 9420) through OpenMLS — seeded provider, device
//!   identity, key packages, room groups.
//! - [`sender_keys`]: per-sender key chains from the epoch's exporter secret
//!   that encrypt `Application` messages (pure).
//! - [`push`]: push-notification keys (PCEK), the key cache a Notification
//!   Service Extension reads, and `decrypt_push`, which needs no MLS state.
//! - [`state`]: the client's connection and membership state machine (pure).
//! - [`connection`], [`tls`]: the QUIC driver and its client TLS.
#![forbid(unsafe_code)]

pub mod connection;
pub mod mls;
pub mod moderation;
pub mod push;
pub mod sender_keys;
pub mod state;
pub mod tls;
