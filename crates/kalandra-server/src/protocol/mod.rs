//! The protocol a connection speaks (pure).

pub mod session;
