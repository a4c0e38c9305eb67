//! `kalandra-bench`: a load generator for Kalandra.
//!
//! It drives a real `kalandra-server` process over QUIC on loopback with
//! many authenticated clients that use `client-core`'s OpenMLS groups,
//! sender-key encryption and frame signatures, and measures:
//!
//! - [`scenarios::throughput`]: acknowledged durable frames per second and
//!   acknowledgement latency, senders pipelined with a bounded window;
//! - [`scenarios::latency`]: send-to-received-by-all latency at a fixed rate;
//! - [`scenarios::fanout`]: deliveries per second into one large room;
//! - [`scenarios::commit`]: commit submitted → acknowledged in large rooms;
//! - [`scenarios::connections`]: server memory per idle connection;
//! - [`scenarios::federation`]: two linked domains; relay lag and
//!   throughput of senders on one domain in a room of the other, against a
//!   local room in the same run.
//!
//! [`jetstream`] runs the same load discipline against NATS JetStream as a
//! baseline. Frames are sealed (encrypted and signed) before the timed part
//! of a run, so that the two cores the generator shares with the server are
//! not spent on client cryptography while the server is measured; the
//! sealing rate is reported separately.
#![forbid(unsafe_code)]

pub mod error;
pub mod jetstream;
pub mod limits;
pub mod members;
pub mod procfs;
pub mod progress;
pub mod report;
pub mod scenarios;
pub mod server;
pub mod stats;

pub use error::BenchError;
