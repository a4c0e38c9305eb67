//! The QUIC transport (driver).

pub mod connection;
pub mod directory;
pub mod outbox;
pub mod rate_limit;
pub mod tls;
