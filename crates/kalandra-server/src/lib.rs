//! Kalandra server: the per-room sequencer and the shells that drive it
//! (storage, transport, admin HTTP, metrics).
#![forbid(unsafe_code)]

pub mod admin;
#[cfg(feature = "injected-bugs")]
pub mod bugs;
pub mod config;
pub mod node;
pub mod protocol;
pub mod room;
mod server;
pub mod server_key;
pub mod store;
pub mod transport;

pub use server::{
    RunningServer, Server, ShutdownError, StartError, StartOptions, Stopped, DATABASE_FILE_NAME,
};

pub use admin::{api as admin_api, metrics};
pub use node::{erasure, push};
pub use protocol::session;
pub use room::{audit, mls_state, roles as moderation, room_group, sequencer};
pub use transport::{connection, directory, outbox, rate_limit, tls};
