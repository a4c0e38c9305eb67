//! Kalandra client library.
//!
//! - [`mls`]: MLS (RFC 9420) through OpenMLS — seeded provider, device
//!   identity, key packages, room groups.
//! - [`sender_keys`]: per-sender key chains from the epoch's exporter secret
//!   that encrypt `Application` messages (pure).
//! - [`push`]: push-notification keys (PCEK): the MLS-free part lives in
//!   [`kalandra_nse`] (the key cache a Notification Service Extension reads,
//!   and `decrypt_push`) and is re-exported; this module adds the derivation
//!   from an MLS group.
//! - [`state`]: the client's connection and membership state machine (pure).
//! - [`room_log`]: one room's log as the device applies it — cursor, commit
//!   settlement, outbox settlement, sender keys, state machine (pure; both
//!   the client and the simulation run it).
//! - [`store`]: the device's embedded store (redb), encrypted at rest under
//!   a key the application supplies.
//! - [`client`]: a device — identity, rooms, outbox, history — persisted in
//!   the store and driven over one connection (what apps and the CLI use).
//! - [`connection`], [`tls`], [`target`]: the QUIC driver, its client TLS
//!   (pinned fingerprint, CA file or system roots) and the server's address.
#![forbid(unsafe_code)]

#[cfg(feature = "injected-bugs")]
pub mod bugs;
pub mod client;
pub mod connection;
pub mod mls;
pub mod moderation;
pub mod push;
pub mod room_log;
pub mod sender_keys;
pub mod state;
pub mod store;
pub mod target;
pub mod tls;
