//! Bindings for Kotlin, Swift and Python (uniffi, proc-macro style: no UDL)
//! of client-core's device API ([`device::Device`]) and of kalandra-nse's
//! push decryption ([`nse::decrypt_push`], [`nse::decrypt_push_file`]).
//!
//! The library is built as a cdylib (`libkalandra_ffi.so`, `.dylib`,
//! `.dll`); `scripts/generate-bindings.sh` generates the foreign code from
//! it with this crate's `uniffi-bindgen` binary (docs/MOBILE.md).

uniffi::setup_scaffolding!("kalandra");

pub mod device;
pub mod error;
pub mod nse;

pub use device::{BackgroundReport, Body, Device, Message, RoomSummary};
pub use error::{KalandraError, NseError};
pub use nse::{decrypt_push, decrypt_push_file, PushMessage};
