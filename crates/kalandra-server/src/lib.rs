//! Kalandra server: the per-room sequencer and the shells that drive it
//! (storage, transport, admin HTTP, metrics).
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_api;
pub mod audit;
#[cfg(feature = "injected-bugs")]
pub mod bugs;
pub mod config;
pub mod connection;
pub mod directory;
pub mod erasure;
pub mod metrics;
pub mod mls_state;
pub mod moderation;
pub mod node;
pub mod outbox;
pub mod push;
pub mod rate_limit;
pub mod room;
pub mod room_group;
pub mod sequencer;
pub mod server_key;
pub mod session;
pub mod store;
pub mod tls;
