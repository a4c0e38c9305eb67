//! Bindings for Kotlin, Swift and Python (uniffi, proc-macro style: no UDL)
//! of client-core's device API ([`device::Device`]), for the app. The
//! Notification Service Extension's push decryption is a library of its
//! own, without MLS: `kalandra-nse-ffi`.
//!
//! The library is built as a cdylib (`libkalandra_ffi.so`, `.dylib`,
//! `.dll`); `scripts/generate-bindings.sh` generates the foreign code from
//! it with this crate's `uniffi-bindgen` binary (docs/MOBILE.md).

uniffi::setup_scaffolding!("kalandra");

pub mod device;
pub mod error;

pub use device::{BackgroundReport, Body, Device, Message, RoomSummary};
pub use error::KalandraError;
